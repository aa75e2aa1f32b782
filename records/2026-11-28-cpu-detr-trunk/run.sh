#!/bin/bash
# 2-epoch variants of detr.py's cpu preset (python detr.py --train, picked without CUDA), one after the other, each
# alone on this 2-core machine: which change lets DETR begin to detect within a CPU run's minutes?
# VARIANTS="name:flags;name:flags" picks some; each run writes to runs/cpu_detr_trunk/NAME, its output to variant-NAME.log.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
# --truncate is not in detr.py: apply this folder's truncate.patch first (git apply records/2026-11-28-cpu-detr-trunk/truncate.patch)
R=records/2026-11-28-cpu-detr-trunk
IFS=';' read -ra runs <<< "${VARIANTS:-t1:--truncate 1;t2:--truncate 2}"
# then, without the patch: VARIANTS="d0:--dropout 0" (the transformer without dropout; it ran from a copy of this script that wrote to runs/cpu_detr_d0/)
for v in "${runs[@]}"; do
  name=${v%%:*}; flags=${v#*:}
  echo "[$(date -u +%T)] $name: python detr.py --train --epochs ${EPOCHS:-2} $flags --out runs/cpu_detr_trunk/$name" >> $R/commands.txt
  /usr/bin/time -v python detr.py --train --epochs ${EPOCHS:-2} $flags --out runs/cpu_detr_trunk/$name > $R/variant-$name.log 2>&1
  echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
done
