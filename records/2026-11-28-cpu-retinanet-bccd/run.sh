#!/bin/bash
# RetinaNet's BCCD run of ../2026-11-27-cpu-bccd/run.sh again, with the cpu preset of 2026-11-28 (v2's GIoU box loss,
# lr 2e-3): the same command, the same data, this 2-core CPU, alone; then after.sh's evaluation and picture.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-retinanet-bccd; BCCD=${BCCD:-../shared/data/bccd}
D="--preset cpu --data voc --data-root $BCCD --train-split trainval --val-split test --warmup-iters 30 --workers 1"
{ echo "CPU ($(uname -m), $(nproc) cores), $(lscpu | sed -n 's/^Model name: *//p'), alone (one run after the other)"
  python -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__)"; nproc; date -u; } > $R/env.txt 2>&1
m=retinanet; S="--min-size 256 --max-size 352 --epochs 9 --lr-steps 7"
echo "[$(date -u +%T)] $m: python $m.py --train $D $S --out runs/bccd28/$m" | tee -a $R/commands.txt
timeout -s TERM -k 30 600 /usr/bin/time -v python $m.py --train $D $S --out runs/bccd28/$m > $R/$m.log 2>&1
echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
cp runs/bccd28/$m/metrics.jsonl $R/$m.metrics.jsonl; cp runs/bccd28/$m/config.json $R/$m.config.json
python $m.py --eval --weights runs/bccd28/$m/best.pt --workers 1 --out runs/bccd28/$m > $R/$m.eval.txt 2>&1
python $m.py --predict $BCCD/JPEGImages/BloodImage_00068.jpg --weights runs/bccd28/$m/best.pt --workers 1 \
  --out runs/bccd28/pred_$m > $R/$m.predict.txt 2>&1
echo "[$(date -u +%T)] end" >> $R/commands.txt
