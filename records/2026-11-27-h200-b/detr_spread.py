"""How different are the queries' boxes of a trained DETR? mean over images of the std across queries (pixels)."""
import dataclasses, os, sys
import torch
torch.set_num_threads(8)
sys.path.insert(0, os.getcwd())
import data, detr
sd, names, saved = detr.load_weights(sys.argv[1])
cfg = detr.make_config({}, saved)
model = detr.DETR(dataclasses.replace(cfg, num_classes=len(names)), load_backbone=False).eval()
detr.load_state(model, sd, "w")
val = data.SyntheticShapes(cfg.num_val, cfg.image_size, seed=1)
with torch.no_grad():
    out = model([val[i][0] for i in range(min(16, len(val)))])
spread = torch.stack([o["boxes"].std(0).mean() for o in out]).mean()
top = torch.stack([o["scores"].max() for o in out]).mean()
print(f"{sys.argv[1]}: boxes std across queries {spread:.2f} px (mean over 16 val images), mean top score {top:.3f}")
