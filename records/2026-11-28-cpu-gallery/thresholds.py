# PYTHONPATH=. python records/2026-11-28-cpu-gallery/thresholds.py CHECKPOINT [FILE [FROM TO [STEP]]]
# For a checkpoint of rcnn.py: over the val set, precision / recall / F1 of the detections scoring >= t (IoU >= 0.5,
# greedy by score per image and class), for a grid of t: which --draw-thresh shows what the model finds.
import sys, importlib, torch, numpy as np, data
rcnn = importlib.import_module(sys.argv[2] if len(sys.argv) > 2 else "rcnn")
from torchvision.ops import box_iou
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
cfg = rcnn.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck['config'].items()
                     if k in rcnn.Config.__dataclass_fields__})
m = rcnn.DETECTOR(cfg, load_backbone=False).eval(); rcnn.load_state(m, ck['model'], 'x')
val = data.SyntheticShapes(cfg.num_val, cfg.image_size, seed=1)
scores, hits, n_gt = [], [], 0
for i in range(len(val)):
    img, t = val[i]
    with torch.no_grad():
        d = m([img])[0]
    n_gt += len(t['boxes'])
    used = torch.zeros(len(t['boxes']), dtype=torch.bool)
    iou = box_iou(d['boxes'], t['boxes']) if len(t['boxes']) else torch.zeros(len(d['boxes']), 0)
    for j in torch.argsort(d['scores'], descending=True).tolist():
        ok = (iou[j] >= 0.5) & (t['labels'] == d['labels'][j]) & ~used
        hit = bool(ok.any())
        if hit:
            used[torch.where(ok)[0][iou[j][ok].argmax()]] = True
        scores.append(float(d['scores'][j])); hits.append(hit)
s, h = np.array(scores), np.array(hits)
for th in np.arange(float(sys.argv[3]), float(sys.argv[4]) + 1e-9, float(sys.argv[5]) if len(sys.argv) > 5 else 0.1) if len(sys.argv) > 3 else np.arange(-1.0, 0.21, 0.1):
    k = s >= th
    p, r = h[k].sum() / max(k.sum(), 1), h[k].sum() / n_gt
    print(f"t {th:+.2f}: {k.sum() / len(val):5.1f} per image, precision {p:.3f}, recall {r:.3f}, F1 {2 * p * r / max(p + r, 1e-9):.3f}")
