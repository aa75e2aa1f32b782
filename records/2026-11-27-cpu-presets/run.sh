#!/bin/bash
# Each file's synthetic `cpu` preset -- what a plain `python X.py --train` runs without CUDA -- on this 2-core CPU,
# one file after the other, alone (nothing else running), from random weights. Every run evaluates after each epoch
# (mAP on the synthetic val split) into metrics.jsonl; /usr/bin/time gives the wall time (proposals included).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-27-cpu-presets
{ echo "CPU ($(uname -m), $(nproc) cores), $(lscpu | sed -n 's/^Model name: *//p'), alone (one run after the other)"
  python -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__)"; date -u; } > $R/env.txt 2>&1
run() {  # run NAME SECONDS: a plain --train, stopped (SIGTERM: a checkpoint, then exit) after SECONDS
  m=$1; s=$2; echo "[$(date -u +%T)] $m: python $m.py --train --out runs/cpu/$m (limit ${s} s)" | tee -a $R/commands.txt
  rm -rf runs/cpu/$m
  timeout -s TERM -k 60 $s /usr/bin/time -v python $m.py --train --out runs/cpu/$m > $R/$m.log 2>&1; echo "  rc=$?" >> $R/commands.txt
  cp runs/cpu/$m/metrics.jsonl $R/$m.metrics.jsonl; cp runs/cpu/$m/config.json $R/$m.config.json
}
run fast_rcnn 1020
run yolo 1020
run ssd 1020
run rcnn 1500
run detr 1020
echo "[$(date -u +%T)] end" >> $R/commands.txt
