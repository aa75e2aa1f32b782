#!/bin/bash
# After run.sh: each run's best.pt evaluated again (--eval: its numbers, each class's AP@0.5 among them) and its
# predictions on one test image (BloodImage_00068: 4 platelets, 1 WBC, 9 RBC) for the README's gallery.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-27-cpu-bccd; BCCD=${BCCD:-../shared/data/bccd}
for m in faster_rcnn retinanet fcos ssd yolo detr fast_rcnn rcnn; do
  [ -f runs/bccd/$m/best.pt ] || continue
  python $m.py --eval --weights runs/bccd/$m/best.pt --workers 1 --out runs/bccd/$m > $R/$m.eval.txt 2>&1
  python $m.py --predict $BCCD/JPEGImages/BloodImage_00068.jpg --weights runs/bccd/$m/best.pt --workers 1 \
    --out runs/bccd/pred_$m > $R/$m.predict.txt 2>&1
done
