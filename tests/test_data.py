"""Tests for data.py: toy generator, weak augmentation, file readers, split lists, pre-flight checks."""
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import DataError, build_data  # noqa: E402

H, W = 24, 32  # tiny image size used for fake roots


# --------------------------------------------------------------------------- helpers

def from_array(array, mode=None):
    """Image.fromarray, checked to give `mode` (Pillow 11 deprecates passing it; the modes used here are
    the arrays' own: (H, W) L, (H, W, 2) LA, (H, W, 3) RGB, (H, W, 4) RGBA)."""
    image = Image.fromarray(array)
    assert mode is None or image.mode == mode, (image.mode, mode)
    return image


def write_image(path, array, mode=None, **save_args):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from_array(array, mode).save(path, **save_args)
    return path


def write_palette_mask(path, label):
    """A VOC-style palette PNG whose pixel values are the class ids."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = Image.fromarray(label.astype(np.uint8))  # "L"; putpalette makes it "P"
    mask.putpalette(data.voc_palette().ravel().tolist())
    mask.save(path)
    return path


def write_lines(path, lines, newline="\n", final_newline=True):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = newline.join(lines) + (newline if final_newline else "")
    with open(path, "w", newline="") as handle:
        handle.write(text)
    return path


class Log(list):
    def __call__(self, message):
        self.append(message)


def encoded(array, fmt, mode=None):
    buffer = io.BytesIO()
    from_array(array, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def put(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(payload)


def denormalize(image):
    """float32 (3, h, w) -> float64 (h, w, 3) in 0..255."""
    return (image.double() * torch.tensor(data.STD, dtype=torch.float64).view(3, 1, 1) * 255
            + torch.tensor(data.MEAN, dtype=torch.float64).view(3, 1, 1) * 255).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- toy dataset

def test_toy_is_deterministic_and_images_differ():
    image, label = data.toy_sample("val", 3)
    image2, label2 = data.toy_sample("val", 3)
    assert image.shape == (data.TOY_SIZE, data.TOY_SIZE, 3) and image.dtype == np.uint8
    assert label.shape == (data.TOY_SIZE, data.TOY_SIZE) and label.dtype == np.uint8
    assert np.array_equal(image, image2) and np.array_equal(label, label2)
    assert not np.array_equal(image, data.toy_sample("val", 4)[0])
    assert not np.array_equal(image, data.toy_sample("labeled", 3)[0])
    assert data.TOY_SIZE <= 96


def test_toy_build_counts_classes_and_label_range():
    log = Log()
    toy = build_data("toy", crop_size=48, log=log)
    assert toy.num_classes == len(toy.class_names) >= 5 and toy.class_names[0] == "background"
    assert (len(toy.labeled), len(toy.unlabeled), len(toy.val)) == (data.TOY_LABELED, 480, 100)
    assert any(f"{data.TOY_LABELED} labeled / 480 unlabeled / 100 val" in line for line in log)
    assert toy.palette.shape == (256, 3) and toy.palette.dtype == np.uint8
    seen = np.zeros(toy.num_classes, bool)
    for index in range(40):
        _, label, name = toy.val[index]
        assert label.dtype == torch.int64 and label.min() >= 0 and label.max() < toy.num_classes
        seen[label.unique().numpy()] = True
        assert name == f"val_{index:04d}"
    assert seen.all(), "every class appears in 40 val images"
    assert len(build_data("toy", labeled=64, log=Log()).labeled) == 64


def test_toy_splits_share_no_images():
    digests = {}
    for split, (count, _) in data.TOY_SPLITS.items():
        digests[split] = {hashlib.sha1(data.toy_sample(split, i)[0].tobytes()).hexdigest() for i in range(count)}
        assert len(digests[split]) == count, f"duplicate images within {split}"
    assert not digests["labeled"] & digests["unlabeled"]
    assert not digests["labeled"] & digests["val"]
    assert not digests["unlabeled"] & digests["val"]


def test_toy_featured_class_is_visible_and_classes_are_balanced():
    """Image i shows class i mod 5 + 1 on top (so any 5 consecutive images cover every
    class), and no class dominates the default labeled images."""
    num_fg = len(data.TOY_CLASSES) - 1
    objects_with_class = np.zeros(num_fg + 1)
    for index in range(data.TOY_LABELED):
        _, label = data.toy_sample("labeled", index)
        counts = np.bincount(label.ravel(), minlength=num_fg + 1)
        assert counts[index % num_fg + 1] >= 30, (index, counts)
        objects_with_class += counts > 0
    assert objects_with_class[1:].min() >= 5, objects_with_class


def _colour_family(image, region):
    """The colour family (TOY_COLOURS name) of a region, voted by its brighter half of pixels
    (the darker shade of stripes, dots and checks would vote too), and whether it is textured."""
    names = list(data.TOY_COLOURS)
    chroma = np.stack([np.array(data.TOY_COLOURS[n], float) / sum(data.TOY_COLOURS[n]) for n in names])
    pixels = image.astype(float)
    brightness = pixels.sum(-1)
    bright = region & (brightness > np.percentile(brightness[region], 50))
    rgb = pixels[bright] / brightness[bright][:, None]
    nearest = np.argmin(((rgb[:, None, :] - chroma[None]) ** 2).sum(-1), axis=1)
    dark_fraction = (brightness[region] < 0.6 * np.median(brightness[bright])).mean()
    return names[np.bincount(nearest, minlength=len(names)).argmax()], dark_fraction > 0.1


def _aspect(region):
    """sqrt(smallest / largest eigenvalue) of the pixel coordinates' covariance: 1 for a disc,
    square, triangle, ring or cross at any rotation, the squeeze factor for a squeezed one."""
    ys, xs = np.nonzero(region)
    eigenvalues = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    return math.sqrt(eigenvalues[0] / eigenvalues[1])


def test_toy_objects_are_what_the_pixels_show():
    """toy_objects (the generator's plan) against the drawn pixels of the top object: class,
    colour family, solid or textured, elongated or regular."""
    checked = 0
    for index in range(100):
        image, label = data.toy_sample("unlabeled", index)
        objects = data.toy_objects("unlabeled", index)
        assert set(np.unique(label)) - {0} <= {o.class_id for o in objects}
        top = objects[-1]
        assert top.class_id == index % (len(data.TOY_CLASSES) - 1) + 1  # the featured class
        region = label == top.class_id
        border = region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any()
        if border or region.sum() < 80:
            continue
        family, textured = _colour_family(image, region)
        expected_family, texture = data.TOY_APPEARANCES[top.class_id - 1][top.appearance]
        assert (family, textured) == (expected_family, texture != "solid"), (index, top)
        aspect = _aspect(region)
        assert (aspect < 0.75) == top.elongated, (index, top, aspect)
        checked += 1
    assert checked >= 30


def test_toy_default_labels_miss_appearances_that_the_rest_show():
    """Labels are the bottleneck by construction: the default labeled images show large,
    regular objects in the common appearances only; the rest of the pool, the unlabeled set
    and val show every appearance, outline and size."""
    num_fg = len(data.TOY_CLASSES) - 1
    appearances = len(data.TOY_APPEARANCES[0])
    default = [o for i in range(data.TOY_LABELED) for o in data.toy_objects("labeled", i)]
    assert not any(o.elongated or o.small for o in default)
    counts = np.zeros((num_fg + 1, appearances), int)
    for o in default:
        counts[o.class_id, o.appearance] += 1
    assert (counts[1:, :data.TOY_COMMON] >= 1).all(), counts
    assert counts[1:, data.TOY_COMMON:].sum() == 0, counts
    for split, first in (("labeled", data.TOY_LABELED), ("unlabeled", 0), ("val", 0)):
        objects = [o for i in range(first, data.TOY_SPLITS[split][0]) for o in data.toy_objects(split, i)]
        for class_id in range(1, num_fg + 1):
            mine = [o for o in objects if o.class_id == class_id]
            assert {o.appearance for o in mine} == set(range(appearances)), (split, class_id)
            assert any(o.elongated for o in mine) and any(o.small for o in mine), (split, class_id)
            assert any(not o.elongated and not o.small for o in mine), (split, class_id)
    # each appearance of a class is in a colour family of its own
    for appearances_of_class in data.TOY_APPEARANCES:
        assert len({family for family, _ in appearances_of_class}) == appearances
    # colour alone never identifies a class: every common colour family is used by >= 2 classes
    common = [family for a in data.TOY_APPEARANCES for family, _ in a[:data.TOY_COMMON]]
    assert min(common.count(family) for family in set(common)) >= 2


def test_toy_shape_squeeze_keeps_the_area():
    yy, xx = np.mgrid[0:200, 0:200].astype(np.float64) + 0.5
    for shape in data.TOY_CLASSES[1:]:
        regular = data._shape_mask(shape, xx, yy, 100, 100, 40, 0.3)
        squeezed = data._shape_mask(shape, xx, yy, 100, 100, 40 / math.sqrt(0.6), 0.3, 0.6)
        assert squeezed.sum() == pytest.approx(regular.sum(), rel=0.03), shape
        assert _aspect(regular) == pytest.approx(1.0, abs=0.02), shape
        assert _aspect(squeezed) == pytest.approx(0.6, abs=0.02), shape


def test_toy_flag_errors():
    with pytest.raises(DataError, match="--num-classes"):
        build_data("toy", num_classes=21, log=Log())
    with pytest.raises(DataError, match="--labeled"):
        build_data("toy", labeled=data.TOY_SPLITS["labeled"][0] + 1, log=Log())
    with pytest.raises(DataError, match="--dataset"):
        build_data("imagenet", log=Log())


def test_toy_lists_round_trip_through_split_dir(tmp_path):
    first = build_data("toy", labeled=8, out_dir=str(tmp_path / "run"), crop_size=32, log=Log())
    assert (tmp_path / "run" / "labeled.txt").read_text().splitlines() == first.lists["labeled"]
    again = build_data("toy", split_dir=str(tmp_path / "run"), crop_size=32, log=Log())
    assert again.lists == first.lists
    for a, b in zip(first.labeled[(5, 11)], again.labeled[(5, 11)]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- weak augmentation

def test_augment_params_scale_range_positions_and_flip_rate():
    width, height, crop = 1000, 600, 513
    scales, flips = [], []
    for seed in range(3000):
        sw, sh, x0, y0, flip = data.augment_params(np.random.default_rng(seed), width, height, crop)
        scales.append(sw / width)
        assert abs(sh / height - sw / width) < 2e-3  # one scale for both axes
        assert 0 <= x0 <= max(sw - crop, 0) and 0 <= y0 <= max(sh - crop, 0)
        flips.append(flip)
    assert 0.5 <= min(scales) < 0.52 and 1.98 < max(scales) <= 2.0
    assert abs(np.mean(scales) - 1.25) < 0.03  # U[0.5, 2.0] has mean 1.25
    assert 0.45 < np.mean(flips) < 0.55


def test_augment_matches_full_rescale_then_crop():
    """Image: PIL rescale of the whole image then crop (+-2 grey levels); label: exact nearest
    neighbour in rational arithmetic, pixel by pixel; padding, zero image and 255 label outside."""
    rng0 = np.random.default_rng(0)
    for _ in range(25):
        width, height = (int(v) for v in rng0.integers(8, 30, 2))
        crop = int(rng0.integers(8, 40))
        image = Image.fromarray(rng0.integers(0, 256, (height, width, 3), dtype=np.uint8))
        label = rng0.integers(0, 21, (height, width)).astype(np.uint8)
        seed = int(rng0.integers(2 ** 31))
        sw, sh, x0, y0, flip = data.augment_params(np.random.default_rng(seed), width, height, crop)
        out_image, out_label, padding = data.weak_augment(image, label, crop, np.random.default_rng(seed))
        assert out_image.shape == (3, crop, crop) and out_image.dtype == torch.float32
        assert out_label.shape == (crop, crop) and out_label.dtype == torch.int64
        assert padding.shape == (crop, crop) and padding.dtype == torch.bool
        if flip:
            out_image, out_label, padding = out_image.flip(-1), out_label.flip(-1), padding.flip(-1)
        reference = np.array(image.resize((sw, sh), Image.Resampling.BILINEAR))[y0:y0 + crop, x0:x0 + crop]
        ch, cw = reference.shape[:2]
        assert np.abs(denormalize(out_image[:, :ch, :cw]) - reference).max() <= 2.0 + 1e-4
        for i in range(crop):
            for j in range(crop):
                if i < ch and j < cw:
                    r = math.floor((Fraction(y0 + i) + Fraction(1, 2)) * height / sh)
                    c = math.floor((Fraction(x0 + j) + Fraction(1, 2)) * width / sw)
                    assert out_label[i, j] == label[r, c] and not padding[i, j]
                else:
                    assert out_label[i, j] == 255 and padding[i, j]
                    assert (out_image[:, i, j] == 0).all()


def test_padding_small_image():
    """A small image is always padded: padding = a rectangle at the bottom/right, mirrored when flipped."""
    image = Image.fromarray(np.full((10, 12, 3), 200, np.uint8))
    label = np.ones((10, 12), np.uint8)
    crop, flips = 64, set()
    for seed in range(20):
        sw, sh, _, _, flip = data.augment_params(np.random.default_rng(seed), 12, 10, crop)
        out_image, out_label, padding = data.weak_augment(image, label, crop, np.random.default_rng(seed))
        expected = torch.ones(crop, crop, dtype=torch.bool)
        expected[:sh, :sw] = False
        expected = expected.flip(-1) if flip else expected
        flips.add(flip)
        assert torch.equal(padding, expected)
        assert torch.equal(padding, out_label == 255)
        assert (out_image[:, padding] == 0).all() and (out_image[:, ~padding] != 0).all()
        assert (out_label[~padding] == 1).all()
    assert flips == {True, False}


def test_flip_keeps_image_and_label_aligned():
    """The image's colour encodes its label (asymmetric layout); after augmentation the colour
    decoded from the image must match the label, and must not match the mirrored label."""
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)], np.float64)
    rng = np.random.default_rng(0)
    columns = np.repeat(rng.integers(0, 4, 40), rng.integers(3, 6, 40))[:100]  # runs of 3-5 px
    label = np.tile(columns.astype(np.uint8), (40, 1))  # (40, 100)
    image = Image.fromarray(colours[label].astype(np.uint8))
    flips, mirrored = set(), []
    for seed in range(12):
        flip = data.augment_params(np.random.default_rng(seed), 100, 40, 32)[4]
        out_image, out_label, padding = data.weak_augment(image, label, 32, np.random.default_rng(seed))
        decoded = np.argmin(((denormalize(out_image)[:, :, None, :] - colours) ** 2).sum(-1), -1)
        valid = ~padding.numpy()
        agreement = (decoded == out_label.numpy())[valid].mean()
        assert agreement > 0.9, (seed, agreement)  # disagreement only on blurred column edges
        mirrored.append((decoded == out_label.flip(-1).numpy())[valid & valid[:, ::-1]].mean())
        flips.add(flip)
    assert flips == {True, False}
    assert np.mean(mirrored) < 0.6  # a misaligned (unflipped) label would be caught


def test_items_are_pure_functions_of_index_and_seed():
    toy = build_data("toy", crop_size=40, log=Log())
    a, b = toy.labeled[(3, 1234)], toy.labeled[(3, 1234)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], toy.labeled[(3, 1235)][0])
    assert torch.equal(toy.labeled[7][0], toy.labeled[(7, 7)][0])
    assert torch.equal(toy.labeled[torch.tensor([3, 1234])][0], a[0])  # samplers may yield tensors
    u, v = toy.unlabeled[(10, 99)], toy.unlabeled[(10, 99)]
    assert torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])
    assert u[0].shape == (3, 40, 40) and u[1].dtype == torch.bool
    image, label = toy.labeled[(0, 5)]
    assert image.shape == (3, 40, 40) and label.shape == (40, 40) and label.dtype == torch.int64


# --------------------------------------------------------------------------- readers

def test_read_image_converts_modes(tmp_path):
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    cases = {
        "gray.png": (gray, "L"),
        "rgba.png": (np.dstack([gray, gray, gray, np.full_like(gray, 7)]), "RGBA"),
        "gray_alpha.png": (np.dstack([gray, np.full_like(gray, 9)]), "LA"),
    }
    for name, (array, mode) in cases.items():
        image = data.read_image(write_image(str(tmp_path / name), array, mode))
        assert image.mode == "RGB" and image.size == (W, H)
        assert np.array_equal(np.array(image)[..., 1], gray), name
    write_palette_mask(str(tmp_path / "palette.png"), np.full((H, W), 1))
    assert np.array(data.read_image(str(tmp_path / "palette.png")))[0, 0].tolist() == [128, 0, 0]
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = data.read_image(str(tmp_path / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and cmyk.size == (W, H)
    red = np.array(cmyk)[H // 2, W // 2].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    sixteen = (gray.astype(np.uint16) * 257)  # 16-bit gray, 0..65535
    write_image(str(tmp_path / "gray16.png"), sixteen)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    image16 = data.read_image(str(tmp_path / "gray16.png"))
    assert image16.mode == "RGB" and np.array_equal(np.array(image16)[..., 0], gray)


def test_read_image_undecodable_names_file(tmp_path):
    put(str(tmp_path / "garbage.jpg"), b"this is not an image")
    with pytest.raises(DataError, match="garbage.jpg"):
        data.read_image(str(tmp_path / "garbage.jpg"))
    payload = encoded(np.zeros((64, 64, 3), np.uint8) + 90, "PNG")
    put(str(tmp_path / "truncated.png"), payload[: len(payload) // 2])
    with pytest.raises(DataError, match="truncated.png"):
        data.read_image(str(tmp_path / "truncated.png"))


# What a camera stores for an upright picture under each EXIF Orientation (the standard's table, written out in
# numpy): 2 mirrored, 3 turned 180 degrees, 4 flipped, 5 transposed, 6 turned a quarter anticlockwise (shown
# turned clockwise), 7 transposed across the other diagonal, 8 turned a quarter clockwise.
EXIF_STORED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
               5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, 1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
               8: lambda a: np.rot90(a, -1)}


def write_turned(path, upright, orientation, **save_args):
    """Save `upright` as a camera would with EXIF Orientation `orientation`: the pixels stored turned."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return write_image(path, np.ascontiguousarray(EXIF_STORED[orientation](upright)), exif=exif, **save_args)


def test_images_and_masks_are_read_upright_as_their_exif_orientation_says_unless_only_stored_fits(tmp_path):
    upright = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)  # H != W: turns show
    label = (np.arange(H * W).reshape(H, W) % 5).astype(np.uint8)
    for orientation in EXIF_STORED:
        path = write_turned(str(tmp_path / f"photo{orientation}.png"), upright, orientation)
        assert np.array_equal(np.array(data.read_image(path)), upright), orientation
        # Fitted to a mask drawn on the stored pixels: kept as stored where only that fits (a quarter turn);
        # where both fit, upright (a half turn or a mirror: the sizes cannot tell).
        stored = EXIF_STORED[orientation](upright)
        kept = np.array(data.read_image(path, mask=stored[..., 0]))
        assert np.array_equal(kept, stored if stored.shape != upright.shape else upright), orientation
        path = write_turned(str(tmp_path / f"mask{orientation}.png"), label, orientation)
        assert np.array_equal(data.read_label(path, 5), label), orientation  # a mask saved with its photo's EXIF
    # A phone photo stored sideways (JPEG, orientation 6) and its mask drawn on the upright photo, as labelme
    # and CVAT show it: the data check passes and the val item's image and label are upright, W x H.
    root = str(tmp_path / "mine")
    make_folder_root(root, n_labeled=1, n_unlabeled=1, n_val=1)
    write_turned(os.path.join(root, "JPEGImages", "v0.jpg"), upright, 6, quality=100, subsampling=0)
    write_palette_mask(os.path.join(root, "SegmentationClass", "v0.png"), label % 3)
    assert Image.open(os.path.join(root, "JPEGImages", "v0.jpg")).size == (H, W)  # stored sideways
    folder = build_data("folder", root, num_classes=3, log=Log())
    assert data.check_data(folder, log=Log())["ok"]
    image, val_label, _ = folder.val[0]
    assert image.shape == (3, H, W) and np.array_equal(val_label.numpy(), label % 3)
    assert np.abs(denormalize(image) - upright).mean() < 3  # JPEG's loss, not a turn (that would be ~85)
    # Its mask drawn on the stored, sideways pixels (a tool that ignored the EXIF): the photo is kept as stored.
    write_palette_mask(os.path.join(root, "SegmentationClass", "v0.png"), np.rot90(label % 3))
    assert data.check_data(folder, log=Log())["ok"]
    image, val_label, _ = folder.val[0]
    assert image.shape == (3, W, H) and np.array_equal(val_label.numpy(), np.rot90(label % 3))
    assert np.abs(denormalize(image) - np.rot90(upright)).mean() < 3
    # A mask that fits neither way: the check names both files and sizes.
    write_palette_mask(os.path.join(root, "SegmentationClass", "v0.png"), np.zeros((H, W + 2)))
    with pytest.raises(DataError, match=rf"v0\.png is {W + 2}x{H} but its image \S*v0\.jpg is {W}x{H}"):
        data.check_data(folder, log=Log())


def test_a_broken_exif_block_still_turns_the_image_upright(tmp_path):
    # Orientation 6 beside a SamplesPerPixel tag (0x0115, a number) that holds text, as corrupt files have:
    # ImageOps.exif_transpose raises rewriting such a block (struct.error); the orientation itself is fine.
    exif = bytes.fromhex("4578696600004d4d002a000000080003011500020000000600000032011200030000000100060000876900"
                         "0400000001000000380000000043616e6f6e000001900300020000000b0000004a00000000323032303a3031"
                         "3a30310000")
    upright = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = write_image(str(tmp_path / "broken.png"), np.ascontiguousarray(EXIF_STORED[6](upright)), exif=exif)
    assert np.array_equal(np.array(data.read_image(path)), upright)


def test_read_label_palette_gray_and_bad_values(tmp_path):
    label = (np.arange(H * W).reshape(H, W) % 21).astype(np.uint8)
    label[0, :5] = 255
    path = write_palette_mask(str(tmp_path / "palette.png"), label)
    assert Image.open(path).mode == "P"
    assert np.array_equal(data.read_label(path, 21), label)  # indices, not colours
    gray = write_image(str(tmp_path / "gray.png"), label, "L")
    assert np.array_equal(data.read_label(gray, 21), label)
    gray_rgb = write_image(str(tmp_path / "gray_rgb.png"), np.dstack([label] * 3))
    assert np.array_equal(data.read_label(gray_rgb, 21), label)
    sixteen = write_image(str(tmp_path / "sixteen.png"), label.astype(np.uint16))
    assert np.array_equal(data.read_label(sixteen, 21), label)
    with pytest.raises(DataError, match=r"palette.png.*\b(20|19)\b.*--num-classes"):
        data.read_label(path, 19)  # ids 19 and 20 are out of range
    colour = write_image(str(tmp_path / "colour.png"), data.voc_palette()[label])
    with pytest.raises(DataError, match="colour.png.*RGB"):
        data.read_label(colour, 21)
    big = write_image(str(tmp_path / "big.png"), np.full((H, W), 1000, np.uint16))
    with pytest.raises(DataError, match="big.png.*1000"):
        data.read_label(big, 21)


def test_cityscapes_raw_ids_map_to_official_train_ids(tmp_path):
    # Written out from cityscapesScripts labels.py: (raw id, train id); 255 = ignored.
    official = [(0, 255), (1, 255), (4, 255), (6, 255), (7, 0), (8, 1), (9, 255), (10, 255),
                (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5), (18, 255),
                (19, 6), (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13),
                (27, 14), (28, 15), (29, 255), (30, 255), (31, 16), (32, 17), (33, 18)]
    raw = np.array([r for r, _ in official], np.uint8).reshape(1, -1).repeat(2, 0)
    path = write_image(str(tmp_path / "x_gtFine_labelIds.png"), raw, "L")
    mapped = data.read_label(path, 19, data.CITYSCAPES_ID_TO_TRAIN)
    assert mapped[0].tolist() == [t for _, t in official]
    assert sorted(set(data.CITYSCAPES_ID_TO_TRAIN.tolist()) - {255}) == list(range(19))
    assert len(data.CITYSCAPES_CLASSES) == 19 and len(data.VOC_CLASSES) == 21


def test_palettes_and_normalize():
    label = np.array([[0, 1], [15, 255]])
    picture = data.voc_palette()[label]
    assert picture.reshape(4, 3).tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128], [224, 224, 192]]
    assert data.cityscapes_palette()[13].tolist() == [0, 0, 142]
    tensor = data.normalize(Image.fromarray(np.full((2, 3, 3), 255, np.uint8)))
    expected = [(1 - m) / s for m, s in zip(data.MEAN, data.STD)]
    assert tensor.shape == (3, 2, 3) and torch.allclose(tensor[:, 0, 0], torch.tensor(expected))


# --------------------------------------------------------------------------- folder dataset

def make_folder_root(root, n_labeled=4, n_unlabeled=5, n_val=3, num_classes=3):
    """Images alternate .jpg/.png; masks are palette PNGs; unlabeled images have no masks."""
    rng = np.random.default_rng(1)
    ids = {"labeled": [f"l{i}" for i in range(n_labeled)], "unlabeled": [f"u{i}" for i in range(n_unlabeled)],
           "val": [f"v{i}" for i in range(n_val)]}
    for which, names in ids.items():
        for i, image_id in enumerate(names):
            ext = ".jpg" if i % 2 == 0 else ".png"
            pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            write_image(os.path.join(root, "JPEGImages", image_id + ext), pixels)
            if which != "unlabeled":
                label = rng.integers(0, num_classes, (H, W))
                label[:2] = 255
                write_palette_mask(os.path.join(root, "SegmentationClass", image_id + ".png"), label)
        write_lines(os.path.join(root, which + ".txt"), names)
    return ids


def test_folder_dataset(tmp_path):
    root = str(tmp_path / "mine")
    ids = make_folder_root(root)
    log = Log()
    folder = build_data("folder", root, num_classes=3, crop_size=16, out_dir=str(tmp_path / "run"), log=log)
    assert folder.class_names == ["class0", "class1", "class2"]
    assert (len(folder.labeled), len(folder.unlabeled), len(folder.val)) == (4, 5, 3)
    assert any("4 labeled / 5 unlabeled / 3 val" in line for line in log)
    image, label = folder.labeled[(1, 3)]
    assert image.shape == (3, 16, 16) and label.shape == (16, 16)
    image, padding = folder.unlabeled[(2, 3)]
    assert image.shape == (3, 16, 16)
    image, label, name = folder.val[1]
    assert name == "v1" and image.shape == (3, H, W)
    expected = np.array(Image.open(os.path.join(root, "SegmentationClass", "v1.png")))
    assert np.array_equal(label.numpy(), expected)
    assert folder.lists == ids
    with pytest.raises(DataError, match="classes.txt.*--num-classes"):  # neither given: both named
        build_data("folder", root, log=Log())
    write_lines(os.path.join(root, "classes.txt"), ["sky", "road", "car", ""])
    assert build_data("folder", root, num_classes=3, log=Log()).class_names == ["sky", "road", "car"]
    alone = build_data("folder", root, log=Log())  # classes.txt alone sets the count
    assert alone.num_classes == 3 and alone.class_names == ["sky", "road", "car"]
    with pytest.raises(DataError, match="classes.txt names 3 classes but --num-classes is 4"):
        build_data("folder", root, num_classes=4, log=Log())


def test_folder_reads_labelme2voc_output(tmp_path):
    # labelme2voc.py (labelme's examples) writes class_names.txt, masks as palette PNGs in SegmentationClassPNG/
    # and the same masks as .npy in SegmentationClass/.
    root = str(tmp_path / "labelme")
    make_folder_root(root, n_labeled=2, n_unlabeled=2, n_val=2)
    os.rename(os.path.join(root, "SegmentationClass"), os.path.join(root, "SegmentationClassPNG"))
    for image_id in ("l0", "l1", "v0", "v1"):
        put(os.path.join(root, "SegmentationClass", image_id + ".npy"), b"not a mask")
    write_lines(os.path.join(root, "class_names.txt"), ["_background_", "cat", "dog"], final_newline=False)
    folder = build_data("folder", root, crop_size=16, log=Log())
    assert folder.class_names == ["_background_", "cat", "dog"]
    assert {os.path.basename(os.path.dirname(s.label)) for s in folder.labeled.samples} == {"SegmentationClassPNG"}
    assert data.check_data(folder, log=Log())["ok"]
    os.remove(os.path.join(root, "SegmentationClassPNG", "v1.png"))  # missing: named in the documented folder
    with pytest.raises(DataError, match=r"val.txt do not exist: \S*SegmentationClass/v1\.png"):
        build_data("folder", root, log=Log())


def test_folder_ids_with_or_without_extension(tmp_path):
    root = str(tmp_path / "mine")
    make_folder_root(root)  # l0.jpg l1.png l2.jpg l3.png
    write_lines(os.path.join(root, "labeled.txt"), ["l0.jpg", "JPEGImages/l1.png", "l2", "/JPEGImages/l3.png"])
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())
    samples = folder.labeled.samples
    assert [s.name for s in samples] == ["l0", "l1", "l2", "l3"]
    assert [os.path.relpath(s.image, root) for s in samples] == [
        os.path.join("JPEGImages", n) for n in ("l0.jpg", "l1.png", "l2.jpg", "l3.png")]
    assert [os.path.relpath(s.label, root) for s in samples] == [
        os.path.join("SegmentationClass", f"l{i}.png") for i in range(4)]
    # Ids whose files have upper-case extensions, as cameras write them (IMG_0001.JPG)
    for name in ("l2.jpg", "l3.png"):
        stem, ext = os.path.splitext(name)
        os.rename(os.path.join(root, "JPEGImages", name), os.path.join(root, "JPEGImages", stem + ext.upper()))
    write_lines(os.path.join(root, "labeled.txt"), ["l2", "l3"])
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())
    assert [s.name for s in folder.labeled.samples] == ["l2", "l3"]
    assert all(os.path.isfile(s.image) for s in folder.labeled.samples) and data.check_data(folder, log=Log())["ok"]
    write_lines(os.path.join(root, "labeled.txt"), ["l1.jpg"])  # the file is l1.png: named as listed
    with pytest.raises(DataError, match=r"JPEGImages/l1\.jpg"):
        build_data("folder", root, num_classes=3, log=Log())


def test_folder_bad_inputs(tmp_path):
    root = str(tmp_path / "mine")
    make_folder_root(root)
    with pytest.raises(DataError, match="--data-root .*nowhere"):
        build_data("folder", str(tmp_path / "nowhere"), num_classes=3, log=Log())
    with pytest.raises(DataError, match="--data-root is required"):
        build_data("folder", None, num_classes=3, log=Log())
    os.rename(os.path.join(root, "unlabeled.txt"), os.path.join(root, "u.txt"))
    with pytest.raises(DataError, match="unlabeled.txt"):
        build_data("folder", root, num_classes=3, log=Log())
    os.rename(os.path.join(root, "u.txt"), os.path.join(root, "unlabeled.txt"))

    def with_labeled(lines, **kwargs):
        write_lines(os.path.join(root, "labeled.txt"), lines)
        return build_data("folder", root, num_classes=3, crop_size=16, **kwargs)

    with pytest.raises(DataError, match="labeled.txt is empty"):
        with_labeled(["", "  "], log=Log())
    with pytest.raises(DataError, match=r"labeled.txt.*JPEGImages/missing\.jpg"):
        with_labeled(["l0", "missing"], log=Log())
    os.remove(os.path.join(root, "SegmentationClass", "l3.png"))
    with pytest.raises(DataError, match=r"labeled.txt.*SegmentationClass/l3\.png"):
        with_labeled(["l0", "l3"], log=Log())
    with pytest.raises(DataError, match=r"val.txt.*v1"):
        with_labeled(["l0", "v1"], log=Log())
    for image_id in ("u2", "u4"):
        write_palette_mask(os.path.join(root, "SegmentationClass", image_id + ".png"), np.zeros((H, W), int))
    log = Log()
    folder = with_labeled(["l0", "u2", "u4"], log=log)  # labeled also in unlabeled: removed there
    assert len(folder.unlabeled) == 3 and folder.lists["unlabeled"] == ["u0", "u1", "u3"]
    assert any("warning" in line and "u2" in line for line in log)
    # Problems only visible when decoding (check_data's to find) surface at the first load, naming the file.
    write_palette_mask(os.path.join(root, "SegmentationClass", "l1.png"), np.zeros((H + 1, W), int))
    with pytest.raises(DataError, match=r"l1\.png.*l1\.png"):  # names mask and image
        with_labeled(["l0", "l1"], log=Log()).labeled[(1, 0)]
    payload = encoded(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8), "JPEG")
    put(os.path.join(root, "JPEGImages", "l2.jpg"), payload[: len(payload) * 8 // 10])  # header fine, data cut
    write_palette_mask(os.path.join(root, "SegmentationClass", "l0.png"), np.full((H, W), 7))
    folder = with_labeled(["l0", "l2"], log=Log())
    with pytest.raises(DataError, match=r"l2\.jpg"):
        folder.labeled[(1, 0)]
    with pytest.raises(DataError, match=r"l0\.png.*7.*--num-classes"):
        folder.labeled[(0, 0)]


# --------------------------------------------------------------------------- Pascal VOC

AUG_VALUE, OFFICIAL_VALUE = 1, 2  # the two mask folders hold different ids, to see which is read


def make_voc_root(root, n_train=100, n_extra=700, n_val=20, aug=True):
    """Fake VOC: train ids (official masks), extra SBD ids (Aug masks only), val ids (both)."""
    rng = np.random.default_rng(2)
    train = [f"2007_{i:06d}" for i in range(n_train)]
    extra = [f"2008_{i:06d}" for i in range(n_extra)]
    val = [f"2009_{i:06d}" for i in range(n_val)]
    jpeg = encoded(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "JPEG")
    aug_mask = encoded(np.full((H, W), AUG_VALUE, np.uint8), "PNG", "L")
    write_palette_mask(str(root / "tmp.png"), np.full((H, W), OFFICIAL_VALUE))
    official = (root / "tmp.png").read_bytes()
    os.remove(root / "tmp.png")
    for image_id in train + extra + val:
        put(str(root / "JPEGImages" / (image_id + ".jpg")), jpeg)
        if aug:
            put(str(root / "SegmentationClassAug" / (image_id + ".png")), aug_mask)
    for image_id in train + val:
        put(str(root / "SegmentationClass" / (image_id + ".png")), official)
    write_lines(str(root / "ImageSets" / "Segmentation" / "train.txt"), train)
    write_lines(str(root / "ImageSets" / "Segmentation" / "val.txt"), val)
    return train, extra, val


def test_voc_classic_and_blended_selection(tmp_path):
    train, extra, val = make_voc_root(tmp_path)
    log = Log()
    classic = build_data("voc", str(tmp_path), labeled=92, crop_size=16, log=log)
    labeled, unlabeled = classic.lists["labeled"], classic.lists["unlabeled"]
    assert len(labeled) == 92 and set(labeled) <= set(train)
    assert len(unlabeled) == 708 and set(labeled) | set(unlabeled) == set(train + extra)
    assert not set(labeled) & set(unlabeled) and classic.lists["val"] == val
    assert any("voc: 92 labeled / 708 unlabeled / 20 val" in line for line in log)
    assert classic.num_classes == 21 and classic.class_names == data.VOC_CLASSES
    assert (classic.val[0][1] == AUG_VALUE).all()  # SegmentationClassAug preferred when present
    assert set(classic.labeled[(0, 1)][1].unique().tolist()) <= {AUG_VALUE, 255}

    blended = build_data("voc", str(tmp_path), labeled=662, crop_size=16, log=Log())
    labeled, unlabeled = blended.lists["labeled"], blended.lists["unlabeled"]
    assert len(labeled) == 662 and len(unlabeled) == 138
    assert set(labeled) - set(train), "blended labeled images come from the whole augmented pool"
    assert set(labeled) | set(unlabeled) == set(train + extra) and not set(labeled) & set(val)


def test_voc_generated_split_is_deterministic_and_seeded(tmp_path):
    make_voc_root(tmp_path, n_extra=50)
    first = build_data("voc", str(tmp_path), labeled=92, seed=0, log=Log()).lists
    again = build_data("voc", str(tmp_path), labeled=92, seed=0, log=Log()).lists
    other = build_data("voc", str(tmp_path), labeled=92, seed=1, log=Log()).lists
    assert first == again
    assert first["labeled"] != other["labeled"] and first["val"] == other["val"]
    expected = sorted(np.random.default_rng(0).choice(100, 92, replace=False))
    assert first["labeled"] == [f"2007_{i:06d}" for i in expected]


def test_voc_without_aug_and_invalid_labeled(tmp_path):
    train, _, val = make_voc_root(tmp_path, n_extra=0, aug=False)
    log = Log()
    voc = build_data("voc", str(tmp_path), labeled=92, log=log)
    assert len(voc.lists["unlabeled"]) == 8 and set(voc.lists["unlabeled"]) <= set(train)
    assert any("warning" in line and "SegmentationClassAug" in line for line in log)
    assert (voc.val[0][1] == OFFICIAL_VALUE).all()  # palette masks read as indices
    with pytest.raises(DataError, match="--labeled 662"):
        build_data("voc", str(tmp_path), labeled=662, log=Log())
    with pytest.raises(DataError, match=r"--labeled 100.*92.*--split-dir"):
        build_data("voc", str(tmp_path), labeled=100, log=Log())
    with pytest.raises(DataError, match=r"--labeled None"):
        build_data("voc", str(tmp_path), log=Log())
    with pytest.raises(DataError, match="--num-classes"):
        build_data("voc", str(tmp_path), labeled=92, num_classes=20, log=Log())
    os.remove(tmp_path / "ImageSets" / "Segmentation" / "train.txt")
    with pytest.raises(DataError, match="train.txt"):
        build_data("voc", str(tmp_path), labeled=92, log=Log())


def test_voc_split_dir_all_three_formats(tmp_path):
    root = tmp_path / "VOC"
    train, extra, val = make_voc_root(root, n_extra=30)
    chosen = train[:5]
    lists = tmp_path / "splits"
    write_lines(str(lists / "val.txt"), val, final_newline=False)  # published layout: <n>/../val.txt
    formats = {
        "ids": (["", *chosen[:2], "", *chosen[2:]], "\r\n", True),
        "paths": ([f"JPEGImages/{i}.jpg" for i in chosen], "\n", False),
        "pairs": ([f"/JPEGImages/{i}.jpg  SegmentationClassAug/{i}.png" for i in chosen] + ["   "], "\n", True),
    }
    samples = {}
    for name, (lines, newline, final) in formats.items():
        write_lines(str(lists / name / "labeled.txt"), lines, newline, final)
        write_lines(str(lists / name / "unlabeled.txt"), train[5:] + extra, newline, final)
        log = Log()
        voc = build_data("voc", str(root), labeled=366, split_dir=str(lists / name), log=log)
        assert (len(voc.labeled), len(voc.unlabeled), len(voc.val)) == (5, 125, 20), name
        assert any("warning" in line and "--labeled 366" in line for line in log)
        assert voc.lists["val"] == val
        samples[name] = [(os.path.normpath(s.image), os.path.normpath(s.label))
                         for s in voc.labeled.samples]
    assert samples["ids"] == samples["paths"] == samples["pairs"]
    assert samples["ids"][0] == (str(root / "JPEGImages" / f"{train[0]}.jpg"),
                                 str(root / "SegmentationClassAug" / f"{train[0]}.png"))
    # Without val.txt next to the lists, the dataset's own ImageSets val.txt is used.
    os.remove(lists / "val.txt")
    write_lines(str(root / "ImageSets" / "Segmentation" / "val.txt"), val[:7])
    assert len(build_data("voc", str(root), split_dir=str(lists / "ids"), log=Log()).val) == 7
    write_lines(str(lists / "ids" / "val.txt"), val[:3])
    assert len(build_data("voc", str(root), split_dir=str(lists / "ids"), log=Log()).val) == 3
    write_lines(str(lists / "ids" / "labeled.txt"), [chosen[0], "a b c"])
    with pytest.raises(DataError, match=r"labeled.txt line 2"):
        build_data("voc", str(root), split_dir=str(lists / "ids"), log=Log())
    write_lines(str(lists / "ids" / "labeled.txt"), chosen)
    os.remove(lists / "ids" / "unlabeled.txt")
    with pytest.raises(DataError, match=r"ids/unlabeled.txt"):
        build_data("voc", str(root), split_dir=str(lists / "ids"), log=Log())
    with pytest.raises(DataError, match=r"--split-dir .*nowhere"):
        build_data("voc", str(root), split_dir=str(lists / "nowhere"), log=Log())


def test_voc_lists_written_to_out_dir_are_reusable(tmp_path):
    root = tmp_path / "VOC"
    make_voc_root(root, n_extra=30)
    first = build_data("voc", str(root), labeled=183 - 91, seed=3, out_dir=str(tmp_path / "run"), log=Log())
    for which, lines in first.lists.items():
        assert (tmp_path / "run" / f"{which}.txt").read_text() == "".join(line + "\n" for line in lines)
    again = build_data("voc", str(root), split_dir=str(tmp_path / "run"), log=Log())
    assert again.lists == first.lists
    assert again.labeled.samples == first.labeled.samples


def test_voc_missing_files_and_overlaps_name_the_culprit(tmp_path):
    root = tmp_path / "VOC"
    train, extra, val = make_voc_root(root, n_extra=5)
    lists = tmp_path / "splits"
    write_lines(str(lists / "unlabeled.txt"), extra)
    ghosts = [f"2010_{i:06d}" for i in range(10)]
    write_lines(str(lists / "labeled.txt"), train[:3] + ghosts)
    with pytest.raises(DataError) as error:
        build_data("voc", str(root), split_dir=str(lists), log=Log())
    message = str(error.value)
    assert str(lists / "labeled.txt") in message and "20 file(s)" in message and "(20 in all)" in message
    assert str(root / "JPEGImages" / "2010_000000.jpg") in message and "\n" not in message
    write_lines(str(lists / "labeled.txt"), train[:3])
    write_lines(str(lists / "unlabeled.txt"), extra + ["2011_000001"])
    with pytest.raises(DataError, match=r"unlabeled.txt.*2011_000001\.jpg"):
        build_data("voc", str(root), split_dir=str(lists), log=Log())
    os.remove(root / "SegmentationClass" / f"{val[4]}.png")
    os.remove(root / "SegmentationClassAug" / f"{val[4]}.png")
    write_lines(str(lists / "unlabeled.txt"), extra + train[:2])
    with pytest.raises(DataError, match=rf"val.txt.*SegmentationClass/{val[4]}\.png"):
        build_data("voc", str(root), split_dir=str(lists), log=Log())
    put(str(root / "SegmentationClassAug" / f"{val[4]}.png"), encoded(np.zeros((H, W + 2), np.uint8), "PNG", "L"))
    mismatch = rf"mask .*{val[4]}\.png is {W + 2}x{H} but its image .*{val[4]}\.jpg is {W}x{H}"
    with pytest.raises(DataError, match=mismatch):  # found by the data check, and at the first load
        data.check_data(build_data("voc", str(root), split_dir=str(lists), log=Log()))
    put(str(root / "SegmentationClassAug" / f"{val[4]}.png"), encoded(np.zeros((H, W), np.uint8), "PNG", "L"))
    log = Log()
    voc = build_data("voc", str(root), split_dir=str(lists), log=log)
    assert voc.lists["unlabeled"] == extra  # train[:2] were labeled: removed with a warning
    assert any("warning" in line and "2 labeled image(s)" in line for line in log)
    write_lines(str(lists / "labeled.txt"), train[:3] + val[:1])
    with pytest.raises(DataError, match=rf"labeled.txt.*val.*{val[0]}"):
        build_data("voc", str(root), split_dir=str(lists), log=Log())


# --------------------------------------------------------------------------- Cityscapes

RAW_ROW = [7, 26, 0, 33, 24, 9]  # road, car, unlabeled, bicycle, person, parking
TRAIN_ROW = [0, 13, 255, 18, 11, 255]


def make_cityscapes_root(root, train_cities=(("aachen", 100), ("bremen", 100)), val_cities=(("lindau", 5),)):
    """Fake Cityscapes: labelIds masks everywhere; bremen also has labelTrainIds (all 5 = pole)."""
    rng = np.random.default_rng(3)
    image = encoded(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "PNG")
    raw = np.zeros((H, W), np.uint8)
    raw[:, : len(RAW_ROW)] = RAW_ROW
    label_ids = encoded(raw, "PNG", "L")
    train_ids = encoded(np.full((H, W), 5, np.uint8), "PNG", "L")
    paths = {"train": [], "val": []}
    for split, cities in (("train", train_cities), ("val", val_cities)):
        for city, count in cities:
            for i in range(count):
                stem = f"{city}_{i:06d}_000019"
                relative = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
                put(str(root / relative), image)
                put(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), label_ids)
                if city == "bremen":
                    put(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"), train_ids)
                paths[split].append(relative)
    return paths


def test_cityscapes_generated_split_and_raw_id_mapping(tmp_path):
    paths = make_cityscapes_root(tmp_path)
    log = Log()
    city = build_data("cityscapes", str(tmp_path), labeled=186, crop_size=16, seed=5, log=log)
    assert any("cityscapes: 186 labeled / 14 unlabeled / 5 val" in line for line in log)
    assert set(city.lists["labeled"]) | set(city.lists["unlabeled"]) == set(paths["train"])
    assert not set(city.lists["labeled"]) & set(city.lists["unlabeled"])
    assert city.lists["val"] == sorted(paths["val"])
    assert city.num_classes == 19 and city.palette[0].tolist() == [128, 64, 128]
    assert build_data("cityscapes", str(tmp_path), labeled=186, seed=5, log=Log()).lists == city.lists
    assert build_data("cityscapes", str(tmp_path), labeled=186, seed=6, log=Log()).lists != city.lists
    image, label, name = city.val[0]
    assert name == "lindau_000000_000019" and image.shape == (3, H, W)
    assert label[0, : len(TRAIN_ROW)].tolist() == TRAIN_ROW and (label[:, len(RAW_ROW):] == 255).all()
    for index in range(len(city.labeled)):
        sample = city.labeled.samples[index]
        expected = {5, 255} if "bremen" in sample.image else set(TRAIN_ROW)
        assert sample.map_ids == ("aachen" in sample.image)
        assert sample.label.endswith("_labelIds.png" if sample.map_ids else "_labelTrainIds.png")
        if index % 40 == 0:
            assert set(city.labeled[(index, 0)][1].unique().tolist()) <= expected
    with pytest.raises(DataError, match=r"--labeled 100.*186.*--split-dir"):
        build_data("cityscapes", str(tmp_path), labeled=100, log=Log())
    with pytest.raises(DataError, match=r"--labeled 372: only 200"):
        build_data("cityscapes", str(tmp_path), labeled=372, log=Log())


def test_cityscapes_split_dir_formats(tmp_path):
    root = tmp_path / "cityscapes"
    paths = make_cityscapes_root(root, train_cities=(("aachen", 3), ("bremen", 3)))
    lists = tmp_path / "splits"
    chosen = [paths["train"][0], paths["train"][4]]  # one aachen (labelIds), one bremen (trainIds)
    rest = [p for p in paths["train"] if p not in chosen]
    formats = {
        "paths": chosen,
        "pairs": [f"{p} {p.replace('leftImg8bit/', 'gtFine/', 1).replace('_leftImg8bit.png', '_gtFine_labelIds.png')}"
                  for p in chosen],
        "names": [os.path.basename(p).replace("_leftImg8bit.png", "") for p in chosen],
    }
    for name, lines in formats.items():
        write_lines(str(lists / name / "labeled.txt"), lines, "\r\n", final_newline=False)
        write_lines(str(lists / name / "unlabeled.txt"), ["", *rest])
        city = build_data("cityscapes", str(root), split_dir=str(lists / name), crop_size=16, log=Log())
        assert (len(city.labeled), len(city.unlabeled), len(city.val)) == (2, 4, 5)
        first, second = city.labeled.samples
        assert first.image == str(root / chosen[0]) and first.map_ids and first.label.endswith("_labelIds.png")
        assert second.image == str(root / chosen[1])
        if name == "pairs":  # the listed labelIds mask is used, mapped
            assert second.map_ids and second.label.endswith("bremen_000001_000019_gtFine_labelIds.png")
        else:  # derived: labelTrainIds when present
            assert not second.map_ids and second.label.endswith("bremen_000001_000019_gtFine_labelTrainIds.png")
    write_lines(str(lists / "val.txt"), paths["val"][:2])
    assert len(build_data("cityscapes", str(root), split_dir=str(lists / "paths"), log=Log()).val) == 2
    write_lines(str(lists / "paths" / "labeled.txt"), ["leftImg8bit/train/aachen/oops.png"])
    with pytest.raises(DataError, match=r"labeled.txt line 1.*oops.png"):
        build_data("cityscapes", str(root), split_dir=str(lists / "paths"), log=Log())


# --------------------------------------------------------------------------- the full data check

def test_colours_to_ids_inverts_the_palette():
    label = (np.arange(H * W).reshape(H, W) % 23).astype(np.uint8)
    label[0] = 255
    rgb = data.voc_palette()[label]
    assert np.array_equal(data.colours_to_ids(rgb, data.voc_palette()), label)
    rgb[1, :3] = (1, 2, 3)  # not a palette colour: ignored
    expected = label.copy()
    expected[1, :3] = 255
    assert np.array_equal(data.colours_to_ids(rgb, data.voc_palette()), expected)


def break_folder_root(root):
    """Three problems that build_data's existence checks let through: a colour-coded RGB mask
    (labeled), a value that is not a class id (val mask), a JPEG cut after its header (unlabeled)."""
    label = np.random.default_rng(0).integers(0, 3, (H, W))
    write_image(os.path.join(root, "SegmentationClass", "l1.png"), data.voc_palette()[label])
    write_palette_mask(os.path.join(root, "SegmentationClass", "v2.png"), np.full((H, W), 9))
    payload = encoded(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8), "JPEG")
    put(os.path.join(root, "JPEGImages", "u2.jpg"), payload[: len(payload) * 8 // 10])
    return ["l1.png", "v2.png", "u2.jpg"]


@pytest.mark.parametrize("workers", [0, 1])
def test_check_data_reports_every_bad_file_at_once(tmp_path, workers):
    root = str(tmp_path / "mine")
    make_folder_root(root, n_labeled=4, n_unlabeled=5, n_val=3)
    bad = break_folder_root(root)
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())  # the files exist
    log, record_path = Log(), str(tmp_path / "data_check.json")
    with pytest.raises(DataError) as error:
        data.check_data(folder, workers, log, record_path)
    message = str(error.value)
    assert "3 bad file(s) among 12 listed images and 7 masks" in message and "\n" not in message
    assert all(name in message for name in bad)
    logged = "\n".join(log)
    assert "labeled: mask" in logged and "l1.png is a colour-coded RGB image" in logged
    assert "palette colours of ids 0, 1, 2" in logged and "colours_to_ids" in logged
    assert re.search(r"val: mask \S*v2\.png has values 9", logged)
    assert re.search(r"unlabeled: cannot decode image \S*u2\.jpg", logged)
    record = json.load(open(record_path))
    assert record["ok"] is False and len(record["problems"]) == 3
    # a failed check is never taken as passed: the next call reads the files again
    with pytest.raises(DataError):
        data.check_data(folder, 0, Log(), record_path)


def test_check_data_sizes_colours_off_palette_and_cityscapes_ids(tmp_path):
    root = str(tmp_path / "mine")
    make_folder_root(root, n_labeled=2, n_unlabeled=2, n_val=2)
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())
    # a mask of another size than its image
    folder.val.samples[0] = folder.val.samples[0]._replace(
        label=write_palette_mask(str(tmp_path / "wide.png"), np.zeros((H, W + 3), int)))
    speckled = data.voc_palette()[np.zeros((H, W), int)]
    speckled[0, 0] = (7, 7, 9)  # a colour of no class
    folder.val.samples[1] = folder.val.samples[1]._replace(
        label=write_image(str(tmp_path / "speckled.png"), speckled))
    log = Log()
    with pytest.raises(DataError, match="2 bad file"):
        data.check_data(folder, 0, log)
    logged = "\n".join(log)
    assert re.search(r"wide\.png is 35x24 but its image \S*v0\.jpg is 32x24", logged)
    assert "speckled.png is a colour-coded RGB image (2 colours)" in logged
    assert "1 of its colours are not in the dataset's palette" in logged
    # Cityscapes: raw ids are mapped first, so ids above 18 are fine
    city_root = tmp_path / "cityscapes"
    make_cityscapes_root(city_root, train_cities=(("aachen", 3), ("bremen", 3)), val_cities=(("lindau", 2),))
    split = tmp_path / "split"
    write_lines(str(split / "labeled.txt"), ["aachen_000000_000019", "bremen_000000_000019"])
    write_lines(str(split / "unlabeled.txt"), ["aachen_000001_000019"])
    city = build_data("cityscapes", str(city_root), split_dir=str(split), crop_size=16, log=Log())
    record = data.check_data(city, 0, Log())
    assert record["ok"] and (record["images"], record["masks"]) == (5, 4)


def test_check_data_is_recorded_skipped_when_unchanged_and_shows_progress(tmp_path):
    root = str(tmp_path / "mine")
    make_folder_root(root, n_labeled=2, n_unlabeled=40, n_val=2)
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())
    record_path = str(tmp_path / "data_check.json")
    ticks = iter(range(0, 10_000, 6))  # a fake clock: 6 s per reading
    log = Log()
    record = data.check_data(folder, 0, log, record_path, clock=lambda: next(ticks))
    assert record["ok"] and (record["images"], record["masks"]) == (44, 4)
    assert json.load(open(record_path))["fingerprint"] == record["fingerprint"]
    progress = [line for line in log if "%)" in line]
    # 3 chunks of 16 read at 6, 12, 18 s: one line once 10 s have passed, none at the end
    assert len(progress) == 1 and progress[0].startswith("data check: 32/44 images (72%)")
    assert "eta" in progress[0] and "all" not in progress[0]
    assert "44 images and 4 masks decode" in log[-2] and log[-1].startswith("data check: labeled pixels")
    log = Log()
    assert data.check_data(folder, 0, log, record_path)["fingerprint"] == record["fingerprint"]
    assert len(log) == 1 and "skipped" in log[0] and record_path in log[0]
    # a listed file rewritten since: read again (and found bad)
    put(os.path.join(root, "JPEGImages", "u3.png"), b"not a png")
    log = Log()
    with pytest.raises(DataError, match=r"u3\.png"):
        data.check_data(folder, 0, log, record_path)
    assert not any("skipped" in line for line in log)
    # the toy set is generated: nothing to read
    assert data.check_data(build_data("toy", log=Log()), 0, Log(), record_path) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_check_data_shows_the_labeled_pixels_and_warns_about_0_255_masks(tmp_path, workers):
    """The share of each class in the labeled masks, counted here mask by mask; a class with no
    labeled pixel is warned about (0/255 masks: their objects are ignored, silently otherwise)."""
    root = str(tmp_path / "mine")
    make_folder_root(root, n_labeled=3, num_classes=3)
    folder = build_data("folder", root, num_classes=3, crop_size=16, log=Log())
    counts = np.zeros(256)
    for sample in folder.labeled.samples:  # the val masks do not count
        values, numbers = np.unique(np.array(Image.open(sample.label)), return_counts=True)
        counts[values] += numbers
    shares = [f"{100 * counts[i] / counts.sum():.1f}%" for i in (0, 1, 2, 255)]
    log = Log()
    data.check_data(folder, workers, log)
    assert log[-1] == ("data check: labeled pixels: ignore (255) {3}, class0 {0}, class1 {1}, class2 {2}"
                       .format(*shares))
    # binary masks saved as 0 / 255, read against 'background, object': the objects are ignored
    for sample in folder.labeled.samples:
        mask = np.zeros((H, W), np.uint8)
        mask[:, : W // 2 + 4] = 255  # 5/8 of the image
        Image.fromarray(mask).save(sample.label)
    log = Log()
    data.check_data(folder, workers, log)
    assert log[-2].endswith("ignore (255) 62.5%, class0 37.5%, class1 0.0%, class2 0.0%")
    assert log[-1].startswith("warning: no labeled pixel of class 1 'class1', 2 'class2': only pseudo-labels")
    many = str(tmp_path / "many")  # 40 classes: the line shows 30 of them
    make_folder_root(many, n_labeled=3, num_classes=40)
    log = Log()
    data.check_data(build_data("folder", many, num_classes=40, crop_size=16, log=Log()), workers, log)
    assert log[-1].count("%") == 31 and log[-1].endswith("... (40 in all)")


def test_check_data_workers_stop_when_interrupted_under_the_trainers_signal_handlers(tmp_path):
    """train.main leaves SIGTERM handled ('save and stop'); forked check workers must not
    inherit that, or stopping the pool (here: Ctrl-C at the first progress line) would wait
    for them forever. In a subprocess, with a timeout, so that a hang fails the test."""
    script = f"""
import itertools, signal, sys
sys.path[:0] = [{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
import data
from test_data import Log, make_folder_root
signal.signal(signal.SIGTERM, lambda *args: None)
make_folder_root({str(tmp_path / "mine")!r}, n_labeled=2, n_unlabeled=80, n_val=2)
folder = data.build_data("folder", {str(tmp_path / "mine")!r}, num_classes=3, crop_size=16, log=Log())

def log(line):
    if "%)" in line:
        raise KeyboardInterrupt

ticks = itertools.count(0, 20)
try:
    data.check_data(folder, 2, log, clock=lambda: next(ticks))
except KeyboardInterrupt:
    print("stopped")
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=120)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # hung workers too, if any
        except ProcessLookupError:
            pass
    assert child.returncode == 0 and stdout.strip() == "stopped", stderr
