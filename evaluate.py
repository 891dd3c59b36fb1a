"""Evaluation for PCR: confusion-matrix mIoU, the field's evaluation protocols, offline
evaluation of a checkpoint, inference on new images, and pictures of predictions.

docs/METHOD.md section 5. train.py calls `evaluate`; the command line below runs the same
code path on a saved checkpoint:

    python evaluate.py --checkpoint RUN                          # RUN/best.pt, the run's settings
    python evaluate.py --checkpoint RUN/best.pt --mode sliding --crop-size 769 --head both
    python evaluate.py --checkpoint RUN --head both --save-dir pictures/ --prototype-map
    python evaluate.py --checkpoint RUN --images my_photos/ --save-dir masks/
    torchrun --nproc_per_node 4 evaluate.py --checkpoint RUN/best.pt

Pictures (--save-dir): predicted masks are palette PNGs (pixel value = class id, colours
from the dataset's palette: VOC's own format, so they can serve as masks of
--dataset folder); comparisons and overlays carry captions and a legend, are enlarged
(nearest neighbour) when small, and overlays leave the background (class 0) transparent.
--prototype-map draws which micro-prototype of its predicted class each pixel is nearest
to, in shades of the class colour (nearest_prototype_map).

Protocols (`mode`):
  whole    one forward pass at the image's own size (Pascal VOC);
  sliding  crop x crop windows every `stride` pixels (default round(2/3 crop)), logits
           averaged where windows overlap; an image smaller than the crop is zero-padded
           (= the mean colour after normalisation) at the bottom/right (Cityscapes);
  center   only the central crop x crop region is predicted and scored; the label is cut
           with the same `center_box` (a side shorter than the crop is kept whole).
Multi-scale / flip: see `predict_heads`.
"""

import argparse
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

IGNORE_INDEX = 255
MODES = ("whole", "sliding", "center")
HEADS = ("linear", "proto")
# Budget for one chunk of full-resolution features in the prototype head:
# chunk_pixels x D float32 values <= 64 MB (16 rows of a 2048-wide image at D = 512).
PROTO_CHUNK_BYTES = 64 * 2 ** 20
VIEW_MIN_SIDE = 256  # pictures with a shorter side are enlarged (nearest neighbour)
PROGRESS_SECONDS = 10.0  # at most one progress line this often (plus the last one)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """Confusion matrix cm (K, K) int64 on the inputs' device; rows = ground truth,
    columns = prediction: cm[g, p] = #{pixels with target g and prediction p}.

    pred, target: integer tensors of the same shape. Pixels whose target is
    `ignore_index` or outside [0, K) are not counted (evaluate() rejects labels outside
    [0, K) u {ignore} before they get here). Predictions must be in [0, K).
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    target = target.to(pred.device).long().reshape(-1)
    pred = pred.long().reshape(-1)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    # Invalid pixels go to an extra bin K*K that is dropped. index_add_ instead of
    # torch.bincount: bincount reads max() back to the host on CUDA (a sync per image).
    cell = torch.where(valid, target * num_classes + pred,
                       torch.full_like(target, num_classes * num_classes))
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.long, device=pred.device)
    counts.index_add_(0, cell, torch.ones_like(cell))
    return counts[:-1].view(num_classes, num_classes)


def reduce_confusion(cm):
    """Sum `cm` over all processes (all_reduce SUM, in place) when torch.distributed is
    initialised; otherwise return it unchanged."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm, op=dist.ReduceOp.SUM)
    return cm


def metrics_from_confusion(cm, class_names=None):
    """Metrics in % from a confusion matrix cm (K, K), rows = ground truth.

    With TP_k = cm[k, k], GT_k = sum_p cm[k, p], PRED_k = sum_g cm[g, k]:
      iou[k]    = TP_k / (GT_k + PRED_k - TP_k), None when that union is 0 (class absent
                  from both ground truth and prediction);
      miou      = mean of iou[k] over classes with a non-zero union (the usual convention:
                  a class present in the ground truth or predicted counts; a class only
                  predicted therefore scores 0 and lowers the mean);
      pixel_acc = sum_k TP_k / sum_k GT_k;
      mean_acc  = mean over classes with GT_k > 0 of TP_k / GT_k;
      pixels    = sum_k GT_k, the number of labelled pixels scored.
    Scores are NaN when no labelled pixel was scored. With `class_names` (K names) the
    dict also holds "class_names".
    """
    cm = cm.detach().to("cpu", torch.float64)
    num_classes = cm.shape[0]
    true_positive = cm.diagonal()
    ground_truth = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    union = ground_truth + predicted - true_positive
    iou = true_positive / union.clamp_min(1)
    present = union > 0
    labelled = ground_truth > 0
    total = ground_truth.sum()
    nan = float("nan")
    metrics = {
        "miou": 100 * iou[present].mean().item() if present.any() else nan,
        "pixel_acc": 100 * (true_positive.sum() / total).item() if total > 0 else nan,
        "mean_acc": (100 * (true_positive[labelled] / ground_truth[labelled]).mean().item()
                     if labelled.any() else nan),
        "iou": [100 * value if keep else None
                for value, keep in zip(iou.tolist(), present.tolist())],
        "pixels": int(total.item()),
    }
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"metrics_from_confusion: {len(class_names)} class names for "
                             f"{num_classes} classes")
        metrics["class_names"] = list(class_names)
    return metrics


def format_table(metrics, class_names=None):
    """Per-class IoU table (one line per class; '-' = absent from ground truth and
    prediction) followed by one summary line with mIoU, pixel and mean accuracy."""
    ious = metrics["iou"]
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"format_table: {len(names)} class names for {len(ious)} classes")
    width = max([len("class")] + [len(name) for name in names])
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    for name, iou in zip(names, ious):
        lines.append(f"{name:<{width}}  {'-' if iou is None else f'{iou:.2f}':>6}")
    lines.append(f"mIoU {metrics['miou']:.2f}  pixel acc {metrics['pixel_acc']:.2f}  "
                 f"mean acc {metrics['mean_acc']:.2f}  ({metrics['pixels']} pixels)")
    return "\n".join(lines)


# ------------------------------------------------------------------------- prediction

def _autocast_dtype(amp):
    """--amp value ('bf16' | 'fp16' | 'none' | None | a torch dtype) -> dtype or None."""
    if amp is None or amp == "none":
        return None
    if isinstance(amp, torch.dtype):
        return amp
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp (--amp) must be bf16, fp16 or none, got {amp!r}")
    return dtypes[amp]


def window_starts(length, crop, stride):
    """Start offsets of the sliding windows along one side of `length` pixels: every
    `stride` pixels, the last window moved back to end exactly at the border, so
    ceil((length - crop) / stride) + 1 windows cover the side ([0] if length <= crop)."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def center_box(height, width, crop):
    """(top, left, box_height, box_width) of the central crop x crop box of an image;
    a side shorter than the crop is kept whole. predict(mode='center') returns logits for
    this box only, and evaluate() cuts the label with the same box."""
    box_height, box_width = min(crop, height), min(crop, width)
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def _bank_rows(feature, bank, size, chunk_pixels=None):
    """Yield (top, rows, logits (B, rows, W, K), nearest (B, rows, W, K)): `bank` applied to
    f(y, x), the feature bilinearly interpolated (align_corners=True, as F.interpolate) at
    every pixel of an image of `size` (H, W), in chunks of whole rows of at most
    `chunk_pixels` pixels (default: PROTO_CHUNK_BYTES of float32 D-vectors), so the
    (B, D, H, W) full-resolution feature never exists at once."""
    batch, dim = feature.shape[:2]
    height, width = size
    if chunk_pixels is None:
        chunk_pixels = PROTO_CHUNK_BYTES // (4 * dim)
    rows_per_chunk = max(1, chunk_pixels // (batch * width))
    feature = feature.float()
    # grid_sample with align_corners=True maps -1..1 to the first..last source pixel
    # centre, which is exactly F.interpolate(align_corners=True)'s sampling.
    grid_y = torch.linspace(-1, 1, height, device=feature.device)
    grid_x = torch.linspace(-1, 1, width, device=feature.device)
    for top in range(0, height, rows_per_chunk):
        rows = grid_y[top:top + rows_per_chunk]
        grid = torch.stack(torch.meshgrid(grid_x, rows, indexing="xy"), dim=-1)  # (r, W, 2)
        grid = grid.unsqueeze(0).expand(batch, -1, -1, -1)
        sampled = F.grid_sample(feature, grid, mode="bilinear", align_corners=True)  # (B,D,r,W)
        logits, nearest = bank(sampled.permute(0, 2, 3, 1).reshape(-1, dim))  # (B*r*W, K)
        shape = (batch, len(rows), width, -1)
        yield top, len(rows), logits.view(shape), nearest.view(shape)


def prototype_logits_map(feature, bank, size, chunk_pixels=None):
    """Prototype-head logits for every pixel of an image of `size` (H, W).

    feature (B, D, h, w) at native stride -> (B, K, H, W) float32 with
        out[:, :, y, x] = bank(f(y, x)), f(y, x) = feature bilinearly interpolated
    (align_corners=True, as F.interpolate) at pixel (y, x). Computed in chunks of whole
    rows (see _bank_rows).
    """
    out = None
    for top, rows, logits, _ in _bank_rows(feature, bank, size, chunk_pixels):
        if out is None:
            out = logits.new_empty(feature.shape[0], logits.shape[-1], *size)
        out[:, :, top:top + rows] = logits.permute(0, 3, 1, 2)  # (B,K,r,W)
    return out


def nearest_prototype_map(feature, bank, classes, chunk_pixels=None):
    """Which micro-prototype of its class each pixel is nearest to.

    feature (B, D, h, w) at native stride, classes (B, H, W) int64 in [0, K) ->
    (B, H, W) int64 m with
        m[b, y, x] = argmax_m cos(f(y, x), p[classes[b, y, x], m]),
    f as in prototype_logits_map (the feature the prototype head reads).
    """
    classes = classes.to(feature.device).long()
    out = torch.empty_like(classes)
    for top, rows, _, nearest in _bank_rows(feature, bank, classes.shape[-2:], chunk_pixels):
        chunk_classes = classes[:, top:top + rows].unsqueeze(-1)  # (B, r, W, 1)
        out[:, top:top + rows] = nearest.gather(3, chunk_classes).squeeze(3)
    return out


@torch.no_grad()
def predict_prototype_map(model, image, bank, classes, amp=None):
    """nearest_prototype_map of one forward pass of `model` on image (B, 3, H, W) at its
    own size (no windows, scales or flip), for the predicted classes (B, H, W)."""
    amp_dtype = _autocast_dtype(amp)
    with torch.autocast(device_type=image.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        feature = model(image)[1]
    return nearest_prototype_map(feature, bank, classes)


def _forward_heads(model, image, heads, bank, amp_dtype):
    """One forward pass -> {head: (B, K, H, W) float32 logits at the image's size}."""
    size = image.shape[-2:]
    with torch.autocast(device_type=image.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits, feature = model(image)[:2]
    out = {}
    if "linear" in heads:
        out["linear"] = F.interpolate(logits.float(), size=size, mode="bilinear",
                                      align_corners=True)
    if "proto" in heads:
        out["proto"] = prototype_logits_map(feature, bank, size)
    return out


def _sliding_heads(model, image, heads, bank, amp_dtype, num_classes, crop, stride):
    """Sliding-window logits: sum of window logits / number of windows covering a pixel."""
    height, width = image.shape[-2:]
    pad_bottom, pad_right = max(crop - height, 0), max(crop - width, 0)
    if pad_bottom or pad_right:
        # Zero after normalisation = the dataset's mean colour, as in training crops.
        image = F.pad(image, (0, pad_right, 0, pad_bottom))
    padded_height, padded_width = image.shape[-2:]
    sums = {head: image.new_zeros(image.shape[0], num_classes, padded_height, padded_width,
                                  dtype=torch.float32) for head in heads}
    count = image.new_zeros(1, 1, padded_height, padded_width, dtype=torch.float32)
    for top in window_starts(padded_height, crop, stride):
        for left in window_starts(padded_width, crop, stride):
            window = (..., slice(top, top + crop), slice(left, left + crop))
            for head, logits in _forward_heads(model, image[window], heads, bank,
                                               amp_dtype).items():
                sums[head][window] += logits
            count[window] += 1
    return {head: (total / count)[..., :height, :width] for head, total in sums.items()}


def _check_predict_args(mode, crop_size, stride, scales, heads, bank):
    if mode not in MODES:
        raise ValueError(f"mode (--mode) must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "whole" and (not isinstance(crop_size, int) or crop_size < 1):
        raise ValueError(f"crop_size (--crop-size) must be a positive integer, got {crop_size!r}")
    if mode == "sliding" and stride is not None and not 1 <= stride <= crop_size:
        raise ValueError(f"stride (--stride) must be in [1, crop size {crop_size}], got {stride}")
    if len(scales) == 0 or any(scale <= 0 for scale in scales):
        raise ValueError(f"scales (--scales) must be positive numbers, got {list(scales)}")
    if len(heads) == 0 or any(head not in HEADS for head in heads):
        raise ValueError(f"heads (--head) must be among {', '.join(HEADS)}, got {list(heads)}")
    if "proto" in heads and bank is None:
        raise ValueError("the prototype head needs a PrototypeBank (bank=...)")


@torch.no_grad()
def predict_heads(model, image, num_classes, mode="whole", crop_size=513, stride=None,
                  scales=(1.0,), flip=False, heads=("linear",), bank=None, amp=None):
    """Logits of several heads from shared forward passes.

    image (B, 3, H, W) normalised -> {head: (B, K, H, W) float32}; in mode "center"
    (B, K, h, w) for the box center_box(H, W, crop_size) instead.

    Views: every scale s (image resized to round(s H) x round(s W), bilinear,
    align_corners=True) and, with flip, its horizontal mirror; each view is predicted
    with `mode`, mirrored back and resized back to H x W. One view: its logits as they
    are. Several views: the softmax probabilities are averaged (the field's usual
    test-time augmentation) and returned as logits log(mean p), so softmax/argmax of the
    result are the averaged prediction.
    """
    heads = tuple(heads)
    _check_predict_args(mode, crop_size, stride, scales, heads, bank)
    amp_dtype = _autocast_dtype(amp)
    if mode == "center":
        top, left, box_height, box_width = center_box(*image.shape[-2:], crop_size)
        image = image[..., top:top + box_height, left:left + box_width]
    height, width = image.shape[-2:]
    stride = stride or max(1, round(crop_size * 2 / 3))

    mirrorings = (False, True) if flip else (False,)
    views = [(scale, mirrored) for scale in scales for mirrored in mirrorings]
    result = {}
    for scale, mirrored in views:
        view = image
        if scale != 1:
            scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
            view = F.interpolate(image, size=scaled_size, mode="bilinear", align_corners=True)
        if mirrored:
            view = view.flip(-1)
        if mode == "sliding":
            outputs = _sliding_heads(model, view, heads, bank, amp_dtype, num_classes,
                                     crop_size, stride)
        else:
            outputs = _forward_heads(model, view, heads, bank, amp_dtype)
        for head, logits in outputs.items():
            if logits.shape[1] != num_classes:
                raise ValueError(f"the {head} head gives {logits.shape[1]} classes, "
                                 f"expected num_classes = {num_classes}")
            if mirrored:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                                       align_corners=True)
            if len(views) == 1:
                result[head] = logits
            else:
                probability = logits.softmax(dim=1)
                result[head] = result[head] + probability if head in result else probability
    if len(views) > 1:
        tiny = torch.finfo(torch.float32).tiny
        result = {head: (total / len(views)).clamp_min(tiny).log()
                  for head, total in result.items()}
    return result


@torch.no_grad()
def predict(model, image, num_classes, mode="whole", crop_size=513, stride=None,
            scales=(1.0,), flip=False, head="linear", bank=None, amp=None):
    """Logits (B, K, H, W) float32 of one head ("linear" or "proto") for a normalised
    image (B, 3, H, W); see predict_heads for modes, scales and flip."""
    return predict_heads(model, image, num_classes, mode, crop_size, stride, scales, flip,
                         (head,), bank, amp)[head]


# ------------------------------------------------------------------------- evaluation

def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@torch.no_grad()
def evaluate(model, dataset, num_classes, device, mode="whole", crop_size=513,
             stride=None, heads=("linear",), bank=None, amp=None, scales=(1.0,),
             flip=False, rank=0, world_size=1, log=print, save_dir=None, palette=None,
             class_names=None, prototype_map=False, clock=time.monotonic):
    """Score `model` on `dataset` (item i -> (image (3,H,W) normalised, label (H,W) int64,
    name)) -> {head: metrics_from_confusion(...)} with confusion matrices accumulated
    over the whole set (ignore 255).

    Process `rank` of `world_size` evaluates images rank, rank + world_size, ...; the
    matrices are then summed over processes (torch.distributed must be initialised
    when world_size > 1; with world_size 1 nothing is reduced). Mode "center" scores
    the center_box of each label. The model's train/eval state is left as the caller
    set it (call model.eval() first). With `save_dir` (and `palette` (256, 3) uint8)
    each image's predictions (every head) are saved as pictures with `class_names` in
    the legend (save_prediction_pictures); with `prototype_map` (needs `bank`) also the
    nearest micro-prototype of each pixel's predicted class (the prototype head's
    prediction when it is among `heads`), from one forward pass at the image's size.
    Progress: at most one line every PROGRESS_SECONDS of `clock`, plus the last one.
    """
    heads = tuple(heads)
    _check_predict_args(mode, crop_size, stride, scales, heads, bank)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"evaluate: world_size = {world_size} needs torch.distributed "
                         f"to be initialised")
    if save_dir is not None and palette is None:
        raise ValueError("evaluate: save_dir needs a palette")
    if prototype_map and (save_dir is None or bank is None):
        raise ValueError("evaluate: prototype_map needs save_dir and a PrototypeBank (bank=...)")
    shades = (prototype_shades(palette, num_classes, bank.num_prototypes) if prototype_map
              else None)
    device = torch.device(device)
    confusion = {head: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
                 for head in heads}
    indices = range(rank, len(dataset), world_size)
    start = last_line = clock()
    for done, index in enumerate(indices, start=1):
        image, label, name = dataset[index]
        # Checked on the CPU copy: a label value outside [0, K) would silently land in
        # the wrong confusion cell or be dropped.
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
        if bad.any():
            raise ValueError(f"label of {name!r} has values outside [0, {num_classes}) and "
                             f"!= {IGNORE_INDEX}: {torch.unique(label[bad]).tolist()[:10]}")
        logits = predict_heads(model, image.unsqueeze(0).to(device, non_blocking=True),
                               num_classes, mode, crop_size, stride, scales, flip, heads,
                               bank, amp)
        if mode == "center":
            top, left, box_height, box_width = center_box(*label.shape, crop_size)
            label = label[top:top + box_height, left:left + box_width]
            image = image[:, top:top + box_height, left:left + box_width]
        label_on_device = label.to(device, non_blocking=True)
        for head in heads:
            confusion[head] += confusion_matrix(logits[head][0].argmax(dim=0), label_on_device,
                                                num_classes)
        if save_dir is not None:
            predictions = {head: logits[head][0].argmax(dim=0) for head in heads}
            prototypes = None
            if prototype_map:
                classes = predictions["proto" if "proto" in heads else heads[0]]
                nearest = predict_prototype_map(model, image.unsqueeze(0).to(device), bank,
                                                classes.unsqueeze(0), amp)[0]
                prototypes = (classes.cpu().numpy(), nearest.cpu().numpy(), shades)
            save_prediction_pictures(save_dir, name, image, label.numpy(),
                                     {head: p.cpu().numpy() for head, p in predictions.items()},
                                     palette, class_names, prototypes)
        now = clock()
        if rank == 0 and (now - last_line >= PROGRESS_SECONDS or done == len(indices)):
            last_line, elapsed = now, max(now - start, 1e-9)
            share = f" (rank 0 of {world_size})" if world_size > 1 else ""
            log(f"eval {done}/{len(indices)} images{share}  {done / elapsed:.2f} img/s  "
                f"ETA {_format_seconds(elapsed / done * (len(indices) - done))}")
    if world_size > 1:
        # Only then: a caller evaluating on rank 0 alone must not block in all_reduce.
        confusion = {head: reduce_confusion(matrix) for head, matrix in confusion.items()}
    return {head: metrics_from_confusion(confusion[head]) for head in heads}


# --------------------------------------------------------------------------- pictures

def denormalize(image):
    """Normalised image (3, H, W) -> uint8 array (H, W, 3) with data.MEAN / data.STD."""
    from data import MEAN, STD
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def palette_mask(ids, palette):
    """Class ids (H, W) -> PIL image of mode "P": pixel value = class id (255 = ignore),
    colours from `palette` (256, 3) uint8. Pascal VOC's own mask format: viewers show the
    colours, data.read_label (and so --dataset folder) reads the ids back."""
    mask = Image.fromarray(np.asarray(ids).astype(np.uint8), "P")
    mask.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return mask


def enlarge(picture, min_side=VIEW_MIN_SIDE, max_side=4096):
    """Repeat each pixel f x f times (nearest neighbour, pixels stay sharp squares) with
    the smallest integer f that brings the short side to at least `min_side` (f = 1 for
    pictures that are large enough; f is lowered so the long side stays <= max_side)."""
    short, long = min(picture.shape[:2]), max(picture.shape[:2])
    factor = min(math.ceil(min_side / short), max(1, max_side // long))
    if factor <= 1:
        return picture
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def error_picture(image_rgb, label, prediction, ignore_index=IGNORE_INDEX):
    """(H, W, 3) uint8: wrong pixels red, ignored pixels neutral grey, correct pixels
    the image darkened to 30% (context, kept darker than the grey)."""
    picture = (image_rgb.astype(np.float32) * 0.3).astype(np.uint8)
    ignored = label == ignore_index
    wrong = (label != prediction) & ~ignored
    picture[ignored] = (128, 128, 128)
    picture[wrong] = (255, 0, 0)
    return picture


def side_by_side(pictures, gap=4):
    """Concatenate (H, W, 3) uint8 pictures left to right with white gaps; shorter
    pictures are padded with white at the bottom."""
    height = max(picture.shape[0] for picture in pictures)
    parts = []
    for picture in pictures:
        if picture.shape[0] < height:
            pad = np.full((height - picture.shape[0], picture.shape[1], 3), 255, np.uint8)
            picture = np.concatenate([picture, pad], axis=0)
        parts += [picture, np.full((height, gap, 3), 255, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def one_above_another(pictures):
    """Stack (H, W, 3) uint8 pictures top to bottom, narrower ones padded white on the right."""
    width = max(picture.shape[1] for picture in pictures)
    parts = [np.concatenate([picture, np.full((picture.shape[0], width - picture.shape[1], 3),
                                              255, np.uint8)], axis=1)
             for picture in pictures]
    return np.concatenate(parts, axis=0)


def _font():
    return ImageFont.load_default()  # Pillow's built-in font: no file, no dependency


def _text_size(text, font):
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom


def titled(picture, title, pad=3):
    """`picture` (H, W, 3) uint8 with a white caption strip holding `title` above it."""
    font = _font()
    _, text_height = _text_size("Ag" + title, font)
    strip = Image.new("RGB", (picture.shape[1], text_height + 2 * pad), "white")
    ImageDraw.Draw(strip).text((pad, pad), title, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), picture], axis=0)


def legend(entries, width, swatch=14, pad=4):
    """White strip (h, width, 3) uint8 listing `entries`, a list of (colours (n, 3), text):
    n colour squares followed by the text, entries wrapped over as many lines as needed."""
    font = _font()
    line_height = max(swatch, _text_size("Ag", font)[1]) + pad
    placed, x, y = [], pad, pad
    for colours, text in entries:
        entry_width = len(colours) * swatch + pad + _text_size(text, font)[0]
        if x > pad and x + entry_width > width - pad:
            x, y = pad, y + line_height
        placed.append((x, y, colours, text))
        x += entry_width + 3 * pad
    strip = Image.new("RGB", (width, y + line_height + pad), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, colours, text in placed:
        for i, colour in enumerate(colours):
            draw.rectangle([x + i * swatch, y, x + (i + 1) * swatch - 1, y + swatch - 1],
                           fill=tuple(int(c) for c in colour))
        # a thin frame keeps white and very light colours visible on the white strip
        draw.rectangle([x, y, x + len(colours) * swatch - 1, y + swatch - 1],
                       outline=(96, 96, 96))
        draw.text((x + len(colours) * swatch + pad, y + 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def _class_name(class_id, class_names):
    if class_id == IGNORE_INDEX:
        return "ignore"
    if class_names is not None and class_id < len(class_names):
        return str(class_names[class_id])
    return f"class {class_id}"


def class_legend(id_maps, palette, class_names, width, skip=()):
    """legend() of the classes (and 255 = ignore) that occur in any of `id_maps`, in id
    order, each with its palette colour; ids in `skip` are left out."""
    present = np.unique(np.concatenate([np.asarray(ids).reshape(-1) for ids in id_maps]))
    entries = [(palette[[k]], _class_name(int(k), class_names))
               for k in present.tolist() if k not in skip]
    return legend(entries, width)


def overlay_picture(image_rgb, mask_rgb, alpha=0.5, clear=None):
    """Alpha blend (H, W, 3) uint8: (1 - alpha) image + alpha coloured mask; where the
    boolean (H, W) `clear` is true the image is shown unchanged (background left
    transparent)."""
    blend = (1 - alpha) * image_rgb.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    blend = blend.round().astype(np.uint8)
    if clear is not None:
        blend[clear] = image_rgb[clear]
    return blend


def prototype_shades(palette, num_classes, num_prototypes):
    """(K, M, 3) uint8: M shades of each class colour palette[k], from darker to lighter,
    the middle shade closest to the colour itself. A colour too dark to darken (VOC's black
    background) gets M greys from dark to light instead."""
    colours = np.asarray(palette[:num_classes], dtype=np.float64)      # (K, 3)
    dark = colours.max(axis=1) < 64                                     # (K,)
    shades = np.empty((num_classes, num_prototypes, 3))
    for m in range(num_prototypes):  # M steps, each over all classes at once
        step = 0.0 if num_prototypes == 1 else m / (num_prototypes - 1) - 0.5  # -0.5..0.5
        darker = colours * (1 + step)                  # step < 0: towards black
        lighter = colours + (255 - colours) * step     # step > 0: towards white
        shade = np.where(step < 0, darker, lighter)
        grey = 40 + 180 * (step + 0.5)
        shades[:, m] = np.where(dark[:, None], grey, shade)
    return shades.round().clip(0, 255).astype(np.uint8)


def prototype_picture(classes, nearest, shades):
    """(H, W, 3) uint8: pixel (y, x) in shade nearest[y, x] of class classes[y, x]."""
    return shades[np.asarray(classes), np.asarray(nearest)]


def prototype_legend(classes, nearest, shades, class_names, width):
    """legend() with each predicted class's M shades and how many of its prototypes are
    nearest to at least one pixel."""
    num_prototypes = shades.shape[1]
    used = np.unique(np.asarray(classes).astype(np.int64) * num_prototypes + np.asarray(nearest))
    entries = []
    for k in np.unique(np.asarray(classes)).tolist():
        count = int(((used // num_prototypes) == k).sum())
        entries.append((shades[k], f"{_class_name(k, class_names)} "
                                   f"({count} of {num_prototypes} prototypes)"))
    return legend(entries, width)


def _panel(picture, title):
    return titled(enlarge(picture), title)


def _head_suffix(head):
    return "" if head == "linear" else f"_{head}"


def save_prediction_pictures(save_dir, name, image, label, predictions, palette,
                             class_names=None, prototypes=None):
    """Pictures of one evaluated image, in SAVE_DIR:

    <name>.png (<name>_proto.png for the prototype head)  the predicted class ids as a
        palette PNG (VOC's format, readable as a mask by data.read_label);
    <name>_compare.png  image | ground truth | per head: prediction, errors; with
        captions and a legend of the classes shown; small images enlarged;
    <name>_prototypes.png  with `prototypes` = (classes, nearest, shades): image |
        each pixel's nearest micro-prototype of its predicted class (prototype_picture).

    image (3, H, W) normalised; label (H, W) integer array; predictions {head: (H, W)
    integer array} (or one array, taken as the linear head); palette (256, 3) uint8.
    """
    if not isinstance(predictions, dict):
        predictions = {"linear": predictions}
    path = Path(save_dir) / Path(name).name  # a name with folders stays inside save_dir
    path.parent.mkdir(parents=True, exist_ok=True)
    image_rgb = denormalize(image)
    panels = [_panel(image_rgb, "image"), _panel(palette[label], "ground truth")]
    for head, prediction in predictions.items():
        palette_mask(prediction, palette).save(path.with_name(path.name + _head_suffix(head)
                                                              + ".png"))
        panels += [_panel(palette[prediction], f"{head} prediction"),
                   _panel(error_picture(image_rgb, label, prediction), f"{head} errors")]
    compare = side_by_side(panels)
    key = class_legend([label] + list(predictions.values()), palette, class_names,
                       compare.shape[1])
    Image.fromarray(one_above_another([compare, key])).save(
        path.with_name(path.name + "_compare.png"))
    if prototypes is not None:
        classes, nearest, shades = prototypes
        pair = side_by_side([_panel(image_rgb, "image"),
                             _panel(prototype_picture(classes, nearest, shades),
                                    "nearest micro-prototype")])
        key = prototype_legend(classes, nearest, shades, class_names, pair.shape[1])
        Image.fromarray(one_above_another([pair, key])).save(
            path.with_name(path.name + "_prototypes.png"))


# ----------------------------------------------------------------------- command line

class EvalError(Exception):
    """Bad command-line input; the message names the flag or file and what is wrong."""


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
    add("--crop-size", type=int,
        help="window of 'sliding' / box of 'center' (default: the run's crop)")
    add("--stride", type=int, help="sliding-window stride (default: round(2/3 crop))")
    add("--scales", help="comma-separated test scales, e.g. 0.75,1,1.25 (default: 1)")
    add("--flip", action="store_true", help="average with the horizontally flipped prediction")
    add("--student", action="store_true", help="evaluate the student instead of the EMA teacher")
    add("--head", choices=["linear", "proto", "both"], default="linear",
        help="linear predictor, prototype predictor, or both")
    add("--device", default="auto",
        help="'auto', 'cpu', 'cuda' or 'cuda:N' (torchrun: cuda:LOCAL_RANK)")
    add("--amp", choices=["bf16", "fp16", "none"], help="mixed precision (default: the run's)")
    add("--save-dir", help="write pictures here: NAME.png, the predicted class ids as a palette "
                           "PNG (VOC's mask format, readable as a mask by --dataset folder), and "
                           "NAME_compare.png, image | truth | prediction | errors per head, with "
                           "a legend (with --images: NAME_mask.png and NAME_overlay.png); "
                           "the prototype head's files carry _proto after NAME")
    add("--prototype-map", action="store_true",
        help="with --save-dir: also write NAME_prototypes.png, each pixel drawn in one of M "
             "shades of its predicted class's colour, the shade of the micro-prototype of that "
             "class nearest (cosine) to the pixel's decoder feature, so a class's different "
             "appearances show as different shades (one forward pass at the image's size; "
             "the prototype head's prediction when --head is proto or both); needs a "
             "checkpoint with prototypes")
    add("--images", help="an image file or a folder of images: predict them (no labels) at their "
                         "own size instead of evaluating; needs --save-dir")
    add("--out-json", help="also write the metrics to this JSON file")
    return parser.parse_args(argv)


def _parse_scales(text):
    if text is None:
        return (1.0,)
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise EvalError(f"--scales {text!r}: expected comma-separated numbers, "
                        f"e.g. 0.75,1,1.25") from None
    if any(not scale > 0 for scale in scales):
        raise EvalError(f"--scales {text!r}: scales must be positive")
    return scales


def load_checkpoint(path):
    """train.py checkpoint -> dict with at least "config" and "student" (checked)."""
    if not os.path.isfile(path):
        raise EvalError(f"--checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not ours"
        raise EvalError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    missing = [key for key in ("config", "student") if not isinstance(checkpoint, dict)
               or checkpoint.get(key) is None]
    if missing:
        raise EvalError(f"--checkpoint {path}: not a train.py checkpoint (no {', '.join(missing)})")
    needed = ("dataset", "num_classes", "backbone", "output_stride", "crop_size")
    absent = [key for key in needed if checkpoint["config"].get(key) is None]
    if absent:
        raise EvalError(f"--checkpoint {path}: its config lacks {', '.join(absent)}")
    return checkpoint


def build_network(config, state_dict, which, path):
    """DeepLabV3Plus for the run's settings with the `which` ("teacher"/"student") weights."""
    from model import DeepLabV3Plus
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    args = (config["num_classes"], config["backbone"], config["output_stride"],
            bool(config.get("aux", False)))
    deep_stem = "backbone.conv1.weight" not in state_dict  # else --pretrained torchvision
    network = DeepLabV3Plus(*args, deep_stem=deep_stem, width=config.get("width", 1.0))
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as error:
        raise EvalError(f"--checkpoint {path}: the {which} weights do not fit a "
                        f"{config['backbone']} model with {config['num_classes']} classes: "
                        f"{str(error)[:600]}") from None
    return network


def build_bank(checkpoint, config, path, flag="--head proto/both"):
    from prototypes import PrototypeBank
    state = checkpoint.get("prototypes")
    if state is None or "prototypes" not in state:
        raise EvalError(f"{flag}: --checkpoint {path} holds no prototypes "
                        f"(method {config.get('method', '?')!r})")
    num_classes, num_prototypes, dim = state["prototypes"].shape
    bank = PrototypeBank(num_classes, num_prototypes, dim, temperature=config.get("temperature", 0.1),
                         generator=torch.Generator())  # its values come from the state dict
    bank.load_state_dict(state)
    return bank


def _device(flag, local_rank):
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise EvalError(f"--device {flag!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {flag}: no CUDA device is visible")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def _image_files(path):
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EvalError(f"--images {path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalError(f"--images {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    stems = [p.stem for p in files]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        raise EvalError(f"--images {path}: several images share a name, their masks would "
                        f"overwrite each other: {', '.join(clashes[:5])}")
    return files


def predict_images(model, files, save_dir, num_classes, palette, heads, bank, settings,
                   device, rank=0, world_size=1, log=print, class_names=None, background=0,
                   prototype_map=False, clock=time.monotonic):
    """Predict each image file at its own size and write, in SAVE_DIR:

    <stem>_mask.png      predicted class ids as a palette PNG (VOC's format: viewers show
                         colours, data.read_label / --dataset folder read the ids back);
    <stem>_overlay.png   the image with the prediction blended in, class `background`
                         left transparent (None: none), a legend, small images enlarged;
    (the prototype head: <stem>_proto_mask.png, <stem>_proto_overlay.png)
    <stem>_prototypes.png  with `prototype_map`: image | nearest micro-prototype of each
                         pixel's predicted class (the prototype head's when predicted).
    Progress: at most one line every PROGRESS_SECONDS, plus the last one.
    """
    from data import normalize, read_image
    os.makedirs(save_dir, exist_ok=True)
    shades = prototype_shades(palette, num_classes, bank.num_prototypes) if prototype_map else None
    mine = files[rank::world_size]
    start = last_line = clock()
    for done, path in enumerate(mine, start=1):
        picture = read_image(path)
        image_rgb = np.asarray(picture)
        image = normalize(picture).unsqueeze(0).to(device)
        logits = predict_heads(model, image, num_classes, heads=heads, bank=bank, **settings)
        predictions = {head: logits[head][0].argmax(dim=0) for head in heads}
        for head, prediction in predictions.items():
            ids = prediction.cpu().numpy()
            stem = Path(save_dir) / f"{path.stem}{_head_suffix(head)}"
            palette_mask(ids, palette).save(f"{stem}_mask.png")
            clear = None if background is None else ids == background
            overlay = enlarge(overlay_picture(image_rgb, palette[ids], clear=clear))
            key = class_legend([ids], palette, class_names, overlay.shape[1],
                               skip=() if background is None else (background,))
            Image.fromarray(one_above_another([overlay, key])).save(f"{stem}_overlay.png")
        if prototype_map:
            classes = predictions["proto" if "proto" in heads else heads[0]]
            nearest = predict_prototype_map(model, image, bank, classes.unsqueeze(0),
                                            settings.get("amp"))[0].cpu().numpy()
            classes = classes.cpu().numpy()
            pair = side_by_side([_panel(image_rgb, "image"),
                                 _panel(prototype_picture(classes, nearest, shades),
                                        "nearest micro-prototype")])
            key = prototype_legend(classes, nearest, shades, class_names, pair.shape[1])
            Image.fromarray(one_above_another([pair, key])).save(
                Path(save_dir) / f"{path.stem}_prototypes.png")
        now = clock()
        if now - last_line >= PROGRESS_SECONDS or done == len(mine):
            last_line = now
            log(f"images {done}/{len(mine)}: {path.name} ({picture.width} x {picture.height})"
                f"  {done / max(now - start, 1e-9):.2f} img/s")


def resolve_checkpoint(path, log=print):
    """--checkpoint value -> checkpoint file: a file as given; a run directory -> its
    best.pt, else its last.pt (said in the log)."""
    if not os.path.isdir(path):
        return path
    for name in ("best.pt", "last.pt"):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            note = "" if name == "best.pt" else " (it has no best.pt yet)"
            log(f"--checkpoint {path} is a run directory: using {candidate}{note}")
            return candidate
    raise EvalError(f"--checkpoint {path} is a directory without best.pt or last.pt; "
                    f"pass a run directory of train.py or a checkpoint file")


def class_names_of(config, data_root=None):
    """Class names for the legends of --images, where no dataset is built: the fixed
    names of toy / voc / cityscapes, classes.txt of a folder dataset's root when it is
    there (and names the right number of classes), else "class 0", "class 1", ..."""
    import data as data_lib
    num_classes = config["num_classes"]
    spec = data_lib.DATASETS.get(config["dataset"])
    if spec is not None and len(spec.classes) == num_classes:
        return list(spec.classes)
    root = data_root or config.get("data_root")
    if root and os.path.isfile(os.path.join(root, "classes.txt")):
        try:
            return data_lib._folder_classes(root, num_classes)
        except data_lib.DataError:
            pass
    return [f"class {k}" for k in range(num_classes)]


def _background(config):
    """Class left transparent in overlays: 0 (background) except for Cityscapes, whose
    class 0 is road."""
    return None if config["dataset"] == "cityscapes" else 0


def run(args):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *parts: None)
    if args.images and not args.save_dir:
        raise EvalError("--images needs --save-dir for the masks and overlays")
    if args.prototype_map and not args.save_dir:
        raise EvalError("--prototype-map needs --save-dir for the pictures")
    scales = _parse_scales(args.scales)
    device = _device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    args.checkpoint = resolve_checkpoint(args.checkpoint, log)
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint["config"]

    # Every setting is checked before the (large) model is built.
    heads = ("linear", "proto") if args.head == "both" else (args.head,)
    bank = None
    if "proto" in heads or args.prototype_map:
        flag = "--head proto/both" if "proto" in heads else "--prototype-map"
        bank = build_bank(checkpoint, config, args.checkpoint, flag).to(device)
    mode = args.mode or config.get("eval_mode", "whole")
    crop_size = args.crop_size or config["crop_size"]
    amp = args.amp or config.get("amp", "none")
    settings = dict(mode=mode, crop_size=crop_size, stride=args.stride, scales=scales,
                    flip=args.flip, amp=amp)
    try:
        _check_predict_args(mode, crop_size, args.stride, scales, heads, bank)
        _autocast_dtype(amp)
    except ValueError as error:
        raise EvalError(str(error)) from None

    # The trainer scores the teacher only once the semi-supervised phase has begun
    # (iteration > warmup_iters); before that, and in supervised runs, the student.
    iteration = checkpoint.get("iter", 0)
    if args.student:
        which = "student"
    elif checkpoint.get("teacher") is None:
        which = "student"
        log("note: evaluating the student (this run has no teacher)")
    elif iteration <= config.get("warmup_iters", 0):
        which = "student"
        log(f"note: evaluating the student (iteration {iteration} is in the supervised "
            f"warm-up of {config.get('warmup_iters')} iterations; the teacher is not trained yet)")
    else:
        which = "teacher"
    network = build_network(config, checkpoint[which], which, args.checkpoint).to(device).eval()
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    import data as data_lib
    if args.images:
        if mode == "center":
            settings["mode"] = "whole"  # every pixel of a new image gets a prediction
        spec = data_lib.DATASETS.get(config["dataset"], data_lib.DATASETS["voc"])
        palette = spec.palette()
        predict_images(network, _image_files(args.images), args.save_dir, config["num_classes"],
                       palette, heads, bank, settings, device, rank, world_size, log,
                       class_names=class_names_of(config, args.data_root),
                       background=_background(config), prototype_map=args.prototype_map)
        return 0

    data = data_lib.build_data(
        config["dataset"], args.data_root or config.get("data_root"), config["num_classes"],
        config.get("labeled"), args.split_dir or config.get("split_dir"), config.get("seed", 0),
        crop_size, out_dir=None, log=log)
    log(f"evaluate {args.checkpoint} (iteration {iteration}, {which}, heads {', '.join(heads)}): "
        f"{len(data.val)} val images, mode {mode}, crop {crop_size}, scales "
        f"{list(settings['scales'])}, flip {args.flip}, amp {amp}, device {device}")
    start = time.time()
    results = evaluate(network, data.val, data.num_classes, device, heads=heads, bank=bank,
                       rank=rank, world_size=world_size, log=log, save_dir=args.save_dir,
                       palette=data.palette, class_names=data.class_names,
                       prototype_map=args.prototype_map, **settings)
    if rank != 0:
        return 0
    for head in heads:
        log(f"{head} head:")
        log(format_table(results[head], data.class_names))
    record = {"source": "evaluate.py", "checkpoint": os.path.abspath(args.checkpoint),
              "iter": iteration, "model": which, "mode": mode, "crop_size": crop_size,
              "stride": args.stride, "scales": list(settings["scales"]), "flip": args.flip,
              "amp": amp, "seconds": round(time.time() - start, 1)}
    if "linear" in results:
        record.update({key: results["linear"][key]
                       for key in ("miou", "pixel_acc", "mean_acc", "iou", "pixels")})
    if "proto" in results:
        record.update(miou_proto=results["proto"]["miou"], iou_proto=results["proto"]["iou"])
    summary = "  ".join(f"{head} mIoU {results[head]['miou']:.2f}" for head in heads)
    log(f"result: {summary}  ({which}, iteration {iteration})")
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "metrics.jsonl")
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
    args = parse_args(argv)
    from data import DataError
    try:
        return run(args)
    except (EvalError, DataError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
