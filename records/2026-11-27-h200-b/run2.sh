#!/bin/bash
# One device call (session 2): env; bench.py alone on the GPU for ssd (vs torchvision), yolo (vs v7.0), detr (vs the
# official DETR), fast_rcnn (vs rcnn); then the default --train of yolo, detr, fast_rcnn (proposals computed before,
# carried) and rcnn (likewise), four at once on the GPU, stopped at DEADLINE s; DETR's query spread; pictures; tar.
# DRY=1: the same steps on this machine's CPU with tiny settings (checks the script, not the numbers).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out2}; R=$OUT/r; mkdir -p $R; rm -rf runs/gpu
PY=python3; DEV="--device cuda"; TINY=""; DEADLINE=${DEADLINE:-505}; ST=8
if [ -n "$DRY" ]; then DEV="--device cpu"; TINY="--num-train 16 --num-val 8 --epochs 1 --image-size 64 --batch-size 4 --preset cpu"; DEADLINE=200; ST=1; fi
start=$(date +%s); t() { echo "[$(( $(date +%s) - start )) s] $*"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__,torch.cuda.is_available())"; nproc; date -u; } > $R/env.txt 2>&1
cat $R/env.txt
# proposals made on the CPU before (.gpu/props.py), packed (.gpu/pack.py): unpack into each run's folder
for m in fast_rcnn rcnn; do mkdir -p runs/gpu/$m; for s in train val; do
  [ -f .gpu/p/$m.$s.pk.npz ] && PYTHONPATH=. $PY .gpu/pack.py unpack .gpu/p/$m.$s.pk.npz runs/gpu/$m/proposals_$s.npz; done; done
t "proposals unpacked"; ls -la runs/gpu/*/
if [ -z "$DRY" ]; then
  timeout 70 $PY bench.py ssd $DEV --train-batch 32 --infer-batch 32 --steps $ST --json $R/bench_ssd.json > $R/bench_ssd.txt 2>&1; t "bench ssd rc=$?"
  timeout 70 $PY bench.py yolo $DEV --yolov5 .gpu/refs/yolov5 --scale yolov5s --yolo-size 640 --train-batch 16 --steps $ST --json $R/bench_yolo.json > $R/bench_yolo.txt 2>&1; t "bench yolo rc=$?"
  timeout 80 $PY bench.py detr $DEV --detr-root .gpu/refs/detr --steps $ST --json $R/bench_detr.json > $R/bench_detr.txt 2>&1; t "bench detr rc=$?"
  timeout 45 $PY bench.py fast_rcnn $DEV --image-size 320 320 --steps 3 > $R/bench_fast_rcnn.txt 2>&1; t "bench fast_rcnn rc=$?"
else
  timeout 200 $PY bench.py ssd $DEV --train-batch 2 --infer-batch 2 --steps 1 --json $R/bench_ssd.json > $R/bench_ssd.txt 2>&1; t "bench ssd rc=$?"
  timeout 200 $PY bench.py yolo $DEV --yolov5 .gpu/refs/yolov5 --scale yolov5n --yolo-size 128 --train-batch 2 --steps 1 --json $R/bench_yolo.json > $R/bench_yolo.txt 2>&1; t "bench yolo rc=$?"
  timeout 200 $PY bench.py detr $DEV --detr-root .gpu/refs/detr --min-size 128 --max-size 128 --image-size 128 128 --infer-batch 2 --steps 1 --json $R/bench_detr.json > $R/bench_detr.txt 2>&1; t "bench detr rc=$?"
  timeout 200 $PY bench.py fast_rcnn $DEV --image-size 96 96 --steps 1 > $R/bench_fast_rcnn.txt 2>&1; t "bench fast_rcnn rc=$?"
fi
T_TRAIN=$(( DEADLINE - ($(date +%s) - start) )); [ $T_TRAIN -lt 200 ] && T_TRAIN=200
t "default runs, four at once, $T_TRAIN s each"
for m in yolo detr fast_rcnn rcnn; do
  w=3; [ $m = yolo ] && w=4; [ $m = detr ] && w=2
  timeout -s TERM -k 30 $T_TRAIN $PY $m.py --train --workers $w --out runs/gpu/$m $DEV $TINY > $R/train_$m.txt 2>&1 &
done
wait; t "runs stopped"
for m in yolo detr fast_rcnn rcnn; do
  cp runs/gpu/$m/metrics.jsonl $R/$m.metrics.jsonl 2>/dev/null
  [ -f runs/gpu/$m/best.pt ] && timeout 30 $PY $m.py --predict .gpu/sample.png --weights runs/gpu/$m/best.pt --out $R/pred_$m $DEV > $R/predict_$m.txt 2>&1 &
done
w=runs/gpu/detr/last.pt; [ -f $w ] || w=runs/gpu/detr/best.pt
[ -f $w ] && timeout 30 $PY .gpu/detr_spread.py $w > $R/detr_spread.txt 2>&1 &
wait; t "pictures and spread done"
for f in $R/train_*.txt; do echo "== $f"; grep -E "AP50|mAP|done:|stopped|Error|error|stage" $f | tail -6; done
for f in $R/bench_*.txt $R/detr_spread.txt; do echo "== $f"; tail -14 $f; done
tar czf $OUT/results.tgz -C $OUT r; ls -la $OUT; t "end"
