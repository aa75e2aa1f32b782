"""RetinaNet with a ResNet-50-FPN backbone, torchvision v1 semantics.

Paper: Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object Detection", ICCV 2017
(https://arxiv.org/abs/1708.02002).

What this file implements, in the order the data flows (torchvision/models/detection/retinanet.py is the reference, and
test_models.py proves that this file gives torchvision's detections and losses with the same weights):
  - preprocessing inside the model: ImageNet normalisation, resize so the short side is min_size (long side at most
    max_size), zero padding of the batch to a multiple of 32; detections are mapped back to each input image's pixels;
  - backbone: a torchvision ResNet body (FrozenBatchNorm2d when starting from pretrained weights) and an FPN giving
    P3..P5 plus P6, P7 by strided convs, strides 8..128, 256 channels;
  - head: a classification subnet and a box subnet shared by all levels, four 3x3 convs each; per anchor K class
    logits (sigmoid, no softmax) and 4 box deltas;
  - anchors: 9 per location and level (sizes 32..512 times 2^0, 2^(1/3), 2^(2/3); ratios 0.5, 1, 2), assigned by IoU
    (>= 0.5 foreground, < 0.4 background, in between ignored, plus low-quality matches);
  - loss: sigmoid focal loss (alpha 0.25, gamma 2) over all non-ignored anchors and L1 on the foreground anchors'
    deltas, both divided by the image's number of foreground anchors;
  - decoding: per level, scores > 0.05 and the best 1000, then NMS 0.5 per class and 300 detections per image.
Assignment and loss run for the whole batch at once: ground truth is padded to [B, M] with a validity mask.

Run:
    python retinanet.py --train                                  # synthetic shapes, no download
    python retinanet.py --train --data coco --data-root DIR      # or --data voc
    python retinanet.py --eval --weights torchvision --data coco --data-root DIR
    python retinanet.py --predict IMG_OR_DIR --weights PATH --out DIR
    python retinanet.py --show-targets --out DIR
    python -m pytest -q test_models.py -k retinanet                # parity with torchvision

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the padded batch size, L = 5 pyramid levels, A anchors of all levels of one image
    (A_loc = 9 per location), M ground-truth boxes per image (padded to the batch maximum), F foreground anchors of the
    whole batch, K classes including the unused index 0 (num_classes), C feature channels, D detections of one image.
    Boxes are xyxy in pixels of the resized image unless a comment says otherwise.
"""
import argparse
import ast
import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, batched_nms, sigmoid_focal_loss

import data
from common import (COCO_METRIC_NAMES, BoxCoder, box_xyxy_to_xywh, clip_boxes_to_image, coco_evaluate, draw_boxes,
                    elementwise_box_iou, voc_evaluate)

# --- Config ---


@dataclass
class Config:
    # model
    num_classes: int = 91  # K: foreground classes + 1 (91 = COCO with torchvision's category ids); index 0 unused
    backbone: str = "resnet50"  # torchvision ResNet body: resnet18 | resnet34 | resnet50
    backbone_weights: str = "imagenet"  # imagenet | none | PATH to a ResNet state dict; none and no --weights: plain BN
    trainable_backbone_layers: int = 3  # pretrained (backbone or --weights): layer2..4 train, stem, layer1 frozen
    bn_eps: float = 1e-5  # backbone batch-norm eps; 0.0 with torchvision's v1 COCO weights (set when starting there)
    fpn_channels: int = 256  # C: channels of every pyramid level
    # preprocessing
    min_size: int = 800  # resize the short side to this ...
    max_size: int = 1333  # ... unless the long side would exceed this
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1]
    image_std: tuple = (0.229, 0.224, 0.225)
    size_divisible: int = 32  # pad the batch to a multiple of this (the coarsest backbone stride)
    # anchors and their assignment
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # base anchor size per level P3..P7 (pixels) ...
    anchor_scales: tuple = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # ... times these, truncated to integers (torchvision)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # anchor height / width, the same at every level
    fg_iou_thresh: float = 0.5  # anchor IoU >= this: foreground
    bg_iou_thresh: float = 0.4  # anchor IoU < this: background; in between: ignored
    # head and loss
    prior_probability: float = 0.01  # initial foreground probability of every class logit (paper section 4.1)
    focal_alpha: float = 0.25  # focal loss weight of the positives (negatives get 1 - alpha)
    focal_gamma: float = 2.0  # focal loss focusing exponent: (1 - p_t) ** gamma
    # decoding
    score_thresh: float = 0.05  # keep (anchor, class) pairs with a probability above this
    topk_candidates: int = 1000  # ... and at most this many per level
    nms_thresh: float = 0.5  # NMS IoU, applied per class
    detections_per_img: int = 300  # detections kept per image
    # data (data.build_datasets)
    data: str = "synthetic"  # synthetic | coco | voc
    data_root: str = ""  # dataset folder for coco / voc
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 320  # synthetic: image side in pixels
    num_train: int = 10000  # synthetic: training images
    num_val: int = 500  # synthetic: validation images
    hflip_prob: float = 0.5  # training augmentation: horizontal flip probability
    # training (torchvision's RetinaNet recipe: 26 epochs, 16 images per step, lr 0.01, steps at 16 and 22)
    epochs: int = 26  # passes over the training set
    batch_size: int = 2  # images per step and per process (torchvision: 2 per GPU x 8 GPUs)
    lr: float = 0.01  # learning rate for 16 images per step, scaled linearly to batch_size x processes
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 on all trained parameters
    lr_steps: tuple = (16, 22)  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # lr decay factor
    warmup_iters: int = 1000  # steps of linear warmup at the start
    warmup_factor: float = 0.001  # the warmup starts at lr x this
    clip_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    workers: int = 4  # DataLoader worker processes
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds python, numpy, torch, the data order and the synthetic data
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/retinanet"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # torchvision (COCO) | PATH to a checkpoint or torchvision state dict: start from / evaluate
    predict_score_thresh: float = 0.5  # --predict draws detections scoring at least this


# --- Model ---


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """[N, 4] xyxy in an image of original_size (h, w) -> [N, 4] xyxy in the image resized to new_size (h, w)."""
    ratios = torch.tensor(new_size, dtype=torch.float32) / torch.tensor(original_size, dtype=torch.float32)  # (rh, rw)
    return boxes * ratios[[1, 0, 1, 0]].to(boxes.device)


def preprocess(images: list, targets, cfg: Config):
    """Normalise, resize and pad a list of [3, h_i, w_i] images in [0, 1] (torchvision's GeneralizedRCNNTransform).
    Returns the batch [B, 3, H, W], image_sizes [(h, w)] after resizing (before padding), and targets with their boxes
    resized (a copy; None stays None)."""
    mean = torch.tensor(cfg.image_mean, device=images[0].device)[:, None, None]  # [3, 1, 1]
    std = torch.tensor(cfg.image_std, device=images[0].device)[:, None, None]
    resized, new_targets = [], []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        # the same scale and interpolation call as torchvision, so that pixels agree exactly
        scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))
        image = F.interpolate(((image - mean) / std)[None], scale_factor=scale, mode="bilinear",
                              recompute_scale_factor=True, align_corners=False)[0]  # [3, h', w']
        resized.append(image)
        if targets is not None:
            new_targets.append({**targets[i], "boxes": resize_boxes(targets[i]["boxes"], (h, w), image.shape[-2:])})
    image_sizes = [tuple(image.shape[-2:]) for image in resized]
    stride = cfg.size_divisible
    H = int(math.ceil(max(s[0] for s in image_sizes) / stride) * stride)
    W = int(math.ceil(max(s[1] for s in image_sizes) / stride) * stride)
    batch = resized[0].new_zeros(len(resized), 3, H, W)  # [B, 3, H, W]
    for image, out in zip(resized, batch):
        out[:, : image.shape[1], : image.shape[2]].copy_(image)
    return batch, image_sizes, (new_targets if targets is not None else None)


class FPN(nn.Module):
    """Feature Pyramid Network: lateral 1x1 convs (inner_blocks), top-down nearest-neighbour upsampling and addition,
    3x3 output convs (layer_blocks), then P6 = 3x3 stride-2 conv of P5 and P7 = 3x3 stride-2 conv of ReLU(P6).
    torchvision v1 builds P6 from P5 (LastLevelP6P7(256, 256)); the paper and torchvision's v2 build it from C5."""

    def __init__(self, in_channels_list: list, out_channels: int):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels_list)
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list) -> list:
        """[C3, C4, C5] [B, C_l, H/s, W/s], s = 8..32 -> [P3, P4, P5, P6, P7] [B, C, H/s, W/s], s = 8..128."""
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        p6 = self.p6(results[-1])
        results += [p6, self.p7(F.relu(p6))]
        return results


class Backbone(nn.Module):
    """torchvision ResNet body (stem, layer1..4; no pooling or fc) followed by the FPN on C3..C5 (no P2: it would
    quadruple the anchors, paper section 4)."""

    def __init__(self, cfg: Config, load_weights: bool = True):
        super().__init__()
        # torchvision: frozen batch norm (fixed statistics and affine) and frozen early layers when fine-tuning
        # pretrained weights of any kind, an ImageNet backbone or a whole detector's --weights (as its builders do when
        # given detector weights): detection batches are too small for batch statistics. Ordinary batch norm and every
        # layer trained when training from scratch.
        pretrained = cfg.backbone_weights != "none" or bool(cfg.weights)
        norm_layer = functools.partial(FrozenBatchNorm2d if pretrained else nn.BatchNorm2d, eps=cfg.bn_eps)
        # load_weights=False: the caller overwrites every weight (--weights, --resume, --eval), so nothing is downloaded
        weights = "IMAGENET1K_V1" if cfg.backbone_weights == "imagenet" and load_weights else None
        body = getattr(torchvision.models, cfg.backbone)(weights=weights, norm_layer=norm_layer)
        if cfg.backbone_weights not in ("imagenet", "none") and load_weights:
            body.load_state_dict(torch.load(cfg.backbone_weights, map_location="cpu", weights_only=True))
        del body.avgpool, body.fc
        trainable = cfg.trainable_backbone_layers if pretrained else 5
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable + (trainable == 5)]
        for name, parameter in body.named_parameters():
            parameter.requires_grad_(any(name.startswith(layer) for layer in layers_to_train))
        self.body = body
        in_channels = [body.inplanes // 8 * 2**i for i in range(1, 4)]  # resnet50: 512..2048; resnet18/34: 128..512
        self.fpn = FPN(in_channels, cfg.fpn_channels)

    def forward(self, images: Tensor) -> list:
        """[B, 3, H, W] -> L = 5 maps [B, C, H/s, W/s], s = 8, 16, 32, 64, 128."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))  # [B, 64, H/4, W/4]
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return self.fpn([c3, c4, c5])


def subnet(channels: int) -> nn.Sequential:
    """Four 3x3 conv + ReLU layers (paper Fig. 3 c, d)."""
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class Head(nn.Module):
    """The classification subnet and the box subnet, shared by all levels: per anchor K class logits and four box
    deltas (class-agnostic, paper section 4)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float):
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = subnet(in_channels)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_subnet = subnet(in_channels)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)
        # every class starts at probability prior_probability, so that the many easy negatives do not swamp the first
        # iterations' loss (paper section 4.1, "Initialization")
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list):
        """L maps [B, C, H_l, W_l] -> cls_logits [B, A, K], bbox_regression [B, A, 4]; anchors ordered level, y, x,
        anchor shape (as make_anchors)."""
        cls_logits, bbox_regression = [], []
        for feature in features:
            B, _, H, W = feature.shape
            logits = self.cls_logits(self.cls_subnet(feature)).view(B, -1, self.num_classes, H, W)  # [B, A_loc, K, ..]
            cls_logits.append(logits.permute(0, 3, 4, 1, 2).reshape(B, -1, self.num_classes))  # [B, H_l*W_l*A_loc, K]
            bbox_feature = self.bbox_subnet(feature)  # [B, C, H_l, W_l]
            deltas = self.bbox_reg(bbox_feature).view(B, -1, 4, H, W)  # [B, A_loc, 4, H_l, W_l]
            bbox_regression.append(deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4))  # [B, H_l * W_l * A_loc, 4]
        return torch.cat(cls_logits, 1), torch.cat(bbox_regression, 1)  # [B, A, K], [B, A, 4]


class RetinaNet(nn.Module):
    """model.train(): model(images, targets) -> dict of losses; model.eval(): model(images) -> list of
    {"boxes" [D, 4] xyxy in input pixels, "scores" [D], "labels" [D]}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_weights)
        num_anchors = len(cfg.anchor_scales) * len(cfg.aspect_ratios)  # A_loc
        self.head = Head(cfg.fpn_channels, num_anchors, cfg.num_classes, cfg.prior_probability)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def forward(self, images: list, targets: list = None):
        if self.training and targets is None:
            raise ValueError("RetinaNet: targets are required in training mode")
        cfg = self.cfg
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, image_sizes, targets = preprocess(images, targets, cfg)  # [B, 3, H, W]
        features = self.backbone(batch)  # L = 5 maps [B, C, H/s, W/s]
        cls_logits, bbox_regression = self.head(features)  # [B, A, K], [B, A, 4]
        # losses and decoding in float32 under autocast: bf16 has 8 bits of mantissa, pixels off by several at 800 px
        cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, num_anchors_per_level = make_anchors(batch.shape[-2:], grid_sizes, cfg, batch.device)  # [A, 4]

        if self.training:
            gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [B, M, 4], [B, M], [B, M]
            matched_idxs = assign_anchors(anchors, gt_boxes, gt_valid, cfg)  # [B, A]
            return compute_loss(cls_logits, bbox_regression, anchors, matched_idxs, gt_boxes, gt_labels,
                                self.box_coder, cfg)

        detections = postprocess_detections(cls_logits, bbox_regression, anchors, num_anchors_per_level,
                                            image_sizes, self.box_coder, cfg)
        for det, size, original_size in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original_size)  # back to the input image's pixels
        return detections


Model = RetinaNet


# --- Targets ---

BELOW_LOW_THRESHOLD = -1  # matched_idxs value: background (IoU below bg_iou_thresh with every ground-truth box)
BETWEEN_THRESHOLDS = -2  # matched_idxs value: ignored (best IoU between the two thresholds), no loss at all


def make_anchors(image_size, grid_sizes: list, cfg: Config, device=None):
    """Anchors of all levels, the same for every image of the batch. image_size: padded (H, W); grid_sizes: L sizes
    (H_l, W_l) of the feature maps. Returns anchors [A, 4] xyxy ordered level, y, x, anchor shape, and the count per
    level.
    Matches torchvision's AnchorGenerator: zero-centred cell anchors are rounded to integers, the stride is
    H // H_l, and anchor centres sit at x * stride (the top-left corner of a cell, not its centre)."""
    anchors, num_anchors_per_level = [], []
    for (H_l, W_l), size in zip(grid_sizes, cfg.anchor_sizes):
        scales = torch.tensor([float(int(size * s)) for s in cfg.anchor_scales], device=device)  # 32 -> 32, 40, 50
        h_ratios = torch.sqrt(torch.tensor(cfg.aspect_ratios, device=device))  # sqrt(height / width)
        ws = ((1 / h_ratios)[:, None] * scales[None]).reshape(-1)  # [A_loc] ratio-major, as torchvision
        hs = (h_ratios[:, None] * scales[None]).reshape(-1)  # area scale ** 2 for every ratio
        cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [A_loc, 4]
        # torchvision's stride is H // H_l: for P6, P7 of a padded size that is not a multiple of 128 it is not 64, 128
        stride_y, stride_x = image_size[0] // H_l, image_size[1] // W_l
        shift_y, shift_x = torch.meshgrid(torch.arange(H_l, device=device) * stride_y,
                                          torch.arange(W_l, device=device) * stride_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)  # [H_l * W_l, 1, 4]
        anchors.append((shifts + cell[None]).reshape(-1, 4))  # [H_l * W_l * A_loc, 4]
        num_anchors_per_level.append(anchors[-1].shape[0])
    return torch.cat(anchors), num_anchors_per_level


def pad_targets(targets: list):
    """B target dicts -> gt_boxes [B, M, 4], gt_labels [B, M], gt_valid [B, M] with M = max(1, most boxes in an image).
    Padding and degenerate boxes (zero width or height, which have no IoU with anything and cannot be encoded) are
    invalid: they match nothing, so empty images and bad annotations give only negatives and finite losses."""
    M = max([1] + [len(t["boxes"]) for t in targets])
    device = targets[0]["boxes"].device
    gt_boxes = torch.zeros(len(targets), M, 4, device=device)
    gt_labels = torch.zeros(len(targets), M, dtype=torch.int64, device=device)
    gt_valid = torch.zeros(len(targets), M, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        gt_boxes[i, :n] = t["boxes"]
        gt_labels[i, :n] = t["labels"]
        gt_valid[i, :n] = (t["boxes"][:, 2] > t["boxes"][:, 0]) & (t["boxes"][:, 3] > t["boxes"][:, 1])
    return gt_boxes, gt_labels, gt_valid


@torch.no_grad()
def match(iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool) -> Tensor:
    """torchvision's Matcher for a batch. iou [B, M, N] between ground truth and anchors/proposals; gt_valid [B, M].
    Returns matched_idxs [B, N]: the best ground-truth index where its IoU >= high, BELOW_LOW_THRESHOLD where < low,
    BETWEEN_THRESHOLDS otherwise. With allow_low_quality_matches, every anchor that is the best one for some ground
    truth (ties included) keeps its best match whatever the IoU (Faster R-CNN section 3.1.2)."""
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)  # padding is never anybody's best match
    matched_vals, matches = iou.max(dim=1)  # [B, N]
    matched_idxs = torch.where(matched_vals < high, BETWEEN_THRESHOLDS, matches)
    matched_idxs = torch.where(matched_vals < low, BELOW_LOW_THRESHOLD, matched_idxs)
    if allow_low_quality_matches:
        highest_per_gt = iou.max(dim=2, keepdim=True).values  # [B, M, 1]
        is_best = ((iou == highest_per_gt) & gt_valid[:, :, None]).any(dim=1)  # [B, N]
        matched_idxs = torch.where(is_best, matches, matched_idxs)
    return matched_idxs


@torch.no_grad()
def assign_anchors(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, cfg: Config) -> Tensor:
    """anchors [A, 4], gt_boxes [B, M, 4], gt_valid [B, M] -> matched_idxs [B, A]: the index of the ground-truth box
    each anchor learns, or BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS (IoU 0.5 / 0.4, low-quality matches allowed)."""
    iou = elementwise_box_iou(gt_boxes[:, :, None, :], anchors[None, None])  # [B, M, A]
    return match(iou, gt_valid, cfg.fg_iou_thresh, cfg.bg_iou_thresh, allow_low_quality_matches=True)


@torch.no_grad()
def assignment_for_display(model: RetinaNet, images: list, targets: list) -> list:
    """What the assignment marks positive, for `--show-targets`: per image a dict with "anchors" [P, 4] xyxy in the
    input image's pixels and "matched_idxs" [P] (index of the ground-truth box each positive anchor learns)."""
    cfg = model.cfg
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    batch, image_sizes, resized_targets = preprocess(images, targets, cfg)
    H, W = batch.shape[-2:]
    grid_sizes = [(math.ceil(H / s), math.ceil(W / s)) for s in (8, 16, 32, 64, 128)]  # stride-2 convs round up
    anchors, _ = make_anchors(batch.shape[-2:], grid_sizes, cfg, batch.device)  # [A, 4]
    gt_boxes, _, gt_valid = pad_targets(resized_targets)
    matched_idxs = assign_anchors(anchors, gt_boxes, gt_valid, cfg)  # [B, A]
    out = []
    for matched, size, original_size in zip(matched_idxs, image_sizes, original_sizes):
        positive = matched >= 0
        out.append({"anchors": resize_boxes(anchors[positive], size, original_size), "matched_idxs": matched[positive]})
    return out


# --- Loss ---


def compute_loss(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, matched_idxs: Tensor, gt_boxes: Tensor,
                 gt_labels: Tensor, box_coder: BoxCoder, cfg: Config) -> dict:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4], matched_idxs [B, A], gt_boxes [B, M, 4],
    gt_labels [B, M]. Focal loss summed over every (anchor, class) pair except ignored anchors; L1 on the foreground
    anchors' deltas; each image's sums divided by its number of foreground anchors (at least 1), then the mean over
    images (torchvision; paper section 4.1: "normalized by the number of anchors assigned to a ground-truth box")."""
    foreground = matched_idxs >= 0  # [B, A]
    num_foreground = foreground.sum(dim=1).clamp(min=1)  # [B]
    image_idx, anchor_idx = torch.where(foreground)  # [F] each
    matched_gt = matched_idxs[image_idx, anchor_idx]  # [F]
    # one-hot class targets of the foreground anchors; background rows stay all zero (sigmoid: no background class)
    gt_classes_target = torch.zeros_like(cls_logits)  # [B, A, K]
    gt_classes_target[image_idx, anchor_idx, gt_labels[image_idx, matched_gt]] = 1.0
    # FL(p_t) = -alpha_t (1 - p_t) ** gamma log(p_t) (paper eq. 5): easy negatives, p_t near 1, add almost nothing
    classification_loss = sigmoid_focal_loss(cls_logits, gt_classes_target, alpha=cfg.focal_alpha,
                                             gamma=cfg.focal_gamma, reduction="none").sum(-1)  # [B, A]
    classification_loss = torch.where(matched_idxs != BETWEEN_THRESHOLDS, classification_loss, 0.0).sum(1)  # [B]

    target_regression = box_coder.encode(gt_boxes[image_idx, matched_gt], anchors[anchor_idx])  # [F, 4]
    box_loss = F.l1_loss(bbox_regression[image_idx, anchor_idx], target_regression, reduction="none").sum(-1)  # [F]
    box_loss = box_loss.new_zeros(len(num_foreground)).index_add(0, image_idx, box_loss)  # [B] sum per image
    return {"classification": (classification_loss / num_foreground).mean(),
            "bbox_regression": (box_loss / num_foreground).mean()}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, num_anchors_per_level: list,
                           image_sizes: list, box_coder: BoxCoder, cfg: Config) -> list:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4] -> B dicts with boxes [D, 4] (in the resized
    image), scores [D], labels [D]. Every (anchor, class) pair is a candidate: per level, probability > score_thresh and
    the best topk_candidates, decoded and clipped; then NMS per class over all levels and the best detections_per_img.
    Like torchvision, class 0 is a candidate too (it is never trained positive, so its scores stay low)."""
    K = cls_logits.shape[-1]
    scores = torch.sigmoid(cls_logits)  # [B, A, K]
    detections = []
    for scores_i, regression_i, size in zip(scores, bbox_regression, image_sizes):
        boxes_i, scores_kept, labels_i = [], [], []
        for scores_l, regression_l, anchors_l in zip(scores_i.split(num_anchors_per_level),
                                                     regression_i.split(num_anchors_per_level),
                                                     anchors.split(num_anchors_per_level)):
            scores_l = scores_l.flatten()  # [A_l * K], index = anchor * K + class
            keep = torch.where(scores_l > cfg.score_thresh)[0]
            top = scores_l[keep].topk(min(cfg.topk_candidates, len(keep)))
            keep = keep[top.indices]
            anchor_idx, labels = keep // K, keep % K
            boxes = box_coder.decode(regression_l[anchor_idx], anchors_l[anchor_idx])  # [k, 4]
            boxes_i.append(clip_boxes_to_image(boxes, size))
            scores_kept.append(top.values)
            labels_i.append(labels)
        boxes_i, scores_i, labels_i = torch.cat(boxes_i), torch.cat(scores_kept), torch.cat(labels_i)
        keep = batched_nms(boxes_i, scores_i, labels_i, cfg.nms_thresh)[: cfg.detections_per_img]
        detections.append({"boxes": boxes_i[keep], "scores": scores_i[keep], "labels": labels_i[keep]})
    return detections


def convert_torchvision(state_dict: dict) -> dict:
    """A torchvision retinanet_resnet50_fpn state dict (any num_classes; old and new key versions) -> this file's
    RetinaNet state dict. Our names are torchvision's without the wrapper modules."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
        key = key.replace("backbone.fpn.extra_blocks.", "backbone.fpn.")
        # new: head.*_head.conv.{i}.0 (Conv2dNormActivation); old checkpoints: conv.{2i} (conv, ReLU, conv, ...)
        key = re.sub(r"^(head\.\w+_head\.conv)\.(\d+)\.0\.", lambda m: f"{m[1]}.{2 * int(m[2])}.", key)
        key = key.replace("head.classification_head.conv.", "head.cls_subnet.")
        key = key.replace("head.regression_head.conv.", "head.bbox_subnet.")
        key = key.replace("head.classification_head.", "head.").replace("head.regression_head.", "head.")
        out[key] = value
    return out


def num_classes_of(state_dict: dict) -> int:
    """K of a state dict of this file's model, from its classifier's weight."""
    return state_dict["head.cls_logits.weight"].shape[0] // 9  # [A_loc * K, C, 3, 3], torchvision: A_loc = 9


# --- Training ---
# The same loop in every model file of this repo (torchvision's references/detection recipe): SGD with momentum, linear
# warmup, step decay, AMP on CUDA, DDP under torchrun; evaluation with the 12 COCO numbers after each epoch; atomic
# checkpoints that --resume continues exactly. What is specific to this detector: the builder `RetinaNet(cfg)`,
# TORCHVISION_WEIGHTS, SYNTHETIC_PRESET and draw_targets().

TORCHVISION_WEIGHTS = torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1  # --weights torchvision
TORCHVISION_BN_EPS = 0.0  # torchvision's v1 COCO weights go with batch-norm eps 0 (its overwrite_eps(model, 0))
COCO_CLASS_NAMES = tuple(TORCHVISION_WEIGHTS.meta["categories"])  # K = 91, index 0 "__background__"
# Config values for --data synthetic (320-px shapes), used for every field not given on the command line: train at the
# images' own size rather than upscaled to 800, anchors one octave smaller (the shapes are 13..190 px), a shorter
# schedule. Chosen to reach mAP@0.5 >= 0.9 on the synthetic val split in ~10 minutes on one GPU: NOT yet measured.
SYNTHETIC_PRESET = dict(min_size=320, max_size=320, anchor_sizes=(16, 32, 64, 128, 256), batch_size=16, epochs=6,
                        lr_steps=(4, 5), warmup_iters=300)


def build_model(cfg: Config, load_weights: bool = True) -> RetinaNet:
    """RetinaNet(cfg). load_weights=False when the caller then loads every weight (--weights, --resume, --eval): no
    backbone weights are read or downloaded. Without internet torchvision cannot download the ImageNet backbone: warn,
    start from scratch."""
    try:
        return RetinaNet(cfg, load_weights)
    except OSError as e:  # urllib's URLError is an OSError; a missing --backbone-weights PATH too, which we re-raise
        if cfg.backbone_weights != "imagenet":
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            warnings.warn(f"could not download torchvision's ImageNet weights for {cfg.backbone} ({e}); the "
                          f"backbone starts from random weights, as with --backbone-weights none (expect much slower "
                          f"training)")
        cfg.backbone_weights = "none"
        return RetinaNet(cfg)


def load_weights(weights: str):
    """--weights torchvision | PATH -> (state dict for this file's model, class names, saved Config dict or None).
    PATH is a checkpoint of this file (a dict with "model") or a torchvision state dict (converted)."""
    if weights == "torchvision":
        try:
            state_dict = TORCHVISION_WEIGHTS.get_state_dict(progress=True)
        except OSError as e:
            raise SystemExit(f"--weights torchvision: cannot download {TORCHVISION_WEIGHTS.url} ({e}). Without "
                             f"internet, fetch that file elsewhere and pass --weights PATH_TO_IT") from None
        return convert_torchvision(state_dict), COCO_CLASS_NAMES, None
    if not os.path.isfile(weights):
        raise SystemExit(f"--weights {weights}: file not found")
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    if "model" in checkpoint:
        return checkpoint["model"], tuple(checkpoint["class_names"]), checkpoint["config"]
    state_dict = convert_torchvision(checkpoint)
    if state_dict.keys() == checkpoint.keys():  # nothing renamed: not torchvision's key names
        raise SystemExit(f"--weights {weights}: neither a checkpoint of this file (a dict with 'model') nor a "
                         f"torchvision state dict")
    # K from the classifier's weight: torchvision's COCO names for K = 91 (its released weights), else generic ones
    K = num_classes_of(state_dict)
    return state_dict, (COCO_CLASS_NAMES if K == 91 else ("__background__", *map(str, range(1, K)))), None


def load_matching(model: torch.nn.Module, state_dict: dict):
    """Load the entries whose shapes fit (fine-tuning on other classes re-initialises the class-specific layers); any
    other missing or unexpected key is an error."""
    own = model.state_dict()
    skipped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if skipped and int(os.environ.get("RANK", 0)) == 0:
        print(f"weights: not loaded (shape differs, e.g. another class count): {', '.join(skipped)}")
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {', '.join(missing) or 'none'}; unexpected "
                         f"{', '.join(result.unexpected_keys) or 'none'}")


def autocast(device: torch.device, cfg: Config):
    """bf16 autocast on CUDA where supported, else fp16 (with GradScaler); nothing on CPU or with --no-amp."""
    if device.type != "cuda" or not cfg.amp:
        return contextlib.nullcontext()
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later; emulated bf16 is slow
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def to_device(targets: list, device: torch.device) -> list:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def save_checkpoint(checkpoint: dict, path: str):
    """Write to a temporary file, then rename: a crash mid-write never leaves a truncated checkpoint."""
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_states(device: torch.device) -> dict:
    """Python, numpy, torch and this process's CUDA device's random states as plain lists (they travel through
    all_gather_object)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else []}


def set_rng_states(states: dict, device: torch.device):
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if device.type == "cuda" and states["cuda"]:
        torch.cuda.set_rng_state(torch.tensor(states["cuda"], dtype=torch.uint8), device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, cfg: Config, device: torch.device, label_map=None) -> dict:
    """The 12 COCO numbers (common.coco_evaluate) of `model` on `dataset`, plus VOC_mAP50 on a VOC dataset.
    label_map: model label -> dataset label (e.g. torchvision's 91 COCO labels -> the dataset's 1..K); detections of
    other labels are dropped. None: the model's labels are the dataset's."""
    model.eval()
    loader = data.make_loader(dataset, cfg.batch_size, train=False, workers=cfg.workers, distributed=False)
    results = []
    for images, targets in loader:
        with autocast(device, cfg):
            detections = model([image.to(device, non_blocking=True) for image in images])
        for target, det in zip(targets, detections):
            boxes = box_xyxy_to_xywh(det["boxes"].float()).tolist()  # COCO results are [x, y, w, h]
            for box, score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
                label = label_map.get(label) if label_map is not None else label
                if label is not None:
                    results.append({"image_id": target["image_id"], "category_id": label, "bbox": box, "score": score})
    gt = dataset.coco_gt()  # its category_id is the dataset's label 1..K
    stats = coco_evaluate(gt, results)  # COCO's rules: VOC's difficult objects count as plain ground truth here ...
    if isinstance(dataset, data.VocDetection):  # ... and VOC's own metric, mAP at IoU 0.5, ignores them
        stats["VOC_mAP50"] = voc_evaluate(gt, results)["mAP"]
    return stats


def train(cfg: Config):
    # DDP under torchrun: one process per GPU, RANK / WORLD_SIZE / LOCAL_RANK come from the environment.
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # rank 0 evaluates alone after each epoch while the others wait at the next collective: allow it an hour
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    main_process = rank == 0
    if device.type == "cpu" and main_process:
        warnings.warn("no CUDA device: training on the CPU, which is slow (see README, 'Training on a CPU')")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    train_set, val_set = build_datasets(cfg, train_transforms=data.RandomHorizontalFlip(cfg.hflip_prob))
    cfg.num_classes = train_set.num_classes
    fine_tune = bool(cfg.weights) and not cfg.resume  # start from --weights (a resume loads its checkpoint instead)
    if fine_tune:
        state_dict, class_names, saved = load_weights(cfg.weights)
        if saved is None and len(class_names) == 91:  # torchvision's COCO weights: their eps, saved with the config
            cfg.bn_eps = TORCHVISION_BN_EPS
    # with --weights or --resume every weight is overwritten: no ImageNet download, but the same frozen-BN model
    model = build_model(cfg, load_weights=not (cfg.weights or cfg.resume)).to(device)
    if fine_tune:
        load_matching(model, state_dict)
    model_without_ddp = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None)
    train_loader = data.make_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers, seed=cfg.seed,
                                    distributed=distributed)

    # cfg.lr for 16 images per step, scaled linearly to the real batch (the linear scaling rule)
    lr = cfg.lr * cfg.batch_size * world_size / 16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch, total_steps = len(train_loader), len(train_loader) * cfg.epochs

    def lr_factor(step):  # linear warmup from warmup_factor, then x lr_gamma at each epoch in lr_steps
        warmup = min(1.0, cfg.warmup_factor + (1 - cfg.warmup_factor) * step / max(1, cfg.warmup_iters))
        return warmup * cfg.lr_gamma ** sum(step >= s * steps_per_epoch for s in cfg.lr_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)  # stepped every iteration
    fp16 = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported(including_emulation=False)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)  # bf16 has fp32's range and needs no loss scaling

    start_epoch, best_ap = 0, -1.0
    if cfg.resume:
        checkpoint = torch.load(cfg.resume, map_location="cpu", weights_only=True)
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # {} from a run without loss scaling (CPU, bf16, --no-amp)
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, best_ap = checkpoint["epoch"] + 1, checkpoint["best_ap"]
        if not math.isclose(scheduler.base_lrs[0], lr):  # another batch size or world size: its scaled lr, warned
            if main_process:
                warnings.warn(f"--resume: lr {lr:g} for batch {cfg.batch_size} x {world_size}, not the checkpoint's "
                              f"{scheduler.base_lrs[0]:g}: continuing with {lr:g}")
            scheduler.base_lrs = [lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = lr, lr * lr_factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if checkpoint["world_size"] == world_size:  # each rank's RNG streams, else a fresh seed per rank
            set_rng_states(checkpoint["rng"][rank] if distributed else checkpoint["rng"][0], device)
    if main_process:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        print(f"training on {device} x {world_size}: {len(train_set)} images, {cfg.num_classes - 1} classes, "
              f"{cfg.epochs} epochs of {steps_per_epoch} steps, batch {cfg.batch_size} x {world_size}, lr {lr:g}")

    def log(record):  # rank 0 prints and appends to metrics.jsonl
        if main_process:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    start_time = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if distributed:
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(cfg.seed * 1000 + epoch)  # the epoch's shuffle, the same after a resume
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tic, images_seen = time.perf_counter(), 0
        for step, (images, targets) in enumerate(train_loader):
            global_step = epoch * steps_per_epoch + step
            images = [image.to(device, non_blocking=True) for image in images]
            targets = to_device(targets, device)
            with autocast(device, cfg):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            # the loss terms averaged over all ranks, for logging and so that every rank stops at the same step
            terms = torch.stack([v.detach().float() for v in loss_dict.values()])
            if distributed:
                dist.all_reduce(terms)
                terms /= world_size
            terms = dict(zip(loss_dict, terms.tolist()))
            if not all(np.isfinite(list(terms.values()))):
                raise SystemExit(f"non-finite loss at epoch {epoch} step {step} (global step {global_step}): "
                                 + ", ".join(f"{k} {v}" for k, v in terms.items())
                                 + f"; stopped, {os.path.join(cfg.out, 'last.pt')} (if it exists) holds the last "
                                 f"good epoch")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            images_seen += len(images) * world_size
            if step % cfg.log_every == 0 or step == steps_per_epoch - 1:
                elapsed = time.perf_counter() - tic
                speed = images_seen / max(elapsed, 1e-9)
                done = global_step + 1 - start_epoch * steps_per_epoch
                eta = (time.perf_counter() - start_time) / done * (total_steps - global_step - 1)
                memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                log({"epoch": epoch, "step": f"{step + 1}/{steps_per_epoch}", "loss": sum(terms.values()), **terms,
                     "lr": optimizer.param_groups[0]["lr"], "img_s": speed, "eta_min": eta / 60, "mem_gb": memory})

        # every rank's RNG state (rank 0's after its evaluation), so that a resume continues each rank's random streams
        states = [None] * world_size
        if distributed:
            dist.all_gather_object(states, rng_states(device))
        succeeded = False
        try:  # rank 0 evaluates and saves while the others wait
            if main_process:
                stats = evaluate(model_without_ddp, val_set, cfg, device)
                log({"epoch": epoch, **{k: v for k, v in stats.items() if k != "per_class"}})
                states[0] = rng_states(device)
                checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                              "best_ap": max(best_ap, stats["AP"]), "config": dataclasses.asdict(cfg),
                              "class_names": tuple(train_set.class_names), "world_size": world_size, "rng": states}
                save_checkpoint(checkpoint, os.path.join(cfg.out, "last.pt"))
                if stats["AP"] > best_ap:
                    best_ap = stats["AP"]
                    save_checkpoint(checkpoint, os.path.join(cfg.out, "best.pt"))
            succeeded = True
        finally:  # tell the others whether rank 0 got through, rather than leave them at a collective for an hour
            if distributed:
                flag = torch.tensor([float(succeeded)], device=device)
                dist.broadcast(flag, 0)
                if not main_process and flag.item() == 0:
                    raise SystemExit(f"rank {rank}: stopping, rank 0 failed to evaluate or save epoch {epoch}")
    if distributed:
        dist.destroy_process_group()
    return model_without_ddp


def build_datasets(cfg: Config, train_transforms=None):
    return data.build_datasets(cfg.data, cfg.data_root or None, cfg.train_ann or None, cfg.val_ann or None,
                               cfg.train_split, cfg.val_split, cfg.image_size, cfg.num_train, cfg.num_val, cfg.seed,
                               train_transforms=train_transforms)


def draw_targets(image, target, assignment, class_names, path):
    """--show-targets: in thin white lines the anchors the assignment marks positive, under the ground truth in its
    class colour."""
    drawn = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if len(assignment["anchors"]):
        anchors = assignment["anchors"].cpu().float()
        drawn = torchvision.utils.draw_bounding_boxes(drawn, anchors, colors="white", width=1)
    draw_boxes(drawn, target["boxes"], target["labels"], None, class_names, path, width=3)


def bench(cfg: Config, device: torch.device, steps=10):
    """Train and inference images/s and peak memory on this device, for the current config, on a synthetic batch."""
    dataset = data.SyntheticShapes(cfg.batch_size, cfg.image_size, seed=0)
    images, targets = data.collate_fn([dataset[i] for i in range(cfg.batch_size)])
    images, targets = [image.to(device) for image in images], to_device(targets, device)
    cfg.num_classes = dataset.num_classes
    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step():
        with autocast(device, cfg):
            loss = sum(model.train()(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.no_grad(), autocast(device, cfg):
            model.eval()(images)

    cuda = device.type == "cuda"
    for name, step in (("train", train_step), ("inference", infer_step)):
        step(), step()  # warm-up: cuDNN autotuning, allocator growth
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - tic) / steps
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else ""
        print(f"{name}: {len(images) / seconds:.1f} images/s ({seconds * 1000:.0f} ms per batch of {len(images)} "
              f"{cfg.image_size}-px images, min_size {cfg.min_size}, amp {cfg.amp and device.type == 'cuda'}){memory}")


# --- Main ---


def field_help() -> dict:
    """Each Config field's comment in the source, as its --help text."""
    source = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+):[^=\n]*=[^#\n]*#\s*(.*)$", source, re.MULTILINE))


def parse_args(argv=None):
    """Modes, plus one --field-name flag per Config field. Returns (args, dict of the fields given)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument("--train", action="store_true", help="train, evaluate each epoch, save into --out")
    modes.add_argument("--eval", action="store_true", help="print the 12 COCO numbers of --weights on the val split")
    modes.add_argument("--predict", metavar="IMG_OR_DIR", help="draw the detections of --weights into --out")
    modes.add_argument("--show-targets", action="store_true", help="draw ground truth and what the assignment marks")
    modes.add_argument("--bench", action="store_true", help="train / inference throughput on this device")
    helps = field_help()
    for f in dataclasses.fields(Config):
        text = f"{helps.get(f.name, '')} (default {f.default!r})".replace("%", "%%")  # argparse formats help with %
        flag, kwargs = "--" + f.name.replace("_", "-"), {"default": argparse.SUPPRESS, "help": text}
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(f.default, tuple):  # --anchor-sizes 16 32 64; nested values as literals: "(32, 40)"
            parser.add_argument(flag, nargs="*", type=ast.literal_eval, metavar="V", **kwargs)
        else:
            parser.add_argument(flag, type=type(f.default), **kwargs)
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return args, {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def make_config(given: dict, saved: dict = None, preset=True) -> Config:
    """Config defaults < SYNTHETIC_PRESET (for --data synthetic) < a checkpoint's saved config < the command line."""
    values = {}
    if preset and given.get("data", (saved or {}).get("data", Config.data)) == "synthetic":
        values.update(SYNTHETIC_PRESET)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for k, v in (saved or {}).items():
        if k in fields:  # a checkpoint of an older version may have fields this file no longer has
            values[k] = tuple(v) if isinstance(fields[k].default, tuple) else v
    values.update(given)
    return Config(**values)


def main(argv=None):
    args, given = parse_args(argv)
    saved, preset, start_weights = None, True, ""
    if args.train and given.get("resume"):  # continue with the run's config (so the same model); flags given now
        saved = torch.load(given["resume"], map_location="cpu", weights_only=True)["config"]  # still override it
    elif (args.eval or args.predict or args.show_targets) and given.get("weights"):
        state_dict, class_names, saved = load_weights(given["weights"])
        preset = saved is not None  # torchvision's weights: keep torchvision's preprocessing (800 px) and eps
        saved = saved or {"bn_eps": TORCHVISION_BN_EPS if len(class_names) == 91 else Config.bn_eps}
        start_weights = saved.pop("weights", given["weights"])  # the training run's: frozen BN or not (Backbone)
        for k in ("device", "workers", "out", "resume"):  # the training run's, not this run's
            saved.pop(k, None)
    cfg = make_config(given, saved, preset)
    if args.train:
        train(cfg)
        return
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.bench:
        bench(cfg, device)
        return
    if args.show_targets:
        train_set, _ = build_datasets(cfg)
        cfg.num_classes = train_set.num_classes  # the assignment needs no trained weights: none downloaded ...
        model = build_model(dataclasses.replace(cfg, weights=start_weights), load_weights=False).to(device).eval()
        if cfg.weights:  # ... but what it takes from the model's outputs, if anything, then comes from --weights
            load_matching(model, state_dict)
        os.makedirs(cfg.out, exist_ok=True)
        for i in range(min(8, len(train_set))):
            image, target = train_set[i]
            assignment = assignment_for_display(model, [image.to(device)], to_device([target], device))[0]
            draw_targets(image, target, assignment, train_set.class_names, os.path.join(cfg.out, f"targets_{i}.png"))
        print(f"wrote {min(8, len(train_set))} images to {cfg.out}")
        return

    # --eval and --predict: the model of the weights' training run (frozen BN if it started from pretrained weights,
    # its bn_eps), built without reading or downloading backbone weights: every weight is overwritten.
    if not cfg.weights:
        raise SystemExit("--eval and --predict need --weights PATH|torchvision")
    cfg.num_classes = len(class_names)
    model = build_model(dataclasses.replace(cfg, weights=start_weights), load_weights=False)
    model.load_state_dict(state_dict)
    model.to(device).eval()
    if args.eval:
        _, val_set = build_datasets(cfg)
        label_map = None  # identity: the model was trained on these classes
        if tuple(class_names) != tuple(val_set.class_names):  # by class name (torchvision's COCO ids -> 1..K)
            label_map = {i: val_set.class_names.index(n) for i, n in enumerate(class_names)
                         if i and n in val_set.class_names}
            unmapped = [n for n in val_set.class_names[1:] if n not in class_names[1:]]
            if unmapped:
                warnings.warn(f"--eval: no class of the model is named {', '.join(unmapped)}: nothing detected there")
        stats = evaluate(model, val_set, cfg, device, label_map)
        names = [name for name in (*COCO_METRIC_NAMES, "VOC_mAP50") if name in stats]
        print("\n".join(f"{name:>9} {stats[name]:.4f}" for name in names))
        return
    if not os.path.exists(args.predict):
        raise SystemExit(f"--predict {args.predict}: no such file or folder")
    single = os.path.isfile(args.predict)
    paths = [args.predict] if single else sorted(
        os.path.join(args.predict, f) for f in os.listdir(args.predict)
        if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")))
    inputs = {os.path.realpath(p) for p in paths}
    os.makedirs(cfg.out, exist_ok=True)
    for path in paths:
        # the input's whole name plus .png: a.jpg and a.png do not collide, and no output is named like its input
        out = os.path.join(cfg.out, os.path.basename(path) + ".png")
        if os.path.realpath(out) in inputs:
            warnings.warn(f"--predict: skipped {path}: its output {out} is one of the input images")
            continue
        try:
            image = data.load_image(path)
        except ValueError as e:  # a file given alone is an error; one bad file in a folder only a warning
            if single:
                raise SystemExit(str(e)) from None
            warnings.warn(f"--predict: skipped {e}")
            continue
        with torch.no_grad(), autocast(device, cfg):
            det = model([image.to(device)])[0]
        keep = det["scores"] >= cfg.predict_score_thresh
        draw_boxes(image, det["boxes"][keep].float(), det["labels"][keep], det["scores"][keep].float(), class_names, out)
        print(f"{path}: {int(keep.sum())} detections -> {out}")


if __name__ == "__main__":
    main()
