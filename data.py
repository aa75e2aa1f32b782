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

Bad input stops with an error naming the file and the field, at start-up: every image is decoded once and its size
compared with the annotation's (in threads, cached beside the annotation file so that the next run is instant). The
noise that real datasets have (degenerate boxes, boxes outside the image, images without boxes) is handled with one
warning per dataset that counts what was done and names the first annotations it concerns.

Transforms are callables `(image, target) -> (image, target)` that keep the boxes on the same pixels.
"""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image

from common import box_xyxy_to_xywh, coco_evaluate, voc_evaluate

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


def check_images(paths, sizes, source, where):
    """Decode every image once, in threads, and compare its size with the annotation's; returns the (width, height) of
    each. paths [N]; sizes [N] (width, height) as annotated, or None where the annotation has none; source: the
    annotation file; where [N]: what names each image there (e.g. "image id 7"). A missing, unreadable or truncated
    image, or one whose size differs from its annotation, stops here, before training, naming the first few. Images
    checked before (same path, file size and modification time; recorded in .<source>.checked.json beside source)
    are not decoded again."""
    cache_file = os.path.join(os.path.dirname(source), f".{os.path.basename(source)}.checked.json")
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}

    def check(path):  # -> (stat key, [width, height]) or (None, error message)
        try:
            stat = os.stat(path)
            key = f"{stat.st_size}:{stat.st_mtime_ns}"
            if cache.get(path, [None])[0] == key:
                return key, cache[path][1]
            with Image.open(path) as im:
                im.load()  # decodes every pixel: a truncated file fails here
                return key, list(im.size)
        except FileNotFoundError:
            return None, "image file not found"
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            return None, f"cannot read image ({type(e).__name__}: {e})"

    results, tic = [], time.perf_counter()
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        for i, result in enumerate(pool.map(check, paths), 1):
            results.append(result)
            if time.perf_counter() - tic > 2 and (i % 200 == 0 or i == len(paths)):
                print(f"\r{source}: checked {i}/{len(paths)} images", end="\n" if i == len(paths) else "",
                      file=sys.stderr, flush=True)
    errors = []
    for path, size, name, (key, found) in zip(paths, sizes, where, results):
        if key is None:
            errors.append(f"{path}: {found}")
        elif size is not None and tuple(size) != tuple(found):
            errors.append(f"{path}: image is {found[0]}x{found[1]} but {source} gives {name} 'width' {size[0]}, "
                          f"'height' {size[1]}")
    new = {p: r for p, r in zip(paths, results) if r[0] is not None}
    if any(cache.get(p) != r for p, r in new.items()):
        try:  # a read-only dataset folder only costs the next run another check
            with open(cache_file + ".tmp", "w", encoding="utf-8") as f:
                json.dump({**cache, **new}, f)
            os.replace(cache_file + ".tmp", cache_file)
        except OSError:
            pass
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("; ".join(errors[:5]) + more)
    return [tuple(found) for _, found in results]


def clean_boxes(boxes, width, height, counts, ids):
    """Clip xyxy boxes [N, 4] (numpy) to the image and find the degenerate ones; returns the keep mask [N].

    A box is degenerate when, after clipping, it spans at most one pixel in x or y (x2 - x1 <= 1 or y2 - y1 <= 1):
    a click rather than an object (BCCD has two such 1x1 boxes, VOC xml with xmin == xmax). `counts` (a dict) collects
    the ids [N] of the 'clipped' and 'degenerate' boxes for the dataset's one warning.
    """
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) > 1) & ((clipped[:, 3] - clipped[:, 1]) > 1)
    changed = (np.abs(clipped - boxes) > 1e-6).any(axis=1) & keep
    counts.setdefault("degenerate", []).extend(i for i, k in zip(ids, keep) if not k)
    counts.setdefault("clipped", []).extend(i for i, c in zip(ids, changed) if c)
    boxes[:] = clipped
    return keep


def warn_counts(source, counts, num_images):
    """The one warning per dataset that sums up what was done to noisy annotations, naming the first few."""
    parts = []
    for key, what in (("degenerate", "dropped {} degenerate boxes (width or height <= 1 px)"),
                      ("clipped", "clipped {} boxes to the image")):
        ids = counts.get(key, [])
        if ids:
            parts.append(what.format(len(ids)) + f" ({', '.join(map(str, ids[:3]))}{', ...' if len(ids) > 3 else ''})")
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
        self.source = f"synthetic shapes {self.height}x{self.width} (seed {seed})"
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
        self.source = ann_file
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
            position[img["id"]] = len(self.images)
            self.images.append({"id": img["id"], "file_name": img["file_name"], "width": img.get("width"),
                                "height": img.get("height")})
        # labelling tools sometimes leave the size out: then the image's own size
        sizes = check_images([os.path.join(image_dir, img["file_name"]) for img in self.images],
                             [(img["width"], img["height"]) if img["width"] and img["height"] else None
                              for img in self.images], ann_file, [f"image id {img['id']}" for img in self.images])
        for img, (width, height) in zip(self.images, sizes):
            img["width"], img["height"] = width, height

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
                ([x, y, x + w, y + h], label_of[ann["category_id"]], int(bool(ann.get("iscrowd", 0))), area,
                 f"annotation {ann_id}"))

        counts = {}
        self.boxes, self.labels, self.iscrowd, self.areas = [], [], [], []
        for img, anns in zip(self.images, per_image):
            boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
            keep = clean_boxes(boxes, img["width"], img["height"], counts, [a[4] for a in anns])
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
        image = load_image(os.path.join(self.image_dir, img["file_name"]))  # size checked at start-up
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
        split_file = self.source = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"{split_file}: split file not found (split {split!r})")
        with open(split_file, encoding="utf-8") as f:
            self.ids = [line.split()[0] for line in f if line.strip()]
        ann_dir = os.path.join(root, "Annotations")
        records = [self._parse(os.path.join(ann_dir, f"{i}.xml")) for i in self.ids]
        sizes = check_images([rec["image"] for rec in records],  # some exports write <width>0</width>: the image's
                             [(rec["width"], rec["height"]) if rec["width"] > 0 and rec["height"] > 0 else None
                              for rec in records], split_file, [f"{rec['xml']} 'size'" for rec in records])
        for rec, (width, height) in zip(records, sizes):
            rec["width"], rec["height"] = width, height

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
            keep = clean_boxes(boxes, rec["width"], rec["height"], counts,
                               [f"{os.path.basename(rec['xml'])} object {j}" for j in range(len(boxes))])
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
        image = load_image(self._image_paths[index])  # size checked at start-up
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
        if torch.rand(()).item() < self.p:  # torch's RNG: seeded per image by make_loader
            return hflip(image, target)
        return image, target


def per_box_fields(inputs):
    """labels_getter for torchvision.transforms.v2.SanitizeBoundingBoxes on (image, target): every per-box field of
    the target, so that a box removed by a crop takes its label, iscrowd and difficult flag with it."""
    return tuple(inputs[1][k] for k in ("labels", "iscrowd", "difficult") if k in inputs[1])


class TransformsV2:
    """A torchvision.transforms.v2 transform (e.g. v2.Compose([...])) on (image [3, H, W], target): the boxes go in as
    tv_tensors.BoundingBoxes, so that geometric transforms move them with the pixels, and come out as plain tensors.
    End a pipeline that crops with v2.SanitizeBoundingBoxes(labels_getter=per_box_fields)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, target):
        from torchvision import tv_tensors
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, target = self.transform(tv_tensors.Image(image), {**target, "boxes": boxes})
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v
                                                 for k, v in target.items()}


# --- Loaders ---

def collate_fn(batch):
    """[(image, target), ...] -> (list of images [3, H_i, W_i], list of targets): detection images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_device(targets, device):
    """Targets' tensors to `device` (asynchronously from pinned memory)."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def seed_everything(*keys):
    """Seed python, numpy and torch (CPU and CUDA) from a tuple of integers, e.g. (seed, epoch, index)."""
    seed = int(np.random.SeedSequence(keys).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededItems(torch.utils.data.Dataset):
    """dataset[i] with every random generator seeded from (seed, epoch, i) first: an image's augmentation is a pure
    function of those three numbers, whatever the worker, the rank, or where a resumed epoch restarts."""

    def __init__(self, dataset, seed, epoch):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        seed_everything(self.seed, self.epoch, index)
        return self.dataset[index]


def worker_init(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def steps_per_epoch(dataset, batch_size, world_size=1):
    return math.ceil(len(dataset) / (batch_size * world_size))


def make_loader(dataset, batch_size, train, workers=4, seed=0, epoch=0, start_step=0, rank=0, world_size=1):
    """DataLoader yielding (images, targets) lists.

    train: one epoch. A shuffle drawn from (seed, epoch) is cut into global batches of batch_size x world_size images,
    and this rank takes its batch_size of each; the last global batch is filled up from the start of the shuffle, so
    that every step has batch_size images on every rank. Batches before start_step are skipped (a resumed run). Random
    transforms are seeded per image (SeededItems): an epoch is the same, augmentation included, with any number of
    workers, and resuming mid-epoch continues it exactly; a global batch does not depend on the number of ranks.
    not train: every image once, in order.
    """
    workers = min(workers, os.cpu_count() or 1)  # more worker processes than cores only adds contention
    if train:
        global_batch = batch_size * world_size
        steps = steps_per_epoch(dataset, batch_size, world_size)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        order = order.repeat(math.ceil(steps * global_batch / len(dataset)))[: steps * global_batch]
        batches = order.view(steps, world_size, batch_size)[start_step:, rank].tolist()
        if hasattr(getattr(dataset, "transforms", None), "set_epoch"):  # transforms that read other images of the set
            dataset.transforms.set_epoch(dataset, epoch)  # or change with the epoch (yolo.py's mosaic, close_mosaic)
        dataset = SeededItems(dataset, seed, epoch)
    else:
        batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                                       worker_init_fn=worker_init, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, dataset, batch_size, workers, device, class_names=None):
    """The 12 COCO numbers (common.coco_evaluate) of a detector on a dataset, plus VOC_mAP50 on a VocDetection.

    model(images) -> detections as in every model file, run in fp32 (exact numbers). class_names: the
    model's, when they are not the dataset's (e.g. torchvision's 91 COCO classes on a COCO json with labels 1..K):
    detections are mapped to the dataset's labels by class name, and those of other classes dropped.
    """
    label_map = None  # identity
    if class_names is not None and tuple(class_names) != tuple(dataset.class_names):
        names = dataset.class_names
        label_map = {i: names.index(n) for i, n in enumerate(class_names) if i and n in names}
        if unmapped := [n for n in dataset.class_names[1:] if n not in class_names[1:]]:
            warnings.warn(f"no class of the model is named {', '.join(unmapped)}: nothing detected there")
    model.eval()
    results = []
    for images, targets in make_loader(dataset, batch_size, train=False, workers=workers):
        detections = model([image.to(device, non_blocking=True) for image in images])
        for target, det in zip(targets, detections):
            boxes = box_xyxy_to_xywh(det["boxes"].float()).tolist()  # COCO results are [x, y, w, h]
            for box, score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
                if (label := label_map.get(label) if label_map is not None else label) is not None:
                    results.append({"image_id": target["image_id"], "category_id": label, "bbox": box, "score": score})
    gt = dataset.coco_gt()  # its category_id is the dataset's label 1..K
    stats = coco_evaluate(gt, results)  # COCO's rules: VOC's difficult objects count as plain ground truth here ...
    stats.pop("per_class", None)
    if isinstance(dataset, VocDetection):  # ... and VOC's own metric, mAP at IoU 0.5, ignores them
        stats["VOC_mAP50"] = voc_evaluate(gt, results)["mAP"]
    return stats


def image_files(path):
    """An image file -> [it]; a folder -> its image files, sorted (for --predict)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")))


def _coco_image_dir(data_root, ann_file):
    """Images of annotations/instances_<name>.json: <root>/<name> (COCO 2017 layout), else <root>/JPEGImages, else
    <root>/images, else <root>."""
    name = os.path.splitext(os.path.basename(ann_file))[0].removeprefix("instances_")
    for folder in (name, "JPEGImages", "images"):
        if os.path.isdir(os.path.join(data_root, folder)):
            return os.path.join(data_root, folder)
    return data_root


def build_datasets(cfg, train_transforms=None, train=True):
    """(train dataset, val dataset) for the data fields of every model file's Config (data, data_root, train_ann,
    val_ann, train_split, val_split, image_size, num_train, num_val, seed); (None, val dataset) when not train.

    synthetic: SyntheticShapes(num_train, image_size, seed) and (num_val, image_size, seed + 1), disjoint by seed.
    coco: data_root/annotations/instances_train2017.json (or instances_train.json) unless train_ann is given, images
          in the folder named after the json (train2017/), else JPEGImages/, else images/, else data_root; likewise val.
    voc:  VocDetection(data_root, train_split) and (data_root, val_split); both take their class names from every
          xml under Annotations/, so that the splits agree.
    A training set without a single box stops with an error: there would be nothing to learn.
    """
    data, data_root, seed = cfg.data, cfg.data_root, cfg.seed
    if data == "synthetic":
        return (SyntheticShapes(cfg.num_train, cfg.image_size, seed, train_transforms) if train else None,
                SyntheticShapes(cfg.num_val, cfg.image_size, seed + 1))
    if data not in ("coco", "voc"):
        raise ValueError(f"unknown --data {data!r}: expected synthetic, coco or voc")
    if not data_root:
        raise ValueError(f"--data {data} needs --data-root")
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"--data-root {data_root}: no such folder")
    if data == "coco":
        def find(ann, stem):
            if ann:
                return ann if os.path.isabs(ann) or os.path.exists(ann) else os.path.join(data_root, ann)
            for name in (f"instances_{stem}2017.json", f"instances_{stem}.json"):
                path = os.path.join(data_root, "annotations", name)
                if os.path.isfile(path):
                    return path
            raise FileNotFoundError(f"{os.path.join(data_root, 'annotations')}: no instances_{stem}2017.json or "
                                    f"instances_{stem}.json; pass --{stem}-ann")
        val_ann = find(cfg.val_ann, "val")
        val_set = CocoDetection(_coco_image_dir(data_root, val_ann), val_ann)
        if not train:
            return None, val_set
        train_ann = find(cfg.train_ann, "train")
        train_set = CocoDetection(_coco_image_dir(data_root, train_ann), train_ann, train_transforms)
        if val_set.cat_ids != train_set.cat_ids:
            raise ValueError(f"{val_ann}: 'categories' differ from {train_ann}'s, labels would not match")
    else:
        val_set = VocDetection(data_root, cfg.val_split)
        if not train:
            return None, val_set
        train_set = VocDetection(data_root, cfg.train_split, train_transforms)
    if not any(len(boxes) for boxes in train_set.boxes):
        raise ValueError(f"{train_set.source}: no box in any of the {len(train_set)} training images: nothing to learn")
    return train_set, val_set


# --- Command line ---

def parse_args(argv, config_class, presets, make_config):
    """The command line of every model file: a mode (--train, --eval, --predict, --show-targets), --preset, and one
    --field-name flag per field of its Config dataclass, whose help is the field's comment and whose default shown is
    what a plain --train uses on this machine (preset cpu without CUDA). A bool field is --x/--no-x, a tuple field
    takes several values (--anchor-sizes 16 32 64; "(32, 40)" for a nested one), a Literal field one of its values.
    Returns (args, {field: value} of the fields given)."""
    preset = "none" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=f"Defaults shown: a plain --train's here (preset {preset}).")
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument("--train", action="store_true", help="train, evaluate each epoch, save into --out")
    modes.add_argument("--eval", action="store_true", help="print the 12 COCO numbers of --weights on the val split")
    modes.add_argument("--predict", metavar="IMG_OR_DIR", help="draw the detections of --weights into --out")
    modes.add_argument("--show-targets", action="store_true", help="draw ground truth and what the assignment marks")
    parser.add_argument("--preset", default=preset, choices=["none", *presets], help=f"Config values: {presets}")
    shown = make_config({}, preset=preset)
    comments = dict(re.findall(r"^\s+(\w+):[^=\n]*=[^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.MULTILINE))
    fields = dataclasses.fields(config_class)
    for f in fields:
        kind = {bool: dict(action=argparse.BooleanOptionalAction), tuple: dict(nargs="*", type=ast.literal_eval)}.get(
            f.type, dict(type=type(f.default), choices=typing.get_args(f.type) or None))
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kind, help=(
            f"{comments.get(f.name, '')} (default: {getattr(shown, f.name)!r})").replace("%", "%%"))
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    return args, {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


# --- Main ---

if __name__ == "__main__":
    # python data.py [--image-size 320 --num-images 2000]: SyntheticShapes throughput in one process on one core.
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
