"""Side-by-side speed of this repo against the reference implementations.

    python bench.py coco_eval [--device cpu|cuda]   # common.coco_evaluate vs pycocotools vs faster-coco-eval
    python bench.py faster_rcnn [--device cpu|cuda] [--min-size 800 --max-size 1333]   # also retinanet, fcos:
        ours vs torchvision with the same weights: train step, inference at batch 1 and 8, peak memory; 320 px too
    python bench.py fcos --device cuda --image-size 320 320 --min-size 320 --max-size 320 --train-batch 16
        the synthetic default's step: 320x320 images, 16 per step, bf16
    python bench.py ssd --device cuda --train-batch 32 --infer-batch 32   # SSD: always 300x300, no size flags
    python bench.py yolo [--device cpu|cuda] [--yolov5 DIR] [--scale yolov5s] [--yolo-size 640]
        yolo.py alone (images/s), or against ultralytics/yolov5 v7.0 when DIR is a work tree of its tag v7.0: the
        same weights and inputs, train step, inference (+ NMS) at batch 1 and 32
    python bench.py detr --detr-root DETR_ROOT [--device cpu|cuda] [--min-size 800 --max-size 1333]
        detr.py vs the official DETR-R50 (a checkout of facebookresearch/detr) with the same weights and inputs:
        train step (matching, loss, backward, clipped AdamW step), inference at batch 1 and 8, the matcher's share
    python bench.py fast_rcnn [--device cpu|cuda] [--image-size 256 256] [--steps 3]
        fast_rcnn.py against rcnn.py with the same backbone, images and proposals: seconds per image of a training
        step and of inference over all proposals (the paper's 9x / 146x)
    python bench.py selective_search [--data-root ../shared/data/bccd --split test --mode fast] [--synthetic 128]
        data.selective_search vs OpenCV-contrib's fast mode (when cv2.ximgproc is installed): recall of the ground
        truth at IoU 0.5 and 0.7 with at most 2000 boxes per image, boxes per image, seconds per image on one thread

    python bench.py speed --model NAME [--device cpu|cuda] [--json PATH]
        any model file alone: its default Config, random weights, a training step and inference at batch 1 and N
    python bench.py compare [--records DIR ...]
        the README's side-by-side table (between its compare markers) from the records (default records/*: env.txt,
        bench_NAME.txt or .json, SUB/NAME.metrics.jsonl of default --train runs) and from the code
    python bench.py gallery [--predictions DIR] [--files NAME ...]
        assets/gallery/: every file's --show-targets on a synthetic and a BCCD image, predictions from DIR

--json PATH (model benches, yolo, speed) writes the results as JSON too: what `compare` reads.
Each benchmark is a function bench_NAME(args) registered in main()'s table.
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import os
import re
import textwrap
import time
from unittest import mock

import numpy as np
import torch

import common


def coco_workload(seed=0, num_images=5000, num_classes=80):
    """A COCO-val-sized evaluation problem, deterministic for a seed: ~7.4 gt boxes per image (1% crowd, gt 'area'
    a bit below the box area, as polygon areas are), and ~48 detections per image: jittered copies of the gt with
    scores that fall with the jitter, plus background false positives, some images over 100 dets, rounded scores
    so that ties occur. Returns (gt dict, list of detection dicts)."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i), "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"}
              for i in rng.choice(600000, num_images, replace=False)]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    annotations, dets = [], []
    for image in images:
        num_gt = rng.poisson(7.4)
        wh = np.exp(rng.uniform(np.log(4), np.log(400), (num_gt, 2)))  # log-uniform: small, medium and large objects
        xy = rng.uniform(0, 1, (num_gt, 2)) * np.maximum([640, 480] - wh, 1)
        labels = rng.integers(1, num_classes + 1, num_gt)
        crowd = rng.random(num_gt) < 0.01
        for (x, y), (w, h), label, c in zip(xy, wh, labels, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(label),
                                "bbox": [float(x), float(y), float(w), float(h)],
                                "area": float(w * h * rng.uniform(0.6, 1.0)), "iscrowd": int(c)})
        # True-positive-like dets: 0-6 jittered copies per gt (duplicates are what NMS leaves behind).
        copies = rng.integers(0, 7, num_gt)
        src = np.repeat(np.arange(num_gt), copies)
        noise = rng.normal(0, 0.12, (len(src), 4))
        boxes = np.c_[xy[src] + noise[:, :2] * wh[src], wh[src] * np.exp(noise[:, 2:])]
        scores = np.clip(1 - np.abs(noise).mean(1) * 3 + rng.normal(0, 0.1, len(src)), 0.01, 1)
        det_labels = np.where(rng.random(len(src)) < 0.9, labels[src], rng.integers(1, num_classes + 1, len(src)))
        # Background false positives; one image in 20 gets a burst past the 100-per-class cap.
        num_fp = rng.poisson(20) if rng.random() > 0.05 else 150
        fp_wh = np.exp(rng.uniform(np.log(4), np.log(400), (num_fp, 2)))
        fp_boxes = np.c_[rng.uniform(0, 1, (num_fp, 2)) * np.maximum([640, 480] - fp_wh, 1), fp_wh]
        burst_label = labels[0] if num_gt else 1  # a burst is one class, so that its image-class pair passes 100
        fp_labels = rng.integers(1, num_classes + 1, num_fp) if num_fp != 150 else np.full(num_fp, burst_label)
        boxes = np.r_[boxes, fp_boxes]
        scores = np.round(np.r_[scores, rng.uniform(0.01, 0.6, num_fp)], 3)  # 3 decimals: plenty of ties
        det_labels = np.r_[det_labels, fp_labels]
        for box, score, label in zip(boxes.tolist(), scores.tolist(), det_labels.tolist()):
            dets.append({"image_id": image["id"], "category_id": int(label), "bbox": box, "score": score})
    return {"images": images, "annotations": annotations, "categories": categories}, dets


def bench_coco_eval(args):
    """Time common.coco_evaluate against pycocotools and faster-coco-eval on the same workload, from the gt dict and
    the detection list to the 12 numbers (index building and result loading included for all three)."""
    gt, dets = coco_workload()
    print("COCO evaluation runs on the CPU (numpy) whatever --device says.")
    print(f"workload: {len(gt['images'])} images, {len(gt['annotations'])} gt boxes, {len(dets)} detections, "
          f"{len(gt['categories'])} classes")
    rows = []

    start = time.perf_counter()
    ours = common.coco_evaluate(gt, dets)
    seconds = time.perf_counter() - start
    rows.append(("common.coco_evaluate", seconds, np.array([ours[k] for k in common.COCO_METRIC_NAMES])))

    def reference(module_coco, module_eval, name, eval_class):
        gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)  # both libraries write into the dicts they get
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = module_coco()
            coco_gt.dataset = gt_copy
            coco_gt.createIndex()
            evaluator = eval_class(coco_gt, coco_gt.loadRes(dets_copy), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        rows.append((name, time.perf_counter() - start, np.array(evaluator.stats)))

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        reference(COCO, COCOeval, "pycocotools", COCOeval)
    except ImportError:
        print("pycocotools not installed: skipped (pip install pycocotools)")
    try:
        from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        reference(FastCOCO, COCOeval_faster, "faster-coco-eval", COCOeval_faster)
    except ImportError:
        print("faster-coco-eval not installed: skipped (pip install faster-coco-eval)")

    print(f"{'evaluator':<22} {'seconds':>8}  {'AP':>6} {'AP50':>6} {'AR100':>6}  max |diff| vs ours")
    for name, seconds, stats in rows:
        print(f"{name:<22} {seconds:8.2f}  {stats[0]:6.4f} {stats[1]:6.4f} {stats[8]:6.4f}  "
              f"{np.abs(stats - rows[0][2]).max():.1e}")
    agree = all(np.abs(stats - rows[0][2]).max() <= 1e-6 for _, _, stats in rows)
    print("all 12 numbers agree to 1e-6:" if agree else "NUMBERS DIFFER (> 1e-6):", agree)


# --- Fast R-CNN against R-CNN ---


def bench_fast_rcnn(args):
    """Fast R-CNN's claim (paper Table 4: 9x faster training, 146x faster testing than R-CNN with VGG16) on our data:
    fast_rcnn.py and rcnn.py with the same backbone (ResNet-18, random weights, each file's default head and input
    sizes: R-CNN warps 112-px crops, Fast R-CNN sees the image at its own size), the same synthetic images and
    selective-search proposals. Seconds per image, CPU time of this process and wall time, medians of --steps: a
    training step of --train-batch images (R-CNN: fine-tuning, 128 regions per step; its SVM and regressor stages
    then extract the features of every proposal of every training image once more, about a test pass), and inference
    over all proposals of --train-batch images (R-CNN scored by its softmax: the network's cost without the SVMs)."""
    import data
    import fast_rcnn
    import rcnn
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    height, width = args.image_size
    dataset = data.SyntheticShapes(2 * args.train_batch, (height, width), seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    proposals = [data.selective_search(image, "fast", 0, 4).to(args.device) for image, _ in items]
    images = [image.to(args.device) for image, _ in items]
    targets = [dict(t, boxes=t["boxes"].to(args.device), labels=t["labels"].to(args.device), proposals=p)
               for (_, t), p in zip(items, proposals)]
    print(f"{len(images)} synthetic {height}x{width} images, {[len(p) for p in proposals]} proposals; "
          f"{args.device}, {torch.get_num_threads()} thread(s)")
    torch.manual_seed(0)
    models = {"rcnn.py": rcnn.RCNN(rcnn.Config(backbone="resnet18", num_classes=7, scoring="softmax")),
              "fast_rcnn.py": fast_rcnn.FastRCNN(fast_rcnn.Config(
                  backbone="resnet18", num_classes=7, scales=(min(height, width),),
                  test_scales=(min(height, width),), max_size=max(height, width)))}
    b, times = args.train_batch, {}
    for name, model in models.items():
        model.to(args.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def train_step():
            model.train()
            loss = sum(model(images[:b], targets[:b]).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def inference():
            model.eval()
            with torch.no_grad():
                model(images[b:], proposals=proposals[b:])

        for kind, fn in (("train", train_step), ("test", inference)):
            fn()  # warm-up
            runs = []
            for _ in range(args.steps):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                cpu, wall = time.process_time(), time.perf_counter()
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                runs.append((time.process_time() - cpu, time.perf_counter() - wall))
            times[name, kind] = [float(np.median([r[i] for r in runs])) / b for i in (0, 1)]
    for kind in ("train", "test"):
        (rc, rw), (fc, fw) = times["rcnn.py", kind], times["fast_rcnn.py", kind]
        print(f"{kind}: rcnn.py {rc:.3f} s/img CPU ({rw:.3f} wall), fast_rcnn.py {fc:.3f} s/img CPU ({fw:.3f} wall): "
              f"{rc / fc:.1f}x (wall {rw / fw:.1f}x)")


# --- Selective search against OpenCV ---


def bench_selective_search(args):
    """data.selective_search against OpenCV-contrib's SelectiveSearchSegmentation in fast mode (not a dependency: run
    only when cv2.ximgproc imports) on a VOC-layout dataset: recall of every ground-truth box at IoU 0.5 and 0.7 by
    the first --max-boxes boxes, boxes per image, and seconds per image: CPU time of this process (what one thread
    costs, whatever else runs on the machine) and wall time; one torch / OpenCV thread, the image already decoded.
    The two run image by image in turn, so that a busy machine slows both alike."""
    import data
    torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
        cv2.ximgproc.segmentation.createSelectiveSearchSegmentation  # noqa: B018 (contrib present?)
    except (ImportError, AttributeError):
        cv2 = None
        print("OpenCV with ximgproc not installed: ours only (pip install opencv-contrib-python-headless)")
    dataset = (data.SyntheticShapes(args.num_images or 40, args.synthetic, seed=1) if args.synthetic else
               data.VocDetection(args.data_root, args.split))  # synthetic: validation images (seed 1)
    num_images = min(args.num_images or len(dataset), len(dataset))

    def opencv(image):  # BGR uint8, as cv2.imread gives it
        bgr = (image.flip(0) * 255).round().byte().permute(1, 2, 0).numpy().copy()
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        search.switchToSelectiveSearchFast()
        rects = torch.tensor(search.process(), dtype=torch.float32).reshape(-1, 4)
        return torch.cat([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)  # x, y, w, h -> x1, y1, x2, y2

    methods = {f"data.selective_search ({args.mode})": lambda image: data.selective_search(
        image, args.mode, args.side, args.min_box_size)}
    if cv2 is not None:
        methods["OpenCV fast"] = opencv
    totals = {name: {"cpu": 0.0, "wall": 0.0, "boxes": 0, "hit50": 0, "hit70": 0} for name in methods}
    num_gt = 0
    for i in range(num_images):
        image, target = dataset[i]
        num_gt += len(target["boxes"])
        for name, method in methods.items():
            cpu, wall = time.process_time(), time.perf_counter()
            boxes = method(image)
            total = totals[name]
            total["cpu"] += time.process_time() - cpu
            total["wall"] += time.perf_counter() - wall
            total["boxes"] += len(boxes)
            if len(target["boxes"]) and len(boxes):
                best = common.box_iou(target["boxes"], boxes[:args.max_boxes]).max(1).values
                total["hit50"] += int((best >= 0.5).sum())
                total["hit70"] += int((best >= 0.7).sum())
        if (i + 1) % 10 == 0 or i + 1 == num_images:
            print(f"\r{i + 1}/{num_images} images", end="\n" if i + 1 == num_images else "", flush=True)
    print(f"{dataset.source}: {num_images} images, {num_gt} ground-truth boxes, "
          f"at most {args.max_boxes} boxes per image")
    print(f"{'method':<32} {'recall@0.5':>10} {'recall@0.7':>10} {'boxes':>7} {'CPU s/img':>10} {'wall s/img':>10}")
    for name, t in totals.items():
        print(f"{name:<32} {t['hit50'] / num_gt:10.4f} {t['hit70'] / num_gt:10.4f} {t['boxes'] / num_images:7.0f} "
              f"{t['cpu'] / num_images:10.2f} {t['wall'] / num_images:10.2f}")


# --- Models against torchvision ---
# name -> torchvision builder of the same detector. Each model file has Config, TORCHVISION_CONFIG, DETECTOR and
# convert_torchvision.
MODELS = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "retinanet": "retinanet_resnet50_fpn", "fcos": "fcos_resnet50_fpn",
          "ssd": "ssd300_vgg16"}


def bench_model(args):
    """Our detector and torchvision's with the same (converted) weights, inputs and precision: a training step (forward,
    backward, SGD step; batch --train-batch), inference at batch 1 and --infer-batch, peak CUDA memory, and the
    speed-ups (the two models' steps alternate); plus the backbone alone (ResNet-50-FPN, SSD's VGG16 and extras:
    forward, and forward + backward) as the floor no detector can beat. Both models are built without pretrained
    weights (offline), so both use ordinary batch norm with every layer trained. SSD resizes every image to 300x300: it
    runs once, without the size settings."""
    import importlib
    import data
    import torchvision
    builder, module = MODELS[args.name], importlib.import_module(args.name)
    device = torch.device(args.device)
    dataset = data.SyntheticShapes(max(args.infer_batch, args.train_batch), tuple(args.image_size), seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    images = [image.to(device) for image, _ in samples]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in samples]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{args.name} on {device} ({where}, {'bf16 autocast' if cuda else 'fp32'}), "
          f"{args.image_size[0]}x{args.image_size[1]} synthetic images, median of {args.steps} steps")

    def gib(memory):
        return f"{memory:.2f}" if cuda else "-"  # peak memory is measured on CUDA only

    def measure(*fns):
        """Median seconds per call and peak CUDA memory (GiB) of each of fns; the calls alternate (ours,
        torchvision's, ours, ...) so that a machine busy with other jobs, or a CPU changing its clock, slows both
        alike."""
        for fn in fns:
            fn()  # warm-up: cuDNN autotuning, allocator growth
        times, peaks = [[] for _ in fns], [0.0 if cuda else float("nan")] * len(fns)
        for _ in range(args.steps):
            for i, fn in enumerate(fns):
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                tic = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                    peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) / 2**30)
                times[i].append(time.perf_counter() - tic)
        return [(float(np.median(t)), peak) for t, peak in zip(times, peaks)]

    fields = module.Config.__dataclass_fields__
    results = []  # --json: every row of every size
    for min_size, max_size in dict.fromkeys([(args.min_size, args.max_size), (320, 533)] if "min_size" in fields else
                                            [(300, 300)]):  # the reference size, 320 px (SSD: 300 x 300 always)
        sizes = dict(min_size=min_size, max_size=max_size) if "min_size" in fields else {}
        tv = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=91,
                                                            **sizes).to(device)
        plain_bn = dict(frozen_bn=False, bn_eps=1e-5) if "frozen_bn" in fields else {}
        cfg = module.Config(**{**module.TORCHVISION_CONFIG, **plain_bn, "num_classes": 91, **sizes})  # no weights
        ours = module.DETECTOR(cfg).to(device)
        ours.load_state_dict(module.convert_torchvision(tv.state_dict()))

        def train_step(model, batch):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

            def step():
                model.train()
                with amp:
                    loss = sum(model(images[:batch], targets[:batch]).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step

        def infer_step(model, batch):
            def step():
                model.eval()
                with torch.no_grad(), amp:
                    model(images[:batch])
            return step

        rows = [(f"train step, batch {args.train_batch}", train_step, args.train_batch),
                ("inference, batch 1", infer_step, 1), (f"inference, batch {args.infer_batch}", infer_step,
                                                         args.infer_batch)]
        print(f"\nmin_size {min_size}, max_size {max_size}")
        # speed-up = torchvision's time / ours = our throughput / torchvision's (> 1: ours is faster)
        print(f"{'':<22} {'ours ms':>9} {'torchvision ms':>15} {'speed-up':>8} {'ours GiB':>9} {'tv GiB':>7}")
        for label, make, batch in rows:
            torch.manual_seed(0)
            (t_ours, m_ours), (t_tv, m_tv) = measure(make(ours, batch), make(tv, batch))
            results.append({"what": "train" if make is train_step else "infer", "batch": batch, "ours_s": t_ours,
                            "reference_s": t_tv, "ours_gib": m_ours if cuda else None, "size": f"{min_size} px"})
            print(f"{label:<22} {t_ours * 1000:9.1f} {t_tv * 1000:15.1f} {t_tv / t_ours:8.2f} {gib(m_ours):>9} "
                  f"{gib(m_tv):>7}")

        # the floor: torchvision's backbone (+ FPN) on the already resized, padded batch
        batch_tensor = tv.transform(images[:args.train_batch], None)[0].tensors
        backbone = tv.backbone.train()

        def backbone_train():
            with amp:
                loss = sum(f.float().mean() for f in backbone(batch_tensor).values())
            loss.backward()

        def backbone_infer():
            with torch.no_grad(), amp:
                backbone(batch_tensor)
        t_bt, m_bt = measure(backbone_train)[0]
        t_bi, m_bi = measure(backbone_infer)[0]
        print(f"{'backbone fwd+bwd':<22} {t_bt * 1000:9.1f} {'':>15} {'':>8} {gib(m_bt):>9}   (batch "
              f"{args.train_batch}, padded {tuple(batch_tensor.shape[-2:])})")
        print(f"{'backbone forward':<22} {t_bi * 1000:9.1f} {'':>15} {'':>8} {gib(m_bi):>9}")
        del tv, ours, backbone_train, backbone_infer
    write_json(args, args.name, device, results[-1]["size"], results, f"ours vs torchvision {builder}")


def bench_yolo(args):
    """yolo.py against ultralytics/yolov5 v7.0 (when --yolov5 names a work tree of tag v7.0; else yolo.py alone): the
    same weights (v7.0's initialisation, batch-norm statistics of the images, converted), the same square synthetic
    images at --yolo-size (letterbox: nothing to do), CPU fp32 or CUDA bf16 autocast. An untrained head scores every box
    below conf 0.001, so inference times the network and the decoding, not NMS (whose results the tests compare; with
    spread random scores 30,000 candidates per image make NMS take seconds in both). Train step: forward, loss,
    backward, SGD step at batch --train-batch; inference: the eval model, NMS as val.py (conf 0.001, IoU 0.6,
    multi-label, 300 per image) and its scale_boxes to the input image, at batch 1 and 32. Ours and v7.0's steps
    alternate, so that a busy machine slows both alike; medians of --steps. On a CPU also the process time (CPU
    seconds of all threads), which other jobs on the machine inflate far less."""
    import importlib.util
    import os
    import data
    import yolo
    spec = importlib.util.spec_from_file_location("make_reference", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "assets", "yolov5_v7", "make_reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    device, size, nc = torch.device(args.device), args.yolo_size, 80
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    depth, width = yolo.SCALES[args.scale]
    dataset = data.SyntheticShapes(32, size, seed=0)
    samples = [dataset[i] for i in range(32)]
    images = torch.stack([image for image, _ in samples]).to(device)  # [32, 3, size, size]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in samples]
    v5 = None
    if args.yolov5:
        yv5 = reference.load_yolov5(args.yolov5)
        with contextlib.redirect_stdout(io.StringIO()):
            v5 = reference.make_model(yv5, nc, depth, width, images[:8].cpu().mul(255).round().to(torch.uint8), 0.0)
        state_dict = v5.state_dict()
        v5.to(device)
        compute_loss = yv5.ComputeLoss(v5)
        labels = reference.yolo_labels([{k: v.cpu() for k, v in t.items()} for t in targets], size).to(device)
    ours = yolo.YOLO(yolo.Config(num_classes=nc + 1, backbone=args.scale, image_size=size, letterbox_pad=0.0))
    if v5 is not None:
        ours.load_state_dict(yolo.convert_yolov5(state_dict))
    ours.to(device)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"yolo ({args.scale}, {size} px, K = {nc}) on {device} ({where}, {'bf16 autocast' if cuda else 'fp32'}), "
          f"median of {args.steps} steps"
          + ("" if v5 is not None else "; --yolov5 DIR (a v7.0 work tree) to compare with ultralytics/yolov5"))

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def train_step(model, batch):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

        def step():
            model.train()
            with amp:
                if model is ours:
                    loss = sum(ours(list(images[:batch]), targets[:batch]).values())
                else:
                    loss = compute_loss(v5(images[:batch]), labels[labels[:, 0] < batch])[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def infer_step(model, batch):
        def step():
            model.eval()
            with torch.no_grad(), amp:
                if model is ours:
                    ours(list(images[:batch]))
                else:
                    with mock.patch("utils.general.time.time", return_value=0.0):  # no time limit
                        out = yv5.non_max_suppression(v5(images[:batch])[0].float(), 0.001, 0.6, multi_label=True,
                                                      max_det=300)
                    for d in out:  # val.py maps each image's boxes back (and clips them), as our model does
                        yv5.scale_boxes((size, size), d[:, :4], (size, size))
        return step

    rows = [(f"train step, batch {args.train_batch}", train_step, args.train_batch),
            ("inference, batch 1", infer_step, 1), ("inference, batch 32", infer_step, 32)]
    print(f"{'':<22} {'ours ms':>9} {'ours img/s':>11}" + (f" {'v7.0 ms':>9} {'speed-up':>8}" if v5 else "")
          + ("" if cuda else f" {'ours cpu-ms':>11}" + (f" {'v7.0 cpu-ms':>11} {'cpu speed-up':>12}" if v5 else "")))
    results = []  # --json
    for label, make, batch in rows:
        steps = [make(ours, batch)] + ([make(v5, batch)] if v5 is not None else [])
        for fn in steps:
            fn()  # warm-up
        times, cpu_times = [[] for _ in steps], [[] for _ in steps]
        for _ in range(args.steps):
            for fn, t, c in zip(steps, times, cpu_times):
                sync()
                tic, cpu_tic = time.perf_counter(), time.process_time()
                fn()
                sync()
                t.append(time.perf_counter() - tic)
                c.append(time.process_time() - cpu_tic)
        wall, cpu = [float(np.median(t)) for t in times], [float(np.median(c)) for c in cpu_times]
        results.append({"what": "train" if make is train_step else "infer", "batch": batch, "ours_s": wall[0],
                        "reference_s": wall[1] if v5 is not None else None, "ours_gib": None})
        print(f"{label:<22} {wall[0] * 1000:9.1f} {batch / wall[0]:11.1f}"
              + (f" {wall[1] * 1000:9.1f} {wall[1] / wall[0]:8.2f}" if v5 is not None else "")
              + ("" if cuda else f" {cpu[0] * 1000:11.1f}" + (f" {cpu[1] * 1000:11.1f} {cpu[1] / cpu[0]:12.2f}"
                                                             if v5 is not None else "")), flush=True)
    write_json(args, "yolo", device, f"{size} px", results, f"{args.scale}, K = {nc}" + (", vs v7.0" if v5 else ""))


# --- DETR against the official implementation ---


def bench_detr(args):
    """detr.py against facebookresearch/detr's DETR-R50 (DETR_ROOT: a checkout at 29901c51; without one, ours alone),
    the same weights (the official model's random initialisation, converted) and the same inputs: images already at
    the model's size (so our resize is the identity and the official model, which leaves resizing to its dataset, sees
    the same pixels), normalised inside each timed step. A training step is the model, the Hungarian matching of all 6
    decoder layers, the loss, backward and an AdamW step after clipping the gradient norm at 0.1, with dropout 0.1;
    inference is the model and the post-processing. Also the share of a training step spent in the matching."""
    import os
    import sys
    import data
    import detr
    device, cuda = torch.device(args.device), args.device == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    cfg = detr.Config(**{**detr.OFFICIAL_CONFIG, "num_classes": 91, "min_size": args.min_size,
                         "max_size": args.max_size})
    dataset = data.SyntheticShapes(max(8, args.train_batch), tuple(args.image_size), seed=0)
    images, targets = [], []
    for image, target in (dataset[i] for i in range(len(dataset))):
        size = detr.resized_size(*image.shape[-2:], cfg.min_size, cfg.max_size)
        images.append(torch.nn.functional.interpolate(image[None], size, mode="bilinear", antialias=True)[0].to(device))
        targets.append({"boxes": common.resize_boxes(target["boxes"], image.shape[-2:], size).to(device),
                        "labels": target["labels"].to(device)})
    mean = torch.tensor(cfg.image_mean, device=device)[:, None, None]
    std = torch.tensor(cfg.image_std, device=device)[:, None, None]
    ours = detr.DETR(cfg, load_backbone=False).to(device)
    official = criterion = postprocess = None
    root = args.detr_root or os.environ.get("DETR_ROOT")
    if root:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "detr_reference"))
        from make_reference import load_official, normalised_cxcywh
        official, criterion, postprocess, _ = load_official(root, "r50")
        for layer in [*official.transformer.encoder.layers, *official.transformer.decoder.layers]:
            for m in layer.modules():  # load_official builds with dropout 0 (for parity): the training recipe's 0.1
                if isinstance(m, (torch.nn.Dropout, torch.nn.MultiheadAttention)):
                    setattr(m, "p" if isinstance(m, torch.nn.Dropout) else "dropout", 0.1)
        official.to(device)
        criterion.to(device)
        ours.load_state_dict(detr.convert_official(official.state_dict()))
        official_targets = [{"labels": t["labels"],
                             "boxes": normalised_cxcywh(t["boxes"].cpu(), im.shape[-2:]).to(device)}
                            for t, im in zip(targets, images)]
    else:
        print("no --detr-root (or DETR_ROOT): detr.py alone")
    print(f"detr on {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}, "
          f"{'bf16 autocast' if cuda else 'fp32'}), images {tuple(images[0].shape[-2:])}, DETR-R50 (91 classes), "
          f"median of {args.steps} steps")
    matching = []  # seconds spent in matching during the timed training steps

    def timed(fn):
        def wrapper(*a, **k):
            if cuda:
                torch.cuda.synchronize(device)
            tic = time.perf_counter()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize(device)
            matching.append(time.perf_counter() - tic)
            return out
        return wrapper
    detr.hungarian_match = timed(detr.hungarian_match)
    if criterion is not None:
        criterion.matcher.forward = timed(criterion.matcher.forward)

    def measure(fns):
        """Median seconds per call of each of fns and its mean matching seconds; the calls alternate (ours, the
        official's, ours, ...) so that a machine shared with other jobs slows both alike."""
        times, matched = [[] for _ in fns], [0.0 for _ in fns]
        for fn in fns:
            fn()  # warm-up
        for _ in range(args.steps):
            for i, fn in enumerate(fns):
                matching.clear()
                if cuda:
                    torch.cuda.synchronize(device)
                tic = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                times[i].append(time.perf_counter() - tic)
                matched[i] += sum(matching) / args.steps
        return [(float(np.median(t)), m) for t, m in zip(times, matched)]

    def train_step(model, batch):
        optimizer, _ = detr.make_optimizer(model, dataclasses.replace(cfg, lr_backbone=1e-5, warmup_iters=0), 1, 1)

        def step():
            model.train()
            with amp:
                if model is ours:
                    loss = sum(model(images[:batch], targets[:batch]).values())
                else:
                    losses = criterion(model([(im - mean) / std for im in images[:batch]]), official_targets[:batch])
                    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
        return step

    def infer_step(model, batch):
        def step():
            model.eval()
            with torch.no_grad(), amp:
                if model is ours:
                    model(images[:batch])
                else:
                    sizes = torch.tensor([im.shape[-2:] for im in images[:batch]], device=device)
                    postprocess(model([(im - mean) / std for im in images[:batch]]), sizes)
        return step

    print(f"{'':<22} {'ours ms':>9} {'official ms':>12} {'speed-up':>8}   "
          "matching: ours ms (share)  official ms (share)")
    for label, make, batch in [(f"train step, batch {args.train_batch}", train_step, args.train_batch),
                               ("inference, batch 1", infer_step, 1), ("inference, batch 8", infer_step, 8)]:
        torch.manual_seed(0)
        (t_ours, m_ours), (t_off, m_off) = (measure([make(ours, batch), make(official, batch)]) if official is not None
                                            else [*measure([make(ours, batch)]), (float("nan"), float("nan"))])
        share = (f"   {m_ours * 1000:9.1f} ({m_ours / t_ours:.1%})  {m_off * 1000:9.1f} ({m_off / t_off:.1%})"
                 if make is train_step else "")
        print(f"{label:<22} {t_ours * 1000:9.1f} {t_off * 1000:12.1f} {t_off / t_ours:8.2f}{share}")


def write_json(args, name: str, device: torch.device, size: str, rows: list, note: str = ""):
    """--json PATH: a bench's results as one JSON object, what `compare` reads: {"name", "device", "date", "size",
    "note", "torch", "command", "rows": [{"what": "train"|"infer", "batch", "ours_s", "ours_gib", ...}]}."""
    import datetime
    import json
    import platform
    import sys
    if not getattr(args, "json", ""):
        return
    cuda = device.type == "cuda"
    record = {"name": name, "device": torch.cuda.get_device_name(device) if cuda else
              f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(), "size": size, "note": note,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "command": " ".join(["python", *[os.path.basename(sys.argv[0])], *sys.argv[1:]]), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.json}")


def bench_speed(args):
    """Any model file alone (--model NAME): its default Config (the synthetic --train default; random weights) on
    synthetic images of the default's size, a training step (forward, loss, backward, SGD step) at --train-batch and
    inference at batch 1 and --infer-batch, as the template calls the model; CUDA bf16 autocast or CPU fp32. Medians of
    --steps after one warm-up; wall time and, on a CPU, the process's CPU time (which other jobs inflate least)."""
    import importlib
    import data
    module = importlib.import_module(args.model)
    device, cuda = torch.device(args.device), args.device == "cuda"
    cfg = dataclasses.replace(module.Config(), device=args.device)
    torch.manual_seed(0)
    model = module.DETECTOR(cfg, load_backbone=False).to(device)
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    batch_max = max(args.train_batch, args.infer_batch)
    dataset = data.SyntheticShapes(batch_max, cfg.image_size, seed=0)
    images, targets = data.collate_fn([dataset[i] for i in range(batch_max)])
    images, targets = [im.to(device) for im in images], data.to_device(list(targets), device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"{args.model} alone on {device} ({where}, {'bf16 autocast' if cuda else 'fp32'}), default Config, "
          f"{size}-px synthetic images, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, median "
          f"of {args.steps}")

    def train(batch):
        model.train()
        with amp:
            loss = sum(model(images[:batch], targets[:batch]).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer(batch):
        model.eval()
        with torch.no_grad(), amp:
            model(images[:batch])
    rows = []
    for what, fn, batch in dict.fromkeys((("train", train, args.train_batch), ("infer", infer, 1),
                                          ("infer", infer, args.infer_batch))):  # --infer-batch 1: batch 1 only
        fn(batch)  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        wall, cpu = [], []
        for _ in range(args.steps):
            tic, cpu_tic = time.perf_counter(), time.process_time()
            fn(batch)
            if cuda:
                torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - tic)
            cpu.append(time.process_time() - cpu_tic)
        rows.append({"what": what, "batch": batch, "ours_s": float(np.median(wall)), "cpu_s": float(np.median(cpu)),
                     "ours_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
        row = rows[-1]
        print(f"{'train step' if what == 'train' else 'inference'}, batch {batch:<3} {row['ours_s'] * 1000:9.1f} ms "
              f"{batch / row['ours_s']:8.2f} img/s" + ("" if cuda else f"  CPU time {row['cpu_s'] * 1000:.1f} ms"),
              flush=True)
    write_json(args, args.model, device, f"{size} px", rows, args.note)


# --- Side by side: records and code -> the README table ---
# the model files in the README's order (R-CNN ... DETR); compare and gallery give a row to each, present or not
FILES = ["rcnn", "fast_rcnn", "faster_rcnn", "retinanet", "ssd", "yolo", "fcos", "detr"]
HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
GOAL = 0.9  # the synthetic goal: mAP@0.5 (COCO AP50) of the default --train


def read_env(folder: str) -> tuple[str, str, str]:
    """(device, date, start) of a records folder from its env.txt (nvidia-smi's csv, `date -u`: the date, and the
    time its runs began as an ISO string that sorts), else ('', '', '')."""
    import datetime
    device = start = ""
    path = os.path.join(folder, "env.txt")
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        if line.startswith("NVIDIA") or line.startswith("CPU"):  # "NVIDIA H200, 143771 MiB, ..." / "CPU (...), ..."
            device = line[:line.index(")") + 1] if line.startswith("CPU (") else line.split(",")[0]
        for form in ("%a %b %d %I:%M:%S %p %Z %Y", "%a %b %d %H:%M:%S %Z %Y"):  # `date -u` of two locales
            with contextlib.suppress(ValueError):
                start = datetime.datetime.strptime(line.strip(), form).isoformat()
    return device, start[:10], start


def read_bench(path: str) -> dict:
    """A bench record: bench.py --json's file as it is, or bench.py's printed output (bench_NAME.txt) parsed into the
    same form: {"name", "device", "size", "rows": [{"what": "train"|"infer", "batch", "ours_s", "ours_gib"}]}."""
    import json
    import re
    if path.endswith(".json"):
        return json.load(open(path))
    text = open(path).read()
    first = next(line for line in text.splitlines() if re.search(r" on \w+ \(", line))  # (after any warnings)
    size = (re.search(r"min_size (\d+)", text) or re.search(r"(\d+) px", first)
            or re.search(r"images \((\d+), \d+\)", first))  # detr: the images' size, short side first
    record = {"name": first.split()[0], "size": f"{size.group(1)} px",
              "device": re.search(r" on \w+ \(([^,]+),", first).group(1), "rows": []}
    for what, batch, ms, rest in re.findall(r"^(train step|inference), batch (\d+)\s+([\d.]+)(.*)$", text, re.M):
        fields = rest.split()  # torchvision ms, speed-up, ours GiB ("-" on a CPU), tv GiB
        gib = float(fields[2]) if len(fields) == 4 and fields[2] != "-" else None
        record["rows"].append({"what": "train" if what == "train step" else "infer", "batch": int(batch),
                               "ours_s": float(ms) / 1000, "ours_gib": gib})
    return record


def median_img_s(steps_record: list, log_every: int) -> float:
    """A run's training images/s: the median of its log lines, leaving out each epoch's first window (it holds the
    loader's start and, before it, the evaluation), unless there is nothing else."""
    speeds = [r["img_s"] for r in steps_record if not r["step"].startswith(f"{log_every}/")]
    return float(np.median(speeds or [r["img_s"] for r in steps_record]))


def summarise_run(path: str, name: str) -> dict:
    """One default --train's metrics.jsonl -> evaluations with their time, training images/s, peak memory.

    Time (s since the training loop began; start-up not counted): a record's "time_s" where the template wrote one;
    in older records it is derived exactly from the ETA the template logged (eta_min = elapsed / done * remaining, with
    the Config defaults' epochs: the steps per epoch in the record must agree with them). An evaluation's time is
    when the next epoch's training began (it ends the evaluation), else the end of its epoch's training ('>=')."""
    import importlib
    import json
    cfg = importlib.import_module(name).Config()
    records = [json.loads(line) for line in open(path)]
    steps_record = [r for r in records if "step" in r]
    steps = int(steps_record[0]["step"].split("/")[1])
    total = cfg.epochs * steps
    if -(-cfg.num_train // cfg.batch_size) != steps:
        raise SystemExit(f"{path}: {steps} steps per epoch, the defaults of {name}.py give another number: not its "
                         f"default run")
    offset = previous = 0.0
    for r in records:  # a resumed run's clock starts again at 0: add the time before the resume
        if "time_s" in r:
            offset = previous if r["time_s"] + offset < previous else offset
            r["time_s"] += offset
            previous = r["time_s"]
    for r in steps_record:
        if "time_s" not in r:
            r["time_s"] = r["eta_min"] * 60 * r["iter"] / (total - r["iter"])
    evals = []
    for r in records:
        if "AP" not in r:
            continue
        after = [s for s in steps_record if s["epoch"] == r["epoch"] + 1]
        if "time_s" in r:
            seconds, bound = r["time_s"], ""
        elif after:  # the window of the next epoch's first log line began when evaluation (and saving) ended
            first = after[0]
            seconds, bound = first["time_s"] - int(first["step"].split("/")[0]) * cfg.batch_size / first["img_s"], ""
        else:
            seconds, bound = max(s["time_s"] for s in steps_record if s["epoch"] == r["epoch"]), ">="
        evals.append({"epoch": r["epoch"] + 1, "AP50": r["AP50"], "AP": r["AP"], "APs": r["APs"], "s": seconds,
                      "bound": bound})
    return {"evals": evals, "img_s": median_img_s(steps_record, cfg.log_every),
            "mem_gb": max(s["mem_gb"] for s in steps_record), "seconds": max(s["time_s"] for s in steps_record),
            "epochs": cfg.epochs, "iters": max(s["iter"] for s in steps_record), "total": total,
            "projected": steps_record[-1]["time_s"] + steps_record[-1]["eta_min"] * 60}  # the last ETA


def summarise_data_run(folder: str, name: str) -> dict:
    """A --train on a dataset (records FOLDER/NAME.metrics.jsonl and NAME.config.json, and NAME.eval.txt: --eval of
    its best.pt) -> its evaluations, the best one (highest AP, the one best.pt holds), images/s and seconds. Each
    class's AP@0.5 comes from the evaluation record where the run logged it, else from NAME.eval.txt."""
    import json
    records = [json.loads(line) for line in open(os.path.join(folder, f"{name}.metrics.jsonl"))]
    cfg = json.load(open(os.path.join(folder, f"{name}.config.json")))
    steps_record = [r for r in records if "step" in r]
    evals = [r for r in records if "AP" in r]
    best = max(evals, key=lambda r: r["AP"], default=None)
    per_class = {k.removeprefix("VOC_AP50_"): v for k, v in (best or {}).items() if k.startswith("VOC_AP50_")}
    eval_path = os.path.join(folder, f"{name}.eval.txt")
    if best and not per_class and os.path.exists(eval_path):
        numbers = dict(line.split() for line in open(eval_path) if len(line.split()) == 2)
        if abs(float(numbers.get("AP", -1)) - best["AP"]) > 1e-3:  # it must be the evaluation of that best.pt
            raise SystemExit(f"{eval_path}: AP {numbers.get('AP')}, the run's best evaluation {best['AP']:.4f}")
        per_class = {k.removeprefix("VOC_AP50_"): float(v) for k, v in numbers.items() if k.startswith("VOC_AP50_")}
    return {"folder": folder, "config": cfg, "evals": evals, "best": best, "per_class": per_class,
            "img_s": median_img_s(steps_record, cfg["log_every"]) if steps_record else None,
            "seconds": max((r["time_s"] for r in records if "time_s" in r), default=0.0),
            "epochs_done": len(evals), "epochs": cfg["epochs"]}


def read_records(folders: list[str]) -> dict:
    """Every record under folders: {"sources": [source dicts, lettered a, b, ...], "train": {name: [(run, source)]},
    "bench": {name: [(record, source)]}, "logs": {name: [(progress, source)]}}. A source is where figures come from:
    its folder, device, date and how the device was shared. A folder's device and date come from its env.txt, else
    from its bench --json records; the training runs of one sub-folder ran at the same time on that device."""
    import glob
    import re
    out = {"sources": [], "train": {}, "bench": {}, "logs": {}, "data": {}, "synthetic": {}}

    def source(folder, what, device, date, runs=1):
        rel = os.path.relpath(folder, HERE)
        for s in out["sources"]:
            if (s["path"], s["what"]) == (rel, what):
                return s
        out["sources"].append({"path": rel, "what": what, "device": device, "date": date, "runs": runs,
                               "start": start})
        return out["sources"][-1]
    for folder in folders:
        device, date, start = read_env(folder)
        for path in sorted(glob.glob(os.path.join(folder, "bench_*.*"))):
            record = read_bench(path)
            name = os.path.basename(path)[6:].rsplit(".", 1)[0]
            s = source(folder, record.get("note") or "bench.py, alone on the device", device or record["device"],
                       date or record.get("date", ""))
            out["bench"].setdefault(name, []).append((record, s))
        for path in sorted(glob.glob(os.path.join(folder, "*.config.json"))):  # runs one at a time, alone
            name = os.path.basename(path).split(".")[0]
            run = summarise_data_run(folder, name)
            synthetic = run["config"].get("data") == "synthetic"  # the synthetic data: a CPU recipe's run
            s = source(folder, f"each file's --train on the {'synthetic ' * synthetic}data, one after the other, alone "
                       "on the device", device, date)
            out["synthetic" if synthetic else "data"].setdefault(name, []).append((run, s))
        for sub in sorted(d for d in glob.glob(os.path.join(folder, "*")) if os.path.isdir(d)):
            runs = sorted({os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(sub, "*.metrics.jsonl"))
                           + glob.glob(os.path.join(sub, "*.log"))})
            if not runs:
                continue
            at_once = len(runs)  # processes that shared the device: these runs, or processes.txt where others ran too
            if os.path.exists(os.path.join(sub, "processes.txt")):
                at_once = int(open(os.path.join(sub, "processes.txt")).read())
            what = ("the default --train, alone on the device" if at_once == 1 else
                    f"the default --train of {len(runs)} files at once, sharing the device" if at_once == len(runs) else
                    f"the default --train of {' and '.join(runs)}, {at_once} trainings at once sharing the device")
            s = source(sub, what, device, date, at_once)
            for name in runs:
                metrics, log = (os.path.join(sub, f"{name}.{ext}") for ext in ("metrics.jsonl", "log"))
                if os.path.exists(metrics):
                    out["train"].setdefault(name, []).append((summarise_run(metrics, name), s))
                else:  # a run that wrote no metrics: how far its log got ("... 850/2000 images")
                    progress = re.findall(r"([A-Za-z][A-Za-z ]*?) (\d+/\d+) images", open(log).read())
                    last = f"{progress[-1][0].split(': ')[-1]} ({progress[-1][1]} images)" if progress else "start"
                    out["logs"].setdefault(name, []).append((last, s))
    for i, s in enumerate(sorted(out["sources"], key=lambda s: (s["device"].startswith("CPU"), s["path"], s["what"]))):
        s["order"] = i  # of the footnotes: accelerators first, then by folder
    return out


def code_facts(name: str) -> dict:
    """From the code: parameters of the default model (Config(), built on the meta device: nothing allocated) and the
    lines of the model part (start to '# --- Training ---') and of the template part (from there to the end)."""
    import importlib
    module = importlib.import_module(name)
    with torch.device("meta"):
        model = module.DETECTOR(module.Config(), load_backbone=False)
    text = open(os.path.join(HERE, name + ".py")).read()
    model_part = text[:text.index("# --- Training ---")]
    return {"params": sum(p.numel() for p in model.parameters()), "num_classes": module.Config().num_classes,
            "model_lines": model_part.count("\n"), "template_lines": text.count("\n") - model_part.count("\n")}


def parity(name: str, readme: str) -> str:
    """The reference of name.py and its largest difference, from the README's Models table (its reference and parity
    columns): the largest absolute difference written '|Δ| X' (with its unit) and the largest relative one ('rel X',
    'within X')."""
    import re
    models = readme[readme.index("## Models"):]
    for line in models.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 4 and cells[1] == f"`{name}.py`":
            if cells[2] in ("", "—"):
                return f"— (Models table: {cells[3]})"
            absolute = re.findall(r"\\\|Δ\\\| (?:≤ )?([0-9.]+(?:e-?\d+)?)( px)?", cells[3])
            relative = re.findall(r"rel ([0-9.]+(?:e-?\d+)?)", cells[3])
            within = re.findall(r"within ([0-9.]+(?:e-?\d+)?)", cells[3])  # a tolerance that the text qualifies
            largest = [f"max \\|Δ\\| {''.join(max(absolute, key=lambda a: float(a[0])))}"] if absolute else []
            largest += [f"relative ≤ {max(relative, key=float)}"] if relative else []
            largest += [f"within {max(within, key=float)}"] if within and not relative else []
            what = "no runnable reference, each stage against an independent solution: " * cells[3].startswith(
                "no runnable reference")
            return f"{cells[2]}: {what}{', '.join(largest) or cells[3]}"
    return "not in the Models table"


LEGENDS = {  # what each --show-targets picture shows (the docstrings of the files' draw_targets)
    "rcnn": "selective-search regions: left fine-tuning's (fg blue, bg red), right the SVMs' (negatives red, ignored "
            "grey)",
    "fast_rcnn": "selective-search proposals of one training step: fg RoIs blue, as many bg RoIs red, unused grey",
    "faster_rcnn": "RPN positive anchors white; sampled RoIs: fg blue, bg red",
    "retinanet": "positive anchors white",
    "ssd": "default boxes matched to each box, in its class colour",
    "yolo": "per (box, anchor, cell): the cell and its anchor, P3 white, P4 yellow, P5 red",
    "fcos": "positive points, brightness = centerness target",
    "detr": "the query matched to each box (white, its index); random weights: arbitrary boxes",
}


def gallery_markdown(records: dict, cite) -> list[str]:
    """The gallery's table: per model file, its pictures under assets/gallery (what is there), and for the
    predictions the evaluation of the run they come from (assets/gallery/sources.json says which records folder)."""
    import json
    sources_path = os.path.join(GALLERY, "sources.json")
    if not os.path.exists(sources_path):
        return ["No gallery yet: `python bench.py gallery` makes it."]
    sources = json.load(open(sources_path))
    cpu = sources.get("cpu_predictions", "")
    from_cpu = sources.get("from_cpu_predictions", {})  # file -> the records folder of its cpu preset's run
    lines = [*textwrap.wrap(f"Pictures: `python bench.py gallery`. Targets: {sources['targets']}. Predictions: "
                            f"{sources['predictions']}{'; ' + cpu if cpu else ''}; BCCD: "
                            f"{sources.get('bccd_predictions', 'none')}.", 120,
                            break_on_hyphens=False), "",
             "| detector | synthetic image: targets | BCCD image: targets | synthetic image: predictions | BCCD test "
             "image: predictions |", "| --- | --- | --- | --- | --- |"]
    for name in FILES:
        cells = []
        for picture in (f"synthetic_targets_{name}.png", f"bccd_targets_{name}.png", f"synthetic_pred_{name}.png",
                        f"bccd_pred_{name}.png"):
            exists = os.path.exists(os.path.join(GALLERY, picture))
            cells.append(f"![{picture[:-4]}](assets/gallery/{picture})" if exists else "—")
        kind, source = ("synthetic", from_cpu[name]) if name in from_cpu else ("train", sources.get("predictions_run"))
        run = [(r, s) for r, s in records[kind].get(name, []) if s["path"] == source]
        if cells[2] != "—" and run and run[0][0]["evals"]:
            best = max(run[0][0]["evals"], key=lambda e: e["AP"])
            cells[2] += f"<br>best.pt: epoch {best['epoch']}, mAP@0.5 {best['AP50']:.3f}{cite(run[0][1])}"
        run = [(r, s) for r, s in records["data"].get(name, []) if s["path"] == sources.get("bccd_predictions_run")]
        if cells[3] != "—" and run and run[0][0]["best"]:
            best = run[0][0]["best"]
            cells[3] += (f"<br>best.pt: epoch {best['epoch'] + 1}, VOC mAP@0.5 {best['VOC_mAP50']:.3f}"
                         f"{cite(run[0][1])}")
        present = os.path.exists(os.path.join(HERE, name + ".py"))
        lines.append(f"| `{name}.py`<br>{LEGENDS[name] if present else 'not in this tree yet'} | " + " | ".join(cells)
                     + " |")
    return lines


def input_size(name: str, cfg: dict) -> str:
    """What a run's images were resized to, from its config.json (each file resizes its own way)."""
    if name == "rcnn":
        return f"{cfg['crop_size']}-px crops of regions found at {cfg['proposal_side'] or 'full'} px"
    if "test_scales" in cfg:  # Fast R-CNN (SSD has a field "scales" too: its default boxes')
        return f"{cfg['scales'][0]} / ≤ {cfg['max_size']} px, regions found at {cfg['proposal_side'] or 'full'} px"
    if "min_size" in cfg:
        return f"{cfg['min_size']} / ≤ {cfg['max_size']} px"
    return f"{cfg['image_size']} × {cfg['image_size']} px" + (", letterboxed" if name == "yolo" else ", squashed")


def network(cfg: dict) -> str:
    """A run's backbone from its config.json, with its width where the file scales it (SSD), cut short (Fast R-CNN)."""
    cut = " up to conv4_3" if cfg["backbone"].startswith("vgg") else " up to layer2"
    return cfg["backbone"] + (f" × {cfg['width']} width" if cfg.get("width", 1) != 1 else "") + (
        cut if cfg.get("truncate") else "")


def wall_minutes(path: str) -> str:
    """The wall time of a run from its log's /usr/bin/time -v lines (start-up and proposals included; a run resumed
    into the same log: the sum of its parts), else '—'."""
    found = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", open(path).read()
                       if os.path.exists(path) else "")
    if not found:
        return "—"
    seconds = sum(float(x) * 60 ** i for part in found for i, x in enumerate(reversed(part.split(":"))))
    return f"{seconds / 60:.1f}"


def cpu_markdown(records: dict, cite) -> list[str]:
    """The table of the runs on the synthetic data in run-by-run records (NAME.config.json, NAME.metrics.jsonl, and
    NAME.log with /usr/bin/time's output): each file's mAP@0.5 after every epoch, its best evaluation, how long, and
    what it trained -- checked against this commit's cpu preset (what a plain --train runs without CUDA)."""
    import dataclasses
    import importlib
    import json

    def changed(name, cfg):
        """How a run's config differs from this commit's cpu preset, in what it trains and evaluates."""
        module = importlib.import_module(name)
        preset, default = (json.loads(json.dumps(dataclasses.asdict(c))) for c in (module.make_config({}, preset="cpu"),
                                                                                   module.Config()))
        cfg = {**default, **cfg}  # a field added after the run: it ran as the field's default
        return [f"{k} {cfg[k]}" for k, v in preset.items() if k not in ("out", "draw_thresh") and cfg[k] != v]
    runs = {}  # of a file's runs, the earliest of this commit's preset (the one that set it; reruns: in their folders)
    for name in FILES:  # ... else the latest; a run beside NAME.supersedes ran after a change of the file's code
        candidates = sorted(records["synthetic"].get(name, []), key=lambda rs: rs[1]["start"])
        changed_code = [s["start"] for run, s in candidates if os.path.exists(f"{run['folder']}/{name}.supersedes")]
        candidates = [rs for rs in candidates if rs[1]["start"] >= max(changed_code, default="")]  # (its reason)
        if candidates:
            runs[name] = next((rs for rs in candidates if not changed(name, rs[0]["config"])), candidates[-1])
    if not runs:
        return []
    lines = ["| file | mAP@0.5 after each epoch | the best: mAP@0.5 / AP (APs) | epochs, minutes of the training loop "
             "| wall minutes (start-up, proposals) | training img/s | what trained |", "| --- " * 7 + "|"]
    for name, (run, s) in runs.items():
        cfg, best = run["config"], run["best"]
        changes = changed(name, cfg)
        what = (f"{network(cfg)}, {cfg['num_train']} images of {cfg['image_size']} px, batch {cfg['batch_size']}; "
                + (f"the cpu preset but {', '.join(changes)}" if changes else "this commit's cpu preset"))
        stopped = "" if run["epochs_done"] >= run["epochs"] else " (stopped by its time limit)"
        curve = ", ".join(f"{e['AP50']:.3f}" for e in run["evals"]) or "none"
        lines.append(f"| `{name}.py` | {curve}{cite(s)} | "
                     + (f"{best['AP50']:.3f} / {best['AP']:.3f} ({best['APs']:.3f}) | " if best else "— | ")
                     + f"{run['epochs_done']} of {run['epochs']}{stopped}, {run['seconds'] / 60:.1f} | "
                     f"{wall_minutes(os.path.join(run['folder'], name + '.log'))} | {run['img_s']:.1f} | {what} |")
    return ["", "**Synthetic data on a CPU** (`python X.py --train` without CUDA: the `cpu` preset):", "", *lines]


def data_markdown(records: dict, cite) -> list[str]:
    """The table of the runs on a dataset (BCCD): per file, its best evaluation (VOC and COCO numbers, each class's
    AP@0.5), when, how long the run was and what it trained; then which file did best on the small objects."""
    runs = {name: records["data"][name][0] for name in FILES if records["data"].get(name)}
    if not runs:
        return []
    classes = sorted({k for run, _ in runs.values() for k in run["per_class"]})
    lines = [f"| file | VOC mAP@0.5 | AP@0.5: {' / '.join(classes) or 'per class'} | COCO AP / AP50 / AP75 | "
             "APs / APm / APl | the best evaluation: epoch (s) | run: epochs, minutes | training img/s | backbone, "
             "input |", "| --- " * 9 + "|"]
    for name, (run, s) in runs.items():
        best, cfg = run["best"], run["config"]
        if best is None:
            lines.append(f"| `{name}.py` | no evaluation in {run['seconds'] / 60:.0f} min{cite(s)} |" + " |" * 7)
            continue
        per_class = " / ".join(f"{run['per_class'][c]:.3f}" if c in run["per_class"] else "—" for c in classes)
        stopped = "" if run["epochs_done"] >= run["epochs"] else " (stopped by its time limit)"
        lines.append(f"| `{name}.py` | {best['VOC_mAP50']:.3f}{cite(s)} | {per_class or '—'} | {best['AP']:.3f} / "
                     f"{best['AP50']:.3f} / {best['AP75']:.3f} | {best['APs']:.3f} / {best['APm']:.3f} / "
                     f"{best['APl']:.3f} | {best['epoch'] + 1} ({best['time_s']:.0f} s) | {run['epochs_done']} of "
                     f"{run['epochs']}{stopped}, {run['seconds'] / 60:.1f} | {run['img_s']:.1f} | "
                     f"{network(cfg)}, {input_size(name, cfg)} |")
    evaluated = {name: run for name, (run, _) in runs.items() if run["best"]}
    winners = []
    for what, value in (("APs (COCO small: area < 32², a tenth of the platelets)", lambda r: r["best"]["APs"]),
                        ("platelets' AP@0.5 (the small objects)", lambda r: r["per_class"].get("Platelets", -1)),
                        ("VOC mAP@0.5", lambda r: r["best"]["VOC_mAP50"])):
        ranked = sorted(evaluated, key=lambda n: -value(evaluated[n]))
        if ranked and value(evaluated[ranked[0]]) >= 0:
            winners.append(f"{what}: " + ", ".join(f"`{n}.py` {value(evaluated[n]):.3f}" for n in ranked[:3]))
    return ["", *textwrap.wrap("**BCCD**, the best three: " + "; ".join(winners) + ".", 120,
                               break_on_hyphens=False), "", *lines]


def compare_markdown(folders: list[str], readme: str) -> str:
    """The README's side-by-side block (between BEGIN and END): the table, where each figure comes from, the gallery.
    Of several training runs of a file, the one that shared its device with the fewest others is shown."""
    records = read_records(folders)
    cited = {}

    def cite(s):  # a placeholder, lettered at the end: the sources cited get a, b, c ... in their order
        cited[s["order"]] = s
        return f"<sup>\0{s['order']}\0</sup>"
    lines = [f"| file | synthetic mAP@0.5 / AP (small objects): the best evaluation (s) | time to "
             f"mAP@0.5 {GOAL} | training img/s | inference img/s | peak memory | parameters | lines: model / "
             "template | reference: largest difference |", "| --- " * 9 + "|"]
    for name in FILES:
        if not os.path.exists(os.path.join(HERE, name + ".py")):
            lines.append(f"| `{name}.py` | not in this tree yet |" + " |" * 7)
            continue
        runs = sorted(records["train"].get(name, []), key=lambda rs: (rs[1]["runs"], -rs[0]["seconds"]))
        result, goal, train, infer, memory = "not measured", "not measured", [], [], []
        if runs:
            run, s = runs[0]
            best = max(run["evals"], key=lambda e: e["AP"], default=None)
            reached = next((e for e in run["evals"] if e["AP50"] >= GOAL), None)
            last = run["evals"][-1]["epoch"] if run["evals"] else 0
            later = f"; evaluated to epoch {last}" if best and last > best["epoch"] else ""
            result = (f"{best['AP50']:.3f} / {best['AP']:.3f} (APs {best['APs']:.3f}) after epoch {best['epoch']} of "
                      f"{run['epochs']} ({best['bound']}{best['s']:.0f} s{later}){cite(s)}" if best else
                      f"no evaluation: stopped in epoch 1 after {run['seconds']:.0f} s{cite(s)}")
            goal = (f"{reached['bound']}{reached['s']:.0f} s (epoch {reached['epoch']}){cite(s)}" if reached else
                    f"not reached in {run['seconds']:.0f} s; the whole default: ~{run['projected'] / 60:.0f} min "
                    f"at that speed (its last ETA){cite(s)}")
            train.append((s["order"], f"{run['img_s']:.0f} (run){cite(s)}"))
            memory.append((s["order"], f"{run['mem_gb']:.1f} GiB (run, with evaluation){cite(s)}"))
        elif records["logs"].get(name):
            progress, s = records["logs"][name][0]
            result = f"no evaluation: stopped in its {progress}{cite(s)}"
        for record, s in records["bench"].get(name, []):
            speeds = {}  # size -> inference speeds at that size
            for row in record["rows"]:
                speed, size = row["batch"] / row["ours_s"], row.get("size", record["size"])
                speed = f"{speed:.0f}" if speed >= 10 else f"{speed:.2f}"
                if row["what"] == "train":
                    train.append((s["order"], f"{speed} (step, batch {row['batch']}, {size}){cite(s)}"))
                    if row["ours_gib"] is not None:
                        memory.append((s["order"], f"{row['ours_gib']:.1f} GiB (train step, batch {row['batch']}, "
                                                 f"{size}){cite(s)}"))
                else:
                    speeds.setdefault(size, []).append(f"b{row['batch']} {speed}")
            infer += [(s["order"], f"{', '.join(dict.fromkeys(v))} ({size}){cite(s)}") for size, v in speeds.items()]
        facts = code_facts(name)
        train, infer, memory = ("; ".join(text for _, text in sorted(cell)) or "not measured"
                                for cell in (train, infer, memory))  # by source: accelerators first
        lines.append(f"| `{name}.py` | {result} | {goal} | {train} | {infer} | {memory} | "
                     f"{facts['params'] / 1e6:.1f} M | {facts['model_lines']} / {facts['template_lines']} | "
                     f"{parity(name, readme)} |")
    lines += cpu_markdown(records, cite) + data_markdown(records, cite)
    gallery = gallery_markdown(records, cite)
    lines.append("")
    for order in sorted(cited):
        s = cited[order]
        lines.append(f"<sup>\0{order}\0</sup> {s['device']}, {s['date']}: {s['what']} (`{s['path']}`).  ")
    lines += ["", *textwrap.wrap(" ".join([
              "Generated by `python bench.py compare` from the records above and this commit's code;",
              "`test_compare_table_is_the_records` fails when they disagree. Seconds count from the start of the",
              "training loop (building data and model not included): a metrics record's `time_s`, or in older records "
              "the elapsed time the template's `eta_min` implies (with the default's epochs). An evaluation's time",
              "is when the next epoch began (`>=`: the end of its epoch's training). Images/s of a run: the median of "
              "its log lines (the first of each epoch left out). Memory: peak CUDA memory allocated. Parameters:",
              "the default `Config()` (6 classes + background), counted on the meta device; lines: the file to `# --- "
              "Training ---` / from there to the end; reference and largest difference: the [Models](#models) table."]),
                                    120, break_on_hyphens=False), "", *gallery]
    letters = {order: "abcdefghijklmnopqrstuvwxyz"[k] for k, order in enumerate(sorted(cited))}
    return re.sub(r"\0(\d+)\0", lambda m: letters[int(m[1])], "\n".join([BEGIN, *lines, END]))


def records_folders() -> list[str]:
    """The records compare reads by default: every folder under records/."""
    import glob
    return sorted(d for d in glob.glob(os.path.join(RECORDS, "*")) if os.path.isdir(d))


def bench_compare(args):
    """The README's side-by-side table from the records (--records DIR ..., default every folder under records/) and
    the code: written between the README's compare markers (a section '## Side by side' after '## Models' is made
    the first time)."""
    readme_path = os.path.join(HERE, "README.md")
    readme = open(readme_path).read()
    block = compare_markdown(args.records or records_folders(), readme)
    if BEGIN in readme:
        readme = readme[:readme.index(BEGIN)] + block + readme[readme.index(END) + len(END):]
    else:
        models = readme.index("\n## Models")
        after = readme.index("\n## ", models + 1)
        readme = readme[:after] + "\n## Side by side\n\n" + block + "\n" + readme[after:]
    open(readme_path, "w").write(readme)
    print(block)


# --- Side by side: the gallery ---
GALLERY = os.path.join(HERE, "assets", "gallery")
# --show-targets on one image each, as the GPU default sees it (--preset none) but on the CPU, from random weights:
# synthetic validation image 0 (seed 1, 320 px: the image the GPU runs' predictions are drawn on), no augmentation
GALLERY_DATA = {"synthetic": ["--seed", "1", "--image-size", "320", "--num-train", "1", "--num-val", "1"],
                "bccd": ["--data", "voc", "--data-root", os.path.join(HERE, "assets", "bccd"), "--train-split", "train",
                         "--val-split", "val"]}
BCCD_IMAGE = "BloodImage_00068"  # the BCCD test image of the predictions (4 platelets, 1 WBC, 9 RBC)
NO_AUGMENT = {"hflip_prob": ["--hflip-prob", "0"], "mosaic": ["--mosaic", "0"], "scale": ["--scale", "0"],
              "translate": ["--translate", "0"], "hsv": ["--hsv", "0", "0", "0"]}


def small_png(source: str, path: str, width: int, colours: int = 48):
    """source downscaled to width pixels (aspect kept) and quantised to a palette of colours: a few kB each."""
    from PIL import Image
    image = Image.open(source).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def write_gallery_sources(args):
    """assets/gallery/sources.json: what the pictures are, for the README's gallery (compare reads it)."""
    import json
    os.makedirs(GALLERY, exist_ok=True)
    path = os.path.join(GALLERY, "sources.json")
    sources = json.load(open(path)) if os.path.exists(path) else {"predictions": "none"}  # pictures not redrawn stay
    sources["targets"] = ("`--show-targets --preset none` on the CPU, random weights (seed 0), no augmentation; "
                          "synthetic: validation image 0 at 320 px, BCCD: `assets/bccd` image BloodImage_00164")
    if args.predictions:
        sources.update(predictions=f"`--predict` of the best.pt of the GPU runs in `{args.predictions_run}`, boxes "
                                   "scoring >= 0.5", predictions_run=args.predictions_run)
    if args.cpu_predictions:
        sources.update(cpu_predictions="where those runs left no best.pt, or one too early to draw a box, its cpu "
                                       "preset run's (the records folder of its footnote), on the same validation "
                                       "image as that preset renders it (128 px; R-CNN's 192 px), boxes scoring >= "
                                       "0.5 (R-CNN: SVM margins >= -0.5, its preset's threshold; RetinaNet: >= 0.4, "
                                       "its best F1 over the 200 validation images, in the folder's thresholds.txt)")
    if args.bccd_predictions:
        sources.update(bccd_predictions=f"`--predict` of the best.pt of the CPU runs in `{args.bccd_predictions_run}`"
                                        f" on the BCCD test image {BCCD_IMAGE} (each file's default threshold)",
                       bccd_predictions_run=args.bccd_predictions_run)
    return sources


def bench_gallery(args):
    """assets/gallery/: for every model file present, --show-targets (CPU, random weights, the Config defaults: what
    the assignment marks) on one synthetic and one BCCD image, and, from --predictions DIR (DIR/pred_NAME/sample.png, as
    the GPU records' run.sh writes them; else from --cpu-predictions DIR, the cpu presets' runs: alone, with --files,
    it replaces a GPU run's picture), the predictions of trained models on the synthetic image. Small palette PNGs
    (--gallery-width pixels wide)."""
    import importlib
    import json
    import subprocess
    import sys
    import tempfile
    sources = write_gallery_sources(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name in args.files or FILES:
        if not os.path.exists(os.path.join(HERE, name + ".py")):
            print(f"{name}.py: not in this tree, no pictures")
            continue
        fields = importlib.import_module(name).Config.__dataclass_fields__
        off = [flag for field, flag in NO_AUGMENT.items() if field in fields]
        for data_name, flags in GALLERY_DATA.items():
            with tempfile.TemporaryDirectory() as out:
                command = [sys.executable, os.path.join(HERE, name + ".py"), "--show-targets", "--preset", "none",
                           "--device", "cpu", "--workers", "0", "--out", out, *flags, *sum(off, [])]
                tic = time.perf_counter()
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
                small_png(os.path.join(out, "targets_0.png"), os.path.join(GALLERY, f"{data_name}_targets_{name}.png"),
                          args.gallery_width * (2 if name == "rcnn" else 1))  # R-CNN draws two panels side by side
                print(f"{name} {data_name}: targets in {time.perf_counter() - tic:.0f} s")
        for folders, picture, data_name in (((args.predictions, args.cpu_predictions), "sample", "synthetic"),
                                            ((args.bccd_predictions,), BCCD_IMAGE, "bccd")):
            for folder, ext in itertools.product(folders, (".png", ".jpg")):  # the first folder with the picture
                prediction = os.path.join(folder, f"pred_{name}", picture + ext)  # (.jpg: --predict keeps the name)
                if folder and os.path.exists(prediction):
                    small_png(prediction, os.path.join(GALLERY, f"{data_name}_pred_{name}.png"), args.gallery_width)
                    if data_name == "synthetic":  # which files' pictures are the cpu runs', and which runs
                        from_cpu = sources.setdefault("from_cpu_predictions", {})
                        from_cpu.pop(name, None)
                        if folder != args.predictions:
                            from_cpu[name] = args.cpu_predictions_run
                    break
    with open(os.path.join(GALLERY, "sources.json"), "w") as f:
        json.dump(sources, f, indent=1)
    total = sum(os.path.getsize(os.path.join(GALLERY, f)) for f in os.listdir(GALLERY))
    print(f"{GALLERY}: {len(os.listdir(GALLERY))} files, {total / 1e3:.0f} kB")


def main(argv=None, run=True):
    """The command line; run=False: only its arguments (the README's commands are checked against it)."""
    benchmarks = {"coco_eval": bench_coco_eval, "selective_search": bench_selective_search, "yolo": bench_yolo,
                  "detr": bench_detr, "fast_rcnn": bench_fast_rcnn, "gallery": bench_gallery,
                  "compare": bench_compare, "speed": bench_speed,
                  **{name: bench_model for name in MODELS}}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(benchmarks))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--min-size", type=int, default=800, help="models: short side (torchvision's default 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="models: long side at most (default 1333)")
    parser.add_argument("--train-batch", type=int, default=2, help="models: images per training step (2 per GPU)")
    parser.add_argument("--infer-batch", type=int, default=8, help="models: images per inference call, besides 1")
    parser.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="models: synthetic image size before the models resize it (default: COCO-like 480 640)")
    parser.add_argument("--steps", type=int, default=10, help="models: timed steps per measurement (median)")
    parser.add_argument("--yolov5", default="", help="yolo: a work tree of ultralytics/yolov5 at tag v7.0")
    parser.add_argument("--scale", default="yolov5s", help="yolo: yolov5n|s|m|l|x")
    parser.add_argument("--yolo-size", type=int, default=640, help="yolo: square image side (default 640)")
    parser.add_argument("--detr-root", default="", help="detr: a checkout of facebookresearch/detr (or DETR_ROOT)")
    parser.add_argument("--data-root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                            "data", "bccd"), help="selective_search: a VOC folder")
    parser.add_argument("--split", default="test", help="selective_search: its split (default test)")
    parser.add_argument("--mode", default="fast", choices=["fast", "quality"], help="selective_search: our mode")
    parser.add_argument("--max-boxes", type=int, default=2000, help="selective_search: boxes per image counted")
    parser.add_argument("--num-images", type=int, default=0, help="selective_search: the first N images (0: all)")
    parser.add_argument("--synthetic", type=int, default=0, help="selective_search: synthetic images of this side "
                        "instead (--num-images of them, default 40)")
    parser.add_argument("--side", type=int, default=500, help="selective_search: our longer side (0: as it is)")
    parser.add_argument("--min-box-size", type=int, default=20, help="selective_search: our smallest box side")
    parser.add_argument("--model", default="faster_rcnn", help="speed: the model file (its name without .py)")
    parser.add_argument("--json", default="", help="models, yolo, speed: also write the results to this JSON file")
    parser.add_argument("--note", default="", help="speed: a note stored with the --json record (e.g. the sharing)")
    parser.add_argument("--records", nargs="*", default=[], help="compare: records folders (default: records/*)")
    parser.add_argument("--predictions", default="", help="gallery: a folder of pred_NAME/sample.png (GPU runs)")
    parser.add_argument("--bccd-predictions", default="",
                        help=f"gallery: a folder of pred_NAME/{BCCD_IMAGE}.jpg (or .png; the BCCD runs' --predict)")
    parser.add_argument("--bccd-predictions-run", default="records/2026-11-27-cpu-bccd",
                        help="gallery: the records folder of the runs whose predictions --bccd-predictions holds")
    parser.add_argument("--predictions-run", default="records/2026-11-27-h200/seven",
                        help="gallery: the records folder of the runs whose predictions --predictions holds")
    parser.add_argument("--cpu-predictions", default="", help="gallery: pred_NAME/sample.png of the cpu preset runs, "
                        "for the files that --predictions lacks")
    parser.add_argument("--cpu-predictions-run", default="records/2026-11-28-cpu-gallery",
                        help="gallery: the records folder of the runs whose predictions --cpu-predictions holds")
    parser.add_argument("--gallery-width", type=int, default=200, help="gallery: picture width in pixels")
    parser.add_argument("--files", nargs="*", default=[], choices=FILES, help="gallery: only these model files' "
                        "pictures (default: all; the others' stay as they are)")
    args = parser.parse_args(argv)
    return benchmarks[args.name](args) if run else args


if __name__ == "__main__":
    main()
