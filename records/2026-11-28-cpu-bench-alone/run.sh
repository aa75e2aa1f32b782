#!/bin/bash
# CPU benches against the references, each alone on this idle 2-core machine (the README's CPU figures for SSD, YOLO
# and DETR were measured beside other jobs, at a load average of 8-10). Reference work trees:
#   git --git-dir=PATH/TO/detr.git archive 29901c51d7fe8712168b8d0d64351170bc0f83e0 | tar -x -C /tmp/detr
#   git --git-dir=PATH/TO/yolov5.git archive v7.0 | tar -x -C /tmp/yolov5
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-bench-alone
# (first-detr-steps5.txt: the same with --steps 5, run once before)
/usr/bin/time -v python bench.py detr --device cpu --detr-root /tmp/detr --min-size 320 --max-size 533 --steps 15 > $R/bench_detr.txt 2>&1
/usr/bin/time -v python bench.py yolo --device cpu --yolov5 /tmp/yolov5 --yolo-size 320 --steps 7 --train-batch 8 > $R/bench_yolo.txt 2>&1
/usr/bin/time -v python bench.py ssd --device cpu --steps 3 > $R/first-ssd-not-alternating.txt 2>&1  # bench.py before this commit: ours, then torchvision
/usr/bin/time -v python bench.py ssd --device cpu --steps 5 > $R/bench_ssd.txt 2>&1  # the steps alternating
