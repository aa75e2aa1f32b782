"""SSD300 with a VGG16 backbone, torchvision's ssd300_vgg16 semantics.

Paper: Liu, Anguelov, Erhan, Szegedy, Reed, Fu, Berg, "SSD: Single Shot MultiBox Detector", ECCV 2016
(https://arxiv.org/abs/1512.02325).

What this file implements, in the order the data flows (torchvision/models/detection/ssd.py is the reference, and
test_models.py proves that this file gives torchvision's detections and losses with the same weights):
  - preprocessing inside the model: Caffe-style normalisation (0..255 RGB minus the mean colour, as the VGG16 weights
    were trained), every image squashed to size x size (300; aspect not kept); detections are mapped back to each input
    image's pixels;
  - backbone: VGG16 (pool3 in ceil mode, so that conv4_3 is 38 x 38), conv4_3 L2-normalised with a learned scale
    (initially 20), pool5 3x3 stride 1, fc6 as a 3x3 conv with dilation 6 and fc7 as a 1x1 conv, four extra blocks:
    six maps of 38, 19, 10, 5, 3, 1 cells (SSD512: seven maps, 64 .. 1);
  - head: one 3x3 conv per map for the class logits (softmax, class 0 = background) and one for the box deltas;
  - default boxes ("anchors"): 4 or 6 per cell, 8732 for 300 px; scales 0.07 .. 1.05 of the image, aspect ratios 1, 2,
    1/2 (and 3, 1/3), one more square box of scale sqrt(s_k s_k+1); assigned by IoU >= 0.5, and every ground-truth box
    also takes its best default box;
  - loss: cross-entropy on the positives and the hardest negatives (3 per positive, per image) and smooth L1 on the
    positives' deltas (box coder weights 10, 10, 5, 5), both divided by the batch's number of positives;
  - decoding: softmax, per class the scores > 0.01 and the best 400, NMS 0.45 per class, 200 detections per image.
Assignment, loss and decoding run for the whole batch at once: ground truth is padded to [B, M] with a validity mask,
and the candidates of every image and class go through one batched NMS. (torchvision loops over images.)

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python ssd.py --train                              # synthetic shapes, from scratch, no download; CPU: preset cpu
    python ssd.py --train --preset coco --data-root DIR             # torchvision's COCO recipe (or --data voc)
    python ssd.py --train --resume runs/ssd/last.pt                 # go on after Ctrl-C, SIGTERM or a crash
    python ssd.py --eval --weights torchvision --data coco --data-root DIR
    python ssd.py --predict IMG_OR_DIR --weights runs/ssd/best.pt --out DIR
    python ssd.py --show-targets --augment ssd --out DIR            # augmented images, matched default boxes
    torchrun --nproc_per_node=8 ssd.py --train ...                  # several GPUs
    python -m pytest -q test_models.py -k ssd                      # parity with torchvision

Tensor shapes (legend used in every comment below):
    B images in the batch, S = size (300), L = 6 feature maps (SSD512: 7), A default boxes of all maps of one image
    (A_loc = 4 or 6 per cell), M ground-truth boxes per image (padded to the batch maximum), K classes including the
    background (num_classes), C feature channels, N candidates of the whole batch, D detections of one image.
    Boxes are xyxy in pixels of the S x S image unless a comment says otherwise.
"""
import contextlib
import copy
import dataclasses
import datetime
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
from torchvision.ops import nms
from torchvision.transforms import v2

import data
from common import (PALETTE, BoxCoder, check_images, check_targets, clip_boxes_to_image, draw_boxes,
                    elementwise_box_iou, pad_targets, resize_boxes)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python ssd.py --train), from random weights; torchvision's value is
    # in brackets where it differs. PRESETS below: torchvision's COCO recipe, and a run sized for a CPU.
    # model
    num_classes: int = 7  # K: foreground classes + 1 (index 0 background); --train takes it from the data [COCO: 91]
    backbone: Literal["vgg16", "vgg16_bn"] = "vgg16_bn"  # vgg16_bn: BatchNorm after every conv, see Backbone [vgg16]
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH to a VGG16 state dict
    trainable_backbone_layers: int = 4  # with pretrained weights: VGG's last 4 of 5 stages train (conv1_x frozen)
    width: float = 1.0  # channels of every backbone and extra layer x this (the cpu preset and the tests: narrower)
    # preprocessing
    size: Literal[300, 512] = 300  # every image is resized to size x size, aspect not kept: SSD300 | SSD512
    image_mean: tuple = (0.48235, 0.45882, 0.40784)  # Caffe VGG16's mean colour, RGB in [0, 1] ...
    image_std: tuple = (1 / 255, 1 / 255, 1 / 255)  # ... and 1/255: the network sees 0..255 minus the mean
    # default boxes ("anchors") and their assignment
    aspect_ratios: tuple = ()  # per map, the ratios r > 1 that add boxes r:1 and 1:r; empty: DEFAULT_BOXES[size]'s
    scales: tuple = ()  # box side / size per map and one more; empty: DEFAULT_BOXES[size]'s; two values: s_min s_max
    iou_thresh: float = 0.5  # default box IoU >= this: positive (and every ground truth takes its best default box)
    # loss
    neg_to_pos_ratio: float = 3.0  # hard negatives kept per positive, per image (torchvision: positive_fraction 0.25)
    # decoding
    score_thresh: float = 0.01  # keep (default box, class) pairs with a softmax probability above this
    topk_candidates: int = 400  # ... and at most this many per class and image
    nms_thresh: float = 0.45  # NMS IoU, applied per class
    detections_per_img: int = 200  # detections kept per image
    # data (data.build_datasets)
    data: Literal["synthetic", "coco", "voc"] = "synthetic"  # coco: images in the folder named as the json, ...
    data_root: str = ""  # dataset folder for coco / voc (coco images: ... else in JPEGImages/ or images/)
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 300  # synthetic: image side in pixels
    num_train: int = 10000  # synthetic: training images
    num_val: int = 500  # synthetic: validation images
    augment: Literal["ssd", "flip"] = "flip"  # ssd: photometric distortion, zoom out, IoU crop, flip | flips [ssd]
    zoom_out_max: float = 4.0  # ssd: zoom out onto a canvas up to this many times the image side (mean colour)
    hflip_prob: float = 0.5  # horizontal flip probability
    # training (torchvision's recipe: 120 epochs of 32 images per step, lr 0.002 with steps at 80 and 110)
    epochs: int = 20  # passes over the training set [120]
    batch_size: int = 32  # images per step and per process [4 per GPU x 8 GPUs]
    lr: float = 1e-3  # learning rate for 32 images per step, scaled linearly to batch_size x processes [0.002]
    optimizer: Literal["sgd", "adamw"] = "adamw"  # adamw: the runs from scratch | sgd: with pretrained VGG16 [sgd]
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on all trained parameters (sgd: L2; adamw: decoupled)
    lr_steps: tuple = (14, 18)  # epochs at which the lr is multiplied by lr_gamma [80, 110]
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
    out: str = "runs/ssd"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # torchvision (COCO) | PATH to a checkpoint or torchvision state dict: start from / evaluate
    draw_thresh: float = 0.5  # --predict draws detections scoring at least this


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # ~10 minutes on 2 CPU cores with AVX-512 (~19 AVX2-only, estimated): an eighth-width VGG16-BN from scratch (1/64
    # of the compute), AdamW, flips only; channels_last: its training step 1.45x faster there (1.11x on AVX2; README)
    "cpu": dict(width=0.125, image_size=128, num_train=2500, num_val=200, batch_size=16, epochs=5, lr_steps=(4,),
                lr=4e-3, warmup_iters=50, workers=1, channels_last=True),
    # torchvision's COCO recipe (ImageNet VGG16, 120 epochs of 4 images x 8 GPUs, SSD augmentation)
    "coco": dict(data="coco", backbone="vgg16", backbone_weights="imagenet", augment="ssd", epochs=120, batch_size=4,
                 optimizer="sgd", lr=0.002, lr_steps=(80, 110), warmup_iters=1000),
}
# torchvision's ssd300_vgg16: its model and preprocessing, for --weights torchvision or its state dicts
TORCHVISION_CONFIG = dict(backbone="vgg16", width=1.0, size=300, image_mean=(0.48235, 0.45882, 0.40784),
                          image_std=(1 / 255, 1 / 255, 1 / 255), aspect_ratios=(), scales=())
# Default boxes per input size. 300: torchvision's ssd300_vgg16 (the Caffe SSD's COCO setting: the first map at 0.07,
# then 0.15 .. 0.87 evenly, one past the last for s'_k). 512: the Caffe SSD512 COCO setting (24564 boxes, paper
# Table 7; torchvision has no SSD512 builder). steps: the image side / this = the cells per map side used to place the
# box centres (300 / 8 = 37.5, not the 38 cells of the map: the Caffe SSD's rounding, kept by torchvision).
DEFAULT_BOXES = {
    300: dict(steps=(8, 16, 32, 64, 100, 300), aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
              scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)),
    512: dict(steps=(8, 16, 32, 64, 128, 256, 512), aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
              scales=(0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06)),
}


# --- Model ---


def preprocess(images: list, targets, cfg: Config):
    """Normalise and resize a list of [3, h_i, w_i] images in [0, 1] to the batch [B, 3, S, S] (torchvision's
    GeneralizedRCNNTransform with fixed_size: normalise first, then bilinear resize without antialiasing); targets with
    their boxes resized (a copy; None stays None)."""
    check_images(images)  # float [3, h, w]; mean and std take their dtype (a model cast to bf16 runs on bf16 images)
    # (non_blocking: a blocking copy to a GPU would first wait for all the work queued on it)
    mean = torch.tensor(cfg.image_mean, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    batch = torch.cat([F.interpolate(((image - mean) / std)[None], size=(cfg.size, cfg.size), mode="bilinear",
                                     align_corners=False) for image in images])  # [B, 3, S, S]
    if targets is not None:
        targets = [{**t, "boxes": resize_boxes(t["boxes"], image.shape[-2:], (cfg.size, cfg.size))}
                   for t, image in zip(targets, images)]
    return batch, targets


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")  # cfg "D"


def conv_block(in_channels: int, out_channels: int, norm: bool, **conv_args) -> list:
    """conv (+ BatchNorm) + ReLU, as torchvision's VGG makes them."""
    conv = nn.Conv2d(in_channels, out_channels, **conv_args)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)] if norm else [conv, nn.ReLU(inplace=True)]


class Backbone(nn.Module):
    """VGG16 through conv5_3, then pool5 (3x3, stride 1), fc6 (3x3 conv, dilation 6) and fc7 (1x1 conv) in place of
    the fully connected layers, then the extra blocks (1x1 conv to fewer channels, 3x3 conv stride 2 or unpadded;
    SSD512's last: 4x4, padded).
    conv4_3's map is L2-normalised per position and rescaled by a learned per-channel scale starting at 20 (ParseNet;
    paper section 3.1): its features are on another scale than the later maps'.

    backbone vgg16 is torchvision's (no normalisation layers; its COCO weights need it). vgg16_bn, the default here,
    puts BatchNorm after every VGG, fc and extra conv but the last (its 1 x 1 map would give batch norm one value per
    channel and image: batch 1 could not train): from random weights, plain VGG16 on Caffe-scaled input (0..255)
    starts with fc7 activations in the hundreds and class logits to match (a first classification loss of ~60 per
    positive), and trains slowly and unstably; with BatchNorm it trains from scratch like any modern network.
    (vgg16_bn's ImageNet weights, torchvision's IMAGENET1K_V1, expect [0, 1] input normalised with ImageNet's mean and
    std: pass --image-mean 0.485 0.456 0.406 --image-std 0.229 0.224 0.225 with them.)
    width scales every channel count (0.25: 1/16 of the compute), for CPU runs and tests."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        if not (0 <= cfg.trainable_backbone_layers <= 5 and cfg.width > 0):
            raise ValueError(f"trainable_backbone_layers {cfg.trainable_backbone_layers} must be 0..5 (VGG16's five "
                             f"stages) and width {cfg.width} above 0")
        norm = cfg.backbone == "vgg16_bn"

        def w(channels):
            return max(1, round(channels * cfg.width))
        vgg, c = [], 3  # torchvision's vgg16(_bn).features: conv1_1 .. conv5_3 and the five max pools
        for v in VGG16_LAYERS:
            vgg += [nn.MaxPool2d(2, 2)] if v == "M" else conv_block(c, w(v), norm, kernel_size=3, padding=1)
            c = c if v == "M" else w(v)
        vgg = nn.Sequential(*vgg)
        for m in vgg.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        if cfg.backbone_weights != "none" and load_backbone:  # load_backbone=False: every weight will be overwritten
            if cfg.backbone_weights == "imagenet":  # vgg16: the Caffe VGG16 ported, for this normalisation (0..255)
                if cfg.backbone == "vgg16_bn" and tuple(cfg.image_std) == Config.image_std:  # PyTorch-trained: [0, 1]
                    raise SystemExit("--backbone vgg16_bn --backbone-weights imagenet: its weights expect ImageNet's "
                                     "normalisation: add --image-mean 0.485 0.456 0.406 --image-std 0.229 0.224 0.225 "
                                     "(or --backbone vgg16, the Caffe VGG16 of torchvision's SSD, for the default)")
                weights = (torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES if cfg.backbone == "vgg16" else
                           torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1)
                features = {k[9:]: v for k, v in weights.get_state_dict(progress=True).items() if k[:9] == "features."}
                vgg.load_state_dict(features)
            else:  # a state dict of torchvision's VGG16 (or of its features alone)
                data.load_backbone_weights(vgg, cfg.backbone_weights, lambda state_dict: {
                    k.removeprefix("features."): v for k, v in state_dict.items() if not k.startswith("classifier.")})
        pools = [i for i, m in enumerate(vgg) if isinstance(m, nn.MaxPool2d)]
        vgg[pools[2]].ceil_mode = True  # pool3: 75 -> 38, not 37 (the paper's Fig. 2 sizes)
        # with pretrained weights, the first 5 - trainable_backbone_layers VGG stages stay frozen (torchvision)
        trainable = cfg.trainable_backbone_layers if cfg.backbone_weights != "none" or cfg.weights else 5
        frozen = vgg[: ([0] + pools[:4])[5 - trainable] if trainable else len(vgg)]
        frozen.requires_grad_(False)
        self.frozen_norms = [m for m in frozen if isinstance(m, nn.BatchNorm2d)]  # their statistics frozen too: train()
        self.features = vgg[: pools[3]]  # conv1_1 .. conv4_3 + ReLU: [B, 512, 38, 38]
        # conv4_3's L2Norm scale: 20 (per position, over 512 channels); x sqrt(width) keeps each channel's values
        # as large in a narrower network (at width 1/32 they would be 5.7x larger: class logits of std ~4)
        self.scale_weight = nn.Parameter(torch.full((w(512),), 20.0 * math.sqrt(w(512) / 512)))
        self.conv5 = nn.Sequential(*vgg[pools[3]: pools[4]])  # pool4, conv5_1 .. conv5_3 + ReLU: [B, 512, 19, 19]
        self.fc = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),  # pool5, keeping 19 x 19
                                *conv_block(w(512), w(1024), norm, kernel_size=3, padding=6, dilation=6),  # fc6
                                *conv_block(w(1024), w(1024), norm, kernel_size=1))  # fc7: [B, 1024, 19, 19]
        # extras: (in, mid, out, 3x3 stride, padding) of conv8_2 .. conv11_2 (SSD512: .. conv12_2, 4x4, padding 1)
        extras = [(1024, 256, 512, 2, 1), (512, 128, 256, 2, 1), (256, 128, 256, 1, 0), (256, 128, 256, 1, 0)]
        if cfg.size == 512:  # maps 64, 32, 16, 8, 4, 2, 1 (the Caffe SSD512; torchvision's highres path gives 6, 4, 1)
            extras = [*extras[:2], (256, 128, 256, 2, 1), (256, 128, 256, 2, 1), (256, 128, 256, 1, 1)]
        self.extras = nn.ModuleList(
            nn.Sequential(*conv_block(w(cin), w(mid), norm, kernel_size=1),
                          *conv_block(w(mid), w(cout), norm and i < len(extras) - 1, kernel_size=4 if i == 4 else 3,
                                      stride=stride, padding=padding))
            for i, (cin, mid, cout, stride, padding) in enumerate(extras))
        self.out_channels = [w(512), w(1024)] + [w(e[2]) for e in extras]  # channels of the L maps
        for m in [*self.fc.modules(), *self.extras.modules()]:  # torchvision's _xavier_init
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.0)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_norms:  # frozen stages keep their (ImageNet) batch-norm statistics
            m.eval()
        return self

    def forward(self, images: Tensor) -> list:
        """[B, 3, S, S] -> L maps [B, C_l, H_l, W_l]: 38, 19, 10, 5, 3, 1 for S = 300."""
        x = self.features(images)  # conv4_3
        maps = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]  # L2 over channels (eps 1e-12), x 20
        x = self.fc(self.conv5(x))  # fc7
        maps.append(x)
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps


class Head(nn.Module):
    """One 3x3 conv per map for the class logits (K per default box) and one for the box deltas (4 per default box):
    unlike RetinaNet's, SSD's head is not shared between maps, whose channels and scales differ."""

    def __init__(self, in_channels: list, num_anchors: list, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_logits = nn.ModuleList(nn.Conv2d(c, a * num_classes, 3, padding=1)
                                        for c, a in zip(in_channels, num_anchors))
        self.bbox_reg = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(in_channels, num_anchors))
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list):
        """L maps [B, C_l, H_l, W_l] -> cls_logits [B, A, K], bbox_regression [B, A, 4]; default boxes ordered map,
        y, x, box shape (as make_anchors)."""
        cls_logits, bbox_regression = [], []
        for feature, cls_conv, bbox_conv in zip(features, self.cls_logits, self.bbox_reg):
            B, _, H, W = feature.shape
            logits = cls_conv(feature).view(B, -1, self.num_classes, H, W)  # [B, A_loc, K, H_l, W_l]
            cls_logits.append(logits.permute(0, 3, 4, 1, 2).reshape(B, -1, self.num_classes))  # [B, H_l*W_l*A_loc, K]
            deltas = bbox_conv(feature).view(B, -1, 4, H, W)  # [B, A_loc, 4, H_l, W_l]
            bbox_regression.append(deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4))  # [B, H_l * W_l * A_loc, 4]
        return torch.cat(cls_logits, 1), torch.cat(bbox_regression, 1)  # [B, A, K], [B, A, 4]


def default_box_settings(cfg: Config):
    """(steps, aspect_ratios, scales) of cfg.size, with the Config's aspect_ratios and scales where given. Two scales
    (s_min, s_max) are spread evenly over the maps (paper eq. 4) and 1.0 appended, as torchvision's DefaultBoxGenerator
    does without explicit scales: 0.2 0.9 is the paper's VOC setting."""
    steps, aspect_ratios, scales = DEFAULT_BOXES[cfg.size].values()
    aspect_ratios, scales, L = cfg.aspect_ratios or aspect_ratios, cfg.scales or scales, len(steps)
    if len(scales) == 2:
        scales = [scales[0] + (scales[1] - scales[0]) * k / (L - 1.0) for k in range(L)] + [1.0]
    if len(aspect_ratios) != L or len(scales) != L + 1:
        raise ValueError(f"size {cfg.size} has {L} maps: aspect_ratios needs {L} tuples, scales {L + 1} values (or 2)")
    return steps, aspect_ratios, scales


def make_anchors(grid_sizes: list, cfg: Config, device=None) -> Tensor:
    """The default boxes of all maps, the same for every image: [A, 4] xyxy in pixels of the S x S image, ordered map,
    y, x, box shape. grid_sizes: L sizes (H_l, W_l) of the feature maps.
    Per cell, in torchvision's order: a square of side s_k, a square of side sqrt(s_k s_k+1), then for each ratio r a
    box s_k sqrt(r) wide and s_k / sqrt(r) high and its transpose (paper section 2.2, "Choosing scales and aspect
    ratios"). Widths and heights are clipped to the image (torchvision's clip=True; centres are not)."""
    steps, aspect_ratios, scales = default_box_settings(cfg)
    anchors = []
    for k, ((H_l, W_l), step, ratios) in enumerate(zip(grid_sizes, steps, aspect_ratios)):
        s_k, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
        wh = [[s_k, s_k], [s_prime, s_prime]]
        for r in ratios:
            wh += [[s_k * math.sqrt(r), s_k / math.sqrt(r)], [s_k / math.sqrt(r), s_k * math.sqrt(r)]]
        wh = torch.tensor(wh).to(device, non_blocking=True).clamp(min=0, max=1)  # [A_loc, 2] (w, h), image fractions
        cells = cfg.size / step  # cells per side that place the centres (37.5 for 300 / 8)
        cy, cx = torch.meshgrid((torch.arange(H_l, device=device) + 0.5) / cells,
                                (torch.arange(W_l, device=device) + 0.5) / cells, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(wh), 2)  # [H_l * W_l, A_loc, 2]
        anchors.append(torch.cat([centres, wh.expand_as(centres)], dim=-1).reshape(-1, 4))  # cx, cy, w, h
    anchors = torch.cat(anchors)  # [A, 4] cxcywh, fractions of the image
    return torch.cat([anchors[:, :2] - 0.5 * anchors[:, 2:], anchors[:, :2] + 0.5 * anchors[:, 2:]], 1) * cfg.size


class SSD(nn.Module):
    """model.train(): model(images, targets) -> dict of losses; model.eval(): model(images) -> list of
    {"boxes" [D, 4] xyxy in input pixels, "scores" [D], "labels" [D]}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        steps, aspect_ratios, _ = default_box_settings(cfg)  # checks the Config's default box settings
        self.backbone = Backbone(cfg, load_backbone)
        self.head = Head(self.backbone.out_channels, [2 + 2 * len(r) for r in aspect_ratios], cfg.num_classes)
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def forward(self, images: list, targets: list = None):
        if self.training:
            check_targets(images, targets, "SSD")
        cfg = self.cfg
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = preprocess(images, targets, cfg)  # [B, 3, S, S]
        features = self.backbone(batch)  # L maps [B, C_l, H_l, W_l]
        cls_logits, bbox_regression = self.head(features)  # [B, A, K], [B, A, 4]
        # losses and decoding in float32 under autocast: bf16 has 8 bits of mantissa, pixels off by one at 300 px
        cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
        anchors = make_anchors([f.shape[-2:] for f in features], cfg, batch.device)  # [A, 4]

        if self.training:
            gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [B, M, 4], [B, M], [B, M]
            matched_idxs = assign_anchors(anchors, gt_boxes, gt_valid, cfg)  # [B, A]
            return compute_loss(cls_logits, bbox_regression, anchors, matched_idxs, gt_boxes, gt_labels,
                                self.box_coder, cfg)

        detections = postprocess_detections(cls_logits, bbox_regression, anchors, self.box_coder, cfg)
        for det, original_size in zip(detections, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], (cfg.size, cfg.size), original_size)  # to the input's pixels
        return detections


TORCHVISION_WEIGHTS = torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1  # --weights torchvision


def convert_torchvision(state_dict: dict) -> dict:
    """A torchvision ssd300_vgg16 state dict (any num_classes) -> this file's SSD state dict. torchvision's
    backbone.extra.0 holds conv5 (pool4 .. conv5_3, 0-6) and fc (7); its extra.1-4 are our extras.0-3."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^backbone\.extra\.0\.([0-6])\.", r"backbone.conv5.\1.", key)
        key = key.replace("backbone.extra.0.7.", "backbone.fc.")
        key = re.sub(r"^backbone\.extra\.(\d+)\.", lambda m: f"backbone.extras.{int(m[1]) - 1}.", key)
        key = key.replace("head.classification_head.module_list.", "head.cls_logits.")
        out[key.replace("head.regression_head.module_list.", "head.bbox_reg.")] = value
    return out


def reference_weights(weights: str, state_dict: dict = None):
    """--weights torchvision (its COCO weights, downloaded) or a file of torchvision's ssd300_vgg16 state dict -> (this
    file's state dict, class names, TORCHVISION_CONFIG: the settings that model was built with). K is read from the
    first map's class logits [4 K, 512, 3, 3]; the class names are COCO's for K = 91, else numbers."""
    if state_dict is None and weights != "torchvision":
        raise SystemExit(f"--weights {weights}: {'not a checkpoint' if os.path.exists(weights) else 'no such file'} "
                         "(--weights torchvision: torchvision's COCO weights)")
    try:
        state_dict = convert_torchvision(state_dict or TORCHVISION_WEIGHTS.get_state_dict(progress=True))
    except OSError as e:  # no internet
        raise SystemExit(f"--weights torchvision: cannot download {TORCHVISION_WEIGHTS.url} ({e})") from None
    if "head.cls_logits.0.weight" not in state_dict:  # e.g. another detector's state dict
        raise SystemExit(f"--weights {weights}: neither a checkpoint of ssd.py nor a ssd300_vgg16 state dict")
    K = state_dict["head.cls_logits.0.weight"].shape[0] // 4
    names = TORCHVISION_WEIGHTS.meta["categories"] if K == 91 else ["__background__", *map(str, range(1, K))]
    return state_dict, tuple(names), TORCHVISION_CONFIG


# --- Targets ---

BACKGROUND = -1  # matched_idxs value: a negative (IoU below iou_thresh with every ground-truth box, and nobody's best)


@torch.no_grad()
def assign_anchors(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, cfg: Config) -> Tensor:
    """anchors [A, 4], gt_boxes [B, M, 4], gt_valid [B, M] -> matched_idxs [B, A]: the index of the ground-truth box
    each default box learns, or BACKGROUND. torchvision's SSDMatcher for the whole batch (paper section 2.2, "Matching
    strategy"): the best ground truth where its IoU >= iou_thresh, and every ground truth takes its best default box
    whatever the IoU, so that each one has a positive; where two share their best default box, the later one gets it."""
    iou = elementwise_box_iou(gt_boxes[:, :, None, :], anchors[None, None])  # [B, M, A]
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)  # padding and degenerate boxes match nothing
    matched_vals, matches = iou.max(dim=1)  # [B, A]: the best ground truth of each default box (the first on ties)
    matched_idxs = torch.where(matched_vals >= cfg.iou_thresh, matches, BACKGROUND)
    best_anchor = iou.max(dim=2).indices  # [B, M]: each ground truth's best default box
    gt_idx = torch.arange(gt_boxes.shape[1], device=anchors.device).expand_as(best_anchor)  # [B, M]
    forced = torch.full_like(matched_idxs, BACKGROUND).scatter_reduce(  # the highest (latest) index wins a shared box
        1, best_anchor, torch.where(gt_valid, gt_idx, BACKGROUND), "amax")  # [B, A]
    return torch.where(forced >= 0, forced, matched_idxs)


# --- Loss ---


@torch.no_grad()
def hard_negatives(cls_loss: Tensor, foreground: Tensor, neg_to_pos_ratio: float) -> Tensor:
    """cls_loss [B, A] (cross-entropy of each default box against its target), foreground [B, A] -> [B, A] mask of the
    negatives that count: per image the neg_to_pos_ratio x (its positives) with the highest loss (paper section 2.2,
    "Hard negative mining"). An image without positives gets none (torchvision; so it adds no loss at all). The rank
    of each default box in its image's descending loss order is argsort(argsort), as torchvision computes it.
    As torchvision's, the mask also takes positives (ranked last) when an image has fewer negatives than it wants, i.e.
    when over a quarter of its default boxes are positive: their loss then counts twice."""
    num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)  # [B, 1]
    negative_loss = cls_loss.masked_fill(foreground, -math.inf)  # positives rank last
    order = negative_loss.sort(1, descending=True).indices  # [B, A]
    return order.sort(1).indices < num_negative  # rank < number to keep


def compute_loss(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, matched_idxs: Tensor, gt_boxes: Tensor,
                 gt_labels: Tensor, box_coder: BoxCoder, cfg: Config) -> dict:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4], matched_idxs [B, A], gt_boxes [B, M, 4],
    gt_labels [B, M]. Softmax cross-entropy over the positives and the hard negatives, smooth L1 (beta 1) over the
    positives' deltas; both summed over the batch and divided by its number of positives (paper eq. 1, alpha = 1).
    Dense over [B, A] with masks: no host synchronisation."""
    foreground = matched_idxs >= 0  # [B, A]
    num_foreground = foreground.sum().clamp(min=1)
    matched = matched_idxs.clamp(min=0)  # [B, A]; background rows are masked below
    gt_classes_target = torch.where(foreground, gt_labels.gather(1, matched), 0)  # [B, A], 0 = background
    matched_gt_boxes = gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4))  # [B, A, 4]
    target_regression = box_coder.encode(matched_gt_boxes, anchors[None])  # [B, A, 4] (garbage for background ...)
    target_regression = torch.where(foreground[..., None], target_regression, 0.0)  # (... zeroed: log(0) is -inf)
    box_loss = F.smooth_l1_loss(bbox_regression, target_regression, reduction="none").sum(-1)  # [B, A]
    cls_loss = F.cross_entropy(cls_logits.flatten(0, 1), gt_classes_target.flatten(), reduction="none")
    cls_loss = cls_loss.view_as(gt_classes_target)  # [B, A]
    negatives = hard_negatives(cls_loss, foreground, cfg.neg_to_pos_ratio)  # [B, A]
    return {"bbox_regression": torch.where(foreground, box_loss, 0.0).sum() / num_foreground,
            "classification": (torch.where(foreground, cls_loss, 0.0).sum()
                               + torch.where(negatives, cls_loss, 0.0).sum()) / num_foreground}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, box_coder: BoxCoder,
                           cfg: Config) -> list:
    """cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4] -> B dicts with boxes [D, 4] (in the S x S
    image), scores [D], labels [D]. Softmax over the classes; per image and foreground class the probabilities above
    score_thresh, at most topk_candidates of them, decoded and clipped; NMS per image and class; the best
    detections_per_img per image. Selection and decoding run for the whole batch at once (torchvision loops over
    images and classes); only NMS runs group by group, on contiguous slices, as torchvision's batched_nms does."""
    B, A, K = cls_logits.shape
    scores = F.softmax(cls_logits, dim=-1)[..., 1:].transpose(1, 2)  # [B, K - 1, A]: class 0 is background
    # the best topk_candidates per image and class, then those above score_thresh: the same set as thresholding first
    top_scores, top_anchor = scores.topk(min(cfg.topk_candidates, A), dim=2)  # [B, K - 1, k], best first
    image_idx, class_idx, rank = torch.where(top_scores > cfg.score_thresh)  # [N] each, grouped by image and class
    anchor_idx = top_anchor[image_idx, class_idx, rank]  # [N]
    boxes = box_coder.decode(bbox_regression[image_idx, anchor_idx], anchors[anchor_idx])  # [N, 4]
    boxes = clip_boxes_to_image(boxes, (cfg.size, cfg.size))
    scores, labels = top_scores[image_idx, class_idx, rank], class_idx + 1  # [N] each
    # NMS within each (image, class) group: a group is a contiguous slice of the N candidates
    keep, start = [image_idx.new_zeros(0)], 0
    for n in torch.bincount(image_idx * (K - 1) + class_idx, minlength=B * (K - 1)).tolist():
        if n:
            keep.append(nms(boxes[start:start + n], scores[start:start + n], cfg.nms_thresh) + start)
        start += n
    keep = torch.cat(keep)
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]  # best first ...
    keep = keep[torch.argsort(image_idx[keep], stable=True)]  # ... within each image
    counts = torch.bincount(image_idx[keep], minlength=B)  # [B] detections per image after NMS
    rank = torch.arange(len(keep), device=keep.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    keep = keep[rank < cfg.detections_per_img]  # the best detections_per_img of each image
    counts = counts.clamp(max=cfg.detections_per_img).tolist()
    return [{"boxes": b, "scores": s, "labels": l}
            for b, s, l in zip(boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts))]


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = SSD  # the class the template builds, trains, evaluates and saves
PREDICT = {}  # --predict's Config values where no flag sets them (yolo.py: detect.py's); none here


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """torchvision's recipe: SGD with momentum (or AdamW) and weight decay, cfg.lr for 32 images scaled linearly to the
    global batch, a linear warmup (at most a third of the run), x lr_gamma at each of lr_steps. The global batch
    counts --accumulate's batches too: SGD's step grows with their summed gradients, AdamW's, scale-free, by the lr."""
    images = cfg.batch_size * world_size * (cfg.accumulate if cfg.optimizer == "adamw" else 1)
    params, lr = [p for p in model.parameters() if p.requires_grad], cfg.lr * images / 32
    optimizer = (torch.optim.SGD(params, lr, cfg.momentum, weight_decay=cfg.weight_decay, fused=params[0].is_cuda)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr, weight_decay=cfg.weight_decay))
    warmup = data.warmup_steps(cfg, steps_per_epoch)  # (warns if shortened, or if no lr step falls within the run)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup if step < warmup else 1.0) * cfg.lr_gamma ** sum(
        step >= epoch * steps_per_epoch for epoch in cfg.lr_steps))


def train_transforms(cfg: Config):
    """augment ssd: SSD's augmentation (paper 2.2, 3.6) as torchvision's recipe, in transforms.v2: photometric
    distortion, zoom out onto the mean colour, a crop with IoU >= 0..0.9 with a box (boxes leaving it go), flip."""
    if cfg.augment == "flip":
        return data.RandomHorizontalFlip(cfg.hflip_prob)
    return data.TransformsV2(v2.Compose([
        v2.RandomPhotometricDistort(p=0.5), v2.RandomZoomOut(list(cfg.image_mean), (1.0, cfg.zoom_out_max), p=0.5),
        v2.RandomIoUCrop(), v2.RandomHorizontalFlip(cfg.hflip_prob),
        v2.SanitizeBoundingBoxes(labels_getter=data.per_box_fields)]))


@torch.no_grad()
def draw_targets(model: SSD, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the ground truth (thick) and the default boxes matched to each ground-truth box (thin), both in
    the box's class colour."""
    batch, targets = preprocess([image], [target], model.cfg)
    anchors = make_anchors([f.shape[-2:] for f in model.backbone(batch)], model.cfg, batch.device)  # [A, 4]
    gt_boxes, gt_labels, gt_valid = pad_targets(targets)  # [1, M, 4], [1, M], [1, M]
    positive = (matched_idxs := assign_anchors(anchors, gt_boxes, gt_valid, model.cfg)[0]) >= 0  # [A]
    colours = [PALETTE[label % len(PALETTE)] for label in gt_labels[0, matched_idxs[positive]].tolist()]
    boxes = resize_boxes(anchors[positive], batch.shape[-2:], image.shape[-2:])  # matched default boxes, image pixels
    drawn = draw_boxes(image, boxes, color=colours, width=1)
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
