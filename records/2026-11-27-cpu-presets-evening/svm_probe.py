"""Refit R-CNN's stages 2-3 (SVMs, box regressors) of the CPU-preset run's network with other SVM settings; evaluate."""
import dataclasses, os, shutil, sys
import torch
sys.path.insert(0, "/work/main"); os.chdir("/work/main")
import data, rcnn
src, out, over = "/tmp/exp/runs/rcnn_e6", sys.argv[1], eval(sys.argv[2])
sd, names, saved = rcnn.load_weights(f"{src}/best.pt")
os.makedirs(out, exist_ok=True)
for f in ("proposals_train.npz", "proposals_val.npz"):
    shutil.copy(f"{src}/{f}", out)
cfg = rcnn.make_config(dict(out=out, **over), {k: v for k, v in saved.items() if k != "out"})
print(cfg)
model = rcnn.RCNN(dataclasses.replace(cfg, num_classes=len(names)), load_backbone=False).eval()
rcnn.load_state(model, sd, "best.pt")
model.fit_stages_2_and_3(torch.device("cpu"))
val_set = data.build_datasets(cfg, train=False)[1]
stats = data.evaluate(model, val_set, cfg.batch_size, cfg.workers, torch.device("cpu"), names)
print(over, " ".join(f"{k} {v:.4f}" for k, v in stats.items()))
