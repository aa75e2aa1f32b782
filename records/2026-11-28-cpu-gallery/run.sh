#!/bin/bash
# The cpu presets of the files whose synthetic predictions the gallery lacked (no best.pt of theirs from a GPU run),
# one after the other, each alone on this 2-core machine; then each best.pt's --predict on synthetic validation image
# 0 as the presets render it (seed 1, 128 px; R-CNN's preset: 192 px) for the README's gallery.
# FILES="faster_rcnn rcnn" to run some; EXTRA_fast_rcnn="--roi-op align" adds flags to one file's run.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-gallery
for m in ${FILES:-faster_rcnn rcnn fast_rcnn}; do
  extra=EXTRA_$m
  echo "[$(date -u +%T)] $m: python $m.py --train ${!extra} --out runs/gallery/$m" >> $R/commands.txt
  /usr/bin/time -v python $m.py --train ${!extra} --out runs/gallery/$m > $R/$m.log 2>&1
  echo "  rc=$?" >> $R/commands.txt
  cp runs/gallery/$m/metrics.jsonl $R/$m.metrics.jsonl; cp runs/gallery/$m/config.json $R/$m.config.json
  size=$(python -c "import json; c = json.load(open('runs/gallery/$m/config.json')); print(c['image_size'])")
  python -c "import data, torchvision.transforms.functional as F; F.to_pil_image(data.SyntheticShapes(1, $size, seed=1)[0][0]).save('runs/gallery/sample_$size.png')"
  python $m.py --predict runs/gallery/sample_$size.png --weights runs/gallery/$m/best.pt --workers 0 \
    --out runs/gallery/pred_$m > $R/$m.predict.txt 2>&1
  mv runs/gallery/pred_$m/sample_$size.png runs/gallery/pred_$m/sample.png
done
