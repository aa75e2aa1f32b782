import sys, torch, numpy as np
import detr, data
from torchvision.ops import box_iou
torch.set_grad_enabled(False)
state_dict, _, saved = detr.load_weights(sys.argv[1])
cfg = detr.make_config({}, saved)
m = detr.DETR(cfg, load_backbone=False); m.load_state_dict(state_dict); m.eval()
ds = data.SyntheticShapes(64, cfg.image_size, seed=cfg.seed + 1)
imgs, tg = zip(*[ds[i] for i in range(64)])
batch, mask, sizes, _ = detr.preprocess(list(imgs), None, cfg, False)
logits, boxes = m.predict(batch, mask)
lg, bx = logits[-1], boxes[-1]  # [B,Q,K+1],[B,Q,4]
print("box spread over images per query (norm, mean over q):", bx.std(0).mean().item())
print("box spread over queries per image:", bx.std(1).mean().item())
p = lg.softmax(-1)
print("mean p(no-object):", p[..., -1].mean().item(), "std over images of p(noobj):", p[..., -1].std(0).mean().item())
# matched: for each gt, best-IoU query
S = cfg.image_size
ious, cls_ok, objp = [], [], []
for b in range(64):
    gt = tg[b]['boxes']; lab = tg[b]['labels']
    if len(gt) == 0: continue
    cx, cy, w, h = bx[b].unbind(-1)
    pb = torch.stack([cx - w/2, cy - h/2, cx + w/2, cy + h/2], -1) * S
    iou = box_iou(gt, pb)
    best, q = iou.max(1)
    ious += best.tolist()
    cls_ok += (p[b, q, :-1].argmax(-1) == lab).tolist()
    objp += (1 - p[b, q, -1]).tolist()
ious = np.array(ious)
print("gts", len(ious), "best-query IoU mean", ious.mean(), ">=0.5:", (ious >= 0.5).mean())
print("class acc of best query", np.mean(cls_ok), "mean objectness of best query", np.mean(objp))
print("class prior of predictions (mean p over objects):", p[..., :-1].mean((0, 1)))
# by size, over 256 images
ds = data.SyntheticShapes(256, cfg.image_size, seed=cfg.seed + 1)
rows = []
for s in range(0, 256, 64):
    imgs, tg = zip(*[ds[i] for i in range(s, s + 64)])
    batch, mask, sizes, _ = detr.preprocess(list(imgs), None, cfg, False)
    lg, bx = [t[-1] for t in m.predict(batch, mask)]
    p = lg.softmax(-1)
    for b in range(64):
        gt = tg[b]['boxes']; lab = tg[b]['labels']
        if len(gt) == 0: continue
        cx, cy, w, h = bx[b].unbind(-1)
        pb = torch.stack([cx - w/2, cy - h/2, cx + w/2, cy + h/2], -1) * S
        best, q = box_iou(gt, pb).max(1)
        side = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).sqrt()
        for j in range(len(gt)):
            rows.append((side[j].item(), best[j].item(), int(p[b, q[j], :-1].argmax() == lab[j])))
rows = np.array(rows)
for lo, hi in [(0, 12), (12, 24), (24, 48), (48, 200)]:
    sel = (rows[:, 0] >= lo) & (rows[:, 0] < hi)
    print(f"side {lo}-{hi}: n {sel.sum()}, IoU {rows[sel,1].mean():.2f}, IoU>=.5 {(rows[sel,1]>=.5).mean():.2f}, class acc {rows[sel,2].mean():.2f}")
