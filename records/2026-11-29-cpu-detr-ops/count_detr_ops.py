"""Kernel-like operators of one DETR-R50 training step (forward, the official losses, backward), detr.py against
facebookresearch/detr at 29901c51 with the same converted weights, batch B of 128 x 160 synthetic images, CPU:
    python records/2026-11-29-cpu-detr-ops/count_detr_ops.py 2 DETR_ROOT"""
import importlib.util
import os
import sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "assets", "detr_reference"))
import torch
import data
import detr
from make_reference import load_official, normalised_cxcywh
spec = importlib.util.spec_from_file_location(  # its kernel-like operators: the same count as the Faster R-CNN record
    "count_waits_tv", os.path.join(ROOT, "records", "2026-11-29-cpu-frcnn-waits", "count_waits_tv.py"))
counter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(counter)
B = int(sys.argv[1])
cfg = detr.Config(**{**detr.OFFICIAL_CONFIG, "num_classes": 91, "min_size": 128, "max_size": 160})
ds = data.SyntheticShapes(B, (128, 160), seed=0)
images = [ds[i][0] for i in range(B)]
targets = [{"boxes": ds[i][1]["boxes"], "labels": ds[i][1]["labels"]} for i in range(B)]
mean = torch.tensor(cfg.image_mean)[:, None, None]; std = torch.tensor(cfg.image_std)[:, None, None]
official, criterion, postprocess, _ = load_official(sys.argv[2], "r50")
ours = detr.DETR(cfg, load_backbone=False)
ours.load_state_dict(detr.convert_official(official.state_dict()))
off_t = [{"labels": t["labels"], "boxes": normalised_cxcywh(t["boxes"], im.shape[-2:])}
         for t, im in zip(targets, images)]
def ours_train():
    ours.train(); sum(ours(images, targets).values()).backward()
def off_train():
    official.train()
    losses = criterion(official([(im - mean) / std for im in images]), off_t)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
a, b = counter.profile(ours_train)[0], counter.profile(off_train)[0]
print(f"train batch {B}: ours {sum(a.values())} (nonzero {a['nonzero']}, item {a['_local_scalar_dense']}), "
      f"official {sum(b.values())} (nonzero {b['nonzero']}, item {b['_local_scalar_dense']})")
diff = {k: a[k] - b[k] for k in set(a) | set(b) if a[k] != b[k]}
for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25]:
    print(f"   {k:40s} ours {a[k]:6d} official {b[k]:6d}")
