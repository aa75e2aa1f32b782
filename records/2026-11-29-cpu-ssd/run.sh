#!/bin/bash
# ssd.py's cpu preset (what a plain --train runs without CUDA) from nothing, after the last extra conv lost its batch
# norm (2026-11-29), on the 2-core AMD EPYC (AVX2 only) machine kind CI has.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-ssd
rm -rf runs/cpu_ssd
echo "[$(date -u +%T)] python ssd.py --train --out runs/cpu_ssd" >> $R/commands.txt
/usr/bin/time -v python ssd.py --train --out runs/cpu_ssd > $R/ssd.log 2>&1
echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
cp runs/cpu_ssd/metrics.jsonl $R/ssd.metrics.jsonl; cp runs/cpu_ssd/config.json $R/ssd.config.json
