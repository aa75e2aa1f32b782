#!/bin/bash
# Each FILES's --train (its cpu preset, picked without CUDA) from nothing, one after the other, alone on this 2-core
# machine (AMD EPYC, AVX2 only: the machine kind CI has), where the presets sized on the first machine took 18-30
# minutes (../2026-11-28-cpu-gallery); the presets here are sized for this machine.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-presets-avx2
for f in ${FILES:-faster_rcnn}; do
  rm -rf runs/cpu_avx2/$f
  echo "[$(date -u +%T)] python $f.py --train --out runs/cpu_avx2/$f" >> $R/commands.txt
  /usr/bin/time -v python $f.py --train --out runs/cpu_avx2/$f > $R/$f.log 2>&1
  echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
  cp runs/cpu_avx2/$f/metrics.jsonl $R/$f.metrics.jsonl; cp runs/cpu_avx2/$f/config.json $R/$f.config.json
done
