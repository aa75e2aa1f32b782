#!/bin/bash
# detr.py's cpu preset for twice its epochs (12, the lr x0.1 for the last), alone on a 2-core AMD EPYC with AVX-512
# (env.txt), where the preset runs faster than on the machines of its earlier records: does DETR's class loss leave the
# prior's level given more steps?
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-detr-long
O=runs/cpu_detr_long
rm -rf $O
echo "[$(date -u +%T)] python detr.py --train --epochs 12 --lr-steps 11 --out $O" >> $R/commands.txt
/usr/bin/time -v python detr.py --train --epochs 12 --lr-steps 11 --out $O > $R/variant-detr_e12.log 2>&1
echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
cp $O/metrics.jsonl $R/variant-detr_e12.metrics.jsonl; cp $O/config.json $R/variant-detr_e12.config.json
