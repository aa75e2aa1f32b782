# torch.profiler of one SSD300 train step (forward + backward, batch 2) of ours and of torchvision's, same weights.
# From the repository root: PYTHONPATH=. python records/2026-11-28-cpu-bench-alone/ssd_profile.py
import time, torch, torchvision, data, ssd
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
ds = data.SyntheticShapes(2, (480, 640), seed=0)
samples = [ds[i] for i in range(2)]
images = [s[0] for s in samples]; targets = [{"boxes": s[1]["boxes"], "labels": s[1]["labels"]} for s in samples]
tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
cfg = ssd.Config(**{**ssd.TORCHVISION_CONFIG, "num_classes": 91})
ours = ssd.DETECTOR(cfg); ours.load_state_dict(ssd.convert_torchvision(tv.state_dict()))
def step(m):
    m.train(); loss = sum(m(images, targets).values()); loss.backward()
for name, m in (("ours", ours), ("tv", tv), ("ours", ours), ("tv", tv)):
    step(m); t = time.perf_counter(); step(m); step(m); print(name, (time.perf_counter() - t) / 2)
for name, m in (("ours", ours), ("tv", tv)):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step(m)
    print(name); print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
