"""Numbers of rbgirshick/fast-rcnn's numpy code for test_models.py's fast_rcnn checks (CI has no network).

    python assets/fast_rcnn_reference/make_reference.py FAST_RCNN_ROOT [--refcheck DIR] [--out FILE]

FAST_RCNN_ROOT: a work tree of github.com/rbgirshick/fast-rcnn at b612190f279da3c11dd8b1396dd5e72779f8e463 (lib/ is
enough), e.g. `git --git-dir=PATH/TO/fast-rcnn.git archive b612190f lib | tar -x -C FAST_RCNN_ROOT`. The reference's
Python 2 modules are loaded into Python 3 by ../shared/refcheck/fast_rcnn_ref.py (--refcheck: its folder), which
stubs cv2, easydict and the Cython bbox_overlaps (rewritten in numpy with the reference's +1 pixel convention).
`reference.npz` beside this file was written by this script with its defaults; seconds on a CPU.

Inputs (make_inputs, numpy's legacy RandomState(0), the same stream in every numpy version): three images of
different sizes, K = 7 (6 classes + background), ground-truth boxes and 300 proposals per image (jittered copies of
the boxes and random boxes, inside the image). Outputs, each from the reference's own functions:
  - iou_plus1_<i>: utils/bbox.pyx's overlaps (+1 pixel convention) of the candidates with the ground truth;
  - targets_<i>, means, stds: roidb.py add_bbox_regression_targets (its _compute_targets and the class-wise
    normalisation) on the roidb of the three images, the candidates being the ground truth then the proposals, as the
    reference's merged gt + selective-search roidb; flipped_means, flipped_stds: the same roidb with its mirror
    images appended (imdb.append_flipped_images, TRAIN.USE_FLIPPED). The overlaps of these roidbs (max_overlaps and
    the gt assignment inside _compute_targets) are computed without +1, this repo's convention, so that the same RoIs
    are foreground on both sides; the +1 overlaps are compared separately;
  - sampler_<i>: minibatch.py _sample_rois(16 fg of 64) run 200 times (np.random.seed(run)) on image i's roidb entry:
    per run the counts of foreground and background RoIs, the smallest foreground overlap, the background overlaps'
    range, the number of repeated RoIs, and how often each candidate was drawn (sampled_counts_<i>);
  - decoded, clipped: test.py _bbox_pred of random RoIs and deltas (K classes), then _clip_boxes to an image;
  - nms_keep_<t>: utils/nms.py on 200 random boxes with scores, thresholds 0.3 and 0.5.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 7
IMAGE_SIZES = ((120, 160), (230, 90), (150, 150))  # (H, W)


def continuous_iou(boxes, query_boxes):
    """IoU without +1 (this repo's continuous coordinates), float64, [N, 4] x [Q, 4] -> [N, Q]."""
    b, q = boxes.astype(np.float64), query_boxes.astype(np.float64)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    area_q = (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])
    iw = np.minimum(b[:, None, 2], q[None, :, 2]) - np.maximum(b[:, None, 0], q[None, :, 0])
    ih = np.minimum(b[:, None, 3], q[None, :, 3]) - np.maximum(b[:, None, 1], q[None, :, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    return np.where(inter > 0, inter / (area_b[:, None] + area_q[None, :] - inter), 0.0)


def make_inputs():
    """Per image: gt_boxes_<i> [M, 4], gt_labels_<i> [M] in 1..6, proposals_<i> [300, 4], float32, inside the image
    (x2 <= W, y2 <= H); decode_rois [50, 4], decode_deltas [50, 4 K]; nms_dets [200, 5]."""
    rng = np.random.RandomState(0)
    out = {}
    for i, (H, W) in enumerate(IMAGE_SIZES):
        M = 3 + i
        wh = rng.uniform(12, min(H, W) * 0.6, (M, 2))
        xy = rng.uniform(0, 1, (M, 2)) * (np.array([W, H]) - wh)
        gt = np.concatenate([xy, xy + wh], 1)
        jitter = gt[rng.randint(0, M, 200)] + rng.normal(0, 1, (200, 4)) * np.tile(wh.mean(0) * 0.15, 2)
        wh2 = rng.uniform(4, min(H, W) * 0.7, (100, 2))
        xy2 = rng.uniform(0, 1, (100, 2)) * (np.array([W, H]) - wh2)
        props = np.concatenate([jitter, np.concatenate([xy2, xy2 + wh2], 1)])
        props = np.clip(props, 0, [W, H, W, H])
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)  # at least 1 px wide and high
        props = np.clip(props, 0, [W, H, W, H])
        out[f"gt_boxes_{i}"] = gt.astype(np.float32)
        out[f"gt_labels_{i}"] = rng.randint(1, NUM_CLASSES, M).astype(np.int64)
        out[f"proposals_{i}"] = props.astype(np.float32)
    xy = rng.uniform(-20, 150, (50, 2))
    out["decode_rois"] = np.concatenate([xy, xy + rng.uniform(0, 80, (50, 2))], 1)
    out["decode_deltas"] = rng.normal(0, 0.5, (50, 4 * NUM_CLASSES))
    out["decode_image_size"] = np.array([120, 160])
    xy = rng.uniform(0, 100, (200, 2))
    out["nms_dets"] = np.concatenate([xy, xy + rng.uniform(5, 60, (200, 2)), rng.uniform(0, 1, (200, 1))],
                                     1).astype(np.float32)
    return out


def roidb_entry(boxes, gt_boxes, gt_labels, iou):
    """A roidb entry as prepare_roidb leaves it: boxes, gt_overlaps (per class the best overlap), max_overlaps,
    max_classes."""
    import scipy.sparse
    ov = iou(boxes, gt_boxes)  # [N, M]
    gt_overlaps = np.zeros((len(boxes), NUM_CLASSES), np.float32)
    for m, label in enumerate(gt_labels):
        gt_overlaps[:, label] = np.maximum(gt_overlaps[:, label], ov[:, m])
    return {"boxes": boxes, "gt_overlaps": scipy.sparse.csr_matrix(gt_overlaps), "max_overlaps": gt_overlaps.max(1),
            "max_classes": gt_overlaps.argmax(1)}


def reference_numbers(root, refcheck):
    sys.path.insert(0, refcheck)
    from fast_rcnn_ref import load_fast_rcnn
    fr = load_fast_rcnn(root)
    import utils.cython_bbox  # the loader's stub: the reference's +1 overlaps
    inputs = make_inputs()
    out = dict(inputs)
    n = len(IMAGE_SIZES)
    candidates = [np.concatenate([inputs[f"gt_boxes_{i}"], inputs[f"proposals_{i}"]]) for i in range(n)]
    for i in range(n):
        out[f"iou_plus1_{i}"] = fr.bbox_overlaps(candidates[i], inputs[f"gt_boxes_{i}"])
    plus1 = utils.cython_bbox.bbox_overlaps
    utils.cython_bbox.bbox_overlaps = continuous_iou  # _compute_targets' gt assignment without +1
    try:
        roidb = [roidb_entry(candidates[i], inputs[f"gt_boxes_{i}"], inputs[f"gt_labels_{i}"], continuous_iou)
                 for i in range(n)]
        out["means"], out["stds"] = fr.add_bbox_regression_targets(roidb)
        for i in range(n):
            out[f"targets_{i}"] = roidb[i]["bbox_targets"]
        flipped = []
        for i, (H, W) in enumerate(IMAGE_SIZES):  # imdb.append_flipped_images: x1' = W - x2 - 1, x2' = W - x1 - 1
            mirror = lambda b: np.stack([W - b[:, 2] - 1, b[:, 1], W - b[:, 0] - 1, b[:, 3]], 1)  # noqa: E731
            flipped.append(roidb_entry(mirror(candidates[i]), mirror(inputs[f"gt_boxes_{i}"]),
                                       inputs[f"gt_labels_{i}"], continuous_iou))
        both = [roidb_entry(candidates[i], inputs[f"gt_boxes_{i}"], inputs[f"gt_labels_{i}"], continuous_iou)
                for i in range(n)] + flipped
        out["flipped_means"], out["flipped_stds"] = fr.add_bbox_regression_targets(both)
        for i in range(n):
            runs, counts = [], np.zeros(len(candidates[i]), np.int64)
            for seed in range(200):
                np.random.seed(seed)
                labels, overlaps, rois, _, _ = fr.sample_rois(roidb[i], 16, 64, NUM_CLASSES)
                fg = labels > 0
                keys = [tuple(r) for r in rois]
                runs.append([fg.sum(), (~fg).sum(), overlaps[fg].min(initial=2.0), overlaps[~fg].min(initial=2.0),
                             overlaps[~fg].max(initial=-1.0), len(keys) - len(set(keys))])
                for r in rois:
                    counts[np.where((candidates[i] == r).all(1))[0][0]] += 1
            out[f"sampler_{i}"], out[f"sampled_counts_{i}"] = np.array(runs, np.float64), counts
    finally:
        utils.cython_bbox.bbox_overlaps = plus1
    out["decoded"] = fr.bbox_pred(inputs["decode_rois"], inputs["decode_deltas"])
    out["clipped"] = fr.clip_boxes(out["decoded"].copy(), tuple(inputs["decode_image_size"]))
    for t in (0.3, 0.5):
        out[f"nms_keep_{t}"] = np.array(fr.nms(inputs["nms_dets"], t), np.int64)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="work tree of rbgirshick/fast-rcnn at b612190f")
    parser.add_argument("--refcheck", default=os.path.join(HERE, "..", "..", "..", "shared", "refcheck"))
    parser.add_argument("--out", default=os.path.join(HERE, "reference.npz"))
    args = parser.parse_args()
    numbers = reference_numbers(args.root, os.path.abspath(args.refcheck))
    np.savez_compressed(args.out, **numbers)
    print(f"wrote {args.out}: {', '.join(sorted(numbers))}")
