import sys, torch
import detr, data
torch.manual_seed(0)
state_dict, _, saved = detr.load_weights(sys.argv[1])
cfg = detr.make_config({}, saved)
m = detr.DETR(cfg, load_backbone=False)
if sys.argv[2] == 'trained': m.load_state_dict(state_dict)
if sys.argv[2] == 'fcos': print(m.backbone.body.load_state_dict(torch.load('runs/dv/fcos_resnet18.pt'), strict=False))
m.eval()
def feats(seed, n):
    ds = data.SyntheticShapes(n, cfg.image_size, seed=seed)
    X, Y, Xm = [], [], []
    with torch.no_grad():
        for s in range(0, n, 64):
            imgs, tg = zip(*[ds[i] for i in range(s, min(n, s + 64))])
            batch, mask, sizes, _ = detr.preprocess(list(imgs), None, cfg, False)
            f = m.backbone(batch)  # [B,C,4,4]
            src = m.input_proj(f)
            mask2 = torch.zeros(f.shape[0], *f.shape[-2:], dtype=torch.bool)
            pos = detr.position_encoding_sine(mask2, cfg.hidden_dim // 2)
            B = src.shape[0]
            mem = src.flatten(2).permute(2, 0, 1); p = pos.flatten(2).permute(2, 0, 1)
            for layer in m.transformer.encoder.layers:
                mem = layer(mem, p, mask2.flatten(1))
            mem = mem.permute(1, 2, 0).reshape(B, -1, *f.shape[-2:])
            for b, t in enumerate(tg):
                for box, lab in zip(t['boxes'], t['labels']):
                    side = ((box[2]-box[0])*(box[3]-box[1])).sqrt()
                    if side < 24: continue
                    cx, cy = int((box[0]+box[2])/2 // 32), int((box[1]+box[3])/2 // 32)
                    X.append(f[b, :, cy, cx]); Xm.append(mem[b, :, cy, cx]); Y.append(int(lab))
    return torch.stack(X), torch.stack(Xm), torch.tensor(Y)
Xtr, Mtr, Ytr = feats(0, 1500); Xte, Mte, Yte = feats(1, 300)
for name, A, B in [('layer4', Xtr, Xte), ('memory', Mtr, Mte)]:
    mu, sd = A.mean(0), A.std(0) + 1e-6
    A, B = (A - mu) / sd, (B - mu) / sd
    lin = torch.nn.Linear(A.shape[1], 7); opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for it in range(500):
        loss = torch.nn.functional.cross_entropy(lin(A), Ytr); opt.zero_grad(); loss.backward(); opt.step()
    print(sys.argv[2], name, 'n', len(Ytr), len(Yte), 'train acc', (lin(A).argmax(1) == Ytr).float().mean().item(), 'test acc', (lin(B).argmax(1) == Yte).float().mean().item())
