#!/bin/bash
# fast_rcnn.py's cpu preset after this commit (ResNet-18 up to layer2: a stride-8 map by truncation, at 128 px;
# RoIAlign, no dropout, 15 epochs of 500 images, the lr x0.1 for the last 3), from nothing (selective search
# included), alone on this 2-core machine; then its best.pt's --predict on synthetic validation image 0 as the preset
# renders it (seed 1, 128 px: runs/gallery/sample_128.png, made by ../2026-11-28-cpu-gallery/run.sh) for the gallery.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
R=records/2026-11-28-cpu-fast-rcnn-trunk
rm -rf runs/cpu_fast_rcnn_trunk runs/gallery/pred_fast_rcnn_trunk
echo "[$(date -u +%T)] python fast_rcnn.py --train --out runs/cpu_fast_rcnn_trunk" >> $R/commands.txt
/usr/bin/time -v python fast_rcnn.py --train --out runs/cpu_fast_rcnn_trunk > $R/fast_rcnn.log 2>&1
echo "  rc=$?" >> $R/commands.txt
cp runs/cpu_fast_rcnn_trunk/metrics.jsonl $R/fast_rcnn.metrics.jsonl; cp runs/cpu_fast_rcnn_trunk/config.json $R/fast_rcnn.config.json
[ -f runs/gallery/sample_128.png ] || python -c "import data, torchvision.transforms.functional as F; F.to_pil_image(data.SyntheticShapes(1, 128, seed=1)[0][0]).save('runs/gallery/sample_128.png')"
python fast_rcnn.py --predict runs/gallery/sample_128.png --weights runs/cpu_fast_rcnn_trunk/best.pt --workers 0 \
  --out runs/gallery/pred_fast_rcnn_trunk > $R/fast_rcnn.predict.txt 2>&1
mkdir -p runs/gallery/cpu_trunk/pred_fast_rcnn && cp runs/gallery/pred_fast_rcnn_trunk/sample_128.png runs/gallery/cpu_trunk/pred_fast_rcnn/sample.png
