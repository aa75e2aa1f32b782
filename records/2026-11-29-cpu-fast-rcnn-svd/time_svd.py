"""Inference time of a fast_rcnn.py checkpoint over its validation images (their cached proposals), the full fc6 / fc7
against truncated SVD, alternating image by image; and the largest change of the detections.
python records/2026-11-29-cpu-fast-rcnn-svd/time_svd.py runs/cpu_fast_rcnn_svd/best.pt 64 16"""
import dataclasses, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import data, fast_rcnn

path, fc6, fc7 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state_dict, class_names, saved = fast_rcnn.load_weights(path)
saved = {k: v for k, v in saved.items() if k not in ("device", "workers", "resume", "weights")}
cfg = fast_rcnn.make_config({"workers": 0}, {**saved, "out": os.path.dirname(path)})
val_set = data.build_datasets(cfg, train=False)[1]  # proposals: the run's cache
models = {}
for ranks in ((0, 0), (fc6, fc7)):
    model = fast_rcnn.DETECTOR(dataclasses.replace(cfg, num_classes=len(class_names), svd_fc6=ranks[0],
                                                   svd_fc7=ranks[1]), load_backbone=False).eval()
    fast_rcnn.load_state(model, state_dict, path)
    models[ranks] = (model, [], [])
with torch.no_grad():
    for i in range(len(val_set)):
        image, target = val_set[i]
        for ranks, (model, times, dets) in models.items():
            t = time.perf_counter()
            dets.append(model([image], proposals=[target["proposals"]])[0])
            times.append(time.perf_counter() - t)
(full, t_full, d_full), (svd, t_svd, d_svd) = models.values()
a, b = statistics.median(t_full[1:]) * 1e3, statistics.median(t_svd[1:]) * 1e3
counts = [statistics.mean(len(d["scores"]) for d in dets) for dets in (d_full, d_svd)]
print(f"{len(val_set)} images, {torch.get_num_threads()} threads: full {a:.1f} ms, svd fc6 {fc6} fc7 {fc7} {b:.1f} ms "
      f"per image (medians), speed-up {a / b:.2f}; detections per image {counts[0]:.1f} / {counts[1]:.1f}")
