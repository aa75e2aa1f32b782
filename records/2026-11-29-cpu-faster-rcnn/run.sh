#!/bin/bash
# The README's first command on a machine without CUDA, python faster_rcnn.py --train (its cpu preset, picked by
# itself), from nothing, alone on this 2-core machine (AMD EPYC, AVX2 only: CI's kind), after the commits of
# 2026-11-29 that changed the random streams (seed_everything keys by length) and the template (SIGTERM, presets
# under --weights): does the first command still learn as the README says (0.521 in 12.6 minutes on 2026-11-28)?
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-faster-rcnn
{ echo "CPU ($(uname -m), $(nproc) cores), $(lscpu | sed -n 's/^Model name: *//p'), alone"
  python -c "import sys,torch,torchvision;print(sys.version.split()[0],torch.__version__,torchvision.__version__)"
  git rev-parse HEAD; date -u; } > $R/env.txt 2>&1
rm -rf runs/cpu_29/faster_rcnn
/usr/bin/time -v python faster_rcnn.py --train --out runs/cpu_29/faster_rcnn > $R/faster_rcnn.log 2>&1
echo "rc=$? [$(date -u +%T)]" >> $R/env.txt
cp runs/cpu_29/faster_rcnn/metrics.jsonl $R/faster_rcnn.metrics.jsonl
cp runs/cpu_29/faster_rcnn/config.json $R/faster_rcnn.config.json
