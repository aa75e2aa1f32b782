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
Its `category_id` is the contiguous label 1..K (CocoDetection keeps `cat_ids`, the json's id of each label).

Bad input stops with an error naming the file and the field, at start-up: every image is decoded once and its size
compared with the annotation's (in threads, cached beside the annotation file so that the next run is instant). The
noise that real datasets have (degenerate boxes, boxes outside the image, images without boxes) is handled with one
warning per dataset that counts what was done and names the first annotations it concerns.

Transforms are callables `(image, target) -> (image, target)` that keep the boxes on the same pixels.
"""

import argparse
import ast
import dataclasses
import functools
import hashlib
import heapq
import inspect
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import typing
import warnings
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
import xml.etree.ElementTree as ET

import numpy as np
import scipy.ndimage
import torch
from PIL import Image, ImageOps

from common import box_xyxy_to_xywh, coco_evaluate, draw_boxes, voc_evaluate


# --- Images and boxes ---

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # the files --predict reads in a folder


def load_image(path, upright=False):
    """Any image file PIL reads -> float [3, H, W] RGB in [0, 1].

    Grayscale, palette, RGBA (alpha dropped), CMYK ... are converted to RGB; 16-bit grayscale ('I;16*', and 'I' as PIL
    opens 16-bit PNGs) is scaled by 65535 rather than truncated to 8 bits. EXIF orientation is not applied, as in
    torchvision.io.read_image: annotations refer to the stored pixels. upright (--predict, where no annotation refers
    to them): applied, so that a phone's portrait photo is seen and drawn as a photo viewer shows it.
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im) if upright else im
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # bomb: over Image.MAX_IMAGE_PIXELS
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
    cache = cache if isinstance(cache, dict) else {}  # (json of another shape: checked again, rewritten)

    def check(path):  # -> (stat key, [width, height, EXIF orientation]) or (None, error message)
        try:
            stat = os.stat(path)
            key = f"{stat.st_size}:{stat.st_mtime_ns}"
            entry = cache.get(path)
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == key and isinstance(entry[1], list) \
                    and len(entry[1]) == 3:
                return key, entry[1]
            with Image.open(path) as im:
                im.load()  # decodes every pixel: a truncated file fails here
                orientation = im.getexif().get(0x0112, 1)  # (a malformed tag is none, as for exif_transpose)
                return key, [*im.size, orientation if isinstance(orientation, int) else 1]  # width, height, EXIF
        except FileNotFoundError:
            return None, "image file not found"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # as load_image
            return None, f"cannot read image ({type(e).__name__}: {e})"

    results, tic = [], time.perf_counter()
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        for i, result in enumerate(pool.map(check, paths), 1):
            results.append(result)
            if time.perf_counter() - tic > 2 and (i % 200 == 0 or i == len(paths)):
                print(f"\r{source}: checked {i}/{len(paths)} images", end="\n" if i == len(paths) else "",
                      file=sys.stderr, flush=True)
    errors, turned = [], []  # turned: images a photo viewer shows turned (EXIF orientation), read here as stored
    for path, size, name, (key, found) in zip(paths, sizes, where, results):
        if key is None:
            errors.append(f"{path}: {found}")
        elif size is not None and tuple(size) != tuple(found[:2]):
            # only orientations 5..8 swap width and height; 1 is upright, 0 and 9+ are invalid (viewers ignore them)
            swapped = 5 <= found[2] <= 8 and tuple(size) == (found[1], found[0])
            exif = f" (EXIF orientation {found[2]}: annotated turned, as viewers show it? Turn the file first, e.g. " \
                   "with PIL.ImageOps.exif_transpose)" if swapped else ""
            errors.append(f"{path}: image is {found[0]}x{found[1]} but {source} gives {name} 'width' {size[0]}, "
                          f"'height' {size[1]}{exif}")
        elif 2 <= found[2] <= 8:  # 2..8 turn or mirror the picture in a viewer
            turned.append(path)
    if turned:  # pixels as stored, as torchvision.io.read_image and DETR's loader read them
        warnings.warn(f"{source}: {len(turned)} images have an EXIF orientation (e.g. {turned[0]}): they are read as "
                      f"stored, not turned as a photo viewer shows them; if their boxes were drawn on the turned "
                      f"picture, turn the files first (PIL.ImageOps.exif_transpose)", stacklevel=3)
    new = {p: r for p, r in zip(paths, results) if r[0] is not None}
    if any(cache.get(p) != list(r) for p, r in new.items()):  # (json gives lists): rewritten only when it changed
        try:  # a read-only dataset folder only costs the next run another check
            with open(cache_file + ".tmp", "w", encoding="utf-8") as f:
                json.dump({**cache, **new}, f)
            os.replace(cache_file + ".tmp", cache_file)
        except OSError:
            pass
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError("; ".join(errors[:5]) + more)
    return [tuple(found[:2]) for _, found in results]


def clean_boxes(boxes, width, height, counts, ids):
    """Clip xyxy boxes [N, 4] (numpy) to the image and find the degenerate ones; returns the keep mask [N].

    A box is degenerate when, after clipping, it spans at most one pixel in x or y (x2 - x1 <= 1 or y2 - y1 <= 1):
    a click rather than an object (BCCD has two such 1x1 boxes, VOC xml with xmin == xmax); inverted when x2 < x1 or
    y2 < y1 (a negative COCO width, xmin > xmax). Both are dropped. `counts` (a dict) collects the ids [N] of the
    'clipped', 'inverted' and 'degenerate' boxes for the dataset's one warning.
    """
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = ((clipped[:, 2] - clipped[:, 0]) > 1) & ((clipped[:, 3] - clipped[:, 1]) > 1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])  # (dropped too: a format mixed up?)
    changed = (np.abs(clipped - boxes) > 1e-6).any(axis=1) & keep
    counts.setdefault("inverted", []).extend(i for i, v in zip(ids, inverted) if v)
    counts.setdefault("degenerate", []).extend(i for i, k, v in zip(ids, keep, inverted) if not k and not v)
    counts.setdefault("clipped", []).extend(i for i, c in zip(ids, changed) if c)
    boxes[:] = clipped
    return keep


def warn_counts(source, counts, num_images):
    """The one warning per dataset that sums up what was done to noisy annotations, naming the first few."""
    parts = []
    for key, what in (("inverted", "dropped {} boxes of negative width or height (x2 < x1 or y2 < y1)"),
                      ("degenerate", "dropped {} degenerate boxes (width or height <= 1 px)"),
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
    proposals = None  # one float32 [R, 4] array per image, set by attach_proposals

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
        if self.proposals is not None:  # R-CNN, Fast R-CNN: attach_proposals
            target["proposals"] = torch.from_numpy(self.proposals[index])
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

def warn_same_names(class_names, source):
    """Class names equal but for case or spaces ('Dog', 'dog'; two categories named 'car') are separate classes: a
    warning names them, since labelling tools make such splits without meaning them."""
    groups = {}
    for name in class_names:
        groups.setdefault(" ".join(str(name).split()).casefold(), []).append(name)
    if same := [names for names in groups.values() if len(names) > 1]:
        warnings.warn(f"{source}: class names {', '.join(' and '.join(map(repr, n)) for n in same[:3])} are separate "
                      "classes; rename them to one name to merge them", stacklevel=3)


def integer(value):
    """A json id as an int: 3, 3.0 or "3"; ValueError for 3.5, true or "3.5" (int() takes 3.5 and true, as 3 and 1)."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


class CocoDetection(torch.utils.data.Dataset):
    """Any COCO-format detection json: images under `image_dir`, `file_name` relative to it (a list of folders: the
    first that holds the first image).

    Category ids (any integers, possibly with gaps, as COCO's 1..90) become contiguous labels 1..K in sorted id order;
    `class_names[label]` is the name and `cat_ids[label - 1]` the json's category id.
    With contiguous_labels=False the label is the category id itself (K = the largest id, gaps named "N/A"): the label
    space of torchvision's COCO weights (91 classes), for evaluating them without remapping.
    Crowd annotations are kept, flagged by `iscrowd` (evaluation ignores the detections they cover); drop_crowd=True,
    as for training, leaves them out, as torchvision's and DETR's references do. Images without annotations are kept
    as negatives.
    """
    proposals = None  # one float32 [R, 4] array per image, set by attach_proposals

    def __init__(self, image_dir, ann_file, transforms=None, contiguous_labels=True, drop_crowd=False):
        self.image_dir, self.ann_file, self.transforms = image_dir, ann_file, transforms
        self.source = ann_file
        try:
            with open(ann_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is skipped
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{ann_file}: annotation file not found") from None
        except IsADirectoryError:
            raise ValueError(f"{ann_file}: a folder, not a COCO json file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            hint = "; VOC's xml files: --data voc" if str(ann_file).lower().endswith(".xml") else ""
            raise ValueError(f"{ann_file}: corrupt json ({e}){hint}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{ann_file}: expected a json object with 'images', 'annotations', 'categories'")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{ann_file}: field '{key}' is missing or not a list")
        annotations = data.get("annotations", [])  # absent in COCO's test-dev image lists
        if not isinstance(annotations, list):
            raise ValueError(f"{ann_file}: field 'annotations' is not a list")

        try:
            categories = sorted(data["categories"], key=lambda c: integer(c["id"]))  # ids "2" < "10", as 2 < 10
            self.cat_ids = [integer(c["id"]) for c in categories]
            self.class_names = ("__background__",) + tuple(str(c.get("name", c["id"])) for c in categories)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{ann_file}: every entry of 'categories' needs an integer 'id' ({e!r})") from None
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise ValueError(f"{ann_file}: duplicate category ids in 'categories'")
        warn_same_names(self.class_names[1:], ann_file)
        self._categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names[1:])]
        label_of = {cat_id: k + 1 for k, cat_id in enumerate(self.cat_ids)}
        if not contiguous_labels:
            if self.cat_ids and self.cat_ids[0] < 1:
                raise ValueError(f"{ann_file}: category id {self.cat_ids[0]} cannot be a label (0 is background)")
            names = ["__background__"] + ["N/A"] * (max(self.cat_ids, default=0))
            for cat_id, name in zip(self.cat_ids, self.class_names[1:]):
                names[cat_id] = name
            self._categories = [{"id": cat_id, "name": names[cat_id]} for cat_id in self.cat_ids]
            label_of = {cat_id: cat_id for cat_id in self.cat_ids}  # only the listed ids: a gap is no category
            self.class_names, self.cat_ids = tuple(names), list(range(1, len(names)))
        self.num_classes = len(self.class_names)

        searched = ""
        if not isinstance(image_dir, (str, os.PathLike)):  # candidates: the first that holds the first image
            first = data["images"][0].get("file_name") if data["images"] and isinstance(data["images"][0], dict) else ""
            searched = f"; looked for in {', '.join(image_dir)}" if len(image_dir) > 1 else ""
            self.image_dir = image_dir = next((d for d in image_dir if isinstance(first, str)
                                               and os.path.isfile(os.path.join(d, first))), image_dir[0])
        self.images = []  # {"id", "file_name", "width", "height"} in json order
        position = {}
        for k, img in enumerate(data["images"]):
            if (not isinstance(img, dict) or not isinstance(img.get("id"), (int, float, str))
                    or isinstance(img["id"], bool) or not isinstance(img.get("file_name"), str)):
                raise ValueError(f"{ann_file}: images[{k}] needs 'id' (a number or string) and 'file_name' (a string)")
            if not all(isinstance(img.get(key), (int, float, type(None))) for key in ("width", "height")):
                raise ValueError(f"{ann_file}: images[{k}]: 'width' and 'height' must be numbers (or absent), got "
                                 f"{img.get('width')!r}, {img.get('height')!r}")
            if img["id"] in position:
                raise ValueError(f"{ann_file}: duplicate image id {img['id']} in 'images'")
            path = os.path.join(image_dir, img["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{ann_file}: image id {img['id']}: 'file_name' {img['file_name']!r} not "
                                        f"found ({path}{searched if k == 0 else ''})")
            position[img["id"]] = len(self.images)
            self.images.append({"id": img["id"], "file_name": img["file_name"], "width": img.get("width"),
                                "height": img.get("height")})
        counted = {}
        for img in self.images:
            counted.setdefault(os.path.normpath(img["file_name"]), []).append(img["id"])
        if twice := [(name, ids) for name, ids in counted.items() if len(ids) > 1]:
            warnings.warn(f"{ann_file}: {len(twice)} image files are listed under several image ids (e.g. "
                          f"{twice[0][0]!r}: ids {', '.join(map(str, twice[0][1][:5]))}): each id is an image with "
                          "its own boxes only (the other ids' objects are background to it)", stacklevel=2)
        # labelling tools sometimes leave the size out: then the image's own size
        sizes = check_images([os.path.join(image_dir, img["file_name"]) for img in self.images],
                             [(img["width"], img["height"]) if img["width"] and img["height"] else None
                              for img in self.images], ann_file, [f"image id {img['id']}" for img in self.images])
        for img, (width, height) in zip(self.images, sizes):
            img["width"], img["height"] = width, height

        per_image = [[] for _ in self.images]  # (box xyxy, label, iscrowd, area)
        for k, ann in enumerate(annotations):
            ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (int, float, str)) \
                    or isinstance(ann["image_id"], bool) or ann["image_id"] not in position:  # (true == 1)
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'image_id' "
                                 f"{ann.get('image_id') if isinstance(ann, dict) else None!r} is not in 'images'")
            try:  # int, as the ids of 'categories' are: some exports write both as strings ("1")
                category_id = integer(ann.get("category_id"))
            except (TypeError, ValueError):
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'category_id' must be an integer, got "
                                 f"{ann.get('category_id')!r}") from None
            if category_id not in label_of:
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'category_id' {ann.get('category_id')!r} is not "
                                 f"in 'categories'")
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                                 f"got {bbox!r}")
            x, y, w, h = bbox
            area = ann.get("area")
            if area is None:  # absent or null: the box's
                area = w * h
            elif not isinstance(area, (int, float)) or not math.isfinite(area):
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'area' must be a finite number, got {area!r}")
            iscrowd = ann.get("iscrowd")
            if iscrowd is None:  # absent or null: no crowd
                iscrowd = 0
            elif iscrowd not in (0, 1, "0", "1"):  # 0 == False == 0.0; not bool(): the string "0" would be a crowd
                raise ValueError(f"{ann_file}: annotation {ann_id}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
            per_image[position[ann["image_id"]]].append(
                ([x, y, x + w, y + h], label_of[category_id], int(iscrowd), area, f"annotation {ann_id}"))

        counts = {}
        self.boxes, self.labels, self.iscrowd, self.areas = [], [], [], []
        for img, anns in zip(self.images, per_image):
            boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
            keep = clean_boxes(boxes, img["width"], img["height"], counts, [a[4] for a in anns])
            if drop_crowd:
                keep &= np.array([a[2] == 0 for a in anns], dtype=bool)
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
        if self.proposals is not None:  # R-CNN, Fast R-CNN: attach_proposals
            target["proposals"] = torch.from_numpy(self.proposals[index])
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


def read_xml(path: str):
    """The root element of an annotation file, its tags without a namespace (an export that declares one, <annotation
    xmlns="...">, would otherwise hide every object from findall("object")); corrupt xml stops naming the file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: corrupt xml ({e})") from None
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]
    return root


class VocDetection(torch.utils.data.Dataset):
    """Pascal VOC layout: root/Annotations/<id>.xml, root/JPEGImages/<id>.jpg, root/ImageSets/Main/<split>.txt.

    A line of the split file is an id: the whole line (stripped) when Annotations/<line>.xml exists, so that ids may
    hold spaces ("IMG 001"), else its first word, as in VOC's per-class split files ("000005 -1"). An id may name a
    subfolder ("sub/d": Annotations/sub/d.xml, JPEGImages/sub/d.jpg, else the xml's 'filename' in JPEGImages/sub/).
    `difficult` objects are kept, flagged in the target (VOC AP ignores them). Class names: `class_names` if given, else
    the names in the xml files under Annotations/ (subfolders included), sorted (VOC's 20 thus in VOC's order), so
    that every split of one root gets the same labels. `image_id` is the position in the split
    file; `ids[i]` is the id as in the split file.
    """
    proposals = None  # one float32 [R, 4] array per image, set by attach_proposals

    def __init__(self, root, split="trainval", transforms=None, class_names=None):
        self.root, self.split, self.transforms = root, split, transforms
        split_file = self.source = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            folder = os.path.dirname(split_file)
            there = (f"there: {', '.join(sorted(f[:-4] for f in os.listdir(folder) if f.endswith('.txt'))) or 'none'}"
                     if os.path.isdir(folder) else "no folder ImageSets/Main/")
            jsons = any(f.endswith(".json") for _, _, names in os.walk(root) for f in names)  # (the first ends it)
            coco = any(os.path.isfile(os.path.join(root, "annotations", f"instances_{s}.json"))
                       for s in ("train2017", "train"))  # where --data coco looks by itself
            inside = [os.path.join(root, d) for d in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
                      if os.path.isdir(os.path.join(root, d, "ImageSets"))]  # VOCdevkit/ given for VOCdevkit/VOC2007/
            raise FileNotFoundError(f"{split_file}: split file not found (split {split!r}; {there}); a split file "
                                    "lists image ids, one per line, without extension (Annotations/<id>.xml)"
                                    + ("; for the COCO json there: --data coco" + ("" if coco else
                                       " --train-ann F --val-ann F") if jsons else "")
                                    + (f"; the VOC folder inside: --data-root {inside[0]}" if inside else ""))
        ann_dir = os.path.join(root, "Annotations")
        with open(split_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Notepad's) is skipped
            lines = [line.strip() for line in f if line.strip()]

        # an id: the whole line when it names an xml (ids with spaces), else the first word (per-class files:
        # "000005 -1"), without an extension where one was written ("000005.jpg") and its xml is there
        def voc_id(line):
            if os.path.isfile(os.path.join(ann_dir, f"{line}.xml")):
                return line
            stem, ext = os.path.splitext(word := line.split()[0])
            known = ext.lower() in IMAGE_EXTENSIONS + (".xml",) and os.path.isfile(os.path.join(ann_dir, f"{stem}.xml"))
            return stem if known else word
        self.ids = [voc_id(line) for line in lines]
        records = [self._parse(os.path.join(ann_dir, f"{i}.xml"), i) for i in self.ids]
        sizes = check_images([rec["image"] for rec in records],  # some exports write <width>0</width>: the image's
                             [(rec["width"], rec["height"]) if rec["width"] > 0 and rec["height"] > 0 else None
                              for rec in records], split_file, [f"{rec['xml']} 'size'" for rec in records])
        for rec, (width, height) in zip(records, sizes):
            rec["width"], rec["height"] = width, height

        if class_names is None:
            found = {o[0] for rec in records for o in rec["objects"]}
            split_ids = set(self.ids)
            # all splits of this root, subfolders too (ids "sub/d"), so that train and val share labels; sorted: the
            # same first corrupt file on every machine
            paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(ann_dir) for name in names)
            for path in paths:
                if path.endswith(".xml") and os.path.relpath(path, ann_dir)[:-4].replace(os.sep, "/") not in split_ids:
                    found.update((o.findtext("name") or "").strip() for o in read_xml(path).iter("object"))
            found.discard("")
            class_names = sorted(found)  # (VOC's 20 sorted are in VOC's order: aeroplane ... tvmonitor)
            warn_same_names(class_names, ann_dir)
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

    def _parse(self, xml_file, image_id):
        """An annotation file and its id (the split file's, e.g. "sub/d") -> {"xml", "image", "width", "height",
        "objects": [(name, x1, y1, x2, y2, difficult)]}."""
        if not os.path.isfile(xml_file):
            raise FileNotFoundError(f"{xml_file}: annotation file not found")
        root = read_xml(xml_file)
        image = os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")  # the id's subfolder, if any, kept
        if not os.path.isfile(image) and root.findtext("filename"):  # e.g. PNG datasets; in the id's subfolder
            image = os.path.join(self.root, "JPEGImages", os.path.dirname(image_id), root.findtext("filename").strip())
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{xml_file}: image {image} not found (field 'filename')")
        try:
            # an empty <width/> is a missing one (0): the image's own size, as without <size>
            width, height = (int(float(root.findtext(f"size/{k}", "").strip() or 0)) for k in ("width", "height"))
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
                if not all(map(math.isfinite, (x1, y1, x2, y2))):
                    raise ValueError(f"not finite: {x1}, {y1}, {x2}, {y2}")
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
        if self.proposals is not None:  # R-CNN, Fast R-CNN: attach_proposals
            target["proposals"] = torch.from_numpy(self.proposals[index])
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
    if "proposals" in target:
        p = target["proposals"]
        target["proposals"] = torch.stack([width - p[:, 2], p[:, 1], width - p[:, 0], p[:, 3]], dim=1)
    return image.flip(-1), target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()).item() < self.p:  # torch's RNG: seeded per image by make_loader
            return hflip(image, target)
        return image, target


PER_BOX = ("labels", "iscrowd", "difficult")  # the target's fields with one value per box, besides "boxes"


def per_box_fields(inputs):
    """labels_getter for torchvision.transforms.v2.SanitizeBoundingBoxes on (image, target): every per-box field of
    the target, so that a box removed by a crop takes its label, iscrowd and difficult flag with it."""
    return tuple(inputs[1][k] for k in PER_BOX if k in inputs[1])


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
# --- Selective search ---
# Region proposals for R-CNN and Fast R-CNN: Uijlings, van de Sande, Gevers, Smeulders, "Selective Search for Object
# Recognition", IJCV 2013, as R-CNN ran it (rbgirshick/rcnn selective_search/selective_search_boxes.m calls Uijlings'
# IJCV code). Proposals are data: computed once per image and cached per split, or brought along as a file
# (attach_proposals).

SELECTIVE_SEARCH_MODES = {  # colour spaces, Felzenszwalb's k (min_size = k, sigma 0.8), similarity strategies
    "fast": (("hsv", "lab"), (50, 100), (("colour", "texture", "size", "fill"), ("texture", "size", "fill"))),
    "quality": (("hsv", "lab", "rgi", "h", "intensity"), (50, 100, 150, 300),
                (("colour", "texture", "size", "fill"), ("texture", "size", "fill"), ("fill",), ("size",))),
}


def selective_search(image, mode="fast", side=500, min_box_size=20, seed=0):
    """Selective search proposals of one image: float [3, H, W] RGB in [0, 1] -> float [N, 4] boxes x1, y1, x2, y2 in
    the image's pixels (continuous coordinates, as the datasets' boxes), best first, without duplicates.

    mode: "fast" is R-CNN's (HSV and Lab, k 50 and 100, strategies colour+texture+size+fill and texture+size+fill: 4
    segmentations, 8 hierarchies); "quality" Uijlings' quality mode (5 colour spaces, 4 k, 4 strategies). side: the
    image is first resized so that its longer side is this many pixels (0: left as it is), the boxes mapped back: the
    segmentation's k and min_size are in pixels, and R-CNN ran on VOC's ~500x375 images (its selective_search_boxes.m
    has the same option, im_width). Boxes narrower or lower than min_box_size pixels are dropped (R-CNN: 20). Ranking as
    Uijlings': in each hierarchy the n merged regions get priorities n..1 in the order they were made (the whole image
    1), the initial regions n + 1; times a uniform random number (seeded by seed); ascending."""
    colour_spaces, ks, strategies = SELECTIVE_SEARCH_MODES[mode]
    height, width = image.shape[-2:]
    if side and max(height, width) != side:
        scale = side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
    rgb = (image.float() * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # [3, h, w], as Uijlings' im2uint8
    h, w = rgb.shape[1:]
    all_boxes, priorities = [], []
    for space in colour_spaces:
        converted = to_colour_space(rgb, space)  # [3, h, w] in 0..255
        edges = grid_graph(gaussian_smooth(converted, 0.8))
        texture = texture_maps(converted / 255.0)
        for k in ks:
            labels = felzenszwalb(edges, (h, w), k, min_size=k)  # [h, w] in 0..n-1
            regions = region_features(labels, converted / 255.0, texture)
            for strategy in strategies:
                merged = hierarchical_grouping(regions, strategy, h * w)  # [n - 1, 4] in merge order
                all_boxes.append(merged)
                priorities.append(np.arange(len(merged), 0, -1, dtype=np.float64))
            all_boxes.append(regions["boxes"])  # the initial regions, once per segmentation
            priorities.append(np.full(len(regions["boxes"]), len(regions["boxes"]), dtype=np.float64))
    boxes, priority = np.concatenate(all_boxes), np.concatenate(priorities)
    boxes = boxes[np.argsort(priority * np.random.default_rng(seed).random(len(priority)), kind="stable")]
    boxes = boxes * np.array([width / w, height / h, width / w, height / h])  # [N, 4] in the input image's pixels
    boxes = boxes[((boxes[:, 2:] - boxes[:, :2]) >= min_box_size).all(1)]
    _, first = np.unique(boxes, axis=0, return_index=True)  # duplicates: the best ranked one stays
    return torch.from_numpy(boxes[np.sort(first)]).float()


def to_colour_space(rgb, space):
    """uint8 [3, H, W] RGB -> float64 [3, H, W] in 0..255, rounded to integers as Uijlings' Image2ColourSpace (uint8
    images). hsv: H, S, V each scaled to 0..255 (hue wraps around at red); lab: CIE L*a*b* (D65) as 8-bit Lab
    (L * 255 / 100, a + 128, b + 128); rgi: normalised r, g and intensity; h, intensity: one channel, three times."""
    r, g, b = x = rgb.astype(np.float64) / 255.0
    if space in ("hsv", "h"):
        high, delta = x.max(0), x.max(0) - x.min(0)
        d = np.where(delta > 0, delta, 1.0)
        hue = np.where(high == r, (g - b) / d, np.where(high == g, 2 + (b - r) / d, 4 + (r - g) / d)) / 6 % 1.0
        hue = np.where(delta > 0, hue, 0.0)
        saturation = np.where(high > 0, delta / np.where(high > 0, high, 1.0), 0.0)
        out = [hue, saturation, high] if space == "hsv" else [hue] * 3
    elif space == "lab":
        linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)  # sRGB -> linear RGB
        xyz = np.tensordot(np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                                     [0.019334, 0.119193, 0.950227]]), linear, 1)
        xyz /= np.array([0.950456, 1.0, 1.088754])[:, None, None]  # D65 white
        f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
        out = [(116 * f[1] - 16) / 100, (500 * (f[0] - f[1]) + 128) / 255, (200 * (f[1] - f[2]) + 128) / 255]
    elif space == "rgi":
        total = r + g + b
        t = np.where(total > 0, total, 1.0)
        out = [np.where(total > 0, r / t, 1 / 3), np.where(total > 0, g / t, 1 / 3), total / 3]
    elif space == "intensity":
        out = [0.2989 * r + 0.5870 * g + 0.1140 * b] * 3
    else:
        raise ValueError(f"unknown colour space {space!r}")
    return np.clip(np.round(np.stack(out) * 255), 0, 255)


def gaussian_smooth(image, sigma):
    """Felzenszwalb's smoothing of each channel of [C, H, W]: a normalised Gaussian of half-width ceil(4 sigma), along x
    then y, borders repeated. float32, as their code."""
    half = int(math.ceil(4 * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    x = scipy.ndimage.correlate1d(image.astype(np.float32), taps, axis=2, mode="nearest")
    return scipy.ndimage.correlate1d(x, taps, axis=1, mode="nearest")


def grid_graph(image):
    """The pixel graph of Felzenszwalb's segmentation: every pixel of [C, H, W] joined to its right, lower, lower-right
    and upper-right neighbours, weight the Euclidean distance of the C values. Returns (a, b, w) sorted by weight:
    pixel indices y * W + x int64 [E] and float64 weights [E], rounded to 1/128 so that a radix sort orders them
    (np.argsort of uint16, stable: ties stay in edge order)."""
    _, height, width = image.shape
    index = np.arange(height * width, dtype=np.int64).reshape(height, width)
    a, b, w = [], [], []
    for (ya, xa), (yb, xb) in (((slice(None), slice(0, -1)), (slice(None), slice(1, None))),  # right
                               ((slice(0, -1), slice(None)), (slice(1, None), slice(None))),  # down
                               ((slice(0, -1), slice(0, -1)), (slice(1, None), slice(1, None))),  # down-right
                               ((slice(1, None), slice(0, -1)), (slice(0, -1), slice(1, None)))):  # up-right
        a.append(index[ya, xa].ravel())
        b.append(index[yb, xb].ravel())
        w.append(np.sqrt(((image[:, ya, xa] - image[:, yb, xb]) ** 2).sum(0)).ravel())
    weight = np.round(np.concatenate(w) * 128).astype(np.uint16)  # at most 255 * sqrt(3) * 128 < 2 ** 16
    order = np.argsort(weight, kind="stable")
    return np.concatenate(a)[order], np.concatenate(b)[order], weight[order] / 128.0


def felzenszwalb(edges, shape, k, min_size, block=2048):
    """Felzenszwalb and Huttenlocher, "Efficient Graph-Based Image Segmentation", IJCV 2004: edges (a, b, w) of
    grid_graph, the image shape (H, W) -> labels int64 [H, W] in 0..n-1.

    The algorithm goes through the edges in order (Kruskal) and joins the components A and B of an edge of weight w
    when w <= min(Int(A) + k / |A|, Int(B) + k / |B|), Int the largest weight joined inside a component so far; then,
    in the same order, joins the components of an edge where one of them is smaller than min_size.

    A Python loop over the 750,000 edges of a 500x375 image takes seconds, so the first pass goes through them in
    blocks of `block` edges, decided together from the components at the block's start. That is the loop's decision
    for every edge whose two components no earlier edge of the block may have changed: edges joined in the block
    "taint" their components from their position on, and so does any edge touching a tainted component (it may join,
    once the earlier ones have) - a fixed point of a few vectorised steps. The untainted edges are applied at once (the
    joined ones touch disjoint components), then the tainted ones one by one in order, which sees exactly the states
    the loop would. The second pass needs only the first edge between each pair of components: a later one finds them
    joined, or both already at least min_size. The result is the loop's partition, edge for edge; test_models.py
    checks it against the plain loop.
    """
    a, b, w = edges
    n = shape[0] * shape[1]
    parent = np.arange(n)  # union-find forest; roots are components
    size = np.ones(n)
    threshold = np.full(n, float(k))  # Int(C) + k / |C| of each root
    taint = torch.full((n,), len(a), dtype=torch.int64)  # scratch: first position in the block that may change a root
    ends = np.stack([a, b], 1)  # [E, 2]
    for start in range(0, len(a), block):
        roots = _find(parent, ends[start:start + block].ravel()).reshape(-1, 2)  # [m, 2]
        ra, rb, ew = roots[:, 0], roots[:, 1], w[start:start + block]
        cross = ra != rb
        join = cross & (ew <= threshold[ra]) & (ew <= threshold[rb])  # the decisions with the block-start states
        if not join.any():
            continue  # nothing changes: every decision is right
        pos, troots, tcross = torch.arange(len(ew)), torch.from_numpy(roots), torch.from_numpy(cross)
        tainted = torch.zeros(len(ew), dtype=torch.bool)
        changing = torch.from_numpy(join)
        while True:  # taint spreads along the block's edges, in order, until nothing changes
            taint.scatter_reduce_(0, troots[changing].ravel(), pos[changing].repeat_interleave(2), "amin")
            new = tcross & (taint[troots].min(1).values < pos) & ~tainted
            if not new.any():
                break
            tainted |= new
            changing = new
        taint[troots.ravel()] = len(a)
        tainted = tainted.numpy()
        safe = join & ~tainted  # decided: joins of disjoint component pairs
        big, small = np.where(size[ra] >= size[rb], ra, rb)[safe], np.where(size[ra] >= size[rb], rb, ra)[safe]
        parent[small] = big  # union by size: the forest stays shallow
        size[big] += size[small]
        threshold[big] = ew[safe] + k / size[big]
        if tainted.any():  # one by one, in order, on a small union-find of the roots involved
            ua, ub = _find(parent, a[start:start + block][tainted]), _find(parent, b[start:start + block][tainted])
            roots = np.unique(np.concatenate([ua, ub]))
            up, us, ut = list(range(len(roots))), size[roots].tolist(), threshold[roots].tolist()
            for u, v, weight in zip(np.searchsorted(roots, ua).tolist(), np.searchsorted(roots, ub).tolist(),
                                    ew[tainted].tolist()):
                while up[u] != u:
                    u = up[u]
                while up[v] != v:
                    v = up[v]
                if u != v and weight <= ut[u] and weight <= ut[v]:
                    u, v = (u, v) if us[u] >= us[v] else (v, u)
                    up[v] = u
                    us[u] += us[v]
                    ut[u] = weight + k / us[u]
            up = np.array(up)
            parent[roots] = roots[_find(up, np.arange(len(roots)))]
            size[roots], threshold[roots] = us, ut  # (only the roots' values are ever read)
    labels = _find(parent, np.arange(n))
    # second pass: small components join along the first edge to each neighbour, in order
    la, lb = labels[a], labels[b]
    cross = la != lb
    la, lb = la[cross], lb[cross]
    _, first = np.unique(np.minimum(la, lb) * n + np.maximum(la, lb), return_index=True)
    first.sort()
    roots = np.unique(labels)
    la, lb = np.searchsorted(roots, la[first]), np.searchsorted(roots, lb[first])
    up, us = list(range(len(roots))), size[roots].tolist()
    for u, v in zip(la.tolist(), lb.tolist()):
        while up[u] != u:
            u = up[u]
        while up[v] != v:
            v = up[v]
        if u != v and (us[u] < min_size or us[v] < min_size):
            up[v] = u
            us[u] += us[v]
    remap = np.zeros(n, dtype=np.int64)
    remap[roots] = _find(np.array(up), np.arange(len(roots)))
    _, labels = np.unique(remap[labels], return_inverse=True)
    return labels.reshape(shape)


def _find(parent, x):
    """Roots of the elements x in the union-find forest parent (vectorised pointer chasing), compressing their paths."""
    root = parent[x]
    while True:
        up = parent[root]
        if (up == root).all():
            break
        root = up
    parent[x] = root
    return root


def texture_maps(image):
    """Uijlings' texture: Gaussian derivatives (sigma 1) of each channel of [C, H, W] in 8 orientations (x, y and the
    two diagonals, each split into its positive and negative part), each scaled by its image maximum to [0, 1] ->
    [8 C, H, W]."""
    x = np.arange(-4, 5)
    gauss = np.exp(-0.5 * x ** 2)
    gauss /= gauss.sum()
    maps = []
    for channel in image:
        dx = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(channel, -x * gauss, axis=1, mode="nearest"), gauss,
                                       axis=0, mode="nearest")
        dy = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(channel, gauss, axis=1, mode="nearest"), -x * gauss,
                                       axis=0, mode="nearest")
        for d in (dx, dy, (dx + dy) * math.sqrt(0.5), (dx - dy) * math.sqrt(0.5)):  # a Gaussian derivative steers
            for part in (np.maximum(d, 0), np.maximum(-d, 0)):
                maps.append(part / max(part.max(), 1e-12))
    return np.stack(maps)


def region_features(labels, colour, texture):
    """What the grouping needs of the n regions of labels [H, W]: size [n], boxes [n, 4] (x1, y1, x2, y2 covering their
    pixels), L1-normalised colour histograms [n, 25 C] of colour [C, H, W] in [0, 1] and texture histograms [n, 10 T]
    of texture [T, H, W] in [0, 1], and the neighbouring pairs [P, 2] (i < j, 4-connected)."""
    height, width = labels.shape
    n = int(labels.max()) + 1
    flat = torch.from_numpy(labels.ravel())
    ys, xs = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    boxes = torch.stack([torch.full((n,), width).scatter_reduce_(0, flat, xs, "amin"),
                         torch.full((n,), height).scatter_reduce_(0, flat, ys, "amin"),
                         torch.zeros(n, dtype=torch.int64).scatter_reduce_(0, flat, xs, "amax") + 1,
                         torch.zeros(n, dtype=torch.int64).scatter_reduce_(0, flat, ys, "amax") + 1], 1)

    def histograms(maps, bins):  # [M, H, W] in [0, 1] -> [n, bins * M], rows sum to 1
        index = np.minimum((maps.reshape(len(maps), -1) * bins).astype(np.int64), bins - 1)  # [M, H * W]
        index += (labels.ravel() * (bins * len(maps)))[None] + (np.arange(len(maps)) * bins)[:, None]
        counts = np.bincount(index.ravel(), minlength=n * bins * len(maps)).reshape(n, -1).astype(np.float64)
        return counts / counts.sum(1, keepdims=True)

    pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                            np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1)])
    pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], 1)
    pairs = np.unique(pairs[:, 0] * n + pairs[:, 1])
    pairs = np.stack([pairs // n, pairs % n], 1)
    return {"size": np.bincount(labels.ravel(), minlength=n).astype(np.float64),
            "boxes": boxes.numpy().astype(np.float64), "colour": histograms(colour, 25),
            "texture": histograms(texture, 10), "pairs": pairs}


def hierarchical_grouping(regions, strategy, image_area):
    """Uijlings' greedy grouping: join the two most similar neighbouring regions, again and again, until one is left.
    Similarity: the sum of the strategy's terms, each in [0, 1]: colour and texture (histogram intersection), size
    (1 - joint size / image area, small regions first) and fill (1 - the gap left in their joint box / image area).
    A joined region's histograms are the size-weighted means. Returns the boxes of the joined regions in the order
    they were made [n - 1, 4] (fewer if the regions are not all connected)."""
    n = len(regions["size"])
    size, boxes = np.zeros(2 * n - 1), np.zeros((2 * n - 1, 4))
    size[:n], boxes[:n] = regions["size"], regions["boxes"]
    hists = {name: np.zeros((2 * n - 1, regions[name].shape[1])) for name in ("colour", "texture") if name in strategy}
    for name, h in hists.items():
        h[:n] = regions[name]

    def similarity(i, j):  # region indices i, j [P] -> [P]
        s = np.zeros(len(i))
        for h in hists.values():
            s += np.minimum(h[i], h[j]).sum(1)
        if "size" in strategy:
            s += 1 - (size[i] + size[j]) / image_area
        if "fill" in strategy:
            joint = (np.maximum(boxes[i, 2], boxes[j, 2]) - np.minimum(boxes[i, 0], boxes[j, 0])) * (
                np.maximum(boxes[i, 3], boxes[j, 3]) - np.minimum(boxes[i, 1], boxes[j, 1]))
            s += 1 - (joint - size[i] - size[j]) / image_area
        return s

    i, j = regions["pairs"].T
    heap = list(zip((-similarity(i, j)).tolist(), i.tolist(), j.tolist()))  # most similar first; stale pairs skipped
    heapq.heapify(heap)
    neighbours = [set() for _ in range(2 * n - 1)]
    for p, q in regions["pairs"].tolist():
        neighbours[p].add(q)
        neighbours[q].add(p)
    alive = np.ones(2 * n - 1, dtype=bool)
    new = n
    while heap:
        _, p, q = heapq.heappop(heap)
        if not (alive[p] and alive[q]):
            continue
        alive[p] = alive[q] = False
        size[new] = size[p] + size[q]
        for h in hists.values():
            h[new] = (h[p] * size[p] + h[q] * size[q]) / size[new]
        boxes[new] = np.concatenate([np.minimum(boxes[p, :2], boxes[q, :2]), np.maximum(boxes[p, 2:], boxes[q, 2:])])
        around = (neighbours[p] | neighbours[q]) - {p, q}
        for r in around:
            neighbours[r] -= {p, q}
            neighbours[r].add(new)
        neighbours[new] = around
        if around:
            others = np.fromiter(around, np.int64, len(around))
            for s, r in zip(similarity(np.full(len(others), new), others).tolist(), others.tolist()):
                heapq.heappush(heap, (-s, new, r))
        new += 1
    return boxes[n:new]


def image_keys(dataset):
    """The name of each image of a dataset in a proposals file: a VOC image's id (as in the split file: "000005"),
    a COCO image's id (str), a synthetic image's index (str)."""
    if isinstance(dataset, VocDetection):
        return list(dataset.ids)
    if isinstance(dataset, CocoDetection):
        return [str(img["id"]) for img in dataset.images]
    return [str(i) for i in range(len(dataset))]


def save_proposals(path, keys, boxes, meta=None):
    """Write a proposals file (the format load_proposals reads): an .npz holding, for each image, an array named by its
    key (image_keys), float32 [R, 4] x1, y1, x2, y2 in the image's pixels, best first; meta (a dict) is kept as JSON
    under "__meta__". Written to a temporary file and renamed."""
    arrays = {key: np.asarray(b, dtype=np.float32).reshape(-1, 4) for key, b in zip(keys, boxes)}
    if meta is not None:
        arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def load_proposals(path, dataset):
    """A proposals file for a dataset -> one float32 array [R_i, 4] per image, in dataset order.

    The format (what selective_search writes to its cache, and what a dataset may bring): .npz with one array per
    image, or .json with one list per image, named by the image's key (image_keys: VOC the image id, COCO the image id,
    synthetic the index); each row a box x1, y1, x2, y2 in the image's pixels, 0-based continuous coordinates (the
    targets' convention: a box covering pixel columns 0..9 is x1 0, x2 10), best first. MATLAB/VOC boxes (1-based,
    inclusive) are x1 - 1, y1 - 1, x2, y2 here; the original selective-search .mat files store y1, x1, y2, x2.
    """
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        else:
            stored = np.load(path, allow_pickle=False)
            if not isinstance(stored, np.lib.npyio.NpzFile):  # a .npy: one array, not one per image
                raise ValueError("expected an .npz of one array per image, or a .json")
            with stored as f:
                stored = {key: f[key] for key in f.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: proposals file not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read proposals ({e})") from None
    out = []
    for key in image_keys(dataset):
        if key not in stored:
            raise ValueError(f"{path}: no proposals for image {key!r} of {dataset.source} (a file names its images "
                             f"by {'id' if isinstance(dataset, (VocDetection, CocoDetection)) else 'index'})")
        what = f"{path}: image {key!r}: proposals must be finite [R, 4] x1, y1, x2, y2, got"
        try:
            boxes = np.asarray(stored[key], dtype=np.float32)
        except (TypeError, ValueError) as e:  # e.g. rows of different lengths in a .json
            raise ValueError(f"{what} {e}") from None
        if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all()):
            raise ValueError(f"{what} shape {boxes.shape}")
        out.append(boxes.reshape(-1, 4))
    return out


_PROPOSAL_JOB = None  # (dataset, keyword arguments) in a worker process of compute_proposals


def _proposal_worker_init(dataset, kwargs):
    global _PROPOSAL_JOB
    torch.set_num_threads(1)  # one image per process: threads would only compete
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (Pool.terminate's; not the main process's handler, forked)
    _PROPOSAL_JOB = (dataset, kwargs)


def _proposals_of(index):
    dataset, kwargs = _PROPOSAL_JOB
    return selective_search(dataset[index][0], **kwargs).numpy()


def compute_proposals(dataset, workers=0, **kwargs):
    """selective_search(image, **kwargs) of every image of a dataset (its transforms left out), in `workers`
    processes (0 or 1: in this one), with a progress line on stderr. -> list of float32 [R_i, 4] numpy arrays."""
    global _PROPOSAL_JOB
    transforms, dataset.transforms = getattr(dataset, "transforms", None), None
    workers = min(workers, os.cpu_count() or 1, len(dataset))
    results, tic, pool = [], time.perf_counter(), None
    # Ctrl-C or SIGTERM (a scheduler's; unless train() handles it already): the workers are stopped, and one line says
    # what was lost
    own_sigterm = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and threading.current_thread() is \
        threading.main_thread()
    own_sigterm and signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if workers > 1:  # fork: the dataset is inherited, not pickled
            pool = multiprocessing.get_context("fork").Pool(workers, _proposal_worker_init, (dataset, kwargs))
            chunk = max(1, min(16, len(dataset) // (8 * workers)))
            for boxes in pool.imap(_proposals_of, range(len(dataset)), chunksize=chunk):
                results.append(boxes)
                _progress(dataset, results, tic, workers)
        else:
            _PROPOSAL_JOB = (dataset, kwargs)
            for i in range(len(dataset)):
                results.append(_proposals_of(i))
                _progress(dataset, results, tic, 1)
    except KeyboardInterrupt:
        raise SystemExit(f"\nstopped during the selective search of {dataset.source} ({len(results)} of {len(dataset)} "
                         "images; nothing saved): the same command starts it again") from None
    finally:
        if pool is not None:
            pool.terminate()  # (done or not: no worker left behind)
            pool.join()
        own_sigterm and signal.signal(signal.SIGTERM, signal.SIG_DFL)
        dataset.transforms, _PROPOSAL_JOB = transforms, None
    return results


def _progress(dataset, results, tic, workers):
    elapsed = time.perf_counter() - tic
    if elapsed > 2 and (len(results) % 50 == 0 or len(results) == len(dataset)):
        print(f"\r{dataset.source}: selective search {len(results)}/{len(dataset)} images, {workers} processes, "
              f"{elapsed / len(results):.2f} s per image, {np.mean([len(r) for r in results]):.0f} boxes per image",
              end="\n" if len(results) == len(dataset) else "", file=sys.stderr, flush=True)


def attach_proposals(dataset, given="", cache="", workers=0, collective=True, search=True, **kwargs):
    """Give every item of a dataset its proposals: target["proposals"] float [R, 4] (image pixels, best first).

    given: a proposals file the dataset brings (load_proposals states the format). Otherwise selective_search(image,
    **kwargs) of every image, computed once in `workers` processes and kept in the file `cache` (an .npz, also in that
    format), which later runs reuse as long as it was made for the same images (keys, file names and sizes) with the
    same settings. Under torch.distributed (collective), rank 0 computes and the other ranks wait, then read it.
    search=False: none attached when there is no such file (the model then searches the images it is given)."""
    if given:
        dataset.proposals = load_proposals(given, dataset)
        return
    files = [(img.get("file_name"), img.get("width"), img.get("height")) for img in getattr(dataset, "images", [])]
    meta = {"source": dataset.source, "images": image_keys(dataset),  # and which files they are (a re-exported json)
            "files": hashlib.sha1(json.dumps(files).encode()).hexdigest(), **kwargs}
    distributed = collective and search and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:  # (search=False: nothing computed, so nothing to wait for)
        torch.distributed.barrier()  # rank 0 computes the file first
    try:
        with np.load(cache, allow_pickle=False) as f:
            fresh = "__meta__" in f.files and json.loads(str(f["__meta__"])) == json.loads(json.dumps(meta))
    except (OSError, ValueError):
        fresh = False
    if not fresh and not search:
        return
    if not fresh and not (distributed and torch.distributed.get_rank() != 0):
        boxes = compute_proposals(dataset, workers, **kwargs)
        save_proposals(cache, meta["images"], boxes, meta)
    if distributed and torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    dataset.proposals = load_proposals(cache, dataset)


# --- Loaders ---

def warmup_steps(cfg, steps_per_epoch):
    """The linear warmup's steps: cfg.warmup_iters, at most a third of the run. Warns (rank 0) when it shortens them,
    and when no epoch of cfg.lr_steps falls within the run: its lr would never drop."""
    total = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_iters, total // 3)
    if int(os.environ.get("RANK", 0)) == 0:
        if warmup < cfg.warmup_iters:
            warnings.warn(f"warmup_iters {cfg.warmup_iters} is over a third of the {total} steps: shortened to "
                          f"{warmup}")
        if cfg.lr_steps and min(cfg.lr_steps) >= cfg.epochs:
            warnings.warn(f"lr_steps {tuple(cfg.lr_steps)}: none within the {cfg.epochs} epochs, the lr never drops")
    return warmup


def collate_fn(batch):
    """[(image, target), ...] -> (list of images [3, H_i, W_i], list of targets): detection images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_device(targets, device):
    """Targets' tensors to `device` (asynchronously from pinned memory)."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def seed_everything(*keys):
    """Seed python, numpy and torch (CPU and CUDA) from a tuple of integers, e.g. (seed, epoch, index)."""
    seed = int(np.random.SeedSequence((len(keys), *keys)).generate_state(1)[0])  # len: (s,) and (s, 0) differ
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


def resume_state(obj, state):
    """--resume: obj.load_state_dict(state) with this run's settings, which are the run's own unless a flag changed
    them (--lr, --weight-decay, --momentum): an optimizer takes its saved state (momentum buffers, Adam's moments) and
    keeps its groups' settings; a LambdaLR takes its step count and keeps its base lrs, and sets each group's lr for
    that step: the lr the new settings would have there (the run's own lr when no flag changed them)."""
    if isinstance(obj, torch.optim.Optimizer):
        def kind(group):  # SGD's momentum is not Adam's moments; Adam's L2 decay is not AdamW's decoupled one
            return "SGD" if "betas" not in group else "AdamW" if group["decoupled_weight_decay"] else "Adam"
        if (run := kind(state["param_groups"][0])) != (here := kind(obj.param_groups[0])):
            raise SystemExit(f"--resume: the run's optimizer was {run}, not {here}: resume with the run's --optimizer")
        if (theirs := [len(g["params"]) for g in state["param_groups"]]) != (ours := [len(g["params"]) for g in
                                                                               obj.param_groups]):
            raise SystemExit(f"--resume: the run trained other parameters (groups of {theirs} tensors, here {ours}): "
                             "resume with the run's settings of what is trained (e.g. --lr-backbone, --frozen-stages)")
        state = {**state, "param_groups": [{**saved, **{k: v for k, v in group.items() if k != "params"}}
                                           for saved, group in zip(state["param_groups"], obj.param_groups)]}
    base_lrs = getattr(obj, "base_lrs", None)
    obj.load_state_dict(state)
    if isinstance(obj, torch.optim.lr_scheduler.LambdaLR):
        obj.base_lrs = base_lrs
        for group, base_lr, lr_lambda in zip(obj.optimizer.param_groups, base_lrs, obj.lr_lambdas):
            group["lr"] = base_lr * lr_lambda(obj.last_epoch)


def load_checkpoint(path, flag="--weights"):
    """torch.load of a checkpoint or state dict file (weights only, to the CPU); None where there is no such file (a
    name: torchvision's weights), a pickled object that is not plain tensors (a released yolov5s.pt), another kind of
    file (text: KeyError) or an empty dict. Stops with one line naming `flag` for a file cut short or empty, and for
    --resume anything but a model file's."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, pickle.UnpicklingError, KeyError):  # the caller says what it is
        checkpoint = None
    except Exception as e:  # cut short (a copy or download that stopped), empty: torch's words, shortened
        raise SystemExit(f"{flag} {path}: not a whole file of torch.save ({repr(e)[:150]})") from None
    if flag == "--resume" and not (isinstance(checkpoint, dict) and "detector" in checkpoint):
        raise SystemExit(f"--resume {path}: {'not' if os.path.exists(path) else 'no'} last.pt of a run")
    return checkpoint if isinstance(checkpoint, dict) and checkpoint else None


def check_out_folder(out, resume):
    """Stops with one line when a run would write into a folder that holds another run's last.pt (never replaced): a
    new run, or a resumed one whose --out is not the folder of the checkpoint it resumes. A run resumed into another
    folder goes on there with its best.pt and its log (rank 0 copies them), so that the folder holds the whole run."""
    last = os.path.join(out, "last.pt")
    here = resume and os.path.realpath(os.path.dirname(resume)) == os.path.realpath(out)
    if os.path.isfile(last) and not here:
        raise SystemExit(f"{out} holds a run already (--out): to go on with it, --train --resume {last}; to start "
                         "over, --out ANOTHER_FOLDER or delete that last.pt")
    if resume and not here and os.path.isfile(resume) and int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(out, exist_ok=True)
        for name in ("best.pt", "metrics.jsonl"):
            if os.path.isfile(source := os.path.join(os.path.dirname(resume), name)):
                shutil.copyfile(source, os.path.join(out, name))


def check_resume(checkpoint, path, batch, steps, epochs, accumulate=1):
    """Stops with one line when --resume's checkpoint cannot go on exactly here: weights only (a best.pt), another
    number of images per step (--batch-size x processes), of batches per optimizer step (--accumulate) or of steps per
    epoch (another dataset or --num-train), or nothing left to do (a run that ended: --epochs more to go on)."""
    if "optimizer" not in checkpoint:
        raise SystemExit(f"--resume {path}: weights only (best.pt?): resume from last.pt")
    if checkpoint["epoch"] >= epochs:
        raise SystemExit(f"--resume {path}: the run is complete ({checkpoint['epoch']} of {epochs} epochs): --epochs "
                         "N, more, to train on")
    if (was := checkpoint["config"]["batch_size"] * checkpoint["world_size"]) != batch:
        raise SystemExit(f"--resume {path}: trained {was} images per step (--batch-size x processes), here {batch}: "
                         "resume with as many")
    if (was := checkpoint["config"].get("accumulate", 1)) != accumulate:
        raise SystemExit(f"--resume {path}: trained with --accumulate {was}, here {accumulate}: resume with as many")
    if checkpoint.get("steps", steps) != steps:  # (a checkpoint before 2026-11-29 does not say)
        raise SystemExit(f"--resume {path}: epochs of {checkpoint['steps']} steps, here {steps}: resume on the same "
                         "data")


def steps_per_epoch(dataset, batch_size, world_size=1):
    return math.ceil(len(dataset) / (batch_size * world_size))


def make_loader(dataset, batch_size, train, workers=4, seed=0, epoch=0, start_step=0, rank=0, world_size=1):
    """DataLoader yielding (images, targets) lists.

    train: one epoch. A shuffle drawn from (seed, epoch) is cut into global batches of batch_size x world_size images,
    and this rank takes its batch_size of each; the last global batch is filled up from the start of the shuffle, so
    that every step has batch_size images on every rank. Batches before start_step are skipped (a resumed run). Random
    transforms are seeded per image (SeededItems): an epoch is the same, augmentation included, with any number of
    workers, and resuming mid-epoch continues it exactly; a global batch does not depend on the number of ranks.
    not train: every image once, in order of aspect ratio (h / w) where the dataset knows its sizes (COCO, VOC), as
    YOLOv5's val.py: a batch holds images of like shapes, so less padding (and yolo.py's rectangular batches are
    val.py's); else in order.
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
        sizes = getattr(dataset, "images", None)  # [{"width", "height", ...}] of COCO and VOC
        order = sorted(range(len(dataset)), key=(lambda i: sizes[i]["height"] / sizes[i]["width"]) if sizes else None)
        batches = [order[i: i + batch_size] for i in range(0, len(dataset), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                                       worker_init_fn=worker_init, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, dataset, batch_size, workers, device, class_names=None, out=None):
    """The 12 COCO numbers (common.coco_evaluate) of a detector on a dataset, plus on a VocDetection VOC's mAP@0.5
    (VOC_mAP50) and each class's AP@0.5 (VOC_AP50_<name>).

    out: a folder to write the detections to as well, out/detections.json in COCO's results format with the json's
    own image and category ids (what pycocotools' loadRes and COCO's test-dev server read); for a dataset that is not
    a COCO json (VOC, synthetic), its ground truth in COCO format beside it (out/ground_truth.json) to refer to; and
    each class's AP and AP50 printed.

    model(images) -> detections as in every model file, run in fp32 (exact numbers). class_names: the
    model's, when they are not the dataset's (e.g. torchvision's 91 COCO classes on a COCO json with labels 1..K):
    detections are mapped to the dataset's labels by class name, and those of other classes dropped. Numbers as
    names ("1", "2", ...: a state dict file of a reference's weights, which holds none) are taken as the labels.
    """
    label_map = None  # identity
    unnamed = class_names is not None and _unnamed(class_names)
    if unnamed and len(class_names) != dataset.num_classes:  # e.g. torchvision's weights of another class count
        warnings.warn(f"the model has {len(class_names) - 1} classes, {dataset.source} {dataset.num_classes - 1}: its "
                      f"labels 1..{len(class_names) - 1} are taken as the data's")
    if class_names is not None and tuple(class_names) != tuple(dataset.class_names) and not unnamed:
        names = dataset.class_names
        label_map = {i: names.index(n) for i, n in enumerate(class_names) if i and n in names}
        if unmapped := [n for n in dataset.class_names[1:] if n not in class_names[1:]]:
            warnings.warn(f"no class of the model is named {', '.join(unmapped)}: nothing detected there")
    model.eval()
    results = []
    for images, targets in make_loader(dataset, batch_size, train=False, workers=workers):
        images = [image.to(device, non_blocking=True) for image in images]
        if "proposals" in targets[0]:  # R-CNN, Fast R-CNN: the dataset's proposals (attach_proposals)
            detections = model(images, proposals=[t["proposals"].to(device) for t in targets])
        else:
            detections = model(images)
        for target, det in zip(targets, detections):
            boxes = box_xyxy_to_xywh(det["boxes"].float()).tolist()  # COCO results are [x, y, w, h]
            for box, score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
                if (label := label_map.get(label) if label_map is not None else label) is not None:
                    results.append({"image_id": target["image_id"], "category_id": label, "bbox": box, "score": score})
    gt = dataset.coco_gt()  # its category_id is the dataset's label 1..K
    if out:
        os.makedirs(out, exist_ok=True)
        cat_ids = getattr(dataset, "cat_ids", range(1, dataset.num_classes))  # the json's id of each label
        written = [{**r, "category_id": cat_ids[r["category_id"] - 1]} for r in results
                   if 1 <= r["category_id"] <= len(cat_ids)]  # labels 1..K: not RetinaNet's and FCOS's class 0
        with open(os.path.join(out, "detections.json"), "w") as f:
            json.dump(written, f)
        if not isinstance(dataset, CocoDetection):
            with open(os.path.join(out, "ground_truth.json"), "w") as f:
                json.dump(gt, f)
        print(f"wrote {len(written)} detections to {os.path.join(out, 'detections.json')}"
              + ("" if gt["annotations"] else f" ({dataset.source} has no boxes: the numbers below are -1)"))
    # COCO's rules: VOC's difficult objects count as plain ground truth here ...
    stats = coco_evaluate(gt, results, per_class=bool(out))
    if out and gt["annotations"]:  # --eval: each class's AP too, as YOLOv5's val.py prints them
        print(f"{'class':>12}     AP   AP50\n" + "\n".join(f"{name:>12} {ap:6.3f} {stats['per_class_AP50'][name]:6.3f}"
                                                      for name, ap in stats["per_class"].items()))
    stats = {k: v for k, v in stats.items() if not k.startswith("per_class")}
    if isinstance(dataset, VocDetection):  # ... and VOC's own metric, mAP at IoU 0.5, ignores them; and per class
        voc = voc_evaluate(gt, results)
        stats.update({"VOC_mAP50": voc["mAP"], **{f"VOC_AP50_{k}": v for k, v in voc["per_class"].items()}})
    return stats


def image_files(path, out=None):
    """An image file -> [it]; a folder -> its image files, sorted, hidden ones (macOS's ._x.jpg) left out, a warning
    naming the others. out: the folder their drawings go to under the same names; SystemExit if it is theirs or one
    above it (a drawing could replace an image of its name)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    folder = os.path.realpath(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    if out is not None and os.path.commonpath([real := os.path.realpath(out), folder]) == real:
        raise SystemExit(f"--out {out}: the folder of the images or one above it, where drawings of the same name "
                         "could replace images: choose another")
    if os.path.isfile(path):
        return [path]
    kinds, names = IMAGE_EXTENSIONS, sorted(f for f in os.listdir(path) if f[0] != ".")
    files = [os.path.join(path, f) for f in names if f.lower().endswith(kinds)]
    if not files:
        raise SystemExit(f"{path}: no {', '.join(kinds[:-1])} or {kinds[-1]} file in this folder")
    if others := [f + "/" * os.path.isdir(os.path.join(path, f)) for f in names if not f.lower().endswith(kinds)]:
        warnings.warn(f"{path}: {len(others)} other entries left out (not {', '.join(kinds)}; subfolders are not "
                      f"searched): {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}")
    return files


def predict_inputs(path, out):
    """--predict PATH: (file, image upright as a photo viewer shows it (load_image), out/<its name> to draw to) for each
    image file of image_files(path, out); a file that cannot be read is skipped with a warning that names it."""
    for file in image_files(path, out):
        try:
            image = load_image(file, upright=True)
        except (ValueError, FileNotFoundError) as e:  # load_image's, naming the file (not found: a broken link)
            if os.path.isfile(path):  # the one input given
                raise SystemExit(str(e)) from None
            warnings.warn(f"{e}: skipped")
            continue
        yield file, image, os.path.join(out, os.path.basename(file))


@torch.no_grad()
def predict(model, path, out, class_names, draw_thresh, device):
    """--predict PATH: the detections of model (as evaluate calls it) scoring at least draw_thresh on each image of
    predict_inputs, drawn to out/<its name> with a line each, and written to out/predictions.json: a list, one record
    per image in that order, {"file", "width", "height", "detections": [{"box": [x1, y1, x2, y2] in its pixels,
    "label": 1..K, "class": its name, "score"}, ...]} (YOLOv5's detect.py --save-txt and --save-conf, as one json)."""
    model.eval()
    records = []
    # the model's own cut, before --draw-thresh (YOLOv5's 0.25 as detect.py's, RetinaNet's 0.05 ...): said when lower
    floor = next(((k, getattr(model.cfg, k)) for k in SCORE_FLOORS if hasattr(getattr(model, "cfg", None), k)), None)
    below = f" (the model keeps none below its --{floor[0].replace('_', '-')} {floor[1]})" \
        if floor and floor[1] > draw_thresh else ""
    for file, image, drawn in predict_inputs(path, out):
        det = model([image.to(device)])[0]
        keep = det["scores"] >= draw_thresh
        boxes, labels, scores = det["boxes"][keep].float(), det["labels"][keep], det["scores"][keep].float()
        draw_boxes(image, boxes, labels, scores, class_names, drawn)
        best = f" (the best {float(det['scores'].max()):.3g}: --draw-thresh)" if len(keep) and not keep.any() else ""
        print(f"{file}: {len(boxes)} detections scoring >= {draw_thresh}{best or below} -> {drawn}")
        records.append({"file": file, "width": image.shape[-1], "height": image.shape[-2], "detections": [
            {"box": [round(x, 2) for x in box], "label": label, "score": round(score, 5),
             "class": class_names[label] if 0 <= label < len(class_names) else str(label)}
            for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist())]})
    os.makedirs(out, exist_ok=True)  # (also when every file was skipped)
    with open(os.path.join(out, "predictions.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote the detections of {len(records)} image{'s' * (len(records) != 1)} to "
          f"{os.path.join(out, 'predictions.json')}")


def _unnamed(class_names):
    """Class names that are the labels' numbers ("1", "2", ...): a reference's state dict, which names none."""
    return list(class_names[1:]) == [str(k) for k in range(1, len(class_names))]


def warn_other_classes(theirs, ours, source):
    """Fine-tuning: weights with as many classes as the data but other ones, or the same in another order, have their
    class layers taken by position: a warning (rank 0's) says so. Numbers as names (a reference's state dict) name
    nothing."""
    if len(theirs) == len(ours) and tuple(theirs) != tuple(ours) and not _unnamed(theirs) and \
            int(os.environ.get("RANK", 0)) == 0:
        order = " (the same, in another order)" if sorted(theirs) == sorted(ours) else ""
        warnings.warn(f"{source}: its classes {', '.join(theirs[1:])} are taken by position as this data's "
                      f"{', '.join(ours[1:])}{order}: what they learned of each class starts on another one")


def load_backbone_weights(module, path, convert=None):
    """--backbone-weights PATH: module.load_state_dict of the file's state dict (convert(state dict), where given),
    stopping with one line when it is no state dict or does not fit: the count and the first of the keys that do not."""
    state_dict = load_checkpoint(path, "--backbone-weights")
    state_dict = convert(state_dict) if convert and state_dict is not None else state_dict
    if not state_dict:
        what = f"no weights for its {type(module).__name__} in it" if os.path.exists(path) else "no such file"
        raise SystemExit(f"--backbone-weights {path}: {what}; to start from random weights: --backbone-weights none")
    own, step = module.state_dict(), "num_batches_tracked"  # (batch norm's step count: load_state_dict sees to it)
    wrong = ([f"missing {k}" for k in own if k not in state_dict and not k.endswith(step)]
             + [f"unexpected {k}" for k in state_dict if k not in own and not k.endswith(step)]
             + [f"{k} of shape {tuple(getattr(v, 'shape', ()))}" for k, v in state_dict.items()
                if k in own and getattr(v, "shape", None) != own[k].shape])
    if wrong:
        raise SystemExit(f"--backbone-weights {path} does not fit this {type(module).__name__}: {len(wrong)} keys "
                         f"({', '.join(wrong[:3])})")
    module.load_state_dict(state_dict)


def _coco_image_dir(data_root, ann_file):
    """Where the images of a COCO json NAME.json may be, in this order (CocoDetection takes the first that holds its
    first image): <root>/NAME without 'instances_' (instances_val2017 -> val2017, COCO 2017 layout), <root>/<NAME's
    part after its last '_'> (person_keypoints_val2017 -> val2017; image_info_test-dev2017 -> test-dev2017, else
    test2017, where COCO keeps test-dev's images), <root>/JPEGImages, <root>/images, <root>/images/NAME (CVAT's
    instances_default.json: images/default), <root>/data (FiftyOne's labels.json), where they exist; then the json's
    own folder unless it is <root>/annotations (Roboflow's train/_annotations.coco.json sits beside its images), and
    <root> (Label Studio's result.json names images/a.jpg)."""
    name = os.path.splitext(os.path.basename(ann_file))[0].removeprefix("instances_")
    last = name.rsplit("_", 1)[-1]
    folders = [os.path.join(data_root, folder) for folder in (name, last, last.replace("test-dev", "test"),
               "JPEGImages", "images", os.path.join("images", name), "data")
               if folder and os.path.isdir(os.path.join(data_root, folder))]  # "": no name
    own = os.path.dirname(ann_file) or "."
    if os.path.abspath(own) != os.path.abspath(os.path.join(data_root, "annotations")):
        folders.append(own)
    return list(dict.fromkeys(folders + [data_root]))


def build_datasets(cfg, train_transforms=None, train=True, search=True):
    """(train dataset, val dataset) for the data fields of every model file's Config (data, data_root, train_ann,
    val_ann, train_split, val_split, image_size, num_train, num_val, seed); (None, val dataset) when not train.

    synthetic: SyntheticShapes(num_train, image_size, seed) and (num_val, image_size, seed + 1), disjoint by seed.
    coco: data_root/annotations/instances_train2017.json (or instances_train.json) unless train_ann is given, its
          images in the first folder of _coco_image_dir (train2017/ ...) that holds the first; likewise val.
          The training set leaves crowd boxes out (they are no object to learn; evaluation ignores what they cover).
    voc:  VocDetection(data_root, train_split) and (data_root, val_split); both take their class names from every
          xml under Annotations/, so that the splits agree.
    A training set without a single box stops with an error: there would be nothing to learn.
    A Config with a `proposals` field (R-CNN, Fast R-CNN: a selective search mode) also gets proposals in every target
    (attach_proposals): the files train_proposals / val_proposals where given, else selective search, cached in
    out/proposals_train.npz and out/proposals_val.npz; search=False (--show-targets, which draws a few images): the
    files or a valid cache only, else no proposals (the model searches the images it draws).
    Data that cannot be read (the datasets' ValueError or OSError, naming the file and the field) stops with SystemExit
    and that one line, as every error of the command line here; the dataset classes raise them as they are.
    """
    try:
        train_set, val_set = _build_datasets(cfg, train_transforms, train)
        if getattr(cfg, "proposals", ""):
            settings = dict(mode=cfg.proposals, side=cfg.proposal_side, min_box_size=cfg.proposal_min_size)
            for dataset, given, split in ((train_set, cfg.train_proposals, "train"),
                                          (val_set, cfg.val_proposals, "val")):
                if dataset is not None:
                    attach_proposals(dataset, given, os.path.join(cfg.out, f"proposals_{split}.npz"), cfg.workers,
                                     search=search, **settings)
    except (ValueError, OSError) as e:
        raise SystemExit(str(e)) from e
    return train_set, val_set


def _build_datasets(cfg, train_transforms, train):
    data, data_root, seed = cfg.data, cfg.data_root, cfg.seed
    if data == "synthetic":
        if data_root:  # (--eval or --resume of a synthetic run: the checkpoint's data, not the folder given)
            raise ValueError(f"--data-root {data_root}: for --data coco or voc; this run's data is synthetic")
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
            voc = "; it holds Annotations/: --data voc?" if os.path.isdir(os.path.join(data_root, "Annotations")) \
                else ""
            raise FileNotFoundError(f"{os.path.join(data_root, 'annotations')}: no instances_{stem}2017.json or "
                                    f"instances_{stem}.json; pass --{stem}-ann{voc}")
        val_ann = find(cfg.val_ann, "val")
        val_set = CocoDetection(_coco_image_dir(data_root, val_ann), val_ann)
        if not train:
            return None, val_set
        train_ann = find(cfg.train_ann, "train")
        train_set = CocoDetection(_coco_image_dir(data_root, train_ann), train_ann, train_transforms, drop_crowd=True)
        if val_set.cat_ids != train_set.cat_ids:
            raise ValueError(f"{val_ann}: 'categories' differ from {train_ann}'s, labels would not match")
    else:
        val_set = VocDetection(data_root, cfg.val_split)
        if not train:
            return None, val_set
        train_set = VocDetection(data_root, cfg.train_split, train_transforms)
    if not any(len(boxes) for boxes in train_set.boxes):
        raise ValueError(f"{train_set.source}: no box in any of the {len(train_set)} training images: nothing to learn")
    seen = set(np.concatenate(train_set.labels).tolist())
    if unseen := [name for k, name in enumerate(train_set.class_names) if k and k not in seen]:  # e.g. Roboflow's
        warnings.warn(f"{train_set.source}: no training box of class {', '.join(unseen[:5])}"  # category 0
                      + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "") + ": it is learnt as never there")
    return train_set, val_set


# --- Command line ---

def restores_signals(train):
    """A decorator for every model file's train(cfg), which handles Ctrl-C (SIGINT) and SIGTERM itself: when it returns,
    stops (SystemExit after a signal or a non-finite loss) or fails, both handlers are again what they were before, so
    that a notebook or a script that called it can be interrupted as usual."""
    @functools.wraps(train)
    def wrapped(*args, **kwargs):
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return train(*args, **kwargs)
        finally:
            for sig, handler in handlers.items():
                if handler is not None:  # None: set outside Python, cannot be set back
                    signal.signal(sig, handler)
    return wrapped


# Tuple fields of one value per colour channel, box coordinate or pyramid level: as many as their default has
FIXED_LENGTH = ("image_mean", "image_std", "bbox_reg_weights", "hsv", "scale_range", "balance", "anchor_sizes",
                "crop_size")
# Score thresholds of the decoding (Faster R-CNN's, the one-stage files', YOLOv5's): --predict names the one in force
SCORE_FLOORS = ("box_score_thresh", "score_thresh", "conf_thresh")
# Fields that only steer the optimisation: given to another mode than --train, a warning says they do nothing
OPTIMISATION = ("epochs", "lr", "lr_backbone", "optimizer", "momentum", "weight_decay", "lr_steps", "lr_gamma", "lrf",
                "cos_lr", "warmup_iters", "warmup_factor", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
                "accumulate", "ema_decay", "clip_grad_norm", "log_every")


def parse_args(argv, config_class, presets, make_config):
    """The command line of every model file: a mode (--train, --eval, --predict, --show-targets), --preset, and one
    --field-name flag per field of its Config dataclass, whose help is the field's comment and whose default shown is
    what a plain --train uses on this machine (preset cpu without CUDA). A bool field is --x/--no-x, a tuple field
    takes several values (--anchor-sizes 16 32 64; "(32, 40)" for a nested one), a Literal field one of its values.
    Returns (args, {field: value} of the fields given; with --train and a --preset named, the preset's values under
    them)."""
    preset = "none" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=f"Defaults shown: a plain --train's here (preset {preset}).")
    parser._negative_number_matcher = re.compile(r"-\.?\d")  # --draw-thresh -1e-3 a number, as Python 3.13 reads it
    rank = int(os.environ.get("RANK", 0))  # torchrun's other processes, given the same flags: rank 0 speaks for them
    parser.error = lambda message: parser.exit(2, None if rank else f"{parser.prog}: error: {message} (--help lists "
                                               "every flag)\n")  # not the usage line first: with a flag per Config
    # field, it would push the message off the screen
    modes = parser.add_mutually_exclusive_group(required=True)
    modes.add_argument("--train", action="store_true", help="train, evaluate each epoch, save into --out")
    modes.add_argument("--eval", action="store_true", help="print the 12 COCO numbers of --weights on the val split")
    modes.add_argument("--predict", metavar="IMG_OR_DIR", help="draw the detections of --weights into --out")
    modes.add_argument("--show-targets", action="store_true", help="draw ground truth and what the assignment marks")
    parser.add_argument("--preset", default=argparse.SUPPRESS, choices=["none", *presets],
                        help=f"Config values (default: {preset}; named with --train: over the config of --weights or "
                             f"--resume): {presets}")
    shown = make_config({}, preset=preset)
    comments = dict(re.findall(r"^\s+(\w+):[^=\n]*=[^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.MULTILINE))
    fields = dataclasses.fields(config_class)
    for f in fields:
        kind = {bool: dict(action=argparse.BooleanOptionalAction), tuple: dict(nargs="*", type=ast.literal_eval)}.get(
            f.type, dict(type=type(f.default), choices=typing.get_args(f.type) or None))
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kind, help=(
            f"{comments.get(f.name, '')} (default: {getattr(shown, f.name)!r})").replace("%", "%%"))
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # a command line: no source lines
    if rank:  # (they read the same data: rank 0 warns for them all)
        warnings.simplefilter("ignore")
    mode = "--train" if args.train else "--eval" if args.eval else "--predict" if args.predict else "--show-targets"
    if not args.train and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # each process would do all of it, into one folder
        parser.error(f"{mode} runs in one process: python {parser.prog} {mode} ... (torchrun: for --train)")
    args.preset_given, args.preset = hasattr(args, "preset"), getattr(args, "preset", preset)
    for name, least in (("seed", 0), ("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("log_every", 1),
                        ("lr", 0), ("workers", 0), ("num_train", 1), ("num_val", 1), ("image_size", 1)):  # (numpy's
        if getattr(args, name, least) < least:  # generators take no negative seed; some divide; the optimizer would
            parser.error(f"--{name.replace('_', '-')}: a number >= {least}")  # name a negative lr after its scaling)
    given = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    for f in fields:
        if f.type is tuple and f.name in FIXED_LENGTH and len(given.get(f.name, f.default)) != len(f.default):
            parser.error(f"--{f.name.replace('_', '-')}: {len(f.default)} values (default {f.default}), got "
                         f"{len(given[f.name])}")
    if given.get("device"):
        try:
            kind = torch.device(given["device"]).type
        except RuntimeError:
            parser.error(f"--device {given['device']}: cpu, cuda or cuda:N")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {given['device']}: no CUDA device here (torch.cuda.is_available() is False)")
    if "out" in given and (not given["out"] or os.path.isfile(given["out"])):
        parser.error(f"--out {given['out']!r}: a folder to write into" + (", not a file" if given["out"] else ""))
    if given.get("resume"):
        if not args.train:
            parser.error("--resume: with --train (to evaluate or draw a run's weights: --weights RUN/last.pt)")
        if given.get("weights"):
            parser.error("--resume goes on with the run's own weights: no --weights with it")
        if os.path.isdir(given["resume"]):
            parser.error(f"--resume {given['resume']}: a folder; --resume takes a run's checkpoint file "
                         f"({os.path.join(given['resume'], 'last.pt')})")
    if not args.train and (unused := [f"--{k.replace('_', '-')}" for k in given if k in OPTIMISATION]):
        warnings.warn(f"{', '.join(unused)}: how --train optimises; {mode} does not use "
                      f"{'them' if unused[1:] else 'it'}")
    if args.predict and not os.path.exists(args.predict):
        parser.error(f"--predict {args.predict}: no such file or folder")
    args.synthetic_only = {k for k, c in comments.items() if c.startswith("synthetic:")}  # (also announce_preset)
    sized = [k for k in given if k in args.synthetic_only]  # on real data: say so, not ignore them
    # the data these flags give (a checkpoint's config is not known here), built only when one of the two checks below
    # applies: a Config may refuse some flags given alone
    data = make_config(given, preset=args.preset).data if sized or "data_root" in given else None
    if sized and data != "synthetic":
        resize = [f"--{k.replace('_', '-')}" for k, c in comments.items()  # (SSD's scales: its default boxes')
                  if k in ("min_size", "max_size", "size") or k == "scales" and "shorter side" in c]
        parser.error(f"--{sized[0].replace('_', '-')}: sizes the synthetic data only; --data {data} uses every image "
                     "of its splits, each at its own size" + (f" (the model resizes it: {', '.join(resize)})"
                                                             if resize else ""))
    if args.train and "data_root" in given and not {"resume", "weights"} & set(given) and data == "synthetic":
        parser.error("--data-root: for --data coco or voc; without --data the data is synthetic")
    for k in ("train_ann", "val_ann", "train_proposals", "val_proposals"):  # a file found from here: absolute, so
        if given.get(k) and os.path.exists(given[k]):  # that --eval and --resume find it from any folder
            given[k] = os.path.abspath(given[k])
    args.flags = set(given)  # (announce_preset)
    if args.preset_given and args.train:  # a preset named for training outranks the config of --weights or --resume
        given = {**presets.get(args.preset, {}), **given}
    return args, {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def announce_preset(args, presets, saved, data="synthetic"):
    """--train's first line (rank 0): the preset's values this run uses: those no flag overrides, nor, when the preset
    was picked for this machine (not named), the checkpoint's config (--weights, --resume); on real data (data: the
    run's) without those that size the synthetic data."""
    used = {k: v for k, v in presets.get(args.preset, {}).items() if k not in args.flags and (
        args.preset_given or k not in (saved or {})) and (data == "synthetic" or k not in args.synthetic_only)}
    if used and int(os.environ.get("RANK", 0)) == 0:
        print(f"preset {args.preset} (--preset none for the Config defaults): {used}")


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
