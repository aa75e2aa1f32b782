# The cpu preset's training step (batch 8 of 128-px synthetic images, no data loading) with the backbone cut 0, 1, 2
# stages early. Needs truncate.patch applied; run from the repository root: PYTHONPATH=. python records/2026-11-28-cpu-detr-trunk/step_speed.py
import time, torch, detr, data
torch.manual_seed(0)
ds = data.SyntheticShapes(64, 128, seed=0)
batch = [ds[i] for i in range(8)]
imgs = [b[0] for b in batch]; tg = [b[1] for b in batch]
for t in (0, 1, 2):
    cfg = detr.Config(**{**detr.PRESETS["cpu"], "truncate": t})
    m = detr.DETR(cfg).train()
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    for i in range(13):
        if i == 3: t0 = time.time()
        loss = sum(m(imgs, tg).values()); opt.zero_grad(); loss.backward(); opt.step()
    dt = (time.time() - t0) / 10
    print(t, f"{dt*1000:.0f} ms/step {8/dt:.1f} img/s", sum(p.numel() for p in m.parameters())/1e6, "M")
