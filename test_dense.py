"""retinanet.py and fcos.py against torchvision's retinanet_resnet50_fpn and fcos_resnet50_fpn: the same weights give the
same detections and the same losses; the batched target assignment equals torchvision's per-image assignment; empty
and degenerate targets give finite losses; each model overfits one batch; the command line runs.
CPU, small images, no downloads:  python -m pytest -q test_dense.py
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import data
import fcos
import retinanet

ROOT = os.path.dirname(os.path.abspath(__file__))
MODULES = {"retinanet": retinanet, "fcos": fcos}
TORCHVISION = {"retinanet": torchvision.models.detection.retinanet_resnet50_fpn,
               "fcos": torchvision.models.detection.fcos_resnet50_fpn}
NUM_CLASSES = 6  # != 91, so that the conversion is checked for a custom head
SIZES = dict(min_size=128, max_size=208)
TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--image-size", "64", "--min-size", "64",
        "--max-size", "64", "--fpn-channels", "32", "--num-train", "4", "--num-val", "2", "--batch-size", "2",
        "--workers", "0", "--warmup-iters", "2", "--log-every", "1", "--device", "cpu", "--no-amp"]


def make_images():
    g = torch.Generator().manual_seed(1)
    # three sizes and aspect ratios: landscape, portrait (the max_size limit applies), square
    return [torch.rand(3, 120, 160, generator=g), torch.rand(3, 230, 90, generator=g), torch.rand(3, 150, 150, generator=g)]


def make_targets():
    return [
        {"boxes": torch.tensor([[10.0, 20, 60, 80], [50, 30, 150, 110]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5, 80, 190], [20, 100, 70, 220]]), "labels": torch.tensor([2, 5])},
        {"boxes": torch.tensor([[0.0, 0, 30, 30], [40, 40, 140, 140], [60, 70, 90, 100]]), "labels": torch.tensor([4, 1, 2])},
    ]


def crowded_targets(images, seed=0, n=25):
    """n random boxes per image, 2 px to the whole image, overlapping and nested: every branch of the assignment
    (ignored anchors, low-quality matches, several candidate boxes per point, scale ranges) is taken."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        size = torch.exp(torch.empty(n, 2).uniform_(0.7, 5.5, generator=g)).clamp(max=min(h, w))  # [n, 2] (w, h)
        x1 = torch.rand(n, generator=g) * (w - size[:, 0])
        y1 = torch.rand(n, generator=g) * (h - size[:, 1])
        boxes = torch.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g)})
    return targets


@torch.no_grad()
def spread_scores(tv, images):
    """An untrained model scores every location alike: batch-norm statistics from these images (so that features are
    O(1)) and final head convs rescaled so that class logits are ~N(-1, 2), box outputs ~N(0, 0.3), centerness
    ~N(0, 1): scores spread out without ties and boxes stay sensible."""
    tv.train()
    for module in tv.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
    batch, _ = tv.transform(images)
    features = list(tv.backbone(batch.tensors).values())
    head = tv.head
    for subnet, name, std, mean in [(head.classification_head, "cls_logits", 2.0, -1.0),
                                    (head.regression_head, "bbox_reg", 0.3, 0.0),
                                    (head.regression_head, "bbox_ctrness", 1.0, 0.0)]:
        if not hasattr(subnet, name):
            continue
        conv = getattr(subnet, name)
        conv.bias.zero_()
        out = torch.cat([conv(subnet.conv(f)).transpose(0, 1).flatten(1) for f in features], 1)  # [channels, N]
        conv.weight.mul_(std / out.std())
        conv.bias.copy_(mean - out.mean(1) * std / out.std())
    for module in tv.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads fight (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["retinanet", "fcos"])
def models(request):
    """(name, our module, torchvision model, our model holding the same converted weights), ResNet-50-FPN."""
    name, module = request.param, MODULES[request.param]
    torch.manual_seed(0)
    tv = TORCHVISION[name](weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **SIZES)
    spread_scores(tv, make_images())
    ours = module.Model(module.Config(num_classes=NUM_CLASSES, backbone_weights="none", **SIZES))
    ours.load_state_dict(module.convert_torchvision(tv.state_dict()))
    return name, module, tv, ours


def test_detections_match_torchvision(models):
    name, module, tv, ours = models
    tv.eval(), ours.eval()
    images = make_images()
    with torch.no_grad():
        expected, actual = tv(images), ours(images)
    assert all(len(e["boxes"]) >= 50 for e in expected)  # the comparison is not vacuous
    for e in expected:
        assert e["scores"].sort().values.diff().min() > 0  # no ties, so that the order of the detections is defined
    for e, a in zip(expected, actual):
        assert torch.equal(e["labels"], a["labels"])
        torch.testing.assert_close(a["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["scores"], e["scores"], atol=1e-4, rtol=0)


def test_losses_match_torchvision(models):
    name, module, tv, ours = models
    tv.train(), ours.train()
    images, targets = make_images(), make_targets()
    targets[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # a negative image too
    expected, actual = tv(images, targets), ours(images, targets)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-6, msg=key)
    assert all(value > 0 for value in actual.values())


def grid_sizes(image_size):
    """Feature-map sizes of P3..P7 for a padded image size: stride-2 convs round up."""
    return [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in (8, 16, 32, 64, 128)]


def assign(name, module, anchors, num_anchors_per_level, gt_boxes, gt_valid, cfg):
    if name == "retinanet":
        return module.assign_anchors(anchors, gt_boxes, gt_valid, cfg)
    return module.assign_points(anchors, num_anchors_per_level, gt_boxes, gt_valid, cfg)


def test_batched_assignment_equals_torchvision_per_image(models, monkeypatch):
    """torchvision assigns image by image in Python; ours assigns the padded batch at once: same matched_idxs, and the
    same as ours image by image. Also the same anchors."""
    name, module, tv, ours = models
    images = make_images()
    targets = crowded_targets(images)
    captured = {}

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured.update(anchors=anchors, matched_idxs=matched_idxs)
        return {"loss": torch.zeros(())}

    monkeypatch.setattr(tv.head, "compute_loss", capture)
    tv.train()
    with torch.no_grad():
        tv(images, targets)
    cfg = ours.cfg
    batch, _, resized_targets = module.preprocess(images, targets, cfg)
    anchors, num_anchors_per_level = module.make_anchors(batch.shape[-2:], grid_sizes(batch.shape[-2:]), cfg)
    assert torch.equal(anchors, captured["anchors"][0])
    gt_boxes, _, gt_valid = module.pad_targets(resized_targets)
    matched_idxs = assign(name, module, anchors, num_anchors_per_level, gt_boxes, gt_valid, cfg)  # [B, A]
    for i, (expected, target) in enumerate(zip(captured["matched_idxs"], resized_targets)):
        n = len(target["boxes"])
        alone = assign(name, module, anchors, num_anchors_per_level, gt_boxes[i:i + 1, :n], gt_valid[i:i + 1, :n], cfg)
        assert torch.equal(matched_idxs[i], expected)
        assert torch.equal(alone[0], expected)
        assert (expected >= 0).sum() >= 20  # not vacuous: many positives ...
        assert len(expected[expected >= 0].unique()) >= 10  # ... spread over many boxes
        if name == "retinanet":
            assert (expected == module.BETWEEN_THRESHOLDS).any()


def test_convert_torchvision_accepts_old_checkpoint_keys(models):
    """torchvision's released checkpoints predate Conv2dNormActivation: FPN keys 'inner_blocks.0.weight' and
    RetinaNet head keys 'conv.{2i}.weight'. Both key versions convert to the same state dict."""
    name, module, tv, ours = models
    new = tv.state_dict()
    old = {}
    for key, value in new.items():
        key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        key = re.sub(r"^(head\.\w+_head\.conv)\.(\d+)\.0\.", lambda m: f"{m[1]}.{2 * int(m[2])}.", key)
        old[key] = value
    converted = module.convert_torchvision(old)
    assert converted.keys() == module.convert_torchvision(new).keys() == ours.state_dict().keys()


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_empty_and_degenerate_targets_give_finite_losses(name, one_thread):
    module = MODULES[name]
    torch.manual_seed(0)
    cfg = module.Config(num_classes=NUM_CLASSES, backbone="resnet18", backbone_weights="none", fpn_channels=32,
                        min_size=64, max_size=104)
    model = module.Model(cfg).train()
    images = make_images()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    degenerate = {"boxes": torch.tensor([[30.0, 30, 30, 60], [10, 10, 50, 10]]), "labels": torch.tensor([1, 2])}
    mixed = {"boxes": torch.tensor([[20.0, 20, 90, 100], [40, 40, 40, 40]]), "labels": torch.tensor([3, 4])}
    for targets in ([empty, degenerate, mixed], [empty, empty, empty], [degenerate, degenerate, degenerate]):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        model.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if targets[2] is not mixed:  # nothing to learn but background: no box loss, a positive classification loss
            assert losses["classification"] > 0 and losses["bbox_regression"] == 0
    # degenerate boxes are never assigned: only the valid box of `mixed` has foreground
    gt_boxes, _, gt_valid = module.pad_targets([degenerate, mixed])
    assert gt_valid.tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_overfits_one_batch(name, one_thread):
    """Two images, four shapes: the model, its losses and decoding can fit them (AP@0.5 >= 0.9 on those images)."""
    module = MODULES[name]
    torch.manual_seed(0)
    dataset = data.SyntheticShapes(2, 64, seed=8, max_objects=2)  # four shapes of 7..28 px
    extra = dict(anchor_sizes=(8, 16, 32, 64, 128)) if name == "retinanet" else {}  # anchors for such small shapes
    cfg = module.Config(num_classes=dataset.num_classes, backbone="resnet18", backbone_weights="none", min_size=64,
                        max_size=64, fpn_channels=32, workers=0, amp=False, **extra)
    model = module.Model(cfg)
    images, targets = data.collate_fn([dataset[i] for i in range(2)])
    # Adam rather than the recipe's SGD: the test is about fitting, and Adam needs far fewer steps
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, 201):
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            stats = module.evaluate(model, dataset, cfg, torch.device("cpu"))
            if stats["AP50"] >= 0.9:
                break
    assert stats["AP50"] >= 0.9, stats


def cli(name, *args):
    cmd = [sys.executable, f"{name}.py"] + [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_command_line_train_eval_show_targets(name, tmp_path):
    """A 1-epoch run (2 steps of 2 images) writes its run folder and logs every loss term; --eval reads the checkpoint;
    --show-targets draws the assignment."""
    output = cli(name, "--train", *TINY, "--epochs", "1", "--out", tmp_path / "run")
    terms = ["classification", "bbox_regression"] + (["bbox_ctrness"] if name == "fcos" else [])
    assert all(f" {t} " in output for t in terms) and "AP50" in output
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= set(os.listdir(tmp_path / "run"))
    output = cli(name, "--eval", "--weights", tmp_path / "run" / "last.pt", "--workers", "0")
    assert re.search(r"AP50 \d\.\d{4}", output)
    cli(name, "--show-targets", *TINY, "--num-train", "2", "--out", tmp_path / "targets")
    assert sorted(os.listdir(tmp_path / "targets")) == ["targets_0.png", "targets_1.png"]
