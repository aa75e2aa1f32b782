"""Side-by-side speed of this repo against the reference implementations.

    python bench.py coco_eval [--device cpu|cuda]   # common.coco_evaluate vs pycocotools vs faster-coco-eval

Each benchmark is a function bench_NAME(args) registered in main()'s table.
"""
import argparse
import contextlib
import copy
import io
import time

import numpy as np
import torch

import common


def coco_workload(seed=0, num_images=5000, num_classes=80):
    """A COCO-val-sized evaluation problem, deterministic for a seed: ~7.4 gt boxes per image (1% crowd, gt 'area'
    a bit below the box area, as polygon areas are), and ~48 detections per image: jittered copies of the gt with
    scores that fall with the jitter, plus background false positives, some images over 100 dets, rounded scores
    so that ties occur. Returns (gt dict, list of detection dicts)."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i), "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"}
              for i in rng.choice(600000, num_images, replace=False)]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    annotations, dets = [], []
    for image in images:
        num_gt = rng.poisson(7.4)
        wh = np.exp(rng.uniform(np.log(4), np.log(400), (num_gt, 2)))  # log-uniform: small, medium and large objects
        xy = rng.uniform(0, 1, (num_gt, 2)) * np.maximum([640, 480] - wh, 1)
        labels = rng.integers(1, num_classes + 1, num_gt)
        crowd = rng.random(num_gt) < 0.01
        for (x, y), (w, h), label, c in zip(xy, wh, labels, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(label),
                                "bbox": [float(x), float(y), float(w), float(h)],
                                "area": float(w * h * rng.uniform(0.6, 1.0)), "iscrowd": int(c)})
        # True-positive-like dets: 0-6 jittered copies per gt (duplicates are what NMS leaves behind).
        copies = rng.integers(0, 7, num_gt)
        src = np.repeat(np.arange(num_gt), copies)
        noise = rng.normal(0, 0.12, (len(src), 4))
        boxes = np.c_[xy[src] + noise[:, :2] * wh[src], wh[src] * np.exp(noise[:, 2:])]
        scores = np.clip(1 - np.abs(noise).mean(1) * 3 + rng.normal(0, 0.1, len(src)), 0.01, 1)
        det_labels = np.where(rng.random(len(src)) < 0.9, labels[src], rng.integers(1, num_classes + 1, len(src)))
        # Background false positives; one image in 20 gets a burst past the 100-per-class cap.
        num_fp = rng.poisson(20) if rng.random() > 0.05 else 150
        fp_wh = np.exp(rng.uniform(np.log(4), np.log(400), (num_fp, 2)))
        fp_boxes = np.c_[rng.uniform(0, 1, (num_fp, 2)) * np.maximum([640, 480] - fp_wh, 1), fp_wh]
        burst_label = labels[0] if num_gt else 1  # a burst is one class, so that its image-class pair passes 100
        fp_labels = rng.integers(1, num_classes + 1, num_fp) if num_fp != 150 else np.full(num_fp, burst_label)
        boxes = np.r_[boxes, fp_boxes]
        scores = np.round(np.r_[scores, rng.uniform(0.01, 0.6, num_fp)], 3)  # 3 decimals: plenty of ties
        det_labels = np.r_[det_labels, fp_labels]
        for box, score, label in zip(boxes.tolist(), scores.tolist(), det_labels.tolist()):
            dets.append({"image_id": image["id"], "category_id": int(label), "bbox": box, "score": score})
    return {"images": images, "annotations": annotations, "categories": categories}, dets


def bench_coco_eval(args):
    """Time common.coco_evaluate against pycocotools and faster-coco-eval on the same workload, from the gt dict and
    the detection list to the 12 numbers (index building and result loading included for all three)."""
    gt, dets = coco_workload()
    print("COCO evaluation runs on the CPU (numpy) whatever --device says.")
    print(f"workload: {len(gt['images'])} images, {len(gt['annotations'])} gt boxes, {len(dets)} detections, "
          f"{len(gt['categories'])} classes")
    rows = []

    start = time.perf_counter()
    ours = common.coco_evaluate(gt, dets)
    seconds = time.perf_counter() - start
    rows.append(("common.coco_evaluate", seconds, np.array([ours[k] for k in common.COCO_METRIC_NAMES])))

    def reference(module_coco, module_eval, name, eval_class):
        gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)  # both libraries write into the dicts they get
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = module_coco()
            coco_gt.dataset = gt_copy
            coco_gt.createIndex()
            evaluator = eval_class(coco_gt, coco_gt.loadRes(dets_copy), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        rows.append((name, time.perf_counter() - start, np.array(evaluator.stats)))

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        reference(COCO, COCOeval, "pycocotools", COCOeval)
    except ImportError:
        print("pycocotools not installed: skipped (pip install pycocotools)")
    try:
        from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        reference(FastCOCO, COCOeval_faster, "faster-coco-eval", COCOeval_faster)
    except ImportError:
        print("faster-coco-eval not installed: skipped (pip install faster-coco-eval)")

    print(f"{'evaluator':<22} {'seconds':>8}  {'AP':>6} {'AP50':>6} {'AR100':>6}  max |diff| vs ours")
    for name, seconds, stats in rows:
        print(f"{name:<22} {seconds:8.2f}  {stats[0]:6.4f} {stats[1]:6.4f} {stats[8]:6.4f}  "
              f"{np.abs(stats - rows[0][2]).max():.1e}")
    agree = all(np.abs(stats - rows[0][2]).max() <= 1e-6 for _, _, stats in rows)
    print("all 12 numbers agree to 1e-6:" if agree else "NUMBERS DIFFER (> 1e-6):", agree)


def main():
    benchmarks = {"coco_eval": bench_coco_eval}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(benchmarks))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    benchmarks[args.name](args)


if __name__ == "__main__":
    main()
