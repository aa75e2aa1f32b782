#!/bin/bash
# One device call: env, bench alone on the GPU, then every default --train at once (sharing the GPU), pictures, tar.
# DRY=1: the same steps on this machine's CPU with tiny settings (to check the script, not the numbers).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; R=$OUT/r; mkdir -p $R; rm -rf runs/gpu
PY=python3; T_TRAIN=${T_TRAIN:-300}; DEV="--device cuda"; TINY=""; BT=16
if [ -n "$DRY" ]; then DEV="--device cpu"; TINY="--num-train 16 --num-val 8 --epochs 1 --image-size 64 --batch-size 4 --preset cpu"; T_TRAIN=120; BT=2; fi
start=$(date +%s); t() { echo "[$(( $(date +%s) - start )) s] $*"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__,torch.cuda.is_available())"; nproc; date -u; } > $R/env.txt 2>&1
cat $R/env.txt
t "bench (alone on the device)"
if [ -z "$DRY" ]; then
  for m in faster_rcnn fcos; do
    timeout 60 $PY bench.py $m $DEV --image-size 320 320 --min-size 320 --max-size 533 --train-batch $BT --infer-batch $BT --steps 10 > $R/bench_$m.txt 2>&1; t "bench $m rc=$?"
  done
  timeout 40 $PY bench.py yolo $DEV --scale yolov5s --yolo-size 640 --train-batch 16 --steps 10 > $R/bench_yolo.txt 2>&1; t "bench yolo rc=$?"
fi
t "default runs, all at once, $T_TRAIN s each at most"
for m in faster_rcnn retinanet fcos ssd yolo detr; do
  w=2; [ $m = yolo ] && w=3
  timeout -s TERM -k 30 $T_TRAIN $PY $m.py --train --workers $w --out runs/gpu/$m $DEV $TINY > $R/train_$m.txt 2>&1 &
done
timeout -s TERM -k 30 $T_TRAIN nice -n 5 $PY rcnn.py --train --workers 3 --out runs/gpu/rcnn $DEV $TINY > $R/train_rcnn.txt 2>&1 &
wait; t "runs stopped"
for m in faster_rcnn retinanet fcos ssd yolo detr rcnn; do
  cp runs/gpu/$m/metrics.jsonl $R/metrics_$m.jsonl 2>/dev/null
  [ -f runs/gpu/$m/best.pt ] && timeout 45 $PY $m.py --predict .gpu/sample.png --weights runs/gpu/$m/best.pt --out $R/pred_$m $DEV > $R/predict_$m.txt 2>&1 &
done
wait; t "pictures done"
for f in $R/train_*.txt; do echo "== $f"; grep -E "AP50|done:|stopped|Error|error" $f | tail -4; done
for f in $R/bench_*.txt; do echo "== $f"; cat $f | tail -22; done
tar czf $OUT/results.tgz -C $OUT r; ls -la $OUT; t "end"
