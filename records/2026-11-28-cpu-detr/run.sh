#!/bin/bash
# 2-epoch variants of detr.py's cpu preset (python detr.py --train, picked without CUDA), one after the other, each
# alone on this 2-core machine: which change lets DETR begin to detect within a CPU run's minutes?
# VARIANTS="name:flags;name:flags" picks some; each run writes to runs/cpu_detr/NAME, its output to variant-NAME.log.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-detr
IFS=';' read -ra runs <<< "${VARIANTS:-base:;dc5:--dilation}"
for v in "${runs[@]}"; do
  name=${v%%:*}; flags=${v#*:}
  echo "[$(date -u +%T)] $name: python detr.py --train --epochs ${EPOCHS:-2} $flags --out runs/cpu_detr/$name" >> $R/commands.txt
  /usr/bin/time -v python detr.py --train --epochs ${EPOCHS:-2} $flags --out runs/cpu_detr/$name > $R/variant-$name.log 2>&1
  echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
done
