#!/bin/bash
# fast_rcnn.py's cpu preset after this commit (stride 8, RoIAlign, 2 epochs), from nothing (selective search included),
# alone on this 2-core machine.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-fast-rcnn
rm -rf runs/cpu_fast_rcnn
echo "[$(date -u +%T)] python fast_rcnn.py --train --out runs/cpu_fast_rcnn" >> $R/commands.txt
/usr/bin/time -v python fast_rcnn.py --train --out runs/cpu_fast_rcnn > $R/fast_rcnn.log 2>&1
echo "  rc=$?" >> $R/commands.txt
cp runs/cpu_fast_rcnn/metrics.jsonl $R/fast_rcnn.metrics.jsonl; cp runs/cpu_fast_rcnn/config.json $R/fast_rcnn.config.json
