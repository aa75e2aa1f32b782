# What the classifier tells on ground-truth boxes used as RoIs: PYTHONPATH=. python records/2026-11-28-cpu-variants/classifier_probe.py CHECKPOINT
# (20 training and 20 validation images; then 8 training images in eval mode and with batch statistics)
import sys, torch, data, fast_rcnn, numpy as np
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
cfg = fast_rcnn.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck['config'].items()
                         if k in fast_rcnn.Config.__dataclass_fields__})
m = fast_rcnn.DETECTOR(cfg, load_backbone=False).eval(); fast_rcnn.load_state(m, ck['model'], 'x')
for seed, name in ((0, 'train'), (1, 'val')):
    ds = data.SyntheticShapes(20, cfg.image_size, seed=seed)
    probs = []
    for i in range(20):
        img, t = ds[i]
        if not len(t['boxes']): continue
        rois = t['boxes'].float()
        feats = m.pyramid_roi_features([img], rois, torch.zeros(len(rois), dtype=torch.long))
        logits, _ = m.box_predictor(m.box_head(feats))
        p = logits.softmax(1)
        probs += [(float(p[j, t['labels'][j]]), float(p[j, 0]), int(p[j].argmax())==int(t['labels'][j])) for j in range(len(rois))]
    a = np.array(probs)
    print(name, 'GT boxes as RoIs: mean p(true class)', a[:,0].mean().round(3), 'mean p(bg)', a[:,1].mean().round(3), 'argmax correct', a[:,2].mean().round(3), len(a))
ds = data.SyntheticShapes(8, cfg.image_size, seed=0)
imgs, ts = zip(*[ds[i] for i in range(8)])
for mode in ('eval', 'train-bn'):
    m.eval()
    if mode == 'train-bn':
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d): mod.train()
    rois = torch.cat([t['boxes'].float() for t in ts]); idx = torch.cat([torch.full((len(t['boxes']),), i) for i, t in enumerate(ts)])
    labels = torch.cat([t['labels'] for t in ts])
    with torch.no_grad():
        feats = m.pyramid_roi_features(list(imgs), rois, idx)
        p = m.box_predictor(m.box_head(feats))[0].softmax(1)
    print(mode, 'p(true)', p[torch.arange(len(labels)), labels].mean().item(), 'argmax', p.argmax(1).tolist()[:12], 'labels', labels.tolist()[:12])
