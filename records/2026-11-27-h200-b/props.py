# Precompute the GPU defaults' selective-search proposals here (CPU), to carry to the device.
import os, sys, time, data, fast_rcnn, rcnn
for m in sys.argv[1:]:
    mod = {"fast_rcnn": fast_rcnn, "rcnn": rcnn}[m]
    cfg = mod.Config(out=f".gpu/p/{m}")
    os.makedirs(cfg.out, exist_ok=True)
    tic = time.time()
    data.build_datasets(cfg, None, True) if hasattr(data, "build_datasets") else None
    print(m, "proposals", time.time() - tic, "s", flush=True)
