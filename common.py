"""Box utilities shared by every detector file: box formats, the IoU family, the R-CNN box coder, COCO and VOC
evaluation, drawing.

Box formats (all in absolute pixels, continuous coordinates, no "+1"):
    xyxy    x1, y1, x2, y2        what every model and dataset in this repo uses
    cxcywh  cx, cy, w, h          DETR's output and YOLO's targets
    xywh    x, y, w, h            COCO json ("bbox" field)
Shape legend: N, M box counts; C classes; "..." any leading dims.

Contents: format conversions, box_area, clip_boxes_to_image, remove_small_boxes; box_iou, generalized_box_iou,
distance_box_iou, complete_box_iou (pairwise [N, 4], [M, 4] -> [N, M], torchvision's) and their elementwise_* versions
([..., 4], [..., 4] -> [...], for losses on matched pairs); BoxCoder (R-CNN deltas, torchvision's arithmetic);
coco_evaluate (pycocotools' numbers, without pycocotools, vectorised over images and categories: faster than the C++
faster-coco-eval, see `python bench.py coco_eval`); voc_ap and voc_evaluate (py-faster-rcnn's VOC AP); draw_boxes.
"""
import itertools
import math
import operator
import os

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# --- Box formats ---


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] xywh (COCO json)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] xywh (COCO json) -> [..., 4] xyxy."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_cxcywh_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xywh."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, w, h), dim=-1)


def box_xywh_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xywh -> [..., 4] cxcywh."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x + 0.5 * w, y + 0.5 * h, w, h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (w * h; negative for inverted boxes, as torchvision)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., 4] xyxy clipped to an image of size (height, width): x into [0, width], y into [0, height]."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def valid_box_mask(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> bool [N]: width and height > 0 and every coordinate finite. The others (zero width or height,
    inverted, NaN, inf) have no IoU with anything and cannot be encoded: the models leave them out of training."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(boxes).all(1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """[N, 4] xyxy -> int64 [K] indices of the boxes with width and height both >= min_size (torchvision's rule)."""
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """[N, 4] xyxy in an image of original_size (h, w) -> [N, 4] xyxy in the image resized to new_size (h, w)."""
    ratios = torch.tensor(new_size, dtype=torch.float32) / torch.tensor(original_size, dtype=torch.float32)  # (rh, rw)
    return boxes * ratios[[1, 0, 1, 0]].to(boxes.device, non_blocking=True)  # (no waiting for a GPU)


def described(value) -> str:
    """What an error message says was given: a tensor's dtype and shape, else the type's name."""
    return f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def check_images(images: list):
    """What every model takes: a non-empty list of float [3, H, W] tensors in [0, 1]. Anything else stops here, named
    (a uint8 image would pass through as values up to 255; torchvision refuses it likewise), and so does float64 (the
    models compute in float32 or lower; numpy's array / 255 is float64: before, a dtype error deep in a convolution)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images: a non-empty list of float [3, H, W] tensors, got {type(images).__name__}")
    for image in images:
        if (not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3
                or not image.numel()):  # (an image of no pixels too)
            raise TypeError(f"images: a list of float [3, H, W] tensors in [0, 1], got a {described(image)}")
        if image.dtype == torch.float64:
            raise TypeError(f"images: float64 {tuple(image.shape)}: the models compute in float32 (or bf16, fp16): "
                            "image.float()")


def check_targets(images: list, targets: list, model: str):
    """What every model takes in training: one dict per image with "boxes" [N, 4] (xyxy pixels) and "labels" int64
    [N]. Anything else stops here, named, rather than deep in the assignment, or trains on fewer images without a word.
    Shapes and types only: a check of the label values would make each training step wait for the GPU."""
    if targets is None:
        raise ValueError(f"{model}: targets are required in training mode")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        got = f"{len(targets)} targets" if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"{model}: targets: a list of one dict per image ({len(images)}), got {got}")
    for i, t in enumerate(targets):
        boxes, labels = (t.get(key) if isinstance(t, dict) else None for key in ("boxes", "labels"))
        proposals = t.get("proposals", boxes) if isinstance(t, dict) else None  # (R-CNN's, Fast R-CNN's)
        if not (isinstance(boxes, Tensor) and boxes.dim() == 2 and boxes.shape[1] == 4 and isinstance(labels, Tensor)
                and labels.dtype == torch.int64 and labels.shape == boxes.shape[:1]):
            raise ValueError(f"{model}: targets[{i}]: 'boxes' a [N, 4] tensor and 'labels' an int64 [N] one, got "
                             f"boxes {described(boxes)}, labels {described(labels)}")
        if not (isinstance(proposals, Tensor) and proposals.dim() == 2 and proposals.shape[1] == 4):
            raise ValueError(f"{model}: targets[{i}]: 'proposals' a [P, 4] tensor, got {described(proposals)}")


def proposal_sources(images: list, targets: list, proposals: list, training: bool, model: str) -> list:
    """Where R-CNN and Fast R-CNN take each image's proposals from (their proposals_of): proposals= of the call, one
    [P, 4] tensor (xyxy pixels) per image, as {"proposals": P}; else in training the image's target (the dataset's
    "proposals"); else None (selective search). proposals= of another form stops here, named (a shorter list dropped
    images from the detections without a word)."""
    if proposals is None:
        return targets if training else [None] * len(images)
    if not (isinstance(proposals, (list, tuple)) and len(proposals) == len(images) and all(
            isinstance(p, Tensor) and p.dim() == 2 and p.shape[1] == 4 for p in proposals)):
        got = f"[{', '.join(map(described, proposals))}]" if isinstance(proposals, (list, tuple)) else \
            described(proposals)
        raise ValueError(f"{model}: proposals: a list of one [P, 4] tensor per image ({len(images)}), got {got}")
    return [{"proposals": p} for p in proposals]


def pad_targets(targets: list):
    """B target dicts -> gt_boxes [B, M, 4], gt_labels [B, M], gt_valid [B, M] with M = max(1, most boxes in an image),
    so that assignment runs for the whole batch at once. Padding and degenerate boxes (valid_box_mask; stored as zeros)
    are invalid: they match nothing, so empty images and bad annotations give only negatives and finite losses."""
    M = max([1] + [len(t["boxes"]) for t in targets])
    device = targets[0]["boxes"].device
    gt_boxes = torch.zeros(len(targets), M, 4, device=device)
    gt_labels = torch.zeros(len(targets), M, dtype=torch.int64, device=device)
    gt_valid = torch.zeros(len(targets), M, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        gt_valid[i, :n] = valid = valid_box_mask(t["boxes"])
        gt_boxes[i, :n] = torch.where(valid[:, None], t["boxes"], 0.0)  # (no inf reaches the IoUs)
        gt_labels[i, :n] = t["labels"]
    return gt_boxes, gt_labels, gt_valid


# --- IoU family ---
# Pairwise versions are torchvision's; the element-wise ones ([..., 4], [..., 4] -> [...], for losses on matched
# pairs) are written here with the same formulas, so elementwise_*(a, b) == diag(pairwise_*(a, b)).


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, 4], [M, 4] xyxy -> [N, M] IoU."""
    return torchvision.ops.box_iou(boxes1, boxes2)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[N, 4], [M, 4] xyxy -> [N, M] GIoU in [-1, 1] (Rezatofighi et al. 2019)."""
    return torchvision.ops.generalized_box_iou(boxes1, boxes2)


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """[N, 4], [M, 4] xyxy -> [N, M] DIoU (Zheng et al. 2020)."""
    return torchvision.ops.distance_box_iou(boxes1, boxes2, eps=eps)


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """[N, 4], [M, 4] xyxy -> [N, M] CIoU (Zheng et al. 2020)."""
    return torchvision.ops.complete_box_iou(boxes1, boxes2, eps=eps)


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """[..., 4], [..., 4] xyxy (broadcastable) -> intersection and union areas [...]."""
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(boxes1) + box_area(boxes2) - inter


def _enclosing_wh(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[..., 4], [..., 4] xyxy -> [..., 2] width and height of the smallest box holding both."""
    return (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[..., 4], [..., 4] xyxy (broadcastable) -> [...] IoU of each box with its counterpart."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """[..., 4], [..., 4] xyxy -> [...] GIoU: IoU minus the share of the enclosing box that the union leaves empty
    (DETR's and FCOS's GIoU loss is 1 - this)."""
    inter, union = _inter_union(boxes1, boxes2)
    enclosing = _enclosing_wh(boxes1, boxes2).prod(-1)
    return inter / union - (enclosing - union) / enclosing


def _elementwise_diou_iou(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """[..., 4], [..., 4] xyxy -> DIoU and IoU [...]."""
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union
    diagonal_squared = _enclosing_wh(boxes1, boxes2).pow(2).sum(-1) + eps
    centers_squared = ((boxes1[..., :2] + boxes1[..., 2:]) / 2 - (boxes2[..., :2] + boxes2[..., 2:]) / 2).pow(2).sum(-1)
    return iou - centers_squared / diagonal_squared, iou


def elementwise_distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """[..., 4], [..., 4] xyxy -> [...] DIoU: IoU minus squared centre distance over squared enclosing diagonal."""
    return _elementwise_diou_iou(boxes1, boxes2, eps)[0]


def elementwise_complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """[..., 4], [..., 4] xyxy -> [...] CIoU: DIoU minus an aspect-ratio term alpha * v (alpha without gradient,
    as in the paper and torchvision)."""
    diou, iou = _elementwise_diou_iou(boxes1, boxes2, eps)
    w1, h1 = boxes1[..., 2] - boxes1[..., 0], boxes1[..., 3] - boxes1[..., 1]
    w2, h2 = boxes2[..., 2] - boxes2[..., 0], boxes2[..., 3] - boxes2[..., 1]
    v = (4 / math.pi**2) * (torch.atan(w1 / h1) - torch.atan(w2 / h2)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v


# --- Box coder ---


class BoxCoder:
    """The R-CNN box parameterisation (Girshick et al. 2014, appendix C), torchvision's arithmetic exactly:
    deltas (dx, dy, dw, dh) = weights * ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah)) with centres
    (x, y) and sizes (w, h) of the ground-truth box g and the anchor/proposal a. decode clamps dw, dh at
    bbox_xform_clip so that exp() cannot overflow on an untrained network."""

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes [..., 4] xyxy, anchors [..., 4] xyxy (broadcastable) -> deltas [..., 4]."""
        wx, wy, ww, wh = self.weights
        ex_widths = anchors[..., 2] - anchors[..., 0]
        ex_heights = anchors[..., 3] - anchors[..., 1]
        ex_ctr_x = anchors[..., 0] + 0.5 * ex_widths
        ex_ctr_y = anchors[..., 1] + 0.5 * ex_heights
        gt_widths = gt_boxes[..., 2] - gt_boxes[..., 0]
        gt_heights = gt_boxes[..., 3] - gt_boxes[..., 1]
        gt_ctr_x = gt_boxes[..., 0] + 0.5 * gt_widths
        gt_ctr_y = gt_boxes[..., 1] + 0.5 * gt_heights
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas [..., 4 * C] (C boxes per anchor, e.g. one per class), anchors [..., 4] xyxy -> boxes [..., 4 * C]
        xyxy. Leading dims broadcast; anchors are cast to the deltas' dtype first, as torchvision does."""
        anchors = anchors.to(deltas.dtype)
        widths = (anchors[..., 2] - anchors[..., 0])[..., None]  # [..., 1]
        heights = (anchors[..., 3] - anchors[..., 1])[..., None]
        ctr_x = anchors[..., 0:1] + 0.5 * widths
        ctr_y = anchors[..., 1:2] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0::4] / wx  # [..., C]
        dy = deltas[..., 1::4] / wy
        dw = (deltas[..., 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3::4] / wh).clamp(max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        boxes = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), -1)
        return boxes.flatten(-2)  # [..., C, 4] -> [..., 4 * C]


# --- COCO evaluation ---
# pycocotools' COCOeval for bounding boxes, rewritten so that the work is done in whole-array steps instead of Python
# loops over (image, category) pairs. Every rule below is pycocotools' rule, including its quirks, because "COCO AP"
# means "what pycocotools prints"; the test suite checks all 12 numbers against it to 1e-6.

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # pycocotools builds them with linspace too (arange drifts)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETS = (1, 10, 100)
COCO_AREA_RANGES = np.array([[0, 1e5**2], [0, 32**2], [32**2, 96**2], [96**2, 1e5**2]])  # all, small, medium, large
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _coco_box_iou_pairs(dt: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """[P, 4], [P, 4] xywh float64, [P] bool -> [P] IoU of each (det, gt) pair, in the operation order of
    pycocotools' C bbIou so that thresholds are crossed identically: against a crowd region the union is the det's
    area alone (a det inside a crowd has IoU 1 with it, however small the det)."""
    w = np.minimum(dt[:, 0] + dt[:, 2], gt[:, 0] + gt[:, 2]) - np.maximum(dt[:, 0], gt[:, 0])
    h = np.minimum(dt[:, 1] + dt[:, 3], gt[:, 1] + gt[:, 3]) - np.maximum(dt[:, 1], gt[:, 1])
    inter = w * h
    dt_area = dt[:, 2] * dt[:, 3]
    union = np.where(gt_crowd, dt_area, dt_area + gt[:, 2] * gt[:, 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _segment_starts(keys: np.ndarray) -> np.ndarray:
    """[N] sorted keys -> start index of each run of equal keys."""
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)


def _rank_in_segment(keys: np.ndarray) -> np.ndarray:
    """[N] sorted keys -> [N] position of each element inside its run of equal keys."""
    starts = _segment_starts(keys)
    lengths = np.diff(np.r_[starts, len(keys)])
    return np.arange(len(keys)) - np.repeat(starts, lengths)


def _column(records: list, key: str, dtype=None) -> np.ndarray:
    """[N] array of record[key] for each record (dicts of a COCO json)."""
    return np.array(list(map(operator.itemgetter(key), records)), dtype=dtype)


def _boxes(records: list) -> np.ndarray:
    """[N, 4] float64 array of record["bbox"] (x, y, w, h)."""
    boxes = list(map(operator.itemgetter("bbox"), records))
    if set(map(len, boxes)) - {4}:
        raise ValueError("coco_evaluate: every 'bbox' must be [x, y, w, h]")
    return np.fromiter(itertools.chain.from_iterable(boxes), np.float64, 4 * len(boxes)).reshape(-1, 4)


def _lookup(ids: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] ids, [U] sorted unique ids -> [N] index of each id in table (-1 if absent), [N] bool present."""
    pos = np.minimum(np.searchsorted(table, ids), max(len(table) - 1, 0))
    known = table[pos] == ids if len(table) else np.zeros(len(ids), bool)
    return np.where(known, pos, -1), known


def coco_evaluate(gt: dict, dets: list, per_class: bool = False) -> dict:
    """COCO bounding-box AP/AR, equal to pycocotools' COCOeval(iouType="bbox") summarize() to within float rounding.

    gt: a COCO instances dict ("images", "annotations" with image_id, category_id, bbox [x, y, w, h], area, iscrowd, id,
        "categories" with id, name). dets: list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"} (pycocotools'
    stats in that order; -1 where no category has ground truth for that setting) and, with per_class=True,
    "per_class": {category name: AP over IoU .50:.95, all areas, 100 dets} and "per_class_AP50": {name: AP at IoU .50}
    (-1 for a category without ground truth).

    pycocotools' rules, kept: gt "area" field (not the box) decides its area range, a det's area is w * h; crowd gt is
    matched last, by intersection over det area, by any number of dets, and dets matched to it (or to gt outside the
    area range) are ignored, as are unmatched dets outside the range; each (image, category) keeps its 100
    best-scored dets; score ties keep input order (stable sorts), and across images the image id order; a gt with
    id 0 cannot count as a match (pycocotools stores matches as gt ids, 0 meaning none); dets of categories absent
    from gt["categories"] are dropped. A det on an image not in gt["images"] raises ValueError (pycocotools asserts),
    so do duplicate annotation ids (pycocotools silently mixes such annotations up); a missing 'iscrowd' reads 0.
    """
    thr = np.minimum(COCO_IOU_THRESHOLDS, 1 - 1e-10)  # pycocotools caps the IoU threshold below 1
    T, R, A, M = len(thr), len(COCO_RECALL_THRESHOLDS), len(COCO_AREA_RANGES), len(COCO_MAX_DETS)

    # Images and categories are indexed by their rank in sorted id order, pycocotools' order for both.
    img_ids = np.unique(_column(gt.get("images", []), "id"))
    categories = sorted(gt.get("categories", []), key=lambda c: c["id"])
    cat_ids = _column(categories, "id")
    K = len(cat_ids)
    anns = gt.get("annotations", [])

    # Ground truth: [G] arrays grouped by (image, category), annotation order inside (pycocotools' order).
    g_img, g_known_img = _lookup(_column(anns, "image_id"), img_ids)
    g_cat, g_known_cat = _lookup(_column(anns, "category_id"), cat_ids)
    g_id = _column(anns, "id", np.int64)
    if len(np.unique(g_id)) != len(g_id):
        raise ValueError("coco_evaluate: gt['annotations'] has duplicate 'id' values")
    g_group = g_img * K + g_cat
    keep = np.flatnonzero(g_known_img & g_known_cat)  # pycocotools skips gt of unlisted images or categories
    keep = keep[np.argsort(g_group[keep], kind="stable")]
    g_group, g_cat, g_id = g_group[keep], g_cat[keep], g_id[keep]
    g_box = _boxes(anns)[keep]
    g_area = _column(anns, "area", np.float64)[keep]  # the 'area' field, not the box, decides small/medium/large
    g_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)[keep]
    G = len(keep)
    # [A, G] gt ignored in area range a: crowd, or area outside the range (both ends inside).
    g_ignore = g_crowd | (g_area < COCO_AREA_RANGES[:, :1]) | (g_area > COCO_AREA_RANGES[:, 1:])
    num_pos = np.stack([np.bincount(g_cat[~ignore], minlength=K) for ignore in g_ignore])  # [A, K] gt that count

    # Detections: [D] arrays grouped by (image, category), by score inside (stable: ties keep input order), each
    # group cut to its max_dets[-1] best.
    d_img, d_known_img = _lookup(_column(dets, "image_id"), img_ids)
    if not d_known_img.all():
        bad = dets[int(np.flatnonzero(~d_known_img)[0])]["image_id"]
        raise ValueError(f"coco_evaluate: a detection has image_id {bad!r}, which is not in gt['images']")
    d_cat, d_known_cat = _lookup(_column(dets, "category_id"), cat_ids)
    d_score = _column(dets, "score", np.float64)
    d_group = d_img * K + d_cat
    keep = np.flatnonzero(d_known_cat)  # pycocotools drops dets of categories not in gt['categories']
    keep = keep[np.lexsort((-d_score[keep], d_group[keep]))]  # lexsort is stable
    d_rank = _rank_in_segment(d_group[keep])  # [D] rank by score inside (image, category)
    keep, d_rank = keep[d_rank < COCO_MAX_DETS[-1]], d_rank[d_rank < COCO_MAX_DETS[-1]]
    d_img, d_cat, d_score, d_group = d_img[keep], d_cat[keep], d_score[keep], d_group[keep]
    d_box = _boxes(dets)[keep]
    d_area = d_box[:, 2] * d_box[:, 3]  # as pycocotools' loadRes
    d_outside = (d_area < COCO_AREA_RANGES[:, :1]) | (d_area > COCO_AREA_RANGES[:, 1:])  # [A, D]
    D = len(keep)

    # Candidate (det, gt) pairs: same image and category, IoU >= the lowest threshold (no other pair can match).
    g_lo = np.searchsorted(g_group, d_group, side="left")
    g_count = np.searchsorted(g_group, d_group, side="right") - g_lo
    p_det = np.repeat(np.arange(D), g_count)
    p_gt = np.repeat(g_lo, g_count) + _rank_in_segment(p_det)
    p_iou = _coco_box_iou_pairs(d_box[p_det], g_box[p_gt], g_crowd[p_gt])
    keep = p_iou >= thr.min()
    p_det, p_gt, p_iou = p_det[keep], p_gt[keep], p_iou[keep]

    # Greedy matching, pycocotools' order: each det, best score first, takes the best still-free gt of its (image,
    # category). Dets of different groups never compete, so step s matches the s-th candidate-holding det of every
    # group at once, for all IoU thresholds at once; only the steps (<= max_dets[-1]) are a Python loop.
    # A det's candidates are tried in pycocotools' preference: regular gt before ignored gt (its loop stops at the
    # first ignored gt once it holds a regular match), then higher IoU, then, on equal IoU, the later gt.
    run_start = _segment_starts(p_det)  # one run of pairs per det
    run_step = _rank_in_segment(d_group[p_det[run_start]])  # rank among its group's candidate-holding dets
    p_step = np.repeat(run_step, np.diff(np.r_[run_start, len(p_det)]))
    order = np.lexsort((-p_gt, -p_iou, p_det, p_step))
    p_det, p_gt, p_iou, p_step = p_det[order], p_gt[order], p_iou[order], p_step[order]
    run_start = _segment_starts(p_det)
    p_run = np.repeat(np.arange(len(run_start)), np.diff(np.r_[run_start, len(p_det)]))
    step_bound = np.searchsorted(p_step, np.arange(p_step.max(initial=-1) + 2))  # pairs of step s: [b_s, b_s+1)
    step_run = np.searchsorted(run_start, step_bound)  # runs of step s: [r_s, r_s+1)
    no_gt = G  # "matched to no gt": index one past the gt, whose id reads 0, pycocotools' "unmatched"
    g_id, g_ignore = np.r_[g_id, 0], np.c_[g_ignore, np.zeros(A, bool)]
    tp = np.zeros((A, T, D), bool)
    fp = np.zeros((A, T, D), bool)
    for a in range(A):
        perm = np.argsort(p_run * 2 + g_ignore[a, p_gt], kind="stable")  # regular gt first inside each run
        s_det, s_gt, s_iou = p_det[perm], p_gt[perm], p_iou[perm]
        taken = np.zeros((T, G + 1), bool)  # [T, G] non-crowd gt already matched (crowd gt takes any number)
        match = np.full((T, D), no_gt)  # [T, D] gt matched by each det
        for s in range(len(step_bound) - 1):
            lo, hi = step_bound[s], step_bound[s + 1]
            gts = s_gt[lo:hi]  # [P] this step's pairs, one run per det
            free = (s_iou[lo:hi] >= thr[:, None]) & ~taken[:, gts]  # [T, P]
            first = np.minimum.reduceat(np.where(free, np.arange(hi - lo), hi - lo),
                                        run_start[step_run[s]:step_run[s + 1]] - lo, axis=1)  # [T, runs]
            t_idx, run = np.nonzero(first < hi - lo)
            pair = first[t_idx, run]
            match[t_idx, s_det[lo + pair]] = gts[pair]
            taken[t_idx, gts[pair]] = ~g_crowd[gts[pair]]
        matched = g_id[match] != 0  # pycocotools' dtMatches hold gt ids, and an id of 0 reads as "no match"
        ignored = g_ignore[a, match] | (~matched & d_outside[a])  # [T, D] on ignored gt, or unmatched and outside
        tp[a] = matched & ~ignored
        fp[a] = ~matched & ~ignored

    # Accumulation of pycocotools' precision/recall for every row (max_dets m, area a, threshold t, category k) at
    # once. In a category, dets of all images go by score (ties: image id order, then the image's own order: the
    # stable sort of per-image lists concatenated in image order). A det past max_dets (rank in its image >= m) or
    # ignored adds neither TP nor FP, which leaves the interpolated curve unchanged, so every row of a category
    # shares one det order and only TPs need listing, each with the FP count before it.
    acc = np.lexsort((d_img, -d_score, d_cat))
    acc_cat = d_cat[acc]
    cat_start = np.searchsorted(acc_cat, np.arange(K))  # [K]
    tp, fp = np.take(tp, acc, axis=2), np.take(fp, acc, axis=2)
    rows, n_fp = [], []
    for m, max_det in enumerate(COCO_MAX_DETS):
        within = d_rank[acc] < max_det  # [D]
        pos = np.flatnonzero(tp & within)  # TPs as flat indices into [A, T, D], so sorted by (a, t, position)
        fp_cum = np.cumsum(fp & within, axis=-1, dtype=np.int32).ravel()  # FPs up to each position of each (a, t)
        at, col = np.divmod(pos, max(D, 1))
        k = acc_cat[col]
        start = at * D + cat_start[k]  # flat index of the category's first det in this (a, t)
        n_fp.append(fp_cum[pos] - np.where(cat_start[k] > 0, fp_cum[start - 1], 0))  # FPs of this category only
        rows.append((m * A * T + at) * K + k)  # row id of (m, a, t, k): already sorted
    row, n_fp = np.concatenate(rows), np.concatenate(n_fp)
    num_rows = M * A * T * K
    n_tp = _rank_in_segment(row) + 1.0  # running TP count at each TP
    pr = n_tp / (n_fp + n_tp + np.spacing(1))  # precision at each TP, pycocotools' float expression
    # Between TPs precision only falls, so the interpolated precision (the max at any higher recall) is the max over
    # the TPs from there on. pycocotools samples it at the first det whose recall tp / num_pos reaches each recall
    # threshold, i.e. at the need-th TP, need the least integer with need / num_pos >= threshold (same float test).
    row_tp = np.bincount(row, minlength=num_rows)  # [rows] TPs per row
    num_pos_f = np.maximum(num_pos, 1).astype(np.float64)[:, None, :, None]  # [A, 1, K, 1]
    need = np.maximum(np.ceil(COCO_RECALL_THRESHOLDS * num_pos_f) - 1, 0)  # [A, 1, K, R]
    while (short := need / num_pos_f < COCO_RECALL_THRESHOLDS).any():
        need += short
    need = np.broadcast_to(need.astype(np.int64), (M, A, T, K, R)).reshape(num_rows, R)
    first = (np.minimum(np.maximum(need - 1, 0), row_tp[:, None]) + (np.cumsum(row_tp) - row_tp)[:, None]).ravel()
    # Max of pr over TPs [first_r, first_r+1) for each threshold r, then a running max from the right.
    block_max = np.zeros(num_rows * R)
    if len(pr):
        nonempty = first < np.r_[first[1:], len(pr)]
        block_max[nonempty] = np.maximum.reduceat(pr, np.minimum(first, len(pr) - 1))[nonempty]
    q = np.maximum.accumulate(block_max.reshape(num_rows, R)[:, ::-1], axis=1)[:, ::-1].reshape(M, A, T, K, R)
    rc = row_tp.reshape(M, A, T, K) / num_pos_f[..., 0]
    has_gt = (num_pos > 0)[:, None, :]  # [A, 1, K]; -1 where a category has no gt, as pycocotools
    precision = np.where(has_gt[..., None], q, -1).transpose(2, 4, 3, 1, 0)  # [T, R, K, A, M] pycocotools' layout
    recall = np.where(has_gt, rc, -1).transpose(2, 3, 1, 0)  # [T, K, A, M]

    def summarize(ap, iou=None, area=0, m=2):  # pycocotools' _summarize, same slicing so the same float sums
        s = precision if ap else recall
        if iou is not None:
            s = s[np.where(iou == COCO_IOU_THRESHOLDS)[0]]
        s = s[..., area, m]
        return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0

    stats = [summarize(1), summarize(1, 0.5), summarize(1, 0.75), summarize(1, area=1), summarize(1, area=2),
             summarize(1, area=3), summarize(0, m=0), summarize(0, m=1), summarize(0), summarize(0, area=1),
             summarize(0, area=2), summarize(0, area=3)]
    result = dict(zip(COCO_METRIC_NAMES, stats))
    if per_class:
        names = [cat.get("name", str(cat["id"])) for cat in categories]
        for key, thresholds in (("per_class", slice(None)), ("per_class_AP50", slice(0, 1))):  # (IoU .50 first)
            s = [precision[thresholds, :, k, 0, -1] for k in range(K)]
            result[key] = {n: float(np.mean(s_k[s_k > -1])) if (s_k > -1).any() else -1.0 for n, s_k in zip(names, s)}
    return result


# --- VOC evaluation ---


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """[N], [N] recall and precision after each det of one class (dets by descending score) -> AP, as py-faster-rcnn's
    voc_eval.voc_ap: VOC2007's 11-point metric (mean of the max precision at recall >= 0, 0.1, ..., 1), or, from
    VOC2010 on, the area under the precision curve made monotone from the right."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        at_least = recall[None] >= np.arange(0.0, 1.1, 0.1)[:, None]  # [11, N]; arange as the original
        return float(np.sum(np.max(np.where(at_least, precision[None], 0.0), axis=1, initial=0.0) / 11.0))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])  # points where recall changes
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_evaluate(gt: dict, dets: list, iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict:
    """Pascal VOC AP per class (py-faster-rcnn's voc_eval), from the same inputs as coco_evaluate.

    gt: COCO-format dict (data.VocDetection.coco_gt()); an annotation with a true 'difficult' (or 'iscrowd') field is
    neither a TP nor a FP. dets: list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.
    Returns {"mAP": mean over classes with non-difficult gt, "per_class": {name: AP, -1 for a class without gt}}.
    VOC's rule, not COCO's: each det looks only at its highest-IoU gt of the same image and class (difficult and
    already-taken gt included); IoU > iou_threshold makes it a TP if that gt is free, a FP if taken, nothing if
    difficult. Boxes are continuous (data.py turns VOC's 1-based inclusive pixels into x1 - 1, y1 - 1, x2, y2), which
    gives the same IoU as VOC's "+1" arithmetic on the original pixels. Score ties keep input order (stable sort).
    """
    img_ids = np.unique(_column(gt.get("images", []), "id"))
    categories = sorted(gt.get("categories", []), key=lambda c: c["id"])
    cat_ids = _column(categories, "id")
    K = len(cat_ids)
    anns = gt.get("annotations", [])
    g_img, g_known_img = _lookup(_column(anns, "image_id"), img_ids)
    g_cat, g_known_cat = _lookup(_column(anns, "category_id"), cat_ids)
    g_group = g_img * K + g_cat
    keep = np.flatnonzero(g_known_img & g_known_cat)
    keep = keep[np.argsort(g_group[keep], kind="stable")]
    g_group, g_cat, g_box = g_group[keep], g_cat[keep], _boxes(anns)[keep]
    g_difficult = np.array([bool(a.get("difficult", 0) or a.get("iscrowd", 0)) for a in anns], dtype=bool)[keep]
    num_pos = np.bincount(g_cat[~g_difficult], minlength=K)  # [K]

    d_img, d_known_img = _lookup(_column(dets, "image_id"), img_ids)
    if not d_known_img.all():
        bad = dets[int(np.flatnonzero(~d_known_img)[0])]["image_id"]
        raise ValueError(f"voc_evaluate: a detection has image_id {bad!r}, which is not in gt['images']")
    d_cat, d_known_cat = _lookup(_column(dets, "category_id"), cat_ids)
    d_score = _column(dets, "score", np.float64)
    order = np.flatnonzero(d_known_cat)
    order = order[np.lexsort((-d_score[order], d_cat[order]))]  # by class, then score (stable)
    d_cat, d_group, d_box = d_cat[order], (d_img * K + d_cat)[order], _boxes(dets)[order]
    D = len(order)

    # Each det's best gt: all (det, gt) pairs of its image and class, the first highest IoU (np.argmax's pick).
    g_lo = np.searchsorted(g_group, d_group, side="left")
    g_count = np.searchsorted(g_group, d_group, side="right") - g_lo
    p_det = np.repeat(np.arange(D), g_count)
    p_gt = np.repeat(g_lo, g_count) + _rank_in_segment(p_det)
    d_xyxy, g_xyxy = d_box[p_det], g_box[p_gt]
    d_xyxy[:, 2:] += d_xyxy[:, :2]  # xywh -> xyxy
    g_xyxy[:, 2:] += g_xyxy[:, :2]
    iou = elementwise_box_iou(torch.from_numpy(d_xyxy), torch.from_numpy(g_xyxy)).numpy()
    best = np.lexsort((p_gt, -iou, p_det))
    best = best[_segment_starts(p_det[best])]  # one pair per det that has any gt
    hit = best[iou[best] > iou_threshold]  # pairs whose det clears the threshold on its best gt
    hit_det, hit_gt = p_det[hit], p_gt[hit]
    hit_det, hit_gt = hit_det[~g_difficult[hit_gt]], hit_gt[~g_difficult[hit_gt]]
    tp = np.zeros(D, bool)
    fp = np.ones(D, bool)
    fp[p_det[hit]] = False  # a det on a difficult gt is neither
    _, first = np.unique(hit_gt, return_index=True)  # dets are in score order: the first to reach a gt takes it
    tp[hit_det[first]] = True
    fp[hit_det] = ~tp[hit_det]  # the later ones on a taken gt are FPs

    per_class = {}
    cat_bounds = np.searchsorted(d_cat, np.arange(K + 1))
    for k, cat in enumerate(categories):
        if num_pos[k] == 0:
            per_class[cat.get("name", str(cat["id"]))] = -1.0
            continue
        tp_k = np.cumsum(tp[cat_bounds[k]:cat_bounds[k + 1]], dtype=np.float64)
        fp_k = np.cumsum(fp[cat_bounds[k]:cat_bounds[k + 1]], dtype=np.float64)
        precision = tp_k / np.maximum(tp_k + fp_k, np.finfo(np.float64).eps)
        per_class[cat.get("name", str(cat["id"]))] = voc_ap(tp_k / num_pos[k], precision, use_07_metric)
    aps = [ap for ap in per_class.values() if ap >= 0]
    return {"mAP": float(np.mean(aps)) if aps else -1.0, "per_class": per_class}


# --- Drawing ---


PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_boxes(image: Tensor, boxes: Tensor, labels: Tensor | None = None, scores: Tensor | None = None,
               class_names=None, path: str | None = None, width: int | None = None, color=None) -> Tensor:
    """Draw boxes with "class score" captions, saved to path if given. Returns the drawn uint8 [3, H, W] image.

    image: [3, H, W] float in [0, 1] or uint8; boxes: [N, 4] xyxy pixels; labels: int [N] (1..K) or None (no captions);
    scores: [N] or None; class_names: sequence indexed by label (index 0 "__background__"); color: one (r, g, b) for
    every box, or a list of one per box, instead of the class colours (one per class, fixed, so that a class looks the
    same in every picture). Line width and caption size follow the image size; a caption sits on a filled box of its
    class colour in black or white, whichever reads better, above its box (inside it at the top border), moved down
    while it would cover an earlier caption, so that overlapping boxes keep readable captions. Boxes with a NaN or
    infinite coordinate are not drawn; corners given the wrong way round (x2 < x1) are swapped."""
    if image.dtype != torch.uint8:
        image = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    H, W = image.shape[-2:]
    picture = Image.fromarray(image.cpu().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    width = width or max(1, round(max(H, W) / 320))
    font = ImageFont.load_default(size=max(11, round(max(H, W) / 40)))
    boxes = boxes.detach().cpu().float().tolist()
    # PIL refuses x2 < x1 and fails on NaN or inf (a diverged model): order the corners, mark the rest None (skipped)
    boxes = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] if all(map(math.isfinite, b))
             else None for b in boxes]
    labels = labels.detach().cpu().tolist() if labels is not None else [None] * len(boxes)
    colours = color if isinstance(color, list) else [color or PALETTE[(l or 0) % len(PALETTE)] for l in labels]
    for box, colour in zip(boxes, colours):
        if box is not None:
            draw.rectangle(box, outline=tuple(colour), width=width)
    placed = []  # caption rectangles drawn so far
    for i, (box, label, colour) in enumerate(zip(boxes, labels, colours)):
        if label is None or box is None:
            continue
        caption = class_names[label] if class_names is not None else str(label)
        caption = f"{caption} {float(scores[i]):.2f}" if scores is not None else caption
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(box[0], 0), max(W - w, 0))
        y = box[1] - h if box[1] - h >= 0 else max(box[1], 0)
        while any(x < p[2] and p[0] < x + w and y < p[3] and p[1] < y + h for p in placed) and y + 2 * h <= H:
            y += h
        placed.append((x, y, x + w, y + h))
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=tuple(colour))
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x + 2 - left, y + 2 - top), caption, (0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        known = os.path.splitext(path)[1].lower() in Image.registered_extensions()  # else (no extension) a PNG
        picture.save(path, None if known else "PNG", quality=95)  # quality: JPEG's and WebP's; PNG is lossless
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()
