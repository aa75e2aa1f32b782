"""Fast R-CNN GPU default (ResNet-50 from scratch, 320 px, 8 images x 64 RoIs): does the classifier leave the class
prior in the first steps? A fixed set of 32 training images (their real proposals), the file's optimiser and
schedule, fp32 on the CPU. Variant from argv: sgd (the default) | adamw."""
import dataclasses, sys, time
import torch
sys.path.insert(0, "/work/main")
import data, fast_rcnn
variant, steps = sys.argv[1], int(sys.argv[2])
overrides = {"sgd": {}, "adamw": dict(optimizer="adamw", lr=1e-3),
             "sgd_nodrop": dict(dropout=0.0), "sgd_lr1e-3": dict(lr=1e-3)}[variant]
cfg = dataclasses.replace(fast_rcnn.Config(), **overrides)
train = data.SyntheticShapes(cfg.num_train, cfg.image_size, cfg.seed)
data.attach_proposals(train, "/tmp/props_raw/fast_rcnn/proposals_train.npz")
torch.manual_seed(0)
model = fast_rcnn.FastRCNN(cfg).train()
opt, sched = fast_rcnn.make_optimizer(model, cfg, 500, 1)
items = [train[i] for i in range(32)]
tic, hist = time.time(), []
for step in range(steps):
    batch = [items[(step * 8 + j) % 32] for j in range(8)]
    losses = model([im for im, _ in batch], [t for _, t in batch])
    loss = sum(losses.values())
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    hist.append(losses["loss_classifier"].item())
    if (step + 1) % 10 == 0:
        print(f"{variant} step {step + 1} cls {sum(hist[-10:]) / 10:.3f} box {losses['loss_box_reg'].item():.3f} "
              f"lr {sched.get_last_lr()[0]:.5f} {time.time() - tic:.0f} s", flush=True)
