"""FCOS with a ResNet-50-FPN backbone, torchvision semantics.

Papers: Tian, Shen, Chen, He, "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019
(https://arxiv.org/abs/1904.01355), and its journal version "FCOS: A Simple and Strong Anchor-free Object Detector",
TPAMI 2020 (https://arxiv.org/abs/2006.09214), whose improvements (centre sampling, GIoU loss, centerness on the box
branch, normalised targets) torchvision implements.

What this file implements, in the order the data flows (torchvision/models/detection/fcos.py is the reference, and
test_models.py proves that this file gives torchvision's detections and losses with the same weights):
  - preprocessing inside the model: ImageNet normalisation, resize so the short side is min_size (long side at most
    max_size), zero padding of the batch to a multiple of 32; detections are mapped back to each input image's pixels;
  - backbone: a torchvision ResNet body (FrozenBatchNorm2d when starting from pretrained weights) and an FPN giving
    P3..P5 plus P6, P7 by strided convs, strides 8..128, 256 channels;
  - head: a classification subnet and a box subnet shared by all levels, four 3x3 conv + GroupNorm layers each; per
    location K class logits (sigmoid, no softmax), 4 distances to the box sides and a centerness logit;
  - points: one per location and level (torchvision stores each as a square "anchor" of side the stride, 8..128, and
    uses its centre), assigned to a ground-truth box when inside it, within 1.5 strides of its centre, and with
    max(l, t, r, b) in the level's scale range; of several boxes, the smallest;
  - loss: sigmoid focal loss (alpha 0.25, gamma 2) over all points, GIoU loss on the foreground points' boxes, BCE on
    their centerness, all divided by the batch's number of foreground points;
  - decoding: per level, sqrt(class probability x centerness) > 0.2 and the best 1000, then NMS 0.6 per class and 100
    detections per image.
Assignment and loss run for the whole batch at once: ground truth is padded to [B, M] with a validity mask.

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python fcos.py --train                             # synthetic shapes, from scratch, no download; CPU: preset cpu
    python fcos.py --train --preset coco --data-root DIR            # torchvision's COCO recipe (or --data voc)
    python fcos.py --train --resume runs/fcos/last.pt               # go on after Ctrl-C, SIGTERM or a crash
    python fcos.py --eval --weights torchvision --data coco --data-root DIR
    python fcos.py --predict IMG_OR_DIR --weights runs/fcos/best.pt --out DIR
    python fcos.py --show-targets --out DIR
    torchrun --nproc_per_node=8 fcos.py --train ...                 # several GPUs
    python -m pytest -q test_models.py -k fcos                # parity with torchvision

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the padded batch size, L = 5 pyramid levels, A points ("anchors") of all levels of one
    image (A_loc = 1 per location), M ground-truth boxes per image (padded to the batch maximum), F foreground points of
    the whole batch, K classes including the unused index 0 (num_classes), C feature channels, D detections of one
    image.
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
from torchvision.ops import FrozenBatchNorm2d, batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

import data
from common import (box_area, check_images, check_targets, clip_boxes_to_image, draw_boxes, pad_targets,
                    resize_boxes)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python fcos.py --train), from random weights; torchvision's
    # value is in brackets where it differs. PRESETS below: torchvision's COCO recipe, and a run sized for a CPU.
    # model
    num_classes: int = 7  # K: foreground classes + 1 (index 0 unused); --train takes it from the data [COCO: 91]
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # torchvision ResNet body
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH to a ResNet state dict
    frozen_bn: bool = False  # FrozenBatchNorm2d, frozen early layers; make_config, unless set: on if pretrained
    trainable_backbone_layers: int = 3  # with frozen_bn: layer2..4 train, the stem and layer1 stay frozen
    bn_eps: float = 1e-5  # backbone batch-norm eps (torchvision's FCOS weights keep it: no overwrite_eps)
    fpn_channels: int = 256  # C: channels of every pyramid level
    # preprocessing
    min_size: int = 320  # resize the short side to this ... [800]
    max_size: int = 320  # ... unless the long side would exceed this [1333]
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1]
    image_std: tuple = (0.229, 0.224, 0.225)
    size_divisible: int = 32  # pad the batch to a multiple of this (the coarsest backbone stride)
    # points ("anchors") and their assignment
    anchor_sizes: tuple = (8, 16, 32, 64, 128)  # side s of the one square "anchor" per location of P3..P7: the stride
    anchor_scales: tuple = (1.0,)  # (torchvision's way to place FCOS's points: the anchors' centres)
    aspect_ratios: tuple = (1.0,)
    center_sampling_radius: float = 1.5  # positives lie within radius * s of a box's centre (FCOS v2, torchvision)
    scale_range: tuple = (4, 8)  # side s regresses boxes with max(l, t, r, b) in (4 s, 8 s): 0, 64, .., 512, inf
    # head and loss
    prior_probability: float = 0.01  # initial foreground probability of every class logit (RetinaNet paper 4.1)
    focal_alpha: float = 0.25  # focal loss weight of the positives (negatives get 1 - alpha)
    focal_gamma: float = 2.0  # focal loss focusing exponent: (1 - p_t) ** gamma
    # decoding
    score_thresh: float = 0.2  # keep (point, class) pairs with sqrt(probability x centerness) above this
    topk_candidates: int = 1000  # ... and at most this many per level
    nms_thresh: float = 0.6  # NMS IoU, applied per class
    detections_per_img: int = 100  # detections kept per image
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
    # training (torchvision's recipe: 26 epochs of 16 images per step, lr 0.01 with steps at 16 and 22)
    epochs: int = 6  # passes over the training set [26]
    batch_size: int = 16  # images per step and per process [2 per GPU x 8 GPUs]
    lr: float = 0.01  # learning rate for 16 images per step, scaled linearly to batch_size x processes
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
    out: str = "runs/fcos"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # torchvision (COCO) | PATH to a checkpoint or torchvision state dict: start from / evaluate
    draw_thresh: float = 0.5  # --predict draws detections scoring at least this


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # ~15 minutes on 2 CPU cores: ResNet-18 from scratch on 5,000 128-px images, a smaller FPN, AdamW
    "cpu": dict(backbone="resnet18", fpn_channels=64, image_size=128, min_size=128, max_size=128, num_train=5000,
                num_val=200, batch_size=16, epochs=5, optimizer="adamw", lr=1e-3, lr_steps=(4,), warmup_iters=100,
                workers=1),
    # torchvision's COCO recipe (ImageNet backbone, 800 px, 26 epochs of 2 images x 8 GPUs)
    "coco": dict(data="coco", backbone_weights="imagenet", min_size=800, max_size=1333, epochs=26,
                 batch_size=2, lr=0.01, lr_steps=(16, 22), warmup_iters=1000),
}
# torchvision's fcos_resnet50_fpn: its model and preprocessing, for --weights torchvision or its state dicts
TORCHVISION_CONFIG = dict(backbone="resnet50", fpn_channels=256, min_size=800, max_size=1333, frozen_bn=True)


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
    3x3 output convs (layer_blocks), then P6 = 3x3 stride-2 conv of P5 and P7 = 3x3 stride-2 conv of ReLU(P6).
    As the FCOS paper (section 3.2) and torchvision's FCOS (LastLevelP6P7(256, 256)) do, P6 comes from P5, not C5."""

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
    """torchvision ResNet body (stem, layer1..4; no pooling or fc) followed by the FPN on C3..C5 (P3..P7, FCOS paper
    section 3.2; a P2 would quadruple the points)."""

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
    """Four 3x3 conv + GroupNorm(32) + ReLU layers (paper Fig. 2; GroupNorm as in the authors' code and torchvision)."""
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class Head(nn.Module):
    """The classification subnet and the box subnet, shared by all levels: per point K class logits, four distances
    to the box sides and a centerness logit (on the box subnet, as FCOS v2 and torchvision; the ICCV paper put it on
    the classification subnet)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float):
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = subnet(in_channels)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_subnet = subnet(in_channels)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)
        # every class starts at probability prior_probability, so that the many easy negatives do not swamp the first
        # iterations' loss (RetinaNet paper section 4.1, "Initialization")
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: list):
        """L maps [B, C, H_l, W_l] -> cls_logits [B, A, K], bbox_regression [B, A, 4], centerness [B, A]; points
        ordered level, y, x (as make_anchors)."""
        cls_logits, bbox_regression, centerness = [], [], []
        for feature in features:
            B, _, H, W = feature.shape
            logits = self.cls_logits(self.cls_subnet(feature)).view(B, -1, self.num_classes, H, W)  # [B, A_loc, K, ..]
            cls_logits.append(logits.permute(0, 3, 4, 1, 2).reshape(B, -1, self.num_classes))  # [B, H_l*W_l*A_loc, K]
            bbox_feature = self.bbox_subnet(feature)  # [B, C, H_l, W_l]
            # ReLU keeps the distances >= 0. The paper predicts exp(s_l * x) with a learnable scale s_l per level;
            # torchvision has neither the exp nor the per-level scale, and this file follows torchvision.
            deltas = F.relu(self.bbox_reg(bbox_feature)).view(B, -1, 4, H, W)  # [B, A_loc, 4, H_l, W_l]
            bbox_regression.append(deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4))  # [B, H_l * W_l * A_loc, 4]
            centerness.append(self.centerness(bbox_feature).permute(0, 2, 3, 1).reshape(B, -1))  # [B, H_l * W_l]
        return torch.cat(cls_logits, 1), torch.cat(bbox_regression, 1), torch.cat(centerness, 1)  # .., [B, A]


def make_anchors(image_size, grid_sizes: list, cfg: Config, device=None):
    """Anchors of all levels, the same for every image of the batch. image_size: padded (H, W); grid_sizes: L sizes
    (H_l, W_l) of the feature maps. Returns anchors [A, 4] xyxy ordered level, y, x, anchor shape, and the count per
    level.
    Matches torchvision's AnchorGenerator: zero-centred cell anchors are rounded to integers, the stride is
    H // H_l, and anchor centres sit at x * stride (the top-left corner of a cell, not its centre)."""
    anchors, num_anchors_per_level = [], []
    for (H_l, W_l), size in zip(grid_sizes, cfg.anchor_sizes):
        scales = torch.tensor([float(int(size * s)) for s in cfg.anchor_scales]).to(device, non_blocking=True)
        h_ratios = torch.sqrt(torch.tensor(cfg.aspect_ratios).to(device, non_blocking=True))  # sqrt(height / width)
        ws = ((1 / h_ratios)[:, None] * scales[None]).reshape(-1)  # [A_loc] ratio-major, as torchvision
        hs = (h_ratios[:, None] * scales[None]).reshape(-1)  # area scale ** 2 for every ratio
        cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [A_loc, 4]
        # torchvision's stride is H // H_l: not 64 (P6) or 128 (P7) for a padded size not a multiple of 64 or 128
        stride_y, stride_x = image_size[0] // H_l, image_size[1] // W_l
        shift_y, shift_x = torch.meshgrid(torch.arange(H_l, device=device) * stride_y,
                                          torch.arange(W_l, device=device) * stride_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)  # [H_l * W_l, 1, 4]
        anchors.append((shifts + cell[None]).reshape(-1, 4))  # [H_l * W_l * A_loc, 4]
        num_anchors_per_level.append(anchors[-1].shape[0])
    return torch.cat(anchors), num_anchors_per_level


class FCOS(nn.Module):
    """model.train(): model(images, targets) -> dict of losses; model.eval(): model(images) -> list of
    {"boxes" [D, 4] xyxy in input pixels, "scores" [D], "labels" [D]}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_backbone)
        num_anchors = len(cfg.anchor_scales) * len(cfg.aspect_ratios)  # A_loc
        self.head = Head(cfg.fpn_channels, num_anchors, cfg.num_classes, cfg.prior_probability)
        self.box_coder = BoxLinearCoder()

    def forward(self, images: list, targets: list = None):
        if self.training:
            check_targets(images, targets, "FCOS")
        cfg = self.cfg
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, image_sizes, targets = preprocess(images, targets, cfg)  # [B, 3, H, W]
        features = self.backbone(batch)  # L = 5 maps [B, C, H/s, W/s]
        cls_logits, bbox_regression, centerness = self.head(features)  # [B, A, K], [B, A, 4], [B, A]
        # losses and decoding in float32 under autocast: bf16 has 8 bits of mantissa, pixels off by several at 800 px
        cls_logits, bbox_regression, centerness = cls_logits.float(), bbox_regression.float(), centerness.float()
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, num_anchors_per_level = make_anchors(batch.shape[-2:], grid_sizes, cfg, batch.device)  # [A, 4]

        if self.training:
            gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [B, M, 4], [B, M], [B, M]
            matched_idxs = assign_points(anchors, num_anchors_per_level, gt_boxes, gt_valid, cfg)  # [B, A]
            return compute_loss(cls_logits, bbox_regression, centerness, anchors, matched_idxs, gt_boxes, gt_labels,
                                self.box_coder, cfg)

        detections = postprocess_detections(cls_logits, bbox_regression, centerness, anchors, num_anchors_per_level,
                                            image_sizes, self.box_coder, cfg)
        for det, size, original_size in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original_size)  # back to the input image's pixels
        return detections


TORCHVISION_WEIGHTS = torchvision.models.detection.FCOS_ResNet50_FPN_Weights.COCO_V1  # --weights torchvision


def convert_torchvision(state_dict: dict) -> dict:
    """A torchvision fcos_resnet50_fpn state dict (any num_classes; old and new FPN key versions) -> this file's FCOS
    state dict. Our names are torchvision's without the wrapper modules."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
        key = key.replace("backbone.fpn.extra_blocks.", "backbone.fpn.")
        key = key.replace("head.classification_head.conv.", "head.cls_subnet.")
        key = key.replace("head.regression_head.conv.", "head.bbox_subnet.")
        key = key.replace("head.regression_head.bbox_ctrness.", "head.centerness.")
        key = key.replace("head.classification_head.", "head.").replace("head.regression_head.", "head.")
        out[key] = value
    return out


def reference_weights(weights: str, state_dict: dict = None):
    """--weights torchvision (its COCO weights, downloaded) or a file of torchvision's fcos_resnet50_fpn state dict ->
    (this file's state dict, class names, TORCHVISION_CONFIG: the settings that model was built with). K is read from
    its class logits [K, 256, 3, 3]; the class names are COCO's for K = 91, else numbers."""
    if state_dict is None and weights != "torchvision":
        raise SystemExit(f"--weights {weights}: {'not a checkpoint' if os.path.exists(weights) else 'no such file'} "
                         "(--weights torchvision: torchvision's COCO weights)")
    try:
        state_dict = convert_torchvision(state_dict or TORCHVISION_WEIGHTS.get_state_dict(progress=True))
    except OSError as e:  # no internet
        raise SystemExit(f"--weights torchvision: cannot download {TORCHVISION_WEIGHTS.url} ({e})") from None
    if "head.cls_logits.weight" not in state_dict:  # e.g. another detector's state dict
        raise SystemExit(f"--weights {weights}: neither a checkpoint of fcos.py nor a fcos_resnet50_fpn state dict")
    K = state_dict["head.cls_logits.weight"].shape[0]
    names = TORCHVISION_WEIGHTS.meta["categories"] if K == 91 else ["__background__", *map(str, range(1, K))]
    return state_dict, tuple(names), TORCHVISION_CONFIG


# --- Targets ---

BACKGROUND = -1  # matched_idxs value: the point is a candidate for no ground-truth box


class BoxLinearCoder:
    """FCOS's box parameterisation: the distances (l, t, r, b) from a point to the four sides of a box, divided by the
    size s of the point's anchor, i.e. its stride (torchvision's BoxLinearCoder(normalize_by_size=True); the ICCV paper
    regresses raw pixels through exp()), so the head predicts numbers of the same range at every level."""

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """gt_boxes [..., 4] xyxy, anchors [..., 4] xyxy (same shape) -> (l, t, r, b) / s [..., 4]."""
        ctr_x, ctr_y = 0.5 * (anchors[..., 0] + anchors[..., 2]), 0.5 * (anchors[..., 1] + anchors[..., 3])
        w, h = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        ltrb = torch.stack([ctr_x - gt_boxes[..., 0], ctr_y - gt_boxes[..., 1], gt_boxes[..., 2] - ctr_x,
                            gt_boxes[..., 3] - ctr_y], dim=-1)
        return ltrb / torch.stack([w, h, w, h], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas [..., 4] (l, t, r, b) / s, anchors [..., 4] xyxy -> boxes [..., 4] xyxy."""
        anchors = anchors.to(deltas.dtype)
        ctr_x, ctr_y = 0.5 * (anchors[..., 0] + anchors[..., 2]), 0.5 * (anchors[..., 1] + anchors[..., 3])
        w, h = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
        ltrb = deltas * torch.stack([w, h, w, h], dim=-1)
        return torch.stack([ctr_x - ltrb[..., 0], ctr_y - ltrb[..., 1], ctr_x + ltrb[..., 2], ctr_y + ltrb[..., 3]], -1)


def centerness_target(target_regression: Tensor) -> Tensor:
    """[F, 4] (l, t, r, b) -> [F] sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) (paper eq. 3): 1 at the box's
    centre, falling to 0 at its sides. Scale-free, so normalised distances give the same value."""
    left_right, top_bottom = target_regression[:, 0::2], target_regression[:, 1::2]  # [F, 2] each
    return torch.sqrt((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1)))


@torch.no_grad()
def assign_points(anchors: Tensor, num_anchors_per_level: list, gt_boxes: Tensor, gt_valid: Tensor,
                  cfg: Config) -> Tensor:
    """anchors [A, 4] (squares whose centres are the points and whose side s is the stride), gt_boxes [B, M, 4],
    gt_valid [B, M] -> matched_idxs [B, A]: the index of the ground-truth box each point learns, or BACKGROUND.
    A point is a candidate for a box when it lies (1) inside the box, (2) within center_sampling_radius * s of the
    box's centre (centre sampling, FCOS v2) and (3) at a level whose scale range holds max(l, t, r, b) (paper section
    3.2: (4 s, 8 s), the first level from 0, the last to infinity). Of several candidate boxes the smallest wins
    (torchvision compares 1e8 - area in float32, which ties areas within ~8 px^2; this compares the areas)."""
    points = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    strides = anchors[:, 2] - anchors[:, 0]  # [A] s (torchvision's "anchor size")
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
    center_distance = (points[None, None] - gt_centers[:, :, None]).abs().amax(-1)  # [B, M, A] (max over x, y)
    in_center = center_distance < cfg.center_sampling_radius * strides
    x, y = points.unbind(-1)  # [A] each
    x1, y1, x2, y2 = gt_boxes[..., None].unbind(-2)  # [B, M, 1] each
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1)  # [B, M, A, 4] distances to the box's sides
    lower, upper = strides * cfg.scale_range[0], strides * cfg.scale_range[1]  # [A]
    lower[: num_anchors_per_level[0]] = 0
    upper[-num_anchors_per_level[-1]:] = float("inf")
    max_distance = ltrb.amax(-1)  # [B, M, A]
    candidate = in_center & (ltrb.amin(-1) > 0) & (max_distance > lower) & (max_distance < upper)
    candidate &= gt_valid[:, :, None]  # padding is never a candidate
    area = torch.where(candidate, box_area(gt_boxes)[:, :, None], float("inf"))  # [B, M, A]
    min_area, matched_idxs = area.min(dim=1)  # [B, A]
    return torch.where(min_area == float("inf"), BACKGROUND, matched_idxs)


# --- Loss ---


def compute_loss(cls_logits: Tensor, bbox_regression: Tensor, centerness: Tensor, anchors: Tensor,
                 matched_idxs: Tensor, gt_boxes: Tensor, gt_labels: Tensor, box_coder: BoxLinearCoder,
                 cfg: Config) -> dict:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], centerness [B, A], anchors [A, 4], matched_idxs [B, A],
    gt_boxes [B, M, 4], gt_labels [B, M]. Focal loss summed over every (point, class) pair; GIoU loss on the foreground
    points' decoded boxes (FCOS v2; the ICCV paper used IoU loss); BCE on their centerness; all three divided by the
    batch's number of foreground points (at least 1), as torchvision."""
    foreground = matched_idxs >= 0  # [B, A]
    num_foreground = foreground.sum().clamp(min=1)  # the whole batch's
    image_idx, anchor_idx = torch.where(foreground)  # [F] each
    matched_gt = matched_idxs[image_idx, anchor_idx]  # [F]
    # one-hot class targets of the foreground points; background rows stay all zero (sigmoid: no background class)
    gt_classes_target = torch.zeros_like(cls_logits)  # [B, A, K]
    gt_classes_target[image_idx, anchor_idx, gt_labels[image_idx, matched_gt]] = 1.0
    # FL(p_t) = -alpha_t (1 - p_t) ** gamma log(p_t) (RetinaNet paper eq. 5): easy negatives add almost nothing
    classification_loss = sigmoid_focal_loss(cls_logits, gt_classes_target, alpha=cfg.focal_alpha,
                                             gamma=cfg.focal_gamma, reduction="sum")

    matched_gt_boxes = gt_boxes[image_idx, matched_gt]  # [F, 4]
    pred_boxes = box_coder.decode(bbox_regression[image_idx, anchor_idx], anchors[anchor_idx])  # [F, 4]
    box_loss = generalized_box_iou_loss(pred_boxes, matched_gt_boxes, reduction="sum")
    target_regression = box_coder.encode(matched_gt_boxes, anchors[anchor_idx])  # [F, 4]
    centerness_loss = F.binary_cross_entropy_with_logits(centerness[image_idx, anchor_idx],
                                                         centerness_target(target_regression), reduction="sum")
    return {"classification": classification_loss / num_foreground,
            "bbox_regression": box_loss / num_foreground,
            "bbox_ctrness": centerness_loss / num_foreground}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_logits: Tensor, bbox_regression: Tensor, centerness: Tensor, anchors: Tensor,
                           num_anchors_per_level: list, image_sizes: list, box_coder: BoxLinearCoder,
                           cfg: Config) -> list:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], centerness [B, A], anchors [A, 4] -> B dicts with boxes [D, 4]
    (in the resized image), scores [D], labels [D]. Every (point, class) pair is a candidate: per level, score >
    score_thresh and the best topk_candidates, decoded and clipped; then NMS per class over all levels and the best
    detections_per_img. Like torchvision, class 0 is a candidate too (it is never trained positive, so its scores
    stay low)."""
    K = cls_logits.shape[-1]
    # centerness down-weights boxes predicted far from an object's centre (paper section 3.3); torchvision takes the
    # geometric mean sqrt(p * centerness), the ICCV paper the product
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(centerness)[..., None])  # [B, A, K]
    detections = []
    for scores_i, regression_i, size in zip(scores, bbox_regression, image_sizes):
        boxes_i, scores_kept, labels_i = [], [], []
        for scores_l, regression_l, anchors_l in zip(scores_i.split(num_anchors_per_level),
                                                     regression_i.split(num_anchors_per_level),
                                                     anchors.split(num_anchors_per_level)):
            scores_l = scores_l.flatten()  # [A_l * K], index = point * K + class
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


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = FCOS  # the class the template builds, trains, evaluates and saves
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
def draw_targets(model: FCOS, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the ground truth (class colours) over the points the assignment marks positive, as dots whose
    brightness is their centerness target (white at a box's centre, dark at its sides)."""
    batch, image_sizes, targets = preprocess([image], [target], model.cfg)
    grid_sizes = [f.shape[-2:] for f in model.backbone(batch)]
    anchors, num_anchors_per_level = make_anchors(batch.shape[-2:], grid_sizes, model.cfg, batch.device)  # [A, 4]
    gt_boxes, _, gt_valid = pad_targets(targets)  # [1, M, 4], [1, M]
    matched_idxs = assign_points(anchors, num_anchors_per_level, gt_boxes, gt_valid, model.cfg)[0]  # [A]
    positive = matched_idxs >= 0
    centerness = centerness_target(model.box_coder.encode(gt_boxes[0, matched_idxs[positive]], anchors[positive]))
    squares = resize_boxes(anchors[positive], image_sizes[0], image.shape[-2:])  # [P, 4] around each point
    points = (squares[:, :2] + squares[:, 2:]) / 2  # [P, 2]
    drawn = draw_boxes(image, torch.cat([points - 1, points + 1], dim=1), width=2,
                       color=[(int(255 * c),) * 3 for c in centerness.tolist()])
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
