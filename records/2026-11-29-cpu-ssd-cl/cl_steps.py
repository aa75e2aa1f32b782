"""Training step of each file's cpu preset, NCHW against channels_last, alternating; medians (wall ms)."""
import copy, dataclasses, importlib, statistics, sys, time, torch
sys.path.insert(0, ".")
import data
names = sys.argv[1].split(",")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
for name in names:
    m = importlib.import_module(name)
    cfg = m.make_config({"workers": 0}, preset="cpu")
    cfg = dataclasses.replace(cfg, num_train=max(cfg.batch_size * 2, 64)) if cfg.data == "synthetic" else cfg
    train_set, _ = data.build_datasets(cfg, m.train_transforms(cfg))
    cfg = dataclasses.replace(cfg, num_classes=train_set.num_classes)
    images, targets = next(iter(data.make_loader(train_set, cfg.batch_size, True, 0, 0, 0)))
    data.seed_everything(0)
    runs = {}
    for cl in (False, True):
        data.seed_everything(0)
        model = m.DETECTOR(cfg, load_backbone=False)
        cl and model.to(memory_format=torch.channels_last)
        opt = m.make_optimizer(model, cfg, 100, 1, train_set)[0]
        runs[cl] = (model.train(), opt, [])
    losses = {}
    for i in range(steps + 1):
        for cl, (model, opt, times) in runs.items():
            data.seed_everything(0, 0, 0, i)
            t = time.perf_counter()
            loss = model(images, targets)
            total = sum(loss.values()); total.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
            else:
                losses[cl] = float(total)
    a, b = (statistics.median(runs[c][2]) * 1e3 for c in (False, True))
    print(f"{name}: batch {cfg.batch_size}, NCHW {a:.0f} ms, channels_last {b:.0f} ms, speed-up {a / b:.2f}; "
          f"first loss {losses[False]:.6f} / {losses[True]:.6f}", flush=True)
