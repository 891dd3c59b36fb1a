"""Evaluation for PCR (docs/METHOD.md section 5): confusion-matrix mIoU, the field's protocols,
pictures of predictions. train.py calls `evaluate`; the command line runs the same code on a saved
checkpoint or new images, alone or under torchrun (README: "Evaluation, pictures and inference").

Protocols (`mode`): whole, one forward pass at the image's own size (Pascal VOC); sliding,
crop x crop windows averaged where they overlap (Cityscapes); center, only the central crop x crop
box is predicted and scored. Scales and flip: `predict_heads`. The pictures, the map of nearest
micro-prototypes included, follow the same protocol: no mode needs more memory for them.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data as data_lib
import train  # used at call time only: train.py imports this module at its own top
from model import DeepLabV3Plus
from prototypes import PrototypeBank

IGNORE_INDEX = data_lib.IGNORE_INDEX
MODES = ("whole", "sliding", "center")
PROTO_CHUNK_BYTES = 64 * 2 ** 20  # float32 features per chunk of _per_pixel: 16 rows of 2048 at D = 512
VIEW_MIN_SIDE = 256  # pictures with a shorter side are enlarged (nearest neighbour)
PROGRESS_SECONDS = 10.0  # at most one progress line this often (plus the last one)


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """cm (K, K) int64 on pred's device, cm[g, p] = #{pixels with target g and prediction p};
    pred, target integer tensors of one shape, pred in [0, K). Pixels whose target is
    `ignore_index` or outside [0, K) are not counted (evaluate() rejects the latter)."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    target = target.to(pred.device).long().reshape(-1)
    pred = pred.long().reshape(-1)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    # Invalid pixels go to an extra bin K*K that is dropped. index_add_ instead of
    # torch.bincount: bincount reads max() back to the host on CUDA (a sync per image).
    cell = torch.where(valid, target * num_classes + pred, torch.full_like(target, num_classes * num_classes))
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.long, device=pred.device)
    counts.index_add_(0, cell, torch.ones_like(cell))
    return counts[:-1].view(num_classes, num_classes)


def metrics_from_confusion(cm):
    """Metrics in % from a confusion matrix cm (K, K), rows = ground truth: iou[k] = TP / (GT +
    PRED - TP) of class k, None when that union is 0; miou, their mean over the classes with a
    non-zero union (the usual convention: a class only predicted scores 0 and lowers the mean);
    pixel_acc = sum TP / sum GT; mean_acc, the mean of TP / GT over classes with GT > 0; pixels =
    sum GT, the labelled pixels scored. Scores are NaN when no labelled pixel was scored."""
    cm = cm.detach().to("cpu", torch.float64)
    true_positive, ground_truth, predicted = cm.diagonal(), cm.sum(dim=1), cm.sum(dim=0)
    union = ground_truth + predicted - true_positive
    iou = true_positive / union.clamp_min(1)
    present, labelled = union > 0, ground_truth > 0
    total, nan = ground_truth.sum(), float("nan")
    return {
        "miou": 100 * iou[present].mean().item() if present.any() else nan,
        "pixel_acc": 100 * (true_positive.sum() / total).item() if total > 0 else nan,
        "mean_acc": (100 * (true_positive[labelled] / ground_truth[labelled]).mean().item()
                     if labelled.any() else nan),
        "iou": [100 * value if keep else None for value, keep in zip(iou.tolist(), present.tolist())],
        "pixels": int(total.item()),
    }


def format_table(metrics, class_names=None):
    """Per-class IoU table (one line per class; '-' = absent from ground truth and
    prediction) followed by one summary line with mIoU, pixel and mean accuracy."""
    ious = metrics["iou"]
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(ious))]
    width = max([len("class")] + [len(name) for name in names])
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    for name, iou in zip(names, ious):
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{iou:.2f}':>6}")
    lines.append(f"mIoU {metrics['miou']:.2f}  pixel acc {metrics['pixel_acc']:.2f}  "
                 f"mean acc {metrics['mean_acc']:.2f}  ({metrics['pixels']} pixels)")
    return "\n".join(lines)


# ------------------------------------------------------------------------- prediction

def window_starts(length, crop, stride):
    """Start offsets of the windows along a side of `length` pixels: every `stride` pixels, the
    last one moved back to end exactly at the border ([0] if length <= crop)."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def center_box(height, width, crop):
    """(top, left, box_height, box_width) of the central crop x crop box of an image; a side
    shorter than the crop is kept whole. Mode "center" predicts and scores this box only."""
    box_height, box_width = min(crop, height), min(crop, width)
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def _per_pixel(feature, size, read, chunk_pixels=None):
    """(B, C, H, W) assembled from read(f, rows) (B, r, W, C), f (B, r, W, D) float32 the feature
    (B, D, h, w) bilinearly interpolated at image rows `rows` (a slice) of an image of `size` (H, W),
    in chunks of at most `chunk_pixels` pixels (default: PROTO_CHUNK_BYTES of float32 D-vectors):
    the full-resolution feature never exists at once (4 GB on Cityscapes)."""
    batch, dim = feature.shape[:2]
    height, width = size
    rows_per_chunk = max(1, (chunk_pixels or PROTO_CHUNK_BYTES // (4 * dim)) // (batch * width))
    feature, out = feature.float(), None
    # grid_sample with align_corners=True maps -1..1 to the first..last source pixel
    # centre, which is exactly F.interpolate(align_corners=True)'s sampling.
    grid_y = torch.linspace(-1, 1, height, device=feature.device)
    grid_x = torch.linspace(-1, 1, width, device=feature.device)
    for top in range(0, height, rows_per_chunk):
        rows = slice(top, top + rows_per_chunk)
        grid = torch.stack(torch.meshgrid(grid_x, grid_y[rows], indexing="xy"), dim=-1)
        sampled = F.grid_sample(feature, grid.expand(batch, -1, -1, -1), mode="bilinear",
                                align_corners=True)  # (B, D, r, W)
        values = read(sampled.permute(0, 2, 3, 1), rows)
        if out is None:
            out = values.new_empty(batch, values.shape[-1], height, width)
        out[:, :, rows] = values.permute(0, 3, 1, 2)
    return out


def prototype_logits_map(feature, bank, size, chunk_pixels=None):
    """Prototype-head logits (B, K, H, W) float32 of an image of `size` (H, W): bank(f(y, x))
    for the feature (B, D, h, w) interpolated at every pixel (y, x) (_per_pixel)."""
    def read(rows, _):
        return bank(rows.reshape(-1, rows.shape[-1]))[0].view(*rows.shape[:3], -1)
    return _per_pixel(feature, size, read, chunk_pixels)


def class_prototype_cosines(feature, bank, classes, chunk_pixels=None):
    """(B, M, H, W) float32: out[b, m, y, x] = cos(f(y, x), p[classes[b, y, x], m]), the
    cosines of each pixel's feature (as in prototype_logits_map) to the M micro-prototypes
    of its class; classes (B, H, W) in [0, K). Argmax over m: the nearest micro-prototype."""
    classes = classes.to(feature.device).long()
    num_classes, num_prototypes, dim = bank.prototypes.shape
    units = F.normalize(bank.prototypes.float(), dim=2).reshape(-1, dim)  # (K*M, D)

    def read(rows, which):
        cosine = (F.normalize(rows, dim=3) @ units.t()).view(*rows.shape[:3], num_classes, -1)
        index = classes[:, which, :, None, None].expand(-1, -1, -1, 1, num_prototypes)
        return cosine.gather(3, index)[:, :, :, 0]  # (B, r, W, M)
    return _per_pixel(feature, classes.shape[-2:], read, chunk_pixels)


def _read_window(model, window, heads, bank, amp, classes=None):
    """One forward pass on `window` (B, 3, h, w) -> {name: (B, C, h, w) float32}: the
    logits of `heads` and, given `classes` (B, h, w), "cosine" (class_prototype_cosines)."""
    with train.autocast(amp, window.device):
        logits, feature = model(window)[:2]
    size, out = window.shape[-2:], {}
    if "linear" in heads:
        out["linear"] = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)
    if "proto" in heads:
        out["proto"] = prototype_logits_map(feature, bank, size)
    if classes is not None:
        out["cosine"] = class_prototype_cosines(feature, bank, classes)
    return out


def _sliding(image, classes, read, crop, stride):
    """read() on every crop x crop window: the sum of the window outputs / the number of
    windows covering a pixel. `classes` (B, H, W) or None is cut like the image."""
    height, width = image.shape[-2:]
    # Zero after normalisation = the dataset's mean colour, as in training crops.
    padding = (0, max(crop - width, 0), 0, max(crop - height, 0))
    image = F.pad(image, padding)
    classes = None if classes is None else F.pad(classes, padding)
    sums, count = {}, image.new_zeros(1, 1, *image.shape[-2:], dtype=torch.float32)
    for top in window_starts(image.shape[-2], crop, stride):
        for left in window_starts(image.shape[-1], crop, stride):
            window = (..., slice(top, top + crop), slice(left, left + crop))
            outputs = read(image[window], None if classes is None else classes[window])
            for name, value in outputs.items():
                if name not in sums:
                    sums[name] = value.new_zeros(*value.shape[:2], *image.shape[-2:])
                sums[name][window] += value
            count[window] += 1
    return {name: (total / count)[..., :height, :width] for name, total in sums.items()}


def _views(image, read, mode, crop_size, stride, scales, flip, classes=None):
    """The protocol around read(window, classes of the window) -> {name: (B, C, h, w)}:
    one dict per view (each scale, and with `flip` its mirror image too) of read's outputs
    on the view (averaged over the windows in mode "sliding"), mirrored back and resized to
    the image's H x W (mode "center": the center_box). `classes` (B, H, W), given in
    those output coordinates, is resized (nearest), mirrored and cut with the image."""
    if mode == "center":
        top, left, box_height, box_width = center_box(*image.shape[-2:], crop_size)
        image = image[..., top:top + box_height, left:left + box_width]
    height, width = image.shape[-2:]
    stride = stride or max(1, round(crop_size * 2 / 3))
    for scale in scales:
        for mirrored in ((False, True) if flip else (False,)):
            view, view_classes = image, classes
            if scale != 1:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                view = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
                if classes is not None:
                    view_classes = F.interpolate(classes[:, None].float(), size=size)[:, 0].long()
            if mirrored:
                view = view.flip(-1)
                view_classes = None if classes is None else view_classes.flip(-1)
            outputs = (_sliding(view, view_classes, read, crop_size, stride) if mode == "sliding"
                       else read(view, view_classes))
            for name, value in outputs.items():
                value = value.flip(-1) if mirrored else value
                if value.shape[-2:] != (height, width):
                    value = F.interpolate(value, size=(height, width), mode="bilinear", align_corners=True)
                outputs[name] = value
            yield outputs


def _check(mode, crop_size, stride, scales, amp, flip=False, heads=("linear",), bank=None):
    """A ValueError naming the flag for a setting out of range (any flip is fine)."""
    if mode not in MODES:
        raise ValueError(f"mode (--mode) must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "whole" and (not isinstance(crop_size, int) or crop_size < 1):
        raise ValueError(f"crop_size (--crop-size) must be a positive integer, got {crop_size!r}")
    if mode == "sliding" and stride is not None and not 1 <= stride <= crop_size:
        raise ValueError(f"stride (--stride) must be in [1, crop size {crop_size}], got {stride}")
    if len(scales) == 0 or any(not scale > 0 for scale in scales):
        raise ValueError(f"scales (--scales) must be positive numbers, got {list(scales)}")
    if amp not in (None, "none", "bf16", "fp16"):
        raise ValueError(f"amp (--amp) must be bf16, fp16 or none, got {amp!r}")
    if "proto" in heads and bank is None:
        raise ValueError("the prototype head needs a PrototypeBank (bank=...)")


@torch.no_grad()
def predict_heads(model, image, num_classes, mode="whole", crop_size=513, stride=None,
                  scales=(1.0,), flip=False, heads=("linear",), bank=None, amp=None):
    """Logits of several heads from shared forward passes: image (B, 3, H, W) normalised ->
    {head: (B, K, H, W) float32}, in mode "center" for center_box(H, W, crop_size) only. Views:
    every scale s (image resized to round(s H) x round(s W)) and, with flip, its mirror image, each
    predicted with `mode`. One view: its logits. Several: their softmax probabilities averaged (the
    field's test-time augmentation), returned as logits log(mean p)."""
    heads = tuple(heads)
    _check(mode, crop_size, stride, scales, amp, heads=heads, bank=bank)
    views, result = len(scales) * (2 if flip else 1), {}
    for outputs in _views(image, lambda window, _: _read_window(model, window, heads, bank, amp),
                          mode, crop_size, stride, scales, flip):
        for head, logits in outputs.items():
            if logits.shape[1] != num_classes:
                raise ValueError(f"the {head} head gives {logits.shape[1]} classes, "
                                 f"expected num_classes = {num_classes}")
            logits = logits.softmax(dim=1) if views > 1 else logits
            result[head] = result[head] + logits if head in result else logits
    if views > 1:
        tiny = torch.finfo(torch.float32).tiny
        result = {head: (total / views).clamp_min(tiny).log() for head, total in result.items()}
    return result


def predict(model, image, num_classes, *, head="linear", bank=None, **protocol):
    """Logits (B, K, H, W) of one head ("linear" or "proto"): predict_heads with the same protocol."""
    return predict_heads(model, image, num_classes, heads=(head,), bank=bank, **protocol)[head]


@torch.no_grad()
def predict_nearest_prototypes(model, image, bank, classes, mode="whole", crop_size=513,
                               stride=None, scales=(1.0,), flip=False, amp=None):
    """(B, H, W) int64: the micro-prototype of its class `classes` (B, H, W, as predict_heads'
    output) each pixel is nearest to: argmax over m of the cosine to p[class, m], averaged over
    views and windows as predict_heads averages the logits (never a whole-image feature map)."""
    _check(mode, crop_size, stride, scales, amp, heads=("proto",), bank=bank)
    views = _views(image, lambda window, cut_classes: _read_window(model, window, (), bank, amp, cut_classes),
                   mode, crop_size, stride, scales, flip, classes.long())
    return sum(outputs["cosine"] for outputs in views).argmax(dim=1)


# ------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, dataset, num_classes, device, mode="whole", crop_size=513,
             stride=None, heads=("linear",), bank=None, amp=None, scales=(1.0,),
             flip=False, rank=0, world_size=1, log=print, save_dir=None, palette=None,
             class_names=None, prototype_map=False, background=0, clock=time.monotonic):
    """Score `model` on `dataset` (item -> (image (3, H, W) normalised, label (H, W) int64 or None,
    name)) -> {head: metrics_from_confusion(...)}. Process `rank` of `world_size` takes images rank,
    rank + world_size, ...; the confusion matrices are summed over the processes. The model's
    train/eval state is left alone. `save_dir`: save_pictures of every image (unlabeled ones,
    --images, are drawn, not scored); `prototype_map`: also predict_nearest_prototypes for the
    prototype head's prediction (else the linear one's)."""
    heads = tuple(heads)
    protocol = dict(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip, amp=amp)
    _check(**protocol, heads=heads, bank=bank)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluate: world_size = {world_size} needs torch.distributed to be initialised")
    device = torch.device(device)
    confusion = {head: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
                 for head in heads}
    indices = range(rank, len(dataset), world_size)
    start = last_line = clock()
    for done, index in enumerate(indices, start=1):
        image, label, name = dataset[index]
        if label is not None:
            # Checked on the CPU copy: confusion_matrix would silently drop a value outside [0, K).
            bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
            if bad.any():
                raise ValueError(f"label of {name!r} has values outside [0, {num_classes}) and "
                                 f"!= {IGNORE_INDEX}: {torch.unique(label[bad]).tolist()[:10]}")
        batch = image.unsqueeze(0).to(device, non_blocking=True)
        logits = predict_heads(model, batch, num_classes, heads=heads, bank=bank, **protocol)
        predictions = {head: logits[head][0].argmax(dim=0) for head in heads}
        if mode == "center":
            top, left, box_height, box_width = center_box(*image.shape[-2:], crop_size)
            box = (..., slice(top, top + box_height), slice(left, left + box_width))
            image, label = image[box], None if label is None else label[box]
        if label is not None:
            label_on_device = label.to(device, non_blocking=True)
            for head in heads:
                confusion[head] += confusion_matrix(predictions[head], label_on_device, num_classes)
        if save_dir is not None:
            prototypes = None
            if prototype_map:
                classes = predictions["proto" if "proto" in heads else heads[0]]
                nearest = predict_nearest_prototypes(model, batch, bank, classes[None], **protocol)
                prototypes = (classes.cpu().numpy(), nearest[0].cpu().numpy(),
                              prototype_shades(palette, num_classes, bank.num_prototypes))
            save_pictures(save_dir, name, image, {head: p.cpu().numpy() for head, p in
                                                  predictions.items()}, palette, class_names,
                          None if label is None else label.numpy(), prototypes, background)
        now = clock()
        if rank == 0 and (now - last_line >= PROGRESS_SECONDS or done == len(indices)):
            last_line, elapsed = now, max(now - start, 1e-9)
            share = f" (rank 0 of {world_size})" if world_size > 1 else ""
            log(f"{'eval' if label is not None else 'predict'} {done}/{len(indices)} images{share}  "
                f"{done / elapsed:.2f} img/s  ETA {train.format_eta(elapsed / done * (len(indices) - done))}")
    if world_size > 1:  # only then: a caller on rank 0 alone must not block in all_reduce
        for matrix in confusion.values():
            dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return {head: metrics_from_confusion(confusion[head]) for head in heads}


# --------------------------------------------------------------------------- pictures

def palette_mask(ids, palette):
    """Class ids (H, W) -> PIL image of mode "P" (VOC's mask format), pixel value = class id,
    colours from `palette` (256, 3) uint8: data.read_label (--dataset folder) reads the ids back."""
    mask = Image.fromarray(np.asarray(ids).astype(np.uint8))  # "L"; putpalette makes it "P"
    mask.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return mask


def enlarge(picture, min_side=VIEW_MIN_SIDE, max_side=4096):
    """Each pixel repeated f x f times (stays a sharp square), the smallest integer f that
    brings the short side to `min_side` or more, lowered to keep the long side <= max_side."""
    short, long = min(picture.shape[:2]), max(picture.shape[:2])
    factor = min(math.ceil(min_side / short), max(1, max_side // long))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else picture


def error_picture(image_rgb, label, prediction, ignore_index=IGNORE_INDEX):
    """(H, W, 3) uint8: wrong pixels red, ignored pixels neutral grey, correct pixels
    the image darkened to 30% (context, kept darker than the grey)."""
    picture = (image_rgb.astype(np.float32) * 0.3).astype(np.uint8)
    ignored = label == ignore_index
    picture[ignored] = (128, 128, 128)
    picture[(label != prediction) & ~ignored] = (255, 0, 0)
    return picture


def overlay_picture(image_rgb, mask_rgb, alpha=0.5, clear=None):
    """(1 - alpha) image + alpha mask, (H, W, 3) uint8; the image itself where the boolean
    (H, W) `clear` is true (background left transparent)."""
    blend = (1 - alpha) * image_rgb.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    blend = blend.round().astype(np.uint8)
    if clear is not None:
        blend[clear] = image_rgb[clear]
    return blend


def prototype_shades(palette, num_classes, num_prototypes):
    """(K, M, 3) uint8: M shades of each class colour palette[k], from darker to lighter, the middle
    one the colour itself; a colour too dark to darken (VOC's black background) gets M greys instead."""
    colours = np.asarray(palette[:num_classes], dtype=np.float64)[:, None]  # (K, 1, 3)
    step = np.linspace(-0.5, 0.5, num_prototypes) if num_prototypes > 1 else np.zeros(1)
    step = step[None, :, None]                                              # (1, M, 1)
    shades = np.where(step < 0, colours * (1 + step), colours + (255 - colours) * step)
    dark = colours.max(axis=2, keepdims=True) < 64
    shades = np.where(dark, 40 + 180 * (step + 0.5), shades)
    return shades.round().clip(0, 255).astype(np.uint8)


def side_by_side(pictures, gap=4):
    """(H, W, 3) uint8 pictures of one height left to right, `gap` white columns apart."""
    white = np.full((pictures[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([part for picture in pictures for part in (white, picture)][1:], axis=1)


def titled(picture, title, pad=3):
    """`picture` (H, W, 3) uint8 with a white caption strip holding `title` above it (one
    height for every title, so that captioned pictures of one size line up)."""
    font = ImageFont.load_default()  # Pillow's built-in font: no file, no dependency
    strip = Image.new("RGB", (picture.shape[1], font.getbbox("Agy")[3] + 2 * pad), "white")
    ImageDraw.Draw(strip).text((pad, pad), title, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), picture], axis=0)


def legend(entries, width, swatch=14, pad=4):
    """White strip (h, width, 3) uint8 listing `entries` [(colours (n, 3), text)]: n colour
    squares, then the text, wrapped over as many lines as needed."""
    font = ImageFont.load_default()
    line_height = max(swatch, font.getbbox("Ag")[3]) + pad
    strip = Image.new("RGB", (width, 2 * pad + max(1, len(entries)) * line_height), "white")
    draw = ImageDraw.Draw(strip)
    x, y = pad, pad
    for colours, text in entries:
        left, _, right, _ = font.getbbox(text)
        entry_width = len(colours) * swatch + pad + right - left
        if x > pad and x + entry_width > width - pad:
            x, y = pad, y + line_height
        for i, colour in enumerate(colours):
            draw.rectangle([x + i * swatch, y, x + (i + 1) * swatch - 1, y + swatch - 1],
                           fill=tuple(int(c) for c in colour))
        # a thin frame keeps white and very light colours visible on the white strip
        draw.rectangle([x, y, x + len(colours) * swatch - 1, y + swatch - 1], outline=(96, 96, 96))
        draw.text((x + len(colours) * swatch + pad, y + 1), text, fill=(0, 0, 0), font=font)
        x += entry_width + 3 * pad
    return np.asarray(strip)[:y + line_height + pad]  # the lines used


def _figure(path, panels, entries):
    """Save panels [(picture, caption or None)], enlarged, side by side, legend(entries) below."""
    row = side_by_side([enlarge(picture) if caption is None else titled(enlarge(picture), caption)
                        for picture, caption in panels])
    Image.fromarray(np.concatenate([row, legend(entries, row.shape[1])])).save(path)


def save_pictures(save_dir, name, image, predictions, palette, class_names=None, label=None,
                  prototypes=None, background=0):
    """Pictures of one image (3, H, W) normalised and its predictions {head: (H, W) ids} in
    save_dir (the files named in parse_args' --save-dir and --prototype-map), enlarged when small,
    with legends. Without a label, class `background` (None: none) is left clear in the overlay.
    `prototypes` = (classes, nearest, shades (K, M, 3)); its legend counts the prototypes in use."""
    path = Path(save_dir) / Path(name).name  # a name with folders stays inside save_dir
    path.parent.mkdir(parents=True, exist_ok=True)
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (data_lib.MEAN, data_lib.STD))
    image_rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def name_of(k):
        names = () if class_names is None else class_names
        return "ignore" if k == IGNORE_INDEX else str(names[k]) if k < len(names) else f"class {k}"

    def classes_in(*id_maps, skip=None):
        present = np.unique(np.concatenate([np.ravel(ids) for ids in id_maps])).tolist()
        return [(palette[[k]], name_of(k)) for k in present if k != skip]

    panels = [(image_rgb, "image"), (palette[label], "ground truth")] if label is not None else []
    for head, ids in predictions.items():
        stem = f"{path}{'' if head == 'linear' else '_' + head}"
        palette_mask(ids, palette).save(f"{stem}{'' if label is not None else '_mask'}.png")
        if label is not None:
            panels += [(palette[ids], f"{head} prediction"),
                       (error_picture(image_rgb, label, ids), f"{head} errors")]
        else:
            clear = None if background is None else ids == background
            overlay = overlay_picture(image_rgb, palette[ids], clear=clear)
            _figure(f"{stem}_overlay.png", [(overlay, None)], classes_in(ids, skip=background))
    if label is not None:
        _figure(f"{path}_compare.png", panels, classes_in(label, *predictions.values()))
    if prototypes is not None:
        classes, nearest, shades = prototypes
        entries = [(shades[k], f"{name_of(k)} ({len(np.unique(nearest[classes == k]))} of "
                               f"{shades.shape[1]} prototypes)") for k in np.unique(classes).tolist()]
        panels = [(image_rgb, "image"), (shades[classes, nearest], "nearest micro-prototype")]
        _figure(f"{path}_prototypes.png", panels, entries)


# ----------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate a PCR checkpoint on its validation set, or run it on new images "
                    "(--images). Settings come from the checkpoint; flags override them.")
    add = parser.add_argument
    add("--checkpoint", required=True,
        help="a checkpoint written by train.py (RUN/best.pt, RUN/last.pt), or a run directory "
             "RUN (its best.pt, else its last.pt)")
    add("--data-root", help="dataset root (default: the run's)")
    add("--split-dir", help="folder with val.txt (default: the run's)")
    add("--mode", choices=MODES, help="evaluation protocol (default: the run's eval_mode)")
    add("--crop-size", type=int, help="window of 'sliding' / box of 'center' (default: the run's crop)")
    add("--stride", type=int, help="sliding-window stride (default: round(2/3 crop))")
    add("--scales", help="comma-separated test scales, e.g. 0.75,1,1.25 (default: 1)")
    add("--flip", action="store_true", help="average with the horizontally flipped prediction")
    add("--student", action="store_true", help="evaluate the student instead of the EMA teacher")
    add("--head", choices=["linear", "proto", "both"], default="linear",
        help="linear predictor, prototype predictor, or both")
    add("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (torchrun: cuda:LOCAL_RANK)")
    add("--amp", choices=["bf16", "fp16", "none"], help="mixed precision (default: the run's)")
    add("--save-dir", help="write NAME.png, the predicted ids as a palette PNG (a mask for "
                           "--dataset folder), and NAME_compare.png, image | truth | prediction | "
                           "errors per head (--images: NAME_mask.png, NAME_overlay.png); the "
                           "prototype head's files carry _proto after NAME")
    add("--prototype-map", action="store_true",
        help="with --save-dir: also NAME_prototypes.png, each pixel in the shade of its "
             "predicted class's micro-prototype nearest to its feature (the prototype head's "
             "prediction when it is evaluated; same protocol as the prediction)")
    add("--images", help="an image file or a folder of images: predict them (no labels) at their "
                         "own size instead of evaluating; needs --save-dir")
    add("--out-json", help="also write the metrics to this JSON file")
    return parser.parse_args(argv)


def read_checkpoint(path, log=print):
    """--checkpoint (a file, or a run directory: its best.pt, else its last.pt) -> (file,
    checkpoint), read by train.load_checkpoint and checked to be a train.py checkpoint."""
    if os.path.isdir(path):
        found = [name for name in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise train.SetupError(f"--checkpoint {path} is a directory without best.pt or "
                                   f"last.pt; pass a run directory of train.py or a checkpoint file")
        note = "" if found[0] == "best.pt" else " (it has no best.pt yet)"
        log(f"--checkpoint {path} is a run directory: using {os.path.join(path, found[0])}{note}")
        path = os.path.join(path, found[0])
    checkpoint = train.load_checkpoint(path, "--checkpoint")
    if not isinstance(checkpoint, dict) or not {"config", "student"} <= checkpoint.keys():
        raise train.SetupError(f"--checkpoint {path}: not a train.py checkpoint (no config and student weights)")
    return path, checkpoint


def build_network(config, state_dict, which, path):
    """DeepLabV3Plus for the run's settings with the `which` ("teacher"/"student") weights."""
    deep_stem = "backbone.conv1.weight" not in state_dict  # else --pretrained torchvision
    aux = any(key.startswith("aux_classifier.") for key in state_dict)
    network = DeepLabV3Plus(config["num_classes"], config["backbone"], config["output_stride"],
                            aux, deep_stem=deep_stem, width=config.get("width", 1.0))
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as error:
        raise train.SetupError(f"--checkpoint {path}: the {which} weights do not fit a {config['backbone']} "
                               f"model with {config['num_classes']} classes: {str(error)[:600]}") from None
    return network


class ImageFiles(data_lib.ImageList):
    """--images: an image file or a folder's images as evaluate() items (image, None, stem)."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in data_lib.IMAGE_EXTENSIONS
                           and p.is_file())
        else:
            files = [path] if path.is_file() else []
        if not files:
            raise train.SetupError(f"--images {path}: no such file, or no images in this folder "
                                   f"({', '.join(data_lib.IMAGE_EXTENSIONS)})")
        stems = [p.stem for p in files]
        clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
        if clashes:
            raise train.SetupError(f"--images {path}: several images share a name, their masks "
                                   f"would overwrite each other: {', '.join(clashes[:5])}")
        super().__init__([data_lib.Sample(str(p), None, p.stem, False) for p in files], num_classes=None)


def class_names_of(config, data_root=None):
    """Class names for --images legends (no dataset is built): the dataset table's, a folder root's as
    training named them (data._folder_classes) when they fit num_classes, else "class 0", "class 1", ..."""
    num_classes = config["num_classes"]
    spec = data_lib.DATASETS.get(config["dataset"])
    if spec is not None and len(spec.classes) == num_classes:
        return list(spec.classes)
    root = data_root or config.get("data_root")
    if root and os.path.isdir(root):
        with contextlib.suppress(data_lib.DataError):  # one that does not fit: the generic names
            return data_lib._folder_classes(root, num_classes)
    return [f"class {k}" for k in range(num_classes)]


def run(args):
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *parts: None)
    for flag, value in (("--images", args.images), ("--prototype-map", args.prototype_map)):
        if value and not args.save_dir:
            raise train.SetupError(f"{flag} needs --save-dir for its pictures")
    try:
        scales = tuple(float(part) for part in (args.scales or "1").split(","))
    except ValueError:
        raise train.SetupError(f"--scales {args.scales!r}: expected comma-separated numbers, "
                               "e.g. 0.75,1,1.25") from None
    device = train.pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    path, checkpoint = read_checkpoint(args.checkpoint, log)
    config = checkpoint["config"]

    # Every setting is checked before the (large) model is built.
    heads = ("linear", "proto") if args.head == "both" else (args.head,)
    bank, state = None, checkpoint.get("prototypes")
    if "proto" in heads or args.prototype_map:
        if state is None or "prototypes" not in state:
            flag = "--head proto/both" if "proto" in heads else "--prototype-map"
            raise train.SetupError(f"{flag}: --checkpoint {path} holds no prototypes "
                                   f"(method {config.get('method', '?')!r})")
        bank = PrototypeBank(*state["prototypes"].shape, temperature=config.get("temperature", 0.1),
                             generator=torch.Generator()).to(device)  # values: the state dict
        bank.load_state_dict(state)
    mode = args.mode or config.get("eval_mode", "whole")
    if args.images and mode == "center":
        mode = "whole"  # every pixel of a new image gets a prediction
    crop_size = args.crop_size or config["crop_size"]
    amp = args.amp or config.get("amp", "none")
    settings = dict(mode=mode, crop_size=crop_size, stride=args.stride, scales=scales, flip=args.flip, amp=amp)
    try:
        _check(**settings)
    except ValueError as error:
        raise train.SetupError(str(error)) from None
    images = ImageFiles(args.images) if args.images else None

    # The trainer scores the teacher only once the semi-supervised phase has begun
    # (iteration > warmup_iters); before that, and in supervised runs, the student.
    iteration = checkpoint.get("iter", 0)
    which = "student" if args.student or checkpoint.get("teacher") is None else "teacher"
    if which == "student" and not args.student:
        log("note: evaluating the student (this run has no teacher)")
    elif which == "teacher" and iteration <= config.get("warmup_iters", 0):
        which = "student"
        log(f"note: evaluating the student (iteration {iteration} is in the supervised "
            f"warm-up of {config.get('warmup_iters')} iterations; the teacher is not trained yet)")
    network = build_network(config, checkpoint[which], which, path).to(device).eval()
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    common = dict(heads=heads, bank=bank, rank=rank, world_size=world_size, log=log,
                  save_dir=args.save_dir, prototype_map=args.prototype_map, **settings)
    if images is not None:
        spec = data_lib.DATASETS.get(config["dataset"], data_lib.DATASETS["voc"])
        # Overlays leave class 0 (background) transparent, except Cityscapes' (road).
        evaluate(network, images, config["num_classes"], device,
                 palette=spec.palette(), class_names=class_names_of(config, args.data_root),
                 background=None if config["dataset"] == "cityscapes" else 0, **common)
        return 0

    data = data_lib.build_data(
        config["dataset"], args.data_root or config.get("data_root"), config["num_classes"],
        config.get("labeled"), args.split_dir or config.get("split_dir"), config.get("seed", 0),
        crop_size, out_dir=None, log=log)
    log(f"evaluate {path} (iteration {iteration}, {which}, heads {', '.join(heads)}): "
        f"{len(data.val)} val images, mode {mode}, crop {crop_size}, scales {list(scales)}, "
        f"flip {args.flip}, amp {amp}, device {device}")
    start = time.time()
    results = evaluate(network, data.val, data.num_classes, device, palette=data.palette,
                       class_names=data.class_names, **common)
    if rank != 0:
        return 0
    for head in heads:
        log(f"{head} head:\n{format_table(results[head], data.class_names)}")
    record = {"source": "evaluate.py", "checkpoint": os.path.abspath(path), "iter": iteration, "model": which,
              **settings, "scales": list(scales), "seconds": round(time.time() - start, 1)}
    record.update(results.get("linear", {}))  # miou, pixel_acc, mean_acc, iou, pixels
    if "proto" in results:
        record.update(miou_proto=results["proto"]["miou"], iou_proto=results["proto"]["iou"])
    summary = "  ".join(f"{head} mIoU {results[head]['miou']:.2f}" for head in heads)
    log(f"result: {summary}  ({which}, iteration {iteration})")
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl")
    try:
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        log(f"warning: could not append to {metrics_path}: {error}")
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as handle:
            json.dump(dict(record, metrics=results), handle, indent=2)
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except (train.SetupError, train.CheckpointError, data_lib.DataError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    train.exit_process(main())
