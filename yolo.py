"""YOLOv5 (scales n, s, m, l, x), equal to ultralytics/yolov5 v7.0.

YOLOv5 has no paper. Reference: github.com/ultralytics/yolov5 at tag v7.0 (915bbf29, 2022-11-22): models/yolo.py,
models/common.py, utils/loss.py, utils/general.py (non_max_suppression), utils/autoanchor.py, utils/augmentations.py,
utils/dataloaders.py, train.py, val.py, data/hyps/hyp.scratch-low.yaml. Background: Redmon & Farhadi, "YOLOv3: An
Incremental Improvement" (https://arxiv.org/abs/1804.02767); Wang et al., "CSPNet", CVPRW 2020; Liu et al., "Path
Aggregation Network", CVPR 2018; Zheng et al., "Distance-IoU Loss", AAAI 2020 (CIoU). YOLOv5 is AGPL-3.0: this file is
written anew (MIT), and test_models.py proves that it gives v7.0's losses and detections with the same weights.

What this file implements, in the order the data flows:
  - preprocessing inside the model: letterbox: each image resized so its long side is image_size (aspect kept) and
    pasted centred on grey (114/255): a square image_size batch in training, val.py's rectangular batch shape in
    evaluation and --predict; detections are mapped back to each input image's pixels. RGB in [0, 1], no normalisation;
  - backbone CSPDarknet (Conv = Conv2d + BatchNorm + SiLU; C3 blocks; SPPF) and a PAN neck (top-down, then bottom-up)
    giving P3, P4, P5 at strides 8, 16, 32; depth and width from the scale's multiples (yolov5n ... yolov5x);
  - head (Detect): one 1x1 conv per level; per cell and anchor (three per level, in pixels) 4 box outputs, an
    objectness logit and K class logits (sigmoid; no background class);
  - targets (build_targets): a box is learnt by every anchor of every level whose width and height are both within a
    factor anchor_t (4) of the box's, in the box centre's cell and its two nearest neighbouring cells;
  - loss: CIoU box loss on those predictions, BCE objectness on every cell with the detached CIoU as target, BCE
    classes; level balance and train.py's gains;
  - decoding: xy = 2 sigmoid - 0.5 + cell, wh = (2 sigmoid)^2 x anchor; score = objectness x class probability;
    non_max_suppression's candidates, class-offset NMS and max_det, without its wall-clock time limit;
  - training recipe: AutoAnchor; mosaic with random scale and translation, HSV, flip, mosaic closed for the last epochs;
    SGD nesterov (or Adam / AdamW) with three parameter groups, warmup of lr, bias lr and momentum, linear (or cosine)
    decay, gradient accumulation to a nominal 64 images, gradient clipping and an EMA of the weights (the template's).
Target assignment and loss run for the whole batch at once (the ground truth of all images in one [N, 6] tensor).

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python yolo.py --train                             # synthetic shapes, yolov5s from scratch; CPU: preset cpu
    python yolo.py --train --preset coco --data-root DIR            # v7.0's COCO recipe (or --data voc)
    python yolo.py --train --resume runs/yolo/last.pt               # go on after Ctrl-C, SIGTERM or a crash
    python yolo.py --eval --weights yolov5s_state_dict.pt --data coco --data-root DIR    # v7.0's weights (README)
    python yolo.py --predict IMG_OR_DIR --weights runs/yolo/best.pt --out DIR
    python yolo.py --show-targets --out DIR                         # cells and anchors each box is assigned to
    torchrun --nproc_per_node=8 yolo.py --train ...                 # several GPUs
    python -m pytest -q test_models.py -k yolo                      # parity with v7.0

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the letterboxed batch size, L = 3 levels (P3, P4, P5), H_l x W_l the grid of level l,
    A = 3 anchors per cell and level, K classes (num_classes - 1: no background channel), O = 5 + K outputs per anchor,
    N ground-truth boxes of the whole batch, P (box, anchor, cell) triples of one level, D detections of one image.
    Boxes are xyxy in pixels of the letterboxed batch unless a comment says otherwise.
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shlex
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from scipy.cluster.vq import kmeans
from torch import Tensor, nn

import data
from common import box_cxcywh_to_xyxy, check_images, check_targets, clip_boxes_to_image, draw_boxes

# --- Config ---

YOLOV5_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))  # COCO's, pixels


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python yolo.py --train), from random weights (YOLOv5 trains from
    # scratch); v7.0's value (train.py, hyp.scratch-low.yaml) is in brackets where it differs. PRESETS below: its COCO
    # recipe, and a run sized for a CPU.
    # model
    num_classes: int = 7  # K + 1: foreground classes + 1 (this repo's labels 1..K); the head predicts K [COCO: 81]
    backbone: Literal["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"] = "yolov5s"  # the scale (SCALES)
    backbone_weights: str = "none"  # none (random) | PATH to a state dict of this model or of v7.0's: its backbone
    depth_multiple: float = 0.0  # C3 repeats x this (0: the scale's: n, s 0.33; m 0.67; l 1.0; x 1.33)
    width_multiple: float = 0.0  # channels x this, rounded up to 8 (0: the scale's: n 0.25; s 0.5; m 0.75; l 1; x 1.25)
    anchors: tuple = YOLOV5_ANCHORS  # w, h in pixels, 3 per level P3, P4, P5 (AutoAnchor may change them; saved)
    bn_momentum: float = 0.03  # batch-norm running-statistics momentum (eps 1e-3) [PyTorch's default: 0.1]
    # preprocessing
    letterbox_pad: float = 0.5  # evaluation and --predict batches: val.py's rectangle + this many strides (0: minimal)
    # targets and loss (train.py scales the gains by 3 / L, the class count and the image size: see compute_loss)
    anchor_t: float = 4.0  # a box and an anchor match when neither side ratio (or its inverse) reaches this
    box_gain: float = 0.05  # weight of the CIoU box loss
    obj_gain: float = 1.0  # weight of the objectness loss, x (image_size / 640)^2
    cls_gain: float = 0.5  # weight of the classification loss, x K / 80
    balance: tuple = (4.0, 1.0, 0.4)  # objectness loss weight of P3, P4, P5
    autoanchor: bool = True  # before training: check the anchors' best possible recall, evolve new ones below 0.98
    # decoding: val.py's, for evaluation; --predict takes detect.py's (PREDICT: conf 0.25, iou 0.45, one label per box)
    conf_thresh: float = 0.001  # candidates: objectness, then objectness x class probability, above this
    iou_thresh: float = 0.6  # NMS IoU, per class [the README's COCO AP: 0.65]
    max_det: int = 300  # detections kept per image
    multi_label: bool = True  # every class above conf_thresh is a detection of the box (val.py); else the best class
    # data (data.build_datasets)
    data: Literal["synthetic", "coco", "voc"] = "synthetic"  # coco: images in the folder named as the json, ...
    data_root: str = ""  # dataset folder for coco / voc (coco images: ... else in JPEGImages/ or images/)
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 320  # the letterbox's long side, a multiple of 32; synthetic: image side in pixels [640]
    num_train: int = 10000  # synthetic: training images
    num_val: int = 500  # synthetic: validation images
    hflip_prob: float = 0.5  # training augmentation: horizontal flip probability
    mosaic: float = 1.0  # probability of a 4-image mosaic (else one letterboxed image), then random scale/translate
    close_mosaic: int = 5  # no mosaic in the last this many epochs [0; 10 in ultralytics' YOLOv8]
    scale: float = 0.5  # random scale in 1 +- this
    translate: float = 0.1  # random translation of the centre in +- this fraction of image_size
    hsv: tuple = (0.015, 0.7, 0.4)  # random gains of hue, saturation, value in 1 +- these
    # training (v7.0's recipe: SGD nesterov, 3 parameter groups, warmup, linear decay, nominal batch 64, EMA)
    epochs: int = 30  # passes over the training set [300]
    batch_size: int = 64  # images per step and per process [64 in all over the GPUs]
    lr: float = 0.01  # learning rate of a nominal batch of 64 images (batch_size x processes x accumulate)
    lrf: float = 0.01  # final learning rate, a fraction of lr
    cos_lr: bool = False  # cosine decay instead of linear
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # train.py's --optimizer; Adam(W): lr ~1e-3, beta1 = momentum
    momentum: float = 0.937  # SGD nesterov momentum (Adam: beta1, without the momentum warmup)
    weight_decay: float = 5e-4  # L2 on conv weights (not biases or batch norm), x images per step / 64
    warmup_epochs: float = 3.0  # lr, bias lr and momentum warmup ...
    warmup_iters: int = 100  # ... over at least this many steps
    warmup_momentum: float = 0.8  # momentum at the start of warmup
    warmup_bias_lr: float = 0.1  # bias lr at the start of warmup (it falls to lr; other lrs rise from 0)
    accumulate: int = 1  # batches per optimiser step: 64 / (batch_size x processes) [round(64 / batch), automatic]
    ema_decay: float = 0.9999  # evaluate and save an exponential moving average of the weights (0: off)
    clip_grad_norm: float = 10.0  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = False  # convolutions in channels-last memory layout (faster for some: GPU AMP, SSD on a CPU)
    # run
    workers: int = 8  # DataLoader worker processes (a mosaic reads 4 images)
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds the data order, the augmentation, the model's sampling and the synthetic data
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/yolo"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # PATH to a checkpoint of this file or the state dict of a v7.0 model: start from / evaluate
    draw_thresh: float = 0.25  # --predict draws detections scoring at least this (detect.py's conf-thres)


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # ~15 minutes on 2 idle CPU cores: yolov5n on 3,400 128-px images, 16 per optimiser step (no accumulation: 4x the
    # steps of a nominal 64), 1 warmup epoch. AdamW (train.py's --optimizer AdamW) and 4x the class gain: with SGD and
    # v7.0's gain (x K / 80: 0.0375 for 6 classes) the class loss stays at the prior's for all 15 epochs (README)
    "cpu": dict(backbone="yolov5n", image_size=128, num_train=3400, num_val=200, batch_size=16, accumulate=1,
                epochs=15, warmup_epochs=1.0, close_mosaic=3, optimizer="adamw", lr=1e-3, warmup_bias_lr=1e-3,
                cls_gain=2.0, workers=1),
    # v7.0's COCO recipe (README models): 640 px, 300 epochs of 64 images, mosaic throughout
    "coco": dict(data="coco", image_size=640, epochs=300, batch_size=64, close_mosaic=0),
}
SCALES = {"yolov5n": (0.33, 0.25), "yolov5s": (0.33, 0.50), "yolov5m": (0.67, 0.75), "yolov5l": (1.0, 1.0),
          "yolov5x": (1.33, 1.25)}  # depth_multiple, width_multiple of models/yolov5{n,s,m,l,x}.yaml
STRIDES = (8, 16, 32)  # of P3, P4, P5
PAD_VALUE = 114 / 255  # yolov5's grey for letterbox and mosaic borders


# --- Model ---


def resize_long_side(image: Tensor, size: int, antialias: bool):
    """[3, h, w] -> ([3, h', w'] with max(h', w') = size, aspect kept, sides truncated as v7.0's load_image; the scale
    size / max(h, w)). Bilinear; antialias: when shrinking, as v7.0's INTER_AREA for evaluation (training: LINEAR)."""
    h, w = image.shape[-2:]
    r = size / max(h, w)
    new_size = (max(1, int(h * r)), max(1, int(w * r)))  # a side of a very thin image: at least a pixel
    if new_size != (h, w):
        image = F.interpolate(image[None], new_size, mode="bilinear", antialias=antialias and r < 1)[0]
    return image, r


def letterbox(images: list, targets, cfg: Config, training: bool):
    """Resize each [3, h_i, w_i] image so its long side is image_size and paste it centred into a grey batch
    [B, 3, H, W]: square image_size x image_size in training (train.py without --rect); else val.py's rectangular batch:
    the batch's range of aspect ratios, image_size on the long side, + letterbox_pad strides, rounded up to a multiple
    of 32. Returns the batch, targets with their boxes moved onto it (a copy where they move; None stays None), and
    per image (scale, left, top) to map detections back."""
    check_images(images)
    s, stride = cfg.image_size, STRIDES[-1]
    if training:
        H = W = s
    else:
        aspect = [image.shape[-2] / image.shape[-1] for image in images]  # h / w
        shape = (max(aspect), 1.0) if max(aspect) < 1 else (1.0, 1 / min(aspect)) if min(aspect) > 1 else (1.0, 1.0)
        H, W = (math.ceil(x * s / stride + cfg.letterbox_pad) * stride for x in shape)
    if max(H, W) == s and all(image.shape[-2:] == (H, W) for image in images):  # mosaic's squares: as they are
        return torch.stack(images), targets, [(1.0, 0, 0)] * len(images)
    batch = images[0].new_full((len(images), 3, H, W), PAD_VALUE)  # [B, 3, H, W]
    frames, new_targets = [], []
    for i, image in enumerate(images):
        image, r = resize_long_side(image, s, antialias=not training)
        h, w = image.shape[-2:]
        top, left = round((H - h) / 2 - 0.1), round((W - w) / 2 - 0.1)  # as yolov5: an odd pixel goes right/bottom
        batch[i, :, top: top + h, left: left + w] = image
        frames.append((r, left, top))
        if targets is not None:  # Python numbers: a tensor of them copied to a GPU would wait for its queued work
            boxes = targets[i]["boxes"] * r
            boxes[:, 0::2] += left
            boxes[:, 1::2] += top
            new_targets.append({**targets[i], "boxes": boxes})
    return batch, (new_targets if targets is not None else None), frames


class Conv(nn.Module):
    """Conv2d without bias + BatchNorm (eps and momentum set by YOLO, as yolov5's initialize_weights) + SiLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, padding: int = None):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv and 3x3 conv of the same width, plus the input when shortcut (backbone C3s; the neck's have none)."""

    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(channels, channels, 1)
        self.cv2 = Conv(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x)) if self.shortcut else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP block with 3 convs: half the output width goes through n bottlenecks (cv1, m), half bypasses them (cv2);
    cv3 fuses the concatenation."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True):
        super().__init__()
        hidden = c_out // 2
        self.cv1 = Conv(c_in, hidden)
        self.cv2 = Conv(c_in, hidden)
        self.cv3 = Conv(2 * hidden, c_out)
        self.m = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools (receptive fields 5, 9, 13) concatenated with their
    input, between a halving 1x1 conv and a fusing one."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.cv1 = Conv(c_in, c_in // 2)
        self.cv2 = Conv(c_in // 2 * 4, c_out)
        self.m = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class CSPDarknet(nn.Module):
    """Backbone (yolov5 layers 0-9): a 6x6 stride-2 stem, four stages of (3x3 stride-2 Conv, C3), SPPF at the end.
    channels: the five stage widths (64 ... 1024 x width_multiple); depths: C3 repeats (3, 6, 9, 3 x depth_multiple)."""

    def __init__(self, channels: list, depths: list):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        self.stem = Conv(3, c1, 6, 2, 2)  # P1/2
        self.dark2 = nn.Sequential(Conv(c1, c2, 3, 2), C3(c2, c2, depths[0]))  # P2/4
        self.dark3 = nn.Sequential(Conv(c2, c3, 3, 2), C3(c3, c3, depths[1]))  # P3/8
        self.dark4 = nn.Sequential(Conv(c3, c4, 3, 2), C3(c4, c4, depths[2]))  # P4/16
        self.dark5 = nn.Sequential(Conv(c4, c5, 3, 2), C3(c5, c5, depths[3]), SPPF(c5, c5))  # P5/32

    def forward(self, x: Tensor) -> list:
        """[B, 3, H, W] -> [C3, C4, C5] [B, c_l, H/s, W/s], s = 8, 16, 32."""
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        return [c3, c4, self.dark5(c4)]


class PAN(nn.Module):
    """Neck (yolov5 layers 10-23, its yaml's "head"): top-down like an FPN (1x1 lateral conv, nearest 2x upsampling,
    concatenation, C3), then bottom-up as PANet (3x3 stride-2 conv, concatenation with the top-down map, C3)."""

    def __init__(self, channels: list, depth: int):
        super().__init__()
        c3, c4, c5 = channels[2:]
        self.lateral5 = Conv(c5, c4)  # 10
        self.top_down4 = C3(2 * c4, c4, depth, shortcut=False)  # 13
        self.lateral4 = Conv(c4, c3)  # 14
        self.top_down3 = C3(2 * c3, c3, depth, shortcut=False)  # 17: P3 out
        self.down3 = Conv(c3, c3, 3, 2)  # 18
        self.bottom_up4 = C3(2 * c3, c4, depth, shortcut=False)  # 20: P4 out
        self.down4 = Conv(c4, c4, 3, 2)  # 21
        self.bottom_up5 = C3(2 * c4, c5, depth, shortcut=False)  # 23: P5 out

    def forward(self, features: list) -> list:
        """[C3, C4, C5] -> [P3, P4, P5] [B, c_l, H/s, W/s], s = 8, 16, 32."""
        c3, c4, c5 = features
        lateral5 = self.lateral5(c5)
        lateral4 = self.lateral4(self.top_down4(torch.cat([F.interpolate(lateral5, scale_factor=2.0), c4], 1)))
        p3 = self.top_down3(torch.cat([F.interpolate(lateral4, scale_factor=2.0), c3], 1))
        p4 = self.bottom_up4(torch.cat([self.down3(p3), lateral4], 1))
        return [p3, p4, self.bottom_up5(torch.cat([self.down4(p4), lateral5], 1))]


class Detect(nn.Module):
    """Head (yolov5 layer 24): per level a 1x1 conv to A x (4 box, 1 objectness, K class) logits. Holds the anchors,
    [L, A, 2] (w, h) in pixels, as a buffer: AutoAnchor's anchors are saved with the weights."""

    def __init__(self, in_channels: list, num_classes: int, anchors: tuple):
        super().__init__()
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(len(anchors), -1, 2))
        A, O = self.anchors.shape[1], 5 + num_classes
        self.convs = nn.ModuleList(nn.Conv2d(c, A * O, 1) for c in in_channels)
        with torch.no_grad():  # priors on top of the default init (RetinaNet section 3.3; yolov5's _initialize_biases)
            for conv, stride in zip(self.convs, STRIDES):
                bias = conv.bias.view(A, O)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)  # about 8 objects in a 640 x 640 image
                bias[:, 5:] += math.log(0.6 / (num_classes - 0.99999))  # class probability ~0.6 / K

    def forward(self, features: list) -> list:
        """[P3, P4, P5] -> L raw outputs [B, A, H_l, W_l, O], float32 also under autocast."""
        outputs = []
        for feature, conv in zip(features, self.convs):
            x = conv(feature)  # [B, A * O, H_l, W_l]
            B, _, H, W = x.shape
            outputs.append(x.view(B, len(self.anchors[0]), -1, H, W).permute(0, 1, 3, 4, 2).contiguous().float())
        return outputs

    def grid_anchors(self) -> Tensor:
        """The anchors [L, A, 2] in grid units of their level (pixels / stride); Python strides, no copy to a GPU."""
        return torch.stack([a / stride for a, stride in zip(self.anchors, STRIDES)])


class YOLO(nn.Module):
    """model.train(): model(images, targets) -> {"box", "obj", "cls"}; model.eval(): model(images) -> list of
    {"boxes" [D, 4] xyxy in input pixels, "scores" [D], "labels" [D] in 1..K}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        if cfg.image_size % STRIDES[-1] or cfg.image_size <= 0:
            raise ValueError(f"image_size {cfg.image_size}: not a positive multiple of {STRIDES[-1]} (the coarsest "
                             "stride)")
        self.cfg = cfg
        depth = cfg.depth_multiple or SCALES[cfg.backbone][0]
        width = cfg.width_multiple or SCALES[cfg.backbone][1]
        channels = [math.ceil(c * width / 8) * 8 for c in (64, 128, 256, 512, 1024)]  # yolov5's make_divisible
        self.backbone = CSPDarknet(channels, [max(round(n * depth), 1) for n in (3, 6, 9, 3)])
        if load_backbone and cfg.backbone_weights != "none":  # a state dict of this model or of v7.0's (converted)
            def backbone_of(state_dict):  # a checkpoint of this file (best.pt) holds it under "model"
                state_dict = state_dict.get("model", state_dict)
                state_dict = convert_yolov5(state_dict) if "model.0.conv.weight" in state_dict else state_dict
                return {k[9:]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            data.load_backbone_weights(self.backbone, cfg.backbone_weights, backbone_of)
        self.neck = PAN(channels, max(round(3 * depth), 1))
        self.head = Detect(channels[2:], cfg.num_classes - 1, cfg.anchors)
        for module in self.modules():  # yolov5's initialize_weights (conv weights keep PyTorch's default init)
            if isinstance(module, nn.BatchNorm2d):
                module.eps, module.momentum = 1e-3, cfg.bn_momentum

    def forward(self, images: list, targets: list = None):
        if self.training:
            check_targets(images, targets, "YOLO")
        batch, targets, frames = letterbox(images, targets, self.cfg, self.training)  # [B, 3, H, W]
        outputs = self.head(self.neck(self.backbone(batch)))  # L x [B, A, H_l, W_l, O]
        if self.training:
            gt = yolo_targets(targets, batch.shape[-2:])  # [N, 6]
            return compute_loss(outputs, gt, self.head.grid_anchors(), self.cfg)
        detections = []
        for (boxes, scores, labels), (r, left, top), image in zip(
                postprocess_detections(outputs, self.head.anchors, self.cfg), frames, images):
            boxes[:, 0::2] -= left  # back to the input image's pixels (Python numbers, as letterbox)
            boxes[:, 1::2] -= top
            detections.append({"boxes": clip_boxes_to_image(boxes / r, image.shape[-2:]), "scores": scores,
                               "labels": labels + 1})
        return detections


# v7.0's DetectionModel numbers its layers (model.0 ... model.24); ours are named
YOLOV5_LAYERS = ["backbone.stem", "backbone.dark2.0", "backbone.dark2.1", "backbone.dark3.0", "backbone.dark3.1",
                 "backbone.dark4.0", "backbone.dark4.1", "backbone.dark5.0", "backbone.dark5.1", "backbone.dark5.2",
                 "neck.lateral5", None, None, "neck.top_down4", "neck.lateral4", None, None, "neck.top_down3",
                 "neck.down3", None, "neck.bottom_up4", "neck.down4", None, "neck.bottom_up5", "head"]


def convert_yolov5(state_dict: dict) -> dict:
    """The state dict of a v7.0 DetectionModel (keys model.<layer>..., anchors in grid units of their level) -> this
    file's YOLO state dict (anchors in pixels)."""
    out = {}
    for key, value in state_dict.items():
        layer, rest = re.match(r"model\.(\d+)\.(.*)", key).groups()
        if rest == "anchors":
            value = value * value.new_tensor(STRIDES)[:, None, None]  # grid units -> pixels
        rest = "convs." + rest[2:] if layer == "24" and rest.startswith("m.") else rest  # Detect's m.<l>: our convs.<l>
        out[f"{YOLOV5_LAYERS[int(layer)]}.{rest}"] = value
    return out


def reference_weights(weights: str, state_dict: dict = None):
    """--weights FILE holding the state dict of a v7.0 DetectionModel -> (this file's state dict, class names, the
    config it was built with: scale, multiples, anchors). K is read from the head; the names are COCO's for K = 80, else
    numbers. Released files (yolov5s.pt ...) are pickled models that need the yolov5 code: README says how to turn one
    into a state dict."""
    if state_dict is None or "model.0.conv.weight" not in state_dict:
        recipe = ("A released yolov5s.pt is a pickled model: in a yolov5 v7.0 checkout run  python -c \"import torch; "
                  "torch.save(torch.load('yolov5s.pt', weights_only=False)['model'].float().state_dict(), "
                  "'yolov5s_state_dict.pt')\"  and pass --weights yolov5s_state_dict.pt")
        if os.path.exists(weights):
            raise SystemExit(f"--weights {weights}: neither a checkpoint of yolo.py nor a v7.0 DetectionModel state "
                             f"dict. {recipe}")
        if weights == "torchvision":  # the other files' name for their reference's weights
            raise SystemExit(f"--weights torchvision: torchvision has no YOLOv5. {recipe}")
        released = os.path.basename(weights).startswith("yolov5")  # a released file's name: the recipe too
        raise SystemExit(f"--weights {weights}: no such file" + (f". {recipe}" if released else ""))
    state_dict = convert_yolov5(state_dict)
    anchors = state_dict["head.anchors"]  # [L, A, 2] pixels
    K = state_dict["head.convs.0.weight"].shape[0] // anchors.shape[1] - 5
    width = state_dict["backbone.dark5.0.conv.weight"].shape[0] / 1024  # the widest layer: the least rounding
    depth = sum(k.endswith("cv1.conv.weight") for k in state_dict if k.startswith("backbone.dark4.1.m.")) / 9
    scale = min(SCALES, key=lambda name: abs(SCALES[name][0] - depth) + abs(SCALES[name][1] - width))
    if abs(SCALES[scale][0] - depth) < 0.01 and abs(SCALES[scale][1] - width) < 0.01:
        depth, width = SCALES[scale]  # a released scale: its yaml's numbers
    coco = [c for c in torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
            if c not in ("__background__", "N/A")]  # v7.0's 80 COCO classes, in category id order
    names = ["__background__", *(coco if K == 80 else map(str, range(1, K + 1)))]
    anchors = tuple(tuple(round(v, 4) for v in level) for level in anchors.flatten(1).tolist())
    config = dict(backbone=scale, depth_multiple=depth, width_multiple=width, anchors=anchors)
    return state_dict, tuple(names), config


# --- Targets ---


def yolo_targets(targets: list, size) -> Tensor:
    """Targets on the letterboxed batch of size (H, W) (boxes xyxy in pixels, labels 1..K) -> gt [N, 6]: image index,
    class 0..K-1, cx, cy, w, h normalised by W and H: yolov5's label format, all images in one tensor. Boxes without
    area are dropped (the ratio test would keep an inverted one) in one selection over the batch (each boolean
    selection makes a GPU wait)."""
    H, W = size
    boxes = torch.cat([t["boxes"] for t in targets]).float()  # [N, 4]
    labels = torch.cat([t["labels"] for t in targets]).to(boxes.dtype)
    image = torch.cat([torch.full_like(t["labels"], i) for i, t in enumerate(targets)]).to(boxes.dtype)
    gt = torch.stack([image, labels - 1, (boxes[:, 0] + boxes[:, 2]) / 2 / W, (boxes[:, 1] + boxes[:, 3]) / 2 / H,
                      (boxes[:, 2] - boxes[:, 0]) / W, (boxes[:, 3] - boxes[:, 1]) / H], 1)  # [N, 6]
    return gt[(gt[:, 4] > 0) & (gt[:, 5] > 0)]


# Which cells a box's centre is learnt from: its own cell, then the left, upper, right and lower neighbours. The
# offsets are subtracted from the centre (grid units), so +0.5 in x moves to the cell on the left.
NEIGHBOUR_OFFSETS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 0.5


@torch.no_grad()
def build_targets(gt: Tensor, anchors: Tensor, grid_sizes: list, anchor_t: float) -> list:
    """Which predictions learn which box (yolov5's ComputeLoss.build_targets), for the whole batch at once.
    gt [N, 6] (yolo_targets); anchors [L, A, 2] in grid units of their level (pixels / stride); grid_sizes L x (H, W).
    Returns per level a dict of P (box, anchor, cell) triples: image, anchor, gj, gi [P] (the prediction that learns:
    image, anchor, row, column), box [P, 4] (its target: centre relative to the cell's top-left corner, in (-0.5, 1.5),
    and size, in grid units), cls [P] (0..K-1).

    Unlike IoU matching (Faster R-CNN, RetinaNet), a box is learnt by EVERY anchor whose shape is close enough, on every
    level, and by up to THREE cells per anchor:
      1. shape: width and height ratios box / anchor r must satisfy max(r, 1 / r) < anchor_t (4) on both sides. The
         decoded size (2 sigmoid)^2 x anchor spans 0 ... 4 x anchor, so a box over 4 x could never be predicted by
         the anchor (the bound under anchor / 4 is yolov5's choice, symmetric). A box can match 0 to 9 anchors; one
         matching none is never learnt (AutoAnchor checks for those before training).
      2. cells: the decoded centre is 2 sigmoid - 0.5 in (-0.5, 1.5) from a cell's corner, so the neighbour nearest to
         the centre horizontally (left if the centre is in the left half of its cell, else right) and vertically can
         predict it too. That triples the positives. No neighbour beyond the grid's first and last cell (x > 1).
    The order of the triples (offset, then anchor, then box) is yolov5's: where two boxes claim the same prediction,
    the last one's IoU becomes the objectness target (compute_loss)."""
    A, device = anchors.shape[1], gt.device
    anchor_idx = torch.arange(A, device=device, dtype=gt.dtype).view(A, 1, 1).expand(A, len(gt), 1)
    pairs = torch.cat([gt[None].expand(A, -1, -1), anchor_idx], 2)  # [A, N, 7]: every (anchor, box) pair
    offsets = NEIGHBOUR_OFFSETS.to(device, non_blocking=True)  # (a blocking copy to a GPU waits for it)
    targets = []
    for level, (H_l, W_l) in enumerate(grid_sizes):
        gain = torch.tensor([1, 1, W_l, H_l, W_l, H_l, 1], dtype=gt.dtype).to(device, non_blocking=True)
        t = pairs * gain  # [A, N, 7]: centre and size in grid units of this level
        # 1. shape match: both side ratios within anchor_t
        ratio = t[..., 4:6] / anchors[level][:, None]  # [A, N, 2]
        t = t[torch.max(ratio, 1 / ratio).max(2).values < anchor_t]  # [P0, 7], anchor-major
        # 2. neighbour cells: the one across the nearer vertical and horizontal cell border, if inside the grid
        xy = t[:, 2:4]  # [P0, 2] centre in grid units
        xy_from_end = gain[[2, 3]] - xy  # distance to the right and bottom grid border
        left, up = ((xy % 1 < 0.5) & (xy > 1)).T  # [P0] each: the centre is in the left / top half of its cell
        right, down = ((xy_from_end % 1 < 0.5) & (xy_from_end > 1)).T
        chosen = torch.stack([torch.ones_like(left), left, up, right, down])  # [5, P0]: own cell always
        t = t.repeat(5, 1, 1)[chosen]  # [P, 7]
        xy = t[:, 2:4]
        cell = (xy - offsets[:, None].expand(-1, len(left), -1)[chosen]).long()  # [P, 2] (column, row)
        cell[:, 0].clamp_(0, W_l - 1)  # only a centre on the grid's far border needs it; the box target below uses the
        cell[:, 1].clamp_(0, H_l - 1)  # clamped cell, as yolov5's (its in-place clamp changes the tensor it reuses)
        targets.append({"image": t[:, 0].long(), "anchor": t[:, 6].long(), "gj": cell[:, 1], "gi": cell[:, 0],
                        "box": torch.cat([xy - cell, t[:, 4:6]], 1), "cls": t[:, 1].long()})
    return targets


def box_sizes(coco_gt: dict, image_size: int):
    """A dataset's ground truth (coco_gt()) -> (wh [N, 2] of its boxes in pixels of the images resized to image_size on
    the long side, as training sees them; image [N] the index of each box's image)."""
    index = {image["id"]: i for i, image in enumerate(coco_gt["images"])}
    long_side = np.array([max(image["width"], image["height"]) for image in coco_gt["images"]], dtype=np.float64)
    image = np.array([index[a["image_id"]] for a in coco_gt["annotations"]], dtype=np.int64)
    wh = np.array([a["bbox"][2:] for a in coco_gt["annotations"]], dtype=np.float64).reshape(-1, 2)
    return wh * (image_size / long_side[image])[:, None], image


def anchor_fit(anchors: Tensor, wh: Tensor):
    """anchors [n, 2], box sizes wh [N, 2] -> (fit [N, n], best [N]): the smaller of a box's two side ratios to the
    anchor, each taken <= 1; build_targets matches the pair when fit > 1 / anchor_t."""
    r = wh[:, None] / anchors[None]  # [N, n, 2]
    fit = torch.min(r, 1 / r).min(2).values  # [N, n]
    return fit, fit.max(1).values


@torch.no_grad()
def autoanchor(anchors: Tensor, wh: np.ndarray, image: np.ndarray, image_size: int, anchor_t: float,
               rng: np.random.Generator, generations: int = 1000):
    """yolov5's AutoAnchor (check_anchors, kmean_anchors). anchors [L, A, 2] pixels; wh [N, 2], image [N] (box_sizes).
    Best possible recall (BPR): the share of boxes that match at least one anchor, the boxes scaled by a random
    0.9-1.1 per image as training's scale augmentation would. Below 0.98: k-means (scipy, on sizes whitened by their
    std) of the boxes of 2 px or more into L x A clusters, then `generations` rounds of mutation (each anchor side x
    (1 + 0.1 x noise) with probability 0.9) keeping what raises the fitness (mean fit of the boxes' best anchor, counted
    above 1 / anchor_t); the result replaces the anchors only if its BPR is higher, sorted by area (small to P3).
    Returns (new anchors [L, A, 2] or None, a message)."""
    thr = 1 / anchor_t
    scaled = torch.tensor(wh * rng.uniform(0.9, 1.1, size=image.max(initial=0) + 1)[image, None], dtype=torch.float32)
    fit, best = anchor_fit(anchors.view(-1, 2).cpu(), scaled)
    bpr, per_box = float((best > thr).float().mean()), float((fit > thr).float().sum(1).mean())
    message = f"AutoAnchor: {per_box:.2f} anchors per box, best possible recall {bpr:.4f} of {len(wh)} boxes"
    if bpr > 0.98:
        return None, message + ": the anchors fit"
    n, sizes = anchors.shape[0] * anchors.shape[1], wh[(wh >= 2.0).any(1)].astype(np.float32)
    try:
        assert n <= len(sizes)
        std = sizes.std(0)
        k = kmeans(sizes / std, n, iter=30, seed=rng)[0] * std  # k-means on whitened sizes
        assert len(k) == n  # k-means returns fewer clusters when the sizes are too few or too alike
    except (AssertionError, ValueError):
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * image_size  # yolov5's fallback: random anchors
    sizes = torch.tensor(sizes)

    def fitness(k):
        best = anchor_fit(torch.tensor(k, dtype=torch.float32), sizes)[1]
        return float((best * (best > thr).float()).mean())

    f = fitness(k)
    for _ in range(generations):
        mutation = np.ones(k.shape)
        while (mutation == 1).all():  # until something changes
            mutation = (rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1
            mutation = mutation.clip(0.3, 3.0)
        candidate = (k * mutation).clip(min=2.0)
        if (f_candidate := fitness(candidate)) > f:
            f, k = f_candidate, candidate
    new = torch.tensor(k[np.argsort(k.prod(1))], dtype=torch.float32).view_as(anchors)  # by area: small anchors at P3
    new_bpr = float((anchor_fit(new.view(-1, 2), scaled)[1] > thr).float().mean())
    found = ", ".join(f"{w:.0f},{h:.0f}" for w, h in new.view(-1, 2).tolist())
    if new_bpr <= bpr:
        return None, message + f" < 0.98; evolved anchors reach {new_bpr:.4f}, no better: kept the anchors"
    return new.to(anchors.device), message + f" < 0.98; evolved anchors ({found}) reach {new_bpr:.4f}: using them"


# --- Loss ---


def bbox_ciou(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """[P, 4], [P, 4] cx, cy, w, h -> [P] CIoU (Zheng et al. 2020): IoU - centre distance^2 / enclosing diagonal^2 -
    alpha v, v measuring the aspect-ratio mismatch, alpha = v / (1 - IoU + v) without gradient as the paper says. The
    arithmetic is yolov5's bbox_iou (eps in the union and the diagonal), so that losses agree to float rounding
    (common.elementwise_complete_box_iou differs by up to 5e-7)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = pred.unbind(-1), target.unbind(-1)
    left1, right1, top1, bottom1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    left2, right2, top2, bottom2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = ((torch.min(right1, right2) - torch.max(left1, left2)).clamp(0) *
             (torch.min(bottom1, bottom2) - torch.max(top1, top2)).clamp(0))
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    enclosing_w = torch.max(right1, right2) - torch.min(left1, left2)
    enclosing_h = torch.max(bottom1, bottom2) - torch.min(top1, top2)
    diagonal2 = enclosing_w**2 + enclosing_h**2 + eps
    distance2 = ((left2 + right2 - left1 - right1) ** 2 + (top2 + bottom2 - top1 - bottom1) ** 2) / 4
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (distance2 / diagonal2 + v * alpha)


def compute_loss(outputs: list, gt: Tensor, anchors: Tensor, cfg: Config) -> dict:
    """yolov5's ComputeLoss. outputs: L raw [B, A, H_l, W_l, O]; gt [N, 6] (yolo_targets); anchors [L, A, 2] in grid
    units. Per level l, with the P predictions that build_targets picks:
      box: mean over P of 1 - CIoU(decoded prediction, target box), decoded as in decoding (grid units, cell-relative);
      obj: BCE of the objectness logit of EVERY cell and anchor (mean over B x A x H_l x W_l), the target being 0,
           except at the P predictions, where it is their CIoU with their box, detached and clamped at 0: objectness
           learns how good the box is, not only whether there is one (an image without boxes trains only this term);
      cls: BCE of the K class logits of the P predictions against the one-hot class (mean over P x K; none if K = 1).
    Summed over levels, obj weighted by balance (P3 4.0, P4 1.0, P5 0.4: small levels have more cells and weaker
    gradients per cell). Gains as train.py scales them: box 0.05 x 3/L, cls 0.5 x K/80 x 3/L, obj 1.0 x (image_size
    / 640)^2 x 3/L. Those are v7.0's loss items (what its progress bar shows); ComputeLoss returns their sum x B, and
    train.py multiplies by the number of processes (DDP averages gradients): we return each term x B x processes, so
    that the gradient, and with it lr, weight decay and gradient clipping, are v7.0's. Divide by B to compare."""
    K = outputs[0].shape[-1] - 5
    zero = outputs[0].sum() * 0  # (in the graph: without boxes, box and cls are still terms that backpropagate)
    box_loss, obj_loss, cls_loss = zero, zero, zero
    for level, (output, t) in enumerate(zip(outputs, build_targets(gt, anchors, [o.shape[2:4] for o in outputs],
                                                                     cfg.anchor_t))):
        obj_target = torch.zeros_like(output[..., 4])  # [B, A, H_l, W_l]
        if len(t["image"]):
            # the P predictions that learn a box: [P, 2], [P, 2], [P, 1], [P, K]
            pxy, pwh, _, pcls = output[t["image"], t["anchor"], t["gj"], t["gi"]].split((2, 2, 1, K), 1)
            pbox = torch.cat([pxy.sigmoid() * 2 - 0.5, (pwh.sigmoid() * 2) ** 2 * anchors[level][t["anchor"]]], 1)
            iou = bbox_ciou(pbox, t["box"])  # [P]
            box_loss = box_loss + (1.0 - iou).mean()
            # duplicates (two boxes, one prediction): the last write wins (on a CPU; on a GPU an arbitrary one)
            obj_target[t["image"], t["anchor"], t["gj"], t["gi"]] = iou.detach().clamp(0).to(obj_target.dtype)
            if K > 1:
                cls_loss = cls_loss + F.binary_cross_entropy_with_logits(pcls, F.one_hot(t["cls"], K).to(pcls.dtype))
        obj_loss = obj_loss + F.binary_cross_entropy_with_logits(output[..., 4], obj_target) * cfg.balance[level]
    L, B = len(outputs), outputs[0].shape[0]
    scale = B * (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
    return {"box": box_loss * (cfg.box_gain * (3 / L)) * scale,
            "obj": obj_loss * (cfg.obj_gain * ((cfg.image_size / 640) ** 2 * 3 / L)) * scale,
            "cls": cls_loss * (cfg.cls_gain * (K / 80 * 3 / L)) * scale}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(outputs: list, anchors: Tensor, cfg: Config) -> list:
    """outputs: L raw [B, A, H_l, W_l, O]; anchors [L, A, 2] pixels -> B tuples (boxes [D, 4] xyxy in letterboxed
    pixels, scores [D], labels [D] 0..K-1). Detect's decoding then non_max_suppression (val.py with multi_label;
    detect.py without): candidates with objectness > conf_thresh; score = objectness x class probability >
    conf_thresh, every class of a box (multi_label) or its best; the 30,000 best into NMS (IoU iou_thresh, classes
    kept apart by offsetting boxes by class x 7680 px); the max_det best. Unlike v7.0 there is no time limit (past
    it, v7.0 warns and returns no detections for the rest of the batch)."""
    predictions = []
    for output, anchors_l, stride in zip(outputs, anchors, STRIDES):
        B, A, H, W, O = output.shape
        ys, xs = torch.meshgrid(torch.arange(H, device=output.device, dtype=anchors.dtype),
                                torch.arange(W, device=output.device, dtype=anchors.dtype), indexing="ij")
        grid = torch.stack([xs, ys], 2).view(1, 1, H, W, 2) - 0.5  # cell corners, minus the -0.5 of 2 sigmoid - 0.5
        y = output.sigmoid()  # [B, A, H_l, W_l, O]; box outputs decoded in place:
        y[..., :2] = (y[..., :2] * 2 + grid) * stride  # centre in pixels
        y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchors_l.view(1, A, 1, 1, 2)  # size in pixels, 0 ... 4 x anchor
        predictions.append(y.view(B, -1, O))
    detections = []
    for x in torch.cat(predictions, 1):  # [H_l x W_l x A summed over levels, O] per image
        x = x[x[:, 4] > cfg.conf_thresh]
        boxes, scores = box_cxcywh_to_xyxy(x[:, :4]), x[:, 5:] * x[:, 4:5]  # [n, 4], [n, K]
        if cfg.multi_label and scores.shape[1] > 1:
            i, labels = (scores > cfg.conf_thresh).nonzero().T
            boxes, scores = boxes[i], scores[i, labels]
        else:
            scores, labels = scores.max(1)
            keep = scores > cfg.conf_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if not len(scores):  # none left (the host knows the count after a selection): as v7.0, skip the rest
            detections.append((boxes, scores, labels))
            continue
        order = scores.argsort(descending=True)[:30000]
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        keep = torchvision.ops.nms(boxes + labels[:, None].to(boxes.dtype) * 7680, scores, cfg.iou_thresh)
        keep = keep[: cfg.max_det]
        detections.append((boxes[keep], scores[keep], labels[keep]))
    return detections


# The training recipe, still before the Training section: v7.0's pieces of training that the ALGO LOGIC block below
# uses: AutoAnchor on the training set, the lr and momentum schedule, and the augmentation (mosaic, random scale and
# translation, HSV, flip).


def run_autoanchor(model: YOLO, cfg: Config, train_set) -> str:
    """AutoAnchor (autoanchor) on the boxes of the training set, letterboxed to image_size; replaces the model's
    anchors when it finds better ones. Returns what it found."""
    wh, image = box_sizes(train_set.coco_gt(), cfg.image_size)
    anchors, message = autoanchor(model.head.anchors, wh, image, cfg.image_size, cfg.anchor_t,
                                  np.random.default_rng(cfg.seed))
    if anchors is not None:
        model.head.anchors.copy_(anchors)
    return message


def smart_optimizer(model: nn.Module, cfg: Config, world_size: int) -> torch.optim.Optimizer:
    """v7.0's smart_optimizer: SGD nesterov (or Adam / AdamW with betas (momentum, 0.999)) with three parameter groups:
    biases (group 0: warmup_bias_lr), conv weights with weight decay x images per optimiser step / 64, batch-norm
    weights without."""
    params = ([], [], [])  # biases, conv weights, batch-norm weights
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            params[0 if name == "bias" else 2 if isinstance(module, nn.BatchNorm2d) else 1].append(parameter)
    decay = cfg.weight_decay * cfg.batch_size * world_size * cfg.accumulate / 64
    groups = [{"params": params[0]}, {"params": params[1], "weight_decay": decay}, {"params": params[2]}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    # Adam's decay is L2 in the gradient, AdamW's decoupled; either only on the conv weights
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](
        groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=0.0)


class YoloSchedule:
    """train.py's lr and momentum schedule, stepped after every batch (the template's scheduler). After warmup every
    group's lr is lr x factor(epoch), falling linearly (or along a cosine) from 1 to lrf over the epochs and changing at
    epoch boundaries (train.py's LambdaLR). During warmup, max(warmup_epochs, warmup_iters steps), each group's lr moves
    linearly to that value from 0, group 0's (the biases, smart_optimizer) from warmup_bias_lr, and momentum from
    warmup_momentum to momentum (np.interp in train.py)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
        self.optimizer, self.cfg, self.steps_per_epoch = optimizer, cfg, steps_per_epoch
        self.warmup = max(round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_iters, 1)
        self.step_count = 0
        self.apply()

    def factor(self, epoch: int) -> float:
        cfg = self.cfg
        if cfg.cos_lr:  # yolov5's one_cycle
            return (1 - math.cos(epoch * math.pi / cfg.epochs)) / 2 * (cfg.lrf - 1) + 1
        return (1 - epoch / cfg.epochs) * (1.0 - cfg.lrf) + cfg.lrf

    def apply(self):
        cfg, step = self.cfg, self.step_count
        lr = cfg.lr * self.factor(step // self.steps_per_epoch)
        for j, group in enumerate(self.optimizer.param_groups):
            if step <= self.warmup:
                start = cfg.warmup_bias_lr if j == 0 else 0.0
                group["lr"] = start + (lr - start) * step / self.warmup
                momentum = cfg.warmup_momentum + (cfg.momentum - cfg.warmup_momentum) * step / self.warmup
            else:
                group["lr"], momentum = lr, cfg.momentum
            if "momentum" in group:  # SGD; Adam's beta1 stays at cfg.momentum (train.py: if 'momentum' in x)
                group["momentum"] = momentum

    def step(self):
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict):
        self.step_count = state["step_count"]
        self.apply()


def warp(image: Tensor, scale: float, offset: Tensor, size: int) -> Tensor:
    """[3, h, w] -> [3, size, size] with out(p) = image((p - offset) / scale): scaled and shifted, bilinear, grey
    outside (cv2.warpAffine in yolov5's random_perspective)."""
    H, W = image.shape[-2:]
    centres = torch.arange(size, dtype=image.dtype) + 0.5  # output pixel centres
    x = (centres - offset[0]) / scale / W * 2 - 1  # [size] source columns, normalised as grid_sample wants
    y = (centres - offset[1]) / scale / H * 2 - 1
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij")[::-1], -1)  # [size, size, 2] (x, y)
    return F.grid_sample((image - PAD_VALUE)[None], grid[None], align_corners=False)[0] + PAD_VALUE


def augment_hsv(image: Tensor, gains: tuple) -> Tensor:
    """[3, H, W] RGB -> HSV, hue x (1 + u_h gains[0]) (wrapping around), saturation and value x (1 + u gains[1, 2])
    clipped to [0, 1], u uniform in [-1, 1] (yolov5's augment_hsv, there with cv2 on uint8) -> RGB."""
    r = [random.uniform(-1, 1) * gain + 1 for gain in gains]
    value, chroma = image.max(0).values, image.max(0).values - image.min(0).values  # [H, W]
    red, green, blue = image
    c = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(value == red, (green - blue) / c, torch.where(value == green, (blue - red) / c + 2,
                                                                    (red - green) / c + 4))
    hue = torch.where(chroma > 0, hue / 6 % 1, 0.0)  # [0, 1)
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), 0.0)
    hue, saturation, value = hue * r[0] % 1, (saturation * r[1]).clamp(0, 1), (value * r[2]).clamp(0, 1)
    k = (torch.tensor([5.0, 3.0, 1.0])[:, None, None] + hue * 6) % 6  # HSV -> RGB, one formula per channel
    return value - value * saturation * torch.clamp(torch.min(k, 4 - k), 0, 1)


class YoloAugment:
    """train.py's augmentation of a training image (utils/dataloaders.py, utils/augmentations.py): with probability
    mosaic, outside the last close_mosaic epochs, a mosaic of the image and 3 random others of the training set, each
    resized to image_size on the long side, meeting at a random point of a 2 image_size grey canvas; else the image
    letterboxed to image_size. Then a random scale (1 +- scale) and translation (+- translate) to an image_size square,
    keeping the boxes that stay wider and taller than 2 px, over 10% of their scaled area and of aspect below 100
    (box_candidates); HSV gains; a horizontal flip. v7.0's rotation, shear, perspective, vertical flip, mixup and
    copy-paste (all off in its recipes) are not implemented. The mosaic reads the training set: data.make_loader calls
    set_epoch(dataset, epoch) before each epoch; used alone, the transform takes the single-image path."""

    def __init__(self, cfg: Config):
        self.cfg, self.dataset, self.epoch = cfg, None, 0

    def set_epoch(self, dataset, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def item(self, index: int):
        """The training set's image and target at index, without this transform."""
        self.dataset.transforms = None
        try:
            return self.dataset[index]
        finally:
            self.dataset.transforms = self

    def __call__(self, image: Tensor, target: dict):
        cfg, s = self.cfg, self.cfg.image_size
        fields = [k for k in data.PER_BOX if k in target]  # one value per box
        if self.dataset is not None and self.epoch < cfg.epochs - cfg.close_mosaic and random.random() < cfg.mosaic:
            items = [(image, target)] + [self.item(i) for i in random.choices(range(len(self.dataset)), k=3)]
            random.shuffle(items)
            canvas = image.new_full((3, 2 * s, 2 * s), PAD_VALUE)
            xc, yc = (int(random.uniform(s / 2, 3 * s / 2)) for _ in range(2))  # where the four tiles meet
            boxes = []
            for i, (tile, t) in enumerate(items):  # the tiles' corners at (xc, yc): top-left, top-right, bottom-...
                tile, r = resize_long_side(tile, s, antialias=False)
                h, w = tile.shape[-2:]
                x0, y0 = xc - w * (i % 2 == 0), yc - h * (i < 2)  # the tile's top-left corner on the canvas
                x1, y1, x2, y2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)  # the part on it
                canvas[:, y1:y2, x1:x2] = tile[:, y1 - y0: y2 - y0, x1 - x0: x2 - x0]
                boxes.append(t["boxes"] * r + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
            image, boxes, centre = canvas, torch.cat(boxes).clamp(0, 2 * s), s
            values = {k: torch.cat([t[k] for _, t in items]) for k in fields}
        else:
            batch, (t,), _ = letterbox([image], [target], cfg, training=True)
            image, boxes, centre, values = batch[0], t["boxes"], s / 2, {k: target[k] for k in fields}
        # out = scale x (in - centre) + shift: the centre lands within +- translate of the middle
        scale = random.uniform(1 - cfg.scale, 1 + cfg.scale)
        shift = torch.tensor([random.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * s for _ in range(2)])
        offset = shift - scale * centre  # [2] (x, y)
        image = warp(image, scale, offset, s)
        new = (boxes * scale + offset.repeat(2)).clamp(0, s)  # [n, 4]
        w, h = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * scale**2
        keep = (w > 2) & (h > 2) & (w * h / (area + 1e-16) > 0.1) & (torch.max(w / (h + 1e-16), h / (w + 1e-16)) < 100)
        target = {**target, "boxes": new[keep], **{k: v[keep] for k, v in values.items()}}
        image = augment_hsv(image, cfg.hsv)
        return data.hflip(image, target) if random.random() < cfg.hflip_prob else (image, target)


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = YOLO  # the class the template builds, trains, evaluates and saves
PREDICT = dict(multi_label=False, conf_thresh=0.25, iou_thresh=0.45)  # --predict decodes as detect.py


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """v7.0's train.py: AutoAnchor first (the template calls this once, before the EMA copy and any step; not when
    resuming, whose checkpoint holds the anchors), then smart_optimizer and YoloSchedule."""
    if cfg.autoanchor and not cfg.resume and train_set is not None:
        message = run_autoanchor(model, cfg, train_set)  # every rank alike (same data): DDP copies stay equal
        if int(os.environ.get("RANK", 0)) == 0:
            print(message)
    optimizer = smart_optimizer(model, cfg, world_size)
    return optimizer, YoloSchedule(optimizer, cfg, steps_per_epoch)


def train_transforms(cfg: Config):
    return YoloAugment(cfg)  # mosaic, random scale and translation, HSV, flip


@torch.no_grad()
def draw_targets(model: YOLO, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the ground truth (class colours, on top) over the predictions that learn it (build_targets):
    per (box, anchor, cell) triple the cell and the anchor centred in it, P3 white, P4 yellow, P5 red."""
    batch, targets, ((r, left, top),) = letterbox([image], [target], model.cfg, training=True)
    grid_sizes = [(batch.shape[-2] // stride, batch.shape[-1] // stride) for stride in STRIDES]
    levels = build_targets(yolo_targets(targets, batch.shape[-2:]), model.head.grid_anchors(), grid_sizes,
                           model.cfg.anchor_t)
    drawn, frame = image, image.new_tensor([left, top, left, top])
    for t, stride, anchors_l, colour in zip(levels, STRIDES, model.head.anchors,
                                            ((255, 255, 255), (255, 225, 25), (230, 25, 75))):
        corner = torch.stack([t["gi"], t["gj"]], 1) * stride  # [P, 2] the cell's top-left, letterboxed pixels
        centre, half = corner + stride / 2, anchors_l[t["anchor"]] / 2
        for boxes in (torch.cat([corner, corner + stride], 1), torch.cat([centre - half, centre + half], 1)):
            drawn = draw_boxes(drawn, (boxes - frame) / r, color=colour, width=1)
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
