# SSD300 train step, batch 2, ours and torchvision's with the same weights, 8 steps alternating (after one warm-up each).
# From the repository root: PYTHONPATH=. python records/2026-11-28-cpu-bench-alone/ssd_alternating.py
import time, torch, torchvision, data, ssd, numpy as np
torch.manual_seed(0)
ds = data.SyntheticShapes(2, (480, 640), seed=0)
samples = [ds[i] for i in range(2)]
images = [s[0] for s in samples]; targets = [{"boxes": s[1]["boxes"], "labels": s[1]["labels"]} for s in samples]
tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
cfg = ssd.Config(**{**ssd.TORCHVISION_CONFIG, "num_classes": 91})
ours = ssd.DETECTOR(cfg); ours.load_state_dict(ssd.convert_torchvision(tv.state_dict()))
opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for m in (ours, tv)}
def step(m):
    m.train(); loss = sum(m(images, targets).values()); opts[id(m)].zero_grad(set_to_none=True); loss.backward(); opts[id(m)].step()
t = {"ours": [], "tv": []}
step(ours); step(tv)
for i in range(8):
    for name, m in ((("ours", ours), ("tv", tv)) if i % 2 == 0 else (("tv", tv), ("ours", ours))):
        s = time.perf_counter(); step(m); t[name].append(time.perf_counter() - s)
print({k: [round(x, 2) for x in v] for k, v in t.items()})
print("median ours", np.median(t["ours"]), "tv", np.median(t["tv"]), "speed-up", np.median(t["tv"]) / np.median(t["ours"]))
