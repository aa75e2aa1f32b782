#!/bin/bash
# BCCD (../shared/data/bccd: 292 trainval / 72 test images of 640x480, 3 classes) from random weights, on this 2-core
# CPU, one file after the other, alone: each file's cpu preset (ResNet-18 / yolov5n / eighth-width VGG from scratch),
# scaled to the data: ~256 x 352 px (SSD squashes to 300 x 300), epochs for ~8 minutes, the lr drop near the end.
# Every run evaluates after each epoch (COCO's 12 numbers and VOC_mAP50 on the test split) into metrics.jsonl.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-27-cpu-bccd; BCCD=${BCCD:-../shared/data/bccd}
D="--preset cpu --data voc --data-root $BCCD --train-split trainval --val-split test --warmup-iters 30 --workers 1"
{ echo "CPU ($(uname -m), $(nproc) cores), $(lscpu | sed -n 's/^Model name: *//p'), alone (one run after the other)"
  python -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__)"; nproc; date -u; } > $R/env.txt 2>&1
run() {  # run NAME SECONDS ARGS...
  m=$1; s=$2; shift 2; echo "[$(date -u +%T)] $m: python $m.py --train $D $* --out runs/bccd/$m" | tee -a $R/commands.txt
  timeout -s TERM -k 30 $s python $m.py --train $D "$@" --out runs/bccd/$m > $R/$m.log 2>&1; echo "  rc=$?" >> $R/commands.txt
  cp runs/bccd/$m/metrics.jsonl $R/$m.metrics.jsonl; cp runs/bccd/$m/config.json $R/$m.config.json
}
S="--min-size 256 --max-size 352"
run faster_rcnn 600 $S --epochs 7 --lr-steps 6
run retinanet 600 $S --epochs 9 --lr-steps 7
run fcos 600 $S --epochs 9 --lr-steps 7
run ssd 600 --image-size 300 --epochs 14 --lr-steps 11
run yolo 600 --image-size 352 --epochs 20
run detr 600 $S --epochs 11 --lr-steps 9
run fast_rcnn 780 --proposal-side 352 --scales 256 --test-scales 256 --max-size 352 --epochs 6 --lr-steps 5 --workers 2
run rcnn 1800 --proposal-side 352 --proposals-per-image 500 --epochs 3 --lr-steps 2 --workers 2
echo "[$(date -u +%T)] end" >> $R/commands.txt
