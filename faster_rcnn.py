"""Faster R-CNN with a ResNet-50-FPN backbone, torchvision v1 semantics.

Papers: Ren, He, Girshick, Sun, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks",
NeurIPS 2015 (https://arxiv.org/abs/1506.01497); Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017
(https://arxiv.org/abs/1612.03144).

What this file implements, in the order the data flows (torchvision/models/detection/*.py is the reference, and
test_models.py proves that this file gives torchvision's detections and losses with the same weights):
  - preprocessing inside the model: ImageNet normalisation, resize so the short side is min_size (long side at most
    max_size), zero padding of the batch to a multiple of 32; detections are mapped back to each input image's pixels;
  - backbone: a torchvision ResNet body (FrozenBatchNorm2d when starting from pretrained weights) and an FPN giving
    P2..P5 plus a max-pooled P6 ("pool"), strides 4..64, 256 channels;
  - RPN: 3 anchors per location and level (sizes 32..512 as torchvision, 16..256 by default for 320-px images: one
    per level; ratios 0.5, 1, 2), a shared 3x3 conv head, proposal selection (per-level top-k, clip, NMS 0.7 per
    level), anchor assignment (IoU 0.7 / 0.3 with low-quality matches) and balanced sampling (256 anchors, half
    positive), BCE + smooth-L1 losses;
  - RoI head: multi-scale RoIAlign 7x7 from P2..P5, two fully connected layers (1024), a class score and a
    class-specific box regression per RoI; assignment (IoU 0.5), sampling (512 RoIs, a quarter positive),
    cross-entropy + smooth-L1 losses; decoding (score > 0.05, NMS 0.5 per class, 100 detections per image).
Assignment and sampling run for the whole batch at once: ground truth is padded to [B, M] with a validity mask.

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python faster_rcnn.py --train                      # synthetic shapes, from scratch, no download; CPU: preset cpu
    python faster_rcnn.py --train --preset coco --data-root DIR     # torchvision's COCO recipe (or --data voc)
    python faster_rcnn.py --train --resume runs/faster_rcnn/last.pt # go on after Ctrl-C, SIGTERM or a crash
    python faster_rcnn.py --eval --weights torchvision --data coco --data-root DIR
    python faster_rcnn.py --predict IMG_OR_DIR --weights runs/faster_rcnn/best.pt --out DIR
    python faster_rcnn.py --show-targets --out DIR
    torchrun --nproc_per_node=8 faster_rcnn.py --train ...          # several GPUs
    python -m pytest -q test_models.py -k faster_rcnn             # parity with torchvision

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the padded batch size, L pyramid levels (5 for the RPN, 4 for RoIAlign),
    A anchors of all levels of one image, M ground-truth boxes per image (padded to the batch maximum),
    R proposals per image, P = R + M RoI candidates per image in training, S RoIs of the whole batch,
    K classes including background (num_classes), C feature channels, D detections of one image.
    Boxes are xyxy in pixels of the resized image unless a comment says otherwise.
"""
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import shlex
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, batched_nms, nms, roi_align

import data
from common import (BoxCoder, check_images, check_targets, clip_boxes_to_image, draw_boxes, elementwise_box_iou,
                    pad_targets, remove_small_boxes, resize_boxes)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python faster_rcnn.py --train), from random weights; torchvision's
    # value is in brackets where it differs. PRESETS below: torchvision's COCO recipe, and a run sized for a CPU.
    # model
    num_classes: int = 7  # K: foreground classes + 1 background; --train takes it from the data [COCO: 91]
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # torchvision ResNet body
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH to a ResNet state dict
    frozen_bn: bool = False  # FrozenBatchNorm2d, frozen early layers; make_config, unless set: on if pretrained
    trainable_backbone_layers: int = 3  # with frozen_bn: layer2..4 train, the stem and layer1 stay frozen
    bn_eps: float = 1e-5  # backbone batch-norm eps [0.0 with its v1 COCO weights]
    fpn_channels: int = 256  # C: channels of every pyramid level
    # preprocessing
    min_size: int = 320  # resize the short side to this ... [800]
    max_size: int = 320  # ... unless the long side would exceed this [1333]
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1]
    image_std: tuple = (0.229, 0.224, 0.225)
    size_divisible: int = 32  # pad the batch to a multiple of this (the coarsest backbone stride)
    # RPN
    anchor_sizes: tuple = (16, 32, 64, 128, 256)  # one anchor size per level P2..P6, pixels [32..512]
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # anchor height / width, the same at every level
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept per level before NMS (training)
    rpn_pre_nms_top_n_test: int = 1000  # ... (inference)
    rpn_post_nms_top_n_train: int = 2000  # proposals kept per image after NMS (training)
    rpn_post_nms_top_n_test: int = 1000  # ... (inference)
    rpn_nms_thresh: float = 0.7  # NMS IoU for proposals, applied per level
    rpn_score_thresh: float = 0.0  # drop proposals whose objectness probability is below this
    rpn_fg_iou_thresh: float = 0.7  # anchor IoU >= this: positive
    rpn_bg_iou_thresh: float = 0.3  # anchor IoU < this: negative; in between: ignored
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    rpn_positive_fraction: float = 0.5  # at most this fraction of them positive
    # RoI head
    roi_output_size: int = 7  # RoIAlign output is roi_output_size x roi_output_size
    roi_sampling_ratio: int = 2  # RoIAlign sampling points per bin and axis
    representation_size: int = 1024  # width of the two fully connected layers (TwoMLPHead)
    box_fg_iou_thresh: float = 0.5  # proposal IoU >= this: foreground
    box_bg_iou_thresh: float = 0.5  # proposal IoU < this: background
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the RoI head loss
    box_positive_fraction: float = 0.25  # at most this fraction of them foreground
    bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)  # box coder weights (dx, dy, dw, dh) of the RoI head
    # decoding
    box_score_thresh: float = 0.05  # keep detections with a class probability above this
    box_nms_thresh: float = 0.5  # NMS IoU, applied per class
    box_detections_per_img: int = 100  # detections kept per image
    # data (data.build_datasets)
    data: Literal["synthetic", "coco", "voc"] = "synthetic"  # coco: images in the folder named as the json, ...
    data_root: str = ""  # dataset folder for coco / voc (coco images: ... else in JPEGImages/ or images/)
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 320  # synthetic: image side in pixels
    num_train: int = 10000  # synthetic: training images
    num_val: int = 500  # synthetic: validation images
    hflip_prob: float = 0.5  # training augmentation: horizontal flip probability
    # training (torchvision's recipe: 26 epochs of 16 images per step, lr 0.02 with steps at 16 and 22)
    epochs: int = 6  # passes over the training set [26]
    batch_size: int = 16  # images per step and per process [2 per GPU x 8 GPUs]
    lr: float = 0.02  # learning rate for 16 images per step, scaled linearly to batch_size x processes
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw (lr ~1e-3): faster from scratch on little data (cpu preset)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 on all trained parameters
    lr_steps: tuple = (4, 5)  # epochs at which the lr is multiplied by lr_gamma [16, 22]
    lr_gamma: float = 0.1  # lr decay factor
    warmup_iters: int = 300  # steps of linear warmup at the start, at most a third of the run [1000]
    warmup_factor: float = 0.001  # the warmup starts at lr x this
    accumulate: int = 1  # batches per optimiser step (gradient accumulation)
    ema_decay: float = 0.0  # evaluate and save an exponential moving average of the weights (0: off)
    clip_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = False  # convolutions in channels-last memory layout (faster for some: GPU AMP, SSD on a CPU)
    # run
    workers: int = 4  # DataLoader worker processes
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds the data order, the augmentation, the model's sampling and the synthetic data
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/faster_rcnn"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # torchvision (COCO) | PATH to a checkpoint or torchvision state dict: start from / evaluate
    draw_thresh: float = 0.5  # --predict draws detections scoring at least this


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # under 15 minutes on 2 CPU cores (AVX2): ResNet-18 from scratch on 1,100 128-px images, a smaller FPN and box
    # head, fewer RoIs, AdamW
    "cpu": dict(backbone="resnet18", fpn_channels=64, representation_size=256, image_size=128, min_size=128,
                max_size=128, num_train=1100, num_val=200, batch_size=8, epochs=5, optimizer="adamw", lr=1e-3,
                lr_steps=(4,), warmup_iters=100, rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                rpn_post_nms_top_n_train=500, box_batch_size_per_image=128, workers=1),
    # torchvision's COCO recipe (ImageNet backbone, 800 px, 26 epochs of 2 images x 8 GPUs)
    "coco": dict(data="coco", backbone_weights="imagenet", min_size=800, max_size=1333,
                 anchor_sizes=(32, 64, 128, 256, 512), epochs=26, batch_size=2, lr_steps=(16, 22), warmup_iters=1000),
}
# torchvision's fasterrcnn_resnet50_fpn: its model and preprocessing, for --weights torchvision or its state dicts
TORCHVISION_CONFIG = dict(backbone="resnet50", fpn_channels=256, representation_size=1024, min_size=800, max_size=1333,
                          anchor_sizes=(32, 64, 128, 256, 512), frozen_bn=True, bn_eps=0.0)


# --- Model ---


def preprocess(images: list, targets, cfg: Config):
    """Normalise, resize and pad a list of [3, h_i, w_i] images in [0, 1] (torchvision's GeneralizedRCNNTransform).
    Returns the batch [B, 3, H, W], image_sizes [(h, w)] after resizing (before padding), and targets with their boxes
    resized (a copy; None stays None)."""
    check_images(images)  # float [3, h, w]; mean and std take their dtype (a model cast to bf16 runs on bf16 images)
    # (non_blocking: a blocking copy to a GPU would first wait for all the work queued on it)
    mean = torch.tensor(cfg.image_mean, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    resized, new_targets = [], []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        # the size torchvision's scale gives (F.interpolate's recompute_scale_factor): the same pixels; here >= 1
        scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))  # (a 1 x 2000 image: 0.6 rows there, 1 here)
        size = [max(int(h * scale), 1), max(int(w * scale), 1)]
        image = F.interpolate(((image - mean) / std)[None], size, mode="bilinear", align_corners=False)[0]  # [3, *size]
        resized.append(image)
        if targets is not None:
            new_targets.append({**targets[i], "boxes": resize_boxes(targets[i]["boxes"], (h, w), image.shape[-2:])})
    image_sizes = [tuple(image.shape[-2:]) for image in resized]
    stride = cfg.size_divisible
    H = int(math.ceil(max(s[0] for s in image_sizes) / stride) * stride)
    W = int(math.ceil(max(s[1] for s in image_sizes) / stride) * stride)
    batch = resized[0].new_zeros(len(resized), 3, H, W)  # [B, 3, H, W]
    for i, image in enumerate(resized):  # (indexed, not views of unbind: images may require grad)
        batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
    return batch, image_sizes, (new_targets if targets is not None else None)


class FPN(nn.Module):
    """Feature Pyramid Network: lateral 1x1 convs (inner_blocks), top-down nearest-neighbour upsampling and addition,
    3x3 output convs (layer_blocks), and P6 by subsampling P5 (torchvision's LastLevelMaxPool, level "pool")."""

    def __init__(self, in_channels_list: list, out_channels: int):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list) -> list:
        """[C2, C3, C4, C5] [B, C_l, H/s, W/s], s = 4..32 -> [P2, P3, P4, P5, P6] [B, C, H/s, W/s], s = 4..64."""
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))  # P6: every other pixel of P5
        return results


class Backbone(nn.Module):
    """torchvision ResNet body (stem, layer1..4; no pooling or fc) followed by the FPN."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        # frozen_bn, as torchvision when it starts from pretrained weights (ImageNet's or a whole detector's): batch
        # norm with fixed statistics and affine, and the early layers frozen, since detection batches are too small for
        # batch statistics. From scratch: ordinary batch norm, every layer trained.
        norm_layer = functools.partial(FrozenBatchNorm2d if cfg.frozen_bn else nn.BatchNorm2d, eps=cfg.bn_eps)
        # load_backbone=False: the caller then loads every weight (--weights, --resume, --eval): nothing is read
        weights = "IMAGENET1K_V1" if cfg.backbone_weights == "imagenet" and load_backbone else None
        body = getattr(torchvision.models, cfg.backbone)(weights=weights, norm_layer=norm_layer)
        if cfg.backbone_weights not in ("imagenet", "none") and load_backbone:
            data.load_backbone_weights(body, cfg.backbone_weights)
        del body.avgpool, body.fc
        trainable = cfg.trainable_backbone_layers if cfg.frozen_bn else 5
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: trainable + (trainable == 5)]
        for name, parameter in body.named_parameters():
            parameter.requires_grad_(any(name.startswith(layer) for layer in layers_to_train))
        self.body = body
        in_channels = [body.inplanes // 8 * 2**i for i in range(4)]  # resnet50: 256..2048; resnet18/34: 64..512
        self.fpn = FPN(in_channels, cfg.fpn_channels)

    def forward(self, images: Tensor) -> list:
        """[B, 3, H, W] -> L = 5 maps [B, C, H/s, W/s], s = 4, 8, 16, 32, 64."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))  # [B, 64, H/4, W/4]
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return self.fpn([c2, c3, c4, c5])


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then per anchor one objectness logit and four box deltas."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in self.children():
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: list):
        """L maps [B, C, H_l, W_l] -> objectness [B, A], bbox_regression [B, A, 4]; anchors ordered level, y, x,
        anchor shape (as make_anchors)."""
        objectness, bbox_regression = [], []
        for feature in features:
            t = F.relu(self.conv(feature))
            B, _, H, W = t.shape
            logits = self.cls_logits(t)  # [B, A_loc, H_l, W_l]
            objectness.append(logits.permute(0, 2, 3, 1).reshape(B, -1))  # [B, H_l * W_l * A_loc]
            deltas = self.bbox_pred(t).view(B, -1, 4, H, W)  # [B, A_loc, 4, H_l, W_l]
            bbox_regression.append(deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4))  # [B, H_l * W_l * A_loc, 4]
        return torch.cat(objectness, 1), torch.cat(bbox_regression, 1)  # [B, A], [B, A, 4]


class TwoMLPHead(nn.Module):
    """The FPN box head: flatten the pooled RoI features, two fully connected layers with ReLU."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        """[S, C, 7, 7] -> [S, representation_size]."""
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """Per RoI: K class logits and K class-specific boxes (4 deltas each)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor):
        """[S, representation_size] -> cls_logits [S, K], bbox_regression [S, K * 4]."""
        return self.cls_score(x), self.bbox_pred(x)


def make_anchors(image_size, grid_sizes: list, cfg: Config, device=None):
    """Anchors of all levels, the same for every image of the batch. image_size: padded (H, W); grid_sizes: L sizes
    (H_l, W_l) of the feature maps. Returns anchors [A, 4] xyxy ordered level, y, x, anchor shape, and the count per
    level.
    Matches torchvision's AnchorGenerator: zero-centred cell anchors are rounded to integers, the stride is
    H // H_l, and anchor centres sit at x * stride (the top-left corner of a cell, not its centre)."""
    anchors, num_anchors_per_level = [], []
    for (H_l, W_l), size in zip(grid_sizes, cfg.anchor_sizes):
        h_ratios = torch.sqrt(torch.tensor(cfg.aspect_ratios).to(device, non_blocking=True))  # sqrt(height / width)
        ws, hs = (1 / h_ratios) * size, h_ratios * size  # area size ** 2 for every ratio; torchvision's arithmetic
        cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [A_loc, 4]
        # torchvision's stride is H // H_l: for P6 of a padded size that is an odd multiple of 32 it is not 64
        stride_y, stride_x = image_size[0] // H_l, image_size[1] // W_l
        shift_y, shift_x = torch.meshgrid(torch.arange(H_l, device=device) * stride_y,
                                          torch.arange(W_l, device=device) * stride_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)  # [H_l * W_l, 1, 4]
        anchors.append((shifts + cell[None]).reshape(-1, 4))  # [H_l * W_l * A_loc, 4]
        num_anchors_per_level.append(anchors[-1].shape[0])
    return torch.cat(anchors), num_anchors_per_level


def select_proposals(proposals: Tensor, objectness: Tensor, num_anchors_per_level: list, image_sizes: list,
                     cfg: Config, training: bool) -> list:
    """The RPN's outputs -> proposals (torchvision's filter_proposals). proposals [B, A, 4] decoded boxes;
    objectness [B, A] logits. Keeps the top pre_nms_top_n per level, clips to the image, drops boxes smaller than
    1e-3 and scores below rpn_score_thresh, NMS per level, then the best post_nms_top_n. Returns B x [R_i, 4]."""
    pre_nms_top_n = cfg.rpn_pre_nms_top_n_train if training else cfg.rpn_pre_nms_top_n_test
    post_nms_top_n = cfg.rpn_post_nms_top_n_train if training else cfg.rpn_post_nms_top_n_test
    top_idx, levels, counts, offset = [], [], [], 0
    for level, scores_per_level in enumerate(objectness.split(num_anchors_per_level, dim=1)):
        counts.append(min(pre_nms_top_n, scores_per_level.shape[1]))
        top_idx.append(scores_per_level.topk(counts[-1], dim=1).indices + offset)  # [B, k]
        levels.append(torch.full((counts[-1],), level, device=objectness.device))
        offset += scores_per_level.shape[1]
    top_idx, levels = torch.cat(top_idx, dim=1), torch.cat(levels)  # [B, N], [N]
    starts = [sum(counts[:level]) for level in range(len(counts))]  # where each level's candidates begin
    scores = objectness.gather(1, top_idx).sigmoid()  # [B, N]
    boxes = proposals.gather(1, top_idx[..., None].expand(-1, -1, 4))  # [B, N, 4]

    final_boxes = []
    for boxes_i, scores_i, size in zip(boxes, scores, image_sizes):
        boxes_i = clip_boxes_to_image(boxes_i, size)
        valid = ((boxes_i[:, 2:] - boxes_i[:, :2] >= 1e-3).all(1)  # not smaller than 1e-3 (remove_small_boxes)
                 & (scores_i >= cfg.rpn_score_thresh))  # [N]
        if 4 * int(valid.sum()) <= (4000 if boxes_i.device.type == "cpu" else 20000):  # as torchvision's batched_nms:
            keep = torch.where(valid)[0]  # few boxes: one NMS, the levels' boxes moved apart
            keep = keep[batched_nms(boxes_i[keep], scores_i[keep], levels[keep], cfg.rpn_nms_thresh)]
        else:  # many: NMS level by level, on each level's slice, the boxes to drop scored -inf (last in their NMS,
            kept = torch.zeros_like(valid)  # they suppress no kept box) and dropped after it: one wait, not one a level
            for start, boxes_l, scores_l in zip(starts, boxes_i.split(counts),
                                                scores_i.masked_fill(~valid, -math.inf).split(counts)):
                kept[nms(boxes_l, scores_l, cfg.rpn_nms_thresh) + start] = True
            keep = torch.where(kept & valid)[0]  # in index order, then by score: torchvision's order, ties too
            keep = keep[scores_i[keep].sort(descending=True)[1]]
        final_boxes.append(boxes_i[keep[:post_nms_top_n]])  # [R_i, 4], by decreasing score
    return final_boxes


def multiscale_roi_align(features: list, rois: Tensor, image_idx: Tensor, strides: list, cfg: Config) -> Tensor:
    """RoIAlign of each RoI from one pyramid level, chosen by its size (FPN paper eq. 1, torchvision's
    MultiScaleRoIAlign/LevelMapper): level = floor(4 + log2(sqrt(area) / 224) + 1e-6), clamped to the available levels.
    features: L maps [B, C, H/s, W/s] with strides s; rois [S, 4] xyxy; image_idx [S] -> [S, C, 7, 7]."""
    k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    sizes = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))  # [S]
    levels = torch.floor(4 + torch.log2(sizes / 224) + torch.tensor(1e-6, dtype=sizes.dtype))
    levels = levels.clamp(min=k_min, max=k_max).to(torch.int64) - k_min  # [S] index into features
    rois = torch.cat([image_idx[:, None].to(rois.dtype), rois], dim=1)  # [S, 5]: image index, x1, y1, x2, y2
    out = rois.new_zeros(len(rois), features[0].shape[1], cfg.roi_output_size, cfg.roi_output_size)  # [S, C, 7, 7]
    for level, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.where(levels == level)[0]
        out[idx] = roi_align(feature, rois[idx], cfg.roi_output_size, spatial_scale=1.0 / stride,
                             sampling_ratio=cfg.roi_sampling_ratio).to(out.dtype)
    return out


class FasterRCNN(nn.Module):
    """model.train(): model(images, targets) -> dict of losses; model.eval(): model(images) -> list of
    {"boxes" [D, 4] xyxy in input pixels, "scores" [D], "labels" [D]}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_backbone)
        self.rpn_head = RPNHead(cfg.fpn_channels, len(cfg.aspect_ratios))
        self.box_head = TwoMLPHead(cfg.fpn_channels * cfg.roi_output_size**2, cfg.representation_size)
        self.box_predictor = FastRCNNPredictor(cfg.representation_size, cfg.num_classes)
        self.rpn_box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.box_coder = BoxCoder(weights=cfg.bbox_reg_weights)
        self.strides = [4, 8, 16, 32, 64]  # of P2..P6; RoIAlign uses the first four

    def forward(self, images: list, targets: list = None):
        if self.training:
            check_targets(images, targets, "FasterRCNN")
        cfg = self.cfg
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, image_sizes, targets = preprocess(images, targets, cfg)  # [B, 3, H, W]
        features, objectness, rpn_bbox_regression, anchors, proposals = self.rpn(batch, image_sizes, self.training)

        if self.training:
            gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [B, M, 4], [B, M], [B, M]
            matched_idxs = assign_anchors(anchors, gt_boxes, gt_valid, cfg)  # [B, A]
            rpn_losses = rpn_loss(objectness, rpn_bbox_regression, anchors, matched_idxs, gt_boxes,
                                  self.rpn_box_coder, cfg)
            rois, image_idx, labels, regression_targets = sample_proposals(proposals, gt_boxes, gt_labels, gt_valid,
                                                                           self.box_coder, cfg)  # [S, 4], [S] ...
            cls_logits, bbox_regression = self.roi_forward(features, rois, image_idx)  # [S, K], [S, K * 4]
            return {**roi_loss(cls_logits, bbox_regression, labels, regression_targets), **rpn_losses}

        rois = torch.cat(proposals)  # [S, 4]
        image_idx = torch.cat([torch.full((len(p),), i, device=rois.device) for i, p in enumerate(proposals)])  # [S]
        cls_logits, bbox_regression = self.roi_forward(features, rois, image_idx)
        detections = postprocess_detections(cls_logits, bbox_regression, rois, [len(p) for p in proposals],
                                            image_sizes, self.box_coder, cfg)
        for det, size, original_size in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original_size)  # back to the input image's pixels
        return detections

    def rpn(self, batch: Tensor, image_sizes: list, training: bool):
        """The backbone and the region proposal network on the padded batch [B, 3, H, W]: features (L maps), objectness
        [B, A] logits, rpn_bbox_regression [B, A, 4], anchors [A, 4] and the proposals, B x [R_i, 4]."""
        features = self.backbone(batch)  # L = 5 maps [B, C, H/s, W/s]
        # float32 from the heads on, also under autocast: bf16 would round box coordinates to 4-8 px
        objectness, rpn_bbox_regression = [x.float() for x in self.rpn_head(features)]  # [B, A], [B, A, 4]
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, num_anchors_per_level = make_anchors(batch.shape[-2:], grid_sizes, self.cfg, batch.device)  # [A, 4]
        # approximate joint training (paper section 3.2): no gradient flows through the proposals' coordinates
        proposals = self.rpn_box_coder.decode(rpn_bbox_regression.detach(), anchors)  # [B, A, 4]
        proposals = select_proposals(proposals, objectness.detach(), num_anchors_per_level, image_sizes, self.cfg,
                                     training)  # B x [R_i, 4]
        return features, objectness, rpn_bbox_regression, anchors, proposals

    def roi_forward(self, features: list, rois: Tensor, image_idx: Tensor):
        """RoI features from P2..P5 -> cls_logits [S, K], bbox_regression [S, K * 4]."""
        box_features = multiscale_roi_align(features[:4], rois, image_idx, self.strides[:4], self.cfg)
        return [x.float() for x in self.box_predictor(self.box_head(box_features))]


TORCHVISION_WEIGHTS = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1  # --weights torchvision


def convert_torchvision(state_dict: dict) -> dict:
    """A torchvision fasterrcnn_resnet50_fpn state dict (any num_classes; old and new key versions) -> this file's
    FasterRCNN state dict. Our names are torchvision's without the wrapper modules."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.").replace("rpn.head.", "rpn_head.")
        key = key.replace("roi_heads.box_head.", "box_head.").replace("roi_heads.box_predictor.", "box_predictor.")
        out[key] = value
    return out


def reference_weights(weights: str, state_dict: dict = None):
    """--weights torchvision (its COCO weights, downloaded) or a file of torchvision's fasterrcnn_resnet50_fpn state
    dict -> (this file's state dict, class names, TORCHVISION_CONFIG: the settings that model was built with). K is
    read from its classifier [K, 1024]; the class names are COCO's for K = 91, else numbers."""
    if state_dict is None and weights != "torchvision":
        raise SystemExit(f"--weights {weights}: {'not a checkpoint' if os.path.exists(weights) else 'no such file'} "
                         "(--weights torchvision: torchvision's COCO weights)")
    try:
        state_dict = convert_torchvision(state_dict or TORCHVISION_WEIGHTS.get_state_dict(progress=True))
    except OSError as e:  # no internet
        raise SystemExit(f"--weights torchvision: cannot download {TORCHVISION_WEIGHTS.url} ({e})") from None
    if "box_predictor.cls_score.weight" not in state_dict:  # e.g. another detector's state dict
        raise SystemExit(f"--weights {weights}: neither a checkpoint of faster_rcnn.py nor a fasterrcnn_resnet50_fpn "
                         "state dict")
    K = state_dict["box_predictor.cls_score.weight"].shape[0]
    names = TORCHVISION_WEIGHTS.meta["categories"] if K == 91 else ["__background__", *map(str, range(1, K))]
    return state_dict, tuple(names), TORCHVISION_CONFIG


# --- Targets ---

BELOW_LOW_THRESHOLD = -1  # matched_idxs value: background (IoU below the low threshold with every ground-truth box)
BETWEEN_THRESHOLDS = -2  # matched_idxs value: ignored (best IoU between the two thresholds)


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
    """anchors [A, 4], gt_boxes [B, M, 4], gt_valid [B, M] -> matched_idxs [B, A] (IoU 0.7 / 0.3, low-quality
    matches allowed)."""
    iou = elementwise_box_iou(gt_boxes[:, :, None, :], anchors[None, None])  # [B, M, A]
    return match(iou, gt_valid, cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, allow_low_quality_matches=True)


@torch.no_grad()
def assign_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, cfg: Config):
    """proposals [B, P, 4], gt_boxes [B, M, 4], gt_labels [B, M], gt_valid [B, M] -> matched_idxs [B, P] and
    labels [B, P]: the matched class, 0 for background, -1 for ignored (IoU 0.5 / 0.5, no low-quality matches)."""
    iou = elementwise_box_iou(gt_boxes[:, :, None, :], proposals[:, None, :, :])  # [B, M, P]
    matched_idxs = match(iou, gt_valid, cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, allow_low_quality_matches=False)
    labels = gt_labels.gather(1, matched_idxs.clamp(min=0))  # [B, P]
    labels[matched_idxs == BELOW_LOW_THRESHOLD] = 0
    labels[matched_idxs == BETWEEN_THRESHOLDS] = -1
    return matched_idxs, labels


def random_subset(mask: Tensor, counts: Tensor) -> Tensor:
    """mask [B, N] candidates, counts [B] -> [B, N] a uniformly random choice of counts[b] candidates of row b.
    Candidates get random keys in [0, 1), others -1; the top counts[b] keys of each row are the choice. When counts
    equals the number of candidates every candidate is chosen, whatever the random numbers."""
    k = int(counts.max()) if counts.numel() else 0
    if k == 0:
        return torch.zeros_like(mask)
    keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)  # [B, N]
    top = keys.topk(k, dim=1).indices  # [B, k]
    chosen = torch.arange(k, device=mask.device)[None] < counts[:, None]  # [B, k]
    return torch.zeros_like(mask).scatter(1, top, chosen)


@torch.no_grad()
def sample_balanced(labels: Tensor, batch_size_per_image: int, positive_fraction: float):
    """labels [B, N]: > 0 positive, 0 negative, < 0 ignored -> pos_mask, neg_mask [B, N]: per image at most
    batch_size_per_image * positive_fraction positives, negatives filling the rest (torchvision's
    BalancedPositiveNegativeSampler)."""
    positive, negative = labels > 0, labels == 0
    num_pos = positive.sum(1).clamp(max=int(batch_size_per_image * positive_fraction))  # [B]
    num_neg = torch.minimum(negative.sum(1), batch_size_per_image - num_pos)  # [B]
    return random_subset(positive, num_pos), random_subset(negative, num_neg)


@torch.no_grad()
def sample_proposals(proposals: list, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, box_coder: BoxCoder,
                     cfg: Config):
    """Training RoIs for the RoI head (torchvision's select_training_samples). proposals: B x [R_i, 4]; ground truth
    padded [B, M, ...]. The ground-truth boxes join the proposals, the candidates are assigned and sampled, and the
    chosen ones are returned flat, image by image: rois [S, 4], image_idx [S], labels [S], regression_targets [S, 4]."""
    B, R = len(proposals), max(len(p) for p in proposals)
    padded = gt_boxes.new_zeros(B, R, 4)
    proposal_valid = torch.zeros(B, R, dtype=torch.bool, device=gt_boxes.device)
    for i, p in enumerate(proposals):
        padded[i, : len(p)], proposal_valid[i, : len(p)] = p, True
    candidates = torch.cat([padded, gt_boxes], dim=1)  # [B, P, 4], P = R + M
    valid = torch.cat([proposal_valid, gt_valid], dim=1)  # [B, P]
    matched_idxs, labels = assign_proposals(candidates, gt_boxes, gt_labels, gt_valid, cfg)  # [B, P], [B, P]
    labels[~valid] = -1  # padding is never sampled
    pos_mask, neg_mask = sample_balanced(labels, cfg.box_batch_size_per_image, cfg.box_positive_fraction)
    keep = pos_mask | neg_mask  # [B, P]
    image_idx = torch.arange(B, device=keep.device)[:, None].expand(B, keep.shape[1])[keep]  # [S]
    matched_gt_boxes = gt_boxes[image_idx, matched_idxs[keep].clamp(min=0)]  # [S, 4]
    rois = candidates[keep]  # [S, 4]
    labels = labels[keep]  # [S]
    # background RoIs get a target too (unused by the loss); encode a copy of the RoI there so it stays finite
    matched_gt_boxes = torch.where((labels > 0)[:, None], matched_gt_boxes, rois)
    return rois, image_idx, labels, box_coder.encode(matched_gt_boxes, rois)


# --- Loss ---


def rpn_loss(objectness: Tensor, bbox_regression: Tensor, anchors: Tensor, matched_idxs: Tensor, gt_boxes: Tensor,
             box_coder: BoxCoder, cfg: Config) -> dict:
    """objectness [B, A] logits, bbox_regression [B, A, 4], anchors [A, 4], matched_idxs [B, A], gt_boxes [B, M, 4].
    Samples rpn_batch_size_per_image anchors per image; BCE on their objectness, smooth-L1 (beta 1/9) on the positives'
    deltas; both summed and divided by the number of sampled anchors (torchvision's normalisation; the paper divides
    the box term by the number of anchor locations and weights it by 10, section 3.1.2)."""
    labels = (matched_idxs >= 0).float().masked_fill(matched_idxs == BETWEEN_THRESHOLDS, -1.0)  # [B, A]: 1 / 0 / -1
    pos_mask, neg_mask = sample_balanced(labels, cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
    sampled = pos_mask | neg_mask  # [B, A]
    num_sampled = max(1, int(sampled.sum()))
    image_idx, anchor_idx = torch.where(pos_mask)  # [num_foreground] each
    target_regression = box_coder.encode(gt_boxes[image_idx, matched_idxs[image_idx, anchor_idx]], anchors[anchor_idx])
    box_loss = F.smooth_l1_loss(bbox_regression[image_idx, anchor_idx], target_regression, beta=1 / 9, reduction="sum")
    objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
    return {"loss_objectness": objectness_loss / num_sampled, "loss_rpn_box_reg": box_loss / num_sampled}


def roi_loss(cls_logits: Tensor, bbox_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> dict:
    """cls_logits [S, K], bbox_regression [S, K * 4], labels [S], regression_targets [S, 4]: cross-entropy over all
    sampled RoIs, smooth-L1 (beta 1/9) on the deltas of the ground-truth class of foreground RoIs; both divided by
    the number of sampled RoIs (torchvision's fastrcnn_loss)."""
    num_sampled = max(1, labels.numel())
    classification_loss = F.cross_entropy(cls_logits, labels, reduction="sum") / num_sampled
    pos = torch.where(labels > 0)[0]  # [num_foreground]
    bbox_regression = bbox_regression.reshape(len(labels), -1, 4)  # [S, K, 4]
    box_loss = F.smooth_l1_loss(bbox_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9,
                                reduction="sum")
    return {"loss_classifier": classification_loss, "loss_box_reg": box_loss / num_sampled}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_logits: Tensor, bbox_regression: Tensor, rois: Tensor, num_rois_per_image: list,
                           image_sizes: list, box_coder: BoxCoder, cfg: Config) -> list:
    """cls_logits [S, K], bbox_regression [S, K * 4], rois [S, 4] (image by image) -> B dicts with boxes [D, 4] (in the
    resized image), scores [D], labels [D]. Every (RoI, foreground class) pair is a candidate: softmax score >
    box_score_thresh, box larger than 1e-2, NMS per class, the best box_detections_per_img."""
    K = cls_logits.shape[-1]
    boxes = box_coder.decode(bbox_regression, rois).reshape(len(rois), K, 4)  # [S, K, 4]
    scores = F.softmax(cls_logits, -1)  # [S, K]
    detections = []
    for boxes_i, scores_i, size in zip(boxes.split(num_rois_per_image), scores.split(num_rois_per_image), image_sizes):
        boxes_i = clip_boxes_to_image(boxes_i, size)
        labels_i = torch.arange(K, device=boxes_i.device).expand_as(scores_i)  # [S_i, K]
        # drop the background column, then one candidate per (RoI, class)
        boxes_i = boxes_i[:, 1:].reshape(-1, 4)  # [S_i * (K - 1), 4]
        scores_i, labels_i = scores_i[:, 1:].reshape(-1), labels_i[:, 1:].reshape(-1)  # [S_i * (K - 1)]
        keep = torch.where(scores_i > cfg.box_score_thresh)[0]
        keep = keep[remove_small_boxes(boxes_i[keep], 1e-2)]
        keep = keep[batched_nms(boxes_i[keep], scores_i[keep], labels_i[keep], cfg.box_nms_thresh)]
        keep = keep[: cfg.box_detections_per_img]
        detections.append({"boxes": boxes_i[keep], "scores": scores_i[keep], "labels": labels_i[keep]})
    return detections


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = FasterRCNN  # the class the template builds, trains, evaluates and saves
PREDICT = {}  # --predict's Config values where no flag sets them (yolo.py: detect.py's); none here


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """torchvision's recipe: SGD with momentum (or AdamW) and weight decay, cfg.lr for 16 images scaled linearly to the
    global batch, a linear warmup (at most a third of the run), x lr_gamma at each of lr_steps. The global batch
    counts --accumulate's batches too: SGD's step grows with their summed gradients, AdamW's, scale-free, by the lr."""
    images = cfg.batch_size * world_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)
    params, lr = [p for p in model.parameters() if p.requires_grad], cfg.lr * images / 16
    optimizer = (torch.optim.SGD(params, lr, cfg.momentum, weight_decay=cfg.weight_decay, fused=params[0].is_cuda)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr, weight_decay=cfg.weight_decay))
    warmup = data.warmup_steps(cfg, steps_per_epoch)  # (warns if shortened, or if no lr step falls within the run)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup if step < warmup else 1.0) * cfg.lr_gamma ** sum(
        step >= epoch * steps_per_epoch for epoch in cfg.lr_steps))


def train_transforms(cfg: Config):
    return data.RandomHorizontalFlip(cfg.hflip_prob)  # torchvision's detection recipe: flips only


@torch.no_grad()
def draw_targets(model: FasterRCNN, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the ground truth (class colours) over what the two assignments mark: the RPN's positive anchors
    (white) and the RoIs the RoI head would train on, foreground blue and background red (as many background as
    foreground RoIs: the hundreds sampled would hide the image)."""
    batch, image_sizes, targets = preprocess([image], [target], model.cfg)
    _, _, _, anchors, proposals = model.rpn(batch, image_sizes, training=True)
    gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [1, M, 4], [1, M], [1, M]
    positive = assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0] >= 0  # [A]
    rois, _, labels, _ = sample_proposals(proposals, gt_boxes, gt_labels, gt_valid, model.box_coder, model.cfg)
    drawn = image
    for boxes, colour in ((anchors[positive], (255, 255, 255)), (rois[labels == 0][:int((labels > 0).sum())],
                                                                 (255, 0, 0)), (rois[labels > 0], (0, 0, 255))):
        drawn = draw_boxes(drawn, resize_boxes(boxes, image_sizes[0], image.shape[-2:]), color=colour, width=1)
    draw_boxes(drawn, target["boxes"], target["labels"], None, class_names, path, width=3)


# TRY NOT TO MODIFY: from here to the end of the file, the same in every model file

def load_weights(weights: str, flag: str = "--weights"):
    """--weights PATH (a checkpoint of this file, or the reference implementation's weights) or a name (torchvision)
    -> (state dict, class names, the config they go with: the training run's, or the reference model's). flag
    "--resume": a checkpoint of this file only."""
    checkpoint = data.load_checkpoint(weights, flag)  # None: no such file, a name, or not a state dict
    if checkpoint is None or "detector" not in checkpoint:  # not written by a model file: the reference's weights?
        return reference_weights(weights, checkpoint)  # (it says what it cannot read)
    if checkpoint["detector"] != DETECTOR.__name__:
        raise SystemExit(f"{flag} {weights}: a {checkpoint['detector']} checkpoint: use {checkpoint['file']}")
    return checkpoint["model"], tuple(checkpoint["class_names"]), checkpoint["config"]


def load_state(model: nn.Module, state_dict: dict, source: str, fine_tune: bool = False):
    """model.load_state_dict, stopping with one line when they do not fit. fine_tune: entries that differ in their
    first dimension only (the class layers' outputs, of another class count) stay at their initialisation."""
    own = model.state_dict()
    other = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = model.load_state_dict({k: v for k, v in state_dict.items() if k not in other}, strict=False)
    if wrong := ([f"missing {k}" for k in missing if k not in other] + [f"unexpected {k}" for k in unexpected]
                 + [f"{k} of shape {tuple(state_dict[k].shape)}" for k in other
                    if not fine_tune or own[k].shape[1:] != state_dict[k].shape[1:]]):
        raise SystemExit(f"{source} does not fit this {DETECTOR.__name__}: {len(wrong)} keys ({', '.join(wrong[:3])})")
    if other and int(os.environ.get("RANK", 0)) == 0:
        print(f"{source}: left at their initialisation (another shape, e.g. class count): {', '.join(other)}")


@data.restores_signals  # Ctrl-C and SIGTERM as train() found them when it returns, stops or fails (in a notebook)
def train(cfg: Config):
    # DDP under torchrun (one process per GPU): all its state is decided here, as in nanoGPT's train.py
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp, main_process = world_size > 1, rank == 0
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ddp:  # rank 0 evaluates alone after each epoch (R-CNN: fits its SVMs) while the others wait: allow it hours
        if device.type == "cuda":
            torch.cuda.set_device(device := torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    # AMP as nanoGPT, for training steps (evaluation is fp32): bf16 where the GPU has it, else fp16 with loss scaling
    dtype = torch.float32 if device.type != "cuda" or not cfg.amp else (
        torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16)
    ctx = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.backends.cudnn.benchmark = cfg.data == "synthetic"  # one input size: cuDNN picks its fastest kernels once
    data.check_out_folder(cfg.out, cfg.resume)  # a run's last.pt is never replaced by another run's
    train_set, val_set = data.build_datasets(cfg, train_transforms(cfg))
    cfg = dataclasses.replace(cfg, num_classes=train_set.num_classes)  # K comes from the data
    resume = data.load_checkpoint(cfg.resume, "--resume") if cfg.resume else None
    data.seed_everything(cfg.seed)  # the initial weights: the same on every rank
    try:  # with --weights or --resume every weight is overwritten: no backbone weights are read
        model = raw_model = DETECTOR(cfg, load_backbone=not (cfg.weights or resume)).to(device)
    except OSError as e:  # no internet for the ImageNet weights
        raise SystemExit(f"--backbone-weights {cfg.backbone_weights}: cannot load them ({e}); to train from random "
                         f"weights instead: --backbone-weights none") from None
    if cfg.weights and not resume:  # fine-tuning: class layers of another class count start afresh, others fit
        state_dict, class_names = load_weights(cfg.weights)[:2]
        load_state(model, state_dict, f"--weights {cfg.weights}", fine_tune=True)
        data.warn_other_classes(class_names, train_set.class_names, f"--weights {cfg.weights}")
    cfg.channels_last and raw_model.to(memory_format=torch.channels_last)
    steps = data.steps_per_epoch(train_set, cfg.batch_size, world_size)
    optimizer, scheduler = make_optimizer(raw_model, cfg, steps, world_size, train_set)  # (YOLOv5: AutoAnchor too)
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # stepped per batch, also
    # between --accumulate's optimizer steps, as the lr follows the batches: torch would warn at the first
    ema = copy.deepcopy(raw_model).requires_grad_(False) if cfg.ema_decay else None  # then evaluated and saved
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, [device.index] if device.type == "cuda" else None)
    epoch, step, best = 0, 0, {"AP": -math.inf}
    if resume:
        data.check_resume(resume, cfg.resume, cfg.batch_size * world_size, steps, cfg.epochs, cfg.accumulate)
        raw_model.load_state_dict(resume["raw_model"] or resume["model"])
        for name, obj in (("model", ema), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            obj is None or not resume[name] or data.resume_state(obj, resume[name])  # a scaler saved off: {}
        epoch, step, best = resume["epoch"], resume["step"], resume["best"]
    metrics = os.path.join(cfg.out, "metrics.jsonl")

    def log(record):  # rank 0 prints one line and appends it to metrics.jsonl
        if main_process:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            open(metrics, "a").write(json.dumps(record) + "\n")

    def save(checkpoint, name):  # to a temporary file, then renamed: a checkpoint is never left half-written
        checkpoint = {"detector": DETECTOR.__name__, "file": os.path.basename(__file__), **checkpoint}
        torch.save(checkpoint, f"{cfg.out}/{name}.tmp")
        os.replace(f"{cfg.out}/{name}.tmp", f"{cfg.out}/{name}")
    if main_process:
        os.makedirs(cfg.out, exist_ok=True)
        open(os.path.join(cfg.out, "config.json"), "w").write(json.dumps(dataclasses.asdict(cfg), indent=2))
        kept = [r for r in open(metrics) if r.endswith("\n") and json.loads(r)["iter"] <= epoch * steps + step] \
            if resume and os.path.isfile(metrics) else []  # a resumed run continues its log there, no repeats
        open(metrics, "w").writelines(kept)
        print(f"{DETECTOR.__name__}, {cfg.backbone}, {cfg.weights or cfg.backbone_weights} weights, "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f} M parameters\ndata: {train_set.source} "
              f"({len(train_set)} images), val {val_set.source} ({len(val_set)}); {cfg.num_classes - 1} classes: "
              f"{', '.join(train_set.class_names[1:])}\n{device} x {world_size}, {str(dtype)[6:]}, {cfg.epochs} epochs "
              f"of {steps} steps of {cfg.batch_size} x {world_size} images; writing to {cfg.out}"
              + (f"\nresumed from {cfg.resume}: epoch {epoch} step {step}/{steps}" if resume else ""))

    def on_signal(sig, frame):  # Ctrl-C or SIGTERM (each: SLURM's, then torchrun's): finish the step, save, exit
        main_process and not stop and os.write(2, b"\nstopping after this step (or evaluation), with a checkpoint; "
                                               b"Ctrl-C again stops at once\n")
        stop.append(signal.signal(signal.SIGINT, handlers[signal.SIGINT]))  # the next Ctrl-C acts as it did before
    stop, handlers = [], {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    start_time = time.perf_counter() - (resume or {}).get("time_s", 0.0)  # time_s: the run's, over its resumes
    while epoch < cfg.epochs:
        window, window_start, tic, improved = 0.0, step, time.perf_counter(), False  # window: loss terms summed
        model.train()
        for images, targets in data.make_loader(train_set, cfg.batch_size, True, cfg.workers, cfg.seed, epoch, step,
                                                rank, world_size):
            data.seed_everything(cfg.seed, rank, epoch, step)  # the model's own randomness, the same after a resume
            with ctx:
                loss_dict = model([im.to(device, non_blocking=True) for im in images], data.to_device(targets, device))
            scaler.scale(sum(loss_dict.values())).backward()
            step += 1
            if step % cfg.accumulate == 0 or step == steps:  # YOLOv5 sums the gradients of `accumulate` batches
                if cfg.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:  # YOLOv5's ModelEMA: the decay ramps up over the first 2000 updates
                    decay = cfg.ema_decay * (1 - math.exp(-(epoch * steps + step) / cfg.accumulate / 2000))
                    for e, v in zip(ema.state_dict().values(), raw_model.state_dict().values()):
                        e.lerp_(v, 1 - decay) if e.is_floating_point() else e.copy_(v)
            lr = optimizer.param_groups[0]["lr"]  # the one this step used, for the log
            scheduler.step()
            window = window + torch.stack([v.detach().float() for v in loss_dict.values()])  # on the device: no sync
            if step % cfg.log_every and step < steps and not (stop and not ddp):
                continue  # the host reads the losses only on logging steps (and at once on Ctrl-C without DDP)
            totals = torch.cat([window, window.new_tensor([bool(stop), step - window_start])])
            if ddp:  # summed over the ranks: every rank logs the same numbers and stops at the same step
                dist.all_reduce(totals)
            *totals, stopping, count = totals.tolist()
            terms = {k: v / count for k, v in zip(loss_dict, totals)}  # averages since the last log line
            if not all(map(math.isfinite, terms.values())):
                raise SystemExit(f"non-finite loss in epoch {epoch} steps {window_start}-{step - 1}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in terms.items()) + "; stopped, the last checkpoint is intact")
            done, elapsed = epoch * steps + step, time.perf_counter() - start_time  # (the run's: ETA over its resumes)
            log({"epoch": epoch, "step": f"{step}/{steps}", "iter": epoch * steps + step, "loss": sum(terms.values()),
                 **terms, "lr": lr, "img_s": count * cfg.batch_size / (time.perf_counter()
                 - tic), "eta_min": elapsed / done * ((cfg.epochs - epoch) * steps - step) / 60, "time_s": elapsed,
                 "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0})
            window, window_start, tic = 0.0, step, time.perf_counter()
            if stopping and step % cfg.accumulate == 0 and step < steps:
                break
        if main_process and step == steps:  # rank 0 evaluates and saves while the others wait
            stats = data.evaluate(ema or raw_model, val_set, cfg.batch_size, cfg.workers, device)
            log({"epoch": epoch, "iter": (epoch + 1) * steps, **stats, "time_s": time.perf_counter() - start_time})
            best, improved = ({"epoch": epoch, **stats}, True) if stats["AP"] >= best["AP"] else (best, False)
        epoch, step = (epoch + 1, 0) if step == steps else (epoch, step)
        if main_process:  # best.pt: what inference needs; last.pt: also what --resume needs to go on at (epoch, step)
            weights = {"model": (ema or raw_model).state_dict(), "config": dataclasses.asdict(cfg),
                       "class_names": train_set.class_names, "best": best}
            if improved:
                save(weights, "best.pt")
            save({**weights, "raw_model": ema and raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                  "world_size": world_size, "steps": steps, "time_s": time.perf_counter() - start_time}, "last.pt")
        asked = torch.tensor(float(bool(stop)), device=device)  # also during the evaluation; on any rank: on all
        ddp and dist.all_reduce(asked)  # (and the other ranks wait for rank 0's checkpoint)
        if step or (asked and epoch < cfg.epochs):  # stopped mid-epoch, or at an epoch's end (not the run's)
            if main_process:
                print(f"stopped at epoch {epoch} step {step}/{steps}, saved in {cfg.out}/last.pt; to go on:\n    "
                      + ("python" if world_size == 1 else f"torchrun --nproc_per_node {world_size}") + " "
                      + shlex.join([os.path.relpath(__file__), "--train", "--resume", f"{cfg.out}/last.pt"]))
            raise SystemExit(130)
    if main_process:
        print(f"done: best AP {best['AP']:.4f} (AP50 {best.get('AP50', -1):.4f}) after epoch {best.get('epoch')}; "
              f"weights {cfg.out}/best.pt, to resume {cfg.out}/last.pt, log {metrics}")
    del model  # DDP's wrapper goes before its process group: after it, torch 2.11's gloo could hang at times
    ddp and dist.destroy_process_group()
    return raw_model


# --- Main ---


def make_config(given: dict, saved: dict = None, preset: str = "none") -> Config:
    """Config defaults < the preset < the config of --weights or --resume < the command line."""
    values, fields = dict(PRESETS.get(preset, {})), {f.name: f for f in dataclasses.fields(Config)}
    moved = "data_root" in given and os.path.abspath(given["data_root"]) != (saved or {}).get("data_root")
    for k, v in (saved or {}).items():  # (another --data-root: not the checkpoint's annotation or proposal files)
        if k in fields and not (moved and k.endswith(("_ann", "_proposals"))):  # (fields of an older version: left)
            values[k] = tuple(v) if fields[k].type is tuple else v
    values.update(given)
    if "frozen_bn" in fields:  # unless set: batch norm frozen when starting from pretrained weights, as torchvision
        values.setdefault("frozen_bn", values.get("backbone_weights", "none") != "none" or bool(values.get("weights")))
    for k in ("data_root", "out"):  # absolute: --resume and --eval of the checkpoint work from any folder
        values[k] = os.path.abspath(path) if (path := values.get(k, fields[k].default)) else ""
    return Config(**values)


def main(argv=None):
    args, given = data.parse_args(argv, Config, PRESETS, make_config)  # modes, --preset, a flag per field
    saved = state_dict = None
    if args.train and given.get("resume"):  # the run's config (flags still override); its folder: where last.pt is
        saved = {**load_weights(path := given["resume"], "--resume")[2], "out": os.path.dirname(os.path.abspath(path))}
    elif given.get("weights"):  # the config the weights go with: their model and preprocessing, not their run's paths
        state_dict, class_names, saved = load_weights(given["weights"])  # (fine-tuning freezes batch norm)
        drop = ("device", "workers", "out", "resume", "weights") + (("frozen_bn",) if args.train else ())
        saved = {k: v for k, v in saved.items() if k not in drop}
    cfg = make_config(given, saved, args.preset if args.train or saved is None else "none")  # presets size training
    if args.train:
        data.announce_preset(args, PRESETS, saved, cfg.data)  # the first line: the preset's values this run takes
        return train(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.show_targets:  # what training sees; the assignment takes trained weights where given (proposals)
        train_set = data.build_datasets(cfg, train_transforms(cfg), search=False)[0]  # (proposals: of these 8 only)
        data.seed_everything(cfg.seed)  # the random weights: the same pictures every time
        model = DETECTOR(dataclasses.replace(cfg, num_classes=train_set.num_classes), load_backbone=False)
        state_dict is None or load_state(model, state_dict, f"--weights {cfg.weights}", fine_tune=True)
        for i in range(min(8, len(train_set))):
            data.seed_everything(cfg.seed, 0, i)  # epoch 0's augmentation of image i, as make_loader draws it
            image, target = train_set[i]
            draw_targets(model.to(device).eval(), image.to(device), data.to_device([target], device)[0],
                         train_set.class_names, f"{cfg.out}/targets_{i}.png")
        return print(f"wrote {min(8, len(train_set))} pictures of the assignment to {cfg.out}")
    if state_dict is None:
        raise SystemExit("--eval and --predict need --weights (a run's best.pt, or what --help names)")
    if args.predict:  # the file's --predict values (YOLOv5: detect.py's, not val.py's) where no flag sets them
        cfg = dataclasses.replace(cfg, **{k: v for k, v in PREDICT.items() if k not in given})
    model = DETECTOR(dataclasses.replace(cfg, num_classes=len(class_names)), load_backbone=False).to(device).eval()
    load_state(model, state_dict, f"--weights {cfg.weights}")
    if args.eval:
        val_set = data.build_datasets(cfg, train=False)[1]
        print(f"evaluating {cfg.weights} on {val_set.source} ({len(val_set)} images)")
        stats = data.evaluate(model, val_set, cfg.batch_size, cfg.workers, device, class_names, cfg.out)
        return print("\n".join(f"{k:>9} {v:.4f}" for k, v in stats.items()))
    data.predict(model, args.predict, cfg.out, class_names, cfg.draw_thresh, device)  # drawings, predictions.json

if __name__ == "__main__":
    main()
