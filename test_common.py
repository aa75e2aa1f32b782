"""Tests of common.py: box utilities against torchvision, the COCO evaluator against pycocotools (the oracle, imported
here only), VOC AP against py-faster-rcnn's voc_eval loop (re-typed below). Run: python -m pytest -q test_common.py"""
import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

import common


def random_boxes(n, seed=0, dtype=torch.float64):
    """[n, 4] valid xyxy boxes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 100
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 50 + 1
    return torch.cat((xy, xy + wh), dim=1)


# --- Box formats ---


def test_conversions_match_torchvision_and_round_trip():
    boxes = random_boxes(50)
    for fmt, to_fmt, from_fmt in [("cxcywh", common.box_xyxy_to_cxcywh, common.box_cxcywh_to_xyxy),
                                  ("xywh", common.box_xyxy_to_xywh, common.box_xywh_to_xyxy)]:
        converted = to_fmt(boxes)
        torch.testing.assert_close(converted, torchvision.ops.box_convert(boxes, "xyxy", fmt))
        torch.testing.assert_close(from_fmt(converted), boxes)
    cxcywh = common.box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(common.box_cxcywh_to_xywh(cxcywh), common.box_xyxy_to_xywh(boxes))
    torch.testing.assert_close(common.box_xywh_to_cxcywh(common.box_xyxy_to_xywh(boxes)), cxcywh)
    # Leading dims pass through.
    assert common.box_xyxy_to_cxcywh(boxes.view(5, 10, 4)).shape == (5, 10, 4)
    assert common.box_xywh_to_xyxy(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_area_clip_remove_small_match_torchvision():
    boxes = random_boxes(60) - 20
    torch.testing.assert_close(common.box_area(boxes), torchvision.ops.box_area(boxes))
    torch.testing.assert_close(common.clip_boxes_to_image(boxes, (40, 70)),
                               torchvision.ops.clip_boxes_to_image(boxes, (40, 70)))
    assert common.clip_boxes_to_image(boxes.view(3, 20, 4), (40, 70)).shape == (3, 20, 4)
    assert torch.equal(common.remove_small_boxes(boxes, 20.0), torchvision.ops.remove_small_boxes(boxes, 20.0))


# --- IoU family ---


@pytest.mark.parametrize("name", ["box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou"])
def test_iou_pairwise_is_torchvision_and_elementwise_is_its_diagonal(name):
    a, b = random_boxes(40, seed=1), random_boxes(40, seed=2)
    b[:10] = a[:10] + torch.rand(10, 4, dtype=torch.float64)  # overlapping pairs, not only disjoint ones
    pairwise = getattr(common, name)(a, b)
    torch.testing.assert_close(pairwise, getattr(torchvision.ops, name)(a, b))
    elementwise = getattr(common, "elementwise_" + name)(a, b)
    torch.testing.assert_close(elementwise, pairwise.diagonal(), rtol=0, atol=1e-12)
    # Broadcasting: [M, 1, 4] against [1, N, 4] gives the pairwise matrix.
    torch.testing.assert_close(getattr(common, "elementwise_" + name)(a[:, None], b[None]), pairwise,
                               rtol=0, atol=1e-12)


def test_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # half overlap: IoU 50 / 150; hull 150, so GIoU = IoU
    assert common.elementwise_box_iou(a, b).item() == pytest.approx(1 / 3)
    assert common.elementwise_generalized_box_iou(a, b).item() == pytest.approx(1 / 3)
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])  # disjoint: IoU 0, hull 300, union 200
    assert common.elementwise_generalized_box_iou(a, far).item() == pytest.approx(-1 / 3)


def test_elementwise_ciou_alpha_has_no_gradient():
    a = random_boxes(8, seed=3).float().requires_grad_()
    b = (a.detach() + 2).requires_grad_()
    common.elementwise_complete_box_iou(a, b).sum().backward()
    a2 = a.detach().clone().requires_grad_()
    torchvision.ops.complete_box_iou(a2, b.detach()).diagonal().sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)


# --- Box coder ---


def test_box_coder_matches_torchvision_including_the_clamp():
    coder, reference = common.BoxCoder((10.0, 10.0, 5.0, 5.0)), TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0))
    gt, anchors = random_boxes(200, seed=4, dtype=torch.float32), random_boxes(200, seed=5, dtype=torch.float32)
    assert torch.equal(coder.encode(gt, anchors), reference.encode_single(gt, anchors))
    deltas = torch.randn(200, 4 * 3, generator=torch.Generator().manual_seed(6)) * 3
    deltas[:20, 2::4] = 100.0  # exp(100 / 5) would be 5e8 times the anchor: the clamp must cut it
    decoded = coder.decode(deltas, anchors)
    assert torch.equal(decoded, reference.decode_single(deltas, anchors))
    widths = decoded[:20, 2::4] - decoded[:20, 0::4]
    torch.testing.assert_close(widths, (anchors[:20, 2:3] - anchors[:20, 0:1]) * 1000 / 16 * torch.ones(1, 3))


def test_box_coder_round_trip_and_broadcasting():
    coder = common.BoxCoder((1.0, 1.0, 1.0, 1.0))
    gt, anchors = random_boxes(30, seed=7), random_boxes(30, seed=8)
    torch.testing.assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt)
    # [B, A, 4 * C] deltas against [A, 4] anchors shared by the batch equals decoding each image alone.
    deltas = torch.randn(2, 30, 8, dtype=torch.float64)
    batched = coder.decode(deltas, anchors)
    assert batched.shape == (2, 30, 8)
    for i in range(2):
        torch.testing.assert_close(batched[i], coder.decode(deltas[i], anchors))


# --- COCO evaluation against pycocotools ---


def pycocotools_eval(gt, dets):
    """pycocotools' COCOeval on copies (it writes into its inputs); an empty det list gets an empty result object,
    since loadRes cannot take one."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def assert_same_as_pycocotools(gt, dets):
    ours = common.coco_evaluate(gt, dets, per_class=True)
    reference = pycocotools_eval(gt, dets)
    np.testing.assert_allclose([ours[k] for k in common.COCO_METRIC_NAMES], reference.stats, rtol=0, atol=1e-6)
    for k, cat in enumerate(sorted(gt["categories"], key=lambda c: c["id"])):
        p = reference.eval["precision"][:, :, k, 0, -1]
        expected = np.mean(p[p > -1]) if (p > -1).any() else -1
        assert ours["per_class"][cat["name"]] == pytest.approx(expected, abs=1e-6)
    return ours


def random_coco_case(seed, num_images=40, num_cats=6):
    """Random gt (crowd, 'area' field below the box area, rounded boxes, images without gt, a category without gt,
    shuffled annotation order) and dets (jittered copies of gt, background dets, 1-2 decimal scores so ties abound,
    bursts over 100 dets per image, images without dets, dets of the category that has no gt)."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i)} for i in rng.choice(10000, num_images, replace=False)]
    cat_ids = sorted(int(c) for c in rng.choice(100, num_cats, replace=False))
    categories = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    anns, dets = [], []
    for image in images:
        boxes = []
        for _ in range(0 if rng.random() < 0.15 else rng.integers(0, 10)):
            w, h = np.exp(rng.uniform(np.log(3), np.log(250), 2))
            bbox = [float(rng.uniform(0, 500)), float(rng.uniform(0, 400)), float(w), float(h)]
            if rng.random() < 0.2:
                bbox = [float(round(v)) for v in bbox]
            cat = int(rng.choice(cat_ids[:-1]))
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": cat, "bbox": bbox,
                         "area": float(w * h * (rng.uniform(0.5, 1) if rng.random() < 0.5 else 1)),
                         "iscrowd": int(rng.random() < 0.1)})
            boxes.append((cat, bbox))
        if rng.random() < 0.15:
            continue
        for cat, (x, y, w, h) in boxes:
            for _ in range(rng.integers(0, 4)):
                n = rng.normal(0, 0.1, 4) * [w, h, w, h]
                bbox = [float(x + n[0]), float(y + n[1]), float(max(w + n[2], 1)), float(max(h + n[3], 1))]
                dets.append({"image_id": image["id"], "category_id": cat, "score": float(np.round(rng.random(), 1)),
                             "bbox": bbox})
        for _ in range(rng.integers(0, 20) if rng.random() < 0.8 else rng.integers(100, 160)):
            cat = int(rng.choice(cat_ids)) if rng.random() < 0.5 or not boxes else boxes[0][0]
            w, h = np.exp(rng.uniform(np.log(3), np.log(250), 2))
            x, y = rng.uniform(0, 500), rng.uniform(0, 400)
            if boxes and rng.random() < 0.5:
                x, y, w, h = boxes[rng.integers(len(boxes))][1]
                x, y = x + rng.normal(0, 5), y + rng.normal(0, 5)
            dets.append({"image_id": image["id"], "category_id": cat, "score": float(np.round(rng.random(), 2)),
                         "bbox": [float(x), float(y), float(w), float(h)]})
    anns = [anns[i] for i in rng.permutation(len(anns))]
    dets = [dets[i] for i in rng.permutation(len(dets))]
    return {"images": images, "annotations": anns, "categories": categories}, dets


@pytest.mark.parametrize("seed", range(12))
def test_coco_evaluate_equals_pycocotools_on_random_cases(seed):
    gt, dets = random_coco_case(seed)
    ours = assert_same_as_pycocotools(gt, dets)
    assert 0 < ours["AP"] < 1 and ours["per_class"][gt["categories"][-1]["name"]] == -1


def test_coco_evaluate_on_the_bench_workload_slice():
    import bench
    gt, dets = bench.coco_workload(seed=1, num_images=150)
    assert_same_as_pycocotools(gt, dets)


def coco_case(anns, dets, num_images=2, num_cats=2):
    """A hand-made case: anns as (image_id, category_id, [x, y, w, h], iscrowd[, area[, id]]), dets as
    (image_id, category_id, [x, y, w, h], score)."""
    gt = {"images": [{"id": i} for i in range(1, num_images + 1)],
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_cats + 1)], "annotations": []}
    for j, (image_id, cat, bbox, crowd, *rest) in enumerate(anns):
        area = rest[0] if rest else bbox[2] * bbox[3]
        ann_id = rest[1] if len(rest) > 1 else j + 1
        gt["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
                                  "area": area, "iscrowd": crowd})
    return gt, [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in dets]


EDGE_CASES = {
    "perfect": ([(1, 1, [0, 0, 10, 10], 0)], [(1, 1, [0, 0, 10, 10], 0.9)]),
    "no dets at all": ([(1, 1, [0, 0, 10, 10], 0), (2, 2, [5, 5, 50, 50], 0)], []),
    "image without gt, category without gt": ([(1, 1, [0, 0, 10, 10], 0)],
                                              [(2, 1, [0, 0, 10, 10], 0.9), (2, 2, [0, 0, 10, 10], 0.8)]),
    "det inside crowd: IoU = inter / det area, many dets, all ignored": (
        [(1, 1, [0, 0, 100, 100], 1), (1, 1, [200, 200, 20, 20], 0)],
        [(1, 1, [10, 10, 5, 5], 0.9), (1, 1, [50, 50, 5, 5], 0.8), (1, 1, [201, 201, 20, 20], 0.7)]),
    "regular gt preferred over a better crowd": (
        [(1, 1, [0, 0, 10, 10], 1), (1, 1, [0, 0, 10, 12], 0)], [(1, 1, [0, 0, 10, 10], 0.9)]),
    "IoU exactly 0.5 and 0.75": ([(1, 1, [0, 0, 10, 10], 0), (1, 2, [0, 0, 30, 10], 0)],
                                 [(1, 1, [0, 0, 10, 20], 0.9), (1, 2, [0, 0, 40, 10], 0.8)]),
    "equal IoU to two gt: the later gt wins": ([(1, 1, [0, 0, 10, 10], 0), (1, 1, [5, 0, 10, 10], 0)],
                                               [(1, 1, [2.5, 0, 10, 10], 0.9), (1, 1, [0, 0, 10, 10], 0.8)]),
    "gt with id 0 never counts as matched": ([(1, 1, [0, 0, 10, 10], 0, 100, 0), (1, 1, [50, 50, 10, 10], 0, 100, 7)],
                                             [(1, 1, [0, 0, 10, 10], 0.9), (1, 1, [50, 50, 10, 10], 0.8)]),
    "area field, not the box, picks the range": ([(1, 1, [0, 0, 40, 40], 0, 500.0),
                                                  (1, 1, [100, 100, 5, 5], 0, 5000.0)],
                                                 [(1, 1, [0, 0, 40, 40], 0.9), (1, 1, [100, 100, 5, 5], 0.8),
                                                  (1, 1, [300, 300, 40, 40], 0.7)]),
    "only crowd gt: every setting -1": ([(1, 1, [0, 0, 10, 10], 1)], [(1, 1, [0, 0, 10, 10], 0.9)]),
    "no annotations": ([], [(1, 1, [0, 0, 10, 10], 0.9)]),
    "ties across images": ([(1, 1, [0, 0, 10, 10], 0), (2, 1, [0, 0, 10, 10], 0)],
                           [(2, 1, [50, 50, 10, 10], 0.5), (1, 1, [0, 0, 10, 10], 0.5), (2, 1, [0, 0, 10, 10], 0.5),
                            (1, 1, [60, 60, 10, 10], 0.5)]),
    "150 dets on one image, the best last in input": (
        [(1, 1, [0, 0, 10, 10], 0)], [(1, 1, [20 + i, 20, 10, 10], 0.5) for i in range(149)]
                                     + [(1, 1, [0, 0, 10, 10], 0.5)]),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_coco_evaluate_edge_cases(name):
    assert_same_as_pycocotools(*coco_case(*EDGE_CASES[name]))


def test_coco_evaluate_bad_input():
    gt, dets = coco_case([(1, 1, [0, 0, 10, 10], 0)], [(3, 1, [0, 0, 10, 10], 0.9)])
    with pytest.raises(ValueError, match="image_id 3"):
        common.coco_evaluate(gt, dets)
    gt, dets = coco_case([(1, 1, [0, 0, 10, 10], 0, 100, 5), (2, 1, [0, 0, 10, 10], 0, 100, 5)], [])
    with pytest.raises(ValueError, match="duplicate"):
        common.coco_evaluate(gt, dets)
    # A det of a category that gt does not list is dropped, as pycocotools does.
    gt, dets = coco_case([(1, 1, [0, 0, 10, 10], 0)], [(1, 1, [0, 0, 10, 10], 0.5), (1, 9, [0, 0, 10, 10], 0.9)])
    assert common.coco_evaluate(gt, dets)["AP"] == pytest.approx(1.0)


# --- VOC ---


def reference_voc_ap(rec, prec, use_07_metric):
    """py-faster-rcnn's voc_eval.voc_ap, verbatim."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def reference_voc_eval(gt, dets, cat_id, ovthresh, use_07_metric):
    """py-faster-rcnn's voc_eval loop on VOC's 1-based inclusive pixel boxes with its "+1" arithmetic (our inputs are
    continuous boxes: x1 - 1, y1 - 1, x2, y2). mergesort instead of its quicksort, so score ties are reproducible."""
    recs = {im["id"]: {"bbox": [], "difficult": []} for im in gt["images"]}
    for a in gt["annotations"]:
        if a["category_id"] == cat_id:
            x, y, w, h = a["bbox"]
            recs[a["image_id"]]["bbox"].append([x + 1, y + 1, x + w, y + h])
            recs[a["image_id"]]["difficult"].append(bool(a["difficult"]))
    npos = sum(len(r["difficult"]) - sum(r["difficult"]) for r in recs.values())
    for r in recs.values():
        r["bbox"], r["det"] = np.array(r["bbox"]).reshape(-1, 4), [False] * len(r["difficult"])
    dets = [d for d in dets if d["category_id"] == cat_id]
    order = np.argsort([-d["score"] for d in dets], kind="mergesort")
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for i, j in enumerate(order):
        R = recs[dets[j]["image_id"]]
        x, y, w, h = dets[j]["bbox"]
        bb, ovmax, BBGT = [x + 1, y + 1, x + w, y + h], -np.inf, R["bbox"]
        if BBGT.size > 0:
            iw = np.maximum(np.minimum(BBGT[:, 2], bb[2]) - np.maximum(BBGT[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(BBGT[:, 3], bb[3]) - np.maximum(BBGT[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[i], R["det"][jmax] = 1.0, True
                else:
                    fp[i] = 1.0
        else:
            fp[i] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return reference_voc_ap(rec, prec, use_07_metric)


@pytest.mark.parametrize("use_07_metric", [False, True])
def test_voc_ap_matches_py_faster_rcnn(use_07_metric):
    rng = np.random.default_rng(0)
    for _ in range(20):
        hits = rng.random(rng.integers(1, 40)) < 0.6
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        rec, prec = tp / (hits.sum() + rng.integers(0, 5)), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        assert common.voc_ap(rec, prec, use_07_metric) == pytest.approx(reference_voc_ap(rec, prec, use_07_metric),
                                                                         abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_voc_evaluate_matches_py_faster_rcnn(seed):
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i} for i in range(30)], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
          "annotations": []}
    dets = []
    for image_id in range(30):
        for _ in range(rng.integers(0, 6)):
            x, y = rng.integers(0, 300, 2)
            w, h = rng.integers(5, 120, 2)
            cat = int(rng.integers(1, 3))  # category 3 has no gt
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                                      "iscrowd": 0, "difficult": int(rng.random() < 0.15)})
            for _ in range(rng.integers(0, 4)):  # duplicates: the second on a gt is a FP
                jx, jy, jw, jh = rng.integers(-6, 7, 4)
                dets.append({"image_id": image_id, "category_id": cat, "score": float(np.round(rng.random(), 1)),
                             "bbox": [float(x + jx), float(y + jy), float(max(w + jw, 1)), float(max(h + jh, 1))]})
        for _ in range(rng.integers(0, 4)):
            dets.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)), "score": float(rng.random()),
                         "bbox": [float(v) for v in rng.integers(0, 300, 4)]})
    for use_07_metric in (False, True):
        ours = common.voc_evaluate(gt, dets, use_07_metric=use_07_metric)
        for cat in (1, 2):
            expected = reference_voc_eval(gt, dets, cat, 0.5, use_07_metric)
            assert ours["per_class"][f"c{cat}"] == pytest.approx(expected, abs=1e-9)
        assert ours["per_class"]["c3"] == -1
        assert ours["mAP"] == pytest.approx((ours["per_class"]["c1"] + ours["per_class"]["c2"]) / 2)


# --- Drawing ---


def test_draw_boxes_writes_png(tmp_path):
    image = torch.full((3, 60, 80), 0.5)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0], [30.0, 10.0, 75.0, 55.0]])
    path = str(tmp_path / "sub" / "drawn.png")
    drawn = common.draw_boxes(image, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.4]), ["bg", "cat", "dog"],
                              path=path)
    assert drawn.shape == (3, 60, 80) and drawn.dtype == torch.uint8
    assert torch.equal(torchvision.io.read_image(path), drawn)
    assert (drawn[:, 5, 10] != 128).any() and (drawn[:, 30, 20] == 128).all()  # on a box edge / inside, untouched
    assert torch.equal(common.draw_boxes(image, torch.zeros(0, 4)), (image * 255).round().to(torch.uint8))
