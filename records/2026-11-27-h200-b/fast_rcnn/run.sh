#!/bin/bash
# Fast R-CNN's GPU default learned nothing (classifier at the class prior for 8 epochs): three variants at once,
# T s each, the proposals made on the CPU before (passed as files).
export PYTHONUNBUFFERED=1; cd "$(dirname "$0")/.."; OUT=${OUT:-/tmp/o2}; mkdir -p $OUT; T=${T:-165}
P="--train-proposals .gpu2/proposals_train.npz --val-proposals .gpu2/proposals_val.npz --workers 3"
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/env.txt
timeout -s TERM -k 15 $T python3 fast_rcnn.py --train $P --out runs/adamw --optimizer adamw --lr 0.001 > $OUT/adamw.txt 2>&1 &
timeout -s TERM -k 15 $T python3 fast_rcnn.py --train $P --out runs/adamw18 --optimizer adamw --lr 0.001 --backbone resnet18 > $OUT/adamw18.txt 2>&1 &
timeout -s TERM -k 15 $T python3 fast_rcnn.py --train $P --out runs/sgd1e3 --lr 0.001 > $OUT/sgd1e3.txt 2>&1 &
wait
for v in adamw adamw18 sgd1e3; do cp runs/$v/metrics.jsonl $OUT/$v.metrics.jsonl; echo "== $v"; grep -E "^epoch [0-9]+ iter|step (100|300|500)/" $OUT/$v.txt | cut -c1-140; done
