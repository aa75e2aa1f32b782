# Images per second of fast_rcnn.py's training step (the cpu preset, 4 images, cached proposals of
# ../../runs/cpu_fast_rcnn_500), and torch.profiler's table of one step. python profile_step.py SCALE [--truncate]
import dataclasses, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../.."))
import torch
import data, fast_rcnn as M
scale, truncate = int(sys.argv[1]), "--truncate" in sys.argv
P = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../runs/cpu_fast_rcnn_500")
cfg = dataclasses.replace(M.make_config({}, preset="cpu"), scales=(scale,), test_scales=(scale,), max_size=scale,
                          truncate=truncate, num_train=16, num_val=4, train_proposals=f"{P}/proposals_train.npz",
                          val_proposals=f"{P}/proposals_val.npz")
torch.manual_seed(0)
train_set, _ = data.build_datasets(cfg, M.train_transforms(cfg))
model = M.FastRCNN(dataclasses.replace(cfg, num_classes=train_set.num_classes))
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
images, targets = zip(*[train_set[i] for i in range(4)])
def step():
    loss = sum(model(list(images), list(targets)).values()); optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(2):
    step()
tic = time.time()
for _ in range(5):
    step()
print(f"{scale} px, truncate {truncate}: {20 / (time.time() - tic):.1f} images/s, {torch.get_num_threads()} threads")
with torch.profiler.profile() as p:
    step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
