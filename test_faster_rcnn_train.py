"""Training, checkpointing and the command line of faster_rcnn.py, on CPU in a few minutes at most.

Every run uses a tiny configuration (ResNet-18 from scratch, 64-px synthetic images, 32 FPN channels) through the real
command line, `python faster_rcnn.py ...`, in a subprocess, except where a test must reach inside (overfitting, the NaN
guard), which calls the same functions in-process.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import faster_rcnn

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--image-size", "64", "--min-size", "64",
        "--max-size", "64", "--fpn-channels", "32", "--representation-size", "64", "--num-train", "8", "--num-val", "4",
        "--batch-size", "4", "--workers", "0", "--rpn-pre-nms-top-n-train", "200", "--rpn-post-nms-top-n-train", "100",
        "--rpn-pre-nms-top-n-test", "100", "--rpn-post-nms-top-n-test", "50", "--box-batch-size-per-image", "32",
        "--warmup-iters", "2", "--log-every", "1", "--device", "cpu", "--no-amp"]
COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in-process too: on 2 cores, two threads per process slow down 2-7x as soon as anything else
    runs (the subprocesses get OMP_NUM_THREADS=1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args, env=None, cmd=None):
    """Run faster_rcnn.py with args; fail with its output if it fails. Returns stdout + stderr."""
    cmd = cmd or [sys.executable, "faster_rcnn.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # 2 cores: threads would only fight each other
    result = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd + list(map(str, args)))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A 1-epoch run (2 steps of 4 images): the run folder."""
    out = tmp_path_factory.mktemp("one_epoch")
    cli("--train", *TINY, "--epochs", "1", "--out", out)
    return out


def test_train_writes_run_folder(one_epoch):
    assert sorted(p for p in os.listdir(one_epoch) if not p.startswith(".")) == [
        "best.pt", "config.json", "last.pt", "metrics.jsonl"]
    config = json.load(open(one_epoch / "config.json"))
    assert config["backbone"] == "resnet18" and config["min_size"] == 64 and config["num_classes"] == 7
    assert config["anchor_sizes"] == list(faster_rcnn.SYNTHETIC_PRESET["anchor_sizes"])  # preset: not given
    records = [json.loads(line) for line in open(one_epoch / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == ["1/2", "2/2"]
    for r in steps:
        assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr", "img_s"} <= set(r)
        assert math.isclose(r["loss"], sum(r[k] for k in r if k.startswith("loss_")), rel_tol=1e-5)
    evals = [r for r in records if "AP" in r]
    assert len(evals) == 1 and set(COCO_NAMES) <= set(evals[0])
    checkpoint = torch.load(one_epoch / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["class_names"][1:] == data.SHAPE_NAMES
    assert not any(p.endswith(".tmp") for p in os.listdir(one_epoch))


def test_eval_predict_show_targets(one_epoch, tmp_path):
    output = cli("--eval", "--weights", one_epoch / "last.pt", "--workers", "0")
    numbers = dict(line.split() for line in output.splitlines() if line.split()[:1] and line.split()[0] in COCO_NAMES)
    assert set(numbers) == set(COCO_NAMES)
    # the same numbers as the evaluation logged after the epoch: same weights, same val split
    logged = [json.loads(line) for line in open(one_epoch / "metrics.jsonl") if '"AP"' in line][-1]
    assert all(abs(float(numbers[k]) - logged[k]) < 1e-4 for k in COCO_NAMES)

    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.txt").write_text("not an image: skipped")
    dataset = data.SyntheticShapes(2, 64, seed=7)
    for i in range(2):
        faster_rcnn.torchvision.io.write_png((dataset[i][0] * 255).to(torch.uint8), str(images / f"img{i}.png"))
    cli("--predict", images, "--weights", one_epoch / "last.pt", "--out", tmp_path / "pred",
        "--predict-score-thresh", "0")
    assert sorted(os.listdir(tmp_path / "pred")) == ["img0.png", "img1.png"]
    drawn = faster_rcnn.torchvision.io.read_image(str(tmp_path / "pred" / "img0.png"))
    assert drawn.shape == (3, 64, 64) and not torch.equal(drawn, (dataset[0][0] * 255).to(torch.uint8))

    cli("--show-targets", "--weights", one_epoch / "last.pt", "--num-train", "3", "--out", tmp_path / "targets")
    assert sorted(os.listdir(tmp_path / "targets")) == ["targets_0.png", "targets_1.png", "targets_2.png"]


def test_torchvision_state_dict_file(tmp_path):
    """--weights FILE with a torchvision state dict: converted, loaded strictly, COCO class names on the pictures."""
    import torchvision
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    image = data.SyntheticShapes(1, 64, seed=0)[0][0]
    torchvision.io.write_png((image * 255).to(torch.uint8), str(tmp_path / "img.png"))
    output = cli("--predict", tmp_path / "img.png", "--weights", tmp_path / "tv.pth", "--out", tmp_path / "pred",
                 "--min-size", "64", "--max-size", "64", "--predict-score-thresh", "0", "--device", "cpu")
    assert os.path.isfile(tmp_path / "pred" / "img.png") and "detections" in output


def test_offline_imagenet_weights_warn_and_train_from_scratch(monkeypatch):
    """No internet: the ImageNet download fails inside torchvision; the run warns and goes on from random weights."""
    import urllib.error
    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    cfg = faster_rcnn.Config(backbone="resnet18", backbone_weights="imagenet", fpn_channels=32)
    with pytest.warns(UserWarning, match="could not download .*ImageNet.*random weights"):
        model = faster_rcnn.build_model(cfg)
    assert cfg.backbone_weights == "none" and isinstance(model, faster_rcnn.FasterRCNN)


def test_bench_runs():
    output = cli("--bench", *TINY, "--batch-size", "2")
    assert "train:" in output and "inference:" in output and "images/s" in output


def test_resume_continues_exactly(one_epoch, tmp_path):
    """2 epochs in one go == 1 epoch, then --resume for the second: identical weights and optimiser state."""
    cli("--train", *TINY, "--epochs", "2", "--out", tmp_path / "straight")
    cli("--train", "--resume", one_epoch / "last.pt", "--epochs", "2", "--out", tmp_path / "resumed")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, resumed["optimizer"]["state"].values()))
    assert straight["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == 4
    # the resumed run logs only its second epoch
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "resumed" / "metrics.jsonl")] == [1, 1, 1]


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes: gloo, a DistributedSampler (8 images / 2 ranks / 2 per step = 2 steps)."""
    output = cli("--train", *TINY, "--batch-size", "2", "--epochs", "1", "--out", tmp_path,
                 cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "faster_rcnn.py"])
    assert "cpu x 2" in output and "batch 2 x 2" in output
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == ["1/2", "2/2"]  # only rank 0 logs
    assert len([r for r in records if "AP" in r]) == 1
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper


def test_overfits_one_batch():
    """Two images, four shapes: the model, its losses and decoding can fit them (AP@0.5 >= 0.9 on those images)."""
    torch.manual_seed(0)
    dataset = data.SyntheticShapes(2, 64, seed=3, max_objects=2)
    cfg = faster_rcnn.Config(num_classes=dataset.num_classes, backbone="resnet18", backbone_weights="none",
                             min_size=64, max_size=64, fpn_channels=32, representation_size=64,
                             anchor_sizes=(16, 32, 64, 128, 256), rpn_post_nms_top_n_train=100,
                             box_batch_size_per_image=32, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                             workers=0, amp=False)
    model = faster_rcnn.FasterRCNN(cfg)
    images, targets = data.collate_fn([dataset[i] for i in range(2)])
    # Adam rather than the recipe's SGD: the test is about fitting, and Adam needs ~3x fewer steps here
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1, 151):
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 50 and step % 25 == 0:
            stats = faster_rcnn.evaluate(model, dataset, cfg, torch.device("cpu"))
            if stats["AP50"] >= 0.9:
                break
    assert stats["AP50"] >= 0.9, stats


def test_non_finite_loss_stops_run(tmp_path, monkeypatch):
    """A NaN loss in the second epoch stops the run naming the step and every loss term; last.pt (epoch 0) stays."""
    roi_loss, calls = faster_rcnn.roi_loss, []

    def nan_in_second_epoch(*args):
        calls.append(1)
        losses = roi_loss(*args)
        return {**losses, "loss_box_reg": losses["loss_box_reg"] * float("nan")} if len(calls) > 2 else losses

    monkeypatch.setattr(faster_rcnn, "roi_loss", nan_in_second_epoch)
    with pytest.raises(SystemExit) as error:
        faster_rcnn.main(["--train", *TINY, "--epochs", "2", "--out", str(tmp_path)])
    message = str(error.value)
    assert "epoch 1 step 0" in message and "loss_box_reg nan" in message
    assert all(f"{k} " in message for k in ("loss_classifier", "loss_objectness", "loss_rpn_box_reg"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert sorted(p for p in os.listdir(tmp_path)) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]


def test_command_line_fields():
    """Every Config field is a flag; tuples, bools and the synthetic preset behave."""
    args, given = faster_rcnn.parse_args(["--train", "--anchor-sizes", "8", "16", "--no-amp", "--lr", "0.01",
                                          "--lr-steps"])
    assert given == {"anchor_sizes": (8, 16), "amp": False, "lr": 0.01, "lr_steps": ()}
    cfg = faster_rcnn.make_config(given)
    assert cfg.anchor_sizes == (8, 16) and cfg.min_size == faster_rcnn.SYNTHETIC_PRESET["min_size"]
    assert faster_rcnn.make_config({"data": "coco"}).min_size == faster_rcnn.Config.min_size  # no preset
    for field in faster_rcnn.dataclasses.fields(faster_rcnn.Config):
        assert faster_rcnn.parse_args(["--bench", "--" + field.name.replace("_", "-")] +
                                      ([] if isinstance(field.default, (bool, tuple)) else [str(field.default) or "x"])
                                      )[1].keys() == {field.name}
