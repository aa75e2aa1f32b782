#!/bin/bash
# CPU speed of every model file alone (default Config, random weights), one after another. R-CNN: inference at batch 1
# only and one timed step (its inference runs the CNN on 2000 warped regions per image: about a minute on this CPU).
cd "$(dirname "$0")/../.."
NOTE="bench.py speed on this 2-core CPU, shared with other jobs (wall time); random weights"
for m in faster_rcnn retinanet fcos ssd yolo detr; do
  python bench.py speed --model $m --device cpu --steps 3 --train-batch 2 --infer-batch 8 --note "$NOTE" \
    --json records/2026-11-27-cpu/bench_$m.json
done
python bench.py speed --model rcnn --device cpu --steps 1 --train-batch 2 --infer-batch 1 --note "$NOTE" \
  --json records/2026-11-27-cpu/bench_rcnn.json
