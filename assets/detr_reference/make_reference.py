"""Reference numbers of the official DETR (github.com/facebookresearch/detr) for test_models.py's parity tests.

    python assets/detr_reference/make_reference.py DETR_ROOT [--model small|r50] [--out FILE]

DETR_ROOT: a work tree of facebookresearch/detr at commit 29901c51d7fe8712168b8d0d64351170bc0f83e0, e.g.
    git --git-dir=PATH/TO/detr.git archive 29901c51d7fe8712168b8d0d64351170bc0f83e0 | tar -x -C DETR_ROOT
Needs only torch, torchvision, numpy and scipy; runs on a CPU in seconds. `reference_small.json` beside this file was
written by `python assets/detr_reference/make_reference.py DETR_ROOT --model small` (see its "command" and versions).

The official model is built as its main.py builds it (models/detr.py build(args): backbone, transformer, DETR with
aux_loss, HungarianMatcher, SetCriterion with losses labels/boxes/cardinality, PostProcess), with the dimensions of
MODELS[--model] and dropout 0 (so that training mode is deterministic). Its weights and the inputs are not stored:
official_weights() and make_inputs() generate them from names and fixed seeds with numpy's legacy RandomState, whose
streams numpy keeps the same in every version, so that test_models.py rebuilds exactly the same weights and inputs for
this repo's detr.py without the official code. The file written holds, for a batch of three images of different
sizes (one without objects): every weighted loss term of SetCriterion (x weight_dict), the matcher's indices for every
decoder layer, PostProcess's detections (all queries), the raw outputs of every decoder layer, and the gradient norm of
every trained parameter after backward() of the weighted total.

Loading the official code needs two patches (as shared/refcheck/detr_ref.py): util/misc.py imports `packaging`, which
torch does not install (a stub `packaging.version.parse` suffices), and models/backbone.py builds the ResNet with
pretrained=is_main_process(), True outside DDP, which would download ImageNet weights (patched to False). The repo's
packages are called models, util, datasets: import it in a process of its own, as this script does.
"""
import argparse
import json
import math
import sys
import types
import zlib

import numpy as np
import torch

DETR_COMMIT = "29901c51d7fe8712168b8d0d64351170bc0f83e0"
# official main.py arguments of each model: "small" (stored, CI), and the real DETR-R50 architecture (live test only)
MODELS = {
    "small": dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=64,
                  num_queries=12, num_classes=7),
    "r50": dict(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
                num_queries=100, num_classes=91),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as DETR's T.Normalize


def make_inputs(num_classes):
    """Three images of different sizes, none a multiple of 32 in both sides, all with short side 100 (so that a model
    resizing to 100 leaves them as they are), RGB in [0, 1]; boxes xyxy in pixels, labels in 1..num_classes - 1. The
    second image has no object."""
    rng = np.random.RandomState(2020)
    images = [torch.from_numpy(rng.rand(3, h, w).astype(np.float32)) for h, w in ((100, 140), (150, 100), (100, 100))]
    boxes = [[[10.0, 12.0, 60.0, 90.0], [50.0, 30.0, 135.0, 70.0], [20.0, 40.0, 45.0, 60.0]], [],
             [[5.0, 5.0, 95.0, 95.0], [30.5, 60.25, 70.0, 80.0]]]
    labels = [[1, num_classes - 1, 3], [], [2, 1]]
    targets = [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(l).long()}
               for b, l in zip(boxes, labels)]
    return images, targets


def official_weights(shapes):
    """{official state-dict name: shape} -> {name: float32 tensor}: each entry from its own RandomState seeded by the
    name's CRC-32, scaled by what it is so that activations stay O(1) through the network (convs and linears
    N(0, 1 / fan_in), batch and layer norms near the identity, biases small, query embeddings N(0, 1))."""
    out = {}
    for name, shape in shapes.items():
        n = np.random.RandomState(zlib.crc32(name.encode())).standard_normal(shape).astype(np.float32)
        norm = "norm" in name or ".bn" in name or "downsample.1" in name
        if name.endswith("running_var"):
            value = np.exp(0.2 * n)
        elif norm and name.endswith("weight"):
            value = 1 + 0.1 * n
        elif norm or len(shape) == 1:  # norm biases and running means, layer biases
            value = 0.1 * n
        elif name == "query_embed.weight":
            value = n
        else:
            value = n / math.sqrt(int(np.prod(shape[1:])))
        out[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def normalised_cxcywh(boxes, size):
    """xyxy pixels -> cx, cy, w, h divided by the image's (w, h): DETR's datasets/transforms.py Normalize."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    cxcywh = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
    return cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)


def load_official(detr_root, model):
    """(model, criterion, postprocess) built as main.py does, with MODELS[model]'s dimensions and dropout 0."""
    try:
        import packaging.version  # noqa: F401
    except ImportError:
        pkg, ver = types.ModuleType("packaging"), types.ModuleType("packaging.version")
        ver.parse = lambda s: tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in s.split("+")[0].split("."))
        pkg.version = ver
        sys.modules["packaging"], sys.modules["packaging.version"] = pkg, ver
    sys.path.insert(0, str(detr_root))
    import models.backbone as backbone_module
    backbone_module.is_main_process = lambda: False  # pretrained=False: no ImageNet download
    import models.detr as detr_module
    spec = dict(MODELS[model])
    num_classes = spec.pop("num_classes")
    args = argparse.Namespace(
        lr_backbone=1e-5, dilation=False, position_embedding="sine", dropout=0.0, pre_norm=False, masks=False,
        aux_loss=True, set_cost_class=1.0, set_cost_bbox=5.0, set_cost_giou=2.0, bbox_loss_coef=5.0,
        giou_loss_coef=2.0, eos_coef=0.1, dataset_file="coco", device="cpu", frozen_weights=None, **spec)
    detr, criterion, postprocessors = detr_module.build(args)  # build() gives 91 classes for dataset_file coco
    if num_classes != 91:  # as shared/refcheck/detr_ref.py: the head and the criterion for another class count
        detr.class_embed = torch.nn.Linear(args.hidden_dim, num_classes + 1)
        criterion = detr_module.SetCriterion(num_classes, matcher=criterion.matcher, weight_dict=criterion.weight_dict,
                                             eos_coef=args.eos_coef, losses=criterion.losses)
    return detr, criterion, postprocessors["bbox"], num_classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detr_root")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--out", default=None, help="JSON file (default: reference_MODEL.json beside this script)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, criterion, postprocess, num_classes = load_official(args.detr_root, args.model)
    state = model.state_dict()
    model.load_state_dict(official_weights({k: tuple(v.shape) for k, v in state.items()}))
    images, targets = make_inputs(num_classes)
    sizes = [tuple(image.shape[-2:]) for image in images]
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    official_targets = [{"labels": t["labels"], "boxes": normalised_cxcywh(t["boxes"], s)}
                        for t, s in zip(targets, sizes)]
    model.train()  # dropout 0: training mode computes what eval mode does
    outputs = model([(image - mean) / std for image in images])  # padded to the batch's largest H, W, with a mask
    losses = criterion(outputs, official_targets)
    weighted = {k: v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict}
    sum(weighted.values()).backward()
    layers = outputs["aux_outputs"] + [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
    matches = [[[i.tolist(), j.tolist()] for i, j in criterion.matcher(layer, official_targets)] for layer in layers]
    with torch.no_grad():
        detections = postprocess(outputs, torch.tensor(sizes))
    result = {
        "detr_commit": DETR_COMMIT, "torch": torch.__version__, "command": " ".join(
            ["python", "assets/detr_reference/make_reference.py", "DETR_ROOT", "--model", args.model]),
        "model": args.model, "official_args": MODELS[args.model],
        "losses": {k: float(v) for k, v in weighted.items()},
        "matches": matches,  # [layer][image] = [query indices, target indices]; the last layer last
        "detections": [{k: v.tolist() for k, v in d.items()} for d in detections],
        "pred_logits": torch.stack([l["pred_logits"] for l in layers]).tolist(),  # [layers, B, Q, K + 1]
        "pred_boxes": torch.stack([l["pred_boxes"] for l in layers]).tolist(),  # [layers, B, Q, 4]
        "grad_norms": {k: float(p.grad.norm()) for k, p in model.named_parameters() if p.grad is not None},
    }
    out = args.out or __file__.replace("make_reference.py", f"reference_{args.model}.json")
    with open(out, "w") as f:
        json.dump(result, f)
    print(f"{out}: " + ", ".join(f"{k} {v:.5f}" for k, v in result["losses"].items() if not k[-1].isdigit()))


if __name__ == "__main__":
    main()
