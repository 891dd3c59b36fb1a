"""Datasets for PCR: the embedded toy set (default), Pascal VOC, Cityscapes, user folders.

Every dataset yields three torch Datasets:
  labeled[(index, seed)]   -> image float32 (3, c, c), label int64 (c, c)      (weak augmentation)
  unlabeled[(index, seed)] -> image float32 (3, c, c), padding bool (c, c)     (weak augmentation)
  val[index]               -> image float32 (3, H, W), label int64 (H, W), name (original size)
All augmentation randomness (weak_augment) comes from np.random.default_rng(seed), so a
training sample is a pure function of (index, seed) whatever the number of DataLoader workers.
The splits come from list files or are drawn in code (DATASETS says which, per dataset).
"""
import datetime
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)  # ImageNet, on [0, 1] RGB
STD = (0.229, 0.224, 0.225)
SCALE_RANGE = (0.5, 2.0)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]
VOC_CLASSIC_LABELED = (92, 183, 366, 732, 1464)  # drawn from the 1,464 train ids
VOC_BLENDED_LABELED = (662, 1323, 2646, 5291)  # drawn from the 10,582 augmented ids

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_LABELED = (186, 372, 744, 1488)
# Official cityscapesScripts table (labels.py): the raw label ids of train ids 0..18; others -> 255.
CITYSCAPES_ID_TO_TRAIN = np.full(256, IGNORE_INDEX, np.uint8)
CITYSCAPES_ID_TO_TRAIN[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = range(19)
CITYSCAPES_COLOURS = [  # of train ids 0..18
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

# EXIF Orientation 2..8 -> the transpose that turns stored pixels upright (exif_transpose fails on a broken EXIF)
EXIF_UPRIGHT = dict(zip(range(2, 9), (Image.Transpose[name] for name in (
    "FLIP_LEFT_RIGHT", "ROTATE_180", "FLIP_TOP_BOTTOM", "TRANSPOSE", "ROTATE_270", "TRANSVERSE", "ROTATE_90"))))
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # the first is an id's default
SPLITS = ("labeled", "unlabeled", "val")
# What PIL raises for a file it cannot decode (missing, truncated, not an image, too large).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(Exception):
    """Bad input data; its one-line message names the file or flag at fault and what is wrong."""


def voc_palette():
    """(256, 3) uint8 Pascal VOC palette: the bits of class id i spread over r, g, b from the top bit down."""
    ids = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for bit in range(8):  # 8 rounds of 3 bits, not a pixel loop
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def cityscapes_palette():
    """(256, 3) uint8: the official colours for the 19 train ids, black elsewhere (255 = ignore)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
    return palette


# --------------------------------------------------------------------------- reading files

def _decode(path, fit=None):
    """A file's loaded image, upright as its EXIF Orientation says (camera photos), as viewers, labelme, CVAT,
    browsers, detectron2 and mmcv show it; as stored if only that fits `fit`, its mask's (H, W) (EXIF ignored)."""
    with Image.open(path) as image:
        image.load()
        turn = EXIF_UPRIGHT.get(image.getexif().get(0x0112, 1))  # 0x0112: EXIF Orientation
        upright = image if turn is None else image.transpose(turn)
        return image if fit == image.size[::-1] != upright.size[::-1] else upright  # only the stored one fits


def read_image(path, mask=None, mask_path=None):
    """An image file as an RGB PIL image (L/LA/P/RGBA/CMYK/16-bit/float converted) turned as _decode says,
    of the size of its mask (H, W) if given: a DataError otherwise."""
    try:
        image = _decode(path, None if mask is None else mask.shape)
        if mask is not None and image.size[::-1] != mask.shape:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {path} is "
                            f"{image.size[0]}x{image.size[1]}")
        mode = image.mode
        if mode == "RGB":
            return image
        if mode.startswith("I;16") or mode in ("I", "F"):
            gray = np.asarray(image, dtype=np.float64)
            if mode.startswith("I;16") or (mode == "I" and gray.max() > 255):
                gray = gray / 257.0  # 0..65535 -> 0..255
            elif mode == "F" and gray.max() <= 1.0:
                gray = gray * 255.0  # float images in [0, 1]
            return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8)).convert("RGB")
        # L, LA, RGBA (alpha dropped), CMYK, YCbCr, ...; palette transparency is only defined through RGBA
        return (image.convert("RGBA") if mode in ("P", "PA") else image).convert("RGB")
    except DECODE_ERRORS as error:
        raise DataError(f"cannot decode image {path}: {error}") from None


def read_label(path, num_classes, raw_to_train=None, palette=None):
    """Read a mask of class ids as uint8 (H, W), 255 = ignore: palette PNGs by index (never as RGB),
    single-channel 8/16-bit PNGs by value, RGB only when gray; raw_to_train, a (256,) table, maps
    raw ids (Cityscapes labelIds) to train ids. Other values and colour-coded masks (named by their
    classes when the dataset's (256, 3) palette is given) are DataErrors."""
    try:
        mask = _decode(path)
        mode, values = mask.mode, np.array(mask)
    except DECODE_ERRORS as error:
        raise DataError(f"cannot decode mask {path}: {error}") from None
    if values.ndim == 3:
        rgb = values[..., :3]
        if mode not in ("LA", "PA") and (rgb != rgb[..., :1]).any():
            colours = np.unique(_pack(rgb))
            text = (f"mask {path} is a colour-coded {mode} image ({colours.size} colours); masks must "
                    f"hold class ids (pixel value = class id 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
            if palette is not None:
                ids, found = _palette_ids(colours, palette)
                text += (f"; its colours are the palette colours of ids {_some(sorted(ids.tolist()))}"
                         if found.all() else f"; {int((~found).sum())} of its colours are not in the "
                         "dataset's palette (a lossy JPEG mask, or other colours?)")
            raise DataError(text + "; convert it: map each colour to its class id and save the ids "
                            "as a single-channel or palette PNG (data.colours_to_ids; the README's "
                            "'Your own data')")
        values = values[..., 0]  # gray, or the index of LA / PA
    # 16/32-bit masks: a value above 255 is never a class id
    bad = np.unique(values[(values > 255) | (values < 0)]) if values.dtype != np.uint8 else []
    if not len(bad):
        values = values.astype(np.uint8, copy=False)
        if raw_to_train is not None:
            return raw_to_train[values]  # every raw id maps to a train id or 255
        counts = np.bincount(values.ravel(), minlength=256)
        bad = np.flatnonzero(counts[num_classes:IGNORE_INDEX]) + num_classes
    if len(bad):
        raise DataError(f"mask {path} has values {_some(bad.tolist())} that are neither class ids "
                        f"0..{num_classes - 1} nor {IGNORE_INDEX}: a palette mask read as RGB, a "
                        "16-bit mask, or a wrong --num-classes?")
    return values


def _pack(rgb):
    """uint8 (..., 3) -> int32 (...) 0xRRGGBB, to compare colours as numbers."""
    return (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]


def _palette_ids(packed, palette):
    """(ids, found) for packed colours: the first palette row holding each colour."""
    entries = _pack(palette)
    order = np.argsort(entries, kind="stable")  # a colour repeated in the palette: its first row
    at = np.minimum(np.searchsorted(entries[order], packed), len(entries) - 1)
    return order[at], entries[order][at] == packed


def colours_to_ids(rgb, palette):
    """Colour-coded mask uint8 (H, W, 3) -> class ids uint8 (H, W) through a (256, 3) palette (row
    = class id), 255 for other colours; saved as a single-channel or palette PNG, a mask of ids."""
    ids, found = _palette_ids(_pack(rgb), palette)
    return np.where(found, ids, IGNORE_INDEX).astype(np.uint8)


def _some(items, shown=5):
    """'a, b, c ... (N in all)' for error messages."""
    items = list(items)
    return ", ".join(map(str, items[:shown])) + (f" ... ({len(items)} in all)" if len(items) > shown else "")


# --------------------------------------------------------------------------- tensors and pictures

_MEAN_255 = np.array(MEAN, np.float32).reshape(3, 1, 1) * 255
_INV_STD_255 = 1.0 / (np.array(STD, np.float32).reshape(3, 1, 1) * 255)


def _normalize_array(rgb, out=None):
    """uint8 (H, W, 3) -> float32 (3, H, W), (x / 255 - MEAN) / STD, written into `out` if given.
    numpy, not torch: single-threaded small ops are much faster in DataLoader workers."""
    chw = rgb.transpose(2, 0, 1)
    out = np.empty(chw.shape, np.float32) if out is None else out
    np.subtract(chw, _MEAN_255, out=out)
    return np.multiply(out, _INV_STD_255, out=out)


def normalize(image):
    """RGB PIL image -> float32 tensor (3, H, W) normalised with the ImageNet mean/std."""
    return torch.from_numpy(_normalize_array(np.asarray(image.convert("RGB"))))


# --------------------------------------------------------------------------- weak augmentation

def augment_params(rng, width, height, crop_size):
    """One weak augmentation's draw (scaled_width, scaled_height, x0, y0, flip): scale ~ U[0.5, 2],
    the crop's corner (x0, y0) uniform over the valid positions (0 where the rescaled image is
    smaller than the crop), flip with p = 0.5."""
    scale = rng.uniform(*SCALE_RANGE)
    scaled_width, scaled_height = (max(1, int(round(side * scale))) for side in (width, height))
    x0, y0 = (int(rng.integers(0, max(side - crop_size, 0) + 1)) for side in (scaled_width, scaled_height))
    flip = bool(rng.random() < 0.5)
    return scaled_width, scaled_height, x0, y0, flip


def weak_augment(image, label, crop_size, rng):
    """Rescale, crop, pad and flip an RGB PIL image and its uint8 (H, W) label (or None), as
    docs/METHOD.md section 3 step 1 -> image float32 (3, c, c) normalised (0 on padding), label
    int64 (c, c) (255 on padding; None without a label), padding bool (c, c). Only the crop
    window is resampled (bilinear for the image, nearest for the label): the same as rescaling
    the whole image then cropping, without paying for the whole rescaled image."""
    width, height = image.size
    scaled_width, scaled_height, x0, y0, flip = augment_params(rng, width, height, crop_size)
    crop_width = min(crop_size, scaled_width - x0)
    crop_height = min(crop_size, scaled_height - y0)
    sx, sy = width / scaled_width, height / scaled_height  # source pixels per rescaled pixel
    box = (x0 * sx, y0 * sy, (x0 + crop_width) * sx, (y0 + crop_height) * sy)

    crop = image.resize((crop_width, crop_height), Image.Resampling.BILINEAR, box=box)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    left = crop_size - crop_width if flip else 0  # a flipped crop has its padding on the left
    columns = slice(left, left + crop_width)
    out_image = np.zeros((3, crop_size, crop_size), np.float32)
    _normalize_array(np.asarray(crop), out=out_image[:, :crop_height, columns])
    padding = np.ones((crop_size, crop_size), bool)
    padding[:crop_height, columns] = False
    out_label = None
    if label is not None:
        # Nearest neighbour in exact integer arithmetic: rescaled pixel j (centre j + 1/2) reads
        # source pixel floor((j + 1/2) * width / scaled_width), PIL's pixel-centre convention.
        cols = ((2 * np.arange(x0, x0 + crop_width) + 1) * width) // (2 * scaled_width)
        rows = ((2 * np.arange(y0, y0 + crop_height) + 1) * height) // (2 * scaled_height)
        out_label = np.full((crop_size, crop_size), IGNORE_INDEX, np.int64)
        out_label[:crop_height, columns] = label[rows[:, None], cols[::-1] if flip else cols]
        out_label = torch.from_numpy(out_label)
    return torch.from_numpy(out_image), out_label, torch.from_numpy(padding)


# --------------------------------------------------------------------------- the toy dataset
# Background + 5 shape classes, each in three appearances (colour family, texture): two common ones and a
# third in a colour family no common one uses; an object may also be elongated and small. Colour families are
# shared between classes, so the network must use shape, texture and size (fg-coloured specks and thin lines
# are background). The last object drawn owns its pixels. Labels are the bottleneck by construction, as in the
# field's low-label splits: the default labeled images (the first TOY_LABELED) show only large, regular
# objects in common appearances; the rest of the pool, the unlabeled set and val show every variant.

TOY_SIZE = 80  # images are TOY_SIZE x TOY_SIZE
TOY_CLASSES = ["background", "disc", "square", "triangle", "ring", "cross"]
TOY_APPEARANCES = [  # per foreground class: A, B (common), C (a colour family A and B do not use)
    (("red", "solid"), ("blue", "stripes"), ("purple", "solid")),  # disc
    (("red", "stripes"), ("green", "solid"), ("cyan", "stripes")),  # square
    (("blue", "solid"), ("yellow", "dots"), ("purple", "dots")),  # triangle
    (("green", "dots"), ("red", "solid"), ("cyan", "solid")),  # ring: red solid as a disc; has a hole
    (("yellow", "solid"), ("blue", "dots"), ("purple", "stripes")),  # cross
]
TOY_COMMON = 2  # appearances 0 .. TOY_COMMON - 1 are the common ones
TOY_ELONGATED = (1 / 3, 0.6)  # probability that an object is elongated, and its aspect ratio
TOY_SMALL = 1 / 3  # probability that an object is small
TOY_COLOURS = {"red": (205, 45, 40), "green": (45, 165, 60), "blue": (45, 85, 215), "yellow": (230, 200, 40),
               "purple": (150, 60, 190), "cyan": (40, 185, 200)}
TOY_BACKGROUND_COLOURS = [(125, 125, 120), (155, 145, 125), (95, 105, 100), (135, 125, 140), (175, 170, 155)]
TOY_OBJECTS = (1, 4)  # objects per image, inclusive range
TOY_RADIUS = {"small": (9.0, 13.0), "large": (13.0, 19.0)}  # object half-size in pixels
TOY_COLOUR_JITTER = 30  # +- per channel, per object
TOY_CLUTTER = (2, 5)  # background-coloured lines and blobs per image
TOY_DISTRACTORS = (0, 2)  # fg-coloured thin lines and specks per image, labelled background
TOY_NOISE = 4.0  # std of the per-pixel Gaussian noise
TOY_SPLITS = {"labeled": (128, 101), "unlabeled": (480, 202), "val": (100, 303)}  # count, generator seed
TOY_LABELED = 16  # default number of labeled images: the first 16 of the pool, see above


def _segment_mask(xx, yy, x0, y0, x1, y1, width):
    """Pixels within width/2 of the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= (width / 2) ** 2


def _shape_mask(shape, xx, yy, cx, cy, radius, angle, aspect=1.0):
    """Boolean mask of one shape centred at (cx, cy) with half-size radius, rotated by angle and
    squeezed to `aspect` times its size across (aspect < 1: elongated)."""
    dx, dy = xx - cx, yy - cy
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / aspect
    if shape == "disc":
        return u * u + v * v <= radius ** 2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85 * radius
    if shape == "triangle":  # equilateral, edges at 0.65 radius from the centre: about a disc's area
        inside = np.ones_like(dx, dtype=bool)
        for k in range(3):
            normal = 2 * np.pi * k / 3
            inside &= np.cos(normal) * u + np.sin(normal) * v <= 0.65 * radius
        return inside
    if shape == "ring":
        distance2 = u * u + v * v
        return (distance2 <= radius ** 2) & (distance2 >= (0.55 * radius) ** 2)
    if shape == "cross":
        arm = 0.3 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    raise ValueError(shape)


def _texture(texture, xx, yy, rng):
    """0/1 pattern over the image: 1 where the darker shade of the object colour goes."""
    if texture == "solid":
        return np.zeros_like(xx, dtype=bool)
    period = rng.uniform(4.0, 7.0)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    if texture == "stripes":
        return (u / period) % 1.0 < 0.5
    v = -np.sin(angle) * xx + np.cos(angle) * yy  # dots on a rotated grid
    du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
    return du * du + dv * dv <= 0.3 ** 2


ToyObject = namedtuple("ToyObject", "class_id appearance elongated small")


def toy_objects(split, index):
    """The ToyObjects of toy image `index` of `split`, bottom to top; appearance indexes
    TOY_APPEARANCES[class_id - 1]. Classes are distinct, and image i has class i mod 5 + 1 on top:
    any five consecutive images show every class, as the field's labeled lists are made to."""
    rng = np.random.default_rng([TOY_SPLITS[split][1], index, 1])  # not toy_sample's stream
    num_fg = len(TOY_CLASSES) - 1
    featured = index % num_fg + 1
    others = [k for k in range(1, num_fg + 1) if k != featured]
    count = rng.integers(TOY_OBJECTS[0], TOY_OBJECTS[1] + 1)
    objects = []
    for class_id in [*rng.permutation(others)[:count - 1], featured]:
        appearance, common = rng.integers(len(TOY_APPEARANCES[class_id - 1])), rng.integers(TOY_COMMON)
        elongated, small = bool(rng.random() < TOY_ELONGATED[0]), bool(rng.random() < TOY_SMALL)
        if split == "labeled" and index < TOY_LABELED:  # the default labeled images
            appearance, elongated, small = common, False, False
        objects.append(ToyObject(int(class_id), int(appearance), elongated, small))
    return objects


def toy_sample(split, index):
    """Toy image `index` of `split`, (image uint8 (S, S, 3), label uint8 (S, S)): a pure function
    of (the split's fixed seed, index)."""
    rng = np.random.default_rng([TOY_SPLITS[split][1], index])
    size = TOY_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    def jitter(colour, amount):
        return np.clip(np.array(colour, np.float64) + rng.uniform(-amount, amount, 3), 0, 255)

    # Background: a smooth blend of two muted colours, then muted lines and blobs.
    first, second = rng.choice(len(TOY_BACKGROUND_COLOURS), 2, replace=False)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8))
    blend = (np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float64) / 255.0)[..., None]
    image = ((1 - blend) * jitter(TOY_BACKGROUND_COLOURS[first], 15)
             + blend * jitter(TOY_BACKGROUND_COLOURS[second], 15))  # (S, S, 3) float
    for _ in range(rng.integers(TOY_CLUTTER[0], TOY_CLUTTER[1] + 1)):
        colour = jitter(TOY_BACKGROUND_COLOURS[rng.integers(len(TOY_BACKGROUND_COLOURS))], 20)
        if rng.random() < 0.5:
            mask = _segment_mask(xx, yy, *rng.uniform(0, size, 4), rng.uniform(1.0, 4.0))  # x0, y0, x1, y1
        else:
            (cx, cy), (rx, ry) = rng.uniform(0, size, 2), rng.uniform(3, 12, 2)
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image[mask] = colour
    # Distractors in object colours, too thin or small to be objects: labelled background.
    families = list(TOY_COLOURS)
    for _ in range(rng.integers(TOY_DISTRACTORS[0], TOY_DISTRACTORS[1] + 1)):
        colour = jitter(TOY_COLOURS[families[rng.integers(len(families))]], TOY_COLOUR_JITTER)
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, size, 2)
            length, direction = rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
            x1, y1 = x0 + length * np.cos(direction), y0 + length * np.sin(direction)
            mask = _segment_mask(xx, yy, x0, y0, x1, y1, rng.uniform(1.0, 2.0))
        else:
            cx, cy = rng.uniform(0, size, 2)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(1.0, 2.5) ** 2
        image[mask] = colour

    # Objects, drawn in order: later ones occlude earlier ones.
    label = np.zeros((size, size), np.uint8)
    for obj in toy_objects(split, index):
        family, texture = TOY_APPEARANCES[obj.class_id - 1][obj.appearance]
        aspect = TOY_ELONGATED[1] if obj.elongated else 1.0
        radius = rng.uniform(*TOY_RADIUS["small" if obj.small else "large"]) / np.sqrt(aspect)  # same area
        cx, cy = rng.uniform(0.2 * radius, size - 0.2 * radius, 2)  # may leave the frame a little
        mask = _shape_mask(TOY_CLASSES[obj.class_id], xx, yy, cx, cy, radius, rng.uniform(0, 2 * np.pi), aspect)
        colour = jitter(TOY_COLOURS[family], TOY_COLOUR_JITTER)
        shade = _texture(texture, xx, yy, rng)
        image[mask & ~shade] = colour
        image[mask & shade] = 0.4 * colour
        label[mask] = obj.class_id

    image = image + rng.normal(0.0, TOY_NOISE, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


@functools.lru_cache(maxsize=None)
def _toy_sample_cached(split, index):
    """toy_sample, kept per process (all toy splits together are ~18 MB); arrays are read-only."""
    image, label = toy_sample(split, index)
    image.flags.writeable = label.flags.writeable = False
    return image, label


# --------------------------------------------------------------------------- sources and datasets

# One listed image: paths (label None where not needed; a toy image's path is its name), display
# name, and whether the mask holds raw Cityscapes ids to map to train ids.
Sample = namedtuple("Sample", "image label name map_ids")


def _read_mask(sample, num_classes, palette=None):
    """read_label of a Sample's mask (raw Cityscapes ids mapped), None for a Sample without one."""
    raw_to_train = CITYSCAPES_ID_TO_TRAIN if sample.map_ids else None
    return None if sample.label is None else read_label(sample.label, num_classes, raw_to_train, palette)


class ImageList(Dataset):
    """The Samples of one split, read on every item (toy images: generated from their name). With a
    crop_size, training items (index, seed) or index (seed = index), weakly augmented as the module
    docstring says; without, val items, label None for a Sample without a mask (evaluate --images)."""

    def __init__(self, samples, num_classes, generated=False, crop_size=None, labeled=True):
        self.samples, self.num_classes, self.generated = list(samples), num_classes, generated
        self.crop_size, self.labeled = crop_size, labeled

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        # (index, seed) as a tuple, list or 2-element array/tensor (samplers may yield tensors)
        two = isinstance(item, (tuple, list)) or getattr(item, "ndim", 0) == 1
        index, seed = (int(item[0]), int(item[1])) if two else (int(item), int(item))
        sample = self.samples[index]
        if self.generated:
            split, number = sample.name.rsplit("_", 1)
            image, label = _toy_sample_cached(split, int(number))
            image = Image.fromarray(image)
        else:
            label = _read_mask(sample, self.num_classes)
            image = read_image(sample.image, label, sample.label)
        if self.crop_size is None:
            label = label if label is None else torch.from_numpy(label.astype(np.int64))
            return normalize(image), label, sample.name
        rng = np.random.default_rng(seed)
        image, label, padding = weak_augment(image, label if self.labeled else None, self.crop_size, rng)
        return image, (label if self.labeled else padding)


# What build_data returns: name (a DATASETS key), num_classes, class_names, palette ((256, 3) uint8 colours of
# the class ids), the labeled, unlabeled and val ImageLists, and lists ({split: the lines as written}).
Data = namedtuple("Data", "name num_classes class_names palette labeled unlabeled val lists")


# --------------------------------------------------------------------------- split lists
# A split is first a list: (lines, origin), the lines [(line number, fields)] of a list file or
# of a split drawn in code, and origin the file (or the draw) for error messages. The dataset's
# resolve function then turns each line into a Sample.

def read_list(path):
    """The list of a list file: its non-blank lines (CRLF, no final newline: fine) and its path."""
    if not os.path.isfile(path):
        raise DataError(f"list file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return [(number, line.split()) for number, line in enumerate(lines, 1) if line.strip()], path


def _drawn(lines, origin):
    return [(number, [line]) for number, line in enumerate(lines, 1)], origin


def _relative(root, path):
    """A path from a list, relative to the root (a leading '/' as in some published lists too)."""
    return os.path.join(root, path.lstrip("/"))


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _first_file(paths, default):
    """The first of `paths` that exists, else paths[default] (for the missing-file error)."""
    return next((path for path in paths if os.path.isfile(path)), paths[default])


def _resolve_voc(root, fields, need_label, masks=("SegmentationClassAug", "SegmentationClass")):
    """Line -> Sample for VOC layouts: 'id', 'id.jpg', 'JPEGImages/id.jpg' or 'image label'. An id's image
    is JPEGImages/<id>.jpg (.png, .JPG, ...), its mask <id>.png in the first folder of `masks` that has it
    (VOC: SegmentationClassAug, SegmentationClass; folders: SegmentationClassPNG (labelme), SegmentationClass)."""
    if len(fields) not in (1, 2):
        raise ValueError("expected 'id', 'image_path' or 'image_path label_path'")
    token = fields[0]
    if len(fields) == 2 or "/" in token:  # a path from the root as in published lists: JPEGImages/<id>.jpg
        image = _relative(root, token)
    elif token.lower().endswith(IMAGE_EXTENSIONS):  # a file name in JPEGImages: <id>.jpg
        image = os.path.join(root, "JPEGImages", token)
    else:  # an id: the first image file of that name, its extension in lower or upper case (cameras: .JPG)
        image = _first_file([os.path.join(root, "JPEGImages", token + case(e)) for e in IMAGE_EXTENSIONS
                             for case in (str.lower, str.upper)], 0)
    image_id, label = _stem(image), None
    if need_label:
        label = (_relative(root, fields[1]) if len(fields) == 2 else
                 _first_file([os.path.join(root, folder, image_id + ".png") for folder in masks], -1))
    return Sample(image, label, image_id, False)


def _resolve_cityscapes(root, fields, need_label):
    """Line -> Sample for Cityscapes: 'leftImg8bit/<split>/<city>/<name>_leftImg8bit.png', a bare
    '<name>' or 'image label'. Masks: gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png, else
    _gtFine_labelIds.png, mapped to train ids on the fly."""
    if len(fields) not in (1, 2):
        raise ValueError("expected 'image_path', 'image_path label_path' or an image name")
    token = fields[0].lstrip("/")
    if len(fields) == 1 and "/" not in token:  # bare name like aachen_000000_000019: find its split
        stem = token.replace("_leftImg8bit.png", "")
        city = stem.split("_")[0]
        options = [f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png" for split in ("train", "val")]
        token = next((o for o in options if os.path.isfile(os.path.join(root, o))), options[0])
    image, name = os.path.join(root, token), _stem(token).replace("_leftImg8bit", "")
    if len(fields) == 2:
        label = _relative(root, fields[1])
        return Sample(image, label if need_label else None, name, label.endswith("_labelIds.png"))
    if not need_label:
        return Sample(image, None, name, False)
    parts = token.split("/")
    if len(parts) != 4 or parts[0] != "leftImg8bit" or not parts[3].endswith("_leftImg8bit.png"):
        raise ValueError(f"cannot derive a gtFine mask from {token!r} "
                         "(expected leftImg8bit/<split>/<city>/<name>_leftImg8bit.png)")
    base = os.path.join(root, "gtFine", parts[1], parts[2], parts[3][: -len("_leftImg8bit.png")])
    label = _first_file([base + "_gtFine_labelTrainIds.png", base + "_gtFine_labelIds.png"], -1)
    return Sample(image, label, name, label.endswith("_labelIds.png"))


def _resolve_toy(root, fields, need_label):
    """Line -> Sample for toy image names ('labeled_0003'); there is no root."""
    split, _, number = fields[0].rpartition("_")
    valid = split in TOY_SPLITS and number.isdigit() and int(number) < TOY_SPLITS[split][0]
    if len(fields) > 1 or not valid:
        ranges = ", ".join(f"{s}_0000..{s}_{n - 1:04d}" for s, (n, _) in TOY_SPLITS.items())
        raise ValueError(f"{' '.join(fields)!r} is not a toy image name ({ranges})")
    return Sample(f"{split}_{int(number):04d}", None, f"{split}_{int(number):04d}", False)


def _resolve_list(root, numbered, origin, resolve, need_label):
    """(samples, lines, origin) for a list; a malformed line is a DataError naming file and line."""
    samples = []
    for number, fields in numbered:
        try:
            samples.append(resolve(root, fields, need_label))
        except ValueError as error:
            raise DataError(f"{origin} line {number}: {error}") from None
    return samples, [" ".join(fields) for _, fields in numbered], origin


# --------------------------------------------------------------------------- drawn splits
# Each draw(root, labeled, seed, log) returns the labeled and unlabeled lists for --labeled.

def _draw(labeled, counts, pool, seed, name, where, labeled_pool=None):
    """`labeled` images of labeled_pool (default: pool) drawn with np.random.default_rng(seed),
    kept in pool order; the rest of pool is unlabeled. counts: the paper's --labeled values."""
    if labeled not in counts:
        raise DataError(f"--labeled {labeled}: {name} splits are {', '.join(map(str, counts))}; for "
                        "other splits pass --split-dir with labeled.txt and unlabeled.txt")
    labeled_pool = pool if labeled_pool is None else labeled_pool
    if labeled > len(labeled_pool):
        raise DataError(f"--labeled {labeled}: only {len(labeled_pool)} images to draw from in {where}")
    picked = np.random.default_rng(seed).choice(len(labeled_pool), size=labeled, replace=False)
    chosen = [labeled_pool[i] for i in sorted(picked)]
    taken, origin = set(chosen), f"the {name} split drawn with --seed {seed}"
    return {"labeled": _drawn(chosen, origin),
            "unlabeled": _drawn([item for item in pool if item not in taken], origin)}


def _toy_list(which, count=None):
    return _drawn([f"{which}_{i:04d}" for i in range(count or TOY_SPLITS[which][0])], f"the toy {which} split")


def _toy_draw(root, labeled, seed, log):
    """The first --labeled images of the toy's labeled pool (see its section), all unlabeled ones."""
    labeled, total = TOY_LABELED if labeled is None else labeled, TOY_SPLITS["labeled"][0]
    if not 1 <= labeled <= total:
        raise DataError(f"--labeled {labeled}: the toy dataset has {total} labeled images; choose 1..{total}")
    return {"labeled": _toy_list("labeled", labeled), "unlabeled": _toy_list("unlabeled")}


def _voc_draw(root, labeled, seed, log):
    """Classic splits draw from the 1,464 train ids, blended ones from the 10,582 augmented ids
    (SegmentationClassAug minus val); the unlabeled set is the 10,582 minus the labeled."""
    lists = os.path.join(root, "ImageSets", "Segmentation")
    train_ids = sorted({fields[0] for _, fields in read_list(os.path.join(lists, "train.txt"))[0]})
    aug_folder = os.path.join(root, "SegmentationClassAug")
    if os.path.isdir(aug_folder):
        val_ids = {fields[0] for _, fields in read_list(os.path.join(lists, "val.txt"))[0]}
        pool = sorted(_stem(name) for name in os.listdir(aug_folder)
                      if name.endswith(".png") and _stem(name) not in val_ids)
    else:
        pool = train_ids
        log(f"warning: {aug_folder} not found: the unlabeled pool is the {len(train_ids)} train "
            "images, not the paper's 10,582, so counts differ from the paper")
    return _draw(labeled, VOC_CLASSIC_LABELED + VOC_BLENDED_LABELED, pool, seed, "VOC",
                 f"{root} (blended splits need SegmentationClassAug)",
                 labeled_pool=train_ids if labeled in VOC_CLASSIC_LABELED else pool)


def _cityscapes_images(root, split):
    """The image paths of leftImg8bit/<split>/<city>/, relative to the root, sorted."""
    folder = os.path.join(root, "leftImg8bit", split)
    paths = sorted(glob.glob(os.path.join(folder, "*", "*_leftImg8bit.png")))
    if not paths:
        raise DataError(f"no images in {folder}/<city>/*_leftImg8bit.png")
    return [os.path.relpath(path, root).replace(os.sep, "/") for path in paths]


def _folder_classes(root, num_classes):
    """Class names of a folder dataset: DIR/classes.txt (or labelme2voc's class_names.txt; one name per line)
    sets the count; without it --num-classes does, and the names are class0, class1, ..."""
    path = _first_file([os.path.join(root, name) for name in ("classes.txt", "class_names.txt")], 0)
    if not os.path.isfile(path):
        if num_classes is None:
            raise DataError(f"--dataset folder needs the number of classes: list their names in {path} "
                            "(one per line, class id 0 first) or pass --num-classes")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise DataError(f"--num-classes {num_classes}: must be 1..{IGNORE_INDEX}")
        return [f"class{i}" for i in range(num_classes)]
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle.read().splitlines() if line.strip()]
    if not 1 <= len(names) <= IGNORE_INDEX:
        raise DataError(f"{path} names {len(names)} classes; a dataset has 1..{IGNORE_INDEX}")
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{path} names {len(names)} classes but --num-classes is {num_classes}; "
                        "drop --num-classes or fix one of the two")
    return names


# --------------------------------------------------------------------------- the dataset table

@dataclass(frozen=True)
class DatasetSpec:
    """One dataset as build_data sees it. A new dataset is one entry in DATASETS, plus a resolve
    function (list line -> Sample, like _resolve_voc) when its files are laid out otherwise."""
    layout: str  # what --data-root holds, for error messages
    classes: tuple  # class names, id 0 first; empty: from the data root (see _folder_classes)
    palette: object  # () -> (256, 3) uint8 colours of the class ids, for pictures
    resolve: object  # (root, fields of a list line, need_label) -> Sample
    val: object  # root -> the dataset's own val list, used when --split-dir has no val.txt
    draw: object = None  # the split for --labeled without --split-dir; None: lists in the root
    generated: bool = False  # images made in code: no data root, no files to check


DATASETS = {
    "toy": DatasetSpec(
        layout="none: generated in code", classes=tuple(TOY_CLASSES), palette=voc_palette,
        resolve=_resolve_toy, val=lambda root: _toy_list("val"), draw=_toy_draw, generated=True),
    "voc": DatasetSpec(
        layout="the VOC2012 folder: JPEGImages/, SegmentationClass/ (and SegmentationClassAug/), "
               "ImageSets/Segmentation/",
        classes=tuple(VOC_CLASSES), palette=voc_palette, resolve=_resolve_voc, draw=_voc_draw,
        val=lambda root: read_list(os.path.join(root, "ImageSets", "Segmentation", "val.txt"))),
    "cityscapes": DatasetSpec(
        layout="leftImg8bit/{train,val}/<city>/ and gtFine/{train,val}/<city>/",
        classes=tuple(CITYSCAPES_CLASSES), palette=cityscapes_palette, resolve=_resolve_cityscapes,
        val=lambda root: _drawn(_cityscapes_images(root, "val"), f"{root}/leftImg8bit/val"),
        draw=lambda root, labeled, seed, log: _draw(
            labeled, CITYSCAPES_LABELED, _cityscapes_images(root, "train"), seed, "Cityscapes",
            f"{root}/leftImg8bit/train")),
    "folder": DatasetSpec(
        layout="JPEGImages/<id>.jpg, SegmentationClass/<id>.png (or labelme2voc's SegmentationClassPNG/), "
               "labeled.txt, unlabeled.txt, val.txt (optional classes.txt)",
        classes=(), palette=voc_palette, val=lambda root: read_list(os.path.join(root, "val.txt")),
        resolve=functools.partial(_resolve_voc, masks=("SegmentationClassPNG", "SegmentationClass"))),
}


def _lists(spec, root, labeled, split_dir, seed, log):
    """{"labeled"/"unlabeled"/"val": list}: labeled.txt and unlabeled.txt of split_dir (a folder
    dataset: of its root), with val.txt there, in its parent (the published layout) or the
    dataset's own; without split_dir, the dataset's split drawn for --labeled."""
    if split_dir is None and spec.draw is not None:
        return {**spec.draw(root, labeled, seed, log), "val": spec.val(root)}
    list_dir = root if split_dir is None else split_dir
    lists = {which: read_list(os.path.join(list_dir, which + ".txt")) for which in ("labeled", "unlabeled")}
    vals = [os.path.normpath(os.path.join(list_dir, *parts, "val.txt")) for parts in ((), (os.pardir,))]
    vals = [path for path in vals if os.path.isfile(path)]
    lists["val"] = read_list(vals[0]) if vals else spec.val(root)
    log(f"data: lists from {list_dir} (val: {lists['val'][1]})")
    if labeled is not None and labeled != len(lists["labeled"][0]):
        log(f"warning: --labeled {labeled} but {lists['labeled'][1]} lists {len(lists['labeled'][0])} "
            "images; the list decides")
    return lists


# --------------------------------------------------------------------------- the full data check
# build_data checks that the listed files exist; check_data decodes every one before the first
# iteration: about half a minute of one core for VOC's 12,031 images, against a crash hours into a run.

CHECK_VERSION = 1  # bump when check_data checks more, so that old records are not trusted
CHECK_CHUNK = 16  # samples per task handed to a worker
CHECK_PROGRESS_SECONDS = 10.0  # at most one progress line this often


def _check_chunk(chunk, num_classes, palette):
    """(pairs read, [(split, path, message)] of bad files, (256,) value counts of the labeled masks) of a chunk."""
    problems, labeled_pixels = [], np.zeros(256, np.int64)
    for which, sample in chunk:
        label = None
        try:
            label = _read_mask(sample, num_classes, palette)
            labeled_pixels += np.bincount(label.ravel(), minlength=256) if which == "labeled" else 0
        except DataError as error:
            problems.append((which, sample.label, str(error)))
        try:
            read_image(sample.image, label, sample.label)
        except DataError as error:
            problems.append((which, sample.image, str(error)))
    return len(chunk), problems, labeled_pixels


def _check_worker_init():
    """A forked worker inherits the parent's signal handlers, which may be the trainer's (SIGTERM:
    'save and stop'): restore the default, so that Pool.terminate() ends it. Ctrl-C is the parent's."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fingerprint(items, num_classes):
    """sha256 over the check's version, the class count and every file's path, size and mtime:
    equal fingerprints mean the same files, unchanged since they were checked."""
    digest = hashlib.sha256(f"{CHECK_VERSION} {num_classes}\n".encode())
    for which, sample in items:
        for path in filter(None, (sample.image, sample.label)):
            try:
                stat = os.stat(path)
                facts = f"{stat.st_size} {stat.st_mtime_ns}"
            except OSError:
                facts = "missing"
            digest.update(f"{which} {int(sample.map_ids)} {os.path.abspath(path)} {facts}\n".encode())
    return digest.hexdigest()


def check_data(data, workers=0, log=print, record_path=None, clock=time.monotonic):
    """Decode every listed image and mask of `data` with `workers` processes (0: this one): each
    must decode in full, a mask have its image's size and hold class ids or 255 (Cityscapes: after
    the raw-id mapping). The log gets a line per bad file, then one DataError names them all.
    record_path (JSON) records the result and the files' _fingerprint: a later call after a passed
    check of the same files (a resumed run) skips the reading. Returns the record, None for generated data."""
    items = [(which, sample) for which in SPLITS if not getattr(data, which).generated
             for sample in getattr(data, which).samples]
    if not items:
        return None
    fingerprint = _fingerprint(items, data.num_classes)
    try:
        with open(record_path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except (TypeError, OSError, ValueError):  # no record_path, no record, or a broken one
        previous = {}
    if previous.get("ok") and previous.get("fingerprint") == fingerprint:
        log(f"data check: skipped, the {len(items)} listed images and their masks are unchanged "
            f"since the check recorded in {record_path}")
        return previous

    masks = sum(sample.label is not None for _, sample in items)
    tasks = [items[i:i + CHECK_CHUNK] for i in range(0, len(items), CHECK_CHUNK)]
    check = functools.partial(_check_chunk, num_classes=data.num_classes, palette=data.palette)
    workers = max(0, min(int(workers), len(tasks)))
    log(f"data check: reading {len(items)} images and {masks} masks with "
        f"{workers or 'no'} worker process(es) (--skip-data-check skips this)")
    start = last_report = clock()
    problems, done, labeled_pixels = [], 0, np.zeros(256, np.int64)
    pool = multiprocessing.Pool(workers, initializer=_check_worker_init) if workers > 0 else None
    try:
        for count, chunk_problems, pixels in pool.imap_unordered(check, tasks) if pool else map(check, tasks):
            problems += chunk_problems
            labeled_pixels += pixels
            done, now = done + count, clock()
            if now - last_report >= CHECK_PROGRESS_SECONDS and done < len(items):
                last_report = now
                eta = datetime.timedelta(seconds=int((len(items) - done) * (now - start) / done))
                log(f"data check: {done}/{len(items)} images ({100 * done // len(items)}%), "
                    f"{len(problems)} bad file(s) so far, eta {eta}")
    finally:
        if pool is not None:
            pool.terminate()  # all tasks done, or stopped early (an error, Ctrl-C)
            pool.join()
    problems, seconds = sorted(problems), clock() - start
    record = {"version": CHECK_VERSION, "ok": not problems, "fingerprint": fingerprint,
              "num_classes": data.num_classes, "images": len(items), "masks": masks,
              "seconds": round(seconds, 1), "workers": workers,
              "problems": [f"{which}: {message}" for which, _, message in problems]}
    if record_path is not None:
        with open(record_path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
        os.replace(record_path + ".tmp", record_path)
    if not problems:
        log(f"data check: {len(items)} images and {masks} masks decode, sizes match, mask values "
            f"are class ids or {IGNORE_INDEX} ({seconds:.1f} s)")
        shares = 100 * labeled_pixels / max(labeled_pixels.sum(), 1)
        log(f"data check: labeled pixels: ignore ({IGNORE_INDEX}) {shares[IGNORE_INDEX]:.1f}%, " + _some(
            [f"{name} {share:.1f}%" for name, share in zip(data.class_names, shares)], shown=30))
        missing = [f"{i} {name!r}" for i, name in enumerate(data.class_names) if not labeled_pixels[i]]
        if missing:  # would train badly and silently: a wrong class count, or 0/255 masks (objects ignored)
            log(f"warning: no labeled pixel of class {_some(missing)}: only pseudo-labels can teach it. Masks "
                f"hold class ids, {IGNORE_INDEX} is ignore (in 0/255 masks too): or is --num-classes / "
                "classes.txt wrong?")
        return record
    shown, where = 20, (f"; all of them in {record_path}" if record_path is not None else "")
    for line in record["problems"][:shown]:
        log(f"data check: {line}")
    if len(problems) > shown:
        log(f"data check: ... and {len(problems) - shown} more{where}")
    others = f"; the others: {_some([path for _, path, _ in problems[1:]], 4)}" if len(problems) > 1 else ""
    raise DataError(f"the data check found {len(problems)} bad file(s) among {len(items)} listed "
                    f"images and {masks} masks (listed above{where}); first, {record['problems'][0]}{others}")


# --------------------------------------------------------------------------- entry point

def location_errors(dataset, data_root, split_dir=None):
    """What is wrong with --dataset, --data-root and --split-dir before any file is read, as messages
    (build_data raises the first; train.py reports them with its other setup errors, all at once)."""
    spec = DATASETS.get(dataset)
    if spec is None:
        return [f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)}"]
    errors = []
    if not spec.generated and data_root is None:
        errors.append(f"--data-root is required for --dataset {dataset} ({spec.layout})")
    elif not spec.generated and not os.path.isdir(data_root):
        errors.append(f"--data-root {data_root} does not exist (or is not a folder)")
    if split_dir is not None and not os.path.isdir(split_dir):
        errors.append(f"--split-dir {split_dir} does not exist")
    return errors


def build_data(dataset, data_root=None, num_classes=None, labeled=None, split_dir=None,
               seed=0, crop_size=513, out_dir=None, log=print):
    """Data of `dataset` (a DATASETS entry), its lists from split_dir, a folder dataset's root or
    the split drawn for `labeled` from `seed`; the listed files must exist (check_data decodes
    them). The lists go to out_dir/{labeled,unlabeled,val}.txt: `--split-dir out_dir` repeats them."""
    for error in location_errors(dataset, data_root, split_dir):
        raise DataError(error)
    spec = DATASETS[dataset]
    if spec.classes and num_classes not in (None, len(spec.classes)):
        raise DataError(f"--num-classes {num_classes}: the {dataset} dataset has {len(spec.classes)} classes")
    class_names = list(spec.classes) or _folder_classes(data_root, num_classes)

    lists = _lists(spec, data_root, labeled, split_dir, seed, log)
    splits = {which: _resolve_list(data_root, *lists[which], spec.resolve, which != "unlabeled")
              for which in SPLITS}
    labeled_samples, _, labeled_origin = splits["labeled"]
    if not labeled_samples:
        raise DataError(f"the labeled list {labeled_origin} is empty")
    # Labeled images in val: an error; in unlabeled: removed from it with a warning.
    labeled_keys = {os.path.normpath(sample.image) for sample in labeled_samples}
    in_val = [s.name for s in splits["val"][0] if os.path.normpath(s.image) in labeled_keys]
    if in_val:
        raise DataError(f"{len(in_val)} labeled image(s) from {labeled_origin} are also in the val "
                        f"list {splits['val'][2]}: {_some(in_val)}")
    samples, lines, origin = splits["unlabeled"]
    dropped = [s.name for s in samples if os.path.normpath(s.image) in labeled_keys]
    if dropped:
        log(f"warning: {len(dropped)} labeled image(s) also listed in {origin} were removed from "
            f"the unlabeled set: {_some(dropped)}")
        kept = [(s, line) for s, line in zip(samples, lines) if os.path.normpath(s.image) not in labeled_keys]
        splits["unlabeled"] = ([s for s, _ in kept], [line for _, line in kept], origin)
    for which, (samples, _, origin) in splits.items():  # labeled, unlabeled, val
        missing = [path for sample in samples for path in (sample.image, sample.label)
                   if path is not None and not spec.generated and not os.path.isfile(path)]
        if missing:  # every listed image, and mask where one is needed
            raise DataError(f"{len(missing)} file(s) listed in {origin} do not exist: {_some(missing, 3)}")
        if not samples and which != "labeled":
            log(f"warning: the {which} list {origin} is empty")
    lists = {which: splits[which][1] for which in SPLITS}
    log(f"data: {dataset}: {len(lists['labeled'])} labeled / {len(lists['unlabeled'])} unlabeled"
        f" / {len(lists['val'])} val")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        for which, lines in lists.items():
            with open(os.path.join(out_dir, which + ".txt"), "w", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in lines))
    images = {which: ImageList(splits[which][0], len(class_names), spec.generated,
                               None if which == "val" else crop_size, labeled=which != "unlabeled")
              for which in SPLITS}  # val: whole images; labeled, unlabeled: training crops
    return Data(name=dataset, num_classes=len(class_names), class_names=class_names,
                palette=spec.palette(), lists=lists, **images)
