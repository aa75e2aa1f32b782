"""Reference numbers of ultralytics/yolov5 v7.0 for yolo.py's parity test (CI has no network, so they are stored).

    git --git-dir=<clone of github.com/ultralytics/yolov5> archive v7.0 | tar -x -C /tmp/yolov5   # tag v7.0 = 915bbf29
    python assets/yolov5_v7/make_reference.py /tmp/yolov5        # writes assets/yolov5_v7/reference.pt (0.7 MB)
    python assets/yolov5_v7/make_reference.py /tmp/yolov5 --case yolov5s --out /tmp/yolov5s.pt   # the full-width
        yolov5s at 256 px, K = 6, two synthetic images and one without boxes (what the live test also compares)

needs only torch, torchvision, numpy and scipy: the modules v7.0 imports but never uses for a model, its loss and NMS
(cv2, pandas, requests, IPython, matplotlib, seaborn, psutil, tqdm, yaml, pkg_resources) are stubbed by load_yolov5().
The case: a v7.0 DetectionModel of yolov5s's layout at depth 0.33, width 0.0625 (116k parameters, K = 5 classes),
random weights with batch-norm statistics from the images and head outputs spread so that scores vary; three synthetic
96 x 96 images: one with boxes near cell borders, the image border, of all sizes (one too small for any anchor) and two
sharing cells, one with a single box, one without boxes. Stored: the v7.0 state dict, the images (uint8), the targets
(this repo's format), ComputeLoss's loss items, its total and per-parameter gradient norms (train mode), and the
detections of the eval-mode model + non_max_suppression as val.py (multi-label, conf 0.001, IoU 0.6) and as
detect.py (best class, IoU 0.45; conf 0.05 rather than its 0.25, which keeps nothing of a random head), boxes
clipped to the image as scale_boxes does.
test_models.py compares yolo.py with these numbers, and with v7.0 itself when YOLOV5_ROOT names a v7.0 work tree
(live_case() below). bench.py times both with load_yolov5(). YOLOv5 is AGPL-3.0: it is run here, never copied.
"""
import importlib.machinery
import math
import os
import sys
import tempfile
import types
from unittest import mock

import torch

COMMIT = "915bbf294bb74c859f0b41f1c23bc395014ea679"  # ultralytics/yolov5 tag v7.0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NUM_CLASSES, IMAGE_SIZE, DEPTH, WIDTH = 5, 96, 0.33, 0.0625
STUBS = ["cv2", "pandas", "requests", "IPython.display", "matplotlib", "matplotlib.pyplot", "seaborn",
         "psutil", "tqdm"]


def load_yolov5(root):
    """Import v7.0's Model, ComputeLoss, non_max_suppression and scale_boxes from a work tree, stubbing what a model
    does not need (torch first: torch._dynamo inspects every module's __spec__)."""
    os.environ.setdefault("YOLOV5_CONFIG_DIR", tempfile.mkdtemp(prefix="yolov5cfg"))  # utils/general writes there
    import torchvision  # noqa: F401

    def stub(name, **attributes):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__getattr__ = lambda attr: mock.MagicMock(name=f"{name}.{attr}")
        module.__dict__.update(attributes)
        return module

    for name in STUBS:
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = stub(name)
    def version(s):  # pkg_resources.parse_version, enough for check_version's comparisons
        return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in str(s).split("+")[0].split(".")[:3])

    # IPython: matplotlib (where installed) looks for it in sys.modules and asks get_ipython() and version_info
    for name, attributes in (("pkg_resources", dict(parse_version=version)), ("yaml", {}),
                             ("IPython", dict(get_ipython=lambda: None, version_info=(9, 0)))):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = stub(name, **attributes)
    sys.path.insert(0, str(root))
    from models.yolo import Model
    from utils.general import non_max_suppression, scale_boxes
    from utils.loss import ComputeLoss
    return types.SimpleNamespace(Model=Model, ComputeLoss=ComputeLoss, non_max_suppression=non_max_suppression,
                                 scale_boxes=scale_boxes)


def model_dict(nc, depth, width):
    """models/yolov5s.yaml as the dict yaml.safe_load gives, with other multiples."""
    backbone = [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]], [-1, 9, "C3", [512]],
                [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]]]
    head = [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]],
            [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
            [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
            [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]]
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    return {"nc": nc, "depth_multiple": depth, "width_multiple": width, "anchors": anchors, "backbone": backbone,
            "head": head}


def hyp(nc, imgsz, nl=3):
    """data/hyps/hyp.scratch-low.yaml's loss entries after train.py's scaling."""
    return {"box": 0.05 * 3 / nl, "cls": 0.5 * (nc / 80 * 3 / nl), "obj": 1.0 * ((imgsz / 640) ** 2 * 3 / nl),
            "cls_pw": 1.0, "obj_pw": 1.0, "fl_gamma": 0.0, "anchor_t": 4.0, "label_smoothing": 0.0}


def make_inputs():
    """Three 96 x 96 uint8 images and their targets (boxes xyxy pixels, labels 1..K). In P3's grid (stride 8), the
    centre x of 16 px lies on a cell border and 20 px in a cell's middle (no horizontal neighbour); 4 px is in the first
    cell (no left neighbour); the 3 x 3 box fits no anchor; the 80 x 60 box only P4 and P5's; the two boxes around
    (52, 52) share cells."""
    sys.path.insert(0, ROOT)
    import data
    images = torch.stack([(data.SyntheticShapes(3, IMAGE_SIZE, seed=5)[i][0] * 255).round().to(torch.uint8)
                          for i in range(3)])
    boxes = torch.tensor([[10.0, 20, 22, 44], [14, 60, 26, 66], [0, 30, 8, 50], [40.5, 40, 43.5, 43],
                          [8, 10, 88, 70], [46, 44, 58, 60], [47, 45, 59, 61], [60, 70, 95, 96]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3, 4, 5, 1, 3, 2])},
               {"boxes": torch.tensor([[30.0, 10, 70, 50]]), "labels": torch.tensor([4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


def yolo_labels(targets, size):
    """This repo's targets -> v7.0's [n, 6]: image, class 0..K-1, cx, cy, w, h normalised (utils/dataloaders.py)."""
    rows = []
    for i, t in enumerate(targets):
        b = t["boxes"]
        rows.append(torch.stack([torch.full((len(b),), float(i)), (t["labels"] - 1).float(),
                                 (b[:, 0] + b[:, 2]) / 2 / size, (b[:, 1] + b[:, 3]) / 2 / size,
                                 (b[:, 2] - b[:, 0]) / size, (b[:, 3] - b[:, 1]) / size], 1))
    return torch.cat(rows)


def reference_outputs(yv5, model, images, targets, size):
    """v7.0's numbers for a model (its state as given) and inputs: eval-mode detections (val.py's and detect.py's NMS,
    clipped by scale_boxes), then train-mode loss items, total and per-parameter gradient norms."""
    x = images.float() / 255
    model.eval()
    with torch.no_grad(), mock.patch("utils.general.time.time", return_value=0.0):  # no NMS time limit
        prediction = model(x)[0]
        detections = {}
        for name, kwargs in (("val", dict(conf_thres=0.001, iou_thres=0.6, multi_label=True)),
                             ("detect", dict(conf_thres=0.05, iou_thres=0.45, multi_label=False))):
            out = yv5.non_max_suppression(prediction.clone(), max_det=300, **kwargs)
            for d in out:
                yv5.scale_boxes((size, size), d[:, :4], (size, size))  # gain 1, no pad: clips to the image
            detections[name] = out
    model.train()
    model.zero_grad()
    loss, items = yv5.ComputeLoss(model)(model(x), yolo_labels(targets, size))
    loss.backward()
    grad_norms = {k: p.grad.norm().item() for k, p in model.named_parameters()}
    assert all(map(math.isfinite, grad_norms.values())), "non-finite gradients: a smaller spread (make_model)"
    return {"detections": detections, "loss_items": items.tolist(), "loss": loss.item(), "grad_norms": grad_norms}


def make_model(yv5, nc, depth, width, images, spread=2.0, seed=0):
    """A v7.0 DetectionModel with random weights whose scores spread: batch-norm statistics from the images, head
    outputs rescaled to std ~spread around their bias, objectness raised (an untrained head scores every location
    alike). Too wide a spread saturates some sigmoids: (2 sigmoid)^2 x anchor underflows and CIoU's gradient is NaN
    (in v7.0 as here)."""
    torch.manual_seed(seed)
    with mock.patch("models.yolo.LOGGER"):
        model = yv5.Model(model_dict(nc, depth, width), ch=3, nc=nc)
    model.hyp = hyp(nc, images.shape[-1])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.momentum = None  # cumulative average: this batch sets the statistics
        model.train()
        features = []
        hook = model.model[-1].register_forward_pre_hook(lambda module, args: features.extend(args[0]))
        model(images.float() / 255)
        hook.remove()
        for conv, feature in zip(model.model[-1].m, features if spread else []):  # spread 0: the head as initialised
            out = conv(feature) - conv.bias[:, None, None]
            conv.weight.mul_(spread / out.std())
            conv.bias.view(3, -1)[:, 4] += 4.0  # objectness up to ~0.9: scores spread over (0, 0.3)
        for m in norms:
            m.momentum = 0.03
    return model


def yolov5s_inputs():
    """yolov5s's case: two synthetic 256 x 256 images with their shapes, and one without boxes."""
    sys.path.insert(0, ROOT)
    import data
    dataset = data.SyntheticShapes(3, 256, seed=3)
    images = torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(3)])
    targets = [{"boxes": dataset[i][1]["boxes"], "labels": dataset[i][1]["labels"]} for i in range(2)]
    return images, targets + [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


def make_reference(root, case="fixture"):
    """v7.0's numbers for a case: "fixture" (the stored one) or "yolov5s"."""
    yv5 = load_yolov5(root)
    (nc, size, depth, width, spread), (images, targets) = (
        ((NUM_CLASSES, IMAGE_SIZE, DEPTH, WIDTH, 2.0), make_inputs()) if case == "fixture"
        else ((6, 256, 0.33, 0.50, 1.0), yolov5s_inputs()))
    model = make_model(yv5, nc, depth, width, images, spread)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    out = reference_outputs(yv5, model, images, targets, size)
    return {"commit": COMMIT, "torch": str(torch.__version__), "num_classes": nc, "image_size": size,
            "depth_multiple": depth, "width_multiple": width, "state_dict": state_dict, "images": images,
            "targets": targets, **out}


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("yolov5_root", help="a work tree of ultralytics/yolov5 at tag v7.0")
    parser.add_argument("--case", choices=["fixture", "yolov5s"], default="fixture")
    parser.add_argument("--out", default=os.path.join(HERE, "reference.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = make_reference(args.yolov5_root, args.case)
    out, path = reference, args.out
    torch.save(reference, path)
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB; loss items (box, obj, cls) {out['loss_items']}, loss x bs "
          f"{out['loss']:.6f}; detections val {[len(d) for d in out['detections']['val']]}, detect "
          f"{[len(d) for d in out['detections']['detect']]}")


if __name__ == "__main__":
    main()
