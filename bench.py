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
    python bench.py selective_search [--data-root ../shared/data/bccd --split test --mode fast]
        data.selective_search vs OpenCV-contrib's fast mode (when cv2.ximgproc is installed): recall of the ground
        truth at IoU 0.5 and 0.7 with at most 2000 boxes per image, boxes per image, seconds per image on one thread

Each benchmark is a function bench_NAME(args) registered in main()'s table.
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import os
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
    dataset = data.VocDetection(args.data_root, args.split)
    num_images = min(args.num_images or len(dataset), len(dataset))

    def opencv(image):  # BGR uint8, as cv2.imread gives it
        bgr = (image.flip(0) * 255).round().byte().permute(1, 2, 0).numpy().copy()
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        search.switchToSelectiveSearchFast()
        rects = torch.tensor(search.process(), dtype=torch.float32).reshape(-1, 4)
        return torch.cat([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1)  # x, y, w, h -> x1, y1, x2, y2

    methods = {f"data.selective_search ({args.mode})": lambda image: data.selective_search(image, args.mode)}
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
    speed-ups; plus the backbone alone (ResNet-50-FPN, SSD's VGG16 and extras: forward, and forward + backward) as the
    floor no detector can beat. Both models are built without pretrained weights (offline), so both use ordinary batch
    norm with every layer trained. SSD resizes every image to 300x300: it runs once, without the size settings."""
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

    def measure(fn):
        """Median seconds per call and peak CUDA memory (GiB) of fn()."""
        fn()  # warm-up: cuDNN autotuning, allocator growth
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            tic = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - tic)
        return float(np.median(times)), (torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"))

    fields = module.Config.__dataclass_fields__
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
            t_ours, m_ours = measure(make(ours, batch))
            torch.manual_seed(0)
            t_tv, m_tv = measure(make(tv, batch))
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
        t_bt, m_bt = measure(backbone_train)
        t_bi, m_bi = measure(backbone_infer)
        print(f"{'backbone fwd+bwd':<22} {t_bt * 1000:9.1f} {'':>15} {'':>8} {gib(m_bt):>9}   (batch "
              f"{args.train_batch}, padded {tuple(batch_tensor.shape[-2:])})")
        print(f"{'backbone forward':<22} {t_bi * 1000:9.1f} {'':>15} {'':>8} {gib(m_bi):>9}")
        del tv, ours, backbone_train, backbone_infer


def bench_yolo(args):
    """yolo.py against ultralytics/yolov5 v7.0 (when --yolov5 names a work tree of tag v7.0; else yolo.py alone): the
    same weights (v7.0's initialisation, batch-norm statistics of the images, converted), the same square synthetic
    images at --yolo-size (letterbox: nothing to do), CPU fp32 or CUDA bf16 autocast. An untrained head scores every box
    below conf 0.001, so inference times the network and the decoding, not NMS (whose results the tests compare; with
    spread random scores 30,000 candidates per image make NMS take seconds in both). Train step: forward, loss,
    backward, SGD step at batch --train-batch; inference: the eval model and NMS as val.py (conf 0.001, IoU 0.6,
    multi-label, 300 per image) at batch 1 and 32. Ours and v7.0's steps alternate, so that a busy machine slows both
    alike; medians of --steps. On a CPU also the process time (CPU seconds of all threads), which other jobs on the
    machine inflate far less."""
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
                        yv5.non_max_suppression(v5(images[:batch])[0].float(), 0.001, 0.6, multi_label=True,
                                                max_det=300)
        return step

    rows = [(f"train step, batch {args.train_batch}", train_step, args.train_batch),
            ("inference, batch 1", infer_step, 1), ("inference, batch 32", infer_step, 32)]
    print(f"{'':<22} {'ours ms':>9} {'ours img/s':>11}" + (f" {'v7.0 ms':>9} {'speed-up':>8}" if v5 else "")
          + ("" if cuda else f" {'ours cpu-ms':>11}" + (f" {'v7.0 cpu-ms':>11} {'cpu speed-up':>12}" if v5 else "")))
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
        print(f"{label:<22} {wall[0] * 1000:9.1f} {batch / wall[0]:11.1f}"
              + (f" {wall[1] * 1000:9.1f} {wall[1] / wall[0]:8.2f}" if v5 is not None else "")
              + ("" if cuda else f" {cpu[0] * 1000:11.1f}" + (f" {cpu[1] * 1000:11.1f} {cpu[1] / cpu[0]:12.2f}"
                                                             if v5 is not None else "")), flush=True)


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


def main():
    benchmarks = {"coco_eval": bench_coco_eval, "selective_search": bench_selective_search, "yolo": bench_yolo,
                  "detr": bench_detr, "fast_rcnn": bench_fast_rcnn,
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
    args = parser.parse_args()
    benchmarks[args.name](args)


if __name__ == "__main__":
    main()
