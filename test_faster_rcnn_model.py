"""faster_rcnn.py against torchvision's fasterrcnn_resnet50_fpn: the same weights give the same detections and the same
losses; plus the pieces alone (batched assignment == per-image torchvision Matcher, sampling, empty and degenerate
targets, weight conversion). CPU, small images, no downloads:  python -m pytest -q test_faster_rcnn_model.py
"""
import re

import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import FrozenBatchNorm2d

import faster_rcnn as fr

NUM_CLASSES = 6  # != 91, so that the conversion is checked for a custom head
SIZES = dict(min_size=128, max_size=208)
# every candidate anchor and RoI is used, so that training is deterministic and comparable with torchvision; fewer
# proposals than the default 2000 per image keep the RoI head cheap on a CPU
ALL_SAMPLES = dict(rpn_batch_size_per_image=100000, box_batch_size_per_image=100000,
                   rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=300)


def make_images():
    g = torch.Generator().manual_seed(1)
    # three sizes and aspect ratios: landscape, portrait (the max_size limit applies), square
    return [torch.rand(3, h, w, generator=g) for h, w in ((120, 160), (230, 90), (150, 150))]


def make_targets():
    return [
        {"boxes": torch.tensor([[10.0, 20, 60, 80], [50, 30, 150, 110]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[5.0, 5, 80, 190], [20, 100, 70, 220]]), "labels": torch.tensor([2, 5])},
        {"boxes": torch.tensor([[0.0, 0, 30, 30], [40, 40, 140, 140], [60, 70, 90, 100]]),
         "labels": torch.tensor([4, 1, 2])},
    ]


def torchvision_and_ours(**overrides):
    """A randomly initialised torchvision model and ours holding the same (converted) weights."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **SIZES, **overrides)
    with torch.no_grad():  # untrained, one class takes all: shrink the logits so that class scores spread out
        tv.roi_heads.box_predictor.cls_score.weight.mul_(0.3)
    ours = fr.FasterRCNN(fr.Config(num_classes=NUM_CLASSES, backbone_weights="none", **SIZES, **overrides))
    ours.load_state_dict(fr.convert_torchvision(tv.state_dict()))
    return tv, ours


def test_detections_match_torchvision():
    tv, ours = torchvision_and_ours()
    tv.eval()
    ours.eval()
    images = make_images()
    with torch.no_grad():
        expected, actual = tv(images), ours(images)
    assert all(len(e["boxes"]) >= 10 for e in expected)  # the comparison is not vacuous
    scores = torch.cat([e["scores"] for e in expected]).sort().values
    assert scores.diff().min() > 0  # no ties, so that the order of the detections is well defined
    for e, a in zip(expected, actual):
        assert torch.equal(e["labels"], a["labels"])
        torch.testing.assert_close(a["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["scores"], e["scores"], atol=1e-4, rtol=0)


def test_losses_match_torchvision():
    tv, ours = torchvision_and_ours(**ALL_SAMPLES)
    tv.train()
    ours.train()
    for body in (tv.backbone.body, ours.backbone.body):  # the gradient check below stops at the FPN: CPU time
        body.requires_grad_(False)
    images = make_images()
    targets = make_targets()
    targets[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # a negative image too
    expected, actual = tv(images, targets), ours(images, targets)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-4, rtol=1e-4, msg=key)
    assert all(value > 0 for value in actual.values())
    # and the same gradients (FPN and heads): nothing is detached, or left attached, differently
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    expected_grads = fr.convert_torchvision({k: p.grad for k, p in tv.named_parameters() if p.grad is not None})
    actual_grads = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert expected_grads.keys() == actual_grads.keys()
    for key, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[key], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()), msg=key)


def test_empty_and_degenerate_targets_give_finite_losses():
    torch.manual_seed(0)
    cfg = fr.Config(num_classes=NUM_CLASSES, backbone="resnet18", backbone_weights="none", representation_size=128,
                    **{**SIZES, **ALL_SAMPLES, "rpn_post_nms_top_n_train": 100})
    model = fr.FasterRCNN(cfg)
    model.train()
    images = make_images()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    targets = [
        empty,
        {"boxes": torch.tensor([[10.0, 10, 10, 50], [30, 30, 30, 30], [60, 60, 40, 80]]),  # zero width, point, inverted
         "labels": torch.tensor([1, 2, 3])},
        {"boxes": torch.tensor([[20.0, 20, 20, 90], [40, 40, 140, 140]]), "labels": torch.tensor([4, 1])},  # mixed
    ]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # degenerate boxes are ignored: the same losses as without them (sampling takes every candidate, so it is exact)
    without = [empty, empty, {"boxes": targets[2]["boxes"][1:], "labels": targets[2]["labels"][1:]}]
    for key, value in model(images, without).items():
        torch.testing.assert_close(value, losses[key], msg=key)
    # a batch with no object at all: negatives only
    losses = model(images[:2], [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_rpn_box_reg"] == 0 and losses["loss_box_reg"] == 0 and losses["loss_objectness"] > 0


def random_gt(num_boxes, generator):
    xy = torch.rand(num_boxes, 2, generator=generator) * 150
    wh = torch.rand(num_boxes, 2, generator=generator) * 100 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_batched_assignment_equals_torchvision_per_image():
    cfg = fr.Config()
    g = torch.Generator().manual_seed(0)
    grid_sizes = [(256 // s + (256 % s > 0), 224 // s + (224 % s > 0)) for s in (4, 8, 16, 32, 64)]
    anchors, _ = fr.make_anchors((256, 224), grid_sizes, cfg)  # [A, 4]
    gt_per_image = [random_gt(n, g) for n in (3, 0, 7, 1)]
    gt_per_image[0][1] = torch.tensor([40.0, 40, 40, 90])  # a degenerate box: matched by nothing
    labels_per_image = [torch.randint(1, 5, (len(b),), generator=g) for b in gt_per_image]
    targets = [{"boxes": b, "labels": l} for b, l in zip(gt_per_image, labels_per_image)]
    gt_boxes, gt_labels, gt_valid = fr.pad_targets(targets)  # [B, M, 4]
    proposals = torch.rand(4, 300, 4, generator=g) * 150
    proposals[..., 2:] += proposals[..., :2] + 1  # [B, P, 4]

    rpn_matched = fr.assign_anchors(anchors, gt_boxes, gt_valid, cfg)  # [B, A]
    roi_matched, roi_labels = fr.assign_proposals(proposals, gt_boxes, gt_labels, gt_valid, cfg)  # [B, P]
    rpn_matcher = det_utils.Matcher(cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, allow_low_quality_matches=True)
    roi_matcher = det_utils.Matcher(cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, allow_low_quality_matches=False)
    for i, (boxes, labels) in enumerate(zip(gt_per_image, labels_per_image)):
        # one image at a time through our code gives the same answer as the batch
        single = fr.pad_targets([targets[i]])
        assert torch.equal(fr.assign_anchors(anchors, single[0], single[2], cfg)[0], rpn_matched[i])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.any():  # torchvision special-cases images without boxes: everything is background
            assert (rpn_matched[i] == fr.BELOW_LOW_THRESHOLD).all() and (roi_labels[i] == 0).all()
            continue
        # torchvision's Matcher on the valid boxes of this image; indices map back through `keep`
        valid_idx = torch.where(keep)[0]
        expected = rpn_matcher(torchvision.ops.box_iou(boxes[keep], anchors))
        assert torch.equal(torch.where(expected >= 0, valid_idx[expected.clamp(min=0)], expected), rpn_matched[i])
        expected = roi_matcher(torchvision.ops.box_iou(boxes[keep], proposals[i]))
        assert torch.equal(torch.where(expected >= 0, valid_idx[expected.clamp(min=0)], expected), roi_matched[i])
        expected_labels = torch.where(expected >= 0, labels[keep][expected.clamp(min=0)], 0)
        assert torch.equal(expected_labels, roi_labels[i])
    assert (rpn_matched >= 0).sum() > 0 and (rpn_matched == fr.BETWEEN_THRESHOLDS).sum() > 0


def test_balanced_sampling():
    torch.manual_seed(0)
    labels = torch.full((3, 1000), -1)
    labels[0, :10], labels[0, 10:500] = 1, 0  # few positives: all taken, negatives fill up
    labels[1, :300], labels[1, 300:320] = 2, 0  # many positives: capped at half, few negatives
    labels[2, :] = 0  # no positives
    pos, neg = fr.sample_balanced(labels, batch_size_per_image=256, positive_fraction=0.5)
    assert pos.sum(1).tolist() == [10, 128, 0] and neg.sum(1).tolist() == [246, 20, 256]
    assert (labels[pos] > 0).all() and (labels[neg] == 0).all()
    # large enough a batch takes every candidate: what the parity test relies on
    pos, neg = fr.sample_balanced(labels, batch_size_per_image=100000, positive_fraction=0.5)
    assert torch.equal(pos, labels > 0) and torch.equal(neg, labels == 0)
    # the choice is random, not the first candidates
    pos_a, _ = fr.sample_balanced(labels, 256, 0.5)
    pos_b, _ = fr.sample_balanced(labels, 256, 0.5)
    assert not torch.equal(pos_a, pos_b)


def test_convert_torchvision_round_trip(tmp_path):
    # torchvision built the way its pretrained detector is (frozen BN, no num_batches_tracked in the state dict)
    backbone = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    tv = torchvision.models.detection.FasterRCNN(backbone, num_classes=NUM_CLASSES)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pt")
    ours = fr.FasterRCNN(fr.Config(num_classes=NUM_CLASSES, backbone_weights=str(tmp_path / "resnet50.pt")))
    assert isinstance(ours.backbone.body.bn1, FrozenBatchNorm2d)
    body = ours.backbone.body  # pretrained: stem and layer1 frozen, as torchvision's trainable_backbone_layers=3
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    state = tv.state_dict()
    converted = fr.convert_torchvision(state)
    ours.load_state_dict(converted)  # strict: every key is mapped, none is left over
    assert len(converted) == len(state)
    ours_state = ours.state_dict()
    for key, value in converted.items():
        assert torch.equal(ours_state[key], value), key
    # the old key layout of torchvision's published COCO checkpoint (FPN and RPN head before their version 2)
    # e.g. backbone.fpn.inner_blocks.0.weight for .0.0.weight, rpn.head.conv.weight for rpn.head.conv.0.0.weight
    old = {re.sub(r"(_blocks\.\d+|head\.conv)(\.0)+\.(weight|bias)$", r"\1.\3", k): v for k, v in state.items()}
    assert old.keys() != state.keys() and fr.convert_torchvision(old).keys() == converted.keys()
    # and a model from scratch (plain BN) takes the same weights
    fr.FasterRCNN(fr.Config(num_classes=NUM_CLASSES, backbone_weights="none")).load_state_dict(converted)


def test_assignment_for_display():
    cfg = fr.Config(num_classes=NUM_CLASSES, backbone="resnet18", backbone_weights="none", **SIZES)
    model = fr.FasterRCNN(cfg).eval()
    images, targets = make_images(), make_targets()
    shown = fr.assignment_for_display(model, images, targets)
    for target, s in zip(targets, shown):
        assert len(s["anchors"]) > 0 and set(s["matched_idxs"].tolist()) == set(range(len(target["boxes"])))
        # positive anchors overlap the box they learn, in the input image's coordinates
        iou = torchvision.ops.box_iou(s["anchors"], target["boxes"])[torch.arange(len(s["anchors"])), s["matched_idxs"]]
        assert (iou > 0.2).all()
        # sampled RoIs: foreground ones overlap a box of their class by IoU >= 0.5 (the ground truth is among them)
        foreground = s["proposal_labels"] > 0
        assert 0 < len(s["proposals"]) <= cfg.box_batch_size_per_image and foreground.sum() >= len(target["boxes"])
        iou = torchvision.ops.box_iou(s["proposals"][foreground], target["boxes"])  # [F, M]
        same_class = s["proposal_labels"][foreground, None] == target["labels"][None]
        assert ((iou >= 0.5 - 1e-4) & same_class).any(dim=1).all()
