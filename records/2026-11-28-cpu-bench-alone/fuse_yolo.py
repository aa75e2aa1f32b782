# yolov5s (ours), 320 px, inference at batch 1 and 32 with each Conv's batch norm folded into its convolution
# (torch.nn.utils.fuse_conv_bn_eval, as v7.0's model.fuse()) against unfolded, alternating, median of 7. From the
# repository root: PYTHONPATH=. python records/2026-11-28-cpu-bench-alone/fuse_yolo.py
import copy, time, torch, numpy as np, yolo, data
from torch.nn.utils import fuse_conv_bn_eval
torch.manual_seed(0)
cfg = yolo.Config(num_classes=81, backbone="yolov5s", image_size=320)
m = yolo.YOLO(cfg).eval()
f = copy.deepcopy(m)
for mod in f.modules():
    if isinstance(mod, yolo.Conv):
        mod.conv = fuse_conv_bn_eval(mod.conv, mod.bn); mod.bn = torch.nn.Identity()
ds = data.SyntheticShapes(32, 320, seed=0); imgs = [ds[i][0] for i in range(32)]
with torch.no_grad():
    a, b = m(imgs[:2]), f(imgs[:2])
    print("n dets", [len(x["boxes"]) for x in a], [len(y["boxes"]) for y in b])
    for bs in (1, 32):
        t = {0: [], 1: []}
        for i in range(7):
            for k, mm in ((0, m), (1, f)):
                s = time.perf_counter(); mm(imgs[:bs]); t[k].append(time.perf_counter() - s)
        print(bs, "unfused", np.median(t[0]) * 1000, "fused", np.median(t[1]) * 1000, "speed-up", np.median(t[0]) / np.median(t[1]))
