"""Datasets, generic transforms and loaders shared by every detector file.

Three datasets, one contract (torchvision's detection convention):

    dataset[i] -> (image, target)
    image   float [3, H, W], RGB, values in [0, 1]
    target  boxes     float [N, 4]  x1, y1, x2, y2 in absolute pixels, continuous coordinates (no +1)
            labels    int64 [N]     in 1..K (0 is background; num_classes = K + 1)
            image_id  int
            iscrowd   int64 [N]     (COCO's flag; 0 for the other datasets)
            difficult int64 [N]     (VOC only)

    SyntheticShapes  the default: random shapes on textured backgrounds, rendered on the fly, nothing downloaded
    CocoDetection    any COCO-format json (COCO itself, exports of labelling tools)
    VocDetection     Pascal VOC layout: Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/<split>.txt

Every dataset has `class_names` (index 0 "__background__"), `num_classes` (K + 1) and `coco_gt()`: the ground truth as
a COCO-format dict in original image coordinates, built from the annotations without reading or rendering any image.
Its `category_id` is the contiguous label 1..K (CocoDetection keeps `cat_ids` to map labels back to the json's ids when
writing results).

Bad input stops with an error naming the file and the field; the noise that real datasets have (degenerate boxes,
boxes outside the image, images without boxes) is handled with one warning per dataset that counts what was done.

Transforms are callables `(image, target) -> (image, target)` that keep the boxes on the same pixels.
"""

import json
import math
import os
import random
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


# --- Images and boxes ---

def load_image(path):
    """Any image file PIL reads -> float [3, H, W] RGB in [0, 1].

    Grayscale, palette, RGBA (alpha dropped), CMYK ... are converted to RGB; 16-bit grayscale ('I;16*', and 'I' as PIL
    opens 16-bit PNGs) is scaled by 65535 rather than truncated to 8 bits. EXIF orientation is not applied, as in
    torchvision.io.read_image: annotations refer to the stored pixels.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                gray = np.asarray(im, dtype=np.float32) / 65535.0  # [H, W]
                return torch.from_numpy(np.clip(gray, 0.0, 1.0)).unsqueeze(0).expand(3, -1, -1).contiguous()
            if im.mode == "F":
                gray = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)  # float images are taken as [0, 1]
                return torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1).contiguous()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
            rgb = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def image_size(path):
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def clean_boxes(boxes, width, height, counts):
    """Clip xyxy boxes [N, 4] (numpy) to the image and find the degenerate ones; returns the keep mask [N].

    A box is degenerate when, after clipping, it spans at most one pixel in x or y (x2 - x1 <= 1 or y2 - y1 <= 1):
    a click rather than an object (BCCD has two such 1x1 boxes, VOC xml with xmin == xmax). `counts` (a dict) collects
    'clipped' and 'degenerate' for the dataset's one warning.
    """
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) > 1) & ((clipped[:, 3] - clipped[:, 1]) > 1)
    changed = (np.abs(clipped - boxes) > 1e-6).any(axis=1) & keep
    counts["degenerate"] = counts.get("degenerate", 0) + int((~keep).sum())
    counts["clipped"] = counts.get("clipped", 0) + int(changed.sum())
    boxes[:] = clipped
    return keep


def warn_counts(source, counts, num_images):
    """The one warning per dataset that sums up what was done to noisy annotations."""
    parts = []
    if counts.get("degenerate"):
        parts.append(f"dropped {counts['degenerate']} degenerate boxes (width or height <= 1 px)")
    if counts.get("clipped"):
        parts.append(f"clipped {counts['clipped']} boxes to the image")
    if counts.get("empty"):
        parts.append(f"kept {counts['empty']} of {num_images} images without boxes as negatives")
    if parts:
        warnings.warn(f"{source}: " + ", ".join(parts), stacklevel=3)


def _coco_dict(images, boxes_per_image, labels_per_image, class_names, extra_per_image=None):
    """COCO-format ground truth from per-image xyxy boxes; category_id is the contiguous label 1..K."""
    annotations = []
    for img, boxes, labels, extra in zip(images, boxes_per_image, labels_per_image,
                                         extra_per_image or [None] * len(images)):
        for j, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            w, h = box[2] - box[0], box[3] - box[1]
            ann = {"id": len(annotations) + 1, "image_id": img["id"], "category_id": int(label),
                   "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
            for key, values in (extra or {}).items():
                ann[key] = int(values[j])
            annotations.append(ann)
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names) if k > 0]
    return {"images": [dict(img) for img in images], "annotations": annotations, "categories": categories}


# --- Synthetic shapes ---

SHAPE_NAMES = ("rectangle", "ellipse", "triangle", "cross", "ring", "star")


def _half_planes(vertices, ys, xs):
    """Convex polygon mask: pixel centres (ys [h, 1], xs [1, w]) on the inner side of every edge -> bool [h, w]."""
    points = vertices.tolist()
    edges = list(zip(points, points[1:] + points[:1]))
    sign = 1.0 if sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges) >= 0 else -1.0  # vertex order
    inside = None
    for (x0, y0), (x1, y1) in edges:
        a, b = sign * (x1 - x0), -sign * (y1 - y0)  # cross(edge, p - v0) = a (py - y0) + b (px - x0)
        side = (a * ys + (-a * y0 - b * x0)) + b * xs >= 0  # [h, 1] + [1, w] -> [h, w]
        inside = side if inside is None else inside & side
    return inside


def _rotated(points, angle):
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])  # rows are (x, y): rotate each by `angle`


class SyntheticShapes(torch.utils.data.Dataset):
    """Random shapes on textured backgrounds, rendered on the fly; nothing is downloaded.

    Classes 1..6: rectangle, ellipse, triangle, cross, ring, star (six-pointed). Each image has 0..max_objects shapes
    (about one image in max_objects + 1 is empty) with box sides from ~4% to ~60% of the image, random rotation and
    aspect ratio, and a colour drawn independently of the class, so only the outline tells the class. Backgrounds are a
    random colour gradient, sometimes with stripes, plus pixel noise.

    Later shapes may cover earlier ones. A shape is only placed if every shape stays at least half visible (else its
    position is redrawn, then it is left out), and each box is the tight box of the shape's *visible* pixels, so a
    partly covered or truncated shape gets a shrunk box and no unlabelled fragment is ever drawn.

    Item i is a pure function of (seed, i): the layout uses np.random.default_rng((seed, i)), the colours and texture
    default_rng((seed, i, 1)). Train and val are two seeds. `coco_gt()` computes only layouts (shape masks and boxes),
    never pixels.
    """

    def __init__(self, num_images=1000, image_size=320, seed=0, transforms=None, max_objects=6):
        self.num_images = num_images
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.seed = seed
        self.transforms = transforms
        self.max_objects = max_objects
        self.class_names = ("__background__",) + SHAPE_NAMES
        self.num_classes = len(self.class_names)
        # One noise tile per dataset, cropped at a random offset per image: cheaper than fresh Gaussian noise per image.
        rng = np.random.default_rng((seed, 2**31))
        self._noise = rng.standard_normal((3, self.height + 64, self.width + 64), dtype=np.float32)
        self._scratch = self._owner = None  # work buffers, made on first use (in each DataLoader worker)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticShapes index {index} out of range 0..{self.num_images - 1}")
        shapes, boxes, labels = self.layout(index)
        image = torch.from_numpy(self.render(index, shapes))  # [3, H, W]
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": index,
                  "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _sample_mask(self, rng, label, ys, xs):
        """Draw one shape of class `label`; returns (y0, y1, x0, x1) of its patch and the bool mask [y1-y0, x1-x0]."""
        H, W = self.height, self.width
        size = math.exp(rng.uniform(math.log(0.04), math.log(0.6))) * min(H, W)  # longer side of the shape
        r = size / 2
        aspect = math.exp(rng.uniform(math.log(0.45), math.log(1.0)))  # shorter side / longer side
        angle = rng.uniform(0, math.pi)
        # Centre anywhere that keeps the shape's circumscribed disc at least ~70% inside along each axis.
        cx = rng.uniform(0.4 * r, W - 0.4 * r) if W > 0.8 * r else W / 2
        cy = rng.uniform(0.4 * r, H - 0.4 * r) if H > 0.8 * r else H / 2
        y0, y1 = max(0, int(cy - r)), min(H, int(math.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(cx - r)), min(W, int(math.ceil(cx + r)) + 1)
        py, px = ys[y0:y1] - cy, xs[:, x0:x1] - cx  # [h, 1], [1, w] pixel centres relative to the shape centre
        name = SHAPE_NAMES[label - 1]
        if name in ("rectangle", "cross"):
            if rng.random() < 0.5:
                angle = 0.0  # half the rectangles and crosses stay axis-aligned
            thick = rng.uniform(0.25, 0.45) if name == "cross" else aspect
            bar = np.array([[-1, -thick], [1, -thick], [1, thick], [-1, thick]]) * r / math.hypot(1, thick)  # in disc
            mask = _half_planes(_rotated(bar, angle), py, px)
            if name == "cross":
                mask |= _half_planes(_rotated(bar, angle + math.pi / 2), py, px)
        elif name in ("ellipse", "ring"):
            # Rotated ellipse as a quadratic form: (x'/a)^2 + (y'/b)^2 = A x^2 + B xy + C y^2.
            a, b = r, r * aspect
            c, s = math.cos(angle), math.sin(angle)
            A, B, C = c * c / a**2 + s * s / b**2, 2 * c * s * (1 / a**2 - 1 / b**2), s * s / a**2 + c * c / b**2
            q = (A * px * px + C * py * py) + (B * py) * px  # [h, w]
            mask = q <= 1.0
            if name == "ring":
                mask &= q >= rng.uniform(0.45, 0.7) ** 2
        elif name == "triangle":
            phi = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
            tri = np.stack([np.cos(phi), aspect ** 0.5 * np.sin(phi)], axis=1) * r
            mask = _half_planes(_rotated(tri, angle), py, px)
        else:  # star: two equilateral triangles, one turned by 60 degrees (a hexagram)
            phi = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3])
            tri = np.stack([np.cos(phi), np.sin(phi)], axis=1) * r
            mask = _half_planes(_rotated(tri, angle), py, px) | _half_planes(_rotated(tri, angle + math.pi / 3), py, px)
        return (y0, y1, x0, x1), mask

    def layout(self, index):
        """Shapes of image `index` without pixels: (shapes, boxes float32 [N, 4], labels int64 [N]).

        shapes: list of (label, (y0, y1, x0, x1), visible mask) in drawing order, for `render`.
        """
        rng = np.random.default_rng((self.seed, index))
        H, W = self.height, self.width
        ys = np.arange(H, dtype=np.float32)[:, None] + 0.5  # [H, 1] pixel centres: pixel (r, c) covers
        xs = np.arange(W, dtype=np.float32)[None, :] + 0.5  # [1, W]  [c, c + 1] x [r, r + 1]
        if self._owner is None:
            self._owner = np.empty((H, W), dtype=np.int16)
        owner = self._owner  # index of the shape that owns each pixel, -1 = background
        owner.fill(-1)
        patches, labels, full_area, visible_area = [], [], [], []
        for _ in range(rng.integers(0, self.max_objects + 1)):
            label = int(rng.integers(1, len(SHAPE_NAMES) + 1))
            for _attempt in range(3):
                (y0, y1, x0, x1), mask = self._sample_mask(rng, label, ys, xs)
                area = int(mask.sum())
                if area < 12:  # a sliver left at the border: redraw
                    continue
                under = owner[y0:y1, x0:x1][mask]
                lost = np.bincount(under[under >= 0], minlength=len(labels))
                remaining = np.asarray(visible_area, dtype=np.int64) - lost
                if (remaining * 2 < np.asarray(full_area)).any():  # would hide half of an earlier shape: redraw
                    continue
                owner[y0:y1, x0:x1][mask] = len(labels)
                visible_area = list(remaining)
                full_area.append(area)
                visible_area.append(area)
                patches.append((y0, y1, x0, x1))
                labels.append(label)
                break
        shapes, boxes, kept = [], [], []
        for k, (y0, y1, x0, x1) in enumerate(patches):
            visible = owner[y0:y1, x0:x1] == k  # [h, w]
            rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
            box = [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]  # tight, continuous coordinates
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue  # a sliver one pixel wide is left unlabelled, as the loaders drop such boxes
            boxes.append(box)
            kept.append(labels[k])
            shapes.append((labels[k], (y0, y1, x0, x1), visible))
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return shapes, boxes, np.asarray(kept, dtype=np.int64)

    def render(self, index, shapes):
        """Pixels of image `index` for its layout: float32 [3, H, W] in [0, 1].

        Written in place into one output array and two scratch buffers kept between calls: fresh large temporaries
        cost more in page faults than the arithmetic itself.
        """
        rng = np.random.default_rng((self.seed, index, 1))
        H, W = self.height, self.width
        if self._scratch is None:
            self._scratch = (np.empty((H, W), np.float32), np.empty((H, W), np.float32))
        s1, s2 = self._scratch
        image = np.empty((3, H, W), np.float32)
        ys = np.linspace(-0.5, 0.5, H, dtype=np.float32)[None, :, None]  # [1, H, 1]
        xs = np.linspace(-0.5, 0.5, W, dtype=np.float32)[None, None, :]  # [1, 1, W]
        base = rng.uniform(0.0, 1.0, (3, 1, 1)).astype(np.float32)
        slope = rng.uniform(-0.6, 0.6, (2, 3, 1, 1)).astype(np.float32)
        np.add(base + slope[0] * xs, slope[1] * ys, out=image)  # [3, H, W] colour gradient
        if rng.random() < 0.4:
            # Stripes sin(kx x + ky y + p), separable as sin(kx x + p) cos(ky y) + cos(kx x + p) sin(ky y).
            period = rng.uniform(6, 40)
            theta, p = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
            kx, ky = 2 * math.pi / period * math.cos(theta), 2 * math.pi / period * math.sin(theta)
            u, v = np.arange(W, dtype=np.float32) * kx + p, np.arange(H, dtype=np.float32) * ky
            np.outer(np.cos(v), np.sin(u), out=s1)
            s1 += np.outer(np.sin(v), np.cos(u), out=s2)  # [H, W] stripes in [-1, 1]
            for c, amplitude in enumerate(rng.uniform(0.05, 0.25, 3)):
                image[c] += np.multiply(s1, np.float32(amplitude), out=s2)
        for label, (y0, y1, x0, x1), visible in shapes:
            patch = image[:, y0:y1, x0:x1]  # a view: painting it paints the image
            inside = np.flatnonzero(visible)
            cy, cx = divmod(int(inside[len(inside) // 2]), visible.shape[1])  # a pixel of the shape, near its middle
            under = patch[:, cy, cx].clip(0, 1)
            for _ in range(8):  # a colour that stands out from what it covers (redrawn, never chosen by class)
                colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
                if np.abs(colour - under).max() > 0.3:
                    break
            np.copyto(patch, colour[:, None, None], where=visible)
        oy, ox = rng.integers(0, 65, 2)
        sigma = np.float32(rng.uniform(0.01, 0.08))
        for c in range(3):  # pixel noise over everything, shapes included
            image[c] += np.multiply(self._noise[c, oy:oy + H, ox:ox + W], sigma, out=s2)
        return np.clip(image, 0.0, 1.0, out=image)

    def coco_gt(self):
        images = [{"id": i, "width": self.width, "height": self.height, "file_name": f"{i:06d}.png"}
                  for i in range(self.num_images)]
        layouts = [self.layout(i) for i in range(self.num_images)]
        return _coco_dict(images, [b for _, b, _ in layouts], [l for _, _, l in layouts], self.class_names)


# --- COCO ---

class CocoDetection(torch.utils.data.Dataset):
    """Any COCO-format detection json: images under `image_dir`, `file_name` relative to it.

    Category ids (any integers, possibly with gaps, as COCO's 1..90) become contiguous labels 1..K in sorted id order;
    `class_names[label]` is the name and `cat_ids[label - 1]` the json's category id, used when writing results.
    With contiguous_labels=False the label is the category id itself (K = the largest id, gaps named "N/A"): the label
    space of torchvision's COCO weights (91 classes), for evaluating them without remapping.
    Crowd annotations are kept, flagged by `iscrowd`. Images without annotations are kept as negatives.
    """

    def __init__(self, image_dir, ann_file, transforms=None, contiguous_labels=True):
        self.image_dir, self.ann_file, self.transforms = image_dir, ann_file, transforms
        try:
            with open(ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{ann_file}: annotation file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{ann_file}: corrupt json ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{ann_file}: expected a json object with 'images', 'annotations', 'categories'")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{ann_file}: field '{key}' is missing or not a list")
        annotations = data.get("annotations", [])  # absent in COCO's test-dev image lists
        if not isinstance(annotations, list):
            raise ValueError(f"{ann_file}: field 'annotations' is not a list")

        try:
            categories = sorted(data["categories"], key=lambda c: c["id"])
            self.cat_ids = [int(c["id"]) for c in categories]
            self.class_names = ("__background__",) + tuple(str(c.get("name", c["id"])) for c in categories)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ann_file}: every entry of 'categories' needs an integer 'id' ({e!r})") from None
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise ValueError(f"{ann_file}: duplicate category ids in 'categories'")
        self._categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names[1:])]
        if not contiguous_labels:
            if self.cat_ids and self.cat_ids[0] < 1:
                raise ValueError(f"{ann_file}: category id {self.cat_ids[0]} cannot be a label (0 is background)")
            names = ["__background__"] + ["N/A"] * (max(self.cat_ids, default=0))
            for cat_id, name in zip(self.cat_ids, self.class_names[1:]):
                names[cat_id] = name
            self._categories = [{"id": cat_id, "name": names[cat_id]} for cat_id in self.cat_ids]
            self.class_names, self.cat_ids = tuple(names), list(range(1, len(names)))
        self.num_classes = len(self.class_names)
        label_of = {cat_id: k + 1 for k, cat_id in enumerate(self.cat_ids)}

        self.images = []  # {"id", "file_name", "width", "height"} in json order
        position = {}
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise ValueError(f"{ann_file}: images[{k}] needs 'id' and 'file_name'")
            if img["id"] in position:
                raise ValueError(f"{ann_file}: duplicate image id {img['id']} in 'images'")
            path = os.path.join(image_dir, img["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{ann_file}: image id {img['id']}: 'file_name' {img['file_name']!r} not "
                                        f"found ({path})")
            width, height = img.get("width"), img.get("height")
            if not width or not height:
                width, height = image_size(path)  # labelling tools sometimes leave the size out
            position[img["id"]] = len(self.images)
            self.images.append({"id": img["id"], "file_name": img["file_name"], "width": int(width),
                                "height": int(height)})

        per_image = [[] for _ in self.images]  # (box xyxy, label, iscrowd, area)
        for k, ann in enumerate(annotations):
            ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            if not isinstance(ann, dict) or ann.get("image_id") not in position:
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'image_id' "
                                 f"{ann.get('image_id') if isinstance(ann, dict) else None!r} is not in 'images'")
            if ann.get("category_id") not in label_of:
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'category_id' {ann.get('category_id')!r} is not "
                                 f"in 'categories'")
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                                 f"got {bbox!r}")
            x, y, w, h = bbox
            area = ann.get("area", w * h)
            per_image[position[ann["image_id"]]].append(
                ([x, y, x + w, y + h], label_of[ann["category_id"]], int(bool(ann.get("iscrowd", 0))), area))

        counts = {}
        self.boxes, self.labels, self.iscrowd, self.areas = [], [], [], []
        for img, anns in zip(self.images, per_image):
            boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
            keep = clean_boxes(boxes, img["width"], img["height"], counts)
            self.boxes.append(boxes[keep])
            self.labels.append(np.array([a[1] for a in anns], dtype=np.int64)[keep])
            self.iscrowd.append(np.array([a[2] for a in anns], dtype=np.int64)[keep])
            self.areas.append(np.array([a[3] for a in anns], dtype=np.float64)[keep])
            counts["empty"] = counts.get("empty", 0) + int(keep.sum() == 0)
        warn_counts(ann_file, counts, len(self.images))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = self.images[index]
        path = os.path.join(self.image_dir, img["file_name"])
        image = load_image(path)
        if tuple(image.shape[1:]) != (img["height"], img["width"]):
            raise ValueError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {self.ann_file} gives image id "
                             f"{img['id']} 'width' {img['width']}, 'height' {img['height']}")
        target = {"boxes": torch.from_numpy(self.boxes[index].copy()),
                  "labels": torch.from_numpy(self.labels[index].copy()),
                  "image_id": img["id"], "iscrowd": torch.from_numpy(self.iscrowd[index].copy())}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self):
        """The ground truth as loaded (cleaned boxes; the json's 'area', which COCO takes from the mask, kept)."""
        gt = _coco_dict(self.images, self.boxes, self.labels, self.class_names,
                        [{"iscrowd": c} for c in self.iscrowd])
        areas = [a for per_image in self.areas for a in per_image.tolist()]
        for ann, area in zip(gt["annotations"], areas):
            ann["area"] = area
        gt["categories"] = [dict(c) for c in self._categories]  # without the "N/A" gaps of contiguous_labels=False
        return gt


# --- VOC ---

def _xml_text(node, field, xml_file, where):
    text = node.findtext(field)
    if text is None or not text.strip():
        raise ValueError(f"{xml_file}: {where} has no '{field}'")
    return text.strip()


class VocDetection(torch.utils.data.Dataset):
    """Pascal VOC layout: root/Annotations/<id>.xml, root/JPEGImages/<id>.jpg, root/ImageSets/Main/<split>.txt.

    `difficult` objects are kept, flagged in the target (VOC AP ignores them). Class names: `class_names` if given, else
    the 20 VOC classes if every name in Annotations/*.xml is one of them, else the sorted names found there, so every
    split of one root gets the same labels. `image_id` is the position in the split file; `ids[i]` is the file stem.
    """

    def __init__(self, root, split="trainval", transforms=None, class_names=None):
        self.root, self.split, self.transforms = root, split, transforms
        split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"{split_file}: split file not found (split {split!r})")
        with open(split_file, encoding="utf-8") as f:
            self.ids = [line.split()[0] for line in f if line.strip()]
        ann_dir = os.path.join(root, "Annotations")
        records = [self._parse(os.path.join(ann_dir, f"{i}.xml")) for i in self.ids]

        if class_names is None:
            found = {o[0] for rec in records for o in rec["objects"]}
            split_ids = set(self.ids)
            for name in sorted(os.listdir(ann_dir)):  # all splits of this root, so that train and val share labels
                if name.endswith(".xml") and name[:-4] not in split_ids:
                    path = os.path.join(ann_dir, name)
                    try:
                        objects = ET.parse(path).getroot().iter("object")
                        found.update((o.findtext("name") or "").strip() for o in objects)
                    except ET.ParseError as e:
                        raise ValueError(f"{path}: corrupt xml ({e})") from None
            found.discard("")
            class_names = VOC_CLASSES if found <= set(VOC_CLASSES) else sorted(found)
        class_names = [c for c in class_names if c != "__background__"]
        self.class_names = ("__background__",) + tuple(class_names)
        self.num_classes = len(self.class_names)
        label_of = {name: k + 1 for k, name in enumerate(class_names)}

        counts = {}
        self.images, self.boxes, self.labels, self.difficult = [], [], [], []
        for k, rec in enumerate(records):
            for name, *_ in rec["objects"]:
                if name not in label_of:
                    raise ValueError(f"{rec['xml']}: object 'name' {name!r} is not one of the class names "
                                     f"{list(class_names)}")
            # VOC pixel coordinates are 1-based and inclusive: xmin = 1 is the first pixel column, xmax its last.
            # Continuous 0-based corners are (xmin - 1, ymin - 1, xmax, ymax), as in torchvision's references and
            # as COCO converters of VOC do (BCCD's json has bbox x = xmin - 1, w = xmax - xmin + 1).
            boxes = np.array([[x1 - 1, y1 - 1, x2, y2] for _, x1, y1, x2, y2, _ in rec["objects"]],
                             dtype=np.float32).reshape(-1, 4)
            keep = clean_boxes(boxes, rec["width"], rec["height"], counts)
            self.images.append({"id": k, "file_name": os.path.relpath(rec["image"], os.path.join(root, "JPEGImages")),
                                "width": rec["width"], "height": rec["height"]})
            self.boxes.append(boxes[keep])
            self.labels.append(np.array([label_of[o[0]] for o in rec["objects"]], dtype=np.int64)[keep])
            self.difficult.append(np.array([o[5] for o in rec["objects"]], dtype=np.int64)[keep])
            counts["empty"] = counts.get("empty", 0) + int(keep.sum() == 0)
        self._image_paths = [rec["image"] for rec in records]
        warn_counts(split_file, counts, len(records))

    def _parse(self, xml_file):
        """An annotation file -> {"xml", "image", "width", "height", "objects": [(name, x1, y1, x2, y2, difficult)]}."""
        if not os.path.isfile(xml_file):
            raise FileNotFoundError(f"{xml_file}: annotation file not found")
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{xml_file}: corrupt xml ({e})") from None
        stem = os.path.splitext(os.path.basename(xml_file))[0]
        image = os.path.join(self.root, "JPEGImages", f"{stem}.jpg")
        if not os.path.isfile(image) and root.findtext("filename"):
            image = os.path.join(self.root, "JPEGImages", root.findtext("filename").strip())  # e.g. PNG datasets
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{xml_file}: image {image} not found (field 'filename')")
        try:
            width, height = int(float(root.findtext("size/width", "0"))), int(float(root.findtext("size/height", "0")))
        except ValueError:
            raise ValueError(f"{xml_file}: 'size/width' and 'size/height' must be numbers") from None
        if width <= 0 or height <= 0:
            width, height = image_size(image)  # some exports write <width>0</width>
        objects = []
        for j, obj in enumerate(root.findall("object")):
            where = f"object {j}"
            name = _xml_text(obj, "name", xml_file, where)
            try:
                x1, y1, x2, y2 = (float(_xml_text(obj, f"bndbox/{k}", xml_file, f"{where} ({name})"))
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
                difficult = int(float(obj.findtext("difficult") or 0))
            except ValueError as e:
                if str(e).startswith(xml_file):
                    raise
                raise ValueError(f"{xml_file}: {where} ({name}): 'bndbox' and 'difficult' must be numbers "
                                 f"({e})") from None
            objects.append((name, x1, y1, x2, y2, difficult))
        return {"xml": xml_file, "image": image, "width": width, "height": height, "objects": objects}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        img, path = self.images[index], self._image_paths[index]
        image = load_image(path)
        if tuple(image.shape[1:]) != (img["height"], img["width"]):
            raise ValueError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but its xml 'size' says "
                             f"{img['width']}x{img['height']}")
        target = {"boxes": torch.from_numpy(self.boxes[index].copy()),
                  "labels": torch.from_numpy(self.labels[index].copy()), "image_id": index,
                  "iscrowd": torch.zeros(len(self.labels[index]), dtype=torch.int64),
                  "difficult": torch.from_numpy(self.difficult[index].copy())}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self):
        """The ground truth as loaded; each annotation also carries 'difficult' (0/1) for evaluators that use it."""
        return _coco_dict(self.images, self.boxes, self.labels, self.class_names,
                          [{"difficult": d} for d in self.difficult])


# --- Transforms ---

class Compose:
    """Apply (image, target) -> (image, target) transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def hflip(image, target):
    """Mirror image [3, H, W] and its boxes: x1' = W - x2, x2' = W - x1 (continuous coordinates, no -1)."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()).item() < self.p:  # torch's RNG: seeded per worker by the DataLoader
            return hflip(image, target)
        return image, target


def resize(image, target, size):
    """Resize image [3, H, W] to size (h, w), bilinear, and scale the boxes by the same factors per axis."""
    height, width = image.shape[-2:]
    image = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    if target is not None:
        target = dict(target)
        scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    return image, target


class Resize:
    """Resize to a fixed `size` (h, w), or shorter side to `min_size` with the longer side at most `max_size`.

    The min_size/max_size rule, the size rounding (floor) and bilinear without antialiasing are torchvision's
    GeneralizedRCNNTransform; a tuple of min_size values picks one at random per image (multi-scale training).
    """

    def __init__(self, min_size=800, max_size=1333, size=None):
        self.min_size = (min_size,) if isinstance(min_size, (int, float)) else tuple(min_size)
        self.max_size, self.size = max_size, size

    def __call__(self, image, target):
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        else:
            min_size = self.min_size[int(torch.randint(len(self.min_size), ()).item())]
            height, width = image.shape[-2:]
            scale = min(min_size / min(height, width), self.max_size / max(height, width))
            size = (int(math.floor(height * scale)), int(math.floor(width * scale)))
        return resize(image, target, size)


# --- Loaders ---

def collate_fn(batch):
    """[(image, target), ...] -> (list of images [3, H_i, W_i], list of targets): detection images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def seed_worker(worker_id):
    """Seed numpy and random in each DataLoader worker from torch's per-worker seed (torch seeds itself)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, train, workers=4, seed=0, distributed=None):
    """DataLoader yielding (images, targets) lists; shuffled when `train`.

    Under torch.distributed (initialised, or distributed=True) a DistributedSampler splits the data across ranks; call
    `loader.sampler.set_epoch(epoch)` each epoch so the shuffle changes. Note that it pads the last rank's share with
    repeated images, so an evaluation must drop duplicate image ids. Shuffling and worker seeds follow `seed` (and the
    rank), so a run is reproducible.
    """
    workers = min(workers, os.cpu_count() or 1)  # more worker processes than cores only adds contention
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(seed + rank)
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=seed)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        worker_init_fn=seed_worker, generator=generator, pin_memory=torch.cuda.is_available(),
        # not persistent for training: each epoch then re-seeds its workers, which --resume needs to continue exactly
        persistent_workers=workers > 0 and not train, drop_last=False)


def _coco_image_dir(data_root, ann_file):
    """Images of annotations/instances_<name>.json: <root>/<name> (COCO 2017 layout), else <root>/JPEGImages, else
    <root>/images, else <root>."""
    name = os.path.splitext(os.path.basename(ann_file))[0].removeprefix("instances_")
    for folder in (name, "JPEGImages", "images"):
        if os.path.isdir(os.path.join(data_root, folder)):
            return os.path.join(data_root, folder)
    return data_root


def build_datasets(data="synthetic", data_root=None, train_ann=None, val_ann=None, train_split="train",
                   val_split="val", image_size=320, num_train=10000, num_val=500, seed=0, max_objects=6,
                   train_transforms=None, val_transforms=None):
    """(train dataset, val dataset) for the --data flags of every model file.

    synthetic: SyntheticShapes(num_train, image_size, seed) and (num_val, image_size, seed + 1), disjoint by seed.
    coco: data_root/annotations/instances_train2017.json (or instances_train.json) unless train_ann is given, images
          in the folder named after the json (train2017/), else JPEGImages/ or images/; likewise val.
    voc:  VocDetection(data_root, train_split) and (data_root, val_split); val uses the train split's class names.
    """
    if data == "synthetic":
        return (SyntheticShapes(num_train, image_size, seed, train_transforms, max_objects),
                SyntheticShapes(num_val, image_size, seed + 1, val_transforms, max_objects))
    if data_root is None:
        raise ValueError(f"--data {data} needs --data-root")
    if data == "coco":
        def find(ann, stem):
            if ann is not None:
                return ann if os.path.isabs(ann) or os.path.exists(ann) else os.path.join(data_root, ann)
            for name in (f"instances_{stem}2017.json", f"instances_{stem}.json"):
                path = os.path.join(data_root, "annotations", name)
                if os.path.isfile(path):
                    return path
            raise FileNotFoundError(f"{os.path.join(data_root, 'annotations')}: no instances_{stem}2017.json or "
                                    f"instances_{stem}.json; pass --{stem}-ann")
        train_ann, val_ann = find(train_ann, "train"), find(val_ann, "val")
        train = CocoDetection(_coco_image_dir(data_root, train_ann), train_ann, train_transforms)
        val = CocoDetection(_coco_image_dir(data_root, val_ann), val_ann, val_transforms)
        if val.cat_ids != train.cat_ids:
            raise ValueError(f"{val_ann}: 'categories' differ from {train_ann}'s, labels would not match")
        return train, val
    if data == "voc":
        train = VocDetection(data_root, train_split, train_transforms)
        return train, VocDetection(data_root, val_split, val_transforms, class_names=train.class_names[1:])
    raise ValueError(f"unknown --data {data!r}: expected synthetic, coco or voc")


# --- Main ---

if __name__ == "__main__":
    # python data.py [--image-size 320 --num-images 2000]: SyntheticShapes throughput in one process on one core.
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--num-images", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = SyntheticShapes(args.num_images, args.image_size, seed=0)
    dataset[0]  # first call allocates the work buffers
    wall, cpu = time.perf_counter(), time.process_time()
    num_boxes = sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"SyntheticShapes {args.image_size}x{args.image_size}: {len(dataset) / wall:.0f} images/s wall, "
          f"{len(dataset) / cpu:.0f} images/s of CPU time, one process, torch threads 1 "
          f"({num_boxes / len(dataset):.2f} boxes per image)")
