"""Can the CPU-preset DETR overfit 8 fixed images? (sanity of the training path)"""
import dataclasses, os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/main"); os.chdir("/work/main")
import data, detr
lr = float(sys.argv[1]); steps = int(sys.argv[2])
cfg = detr.make_config(dict(lr=lr, lr_backbone=lr, warmup_iters=0), None, "cpu")
torch.manual_seed(0)
train_set = data.SyntheticShapes(8, 128, seed=0)
images, targets = zip(*[train_set[i] for i in range(8)])
model = detr.DETR(dataclasses.replace(cfg, num_classes=train_set.num_classes)).train()
opt, _ = detr.make_optimizer(model, cfg, 100, 1)
t = time.time()
for s in range(steps):
    losses = model(list(images), list(targets))
    loss = sum(losses.values())
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    opt.step()
    if s % 25 == 0 or s == steps - 1:
        print(s, f"{loss.item():.3f}", {k: round(v.item(), 3) for k, v in losses.items() if "_" not in k[5:]}, f"{time.time()-t:.0f}s", flush=True)
model.eval()
with torch.no_grad():
    out = model(list(images))
for o, tg in zip(out[:3], targets[:3]):
    k = o["scores"].argsort(descending=True)[:len(tg["boxes"])]
    print("gt", tg["boxes"].round().tolist(), tg["labels"].tolist()); print("pred", o["boxes"][k].round().tolist(), o["labels"][k].tolist(), o["scores"][k].round(decimals=2).tolist())
