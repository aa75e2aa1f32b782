import sys, torch
import detr, data
torch.manual_seed(0)
state_dict, _, saved = detr.load_weights(sys.argv[1])
cfg = detr.make_config({}, saved)
m = detr.DETR(cfg, load_backbone=False)
if sys.argv[2] == 'trained': m.load_state_dict(state_dict)
m.train()
ds = data.SyntheticShapes(16, cfg.image_size, seed=0)
imgs, tg = zip(*[ds[i] for i in range(16)])
losses = m(list(imgs), list(tg))
bb = [p for n, p in m.named_parameters() if n.startswith('backbone.')]
tr = [p for n, p in m.named_parameters() if not n.startswith('backbone.')]
for kind in ['ce', 'bbox', 'giou']:
    L = sum(v for k, v in losses.items() if k.startswith('loss_' + kind))
    g = torch.autograd.grad(L, bb + tr, retain_graph=True, allow_unused=True)
    gb = torch.sqrt(sum((x ** 2).sum() for x in g[:len(bb)] if x is not None))
    gt = torch.sqrt(sum((x ** 2).sum() for x in g[len(bb):] if x is not None))
    print(sys.argv[2], kind, f"loss {L.item():.3f} grad backbone {gb:.4f} rest {gt:.4f}")
