"""Fast R-CNN: one network over the whole image, RoI pooling of each proposal, and a multi-task loss.

Paper: Girshick, "Fast R-CNN", ICCV 2015 (https://arxiv.org/abs/1504.08083). The reference is its code,
rbgirshick/fast-rcnn (b612190f; Python 2 + Caffe), whose files and numbers are followed here; test_models.py checks
this file against the reference's numpy parts (RoI sampler, box targets and their normalisation, decoding and
clipping, NMS).

What this file implements, in the order the data flows:
  - proposals: selective search, computed once per dataset and cached beside the run (data.selective_search,
    data.attach_proposals, as rcnn.py), or brought by the dataset as a file (data.load_proposals states the format);
  - preprocessing inside the model: ImageNet normalisation, the shorter side resized to a scale (600, the longer side
    at most 1000: the paper's; by default 320 and 320; training picks one of `scales` per image), zero padding to the
    batch's largest image;
  - backbone: VGG16 up to conv5_3 (stride 16, pool5 removed; conv1_x and conv2_x frozen in --preset voc) or a
    ResNet up to layer3 (stride 16; as options stride 8, the last stage dilated or cut off); RoI max pooling 7 x 7 at
    1/16 (torchvision.ops.roi_pool: Caffe's RoIPooling); fc6 and fc7 with dropout; a K-way classifier (N(0, 0.01)) and
    class-specific box regressors (N(0, 0.001));
  - targets: every image's proposals and ground-truth boxes are candidates; per image 64 RoIs, at most 25 %
    foreground (IoU >= 0.5: the class of the best box), background from IoU in [0.1, 0.5), drawn without replacement
    for the whole batch at once; box targets (dx, dy, dw, dh, no +1) normalised per class by their mean and std over
    the training set, computed streaming before training (bbox_target_statistics);
  - loss: cross-entropy over the RoIs + smooth L1 (beta 1) on the true class's 4 outputs, both divided by the number
    of RoIs;
  - test: all proposals of the image, softmax, class-specific decoding and clipping, per class the best 100 and NMS at
    0.3, then the best 100 of the image. Optional truncated SVD of fc6 / fc7 (paper section 3.1).
Checkpoints hold the box regressor with the normalisation folded into its weights (w x std, b x std + mean), as the
reference's snapshots, so that `box_predictor.bbox_pred` decodes without the statistics; the trained (normalised)
regressor and the statistics are kept beside it, so that --resume continues exactly (FastRCNNPredictor).

Coordinates: continuous, no +1 anywhere (as in every file here). The reference computes IoU, NMS and clipping on
inclusive pixel indices (+1 on widths and intersections; x2 <= W - 1) but box targets and decoding without +1: its IoU
of boxes (x1, y1, x2, y2) is ours of (x1, y1, x2 + 1, y2 + 1). The same coordinates therefore give a slightly higher IoU
there for small boxes (a 10-px square and its copy 5 px to the side: 0.333 here, 0.375 there), which moves a few RoIs
across the 0.5 / 0.1 thresholds of sampling and makes NMS at 0.3 suppress a little more there; clipping here stops at W
(the last pixel's right edge), there at W - 1, and only from one side (a box wholly beside the image comes out
inverted).

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python fast_rcnn.py --train                                 # synthetic shapes, no download; CPU: preset cpu
    python fast_rcnn.py --train --preset voc --data-root VOCdevkit/VOC2007     # the paper's recipe, ImageNet VGG16
    python fast_rcnn.py --train --resume runs/fast_rcnn/last.pt # go on after Ctrl-C, SIGTERM or a crash
    python fast_rcnn.py --eval --weights runs/fast_rcnn/best.pt [--svd-fc6 1024 --svd-fc7 256]
    python fast_rcnn.py --predict IMG_OR_DIR --weights runs/fast_rcnn/best.pt --out DIR  # proposals on the fly
    python fast_rcnn.py --show-targets --out DIR                # proposals: foreground / background / unused
    torchrun --nproc_per_node=8 fast_rcnn.py --train ...        # several GPUs
    python -m pytest -q test_models.py -k fast_rcnn

The model's call (the other files' call, with proposals): train mode model(images, targets) -> {"loss_classifier",
"loss_box_reg"}, each target with "proposals" [R, 4] (data.attach_proposals); eval mode model(images) -> detections.
Either takes proposals=[[R_i, 4] boxes in the images' pixels, one per image] instead; without any, selective search runs
on the fly.

Tensor shapes (legend used in every comment below):
    B images in the batch, H x W the padded batch, R proposals of one image, M ground-truth boxes of one image (padded
    to the batch maximum), P = M + R RoI candidates of one image, S RoIs of the whole batch, K classes including
    background (num_classes), C backbone channels, F fc7 width, D detections of one image.
    Boxes are x1, y1, x2, y2 in the input image's pixels unless a comment says otherwise.
"""
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
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
from torchvision.ops import FrozenBatchNorm2d, batched_nms, roi_align, roi_pool

import data
from common import (check_images, check_targets, clip_boxes_to_image, draw_boxes, elementwise_box_iou,
                    pad_targets, proposal_sources, valid_box_mask)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python fast_rcnn.py --train), from random weights;
    # rbgirshick/fast-rcnn's value is in brackets where it differs. PRESETS below: the paper's VOC 2007 recipe, and a
    # run sized for a CPU.
    # model
    num_classes: int = 7  # K: foreground classes + 1 background; --train takes it from the data [VOC: 21]
    # from scratch ResNet-18 learns where ResNet-50 barely does (H200, README: 0.52 vs 0.17 mAP@0.5 after 2 epochs)
    backbone: Literal["vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"  # [vgg16]
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH to its state dict
    frozen_stages: int = 0  # stages that are not trained: VGG conv1_x, conv2_x ..., ResNet stem, layer1 ... [2]
    representation_size: int = 1024  # F: width of fc6 and fc7 [4096, from ImageNet VGG16's classifier]
    dropout: float = 0.5  # after fc6 and fc7
    roi_size: int = 7  # RoI max pooling output, roi_size x roi_size cells
    roi_op: Literal["pool", "align"] = "pool"  # align: RoIAlign (Mask R-CNN's bilinear sampling, 2 x 2 per cell)
    stride: Literal[16, 8] = 16  # of the feature map; 8: the last stage dilated instead (4x the cells, small objects)
    truncate: bool = False  # stride 8 by ending a stage early instead: ResNet at layer2, VGG16 at conv4_3 (far cheaper)
    # preprocessing
    scales: tuple = (320,)  # shorter side of training images, one drawn per image [600; multi-scale 480..1200]
    test_scales: tuple = (320,)  # at test: several give an image pyramid, each RoI from the scale nearest 224^2 [600]
    max_size: int = 320  # longer side at most this [1000; multi-scale 2000]
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1] [Caffe BGR pixel means]
    image_std: tuple = (0.229, 0.224, 0.225)
    # proposals (data.attach_proposals)
    proposals: Literal["fast", "quality"] = "fast"  # selective search mode, computed once and cached in out/
    train_proposals: str = ""  # a proposals file of the training images (format: data.load_proposals); "": compute
    val_proposals: str = ""  # ... of the validation images
    proposal_side: int = 0  # selective search sees the image resized to this longer side; 0: as it is [VOC: ~500]
    proposal_min_size: int = 4  # selective search drops boxes narrower or lower than this, pixels [20]
    proposals_per_image: int = 2000  # the first (best) proposals of each image that are used
    # RoI sampling and box targets (config.py TRAIN.*)
    rois_per_image: int = 64  # TRAIN.BATCH_SIZE / IMS_PER_BATCH
    fg_fraction: float = 0.25  # at most this fraction of them foreground
    fg_iou_thresh: float = 0.5  # IoU >= this with a ground-truth box: foreground, its class; also the box targets
    bg_iou_thresh_hi: float = 0.5  # background: IoU in [bg_iou_thresh_lo, bg_iou_thresh_hi)
    bg_iou_thresh_lo: float = 0.1  # (below it: never sampled; 0.0 also samples regions far from every object)
    normalize_targets: bool = True  # box targets normalised per class by the training set's mean and std
    # test (test.py, test_net)
    score_thresh: float = 0.0  # keep (RoI, class) pairs scoring above this
    nms_thresh: float = 0.3  # NMS IoU, per class
    detections_per_img: int = 100  # per class before NMS (max_per_image), and per image after (ours, as COCO's)
    svd_fc6: int = 0  # truncated SVD of fc6 at test: keep this many singular values (0: off) [1024]
    svd_fc7: int = 0  # ... of fc7 [256]
    # data (data.build_datasets)
    data: Literal["synthetic", "coco", "voc"] = "synthetic"  # coco: images in the folder named as the json, ...
    data_root: str = ""  # dataset folder for coco / voc (coco images: ... else in JPEGImages/ or images/)
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 320  # synthetic: image side in pixels
    num_train: int = 4000  # synthetic: training images
    num_val: int = 300  # synthetic: validation images
    hflip_prob: float = 0.5  # training augmentation: horizontal flip probability [USE_FLIPPED: the roidb doubled]
    # training (solver.prototxt: 40k steps of 2 images, lr 0.001 x 0.1 after 30k, from ImageNet weights)
    epochs: int = 8  # passes over the training set
    batch_size: int = 8  # images per step and per process [2]
    lr: float = 1e-3  # learning rate of the weights (biases x2), scaled to the processes
    # from random weights SGD left the classifier at the class prior on a GPU (lr 0.01: all 8 epochs, 0.001: 3); AdamW
    # learns (README, Fast R-CNN). The paper's SGD at 0.001 from ImageNet VGG16: --preset voc
    optimizer: Literal["sgd", "adamw"] = "adamw"  # [sgd]
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on weights, not biases (Caffe's decay_mult 0); sgd: L2, adamw: decoupled
    lr_steps: tuple = (6,)  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # lr decay factor
    warmup_iters: int = 200  # steps of linear warmup at the start, at most a third of the run [0]
    warmup_factor: float = 0.001  # the warmup starts at lr x this
    accumulate: int = 1  # batches per optimiser step (gradient accumulation)
    ema_decay: float = 0.0  # evaluate and save an exponential moving average of the weights (0: off)
    clip_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = False  # convolutions in channels-last memory layout (faster for some: GPU AMP, SSD on a CPU)
    # run
    workers: int = 4  # DataLoader worker processes, and selective search processes
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds the data order, the augmentation, the RoI sampling and the synthetic data [RNG_SEED 3]
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/fast_rcnn"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, proposals
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # PATH to a checkpoint of this file: start from / evaluate (no reference weights to load)
    draw_thresh: float = 0.5  # --predict draws detections scoring at least this

    def __post_init__(self):  # refused when the config is made, before selective search
        if self.truncate and self.stride != 8:
            raise ValueError("--truncate ends the backbone at stride 8: give --stride 8 with it")


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # ~15 minutes on 2 idle CPU cores: ResNet-18 from scratch up to layer2 (a stride-8 map, 16 x 16 cells: a quarter
    # of the cost of layer3 dilated at 256 px), RoIAlign, no dropout; 500 128-px images, their selective search at
    # 256 px (recall@0.5 0.78 -> 0.96), 15 epochs with the lr x 0.1 for the last 3 (README)
    "cpu": dict(representation_size=256, dropout=0.0, image_size=128, scales=(128,), test_scales=(128,), max_size=128,
                proposal_side=256, num_train=500, num_val=100, proposals_per_image=500, batch_size=4, epochs=15,
                lr_steps=(12,), warmup_iters=50, workers=2, stride=8, truncate=True, roi_op="align"),
    # the paper's VOC 2007 recipe: ImageNet VGG16, conv1-2 frozen, 600 / 1000 px, 2 images x 64 RoIs, 40k steps
    # (16 epochs of VOC 07 trainval's 5011 images) with the lr x 0.1 after 30k
    "voc": dict(data="voc", backbone="vgg16", backbone_weights="imagenet", frozen_stages=2, representation_size=4096,
                scales=(600,), test_scales=(600,), max_size=1000, proposal_min_size=20, train_split="trainval",
                val_split="test", batch_size=2, optimizer="sgd", lr=0.001, epochs=16, lr_steps=(12,), warmup_iters=0),
}


# --- Model ---

EPS = 1e-14  # the reference's cfg.EPS, added to box widths and heights in box targets and decoding


def make_backbone(cfg: Config, load_backbone: bool = True):
    """A torchvision VGG16 up to conv5_3 (+ ReLU) or a ResNet up to layer3: [B, 3, H, W] -> [B, C, H/s, W/s], s =
    cfg.stride: 16, or 8 with the last stage dilated (VGG16 without pool4, its conv5_x at dilation 2; ResNet layer3 at
    dilation 2), which keeps the receptive fields of the pretrained weights, or 8 with the last stage cut off
    (cfg.truncate: VGG16 up to conv4_3, ResNet up to layer2), which costs far less. Returns (body, C, VGG16's ImageNet
    fc6/fc7 or None). The first frozen_stages stages do not train."""
    weights = "IMAGENET1K_V1" if cfg.backbone_weights == "imagenet" and load_backbone else None
    pretrained = cfg.backbone_weights != "none"
    if cfg.backbone.startswith("vgg"):
        net = getattr(torchvision.models, cfg.backbone)(weights=weights)
        if pretrained and cfg.backbone_weights != "imagenet" and load_backbone:
            data.load_backbone_weights(net, cfg.backbone_weights)
        pool4 = [i for i, layer in enumerate(net.features) if isinstance(layer, nn.MaxPool2d)][3]
        body = net.features[:pool4 if cfg.truncate else -1]  # pool5 removed (the RoI pooling takes its place)
        stages, stage = [], 0
        for layer in body:
            stages.append(stage)
            stage += isinstance(layer, nn.MaxPool2d)
        for layer, s in zip(body, stages):
            layer.requires_grad_(s >= cfg.frozen_stages)
        if cfg.stride == 8 and not cfg.truncate:
            for conv in body[pool4:]:
                if isinstance(conv, nn.Conv2d):
                    conv.dilation, conv.padding = (2, 2), (2, 2)
            body[pool4] = nn.Identity()  # (the layers keep their indices: the same state dict keys)
        fc = net.classifier if pretrained and not cfg.truncate else None  # (fc6 was trained on conv5_3)
        return body, 512, fc
    # ResNet: batch norm frozen when starting pretrained (detection batches are too small for batch statistics)
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = getattr(torchvision.models, cfg.backbone)(weights=weights, norm_layer=norm_layer)
    if pretrained and cfg.backbone_weights != "imagenet" and load_backbone:
        data.load_backbone_weights(net, cfg.backbone_weights)
    body = nn.Sequential(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2,
                         net.layer3)[: 3 if cfg.truncate else 4]
    for s, stage in enumerate(body):
        stage.requires_grad_(s >= cfg.frozen_stages)
    if cfg.stride == 8 and not cfg.truncate:  # torchvision's replace_stride_with_dilation, which fits BasicBlock too
        for i, block in enumerate(net.layer3):
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.stride = (1, 1)
                    if i > 0 and conv.kernel_size == (3, 3):
                        conv.dilation = conv.padding = (2, 2)
    return body, net.layer3[0 if cfg.truncate else -1].conv1.in_channels, None  # (a block's input: the output before)


class TwoMLPHead(nn.Module):
    """fc6 and fc7 on the flattened pooled features, each with ReLU and dropout (VGG16's classifier)."""

    def __init__(self, in_channels: int, representation_size: int, dropout: float):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, fc6: nn.Module = None, fc7: nn.Module = None) -> Tensor:
        """[S, C, 7, 7] -> [S, F]; fc6 / fc7 replace the layers (truncated SVD)."""
        x = self.dropout(F.relu((self.fc6 if fc6 is None else fc6)(x.flatten(1))))
        return self.dropout(F.relu((self.fc7 if fc7 is None else fc7)(x)))


class FastRCNNPredictor(nn.Module):
    """Per RoI: K class logits and K class-specific boxes. bbox_pred is trained on normalised targets,
    (t - bbox_means[k]) / bbox_stds[k]; deltas() undoes it.

    Checkpoints (state_dict) hold bbox_pred with the normalisation folded in, w x std and b x std + mean (the
    reference's train.py snapshot), so that they decode without the statistics; beside it bbox_pred_normalised (the
    trained parameters, the tensors themselves, so that an EMA of the state dict averages them) and the statistics.
    Loading takes bbox_pred_normalised where it is there (exact: --resume continues bit for bit), else reads bbox_pred
    as folded weights, with mean 0 and std 1."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.register_buffer("bbox_means", torch.zeros(num_classes, 4))  # [K, 4]
        self.register_buffer("bbox_stds", torch.ones(num_classes, 4))  # [K, 4]
        self.register_state_dict_post_hook(self._fold)
        self.register_load_state_dict_pre_hook(self._unfold)
        self.loaded = False  # bbox_pred was read from a state dict (not of another shape: load_state leaves those out)

    def forward(self, x: Tensor):
        """[S, F] -> cls_logits [S, K], bbox_regression [S, K * 4] (normalised deltas)."""
        return self.cls_score(x), self.bbox_pred(x)

    def deltas(self, bbox_regression: Tensor) -> Tensor:
        """Normalised [S, K * 4] -> dx, dy, dw, dh [S, K * 4]."""
        return bbox_regression * self.bbox_stds.flatten() + self.bbox_means.flatten()

    @staticmethod
    def _fold(module, state_dict, prefix, local_metadata):
        std, mean = module.bbox_stds.flatten().double(), module.bbox_means.flatten().double()
        w, b = module.bbox_pred.weight, module.bbox_pred.bias
        state_dict[prefix + "bbox_pred_normalised.weight"] = state_dict[prefix + "bbox_pred.weight"]
        state_dict[prefix + "bbox_pred_normalised.bias"] = state_dict[prefix + "bbox_pred.bias"]
        state_dict[prefix + "bbox_pred.weight"] = (w.detach().double() * std[:, None]).to(w.dtype)
        state_dict[prefix + "bbox_pred.bias"] = (b.detach().double() * std + mean).to(b.dtype)

    @staticmethod
    def _unfold(module, state_dict, prefix, *args):
        module.loaded = any(prefix + f"bbox_pred{kind}.weight" in state_dict for kind in ("", "_normalised"))
        if prefix + "bbox_pred_normalised.weight" in state_dict:
            for name in ("weight", "bias"):
                state_dict[prefix + f"bbox_pred.{name}"] = state_dict.pop(prefix + f"bbox_pred_normalised.{name}")
        elif prefix + "bbox_pred.bias" in state_dict:  # folded weights only: they decode as they are
            K = len(state_dict[prefix + "bbox_pred.bias"]) // 4
            state_dict[prefix + "bbox_means"], state_dict[prefix + "bbox_stds"] = torch.zeros(K, 4), torch.ones(K, 4)


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Paper section 3.1: W [out, in] ~ U_t S_t V_t^T -> a layer without bias (S_t V_t^T [t, in]) and one with the
    original bias (U_t [out, t]): t (in + out) multiplications instead of in x out. A rank beyond the layer's (its
    smaller side) keeps every singular value: then the two layers give the layer's own outputs."""
    rank = min(rank, *layer.weight.shape)
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    first, second = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features)
    first.weight.data.copy_(S[:rank, None] * Vh[:rank])
    second.weight.data.copy_(U[:, :rank])
    second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(layer.weight.device)


def scale_factor(size: tuple, target_size: int, max_size: int) -> float:
    """The resize factor of an image of size (h, w): shorter side to target_size, longer side at most max_size."""
    factor = target_size / min(size)
    return max_size / max(size) if round(factor * max(size)) > max_size else factor


def preprocess(images: list, scales: list, cfg: Config):
    """Normalise, resize and zero-pad (test.py _get_image_blob): images B x [3, h_i, w_i] in [0, 1], one target size
    per image -> batch [B, 3, H, W] and the scale factor of each image (its boxes x this = boxes on the batch)."""
    # (forward checked the images: float [3, h, w]); mean and std take their dtype (a model cast to bf16: bf16 images)
    # (non_blocking: a blocking copy to a GPU would first wait for all the work queued on it)
    mean = torch.tensor(cfg.image_mean, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    resized, factors = [], []
    for image, target_size in zip(images, scales):
        h, w = image.shape[-2:]
        factor = scale_factor((h, w), target_size, cfg.max_size)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        resized.append(F.interpolate(((image - mean) / std)[None], size=size, mode="bilinear",
                                     align_corners=False)[0] if size != (h, w) else (image - mean) / std)
        factors.append(factor)
    H, W = max(r.shape[1] for r in resized), max(r.shape[2] for r in resized)
    batch = resized[0].new_zeros(len(resized), 3, H, W)  # [B, 3, H, W]: the mean, after normalisation
    for i, image in enumerate(resized):  # (indexed, not views of unbind: images may require grad)
        batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
    return batch, factors


class FastRCNN(nn.Module):
    """model.train(): model(images, targets) -> {"loss_classifier", "loss_box_reg"}; targets with "proposals" [R, 4]
    (else selective search on the fly). model.eval(): model(images, proposals=None) -> list of {"boxes" [D, 4] in
    input pixels, "scores" [D], "labels" [D]}. images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        # load_backbone=False: the caller then loads every weight (--weights, --resume, --eval): nothing is read
        self.backbone, channels, imagenet_fc = make_backbone(cfg, load_backbone)
        self.box_head = TwoMLPHead(channels * cfg.roi_size**2, cfg.representation_size, cfg.dropout)
        if imagenet_fc is not None and cfg.representation_size == 4096 and cfg.roi_size == 7:  # VGG16's fc6, fc7
            self.box_head.fc6.load_state_dict(imagenet_fc[0].state_dict())
            self.box_head.fc7.load_state_dict(imagenet_fc[3].state_dict())
        self.box_predictor = FastRCNNPredictor(cfg.representation_size, cfg.num_classes)
        self.proposal_cache = {}  # selective search of images seen without proposals (256 at most)
        self.svd_cache = (None, None)  # (the fc weights' versions, the truncated layers)

    def proposals_of(self, image: Tensor, target: dict | None = None) -> Tensor:
        """The image's proposals, its first proposals_per_image, clipped: the target's (the dataset's, the caller's) or
        selective search on the fly, remembered for images seen again."""
        cfg = self.cfg
        if target is not None and "proposals" in target:
            boxes = target["proposals"]
        else:
            pixels = image.detach().float().cpu()  # (float32: numpy has no bf16)
            key = (tuple(image.shape), hashlib.sha1(pixels.numpy().tobytes()).hexdigest())
            if key not in self.proposal_cache:
                if len(self.proposal_cache) >= 256:
                    self.proposal_cache.pop(next(iter(self.proposal_cache)))
                self.proposal_cache[key] = data.selective_search(pixels, cfg.proposals, cfg.proposal_side,
                                                                 cfg.proposal_min_size)
            boxes = self.proposal_cache[key]
        return clip_boxes_to_image(boxes[:cfg.proposals_per_image].to(image.device).float(), image.shape[-2:])

    def forward(self, images: list, targets: list = None, proposals: list = None):
        cfg = self.cfg
        check_images(images)  # before selective search or preprocessing sees them
        if self.training:
            check_targets(images, targets, "FastRCNN")
        sources = proposal_sources(images, targets, proposals, self.training, "FastRCNN")  # proposals= or the targets'
        proposals = [self.proposals_of(image, source) for image, source in zip(images, sources)]  # None: searched
        if self.training:
            valid = [valid_box_mask(t["boxes"]) for t in targets]
            gt_boxes, gt_labels, gt_valid = pad_targets([{"boxes": t["boxes"][v].float(), "labels": t["labels"][v]}
                                                         for t, v in zip(targets, valid)])  # [B, M, 4], [B, M], ..
            rois, image_idx, labels, regression_targets = sample_rois(proposals, gt_boxes, gt_labels, gt_valid, cfg)
            if cfg.normalize_targets:  # per class (t - mean) / std; background rows are not used by the loss
                regression_targets = ((regression_targets - self.box_predictor.bbox_means[labels])
                                      / self.box_predictor.bbox_stds[labels])
            # one training scale per image (TRAIN.SCALES drawn at random, from the step's seeded generator)
            scales = [cfg.scales[i] for i in torch.randint(len(cfg.scales), (len(images),)).tolist()]
            batch, factors = preprocess(images, scales, cfg)
            box_features = self.roi_features(self.backbone(batch), rois, image_idx, factors)
            cls_logits, bbox_regression = [x.float() for x in self.box_predictor(self.box_head(box_features))]
            return fast_rcnn_loss(cls_logits, bbox_regression, labels, regression_targets)

        rois = torch.cat(proposals)  # [S, 4]
        image_idx = torch.cat([torch.full((len(p),), i, device=rois.device) for i, p in enumerate(proposals)])  # [S]
        box_features = self.pyramid_roi_features(images, rois, image_idx)  # [S, C, 7, 7]
        cls_logits, bbox_regression = self.box_predictor(self.box_head(box_features, *self.truncated_fc()))
        deltas = self.box_predictor.deltas(bbox_regression.float())  # [S, K * 4]
        return postprocess_detections(cls_logits.float(), deltas, rois, [len(p) for p in proposals],
                                      [image.shape[-2:] for image in images], cfg)

    def roi_features(self, features: Tensor, rois: Tensor, image_idx: Tensor, factors: list) -> Tensor:
        """RoI max pooling: features [B, C, H/s, W/s], rois [S, 4] in input pixels, image_idx [S], the images'
        scale factors -> [S, C, 7, 7]. roi_pool rounds the scaled corners to cells and counts the end cell in (Caffe's
        RoIPooling layer, spatial_scale 1/16; 1/stride here), so RoIs a fraction of a cell apart pool the same cells;
        roi_op "align" samples between cells instead."""
        size = (self.cfg.roi_size, self.cfg.roi_size)
        if len(rois) == 0:  # (still in the graph: DDP expects a gradient for every backbone weight)
            return features.new_zeros(0, features.shape[1], *size) + 0 * features.sum()
        factors = torch.tensor(factors, dtype=rois.dtype).to(rois.device, non_blocking=True)  # [B]
        scaled = rois * factors[image_idx][:, None]  # [S, 4]
        rois = torch.cat([image_idx[:, None].to(rois.dtype), scaled], 1)  # [S, 5]: image index, x1, y1, x2, y2
        if self.cfg.roi_op == "align":  # bilinear samples at the exact scaled corners, averaged (torchvision's)
            pooled = roi_align(features.float(), rois.float(), size, 1 / self.cfg.stride, sampling_ratio=2)
        else:  # (float32: a CPU has no bf16 kernel; the features' dtype again after)
            pooled = roi_pool(features.float(), rois.float(), size, 1 / self.cfg.stride)
        return pooled.to(features.dtype)

    def pyramid_roi_features(self, images: list, rois: Tensor, image_idx: Tensor) -> Tensor:
        """Test-time RoI features (im_detect): the images at every test scale; each RoI pooled from the scale where its
        area is nearest 224 x 224 (_project_im_rois). One scale: all RoIs from it."""
        test_scales = self.cfg.test_scales
        out = None
        if len(test_scales) > 1:
            areas = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))[:, None]  # [S, 1]
            factors = torch.tensor([[scale_factor(im.shape[-2:], s, self.cfg.max_size) for s in test_scales]
                                    for im in images], device=rois.device)  # [B, number of scales]
            level = (areas * factors[image_idx] ** 2 - 224 * 224).abs().argmin(1)  # [S]
        else:
            level = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        for s, scale in enumerate(test_scales):
            batch, factors = preprocess(images, [scale] * len(images), self.cfg)
            idx = torch.where(level == s)[0]
            pooled = self.roi_features(self.backbone(batch), rois[idx], image_idx[idx], factors)
            out = pooled.new_zeros(len(rois), *pooled.shape[1:]) if out is None else out
            out[idx] = pooled
        return out

    def truncated_fc(self):
        """(fc6, fc7) factored by truncated SVD where svd_fc6 / svd_fc7 are set (None: the layer itself), computed
        once for the current weights."""
        cfg, head = self.cfg, self.box_head
        if not (cfg.svd_fc6 or cfg.svd_fc7):
            return None, None
        key = (head.fc6.weight._version, head.fc7.weight._version, head.fc6.weight.data_ptr(), cfg.svd_fc6, cfg.svd_fc7)
        if self.svd_cache[0] != key:
            self.svd_cache = (key, (truncated_svd(head.fc6, cfg.svd_fc6) if cfg.svd_fc6 else None,
                                    truncated_svd(head.fc7, cfg.svd_fc7) if cfg.svd_fc7 else None))
        return self.svd_cache[1]

    def set_target_statistics(self, means: Tensor, stds: Tensor, keep_deltas: bool = False):
        """The box targets' per-class means and stds [K, 4] (bbox_target_statistics), said on rank 0. keep_deltas
        (fine-tuning --weights of the same class count): the loaded regressor is re-expressed in them, so that it
        still predicts what it did."""
        p = self.box_predictor
        means, stds = (torch.as_tensor(t).to(p.bbox_means).expand_as(p.bbox_means) for t in (means, stds))
        if keep_deltas:
            with torch.no_grad():
                old_std, old_mean, std, mean = (t.flatten() for t in (p.bbox_stds, p.bbox_means, stds, means))
                p.bbox_pred.weight.mul_((old_std / std)[:, None])
                p.bbox_pred.bias.copy_((p.bbox_pred.bias * old_std + old_mean - mean) / std)
        p.bbox_means.copy_(means)
        p.bbox_stds.copy_(stds)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"box targets dx, dy, dw, dh: means {[round(v, 3) for v in means[1:].mean(0).tolist()]}, stds "
                  f"{[round(v, 3) for v in stds[1:].mean(0).tolist()]} (averages over the classes)")


def caffe_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """train.prototxt's lr_mult / decay_mult: weights at lr with weight decay, biases at 2 x lr without. "Biases" are
    every 1-d parameter: from random weights (batch norm trained, not frozen) batch norm's scales too (VGG16: none)."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(p.ndim == 1, []).append(p)
    return [{"params": ps, "lr": lr * (2 if bias else 1), "weight_decay": 0.0 if bias else weight_decay}
            for bias, ps in groups.items()]


def reference_weights(weights: str, state_dict: dict = None):
    """Fast R-CNN has no reference weights to load: the original are Caffe models."""
    what = "not a checkpoint of fast_rcnn.py" if os.path.exists(weights) else "no such file"
    raise SystemExit(f"--weights {weights}: {what} (Fast R-CNN has no reference weights to load)")


# --- Targets ---


def encode_boxes(gt: Tensor, rois: Tensor) -> Tensor:
    """roidb.py _compute_targets: gt, rois [N, 4] -> dx, dy, dw, dh [N, 4]; widths x2 - x1 + EPS (no +1)."""
    w, h = rois[:, 2] - rois[:, 0] + EPS, rois[:, 3] - rois[:, 1] + EPS
    gw, gh = gt[:, 2] - gt[:, 0] + EPS, gt[:, 3] - gt[:, 1] + EPS
    return torch.stack([(gt[:, 0] + 0.5 * gw - rois[:, 0] - 0.5 * w) / w,
                        (gt[:, 1] + 0.5 * gh - rois[:, 1] - 0.5 * h) / h, torch.log(gw / w), torch.log(gh / h)], 1)


def decode_boxes(deltas: Tensor, rois: Tensor) -> Tensor:
    """test.py _bbox_pred: deltas [..., 4] (dx, dy, dw, dh), rois [..., 4] -> boxes [..., 4]."""
    w, h = rois[..., 2] - rois[..., 0] + EPS, rois[..., 3] - rois[..., 1] + EPS
    cx, cy = deltas[..., 0] * w + rois[..., 0] + 0.5 * w, deltas[..., 1] * h + rois[..., 1] + 0.5 * h
    w, h = torch.exp(deltas[..., 2]) * w, torch.exp(deltas[..., 3]) * h
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def random_subset(mask: Tensor, counts: Tensor) -> Tensor:
    """mask [B, N] candidates, counts [B] -> [B, N] a uniformly random choice of counts[b] candidates of row b,
    without replacement (npr.choice(..., replace=False) of the reference): candidates get random keys in [0, 1),
    others -1; the top counts[b] keys of each row are the choice."""
    k = int(counts.max()) if counts.numel() else 0
    if k == 0:
        return torch.zeros_like(mask)
    keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)  # [B, N]
    top = keys.topk(k, dim=1).indices  # [B, k]
    chosen = torch.arange(k, device=mask.device)[None] < counts[:, None]  # [B, k]
    return torch.zeros_like(mask).scatter(1, top, chosen)


@torch.no_grad()
def sample_rois(proposals: list, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, cfg: Config):
    """minibatch.py _sample_rois for the whole batch at once. proposals B x [R_i, 4]; ground truth padded [B, M, ...]
    (degenerate boxes invalid). The ground-truth boxes join the proposals (the reference's roidb holds them with IoU 1);
    each candidate gets its best box's IoU and class; per image at most round(fg_fraction x rois_per_image) foreground
    (IoU >= fg_iou_thresh), then background (IoU in [bg_iou_thresh_lo, bg_iou_thresh_hi), label 0) up to
    rois_per_image, both drawn without replacement (fewer when there are fewer). Returns, flat and image by image:
    rois [S, 4], image_idx [S], labels [S], regression_targets [S, 4] (dx, dy, dw, dh to the best box, not
    normalised; background rows 0)."""
    B, R = len(proposals), max(len(p) for p in proposals)
    padded = gt_boxes.new_zeros(B, R, 4)
    proposal_valid = torch.zeros(B, R, dtype=torch.bool, device=gt_boxes.device)
    for i, p in enumerate(proposals):
        padded[i, : len(p)], proposal_valid[i, : len(p)] = p, True
    candidates = torch.cat([gt_boxes, padded], dim=1)  # [B, P, 4], P = M + R: ground truth first, as the roidb
    valid = torch.cat([gt_valid, proposal_valid], dim=1)  # [B, P]
    iou = elementwise_box_iou(candidates[:, :, None], gt_boxes[:, None]).masked_fill(~gt_valid[:, None], -1.0)
    max_iou, matched_idxs = iou.max(2)  # [B, P] each (M >= 1: pad_targets pads empty batches)
    foreground = valid & (max_iou >= cfg.fg_iou_thresh)
    background = valid & (max_iou < cfg.bg_iou_thresh_hi) & (max_iou >= cfg.bg_iou_thresh_lo)
    num_fg = foreground.sum(1).clamp(max=round(cfg.fg_fraction * cfg.rois_per_image))  # [B]
    fg_mask = random_subset(foreground, num_fg)
    bg_mask = random_subset(background, torch.minimum(background.sum(1), cfg.rois_per_image - num_fg))
    keep = fg_mask | bg_mask  # [B, P]
    image_idx = torch.arange(B, device=keep.device)[:, None].expand(B, keep.shape[1])[keep]  # [S]
    rois, matched = candidates[keep], matched_idxs[keep]  # [S, 4], [S]
    labels = torch.where(fg_mask[keep], gt_labels[image_idx, matched], 0)  # [S]
    targets = encode_boxes(gt_boxes[image_idx, matched], rois)  # [S, 4]
    return rois, image_idx, labels, torch.where((labels > 0)[:, None], targets, 0.0)


@torch.no_grad()
def bbox_target_statistics(dataset, cfg: Config):
    """roidb.py add_bbox_regression_targets, streaming over the images (one image's candidates at a time): every
    candidate (ground-truth boxes and the first proposals_per_image proposals) with IoU >= fg_iou_thresh with a
    ground-truth box gives the target to that box; per class the mean and std of the targets (var = E[t^2] - E[t]^2).
    With flips (hflip_prob > 0) the mirrored images count too, as the reference's flipped roidb: dx changes sign, so
    its mean is 0. Returns means, stds [K, 4] (float32); classes with fewer than 2 targets, or a zero std, get 0 / 1
    (the reference divides by that zero)."""
    K = cfg.num_classes
    counts, sums, squares = torch.zeros(K, dtype=torch.float64), torch.zeros(K, 4, dtype=torch.float64), \
        torch.zeros(K, 4, dtype=torch.float64)
    gt = dataset.coco_gt()  # only the annotations: no image is decoded
    index = {img["id"]: i for i, img in enumerate(gt["images"])}
    boxes_of = [[] for _ in gt["images"]]
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        if w > 0 and h > 0:
            boxes_of[index[ann["image_id"]]].append([x, y, x + w, y + h, ann["category_id"]])
    for i, boxes in enumerate(boxes_of):
        if not boxes:
            continue
        gt_i = torch.tensor(boxes, dtype=torch.float64)  # [M, 5]
        size = (gt["images"][i]["height"], gt["images"][i]["width"])
        props = clip_boxes_to_image(torch.from_numpy(dataset.proposals[i][:cfg.proposals_per_image]).double(), size)
        candidates = torch.cat([gt_i[:, :4], props])  # [P, 4]
        iou, best = elementwise_box_iou(candidates[:, None], gt_i[None, :, :4]).max(1)  # [P]
        keep = iou >= cfg.fg_iou_thresh
        targets, labels = encode_boxes(gt_i[best[keep], :4], candidates[keep]), gt_i[best[keep], 4].long()
        counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        sums.index_add_(0, labels, targets)
        squares.index_add_(0, labels, targets ** 2)
    if cfg.hflip_prob > 0:
        sums[:, 0] = 0.0  # the mirror of every target has -dx
    means = sums / counts.clamp(min=1)[:, None]
    stds = (squares / counts.clamp(min=1)[:, None] - means**2).clamp(min=0).sqrt()
    degenerate = (counts < 2)[:, None] | (stds < 1e-6)
    return torch.where(degenerate, 0.0, means).float(), torch.where(degenerate, 1.0, stds).float()


# --- Loss ---


def fast_rcnn_loss(cls_logits: Tensor, bbox_regression: Tensor, labels: Tensor, regression_targets: Tensor) -> dict:
    """Paper eq. 1 (train.prototxt: SoftmaxWithLoss + SmoothL1Loss): cls_logits [S, K], bbox_regression [S, K * 4],
    labels [S], regression_targets [S, 4] (normalised). Cross-entropy over the S RoIs + smooth L1 (beta 1: 0.5 x^2 if
    |x| < 1 else |x| - 0.5) on the 4 outputs of the true class of foreground RoIs, both divided by S."""
    num_rois = max(1, len(labels))
    classification_loss = F.cross_entropy(cls_logits, labels, reduction="sum") / num_rois
    pos = torch.where(labels > 0)[0]  # [num_foreground]
    bbox_regression = bbox_regression.reshape(len(labels), cls_logits.shape[1], 4)  # [S, K, 4]
    box_loss = F.smooth_l1_loss(bbox_regression[pos, labels[pos]], regression_targets[pos], beta=1.0, reduction="sum")
    return {"loss_classifier": classification_loss, "loss_box_reg": box_loss / num_rois}


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_logits: Tensor, deltas: Tensor, rois: Tensor, num_rois_per_image: list,
                           image_sizes: list, cfg: Config) -> list:
    """test.py im_detect + test_net: cls_logits [S, K], deltas [S, K * 4] (not normalised), rois [S, 4], image by
    image -> B dicts with boxes [D, 4], scores [D], labels [D]. Softmax scores; class-specific boxes decoded and
    clipped to the image; per class the pairs scoring above score_thresh, the best detections_per_img of them, NMS at
    nms_thresh; the best detections_per_img of the image (this repo's cap). (The reference's set-wide threshold,
    keeping 40 boxes per image and class on average over the whole test set, needs every image first: not done.)"""
    K = cls_logits.shape[-1]
    boxes = decode_boxes(deltas.reshape(len(rois), K, 4), rois[:, None])  # [S, K, 4]
    scores = F.softmax(cls_logits, -1)  # [S, K]
    detections = []
    for boxes_i, scores_i, size in zip(boxes.split(num_rois_per_image), scores.split(num_rois_per_image), image_sizes):
        boxes_i = clip_boxes_to_image(boxes_i[:, 1:].reshape(-1, 4), size)  # [S_i * (K - 1), 4]
        labels_i = torch.arange(1, K, device=scores_i.device).repeat(len(scores_i))
        scores_i = scores_i[:, 1:].reshape(-1)
        keep = torch.where(scores_i > cfg.score_thresh)[0]
        keep = torch.cat([c[scores_i[c].argsort(descending=True)[:cfg.detections_per_img]]
                          for c in (keep[labels_i[keep] == k] for k in range(1, K))])
        keep = keep[batched_nms(boxes_i[keep], scores_i[keep], labels_i[keep], cfg.nms_thresh)]
        keep = keep[: cfg.detections_per_img]
        detections.append({"boxes": boxes_i[keep], "scores": scores_i[keep], "labels": labels_i[keep]})
    return detections


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = FastRCNN  # the class the template builds, trains, evaluates and saves
PREDICT = {}  # --predict's Config values where no flag sets them (yolo.py: detect.py's); none here


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """solver.prototxt: SGD with momentum (or AdamW), weights at cfg.lr with weight decay, biases at 2 x lr without
    (lr_mult 2, decay_mult 0), cfg.lr scaled to the processes, a linear warmup (at most a third of the run), x lr_gamma
    at each of lr_steps. Sets the box targets' statistics from the training set (or 0 and 1; --resume: loaded)."""
    if isinstance(model, FastRCNN) and train_set is not None and not cfg.resume:
        stats = bbox_target_statistics(train_set, cfg) if cfg.normalize_targets else (0.0, 1.0)  # raw targets
        # a regressor loaded from --weights is re-expressed; one of another class count was left at its initialisation
        model.set_target_statistics(*stats, keep_deltas=model.box_predictor.loaded)
    params, lr = caffe_param_groups(model, cfg.lr * world_size, cfg.weight_decay), cfg.lr * world_size
    optimizer = (torch.optim.SGD(params, lr, cfg.momentum, fused=next(model.parameters()).is_cuda)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr))
    warmup = data.warmup_steps(cfg, steps_per_epoch)  # (warns if shortened, or if no lr step falls within the run)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup if step < warmup else 1.0) * cfg.lr_gamma ** sum(
        step >= epoch * steps_per_epoch for epoch in cfg.lr_steps))


def train_transforms(cfg: Config):
    return data.RandomHorizontalFlip(cfg.hflip_prob)  # the reference's flipped roidb; the proposals flip too


@torch.no_grad()
def draw_targets(model: FastRCNN, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the image's proposals as one training step samples them, under the ground truth (class
    colours): foreground RoIs blue, background RoIs red (as many as foreground: the 48 sampled would hide the image),
    and grey the best 30 proposals that were not sampled."""
    proposals = model.proposals_of(image, target)
    valid = valid_box_mask(target["boxes"])
    gt_boxes, gt_labels, gt_valid = pad_targets([{"boxes": target["boxes"][valid].float(),
                                                  "labels": target["labels"][valid]}])
    rois, _, labels, _ = sample_rois([proposals], gt_boxes, gt_labels, gt_valid, model.cfg)
    sampled = (proposals[:, None] == rois[None]).all(2).any(1)  # [R]
    drawn = draw_boxes(image, proposals[~sampled][:30], color=(160, 160, 160), width=1)
    for boxes, colour in ((rois[labels == 0][:int((labels > 0).sum())], (255, 0, 0)), (rois[labels > 0], (0, 0, 255))):
        drawn = draw_boxes(drawn, boxes, color=colour, width=1)
    draw_boxes(drawn, target["boxes"], target["labels"], None, class_names, path, width=2)


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
