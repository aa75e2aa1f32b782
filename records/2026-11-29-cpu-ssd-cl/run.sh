#!/bin/bash
# ssd.py's cpu preset (what a plain --train runs without CUDA) from nothing, with channels_last (2026-11-29), alone on
# a 2-core AMD EPYC with AVX-512 (env.txt).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-ssd-cl
rm -rf runs/cpu_ssd
echo "[$(date -u +%T)] python ssd.py --train --out runs/cpu_ssd" >> $R/commands.txt
/usr/bin/time -v python ssd.py --train --out runs/cpu_ssd > $R/ssd.log 2>&1
echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
cp runs/cpu_ssd/metrics.jsonl $R/ssd.metrics.jsonl; cp runs/cpu_ssd/config.json $R/ssd.config.json
