"""R-CNN: regions with CNN features, the original three-stage recipe.

Paper: Girshick, Donahue, Darrell, Malik, "Rich feature hierarchies for accurate object detection and semantic
segmentation", CVPR 2014 (https://arxiv.org/abs/1311.2524). The reference is its code, rbgirshick/rcnn (MATLAB, Caffe
and liblinear, read and not run), whose files and numbers are followed here.

What this file implements, in the order the data flows:
  - proposals: selective search, R-CNN's "fast" mode, about 2000 boxes per image, computed once per dataset in parallel
    and cached beside the run (data.selective_search, data.attach_proposals), or brought by the dataset as a file;
  - warping (rcnn_im_crop, "warp" mode): each region grown so that 16 px of context surround it at the network's input
    size (of 227: the paper's; by default 8 of 112), clipped to the image, resized bilinearly to its clipped share of
    the input, the rest left at the mean;
  - stage 1, fine-tuning: a torchvision network (a ResNet by default, AlexNet as in the paper) with a new K-way
    classifier, on batches of 128 warped regions: 32 foreground (IoU >= 0.5 with a ground-truth box: its class) and 96
    background (IoU < 0.5), softmax cross-entropy;
  - stage 2, SVMs: one linear SVM per class on fc7 features scaled to a mean norm of 20; positives: the ground-truth
    boxes, negatives: regions under 0.3 IoU with every box of the class, hard negatives mined in one pass over the
    images; liblinear's objective (L2-regularised hinge loss, C 0.001, positives weighted 2, bias feature 10), solved to
    its optimum;
  - stage 3, box regression: per class, ridge regression (lambda 1000) from pool5 features to the offsets of regions
    with IoU > 0.6 to their ground-truth box, the targets centred and whitened;
  - test: SVM scores of every proposal, regressed boxes, per-class NMS at IoU 0.3, the best 100 per image.

Why SVMs after fine-tuning (paper, appendix B): fine-tuning needs many examples, so it counts regions that only half
cover an object (IoU >= 0.5) as that object; the SVMs see the exact boxes as positives and call everything under 0.3
a negative, which localises better (the paper: 54.2 mAP with SVMs, 50.9 with the fine-tuned softmax, VOC 2007).

How the three stages fit the training loop every model file shares (the template, below): the loop trains stage 1;
the model counts its training steps, and make_optimizer tells it how many the run has. At its first evaluation after
the last one, the model runs stages 2 and 3 itself, on the training set of its own Config (train_svms_and_regressors),
so the evaluation after the last epoch and last.pt are the whole detector (and best.pt, unless an earlier
evaluation scored higher). Evaluations after earlier epochs score with the fine-tuned softmax. Stage 2 keeps its
progress in <out>/stage2.pt (every 200 images) for the network, settings and data it was made for: if a run dies
there, --resume repeats the last epoch exactly (the template's exact resume) and stage 2 goes on where it stopped;
stage 3 is a closed-form solve from stage 2's file.

Run (--help lists every Config field as a flag, with the values a plain --train uses):
    python rcnn.py --train                                   # synthetic shapes, no download; CPU: preset cpu
    python rcnn.py --train --preset voc --data-root VOCdevkit/VOC2007           # the paper's recipe, ImageNet AlexNet
    python rcnn.py --train --resume runs/rcnn/last.pt        # go on after Ctrl-C, SIGTERM or a crash
    python rcnn.py --eval --weights runs/rcnn/best.pt [--scoring softmax] [--no-bbox-regression]   # the ablations
    python rcnn.py --predict IMG_OR_DIR --weights runs/rcnn/best.pt --out DIR   # proposals computed on the fly
    python rcnn.py --show-targets --out DIR                  # proposals as fine-tuning and the SVMs label them
    python -m pytest -q test_models.py -k rcnn

The model's call (the other files' call, with proposals): train mode model(images, targets) -> {"loss_classifier"}, each
target with "proposals" [R, 4] (data.attach_proposals); eval mode model(images) -> detections. Either takes proposals=
[[R_i, 4] boxes in the images' pixels, one per image] instead; without any, selective search runs on the fly.

Tensor shapes (legend used in every comment below):
    B images in the batch, R proposals of one image, M ground-truth boxes of one image, S warped regions,
    K classes including background (num_classes), D5 pool5 and D7 fc7 feature sizes, N examples of an SVM,
    D detections of one image. Boxes are x1, y1, x2, y2 in the input image's pixels.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import batched_nms

import data
from common import (box_iou, check_images, check_targets, clip_boxes_to_image, draw_boxes, proposal_sources,
                    valid_box_mask)

# --- Config ---


@dataclass
class Config:
    # The defaults are the synthetic run on one GPU (python rcnn.py --train), from random weights; rbgirshick/rcnn's
    # value is in brackets where it differs. PRESETS below: the paper's VOC 2007 recipe, and a run sized for a CPU.
    # model
    num_classes: int = 7  # K: foreground classes + 1 background; --train takes it from the data [VOC: 21]
    backbone: Literal["alexnet", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"  # [alexnet: CaffeNet]
    backbone_weights: str = "none"  # none (random) | imagenet (torchvision's, downloaded) | PATH to its state dict
    crop_size: int = 112  # warped regions are crop_size x crop_size [227; 224 for a torchvision ResNet]
    crop_padding: int = 8  # context around each region at the crop's scale, pixels [16 of 227]
    image_mean: tuple = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1]
    image_std: tuple = (0.229, 0.224, 0.225)
    # proposals (data.attach_proposals)
    proposals: Literal["fast", "quality"] = "fast"  # selective search mode, computed once and cached in out/
    train_proposals: str = ""  # a proposals file of the training images (format: data.load_proposals); "": compute
    val_proposals: str = ""  # ... of the validation images
    proposal_side: int = 0  # selective search sees the image resized to this longer side; 0: as it is [VOC: ~500]
    proposal_min_size: int = 4  # selective search drops boxes narrower or lower than this, pixels [20]
    proposals_per_image: int = 2000  # the first (best) proposals of each image that are used
    # stage 1: fine-tuning (pascal_finetune_train.prototxt)
    rois_per_batch: int = 128  # warped regions per step, from the step's images
    fg_fraction: float = 0.25  # of them at most this fraction foreground
    fg_iou_thresh: float = 0.5  # region IoU >= this with a ground-truth box: foreground, its class; else background
    dropout: float = 0.5  # AlexNet's fc6 and fc7 dropout
    # stage 2: SVMs (rcnn_train.m)
    svm_c: float = 0.001  # liblinear -c: weight of the hinge loss
    svm_pos_weight: float = 2.0  # liblinear -w1: positives' hinge loss counts this much more
    svm_bias: float = 10.0  # liblinear -B: a constant feature of this value; its (regularised) weight x it is the bias
    svm_neg_iou: float = 0.3  # negatives: regions under this IoU with every box of the class (0.3..1: ignored)
    svm_hard_thresh: float = -1.0001  # hard negatives: scoring above this (first image: all negatives)
    svm_evict_thresh: float = -1.2  # after each retraining, cached negatives scoring below this are dropped
    svm_retrain_every: int = 2000  # retrain a class once more than this many negatives were added, and at the end
    feature_norm: float = 20.0  # features are scaled so that their mean L2 norm is this
    # stage 3: box regression (rcnn_train_bbox_regressor.m)
    bbox_lambda: float = 1000.0  # ridge regularisation
    bbox_min_iou: float = 0.6  # training examples: regions with IoU above this with their best ground-truth box
    # test (rcnn_test.m)
    scoring: Literal["svm", "softmax"] = "svm"  # class scores: the SVMs (stages 2-3 fitted) or the fine-tuned softmax
    bbox_regression: bool = True  # move the boxes with stage 3's regressors
    nms_thresh: float = 0.3  # NMS IoU, per class
    detections_per_img: int = 100  # per class before NMS (max_per_image), and per image after (ours, as COCO's)
    feature_batch: int = 256  # warped regions per forward pass when extracting features
    # data (data.build_datasets)
    data: Literal["synthetic", "coco", "voc"] = "synthetic"  # coco: images in the folder named as the json, ...
    data_root: str = ""  # dataset folder for coco / voc (coco images: ... else in JPEGImages/ or images/)
    train_ann: str = ""  # coco: training json (default: annotations/instances_train2017.json under data_root)
    val_ann: str = ""  # coco: validation json (default: annotations/instances_val2017.json)
    train_split: str = "train"  # voc: ImageSets/Main/<split>.txt for training
    val_split: str = "val"  # voc: ... for evaluation
    image_size: int = 256  # synthetic: image side in pixels
    num_train: int = 2000  # synthetic: training images
    num_val: int = 200  # synthetic: validation images
    hflip_prob: float = 0.5  # training augmentation: horizontal flip probability (Caffe's window layer: mirror)
    # training (stage 1; R-CNN fine-tunes for 70k steps, lr 0.001 x 0.1 every 20k, from ImageNet weights)
    epochs: int = 4  # passes over the training set
    batch_size: int = 8  # images per step and per process, their regions pooled into one batch of rois_per_batch
    lr: float = 0.01  # backbone weights' lr (biases x2, the new classifier x10), scaled to the processes [0.001]
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw (lr ~1e-3): faster from scratch on little data
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on weights, not biases (Caffe's weight_decay 0); sgd: L2, adamw: decoupled
    lr_steps: tuple = (3,)  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1  # lr decay factor
    warmup_iters: int = 100  # steps of linear warmup at the start, at most a third of the run [0]
    warmup_factor: float = 0.001  # the warmup starts at lr x this
    accumulate: int = 1  # batches per optimiser step (gradient accumulation)
    ema_decay: float = 0.0  # evaluate and save an exponential moving average of the weights (0: off)
    clip_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping)
    amp: bool = True  # mixed precision on CUDA: bf16 where supported, else fp16 with loss scaling
    channels_last: bool = False  # convolutions in channels-last memory layout (faster for some: GPU AMP, SSD on a CPU)
    # run
    workers: int = 4  # DataLoader worker processes, and selective search processes
    device: str = ""  # cuda | cpu | cuda:1 ...; empty: cuda if available
    seed: int = 0  # seeds the data order, the augmentation, the region sampling and the synthetic data
    log_every: int = 20  # print and log to metrics.jsonl every this many steps
    out: str = "runs/rcnn"  # output folder: config.json, metrics.jsonl, last.pt, best.pt, proposals, stage2.pt
    resume: str = ""  # checkpoint (last.pt) to continue training from
    weights: str = ""  # PATH to a checkpoint of this file: start from / evaluate (R-CNN has no reference weights)
    draw_thresh: float = 0.0  # --predict draws detections scoring at least this (an SVM margin) [softmax: 0.5]


# Presets: values over the defaults, under the command line (--preset NAME; without CUDA, cpu is picked by itself).
PRESETS = {
    # 300 192-px images, 64-px crops, all three stages: 14.6 minutes on 2 idle CPU cores (README), mAP@0.5 0.57
    # AdamW: SGD at lr 0.01 from scratch diverged here (fine-tuning loss 2.0 -> 5.4 in 60 steps); SVM C 0.01: the
    # paper's 0.001 left these from-scratch features' SVMs under the softmax (0.49 against 0.60, README). Their margins
    # stay small: on the val split, scores >= 0 keep 0.9 boxes per image (precision 0.92, recall 0.29), >= -0.5 1.3
    # (0.83, 0.36), so --predict draws from -0.5
    "cpu": dict(backbone="resnet18", image_size=192, num_train=300, num_val=100, crop_size=64, crop_padding=4,
                batch_size=4, epochs=6, optimizer="adamw", lr=1e-3, lr_steps=(5,), warmup_iters=50, workers=2,
                feature_batch=128, rois_per_batch=64, svm_c=0.01, draw_thresh=-0.5),
    # the paper's VOC 2007 recipe: ImageNet AlexNet (CaffeNet), 227-px crops with 16 px of context, 20-px proposals;
    # 70k steps of 128 regions (2,506 steps of 2 images per epoch of trainval), lr x 0.1 every 20k
    "voc": dict(data="voc", backbone="alexnet", backbone_weights="imagenet", crop_size=227, crop_padding=16,
                proposal_min_size=20, train_split="trainval", val_split="test", lr=0.001, epochs=28,
                lr_steps=(8, 16, 24), batch_size=2, warmup_iters=0),
}


# --- Model ---


class RCNN(nn.Module):
    """model.train(): model(images, targets) -> {"loss_classifier"}; targets with "proposals" [R, 4] (else selective
    search on the fly). model.eval(): model(images, proposals=None) -> list of {"boxes" [D, 4] in input pixels,
    "scores" [D], "labels" [D]}; scores are SVM margins (or softmax probabilities, scoring="softmax").
    images: list of [3, h, w] in [0, 1]."""

    def __init__(self, cfg: Config, load_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        K = cfg.num_classes
        # load_backbone=False: the caller then loads every weight (--weights, --resume, --eval): nothing is read
        weights = "IMAGENET1K_V1" if cfg.backbone_weights == "imagenet" and load_backbone else None
        net = getattr(torchvision.models, cfg.backbone)(weights=weights)
        if cfg.backbone_weights not in ("imagenet", "none") and load_backbone:
            data.load_backbone_weights(net, cfg.backbone_weights)
        if cfg.backbone == "alexnet":  # conv1-5 -> pool5 [9216] -> fc6 -> fc7 [4096], ImageNet's fc6/fc7 kept
            self.body = nn.Sequential(net.features, net.avgpool)  # [S, 256, 6, 6]
            net.classifier[0].p = net.classifier[3].p = cfg.dropout
            self.fc = net.classifier[:6]  # dropout, fc6, relu, dropout, fc7, relu
            dim5, dim7 = 256 * 6 * 6, 4096
        else:  # a ResNet's body -> pool5: layer4 averaged to 2 x 2 [4 C] -> fc7: averaged to 1 x 1 [C]
            self.body = nn.Sequential(*(getattr(net, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1",
                                                                  "layer2", "layer3", "layer4")))
            self.fc = None
            dim5, dim7 = 4 * net.fc.in_features, net.fc.in_features
        self.cls_score = nn.Linear(dim7, K)  # fc8, new: N(0, 0.01) as fc8_pascal
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        # stages 2 and 3 (fitted by train_svms_and_regressors; buffers, so that checkpoints hold them)
        self.register_buffer("svm_weight", torch.zeros(K, dim7))  # [K, D7], row 0 unused
        self.register_buffer("svm_bias", torch.zeros(K))
        self.register_buffer("bbox_beta", torch.zeros(K, dim5 + 1, 4))  # ridge coefficients, last row: intercept
        self.register_buffer("bbox_mean", torch.zeros(K, 4))  # mu of the targets
        self.register_buffer("bbox_t_inv", torch.eye(4).repeat(K, 1, 1))  # un-whitening [K, 4, 4]
        self.register_buffer("feature_scale", torch.ones(2))  # pool5, fc7: feature_norm / their mean norm
        # when to fit them: after the last of finetune_steps training steps (make_optimizer sets it for this run, also
        # a resumed one with other --epochs: not saved), once
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("finetune_steps", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("fitted_at", torch.full((), -1, dtype=torch.int64))  # steps when fitted; -1: never
        self.proposal_cache = {}  # selective search of images seen without proposals (256 at most)

    def features(self, images: list, boxes: list, pad_to: int = 0):
        """Warped regions through the network, feature_batch at a time: images B x [3, h, w] in [0, 1], boxes B x
        [R_i, 4] -> pool5 [S, D5], fc7 [S, D7] (S = sum R_i, image by image). Each batch of crops is padded with zero
        crops to a multiple of pad_to (0: 64 on CUDA under cuDNN's benchmark mode, which tunes every new batch size
        anew, else 1); in eval mode the padding changes no feature."""
        cfg, pool5, fc7 = self.cfg, [], []
        pad_to = pad_to or (64 if images[0].is_cuda and torch.backends.cudnn.benchmark else 1)
        for image, b in zip(normalise(images, cfg), boxes):
            for chunk in b.split(cfg.feature_batch):
                crops = warp_regions(image, chunk, cfg.crop_size, cfg.crop_padding)  # [n, 3, crop, crop]
                pad = -len(crops) % pad_to
                p5, f7 = self.forward_regions(F.pad(crops, (0, 0, 0, 0, 0, 0, 0, pad)) if pad else crops)
                pool5.append(p5[:len(crops)].float())
                fc7.append(f7[:len(crops)].float())
        dim5, dim7 = self.bbox_beta.shape[1] - 1, self.svm_weight.shape[1]
        return (torch.cat(pool5) if pool5 else images[0].new_zeros(0, dim5),
                torch.cat(fc7) if fc7 else images[0].new_zeros(0, dim7))

    def forward_regions(self, crops: Tensor):
        """[S, 3, crop, crop] normalised crops -> pool5 [S, D5], fc7 [S, D7]."""
        x = self.body(crops)
        if self.fc is not None:  # AlexNet
            pool5 = x.flatten(1)
            return pool5, self.fc(pool5)
        return F.adaptive_avg_pool2d(x, 2).flatten(1), x.mean((2, 3))  # ResNet

    def proposals_of(self, image: Tensor, target: dict | None = None) -> Tensor:
        """The image's proposals: the target's (the dataset's, the caller's) or selective search, the first
        proposals_per_image, clipped."""
        cfg = self.cfg
        if target is not None and "proposals" in target:
            boxes = target["proposals"]
        else:  # on the fly (--predict, tests); remembered for images seen again
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
            check_targets(images, targets, "RCNN")
        sources = proposal_sources(images, targets, proposals, self.training, "RCNN")  # proposals= or the targets'
        proposals = [self.proposals_of(image, source) for image, source in zip(images, sources)]  # None: searched
        if self.training:
            self.steps += 1
            rois, image_idx, labels = sample_regions(proposals, targets, cfg)  # [S, 4], [S], [S]
            crops = torch.cat([warp_regions(image, rois[image_idx == i], cfg.crop_size, cfg.crop_padding)
                               for i, image in enumerate(normalise(images, cfg))])  # [S, 3, crop, crop]
            order = torch.cat([torch.where(image_idx == i)[0] for i in range(len(images))])
            cls_logits = self.cls_score(self.forward_regions(crops)[1]).float()  # [S, K]
            return finetune_loss(cls_logits, labels[order])
        if int(self.finetune_steps) > 0 and int(self.steps) >= int(self.finetune_steps) \
                and int(self.fitted_at) != int(self.steps) and cfg.scoring == "svm":
            self.fit_stages_2_and_3(images[0].device)  # the first evaluation after fine-tuning
        pool5, fc7 = (f.to(self.svm_weight.dtype) for f in self.features(images, proposals))  # (a model in bf16)
        cls_scores = self.score(self.cls_score(fc7).float(), fc7)  # [S, K]
        boxes = self.regress(pool5, torch.cat(proposals))  # [S, K, 4]
        return postprocess_detections(cls_scores, boxes, [len(p) for p in proposals],
                                      [image.shape[-2:] for image in images], cfg)

    def fitted(self) -> bool:
        """Stages 2 and 3 are fitted to this network: in training, after the run's last step (a run resumed with more
        --epochs fine-tunes on: the SVMs fitted at its former end no longer apply); outside training, ever."""
        return int(self.fitted_at) >= max(0, int(self.finetune_steps))

    def score(self, cls_logits: Tensor, fc7: Tensor) -> Tensor:
        """Class scores [S, K] of regions: SVM margins on scaled fc7 once stages 2-3 are fitted, else softmax."""
        if self.cfg.scoring == "svm" and self.fitted():
            return fc7 * self.feature_scale[1] @ self.svm_weight.T + self.svm_bias
        return F.softmax(cls_logits, -1)

    def regress(self, pool5: Tensor, rois: Tensor) -> Tensor:
        """Stage 3 (rcnn_predict_bbox_regressor): pool5 [S, D5], rois [S, 4] -> boxes [S, K, 4], one per class."""
        if not self.cfg.bbox_regression or not self.fitted():
            return rois[:, None].expand(-1, self.cfg.num_classes, 4)
        x = pool5 * self.feature_scale[0]
        y = torch.einsum("sd,kdc->skc", x, self.bbox_beta[:, :-1]) + self.bbox_beta[:, -1]  # [S, K, 4] whitened
        y = torch.einsum("skc,kce->ske", y, self.bbox_t_inv) + self.bbox_mean  # dx, dy, dw, dh
        return decode_boxes(y, rois[:, None])

    def start_finetuning(self, steps: int):
        """A training run of `steps` steps starts (also from --weights: the count is this run's; --resume then
        restores it): stages 2 and 3 are fitted at the first evaluation after the last one."""
        self.steps.zero_()
        self.fitted_at.fill_(-1)
        self.finetune_steps.fill_(steps)

    def training_set(self):
        """The training images of this model's Config with their proposals (stages 2 and 3 need them): the cached
        or given file, as at the start of training; no augmentation."""
        with warnings.catch_warnings():  # its warnings (dropped boxes ...) were given when training started
            warnings.simplefilter("ignore")
            dataset = data.build_datasets(dataclasses.replace(self.cfg, proposals=""))[0]
        data.attach_proposals(dataset, self.cfg.train_proposals, os.path.join(self.cfg.out, "proposals_train.npz"),
                              self.cfg.workers, collective=False, **proposal_settings(self.cfg))
        return dataset

    def fit_stages_2_and_3(self, device):
        train_svms_and_regressors(self, self.training_set(), device)
        self.fitted_at.copy_(self.steps)


def caffe_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list:
    """pascal_finetune_train.prototxt's blobs_lr and weight_decay: weights at lr with weight decay, biases at 2 x lr
    without, the new classifier (fc8_pascal, here cls_score) at 10 x and 20 x. "Biases" are every 1-d parameter: from
    random weights (batch norm trained, not frozen) batch norm's scales too, which Caffe's CaffeNet does not have."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("cls_score."), p.ndim == 1), []).append(p)
    return [{"params": ps, "lr": lr * (10 if new else 1) * (2 if bias else 1),
             "weight_decay": 0.0 if bias else weight_decay} for (new, bias), ps in groups.items()]


def proposal_settings(cfg: Config) -> dict:
    """The selective search settings of a run (what its proposals cache was made with)."""
    return dict(mode=cfg.proposals, side=cfg.proposal_side, min_box_size=cfg.proposal_min_size)


def normalise(images: list, cfg: Config) -> list:
    """B x [3, h, w] in [0, 1] -> B x [3, h, w] with ImageNet's mean and std: the mean is 0 then, so the zero canvas of
    warp_regions is the mean colour."""
    # (forward checked the images: float [3, h, w]); mean and std take their dtype (a model cast to bf16: bf16 images)
    # (non_blocking: a blocking copy to a GPU would first wait for all the work queued on it)
    mean = torch.tensor(cfg.image_mean, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=images[0].dtype).to(images[0].device, non_blocking=True)[:, None, None]
    return [(image - mean) / std for image in images]


def warp_regions(image: Tensor, boxes: Tensor, crop_size: int, padding: int) -> Tensor:
    """rcnn_im_crop in "warp" mode: normalised image [3, H, W], boxes [R, 4] -> crops [R, 3, crop_size, crop_size].

    In the reference's 1-based pixel indices (box pixels X1..X2 = x1 + 1..x2): the box is grown about its centre by
    crop_size / (crop_size - 2 padding) and rounded, so that `padding` pixels of context surround it after warping;
    clipped to the image; the clipped window is resized (bilinear, no antialiasing, as OpenCV in Caffe's window
    layer) to its share of the crop, round(clipped size x crop_size / grown size), and placed where the image's
    border cuts the grown box; the rest of the crop is 0 (the mean). Boxes wholly outside the image give zeros."""
    H, W = image.shape[-2:]
    R, S, dev = len(boxes), crop_size, image.device
    if R == 0:
        return image.new_zeros(0, 3, S, S)
    b = boxes.double()
    x1, y1, x2, y2 = b[:, 0] + 1, b[:, 1] + 1, b[:, 2], b[:, 3]  # 1-based, inclusive
    scale = S / (S - 2 * padding)
    half_w, half_h = (x2 - x1 + 1) / 2, (y2 - y1 + 1) / 2
    cx, cy = x1 + half_w, y1 + half_h  # rcnn_im_crop's centre (half a pixel right of the true one)
    matlab_round = lambda v: torch.sign(v) * torch.floor(v.abs() + 0.5)  # noqa: E731 (MATLAB rounds half away)
    gx1, gy1 = matlab_round(cx - half_w * scale), matlab_round(cy - half_h * scale)
    gx2, gy2 = matlab_round(cx + half_w * scale), matlab_round(cy + half_h * scale)
    grown_w, grown_h = gx2 - gx1 + 1, gy2 - gy1 + 1
    pad_x, pad_y = (1 - gx1).clamp(min=0), (1 - gy1).clamp(min=0)
    cx1, cy1, cx2, cy2 = gx1.clamp(min=1), gy1.clamp(min=1), gx2.clamp(max=W), gy2.clamp(max=H)  # clipped
    clip_w, clip_h = cx2 - cx1 + 1, cy2 - cy1 + 1
    crop_w, crop_h = matlab_round(clip_w * S / grown_w), matlab_round(clip_h * S / grown_h)
    pad_x, pad_y = matlab_round(pad_x * S / grown_w), matlab_round(pad_y * S / grown_h)
    crop_w, crop_h = torch.minimum(crop_w, S - pad_x), torch.minimum(crop_h, S - pad_y)

    def axis(pad, crop, start, length):  # -> source pixel (0-based) and validity of each crop column/row [R, S]
        u = torch.arange(S, device=dev, dtype=torch.float64)[None] - pad[:, None]  # position in the resized window
        valid = (u >= 0) & (u < crop[:, None]) & (length[:, None] >= 1)
        src = (u + 0.5) * (length / crop.clamp(min=1))[:, None] - 0.5  # bilinear resize, pixel centres aligned
        src = torch.minimum(src.clamp(min=0), (length - 1).clamp(min=0)[:, None])  # the window's edge repeats
        return src + (start - 1)[:, None], valid

    xs, valid_x = axis(pad_x, crop_w, cx1, clip_w)
    ys, valid_y = axis(pad_y, crop_h, cy1, clip_h)
    grid = torch.stack([((2 * xs + 1) / W - 1)[:, None, :].expand(R, S, S),
                        ((2 * ys + 1) / H - 1)[:, :, None].expand(R, S, S)], -1)  # [R, S, S, 2]
    crops = F.grid_sample(image[None].float(), grid.reshape(1, R * S, S, 2).float(), mode="bilinear",
                          padding_mode="border", align_corners=False)  # (float32: bf16 would move the samples)
    crops = crops.reshape(3, R, S, S).transpose(0, 1)  # [R, 3, S, S]
    return (crops * (valid_y[:, :, None] & valid_x[:, None, :])[:, None]).to(image.dtype)


def decode_boxes(deltas: Tensor, rois: Tensor) -> Tensor:
    """rcnn_predict_bbox_regressor's decoding: deltas [..., 4] (dx, dy, dw, dh), rois [..., 4] -> boxes [..., 4].
    Widths are x2 - x1 (+ eps), no +1, as that code."""
    eps = torch.finfo(torch.float64).eps
    w, h = rois[..., 2] - rois[..., 0] + eps, rois[..., 3] - rois[..., 1] + eps
    cx, cy = rois[..., 0] + 0.5 * w, rois[..., 1] + 0.5 * h
    cx, cy = deltas[..., 0] * w + cx, deltas[..., 1] * h + cy
    w, h = torch.exp(deltas[..., 2]) * w, torch.exp(deltas[..., 3]) * h
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def encode_boxes(gt: Tensor, rois: Tensor) -> Tensor:
    """The regression targets of rcnn_train_bbox_regressor (get_examples): gt, rois [N, 4] -> [N, 4] dx, dy, dw, dh."""
    eps = torch.finfo(torch.float64).eps
    w, h = rois[:, 2] - rois[:, 0] + eps, rois[:, 3] - rois[:, 1] + eps
    gw, gh = gt[:, 2] - gt[:, 0] + eps, gt[:, 3] - gt[:, 1] + eps
    return torch.stack([(gt[:, 0] + 0.5 * gw - rois[:, 0] - 0.5 * w) / w,
                        (gt[:, 1] + 0.5 * gh - rois[:, 1] - 0.5 * h) / h, torch.log(gw / w), torch.log(gh / h)], 1)


def reference_weights(weights: str, state_dict: dict = None):
    """R-CNN has no reference weights to load: the original are Caffe models."""
    what = "not a checkpoint of rcnn.py" if os.path.exists(weights) else "no such file"
    raise SystemExit(f"--weights {weights}: {what} (R-CNN has no reference weights to load)")


# --- Targets ---


def valid_boxes(target: dict):
    """A target's boxes [M, 4] and labels [M] without the degenerate ones (width or height <= 0, not finite)."""
    boxes = target["boxes"].float()
    keep = valid_box_mask(boxes)
    return boxes[keep], target["labels"][keep]


@torch.no_grad()
def sample_regions(proposals: list, targets: list, cfg: Config):
    """Stage 1's batch (Caffe's WindowDataLayer): every image's proposals and ground-truth boxes are candidates,
    labelled with the class of their best ground-truth box where its IoU >= fg_iou_thresh, else background (0);
    rois_per_batch of the whole batch are drawn at random, at most fg_fraction foreground.
    proposals: B x [R_i, 4]; targets: B dicts -> rois [S, 4], image_idx [S], labels [S]."""
    rois, image_idx, labels = [], [], []
    for i, (p, target) in enumerate(zip(proposals, targets)):
        gt_boxes, gt_labels = valid_boxes(target)
        candidates = torch.cat([p, gt_boxes.to(p)])  # [R + M, 4]
        if len(gt_boxes):
            iou, best = box_iou(candidates, gt_boxes.to(p)).max(1)  # [R + M]
            label = torch.where(iou >= cfg.fg_iou_thresh, gt_labels.to(p.device)[best], 0)
        else:
            label = torch.zeros(len(candidates), dtype=torch.int64, device=p.device)
        rois.append(candidates)
        labels.append(label)
        image_idx.append(torch.full((len(candidates),), i, device=p.device))
    rois, image_idx, labels = torch.cat(rois), torch.cat(image_idx), torch.cat(labels)
    fg, bg = torch.where(labels > 0)[0], torch.where(labels == 0)[0]
    num_fg = min(len(fg), int(cfg.rois_per_batch * cfg.fg_fraction))
    num_bg = min(len(bg), cfg.rois_per_batch - num_fg)
    keep = torch.cat([fg[torch.randperm(len(fg), device=fg.device)[:num_fg]],
                      bg[torch.randperm(len(bg), device=bg.device)[:num_bg]]])
    return rois[keep], image_idx[keep], labels[keep]


@torch.no_grad()
def region_roles(proposals: Tensor, target: dict, cfg: Config):
    """What --show-targets draws of an image's proposals [R, 4]: fine-tuning's sampled background and foreground
    (as many background as foreground), the SVMs' ignored regions (0.3..1 IoU with a box of the image's classes) and
    as many negatives (under 0.3 with all of them) as ground-truth boxes."""
    rois, _, labels = sample_regions([proposals], [target], cfg)
    gt_boxes, gt_labels = valid_boxes(target)
    classes = gt_labels.unique().to(proposals.device)
    negative = svm_labels(proposals, gt_boxes.to(proposals), gt_labels, cfg.num_classes, cfg.svm_neg_iou)[1][:, classes]
    return (rois[labels == 0][:int((labels > 0).sum())], rois[labels > 0], proposals[~negative.all(1)],
            proposals[negative.all(1)][:len(gt_boxes)])


@torch.no_grad()
def svm_labels(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int, neg_iou: float):
    """What each SVM makes of an image's regions (rcnn_train.m): boxes [R, 4] -> overlap [R, K] (best IoU with a
    ground-truth box of each class; column 0 unused) and negative [R, K]: overlap < neg_iou (the positives are the
    ground-truth boxes themselves; 0.3..1 is ignored)."""
    overlap = boxes.new_zeros(len(boxes), num_classes)
    if len(gt_boxes):
        iou = box_iou(boxes, gt_boxes)  # [R, M]
        overlap.scatter_reduce_(1, gt_labels[None].expand(len(boxes), -1).to(boxes.device), iou, "amax")
    return overlap, overlap < neg_iou


# --- Loss ---


def finetune_loss(cls_logits: Tensor, labels: Tensor) -> dict:
    """Stage 1: softmax cross-entropy over the sampled regions, cls_logits [S, K], labels [S] (Caffe's SOFTMAX_LOSS)."""
    if len(labels) == 0:
        return {"loss_classifier": cls_logits.sum() * 0.0}
    return {"loss_classifier": F.cross_entropy(cls_logits, labels)}


def svm_objective(w: Tensor, X: Tensor, y: Tensor, upper: Tensor) -> Tensor:
    """liblinear -s 3's primal: 1/2 |w|^2 + sum_i upper_i max(0, 1 - y_i w.x_i); X [N, D] (bias column included),
    y [N] +-1, upper [N] = C x (pos_weight for positives, 1 for negatives)."""
    return 0.5 * w @ w + (upper * (1 - y * (X @ w)).clamp(min=0)).sum()


def train_svm(X: Tensor, y: Tensor, upper: Tensor, w: Tensor = None, tol: float = 1e-6):
    """The minimiser of svm_objective: liblinear -s 3's problem (liblinear solves it in its dual by coordinate descent,
    stopping at a loose tolerance; this solves it to a duality gap of tol x the objective).

    Newton's method on the objective with the hinge smoothed over a width mu (the Huber hinge), mu = 1, 0.1, 0.01, ...,
    each minimiser starting the next: D x D solves, fast on a GPU. The smoothed minimiser w_mu = sum alpha_i y_i x_i
    with alpha_i = upper_i clip((1 - y_i w_mu.x_i) / mu, 0, 1), a feasible point of the exact problem's dual, so the
    duality gap P(w_mu) - dual(alpha) bounds how far w_mu is from the optimum (|w - w*|^2 <= 2 gap: the objective is
    1-strongly convex); it shrinks in proportion to mu. Then a polish: the examples on the margin (0 < 1 - y w.x < mu)
    get the alpha that puts them exactly on it (closed form), those that break a condition change side, kept only
    if the gap gets smaller. X [N, D] (the bias column included), y [N] +-1, upper [N] -> w [D], gap; float64."""
    X, y, upper = X.double(), y.double(), upper.double()
    N, D = X.shape
    w = torch.zeros(D, dtype=torch.float64, device=X.device) if w is None else w.double().clone()
    eye = torch.eye(D, dtype=torch.float64, device=X.device)
    yX = y[:, None] * X  # [N, D]

    def smoothed(w, mu):  # the Huber-hinge objective
        z = 1 - yX @ w
        loss = torch.where(z >= mu, z - mu / 2, torch.where(z > 0, z * z / (2 * mu), torch.zeros_like(z)))
        return 0.5 * w @ w + (upper * loss).sum()

    def with_gap(alpha):  # the primal point of a dual-feasible alpha, and the duality gap
        w = yX.T @ alpha
        return w, float(svm_objective(w, X, y, upper) - (alpha.sum() - 0.5 * w @ w))

    best = None
    for mu in 10.0 ** -np.arange(10):
        for _ in range(50):
            z = 1 - yX @ w  # [N]
            grad = w - yX.T @ (upper * (z / mu).clamp(0, 1))
            zone = (z > 0) & (z < mu)
            G, s = yX[zone], upper[zone] / mu  # the Hessian is I + G^T diag(s) G: solve in the smaller space
            step = (torch.linalg.solve(eye + (G * s[:, None]).T @ G, grad) if len(G) >= D else
                    grad - G.T @ torch.linalg.solve(torch.diag(1 / s) + G @ G.T, G @ grad))
            decrement = float(grad @ step)
            if decrement <= 1e-20 * (1 + float(w @ w)):
                break
            t, f0 = 1.0, smoothed(w, mu)
            while smoothed(w - t * step, mu) > f0 - 0.25 * t * decrement and t > 1e-8:  # Armijo backtracking
                t *= 0.5
            w = w - t * step
        z = 1 - yX @ w
        w, gap = with_gap(upper * (z / mu).clamp(0, 1))
        if best is not None and gap >= best[1]:
            break  # rounding has caught up with mu
        best, margin, bound = (w, gap), (z > 0) & (z < mu), z >= mu
        if gap <= tol * float(svm_objective(w, X, y, upper)):
            break
    for _ in range(20):  # polish: the optimality conditions, solved for the margin examples
        A, b = yX[margin], yX[bound].T @ upper[bound]  # [F, D], [D]
        alpha = torch.zeros_like(upper)
        alpha[bound] = upper[bound]
        alpha[margin] = torch.linalg.lstsq(A @ A.T, (1 - A @ b)[:, None]).solution[:, 0] if len(A) else alpha[margin]
        out_low, out_high = margin & (alpha < 0), margin & (alpha > upper)
        w, gap = with_gap(torch.minimum(alpha.clamp(min=0), upper))
        if gap >= best[1]:
            break
        best, z = (w, gap), 1 - yX @ w
        wrong_side = (bound & (z < 0)) | (~bound & ~margin & (z > 0))
        if not (out_low.any() or out_high.any() or wrong_side.any()):
            break
        margin, bound = (margin & ~out_low & ~out_high) | wrong_side, (bound & ~wrong_side) | out_high
    return best


def ridge_regression(X: Tensor, Y: Tensor, lam: float) -> Tensor:
    """min_B |X B - Y|^2 + lam |B|^2 in closed form, (X^T X + lam I) B = X^T Y by Cholesky (rcnn_train_bbox_regressor's
    ridge_reg_chol). X [N, D], Y [N, T] -> B [D, T], float64."""
    X, Y = X.double(), Y.double()
    L = torch.linalg.cholesky(X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64, device=X.device))
    return torch.cholesky_solve(X.T @ Y, L)


def fit_box_regressor(pool5: Tensor, targets: Tensor, lam: float):
    """One class's stage 3: pool5 [N, D5] (scaled), targets [N, 4] -> beta [D5 + 1, 4], mu [4], T_inv [4, 4].
    The targets are centred (mu) and whitened, T = V diag(1 / sqrt(d + 0.001)) V^T from their covariance V diag(d) V^T;
    a constant-1 column (also regularised) gives the intercept; predictions are un-whitened with T_inv."""
    targets = targets.double()
    mu = targets.mean(0)
    centred = targets - mu
    d, V = torch.linalg.eigh(centred.T @ centred / len(targets))
    T = V @ torch.diag(1 / torch.sqrt(d.clamp(min=0) + 0.001)) @ V.T
    T_inv = V @ torch.diag(torch.sqrt(d.clamp(min=0) + 0.001)) @ V.T
    X = torch.cat([pool5.double(), torch.ones(len(pool5), 1, dtype=torch.float64, device=pool5.device)], 1)
    return ridge_regression(X, centred @ T, lam), mu, T_inv


@torch.no_grad()
def train_svms_and_regressors(model: RCNN, dataset, device, checkpoint_every: int = 200):
    """Stages 2 and 3 for the network as it is (eval mode), on a dataset of (image, target with "proposals").

    1. Feature statistics (rcnn_feature_stats): the mean L2 norm of pool5 and fc7 over 200 random images x 200 regions;
       features are scaled to feature_norm.
    2. Positives (get_positive_pool5_features): fc7 of every ground-truth box.
    3. One pass over the images (rcnn_train.m): each image's regions (ground truth and proposals) are negatives of a
       class under svm_neg_iou IoU with its boxes; the first image adds all of them to the class's cache, later images
       those scoring above svm_hard_thresh; every class is retrained after the first image, a class once more than
       svm_retrain_every negatives were added, and at the last image; after each retraining, negatives scoring below
       svm_evict_thresh leave the cache. The same pass keeps pool5 of the regions with IoU > bbox_min_iou to their best
       ground-truth box, and that box, for stage 3.
    4. Stage 3: a ridge regressor per class (fit_box_regressor).
    Progress is saved in <out>/stage2.pt every checkpoint_every images, for this network, settings and data: a rerun
    of them continues there."""
    cfg, K = model.cfg, model.cfg.num_classes
    model.eval()
    path = os.path.join(cfg.out, "stage2.pt")
    # what stage2.pt holds is for this network, the settings stage 2 reads and this data (its boxes and proposals)
    prefixes, names = ("svm_", "feature_", "crop_", "image_"), ("bbox_min_iou", "proposals_per_image", "seed")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith(prefixes) or k in names}
    network = [v.detach().cpu().numpy() for k, v in model.state_dict().items()
               if not k.startswith(("svm_", "bbox_", "feature_scale", "fitted_at"))]
    key = hashlib.sha1(repr((settings, getattr(dataset, "source", ""), len(dataset))).encode())
    for array in [*network, *getattr(dataset, "boxes", []), *(getattr(dataset, "proposals", None) or [])]:
        key.update(np.ascontiguousarray(array))
    key = key.hexdigest()
    state = torch.load(path, map_location=device, weights_only=True) if os.path.isfile(path) else None
    if state is None or state.get("key") != key:
        state = None
    log = (lambda text: print(f"{time.strftime('%H:%M:%S')} stage 2: {text}", flush=True)) \
        if int(os.environ.get("RANK", 0)) == 0 else (lambda text: None)

    def regions(i, rng=None):  # -> the image's boxes (ground truth first) [R, 4], its ground truth, pool5, fc7
        image, target = dataset[i]
        image = image.to(device)
        gt_boxes, gt_labels = valid_boxes(target)
        gt_boxes, gt_labels = gt_boxes.to(device), gt_labels.to(device)
        boxes = torch.cat([gt_boxes, model.proposals_of(image, data.to_device([target], device)[0])])
        if rng is not None:  # rcnn_feature_stats: 200 random regions of the image
            boxes = boxes[torch.from_numpy(rng.permutation(len(boxes))[:200]).to(device)]
        pool5, fc7 = model.features([image], [boxes])
        return boxes, gt_boxes, gt_labels, pool5, fc7

    if state is None:  # one pass: feature statistics (200 random images x 200 regions) and positives (all boxes)
        rng = np.random.default_rng(cfg.seed)  # rcnn_feature_stats fixes its seed too
        sampled = set(rng.permutation(len(dataset))[:200].tolist())
        norms, positives = [[], []], [[] for _ in range(K)]
        for i in range(len(dataset)):
            if i in sampled:
                _, _, _, pool5, fc7 = regions(i, rng)
                norms[0].append(pool5.norm(dim=1))
                norms[1].append(fc7.norm(dim=1))
            image, target = dataset[i]
            gt_boxes, gt_labels = valid_boxes(target)
            for k, f in zip(gt_labels.tolist(), model.features([image.to(device)], [gt_boxes.to(device)])[1]):
                positives[k].append(f)
        scale = torch.tensor([cfg.feature_norm / max(float(torch.cat(n).mean()), 1e-12) if n else 1.0 for n in norms],
                             device=device)
        positives = [(torch.stack(p) * scale[1]).half() if p else None for p in positives]
        dim7 = model.svm_weight.shape[1]
        state = {"key": key, "next": 0, "scale": scale,
                 "positives": [p if p is not None else torch.zeros(0, dim7, dtype=torch.half, device=device)
                               for p in positives],
                 "negatives": [torch.zeros(0, dim7, dtype=torch.half, device=device) for _ in range(K)],
                 "added": [0] * K, "weight": torch.zeros(K, dim7 + 1, dtype=torch.float64, device=device),
                 "bbox": {"pool5": [], "rois": [], "gt": [], "labels": []}}
        log(f"{sum(len(p) for p in state['positives'])} positives; mean norms pool5 "
            f"{cfg.feature_norm / float(scale[0]):.3g}, fc7 {cfg.feature_norm / float(scale[1]):.3g}")
    scale = state["scale"].to(device)
    weight = state["weight"]  # [K, D7 + 1]: SVM weights with the bias feature's weight last

    def retrain(k):
        X_pos, X_neg = state["positives"][k].double(), state["negatives"][k].double()
        X = torch.cat([torch.cat([X_pos, X_neg]), torch.full((len(X_pos) + len(X_neg), 1), cfg.svm_bias,
                                                             dtype=torch.float64, device=device)], 1)
        y = torch.cat([torch.ones(len(X_pos)), -torch.ones(len(X_neg))]).to(X)
        upper = cfg.svm_c * torch.where(y > 0, cfg.svm_pos_weight, 1.0)
        weight[k], gap = train_svm(X, y, upper, weight[k])
        z_neg = X[len(X_pos):] @ weight[k]
        state["negatives"][k] = state["negatives"][k][z_neg >= cfg.svm_evict_thresh]  # evict the easy ones
        state["added"][k] = 0
        return gap

    tic, first = time.perf_counter(), state["next"]
    for i in range(first, len(dataset)):
        boxes, gt_boxes, gt_labels, pool5, fc7 = regions(i)
        fc7 = fc7 * scale[1]
        overlap, negative = svm_labels(boxes, gt_boxes, gt_labels, K, cfg.svm_neg_iou)  # [R, K]
        z = fc7.double() @ weight[:, :-1].T + cfg.svm_bias * weight[:, -1]  # [R, K] scores of the current SVMs
        gaps = []
        for k in range(1, K):
            new = negative[:, k] if i == 0 else negative[:, k] & (z[:, k] > cfg.svm_hard_thresh)
            state["negatives"][k] = torch.cat([state["negatives"][k], fc7[new].half()])
            state["added"][k] += int(new.sum())
            if (i == 0 or state["added"][k] > cfg.svm_retrain_every or i == len(dataset) - 1) \
                    and len(state["negatives"][k]):
                gaps.append(retrain(k))
        if len(gt_boxes):  # stage 3's examples: regions with IoU > bbox_min_iou, assigned to their best box
            iou, best = box_iou(boxes, gt_boxes).max(1)
            keep = iou > cfg.bbox_min_iou
            for key, value in (("pool5", (pool5[keep] * scale[0]).half()), ("rois", boxes[keep]),
                               ("gt", gt_boxes[best[keep]]), ("labels", gt_labels[best[keep]])):
                state["bbox"][key].append(value)
        state["next"] = i + 1
        if gaps or (i + 1) % 500 == 0:
            log(f"image {i + 1}/{len(dataset)}, cached negatives {sum(len(n) for n in state['negatives'])}, "
                f"retrained {len(gaps)} classes (largest duality gap {max(gaps, default=0):.2g}), "
                f"{(time.perf_counter() - tic) / (i + 1 - first):.2f} s per image")
        if (i + 1) % checkpoint_every == 0 or i == len(dataset) - 1:
            os.makedirs(cfg.out, exist_ok=True)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
    model.svm_weight.copy_(weight[:, :-1].float())
    model.svm_bias.copy_((cfg.svm_bias * weight[:, -1]).float())
    model.feature_scale.copy_(scale)
    # stage 3 (anew for every class: one without examples predicts no change, not another network's regression)
    model.bbox_beta.zero_(), model.bbox_mean.zero_(), model.bbox_t_inv.copy_(torch.eye(4))
    bbox = {key: torch.cat(v) if v else None for key, v in state["bbox"].items()}
    for k in range(1, K):
        sel = torch.where(bbox["labels"] == k)[0] if bbox["labels"] is not None else []
        if len(sel) < 2:
            continue  # fewer than 2 examples (no covariance to whiten): this class's boxes stay as proposed
        beta, mu, T_inv = fit_box_regressor(bbox["pool5"][sel].double(), encode_boxes(
            bbox["gt"][sel].double(), bbox["rois"][sel].double()), cfg.bbox_lambda)
        model.bbox_beta[k], model.bbox_mean[k], model.bbox_t_inv[k] = beta.float(), mu.float(), T_inv.float()
    log(f"done: {K - 1} SVMs, box regressors from {0 if bbox['labels'] is None else len(bbox['labels'])} regions")


# --- Decoding ---


@torch.no_grad()
def postprocess_detections(cls_scores: Tensor, boxes: Tensor, num_rois_per_image: list, image_sizes: list,
                           cfg: Config) -> list:
    """rcnn_test.m: cls_scores [S, K], boxes [S, K, 4] (regressed per class), image by image -> B dicts with boxes
    [D, 4], scores [D], labels [D]. Per image and class the best detections_per_img regions (rcnn_test's
    max_per_image), NMS at nms_thresh per class, then the best detections_per_img of the image (this repo's cap)."""
    K, detections = cls_scores.shape[-1], []
    for scores_i, boxes_i, size in zip(cls_scores.split(num_rois_per_image), boxes.split(num_rois_per_image),
                                       image_sizes):
        boxes_i = clip_boxes_to_image(boxes_i[:, 1:].reshape(-1, 4), size)  # [S_i * (K - 1), 4]
        labels_i = torch.arange(1, K, device=scores_i.device).repeat(len(scores_i))
        scores_i = scores_i[:, 1:].reshape(-1)
        keep = torch.cat([c[scores_i[c].argsort(descending=True)[:cfg.detections_per_img]]
                          for c in (torch.where(labels_i == k)[0] for k in range(1, K))])
        keep = keep[batched_nms(boxes_i[keep].float(), scores_i[keep].float(), labels_i[keep], cfg.nms_thresh)]
        keep = keep[: cfg.detections_per_img]
        detections.append({"boxes": boxes_i[keep].float(), "scores": scores_i[keep].float(), "labels": labels_i[keep]})
    return detections


# --- Training ---
# The template, the same in every model file but for the ALGO LOGIC block (a test keeps it so): AMP, DDP, the 12 COCO
# numbers after each epoch, atomic checkpoints that --resume continues exactly, also after Ctrl-C or SIGTERM mid-epoch.

# ALGO LOGIC: what the template needs from this detector
DETECTOR = RCNN  # the class the template builds, trains, evaluates and saves
PREDICT = {}  # --predict's Config values where no flag sets them (yolo.py: detect.py's); none here


def make_optimizer(model: nn.Module, cfg: Config, steps_per_epoch: int, world_size: int, train_set=None):
    """Stage 1 (pascal_finetune_solver.prototxt): SGD with momentum (or AdamW), Caffe's parameter groups
    (caffe_param_groups), cfg.lr scaled to the processes, a linear warmup (at most a third of the run), x lr_gamma at
    each of lr_steps. Tells the model how many steps fine-tuning takes: it runs stages 2 and 3 after the last."""
    if isinstance(model, RCNN):
        model.start_finetuning(steps_per_epoch * cfg.epochs)
    params, lr = caffe_param_groups(model, cfg.lr * world_size, cfg.weight_decay), cfg.lr * world_size
    optimizer = (torch.optim.SGD(params, lr, cfg.momentum, fused=next(model.parameters()).is_cuda)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr))
    warmup = data.warmup_steps(cfg, steps_per_epoch)  # (warns if shortened, or if no lr step falls within the run)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup if step < warmup else 1.0) * cfg.lr_gamma ** sum(
        step >= epoch * steps_per_epoch for epoch in cfg.lr_steps))


def train_transforms(cfg: Config):
    return data.RandomHorizontalFlip(cfg.hflip_prob)  # Caffe's window layer mirrors regions; the proposals flip too


@torch.no_grad()
def draw_targets(model: RCNN, image: Tensor, target: dict, class_names, path: str):
    """--show-targets: the image's proposals as fine-tuning (left) and the SVMs (right) label them, under the ground
    truth (class colours). Left: the sampled foreground (IoU >= 0.5, blue) and as many sampled background regions
    (red). Right: negatives of the image's classes (IoU < 0.3, red, as many as ground-truth boxes) and ignored regions
    (0.3..1, grey); the SVMs' positives are the ground-truth boxes themselves."""
    panels = [image, image]
    for panel, boxes, colour in zip((0, 0, 1, 1), region_roles(model.proposals_of(image, target), target, model.cfg),
                                    ((255, 0, 0), (0, 0, 255), (160, 160, 160), (255, 0, 0))):
        panels[panel] = draw_boxes(panels[panel], boxes, color=colour, width=1)
    panels = [draw_boxes(p, target["boxes"], target["labels"], None, class_names, width=2) for p in panels]
    draw_boxes(torch.cat([panels[0], torch.full_like(panels[0][:, :, :4], 255), panels[1]], 2), torch.zeros(0, 4),
               path=path)


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
