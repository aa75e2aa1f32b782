"""Tests of data.py: the COCO and VOC loaders on the bundled BCCD subset (assets/bccd), their errors and warnings on
broken files written to tmp_path, image modes, the synthetic dataset, transforms and loaders.

    python -m pytest -q test_data.py
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data

BCCD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bccd")


def coco(split):
    return data.CocoDetection(os.path.join(BCCD, "JPEGImages"), os.path.join(BCCD, "annotations",
                                                                              f"instances_{split}.json"))


def gt_by_image(gt):
    """COCO gt dict -> {image_id: (boxes xyxy [N, 4], category ids [N])}."""
    out = {img["id"]: ([], []) for img in gt["images"]}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        out[ann["image_id"]][0].append([x, y, x + w, y + h])
        out[ann["image_id"]][1].append(ann["category_id"])
    return {k: (torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.tensor(c, dtype=torch.int64))
            for k, (b, c) in out.items()}


def check_dataset(ds):
    """Contract checks on every item, and coco_gt() equal to the targets."""
    gt = gt_by_image(ds.coco_gt())
    assert len(gt) == len(ds)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and len(boxes) == len(labels)
        H, W = image.shape[1:]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert ((labels >= 1) & (labels < ds.num_classes)).all()
        assert len(target["iscrowd"]) == len(labels)
        gt_boxes, gt_labels = gt[target["image_id"]]
        torch.testing.assert_close(gt_boxes, boxes)
        assert torch.equal(gt_labels, labels)


# --- Bundled BCCD subset: both layouts ---

def test_coco_bccd():
    with pytest.warns(UserWarning, match=r"instances_train.json: dropped 1 degenerate boxes") as record:
        ds = coco("train")
    assert len(record) == 1
    assert len(ds) == 4 and ds.class_names == ("__background__", "RBC", "WBC", "Platelets") and ds.num_classes == 4
    assert ds.cat_ids == [1, 2, 3]
    check_dataset(ds)
    # 39 annotations in the json, one of them the 1x1 box of BloodImage_00343.
    assert sum(len(ds[i][1]["boxes"]) for i in range(len(ds))) == 38


def test_coco_labels_as_category_ids(tmp_path):
    # contiguous_labels=False: label = category id, the label space of torchvision's 91-class COCO weights.
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}],
                               [{"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
                                {"image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]}])
    ds = data.CocoDetection(image_dir, ann, contiguous_labels=False)
    assert ds.num_classes == 8 and ds.class_names[1] == "a" and ds.class_names[7] == "b" and ds.class_names[3] == "N/A"
    assert ds[0][1]["labels"].tolist() == [7, 1]
    gt = ds.coco_gt()
    assert gt["categories"] == [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]
    assert [a["category_id"] for a in gt["annotations"]] == [7, 1]
    ds = data.CocoDetection(image_dir, ann)
    assert ds.num_classes == 3 and ds[0][1]["labels"].tolist() == [2, 1] and ds.cat_ids == [1, 7]


def test_voc_bccd():
    with pytest.warns(UserWarning, match=r"train.txt: dropped 1 degenerate boxes") as record:
        ds = data.VocDetection(BCCD, "train")
    assert len(record) == 1
    assert len(ds) == 4 and ds.class_names == ("__background__", "Platelets", "RBC", "WBC")  # sorted: not VOC names
    check_dataset(ds)
    assert all(len(ds[i][1]["difficult"]) == len(ds[i][1]["labels"]) for i in range(len(ds)))


@pytest.mark.filterwarnings("ignore:.*degenerate")
@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_and_coco_layouts_agree(split):
    # BCCD's json was converted with the same 1-based-inclusive -> continuous rule the VOC loader applies
    # (x = xmin - 1, w = xmax - xmin + 1), so the boxes agree exactly, not just to within a pixel.
    c, v = coco(split), data.VocDetection(BCCD, split)
    by_name = {img["file_name"]: i for i, img in enumerate(c.images)}
    assert sorted(by_name) == sorted(f"{i}.jpg" for i in v.ids)
    for j, stem in enumerate(v.ids):
        (ci, ct), (vi, vt) = c[by_name[f"{stem}.jpg"]], v[j]
        assert torch.equal(ci, vi)
        torch.testing.assert_close(ct["boxes"], vt["boxes"])
        assert [c.class_names[k] for k in ct["labels"]] == [v.class_names[k] for k in vt["labels"]]


def test_voc_xml_coordinates_are_converted(tmp_path):
    # A VOC box xmin=1..xmax=10 covers pixel columns 0..9, i.e. continuous [0, 10].
    root = make_voc(tmp_path, {"a": [("dog", 1, 2, 10, 20, 1)]})
    ds = data.VocDetection(root, "train")
    assert ds.class_names == ("__background__",) + data.VOC_CLASSES  # all names are VOC names: the 20 classes
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 1.0, 10.0, 20.0]]
    assert target["labels"].tolist() == [data.VOC_CLASSES.index("dog") + 1]
    assert target["difficult"].tolist() == [1]
    ds = data.VocDetection(root, "train", class_names=["cat", "dog"])
    assert ds.class_names == ("__background__", "cat", "dog") and ds[0][1]["labels"].tolist() == [2]


# --- Broken input: errors that name the file and the field; noise: one counted warning ---

def write_image(path, size=(32, 24), mode="RGB"):
    Image.new(mode, size, 128).save(path)


def make_coco(tmp_path, images, annotations, categories=((1, "a"), (7, "b"))):
    """Write a COCO json (and the images it names, 32x24) into tmp_path; returns (image_dir, ann_file)."""
    for img in images:
        if not img.get("missing"):
            write_image(tmp_path / img["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": img["id"], "file_name": img["file_name"], "width": 32, "height": 24} for img in images],
        "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
        "categories": [{"id": i, "name": n} for i, n in categories]}))
    return str(tmp_path), str(ann_file)


def make_voc(tmp_path, objects_per_image, split="train", size=(32, 24)):
    """Write a VOC tree: {stem: [(name, xmin, ymin, xmax, ymax, difficult), ...]}; returns the root."""
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, objects in objects_per_image.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", size)
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                       f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for n, x1, y1, x2, y2, d in objects)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in objects_per_image))
    return str(root)


def test_coco_missing_image(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 5, "file_name": "gone.jpg", "missing": True}], [])
    with pytest.raises(FileNotFoundError, match=r"instances.json: image id 5: 'file_name' 'gone.jpg' not found"):
        data.CocoDetection(image_dir, ann)


@pytest.mark.filterwarnings("ignore:.*without boxes")
def test_unreadable_image(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}], [])
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg at all")
    ds = data.CocoDetection(image_dir, ann)
    with pytest.raises(ValueError, match=r"x.jpg: cannot read image"):
        ds[0]


def test_corrupt_json(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances.json: corrupt json"):
        data.CocoDetection(str(tmp_path), str(ann))
    ann.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=r"instances.json: field 'images' is missing"):
        data.CocoDetection(str(tmp_path), str(ann))


def test_coco_unknown_image_id(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}],
                               [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                                {"image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(ValueError, match=r"instances.json: annotation 2: 'image_id' 999 is not in 'images'"):
        data.CocoDetection(image_dir, ann)


def test_coco_unknown_category_id(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}],
                               [{"image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(ValueError, match=r"instances.json: annotation 1: 'category_id' 42 is not in 'categories'"):
        data.CocoDetection(image_dir, ann)


def test_coco_bad_bbox(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}],
                               [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5]}])
    with pytest.raises(ValueError, match=r"instances.json: annotation 1: 'bbox' must be 4 finite numbers"):
        data.CocoDetection(image_dir, ann)


def test_voc_missing_xml(tmp_path):
    root = make_voc(tmp_path, {"a": [("dog", 1, 1, 5, 5, 0)]})
    os.remove(os.path.join(root, "Annotations", "a.xml"))
    with pytest.raises(FileNotFoundError, match=r"Annotations/a.xml: annotation file not found"):
        data.VocDetection(root, "train")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test.txt: split file not found"):
        data.VocDetection(root, "test")


def test_voc_broken_xml_and_missing_image(tmp_path):
    root = make_voc(tmp_path, {"a": [("dog", 1, 1, 5, 5, 0)]})
    xml = os.path.join(root, "Annotations", "a.xml")
    text = open(xml).read()
    open(xml, "w").write(text.replace("<ymax>5</ymax>", ""))
    with pytest.raises(ValueError, match=r"a.xml: object 0 \(dog\) has no 'bndbox/ymax'"):
        data.VocDetection(root, "train")
    open(xml, "w").write(text[:-5])
    with pytest.raises(ValueError, match=r"a.xml: corrupt xml"):
        data.VocDetection(root, "train")
    open(xml, "w").write(text)
    os.remove(os.path.join(root, "JPEGImages", "a.jpg"))
    with pytest.raises(FileNotFoundError, match=r"a.xml: image .*a.jpg not found"):
        data.VocDetection(root, "train")


def test_noise_one_counted_warning(tmp_path):
    image_dir, ann = make_coco(
        tmp_path, [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
        [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10]},  # fine
         {"image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 4]},  # zero width: dropped
         {"image_id": 1, "category_id": 7, "bbox": [5, 5, 1, 1]},  # 1x1 click: dropped
         {"image_id": 1, "category_id": 1, "bbox": [-4, 2, 10, 10]},  # left of the image: clipped
         {"image_id": 1, "category_id": 7, "bbox": [20, 20, 30, 30]},  # beyond the right and bottom: clipped
         {"image_id": 1, "category_id": 1, "bbox": [40, 2, 10, 10]}])  # wholly outside: degenerate once clipped
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = data.CocoDetection(image_dir, ann)
    assert len(record) == 1
    assert str(record[0].message) == (f"{ann}: dropped 3 degenerate boxes (width or height <= 1 px), clipped 2 "
                                      f"boxes to the image, kept 1 of 2 images without boxes as negatives")
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2, 3, 12, 13], [0, 2, 6, 12], [20, 20, 32, 24]]
    assert target["labels"].tolist() == [1, 1, 2]  # category 7 -> label 2
    assert len(ds[1][1]["boxes"]) == 0 and ds[1][1]["boxes"].shape == (0, 4)
    assert ds.coco_gt()["annotations"][1]["bbox"] == [0.0, 2.0, 6.0, 10.0]  # the clipped box, as in the target
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading items does not warn again
        ds[0], ds[1]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    if mode == "I;16":
        values = np.array([[0, 32768, 65535] * 2] * 4, dtype=np.uint16)  # [4, 6]
        im = Image.fromarray(values)
        im.save(tmp_path / "x.png")
        assert Image.open(tmp_path / "x.png").mode in ("I;16", "I")
        image = data.load_image(tmp_path / "x.png")
        assert image.shape == (3, 4, 6)
        torch.testing.assert_close(image[1], torch.from_numpy(values / 65535.0).float())  # not truncated to 8 bits
        return
    im = Image.fromarray(rgb).convert(mode)
    im.save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg")
    image = data.load_image(tmp_path / ("x.png" if mode != "CMYK" else "x.jpg"))
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    if mode == "CMYK":
        torch.testing.assert_close(image, expected, atol=0.1, rtol=0)  # JPEG is lossy
    else:
        torch.testing.assert_close(image, expected)
    if mode == "RGBA":
        torch.testing.assert_close(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


@pytest.mark.filterwarnings("ignore:.*without boxes")
def test_image_size_mismatch_is_an_error(tmp_path):
    image_dir, ann = make_coco(tmp_path, [{"id": 1, "file_name": "x.jpg"}], [])
    write_image(tmp_path / "x.jpg", size=(20, 20))
    with pytest.raises(ValueError, match=r"x.jpg: image is 20x20 but .*instances.json gives image id 1 'width' 32"):
        data.CocoDetection(image_dir, ann)[0]


# --- Synthetic shapes ---

def test_synthetic_deterministic():
    a, b = data.SyntheticShapes(20, 96, seed=3), data.SyntheticShapes(20, 96, seed=3)
    for i in [7, 2, 7]:  # any order, any instance
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    c = data.SyntheticShapes(20, 96, seed=4)
    assert not torch.equal(a[7][0], c[7][0])
    assert not torch.equal(a[7][0], a[8][0])


def test_synthetic_boxes_valid_and_honest():
    ds = data.SyntheticShapes(200, (96, 128), seed=0)
    counts, empty = np.zeros(ds.num_classes, dtype=int), 0
    for i in range(len(ds)):
        shapes, boxes, labels = ds.layout(i)
        empty += len(labels) == 0
        np.add.at(counts, labels, 1)
        assert ((labels >= 1) & (labels < ds.num_classes)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2).all()
        image = ds.render(i, shapes)
        owner = np.full((96, 128), -1)
        for k, ((label, (y0, y1, x0, x1), visible), box) in enumerate(zip(shapes, boxes)):
            region = owner[y0:y1, x0:x1]
            assert (region[visible] == -1).all()  # visible parts never overlap
            region[visible] = k
            # The box is the tight box of the visible pixels ...
            ys, xs = np.nonzero(visible)
            assert box.tolist() == [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
            # ... and those pixels really show one flat colour plus noise (sigma <= 0.08), nothing painted over them.
            if visible.sum() >= 50:
                assert image[:, y0:y1, x0:x1][:, visible].std(axis=1).max() < 0.1
    assert 0 < empty < 60  # some images are empty
    assert (counts[1:] > 40).all()  # every class appears


def test_synthetic_colour_does_not_give_the_class_away():
    ds = data.SyntheticShapes(300, 64, seed=1)
    colours = {k: [] for k in range(1, ds.num_classes)}
    for i in range(len(ds)):
        shapes, _, labels = ds.layout(i)
        image = ds.render(i, shapes)
        for label, (y0, y1, x0, x1), visible in shapes:
            colours[label].append(image[:, y0:y1, x0:x1][:, visible].mean(axis=1))
    means = np.array([np.mean(c, axis=0) for c in colours.values()])  # [K, 3]
    assert np.abs(means - 0.5).max() < 0.1, means


def test_synthetic_coco_gt_without_rendering(monkeypatch):
    ds = data.SyntheticShapes(30, 64, seed=2)
    targets = [ds[i][1] for i in range(len(ds))]
    monkeypatch.setattr(ds, "render", lambda *a: pytest.fail("coco_gt rendered pixels"))
    gt = gt_by_image(ds.coco_gt())
    for t in targets:
        torch.testing.assert_close(gt[t["image_id"]][0], t["boxes"])
        assert torch.equal(gt[t["image_id"]][1], t["labels"])
    monkeypatch.undo()
    check_dataset(ds)


# --- Transforms ---

def test_hflip_twice_is_identity_and_covers_same_pixels():
    image = torch.zeros(3, 20, 30)
    image[:, 4:9, 3:11] = 1.0  # the object occupies columns 3..10, rows 4..8
    target = {"boxes": torch.tensor([[3.0, 4.0, 11.0, 9.0]]), "labels": torch.tensor([1])}
    flipped, ft = data.hflip(image, target)
    x1, y1, x2, y2 = ft["boxes"][0].int().tolist()
    assert (x1, y1, x2, y2) == (19, 4, 27, 9)
    assert flipped[:, y1:y2, x1:x2].sum() == image.sum() == flipped.sum()
    back, bt = data.hflip(flipped, ft)
    assert torch.equal(back, image) and torch.equal(bt["boxes"], target["boxes"])
    assert torch.equal(target["boxes"], torch.tensor([[3.0, 4.0, 11.0, 9.0]]))  # input target not modified
    always = data.RandomHorizontalFlip(p=1.0)
    assert torch.equal(always(image, target)[0], flipped)
    assert data.RandomHorizontalFlip(p=0.0)(image, target)[0] is image


def test_resize_scales_boxes():
    image = torch.zeros(3, 40, 60)
    image[:, 10:20, 6:30] = 1.0
    target = {"boxes": torch.tensor([[6.0, 10.0, 30.0, 20.0]]), "labels": torch.tensor([1])}
    resized, rt = data.Resize(size=(20, 120))(image, target)
    assert resized.shape == (3, 20, 120)
    torch.testing.assert_close(rt["boxes"], torch.tensor([[12.0, 5.0, 60.0, 10.0]]))
    ys, xs = torch.nonzero(resized[0] >= 0.5, as_tuple=True)  # the object's pixels, scaled the same way
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == rt["boxes"][0].tolist()
    # Shorter side to min_size unless the longer side would exceed max_size (torchvision's rule).
    assert data.Resize(min_size=20, max_size=100)(image, target)[0].shape == (3, 20, 30)
    small, st = data.Resize(min_size=20, max_size=24)(image, target)
    assert small.shape == (3, 16, 24)
    torch.testing.assert_close(st["boxes"], target["boxes"] * 0.4)
    composed = data.Compose([data.Resize(size=(20, 30)), data.RandomHorizontalFlip(1.0)])
    torch.testing.assert_close(composed(image, target)[1]["boxes"], torch.tensor([[15.0, 5.0, 27.0, 10.0]]))


# --- Loaders ---

def test_make_loader_and_collate():
    ds = data.SyntheticShapes(10, 48, seed=0)
    loader = data.make_loader(ds, batch_size=4, train=False, workers=0)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    images, targets = batches[0]
    assert isinstance(images, list) and all(im.shape == (3, 48, 48) for im in images)
    assert [t["image_id"] for t in targets] == [0, 1, 2, 3]
    assert all(t["boxes"].shape[1] == 4 for t in targets)
    order = lambda loader: [t["image_id"] for _, ts in loader for t in ts]
    shuffled = order(data.make_loader(ds, 4, train=True, workers=0, seed=1))
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    assert shuffled == order(data.make_loader(ds, 4, train=True, workers=0, seed=1))  # reproducible
    with_workers = data.make_loader(ds, 4, train=True, workers=2, seed=1)
    assert order(with_workers) == shuffled


def test_build_datasets(tmp_path):
    train, val = data.build_datasets("synthetic", image_size=64, num_train=8, num_val=4)
    assert (len(train), len(val)) == (8, 4) and train.class_names == val.class_names
    assert not torch.equal(train[0][0], val[0][0])  # different seeds
    with pytest.warns(UserWarning, match="degenerate"):
        train, val = data.build_datasets("voc", BCCD)
        assert (len(train), len(val)) == (4, 2) and train.class_names == val.class_names
        train, val = data.build_datasets("coco", BCCD)
        assert (len(train), len(val)) == (4, 2) and train.cat_ids == val.cat_ids
    with pytest.raises(ValueError, match="unknown --data"):
        data.build_datasets("imagenet", BCCD)


def test_make_loader_distributed(tmp_path):
    ds = data.SyntheticShapes(10, 32, seed=0)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        loader = data.make_loader(ds, 4, train=True, workers=0, seed=1)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([t["image_id"] for _, ts in loader for t in ts])
        assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and epochs[0] != epochs[1]
    finally:
        torch.distributed.destroy_process_group()


def test_transforms_keep_empty_targets():
    image, target = torch.rand(3, 10, 12), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out, t = data.Compose([data.RandomHorizontalFlip(1.0), data.Resize(min_size=20, max_size=100)])(image, target)
    assert out.shape == (3, 20, 24) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
