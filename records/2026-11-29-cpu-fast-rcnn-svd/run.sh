#!/bin/bash
# fast_rcnn.py's cpu preset from nothing, then --eval of its best.pt with and without truncated SVD of fc6 / fc7
# (issue 13: the speed-up and the mAP change), alone on a 2-core AMD EPYC with AVX-512 (env.txt).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-fast-rcnn-svd
O=runs/cpu_fast_rcnn_svd
rm -rf $O
echo "[$(date -u +%T)] python fast_rcnn.py --train --out $O" >> $R/commands.txt
/usr/bin/time -v python fast_rcnn.py --train --out $O > $R/fast_rcnn.log 2>&1
echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
cp $O/metrics.jsonl $R/fast_rcnn.metrics.jsonl; cp $O/config.json $R/fast_rcnn.config.json
# F = 256 here (the paper's 4096): the paper's fractions of it (fc6 1024/4096, fc7 256/4096) and the paper's ranks
for svd in "0 0" "64 16" "128 32" "32 8"; do
    set -- $svd
    echo "[$(date -u +%T)] python fast_rcnn.py --eval --weights $O/best.pt --svd-fc6 $1 --svd-fc7 $2 --out $O/eval" >> $R/commands.txt
    /usr/bin/time -f "wall %e s, CPU %U+%S s" python fast_rcnn.py --eval --weights $O/best.pt --svd-fc6 $1 --svd-fc7 $2 \
        --out $O/eval > $R/eval_svd_$1_$2.txt 2>&1
    echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt
done
