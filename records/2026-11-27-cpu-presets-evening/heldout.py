"""R-CNN checkpoints (SVMs fitted with different C) on 200 held-out synthetic images (seed 1000: neither the training
split, seed 0, nor the validation split the C was chosen on, seed 1)."""
import dataclasses, os, sys
import torch
sys.path.insert(0, "/work/main"); os.chdir("/work/main")
import data, rcnn
out = "/tmp/exp2/runs/heldout"; os.makedirs(out, exist_ok=True)
for path in sys.argv[1:]:
    sd, names, saved = rcnn.load_weights(path)
    cfg = rcnn.make_config(dict(out=out, workers=2), {k: v for k, v in saved.items() if k != "out"})
    held = data.SyntheticShapes(200, cfg.image_size, seed=1000)
    data.attach_proposals(held, "", os.path.join(out, "proposals_heldout.npz"), cfg.workers, collective=False,
                          **rcnn.proposal_settings(cfg))
    model = rcnn.RCNN(dataclasses.replace(cfg, num_classes=len(names)), load_backbone=False).eval()
    rcnn.load_state(model, sd, path)
    stats = data.evaluate(model, held, cfg.batch_size, cfg.workers, torch.device("cpu"), names)
    print(f"{path}: svm_c {cfg.svm_c}, scoring {cfg.scoring}:", " ".join(f"{k} {v:.4f}" for k, v in stats.items()),
          flush=True)
    cfg2 = dataclasses.replace(cfg, scoring="softmax")
    model.cfg = cfg2
    stats = data.evaluate(model, held, cfg.batch_size, cfg.workers, torch.device("cpu"), names)
    print(f"{path}: scoring softmax:", " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
