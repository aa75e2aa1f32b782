#!/bin/bash
# Why detr.py's cpu preset does not learn to classify: diagnostics of the 12-epoch run's best.pt
# (../2026-11-29-cpu-detr-long/run.sh makes runs/cpu_detr_long) and four 2- to 6-epoch variants, each alone on this
# 2-core AMD EPYC with AVX-512 (env.txt), one after the other.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
cd "$(dirname "$0")/../.."
R=records/2026-11-29-cpu-detr-why
C=runs/cpu_detr_long/best.pt
run() { echo "[$(date -u +%T)] $*" >> $R/commands.txt; "$@"; echo "  rc=$? [$(date -u +%T)]" >> $R/commands.txt; }
# 1. what the trained model predicts: matched boxes, objectness, class accuracy by object size
run python $R/diag.py $C > $R/diag.txt 2>&1
# 2. the gradient each loss term sends into the backbone and into the rest, trained and at initialisation
(for m in trained random; do python $R/gradsplit.py $C $m; done) > $R/gradsplit.txt 2>&1
# 3. the box losses 5x lighter (official knobs --bbox_loss_coef, --giou_loss_coef): does the class term move?
run python detr.py --train --epochs 2 --lr-steps 10 --bbox-loss-coef 1 --giou-loss-coef 0.4 --out runs/dv/w1 \
    > $R/variant-w1.log 2>&1
# 4. a backbone that knows the shapes: fcos.py's cpu preset for 3 epochs (its ResNet-18 body), then DETR's preset on it
run python fcos.py --train --epochs 3 --lr-steps 10 --out runs/fcos_bb > $R/fcos-backbone.log 2>&1
run python $R/fcos2resnet.py runs/fcos_bb/last.pt runs/dv/fcos_resnet18.pt
(for m in trained random fcos; do python $R/probe.py $C $m; done) > $R/probe.txt 2>&1  # linear probes of the features
run python detr.py --train --backbone-weights runs/dv/fcos_resnet18.pt --lr-backbone 1e-5 --out runs/dv/fcosbb \
    > $R/variant-fcosbb.log 2>&1
# 5. the official pre-norm transformer (--pre_norm; prenorm.py patches detr.py's layers), at lr 1e-4 and 4e-4
run python $R/prenorm.py --train --epochs 2 --lr-steps 10 --out runs/dv/pre1 > $R/variant-pre1.log 2>&1
run python $R/prenorm.py --train --epochs 2 --lr-steps 10 --lr 4e-4 --out runs/dv/pre4 > $R/variant-pre4.log 2>&1
# 6. FCOS's backbone frozen whole, the pre-norm transformer at lr 4e-4: can the transformer alone route the class?
run python $R/prenorm.py --train --epochs 2 --lr-steps 10 --backbone-weights runs/dv/fcos_resnet18.pt --lr-backbone 0 \
    --lr 4e-4 --out runs/dv/fz4 > $R/variant-fz4.log 2>&1
