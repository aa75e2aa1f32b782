"""DETR: end-to-end object detection with a transformer and bipartite matching, facebookresearch/detr semantics.

Paper: Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko, "End-to-End Object Detection with Transformers",
ECCV 2020 (https://arxiv.org/abs/2005.12872). Reference: github.com/facebookresearch/detr at 29901c51 (models/detr.py,
matcher.py, transformer.py, backbone.py, position_encoding.py); test_models.py proves that this file gives its losses
(every term) and detections with the same weights.

What this file implements, in the order the data flows:
  - preprocessing inside the model: resize so the short side is min_size (long side at most max_size; in training one
    of train_min_sizes, DETR's multi-scale augmentation), ImageNet normalisation, zero padding to the batch's largest
    height and width (no rounding to a multiple of 32, unlike torchvision's detectors) and a mask of the padding;
  - backbone: a torchvision ResNet body, layer4 only (stride 32, or 16 with dilation: DC5), FrozenBatchNorm2d when
    starting from pretrained weights (frozen_bn: make_config's default); a 1x1 conv (input_proj) to the width d;
  - sine position encoding of the unpadded pixels (normalised to 2 pi; y features first, then x);
  - transformer, post-norm: an encoder over the H/32 x W/32 feature cells, a decoder of Q learned queries attending to
    them; position encodings are added to queries and keys of every attention, never to values; the decoder's final
    LayerNorm is applied to the output of every decoder layer, and each goes through the shared heads (auxiliary
    losses);
  - heads: class logits (num_classes + 1, the last one "no object") and a 3-layer MLP giving boxes as sigmoid
    normalised cx, cy, w, h;
  - Hungarian matching: cost 1 x class (-softmax probability) + 5 x L1 + 2 x (-GIoU), computed for all decoder layers
    and images at once, solved per layer and image with scipy's linear_sum_assignment;
  - loss: weighted cross-entropy over all queries (no-object weight 0.1), L1 and GIoU on the matched pairs divided by
    the number of ground-truth boxes; one set per decoder layer, each layer matched anew;
  - decoding: softmax, best class other than no-object, boxes in each input image's pixels; no NMS, every query kept.

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python detr.py --train                          # synthetic shapes, from scratch, no download; CPU: preset cpu
    python detr.py --train --preset coco --data-root DIR    # the official DETR-R50 recipe (or --data voc)
    python detr.py --train --resume runs/detr/last.pt       # go on after Ctrl-C, SIGTERM or a crash
    python detr.py --eval --weights detr-r50 --data coco --data-root DIR   # the official COCO weights (downloaded)
    python detr.py --eval --weights detr-r50-e632da11.pth ...             # ... or their file, or an official run's
    python detr.py --predict IMG_OR_DIR --weights runs/detr/best.pt --out DIR
    python detr.py --show-targets --out DIR         # each ground truth with the query matched to it
    torchrun --nproc_per_node=8 detr.py --train ...          # several GPUs
    python -m pytest -q test_models.py -k detr            # parity with the official code

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the padded batch size, h x w the feature map (H/32 x W/32), S = h * w feature cells,
    d the transformer width (hidden_dim), Q queries, L decoder layers whose outputs are supervised (dec_layers with
    aux_loss, else 1), M ground-truth boxes per image (padded to the batch maximum), K num_classes (index 0 unused, as
    everywhere in this repo) so K + 1 logits, N matched pairs, D detections of one image (= Q).
    Boxes are normalised cx, cy, w, h (fractions of the resized, unpadded image) unless a comment says otherwise.
"""
import argparse
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
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms import v2

import data
from common import (box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, check_images, check_targets, draw_boxes,
                    elementwise_generalized_box_iou, resize_boxes, valid_box_mask)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python detr.py --train), from random weights; the official value
    # (facebookresearch/detr main.py, DETR-R50) is in brackets where it differs. PRESETS below: the official COCO
    # recipe, and a run sized for a CPU. DETR learns slowly: the official run is 500 epochs of COCO.
    # model
    num_classes: int = 7  # K: foreground classes + 1 (index 0 unused); K + 1 logits, the last "no object" [COCO: 91]
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # torchvision ResNet body
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH [imagenet]
    frozen_bn: bool = False  # FrozenBatchNorm2d, stem + layer1 frozen; make_config, unless set: on if pretrained [on]
    dilation: bool = False  # DC5, resnet50/101: layer4 dilated, not strided (stride 16): small objects, ~2x compute
    hidden_dim: int = 256  # d: width of the transformer and the heads
    nheads: int = 8  # attention heads
    enc_layers: int = 3  # transformer encoder layers [6]
    dec_layers: int = 3  # transformer decoder layers [6]
    dim_feedforward: int = 1024  # hidden width of the feed-forward block of every layer [2048]
    dropout: float = 0.1  # dropout in the transformer (attention weights and residual branches)
    num_queries: int = 25  # Q: object queries, the most objects one image can give [100]
    aux_loss: bool = True  # supervise every decoder layer, each with its own matching (paper section 3.2)
    # matching and loss
    set_cost_class: float = 1.0  # matching cost weight of -p(class)
    set_cost_bbox: float = 5.0  # ... of the L1 distance of normalised cx, cy, w, h
    set_cost_giou: float = 2.0  # ... of -GIoU
    bbox_loss_coef: float = 5.0  # loss weight of L1 (the cross-entropy's is 1)
    giou_loss_coef: float = 2.0  # loss weight of 1 - GIoU
    eos_coef: float = 0.1  # cross-entropy weight of the no-object class (end of sequence)
    # preprocessing
    min_size: int = 320  # resize the short side to this (evaluation; training: train_min_sizes if given) ... [800]
    max_size: int = 320  # ... unless the long side would exceed this [1333]
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1]
    image_std: tuple = (0.229, 0.224, 0.225)
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
    train_min_sizes: tuple = ()  # training: short side drawn from these per image; none: min_size [480, 512 .. 800]
    crop_prob: float = 0.0  # with this probability: short side to one of crop_resize_sizes, then a random crop [0.5]
    crop_resize_sizes: tuple = (400, 500, 600)  # short side before the random crop (no long-side limit)
    crop_size: tuple = (384, 600)  # the crop's height and width are each drawn uniformly from this range (pixels)
    # training (the official recipe: AdamW, lr 1e-4 and 1e-5 for the backbone, batch 2 x 8 GPUs, 300 or 500 epochs)
    epochs: int = 30  # passes over the training set [300 or 500]
    batch_size: int = 16  # images per step and per process [2 per GPU x 8 GPUs]
    lr: float = 1e-4  # AdamW lr of the transformer, heads and input_proj (at 2e-4 the cpu preset's queries collapsed)
    lr_backbone: float = 2e-4  # ... of the backbone (from scratch: 2 x lr) [1e-5, from ImageNet weights]
    weight_decay: float = 1e-4  # AdamW weight decay, every trained parameter
    lr_steps: tuple = (25,)  # epochs at which the lr is multiplied by lr_gamma [200 (of 300), 400 (of 500)]
    lr_gamma: float = 0.1  # lr decay factor
    warmup_iters: int = 100  # steps of linear warmup at the start, at most a third of the run [0]
    warmup_factor: float = 0.001  # the warmup starts at lr x this
    accumulate: int = 1  # batches per optimiser step (gradient accumulation)
    ema_decay: float = 0.0  # evaluate and save an exponential moving average of the weights (0: off)
    clip_grad_norm: float = 0.1  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = False  # convolutions in channels-last memory layout (faster for some: GPU AMP, SSD on a CPU)
    # run
    workers: int = 4  # DataLoader worker processes
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds the data order, the augmentation, the model's dropout and the synthetic data
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/detr"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, PNGs
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # detr-r50 | detr-r50-dc5 | detr-r101 | detr-r101-dc5 (official, COCO) | PATH: start from / eval
    draw_thresh: float = 0.5  # --predict draws detections scoring at least this


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # ~11 minutes on 2 idle CPU cores: ResNet-18 from scratch on 3,000 128-px images, a narrow 2 + 2-layer transformer
    # at lr 1e-4 (at 2e-4 or 4e-4 all its queries collapse onto one box, README), the backbone at 4e-4
    "cpu": dict(backbone="resnet18", hidden_dim=128, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=512,
                num_queries=20, image_size=128, min_size=128, max_size=128, num_train=3000, num_val=200, batch_size=8,
                epochs=6, lr=1e-4, lr_backbone=4e-4, lr_steps=(5,), warmup_iters=50, workers=1),
    # the official recipe (main.py, README): ImageNet backbone at lr 1e-5, 800 px with DETR's multi-scale and crop
    # augmentation, 300 epochs of 2 images x 8 GPUs with the lr divided by 10 at 200, gradient norm clipped at 0.1
    "coco": dict(data="coco", backbone_weights="imagenet", enc_layers=6, dec_layers=6, dim_feedforward=2048,
                 num_queries=100, min_size=800, max_size=1333,
                 train_min_sizes=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), crop_prob=0.5, epochs=300,
                 batch_size=2, lr=1e-4, lr_backbone=1e-5, lr_steps=(200,), warmup_iters=0),
}
# the official DETR-R50: its model and preprocessing, for --weights detr-r50 and the files of official runs
OFFICIAL_CONFIG = dict(backbone="resnet50", frozen_bn=True, dilation=False, hidden_dim=256, nheads=8, enc_layers=6,
                       dec_layers=6, dim_feedforward=2048, dropout=0.1, num_queries=100, min_size=800, max_size=1333)


# --- Model ---


def resized_size(height: int, width: int, size: int, max_size: int) -> tuple:
    """The (height, width) DETR resizes an image to (datasets/transforms.py get_size_with_aspect_ratio): short side
    `size`, unless the long side would exceed max_size; the long side truncated with int(), as the official code."""
    short, long = float(min(height, width)), float(max(height, width))
    if max_size and long / short * size > max_size:
        size = max(1, int(round(max_size * short / long)))  # (the official formula gives a very thin image 0: fails)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    return (int(size * height / width), size) if width < height else (size, int(size * width / height))


def preprocess(images: list, targets, cfg: Config, training: bool):
    """Resize, normalise and pad a list of [3, h_i, w_i] images in [0, 1]. In training the short side is drawn per image
    from train_min_sizes (torch's RNG), else min_size. Returns the batch [B, 3, H, W] zero-padded to the largest
    height and width, mask [B, H, W] (True on padding), image_sizes [(h, w)] after resizing, and targets with their
    boxes resized (a copy; None stays None)."""
    check_images(images)  # float [3, h, w]; mean and std take their dtype (a model cast to bf16 runs on bf16 images)
    # (non_blocking: a blocking copy to a GPU would first wait for all the work queued on it)
    mean = torch.tensor(cfg.image_mean, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    sizes = cfg.train_min_sizes if training and cfg.train_min_sizes else (cfg.min_size,)
    resized, new_targets = [], []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        size = sizes[int(torch.randint(len(sizes), ()))] if len(sizes) > 1 else sizes[0]
        new_size = resized_size(h, w, size, cfg.max_size)
        if new_size != (h, w):  # antialiased bilinear, as the official PIL resize
            image = F.interpolate(image[None], new_size, mode="bilinear", align_corners=False, antialias=True)[0]
        resized.append((image - mean) / std)
        if targets is not None:
            new_targets.append({**targets[i], "boxes": resize_boxes(targets[i]["boxes"], (h, w), new_size)})
    image_sizes = [tuple(image.shape[-2:]) for image in resized]
    H, W = max(s[0] for s in image_sizes), max(s[1] for s in image_sizes)  # no rounding up: the official batching
    batch = resized[0].new_zeros(len(resized), 3, H, W)  # [B, 3, H, W]
    mask = torch.ones(len(resized), H, W, dtype=torch.bool, device=batch.device)  # [B, H, W]
    for i, image in enumerate(resized):  # (indexed, not views of unbind: images may require grad)
        batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
        mask[i, : image.shape[1], : image.shape[2]] = False
    return batch, mask, image_sizes, (new_targets if targets is not None else None)


class Backbone(nn.Module):
    """torchvision ResNet body (stem, layer1..4; no pooling or fc); the output of layer4 only."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        # frozen_bn, as DETR (which always starts from ImageNet): batch norm with fixed statistics and affine, and the
        # stem and layer1 frozen. From scratch: ordinary batch norm, every layer trained.
        norm_layer = FrozenBatchNorm2d if cfg.frozen_bn else nn.BatchNorm2d
        if cfg.dilation and cfg.backbone in ("resnet18", "resnet34"):  # torchvision's BasicBlock has no dilation
            raise ValueError(f"dilation (DC5) needs resnet50 or resnet101 (bottleneck blocks), not {cfg.backbone}")
        # load_backbone=False: the caller then loads every weight (--weights, --resume, --eval): nothing is read
        weights = "IMAGENET1K_V1" if cfg.backbone_weights == "imagenet" and load_backbone else None
        body = getattr(torchvision.models, cfg.backbone)(weights=weights, norm_layer=norm_layer,
                                                         replace_stride_with_dilation=[False, False, cfg.dilation])
        if cfg.backbone_weights not in ("imagenet", "none") and load_backbone:
            data.load_backbone_weights(body, cfg.backbone_weights)
        del body.avgpool, body.fc
        for name, parameter in body.named_parameters():  # lr_backbone 0: all frozen (backbone.py's train_backbone)
            parameter.requires_grad_(cfg.lr_backbone > 0 and (not cfg.frozen_bn or name.startswith(
                ("layer2", "layer3", "layer4"))))
        self.body = body
        self.num_channels = body.inplanes  # of layer4's output: 512 (resnet18/34), 2048 (resnet50/101)

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, C, h, w], h = ceil(H / 32) (H / 16 with dilation)."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))  # [B, 64, H/4, W/4]
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))


def position_encoding_sine(mask: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """mask [B, h, w] (True on padding) -> [B, 2 * num_pos_feats, h, w]: the official PositionEmbeddingSine with
    normalize=True. Each cell's row and column count over the unpadded cells, divided by the image's extent and scaled
    to 2 pi, go through sines and cosines of num_pos_feats / 2 frequencies (interleaved sin, cos); y features first."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, h, w]: 1 .. rows of the image, constant on padding
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)  # [num_pos_feats]: each frequency twice (sin, cos)
    pos_x = x_embed[:, :, :, None] / dim_t  # [B, h, w, num_pos_feats]
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2 * num_pos_feats, h, w]


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: self-attention over the feature cells (position added to queries and keys),
    then a ReLU feed-forward block; each as a residual branch followed by LayerNorm."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.dim_feedforward), nn.Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos [S, B, d] (sequence first, as nn.MultiheadAttention's default); key_padding_mask [B, S]."""
        q = k = src + pos
        src2 = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(src2))


class DecoderLayer(nn.Module):
    """Post-norm transformer decoder layer: self-attention among the queries, cross-attention from the queries to the
    encoder's memory, a feed-forward block. query_pos (the learned query embedding) is added to the queries and keys of
    the self-attention and to the queries of the cross-attention, whose keys get the feature cells' position
    encoding."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout)
        self.multihead_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout)
        self.linear1, self.linear2 = nn.Linear(d, cfg.dim_feedforward), nn.Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """tgt, query_pos [Q, B, d]; memory, pos [S, B, d]; key_padding_mask [B, S] -> [Q, B, d]."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(tgt2))
        tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=key_padding_mask,
                                   need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(tgt2))


class Transformer(nn.Module):
    """enc_layers encoder layers (no final norm: post-norm layers end in one) and dec_layers decoder layers, whose
    outputs all go through the decoder's final LayerNorm (`decoder.norm`) for the heads."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.decoder.norm = nn.LayerNorm(cfg.hidden_dim)
        for p in self.parameters():  # the official initialisation: every matrix Xavier-uniform
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor) -> Tensor:
        """src [B, d, h, w] projected features, mask [B, h, w], query_embed [Q, d], pos [B, d, h, w] -> the normalised
        output of every decoder layer [dec_layers, B, Q, d]."""
        B = src.shape[0]
        src, pos = src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1)  # [S, B, d]
        query_pos = query_embed[:, None].repeat(1, B, 1)  # [Q, B, d]
        key_padding_mask = mask.flatten(1)  # [B, S]
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, pos, key_padding_mask)
        tgt, outputs = torch.zeros_like(query_pos), []  # the decoder starts from zeros: the queries are query_pos
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, pos, query_pos, key_padding_mask)
            outputs.append(self.decoder.norm(tgt))
        return torch.stack(outputs).transpose(1, 2)  # [dec_layers, B, Q, d]


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them (the official box head: 3 layers, d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DETR(nn.Module):
    """model.train(): model(images, targets) -> dict of losses, each already multiplied by its weight; model.eval():
    model(images) -> list of {"boxes" [Q, 4] xyxy in input pixels, "scores" [Q], "labels" [Q]}. images: list of
    [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        if cfg.num_queries < 1:
            raise ValueError(f"num_queries {cfg.num_queries}: DETR needs at least one query")
        self.cfg = cfg
        self.backbone = Backbone(cfg, load_backbone)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, cfg.hidden_dim, kernel_size=1)
        self.transformer = Transformer(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.class_embed = nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)  # the last logit: "no object"
        self.bbox_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, 3)

    def forward(self, images: list, targets: list = None):
        if self.training:
            check_targets(images, targets, "DETR")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, mask, image_sizes, targets = preprocess(images, targets, self.cfg, self.training)
        pred_logits, pred_boxes = self.predict(batch, mask)  # [dec_layers, B, Q, K + 1], [dec_layers, B, Q, 4]
        if not self.training:
            return postprocess(pred_logits[-1], pred_boxes[-1], original_sizes)
        if not self.cfg.aux_loss:
            pred_logits, pred_boxes = pred_logits[-1:], pred_boxes[-1:]  # L = 1
        gt_boxes, gt_labels, num_gt = prepare_targets(targets, image_sizes)  # [B, M, 4], [B, M], B counts
        if (most := int(gt_labels.max())) >= self.cfg.num_classes:  # (a wait for the GPU, as the matching's below)
            raise ValueError(f"labels up to {most}: num_classes {self.cfg.num_classes} holds labels up to "
                             f"{self.cfg.num_classes - 1} (the classes + 1; label {self.cfg.num_classes} is no object)")
        matched = hungarian_match(pred_logits, pred_boxes, gt_boxes, gt_labels, num_gt, self.cfg)
        return set_loss(pred_logits, pred_boxes, gt_boxes, gt_labels, num_gt, matched, self.cfg)

    def predict(self, batch: Tensor, mask: Tensor):
        """The padded batch [B, 3, H, W] and its mask [B, H, W] -> class logits [dec_layers, B, Q, K + 1] and boxes
        [dec_layers, B, Q, 4] (normalised cx, cy, w, h), in float32 also under autocast."""
        features = self.backbone(batch)  # [B, C, h, w]
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).bool()[0]  # [B, h, w], nearest
        pos = position_encoding_sine(mask, self.cfg.hidden_dim // 2).to(features.dtype)  # [B, d, h, w]
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)  # [dec_layers, B, Q, d]
        # float32 from the heads on: bf16 would round box coordinates to ~0.4% of the image
        return self.class_embed(hs).float(), self.bbox_embed(hs).float().sigmoid()


# Weights of the official implementation (still the Model section)
OFFICIAL_WEIGHTS = {  # --weights NAME: facebookresearch/detr's COCO checkpoints (its README's model zoo, hubconf.py)
    "detr-r50": ("https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth", dict(backbone="resnet50")),
    "detr-r50-dc5": ("https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth", dict(dilation=True)),
    "detr-r101": ("https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth", dict(backbone="resnet101")),
    "detr-r101-dc5": ("https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
                      dict(backbone="resnet101", dilation=True)),
}
# checkpoints of official training runs also hold main.py's arguments (argparse.Namespace): let torch.load read them
torch.serialization.add_safe_globals([argparse.Namespace])


def convert_official(state_dict: dict) -> dict:
    """A facebookresearch/detr DETR state dict (checkpoint["model"]) -> this file's. Our names are the official ones
    but for the backbone wrapper: backbone.0.body.* -> backbone.body.*."""
    return {re.sub(r"^backbone\.0\.body\.", "backbone.body.", k): v for k, v in state_dict.items()}


def reference_weights(weights: str, state_dict: dict = None):
    """--weights detr-r50 (etc., downloaded) or a file of the official implementation's (a published checkpoint or an
    official run's checkpoint.pth: {"model": state dict, ...}, or the bare state dict) -> (this file's state dict,
    class names, the settings that model was built with). The architecture is read from the weights (and from the
    run's arguments where the file has them); published DC5 files: name them, or pass --dilation."""
    if state_dict is None and weights not in OFFICIAL_WEIGHTS:
        raise SystemExit(f"--weights {weights}: {'not a checkpoint' if os.path.exists(weights) else 'no such file'} "
                         f"(official COCO weights: {', '.join(OFFICIAL_WEIGHTS)})")
    config = dict(OFFICIAL_CONFIG)
    if state_dict is None:
        url, config_of_name = OFFICIAL_WEIGHTS[weights]
        config.update(config_of_name)
        try:
            state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                            weights_only=True)
        except OSError as e:  # no internet
            raise SystemExit(f"--weights {weights}: cannot download {url} ({e})") from None
    args = vars(state_dict.get("args") or argparse.Namespace())  # main.py's arguments, in an official run's file
    state_dict = convert_official(state_dict.get("model", state_dict))
    if "query_embed.weight" not in state_dict:  # e.g. another detector's state dict
        raise SystemExit(f"--weights {weights}: neither a checkpoint of detr.py nor the official DETR's weights")
    if "transformer.encoder.norm.weight" in state_dict or args.get("pre_norm"):
        raise SystemExit(f"--weights {weights}: a pre-norm DETR (--pre_norm): this file implements the post-norm one")
    blocks = [len({k.split(".")[3] for k in state_dict if k.startswith(f"backbone.body.layer{i}.")}) for i in (1, 3)]
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state_dict
    config.update(
        backbone={(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}.get(
            (blocks[1], bottleneck), config["backbone"]),
        hidden_dim=state_dict["query_embed.weight"].shape[1], num_queries=state_dict["query_embed.weight"].shape[0],
        enc_layers=len({k.split(".")[3] for k in state_dict if k.startswith("transformer.encoder.layers.")}),
        dec_layers=len({k.split(".")[3] for k in state_dict if k.startswith("transformer.decoder.layers.")}),
        dim_feedforward=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        **{k: args[k] for k in ("nheads", "dilation", "dropout", "aux_loss") if k in args})
    K = state_dict["class_embed.weight"].shape[0] - 1  # DETR's num_classes (max class id + 1) is ours
    coco = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # 91, by COCO id
    names = coco if K == 91 else ["__background__", *map(str, range(1, K))]
    return state_dict, tuple(names), config


# --- Targets ---


class RandomSizeCrop:
    """DETR's RandomSizeCrop (transforms.v2 has no crop of random size without a resize), on (image, target) inside a
    v2 pipeline: a crop whose height and width are drawn from crop_size (at most the image's), at a random place; the
    boxes it leaves without area are dropped with their labels (and iscrowd, difficult)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        H, W = image.shape[-2:]
        h, w = (int(torch.randint(min(self.min_size, n), min(n, self.max_size) + 1, ())) for n in (H, W))
        top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
        boxes = v2.functional.crop(target["boxes"], top, left, h, w)  # shifted and clipped to the crop
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        per_box = {k: target[k][keep] for k in data.PER_BOX if k in target}
        return v2.functional.crop(image, top, left, h, w), {**target, **per_box, "boxes": boxes[keep]}


def detr_augmentation(cfg: Config):
    """DETR's training augmentation (datasets/coco.py make_coco_transforms) with torchvision.transforms.v2, as an
    (image, target) transform: a horizontal flip; with probability crop_prob, the short side resized to one of
    crop_resize_sizes and a RandomSizeCrop of crop_size. DETR's last step, the multi-scale resize (train_min_sizes,
    max_size), is the model's preprocessing in training."""
    return data.TransformsV2(v2.Compose([v2.RandomHorizontalFlip(cfg.hflip_prob), v2.RandomApply(
        [v2.RandomShortestSize(list(cfg.crop_resize_sizes)), RandomSizeCrop(*cfg.crop_size)], p=cfg.crop_prob)]))


def prepare_targets(targets: list, image_sizes: list):
    """B target dicts (xyxy pixels of the resized images) -> gt_boxes [B, M, 4] normalised cx, cy, w, h of the
    unpadded image, gt_labels [B, M], num_gt [B] (the first num_gt[b] of row b are real; M = max(1, max count)).
    As the official dataset code: crowd boxes and boxes without width or height (or not finite) are dropped (empty
    images work: they teach every query "no object")."""
    kept = []
    for t, (h, w) in zip(targets, image_sizes):
        boxes = t["boxes"]
        keep = valid_box_mask(boxes)
        if "iscrowd" in t:
            keep &= t["iscrowd"] == 0
        scale = torch.tensor([w, h, w, h], dtype=torch.float32).to(boxes.device, non_blocking=True)
        kept.append((box_xyxy_to_cxcywh(boxes[keep]) / scale, t["labels"][keep]))
    num_gt = [len(labels) for _, labels in kept]
    device = targets[0]["boxes"].device
    gt_boxes = torch.zeros(len(kept), max([1] + num_gt), 4, device=device)
    gt_labels = torch.zeros(len(kept), max([1] + num_gt), dtype=torch.int64, device=device)
    for i, (boxes, labels) in enumerate(kept):
        gt_boxes[i, : len(boxes)], gt_labels[i, : len(labels)] = boxes, labels
    return gt_boxes, gt_labels, num_gt


@torch.no_grad()
def hungarian_match(pred_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_gt: list,
                    cfg: Config):
    """The official HungarianMatcher for L decoder layers and B images at once. pred_logits [L, B, Q, K + 1],
    pred_boxes [L, B, Q, 4]; gt_boxes [B, M, 4], gt_labels [B, M], num_gt B counts (padded targets). Returns the
    matched pairs, layer by layer, image by image, by increasing query index: layer_idx, batch_idx, query_idx,
    gt_idx, each int64 [N] with N = L * sum(min(Q, num_gt[b]))."""
    L, B, Q, _ = pred_logits.shape
    M = gt_boxes.shape[1]
    # classification cost: -p(ground-truth class), the paper's (the official matcher's 1 - p, its constant dropped)
    prob = pred_logits.softmax(-1)  # [L, B, Q, K + 1]
    cost_class = -prob.gather(3, gt_labels[None, :, None, :].expand(L, B, Q, M))  # [L, B, Q, M]
    # L1 distance between the boxes' normalised cx, cy, w, h
    cost_bbox = torch.cdist(pred_boxes.flatten(0, 1), gt_boxes.repeat(L, 1, 1), p=1).view(L, B, Q, M)
    # -GIoU of the boxes as corners
    cost_giou = -elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes)[:, :, :, None],
                                                 box_cxcywh_to_xyxy(gt_boxes)[None, :, None])  # [L, B, Q, M]
    # the official order of the terms
    C = cfg.set_cost_bbox * cost_bbox + cfg.set_cost_class * cost_class + cfg.set_cost_giou * cost_giou
    # one transfer to the CPU for every layer and image; a diverged model's NaN costs become large finite ones, so
    # that the training loop reports its non-finite loss rather than scipy failing here
    C = C.nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
    matched = [[], [], [], []]
    for l in range(L):
        for b in range(B):
            query_idx, gt_idx = linear_sum_assignment(C[l, b, :, : num_gt[b]])  # query_idx increasing
            for out, idx in zip(matched, ([l] * len(query_idx), [b] * len(query_idx), query_idx, gt_idx)):
                out.extend(idx)
    return [torch.as_tensor(idx, dtype=torch.int64, device=pred_logits.device) for idx in matched]


def warn_crowded(dataset, num_queries: int):
    """Each query is matched to one object at most: in an image with more objects than queries, those beyond are
    never matched (and still count in the loss's normaliser); recall there stays below 1. A warning counts them."""
    counts = [len(boxes) for boxes in getattr(dataset, "boxes", ())]  # COCO, VOC (synthetic: max_objects, 6)
    if (crowded := sum(n > num_queries for n in counts)) and int(os.environ.get("RANK", 0)) == 0:
        warnings.warn(f"{crowded} training images have more objects than --num-queries {num_queries} (up to "
                      f"{max(counts)}): those beyond are never matched: raise --num-queries")


# --- Loss ---


def set_loss(pred_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_gt: list,
             matched: list, cfg: Config) -> dict:
    """The official SetCriterion (losses labels and boxes) for L decoder layers, each term times its weight.
    pred_logits [L, B, Q, K + 1], pred_boxes [L, B, Q, 4], gt_boxes [B, M, 4], gt_labels [B, M], num_gt B counts,
    matched as hungarian_match returns. Per layer: cross-entropy over every query (target: the matched class, else no
    object weighted by eos_coef), a weighted mean; L1 and 1 - GIoU over the matched pairs, summed and divided by the
    number of ground-truth boxes in the batch (averaged over processes, at least 1). Keys: loss_ce, loss_bbox, loss_giou
    for the last layer, with _0 .. _{L-2} for the others."""
    layer_idx, batch_idx, query_idx, gt_idx = matched
    L, B, Q, K1 = pred_logits.shape
    num_boxes = pred_boxes.new_tensor(float(sum(num_gt)))  # ground-truth boxes in the batch, matched or not
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    num_boxes = num_boxes.clamp(min=1)
    target_classes = torch.full((L, B, Q), K1 - 1, dtype=torch.int64, device=pred_logits.device)  # no object
    target_classes[layer_idx, batch_idx, query_idx] = gt_labels[batch_idx, gt_idx]
    empty_weight = pred_logits.new_ones(K1)
    empty_weight[-1] = cfg.eos_coef
    ce = F.cross_entropy(pred_logits.permute(0, 3, 1, 2), target_classes, empty_weight, reduction="none")  # [L, B, Q]
    loss_ce = ce.sum((1, 2)) / empty_weight[target_classes].sum((1, 2))  # [L]: F.cross_entropy(weight=)'s mean
    src_boxes, target_boxes = pred_boxes[layer_idx, batch_idx, query_idx], gt_boxes[batch_idx, gt_idx]  # [N, 4]
    l1 = (src_boxes - target_boxes).abs().sum(-1)  # [N]
    giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
    loss_bbox = pred_boxes.new_zeros(L).index_add(0, layer_idx, l1) / num_boxes  # [L]: summed per layer
    loss_giou = pred_boxes.new_zeros(L).index_add(0, layer_idx, giou) / num_boxes
    losses = {}
    for l in [L - 1, *range(L - 1)]:  # the official order: the last layer's terms, then the auxiliary ones
        suffix = "" if l == L - 1 else f"_{l}"
        losses.update({f"loss_ce{suffix}": loss_ce[l], f"loss_bbox{suffix}": cfg.bbox_loss_coef * loss_bbox[l],
                       f"loss_giou{suffix}": cfg.giou_loss_coef * loss_giou[l]})
    return losses


# --- Decoding ---


@torch.no_grad()
def postprocess(pred_logits: Tensor, pred_boxes: Tensor, original_sizes: list) -> list:
    """The official PostProcess. pred_logits [B, Q, K + 1], pred_boxes [B, Q, 4] of the last decoder layer -> B dicts
    with every query: scores [Q] and labels [Q], the most probable class other than no object, boxes [Q, 4] xyxy in
    the input image's pixels, in query order and not clipped to the image (as the official code gives them). No NMS:
    the set loss teaches the queries not to duplicate each other; no threshold: COCO evaluation takes the 100 best
    (--predict draws those above draw_thresh)."""
    prob = F.softmax(pred_logits, -1)
    scores, labels = prob[..., :-1].max(-1)  # [B, Q]
    size = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float32, device=pred_boxes.device)
    boxes = box_cxcywh_to_xyxy(pred_boxes) * size[:, None, :]  # [B, Q, 4]
    return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = DETR  # the class the template builds, trains, evaluates and saves
PREDICT = {}  # --predict's Config values where no flag sets them (yolo.py: detect.py's); none here


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """The official recipe: AdamW with weight decay on every trained parameter, lr for the transformer, heads and
    input_proj, lr_backbone for the backbone (main.py's two parameter groups); x lr_gamma at each of lr_steps (DETR's
    StepLR, stepped per epoch); optionally a linear warmup (at most a third of the run; the official run has none).
    The lr is not scaled with the batch (DETR's 1e-4 is for 16 and for 64 images per step alike)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params if not n.startswith("backbone.")]},
                                   {"params": [p for n, p in params if n.startswith("backbone.")],
                                    "lr": cfg.lr_backbone}], cfg.lr, weight_decay=cfg.weight_decay)
    warmup = data.warmup_steps(cfg, steps_per_epoch)  # (warns if shortened, or if no lr step falls within the run)
    warn_crowded(train_set, cfg.num_queries)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup if step < warmup else 1.0) * cfg.lr_gamma ** sum(
        step >= epoch * steps_per_epoch for epoch in cfg.lr_steps))


def train_transforms(cfg: Config):
    return detr_augmentation(cfg)  # flip, and DETR's random crop; its multi-scale resize is the model's (Targets)


@torch.no_grad()
def draw_targets(model: DETR, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: each ground truth box (class colours, thick) and the query the Hungarian matching of the last
    decoder layer gives it: that query's predicted box (white, captioned with the query's index). From random weights
    the matched boxes are arbitrary; with --weights they show what the loss pulls towards which object."""
    batch, mask, image_sizes, targets = preprocess([image], [target], model.cfg, training=False)
    pred_logits, pred_boxes = model.predict(batch, mask)  # [dec_layers, 1, Q, K + 1], [dec_layers, 1, Q, 4]
    gt_boxes, gt_labels, num_gt = prepare_targets(targets, image_sizes)  # [1, M, 4] ...
    _, _, query_idx, gt_idx = hungarian_match(pred_logits[-1:], pred_boxes[-1:], gt_boxes, gt_labels, num_gt,
                                              model.cfg)
    scale = torch.tensor([image.shape[-1], image.shape[-2]] * 2, dtype=torch.float32, device=image.device)
    boxes = box_cxcywh_to_xyxy(pred_boxes[-1, 0, query_idx]) * scale  # [N, 4] input pixels
    drawn = draw_boxes(image, boxes, torch.arange(len(query_idx)), None, [f"query {q}" for q in query_idx.tolist()],
                       color=(255, 255, 255), width=1)
    gt_xyxy = box_cxcywh_to_xyxy(gt_boxes[0, gt_idx]) * scale  # the matched ground truth, in input pixels
    draw_boxes(drawn, gt_xyxy, gt_labels[0, gt_idx], None, class_names, path, width=3)


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
