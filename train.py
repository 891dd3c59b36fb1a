"""PCR: semi-supervised semantic segmentation with prototype-based consistency regularization.

Xu, Liu, Bian, Yang, NeurIPS 2022 (arXiv 2210.04388). The algorithm, step by step, is in
docs/METHOD.md; this file follows its section 3 from top to bottom: the settings, the
method, then `main` (the run from start to finish), then the plumbing it calls.

Toy run on the CPU (embedded data, no download, a few minutes):
    python train.py

One GPU, the paper's VOC 366 experiment (global batch 16 + 16 on one card):
    python train.py --dataset voc --data-root data/VOC2012 --labeled 366

One node, 4 GPUs (16 + 16 split as 4 + 4 per GPU):
    torchrun --standalone --nproc_per_node=4 train.py --dataset voc --data-root data/VOC2012 --labeled 366

Two nodes with 4 GPUs each (run on every node; the endpoint is node 0's address):
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=pcr train.py --dataset cityscapes --data-root data/cityscapes --labeled 744

Each run lives in --out (default runs/DATASET_LABELED_METHOD_sSEED, e.g. runs/toy_16_pcr_s0). An interrupted
run continues with `--resume auto` (same --out, or the same flags that named it): every setting comes from the
checkpoint, and a flag that would change training stops the resume, naming the flag and both values.
"""
import argparse
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

import data as data_lib
import evaluate as evaluate_lib
from cutmix import cutmix_mask, mix
from model import BACKBONES, build_model, param_groups
from prototypes import PrototypeBank, prototype_loss, sample_features, sample_points

IGNORE = 255
LOSS_TERMS = ("sup", "unsup", "proto")  # in the order the progress line shows them (L = their sum, step 8)


# Paper settings (docs/METHOD.md section 5) plus the toy default; SETTINGS below holds the rest. batch_size
# is the GLOBAL labeled batch (as many unlabeled); None: worked out from the data or the run (see its help).
PRESETS = {
    "toy": dict(backbone="resnet18", width=0.25, pretrained="none", output_stride=8, crop_size=64,
                batch_size=8, epochs=30, lr=0.01, head_lr_mult=1.0, weight_decay=1e-4, num_prototypes=4,
                conf_threshold=0.8, aux_weight=0.0, labeled=data_lib.TOY_LABELED,
                num_classes=len(data_lib.TOY_CLASSES), eval_mode="whole", eval_every=600),
    "voc": dict(backbone="resnet101", pretrained="pretrained/resnet101.pth", output_stride=8, crop_size=513,
                batch_size=16, epochs=80, lr=0.001, head_lr_mult=10.0, weight_decay=1e-4, num_prototypes=4,
                conf_threshold=0.8, aux_weight=0.0, labeled=366, num_classes=21, eval_mode="whole",
                eval_every=None),
    "cityscapes": dict(backbone="resnet101", pretrained="pretrained/resnet101.pth", output_stride=8,
                       crop_size=769, batch_size=16, epochs=200, lr=0.01, head_lr_mult=1.0, weight_decay=5e-4,
                       num_prototypes=3, conf_threshold=0.65, aux_weight=0.4, labeled=744, num_classes=19,
                       eval_mode="sliding", eval_every=None),
    # users' own data in VOC layout (tens to thousands of images): VOC's optimiser recipe on a lighter network
    # whose ImageNet weights torchvision downloads itself. The paper's network, as VOC: --backbone resnet101
    # --pretrained pretrained/resnet101.pth --output-stride 8 --crop-size 513 --batch-size 16.
    "folder": dict(backbone="resnet50", pretrained="torchvision", output_stride=16, crop_size=321,
                   batch_size=8, epochs=80, lr=0.001, head_lr_mult=10.0, weight_decay=1e-4, num_prototypes=4,
                   conf_threshold=0.8, aux_weight=0.0, labeled=None, num_classes=None, eval_mode="whole",
                   eval_every=None),
}


class Setting(NamedTuple):
    """One setting, declared once: parsing, --help, range checks, the resume and --out
    checks, --print-config and the config summary all read it. Its flag is --key-with-dashes."""
    section: str        # where the config summary shows it
    default: object     # unless the dataset's preset has the key; None: worked out from the run
    kind: object        # int, float, str, a tuple of choices, or bool (a switch)
    help: str
    range: tuple = None  # numbers: (lowest, highest, whether the lowest itself is allowed)
    live: bool = False  # may change when a run resumes: it does not change what is trained


POSITIVE, NON_NEGATIVE, UNIT = (0, math.inf, False), (0, math.inf, True), (0, 1, True)
AT_LEAST_ONE = (1, math.inf, True)


SETTINGS = {
    "dataset": Setting("run", "toy", tuple(PRESETS), "dataset and its preset"),
    "data_root": Setting("run", None, str, "dataset root (VOC: the VOC2012 folder; Cityscapes: holds "
                         "leftImg8bit/ and gtFine/; folder: JPEGImages/, SegmentationClass/, lists)"),
    "labeled": Setting("run", None, int, "labeled images: VOC 92/183/366/732/1464 (classic) or 662/1323/"
                       "2646/5291 (blended), Cityscapes 186/372/744/1488 (auto: all of the folder's "
                       "labeled.txt)", AT_LEAST_ONE),
    "split_dir": Setting("run", None, str, "folder with labeled.txt / unlabeled.txt (and val.txt) of a "
                         "published split (U2PL, UniMatch or CPS format)"),
    "method": Setting("run", "pcr", ("pcr", "meanteacher", "supervised"),
                      "pcr; meanteacher = pcr without prototypes; supervised = labeled images only"),
    "seed": Setting("run", 0, int, "random seed (data order, splits, initialisation)"),
    "num_classes": Setting("model", None, int, "number of classes (auto: the folder's classes.txt or "
                           "labelme's class_names.txt, one name per line)", AT_LEAST_ONE),
    "backbone": Setting("model", None, tuple(sorted(BACKBONES)), "ResNet depth (model.BACKBONES)"),
    "width": Setting("model", 1.0, float, "channel multiplier of the whole network (1.0 = the paper's; "
                     "the toy uses a thin network to train in minutes on a CPU)", POSITIVE),
    "pretrained": Setting("model", None, str, "'none', 'torchvision' (7x7 stem, torchvision ImageNet "
                          "weights), 'hub:resnet101s' / 'hub:resnet50s' (deep stem, timm's ImageNet "
                          "weights, downloaded once into torch's hub cache) or the path of a deep-stem "
                          "ImageNet checkpoint"),
    "output_stride": Setting("model", None, (8, 16), "backbone output stride (paper: 8)"),
    "aux_weight": Setting("model", None, float, "weight of the auxiliary layer3 loss (0: no aux head)",
                          NON_NEGATIVE),
    "epochs": Setting("training", None, int, "epochs; one epoch = one pass over the unlabeled set",
                      AT_LEAST_ONE),
    "iters": Setting("training", None, int, "total iterations (auto: from --epochs)", AT_LEAST_ONE),
    "warmup_epochs": Setting("training", 1, int, "supervised-only epochs before the semi-supervised phase "
                             "(at most half the run)", NON_NEGATIVE),
    "warmup_iters": Setting("training", None, int, "supervised-only iterations (auto: from --warmup-epochs)",
                            NON_NEGATIVE),
    "batch_size": Setting("training", None, int, "GLOBAL labeled batch over all processes; the unlabeled "
                          "batch is equal", AT_LEAST_ONE),
    "crop_size": Setting("training", None, int, "training crop (square)", (16, math.inf, True)),
    "lr": Setting("optimizer", None, float, "base learning rate of the backbone", POSITIVE),
    "head_lr_mult": Setting("optimizer", None, float, "learning-rate multiplier of decoder and heads", POSITIVE),
    "weight_decay": Setting("optimizer", None, float, "SGD weight decay", NON_NEGATIVE),
    "momentum": Setting("optimizer", 0.9, float, "SGD momentum", UNIT),
    "poly_power": Setting("optimizer", 0.9, float, "power of the poly learning-rate decay", NON_NEGATIVE),
    "ohem_thresh": Setting("losses", 0.7, float, "OHEM keeps pixels whose probability of the true class is "
                           "at most this", UNIT),
    "ohem_min_kept_per_image": Setting("losses", 50000, int, "OHEM keeps at least this many pixels per "
                                       "labeled image of a process (the reference's 100000 for its 2 images "
                                       "per GPU)", AT_LEAST_ONE),
    "unsup_weight": Setting("unlabeled", 1.0, float, "weight of the unsupervised loss L_u", NON_NEGATIVE),
    "drop_start": Setting("unlabeled", 0.2, float, "share of highest-entropy pixels dropped from L_u at the "
                          "start (falls linearly to 0)", UNIT),
    "cutmix_prob": Setting("unlabeled", 0.5, float, "probability that an iteration's unlabeled batch is "
                           "CutMixed", UNIT),
    "ema_decay": Setting("unlabeled", 0.99, float, "upper bound of the teacher's EMA momentum", UNIT),
    "proto_weight": Setting("prototypes", 1.0, float, "weight of the prototype consistency loss", NON_NEGATIVE),
    "num_prototypes": Setting("prototypes", None, int, "micro-prototypes per class (M)", AT_LEAST_ONE),
    "conf_threshold": Setting("prototypes", None, float, "teacher confidence needed for an unlabeled pixel "
                              "to train the prototype head (gamma)", UNIT),
    "temperature": Setting("prototypes", 0.1, float, "temperature of the prototype logits", POSITIVE),
    "proto_momentum": Setting("prototypes", 0.99, float, "momentum of the prototype update", UNIT),
    "grid": Setting("prototypes", 32, int, "the prototype loss reads one pixel per GRID x GRID cell",
                    AT_LEAST_ONE),
    "eval_mode": Setting("evaluation", None, ("whole", "sliding", "center"), "evaluation protocol"),
    "eval_every": Setting("evaluation", None, int, "evaluate every N iterations (auto: once per epoch)",
                          AT_LEAST_ONE, live=True),
    "save_every": Setting("evaluation", 0, int, "write last.pt every N iterations (0: at every evaluation)",
                          NON_NEGATIVE, live=True),
    "amp": Setting("process", "none", ("bf16", "fp16", "none"), "mixed precision (CUDA; bf16 also on CPU)"),
    "device": Setting("process", "auto", str, "'auto', 'cpu', 'cuda' or 'cuda:N' (torchrun picks "
                      "cuda:LOCAL_RANK)", live=True),
    "channels_last": Setting("process", "auto", ("auto", "on", "off"), "channels_last memory format (auto: "
                             "on for CPU, where it takes a fifth off the toy's step; off for CUDA, where it "
                             "pays with --amp)", live=True),
    "checkpoint_activations": Setting("process", False, bool, "recompute the student's backbone (stem and "
                                      "residual blocks) in the backward pass: same numbers, less memory, "
                                      "more time (bench.py --compare-checkpointing)", live=True),
    "workers": Setting("process", min(4, os.cpu_count() or 1), int, "data-loading processes per training "
                       "process", NON_NEGATIVE, live=True),
    "log_every": Setting("process", 20, int, "print a progress line every N iterations", AT_LEAST_ONE,
                         live=True),
    "out": Setting("process", None, str, "run directory: config, log, metrics, checkpoints (auto: "
                   "runs/DATASET_LABELED_METHOD_sSEED, e.g. runs/toy_16_pcr_s0)", live=True),
    "resume": Setting("process", None, str, "'auto' (OUT/last.pt if present) or a checkpoint path; the run's "
                      "settings come from the checkpoint", live=True),
    "skip_data_check": Setting("process", False, bool, "do not decode every listed image and mask before "
                               "training (about half a minute of one core for VOC; a passed check is "
                               "recorded in OUT/data_check.json and not repeated on resume)", live=True),
    "print_config": Setting("process", False, bool, "print the resolved settings and exit", live=True),
}


# ================ THE METHOD: docs/METHOD.md sections 3 and 4, in the order of the steps
# Losses, schedules, one training iteration (steps 2-10) and the prototype initialisation that opens the
# semi-supervised phase.

# ---------------- Losses (steps 5-7; the prototype loss is prototypes.prototype_loss). Each returns a
# scalar float32 tensor and never syncs with the host: counts stay tensors, empty selections give 0.

def ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100000):
    """Online hard example mining CE (step 5).

    p_i = softmax(logits)_i[target_i] for valid pixels (target != 255).
    If #valid < min_kept every valid pixel is kept; otherwise pixels with
    p_i <= max(thresh, p_(min_kept)) are kept, p_(k) being the k-th smallest p.
    L = sum_{kept} -log p_i / #kept.
    logits (B, K, H, W), target (B, H, W)."""
    logits = logits.float()
    valid = target != IGNORE
    safe_target = torch.where(valid, target, 0)
    log_prob = F.log_softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
    prob = torch.where(valid, log_prob.exp(), 1.0).flatten()  # invalid pixels sort last
    num_valid = valid.sum()
    k = min(min_kept, prob.numel())
    kth_smallest = prob.kthvalue(k).values
    threshold = torch.where(num_valid < min_kept, math.inf, torch.clamp(kth_smallest, min=thresh))
    kept = valid & (prob.view_as(valid) <= threshold)
    return -(log_prob * kept).sum() / kept.sum().clamp(min=1)


def ohem_min_kept(cfg, num_labeled):
    """OHEM's min_kept for a process holding num_labeled labeled images: ohem_min_kept_per_image each.
    Scaling the reference's 100000 for 2 images per GPU keeps its kept share (~19% at crop 513)."""
    return cfg["ohem_min_kept_per_image"] * num_labeled


def supervised_losses(logits, aux_logits, label, cfg):
    """L_sup = OHEM CE of the linear head (+ aux_weight * OHEM CE of the aux head)."""
    size = label.shape[-2:]
    min_kept = ohem_min_kept(cfg, len(label))
    loss = ohem_cross_entropy(upsample(logits, size), label, cfg["ohem_thresh"], min_kept)
    if aux_logits is not None:
        loss = loss + cfg["aux_weight"] * ohem_cross_entropy(
            upsample(aux_logits, size), label, cfg["ohem_thresh"], min_kept)
    return loss


def entropy_filtered_cross_entropy(logits, pseudo_label, entropy, drop_fraction):
    """Unsupervised CE against the teacher's pseudo-labels (step 6).

    Among valid pixels (pseudo_label != 255), the drop_fraction with the highest teacher
    entropy H = -sum_k q_k log q_k are ignored. As U2PL's compute_unsupervised_loss:
        L = (N / #kept) * mean_{kept} -log p[y_u],   N = B * H * W (all pixels, padding too)
    so L is 1 / (1 - drop) times the plain mean when nothing is padded.
    logits (B, K, H, W), pseudo_label / entropy (B, H, W)."""
    valid = pseudo_label != IGNORE
    num_valid = valid.sum()
    # threshold: the first dropped value in ascending order (invalid first, as -inf), found by index math
    flat = torch.where(valid, entropy, -math.inf).flatten()
    num_keep = torch.floor(num_valid * (1.0 - drop_fraction)).long()
    first_dropped = (flat.numel() - num_valid + num_keep).clamp(max=flat.numel() - 1)
    first_dropped_value = sorted_value_at(flat, first_dropped)
    threshold = torch.where(num_keep >= num_valid, math.inf, first_dropped_value)
    kept = valid & (entropy < threshold)
    nll = F.cross_entropy(logits.float(), torch.where(kept, pseudo_label, 0), reduction="none")
    num_kept = kept.sum().clamp(min=1)
    return (nll * kept).sum() / num_kept * (kept.numel() / num_kept)


def sorted_value_at(values, index, host_read=None):
    """values.sort().values[index] (1-D values, 0-dim int64 index). host_read (default: on CPU): kthvalue
    after reading index, 5x faster than sorting 32k values; else sort and gather: no wait for a GPU."""
    if host_read is None:
        host_read = not values.is_cuda
    if host_read:
        return values.kthvalue(int(index) + 1).values
    return values.sort().values.gather(0, index.reshape(1)).squeeze(0)


# ---------------- Schedules: the entropy drop (step 6), the learning rate (step 8), the teacher (step 10)

def drop_fraction_at(epoch, epochs, start=0.2):
    """Share of highest-entropy pixels dropped from L_u: start * (1 - epoch / epochs)."""
    return start * (1.0 - epoch / max(epochs, 1))


def poly_lr(base_lr, it, total_iters, power=0.9):
    """lr = base * (1 - it / total) ** power, over all iterations including warm-up."""
    return base_lr * (1.0 - it / total_iters) ** power


def set_learning_rate(optimizer, it, cfg):
    """Step 8's schedule: every parameter group at poly_lr of its own base rate."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["base_lr"], it, cfg["total_iters"], cfg["poly_power"])


def ema_alpha(t, decay=0.99):
    """Teacher momentum after t semi-supervised iterations: min(1 - 1/(t + 1), decay)."""
    return min(1.0 - 1.0 / (t + 1), decay)


@torch.no_grad()
def ema_update(teacher, student, alpha):
    """teacher <- alpha * teacher + (1 - alpha) * student, parameters and BN statistics."""
    floats, counters = [], []  # counters: BN's num_batches_tracked, copied
    for pair in zip(model_tensors(teacher), model_tensors(student)):
        (floats if pair[0].dtype.is_floating_point else counters).append(pair)
    torch._foreach_lerp_([t for t, _ in floats], [s for _, s in floats], 1.0 - alpha)
    for t, s in counters:  # (a foreach call refuses an empty list: a model without BatchNorm)
        t.copy_(s)


def model_tensors(model):
    """Parameters then buffers, in a fixed order (state_dict's tensors, without its cost)."""
    return [*model.parameters(), *model.buffers()]


@torch.no_grad()
def teacher_update(teacher, student, t, cfg):
    """Step 10 after t semi-supervised iterations (0 = the first one). During the first semi-supervised
    epoch (t < iters_per_epoch) the teacher IS the student: its state is copied, as the reference copies
    the student's parameters at every iteration of that epoch. Then EMA at alpha = ema_alpha(t)."""
    if t < cfg["iters_per_epoch"]:
        torch._foreach_copy_(model_tensors(teacher), model_tensors(student))
    else:
        ema_update(teacher, student, ema_alpha(t, cfg["ema_decay"]))


# ---------------- One iteration (steps 2-10)

def autocast(amp, device):
    """Mixed precision for --amp 'bf16' / 'fp16' on `device`; 'none' (or None): full precision."""
    if amp in (None, "none"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def teacher_predict(teacher, image_u, padding, cfg, ctx):
    """Step 2: pseudo-label, confidence and entropy of the teacher at image size."""
    with autocast(cfg["amp"], ctx.device):
        logits, _, _ = teacher(image_u)
    prob = upsample(logits.float(), image_u.shape[-2:]).softmax(dim=1)
    confidence, pseudo_label = prob.max(dim=1)
    entropy = -(prob * torch.log(prob + 1e-10)).sum(dim=1)
    pseudo_label = pseudo_label.masked_fill(padding, IGNORE)  # padded pixels teach nothing
    confidence = confidence.masked_fill(padding, 0.0)
    return pseudo_label, confidence, entropy


def train_step(batch, models, cfg, ctx, it, step_rng):
    """Steps 2-7 of docs/METHOD.md section 3 (step 1, the weak augmentation, happened in
    the data loaders: data.weak_augment). Returns the loss terms (device tensors) and the
    prototype-update inputs; no host-device synchronisation happens here."""
    student, teacher, bank = models
    image_l, label_l = batch["labeled"]
    semi = cfg["method"] != "supervised" and it >= cfg["warmup_iters"]
    terms = {}
    if not semi:  # supervised warm-up (epoch 0), or the supervised baseline
        with autocast(cfg["amp"], ctx.device):
            logits, _, aux_logits = student(image_l)
        terms["sup"] = supervised_losses(logits, aux_logits, label_l, cfg)
        return terms, None

    image_u, padding_u = batch["unlabeled"]
    # 2. teacher pseudo-labels on the weakly augmented unlabeled images
    with record_function("teacher forward + pseudo-labels"):  # labels: profilers, bench.py
        pseudo_label, confidence, entropy = teacher_predict(teacher, image_u, padding_u, cfg, ctx)
    # 3. CutMix: the same boxes move images, pseudo-labels, confidences and entropies
    height, width = image_u.shape[-2:]
    with record_function("cutmix"):
        mask = cutmix_mask(len(image_u), height, width, cfg["cutmix_prob"], generator=step_rng,
                           device=ctx.device)
        image_u, pseudo_label, confidence, entropy = (mix(x, mask) for x in
                                                      (image_u, pseudo_label, confidence, entropy))
    # 4. one student pass over labeled and mixed unlabeled images (BN sees both)
    num_l = len(image_l)
    with record_function("student forward"), autocast(cfg["amp"], ctx.device):
        logits, feature, aux_logits = student(torch.cat([image_l, image_u]))
    # 5. supervised loss, 6. unsupervised loss with the entropy-based drop
    with record_function("supervised loss (OHEM)"):
        terms["sup"] = supervised_losses(logits[:num_l],
                                         None if aux_logits is None else aux_logits[:num_l], label_l, cfg)
    epoch = it // cfg["iters_per_epoch"]
    drop = drop_fraction_at(epoch, cfg["total_epochs"], cfg["drop_start"])
    with record_function("unsupervised loss"):
        terms["unsup"] = cfg["unsup_weight"] * entropy_filtered_cross_entropy(
            upsample(logits[num_l:], (height, width)), pseudo_label, entropy, drop)
    if cfg["method"] != "pcr":
        return terms, None

    # 7. prototype consistency on one random pixel per grid cell
    with record_function("pixel sampling + targets"):
        ys, xs = sample_points(height, width, cfg["grid"], generator=step_rng, device=ctx.device)
        point_feature = sample_features(feature, ys, xs, (height, width)).flatten(0, 1)  # (B*P, D)
        target_l = label_l[:, ys, xs]
        target_u = torch.where(confidence[:, ys, xs] >= cfg["conf_threshold"], pseudo_label[:, ys, xs], IGNORE)
        target = torch.cat([target_l, target_u]).flatten()  # (B*P,)
    with record_function("prototype logits"):
        prototype_logits, nearest = bank(point_feature)  # pre-update prototypes
    with record_function("prototype loss"):
        terms["proto"] = cfg["proto_weight"] * prototype_loss(prototype_logits, target)
    return terms, (point_feature.detach(), target, nearest)


def train_iteration(batch, models, optimizer, scaler, cfg, ctx, it, step_rng, semi):
    """Steps 2-10: train_step (2-7), then the learning rate, backward and SGD step (8), the prototype
    update (9) and the teacher update (10). Returns the loss terms and `finite` (0-dim bool on the device).
    A non-finite loss leaves no trace: the scaler skips the step, the BN statistics that the forward pass
    updated are restored, and no pixel reaches the prototypes. No host sync."""
    model, teacher, bank = models
    student = getattr(model, "module", model)  # DDP's wrapped module
    bn_stats = [b for b in student.buffers() if b.dtype.is_floating_point]
    saved_bn_stats = torch.cat([b.reshape(-1) for b in bn_stats])  # for a skipped step
    terms, update = train_step(batch, models, cfg, ctx, it, step_rng)
    # 8. L = L_sup + L_u + L_proto; SGD at this iteration's poly learning rate
    set_learning_rate(optimizer, it, cfg)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward (network + losses)"):
        scaler.scale(loss).backward()
    with record_function("optimizer step"):
        scaler.step(optimizer)  # skipped on the device when a gradient is not finite
        scaler.update(None if cfg["amp"] == "fp16" else 1.0)  # 1 stays 1: no backoff to 0
        finite = torch.isfinite(loss)
        restore_buffers_if(~finite, bn_stats, saved_bn_stats)
    # 9. prototype update with this iteration's features (pre-update nearest prototypes)
    if update is not None:
        point_feature, target, nearest = update
        with record_function("prototype update"):
            bank.update(point_feature, target.masked_fill(~finite, IGNORE), nearest,
                        group=dist.group.WORLD if ctx.world > 1 else None)
    if ctx.world > 1 and ctx.device.type != "cuda":  # plain BN: see average_buffers
        average_buffers(student, ctx)
    # 10. teacher follows the student
    if semi:
        with record_function("EMA teacher"):
            teacher_update(teacher, student, it - cfg["warmup_iters"], cfg)
    return terms, finite


# ---------------- Prototype initialisation and the start of the semi-supervised phase (section 4)

@torch.no_grad()
def labeled_features(model, dataset, cfg, ctx, max_per_class=3000):
    """Student features (D-dim) and labels at grid-sampled pixels of the labeled images: every
    process reads its share of the images, the result is gathered on all processes, then at
    most max_per_class pixels per class are kept at random."""
    crop = cfg["crop_size"]
    grid = int(np.clip(math.sqrt(100_000 / max(len(dataset), 1)), 4, cfg["grid"]))
    gen = torch.Generator().manual_seed(cfg["seed"])
    feats, labels = [], []
    was_training = model.training
    model.eval()
    indices = list(range(ctx.rank, len(dataset), ctx.world))
    per_process = -(-len(dataset) // ctx.world)
    for start in range(0, per_process, 8):
        chunk = indices[start:start + 8]
        if not chunk:  # keep every process in step for the gather below
            break
        images, masks = zip(*(dataset[(i, cfg["seed"] + i)] for i in chunk))
        images, masks = torch.stack(images).to(ctx.device), torch.stack(masks).to(ctx.device)
        with autocast(cfg["amp"], ctx.device):
            _, feature, _ = model(images)
        ys, xs = sample_points(crop, crop, grid, generator=gen, device=ctx.device)
        feats.append(sample_features(feature.float(), ys, xs, (crop, crop)).flatten(0, 1))
        labels.append(masks[:, ys, xs].flatten())
    model.train(was_training)
    feats = torch.cat(feats) if feats else torch.zeros(0, model.feature_dim, device=ctx.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=ctx.device)
    if ctx.world > 1:  # pad to equal length with ignored rows, then gather
        longest = torch.tensor(len(labels), device=ctx.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        longest = int(longest)
        feats = F.pad(feats, (0, 0, 0, longest - len(feats)))
        labels = F.pad(labels, (0, longest - len(labels)), value=IGNORE)
        all_feats = [torch.zeros_like(feats) for _ in range(ctx.world)]
        all_labels = [torch.zeros_like(labels) for _ in range(ctx.world)]
        dist.all_gather(all_feats, feats)
        dist.all_gather(all_labels, labels)
        feats, labels = torch.cat(all_feats), torch.cat(all_labels)
    # keep at most max_per_class per class: random priority, rank within class
    priority = torch.rand(len(labels), generator=gen).to(ctx.device)
    order = torch.argsort(labels.double() * 2 + priority.double())  # by class, then at random
    sorted_labels = labels[order]
    first_of_class = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank_in_class = torch.arange(len(labels), device=ctx.device) - first_of_class
    keep = order[(rank_in_class < max_per_class) & (sorted_labels != IGNORE)]
    return feats[keep], labels[keep]


def init_prototypes(bank, student, dataset, cfg, ctx):
    """Cosine k-means with M centres per class on labeled_features (the same prototypes on
    every process); a class the labeled images lack keeps its random start."""
    feats, labels = labeled_features(student, dataset, cfg, ctx)
    done = bank.init_kmeans(feats, labels, generator=torch.Generator(device=feats.device).manual_seed(cfg["seed"]))
    if ctx.world > 1:  # identical prototypes everywhere, whatever the arithmetic did
        dist.broadcast(bank.prototypes, src=0)
    counts = torch.bincount(labels, minlength=bank.prototypes.shape[0]).tolist()
    ctx.log(f"prototypes: k-means on {len(labels)} labeled pixels, {int(done.sum())}/{len(done)} "
            f"classes initialised from data (pixels per class: {counts})")


def start_semi_supervised(student, teacher, bank, labeled_set, cfg, ctx):
    """End of the supervised epoch 0 (section 4): prototypes by k-means on the student's
    features of the labeled images, then the teacher starts as the student."""
    if bank is not None:
        init_prototypes(bank, student, labeled_set, cfg, ctx)
    teacher.load_state_dict(student.state_dict())


# ================ THE RUN: from the flags to final.json

def main(argv=None):
    # 1. settings: flags over the dataset's preset, or the stored ones of a resumed run;
    #    every problem that needs no file is reported now, all at once, nothing written
    cfg, ctx, ckpt, ckpt_path, errors = read_settings(argv)
    if errors:
        return report_errors(errors, ctx, cfg["out"])
    if cfg["print_config"]:
        print(json.dumps(cfg, indent=2))
        return 0
    # 2. the run directory (before joining the other processes: a failure stops the job at
    #    once), data, models, the schedule, the checkpoint's state, the data check
    try:
        ctx.open_log(cfg["out"])
        ctx.connect()
        data, student, teacher, bank, optimizer, scaler = build_everything(cfg, ctx, ckpt is not None)
        check_batches(cfg, ctx, data)
        step_rng = torch.Generator().manual_seed(cfg["seed"] * 1000 + ctx.rank)  # boxes, pixels
        parts = dict(student=student, teacher=teacher, prototypes=bank, optimizer=optimizer,
                     scaler=scaler)  # what a checkpoint holds
        start_iter, best = resume(ckpt, ckpt_path, parts, step_rng, ctx)
        del ckpt  # its tensors are in the models now
        check_data_before_training(data, cfg, ctx)
    except (SetupError, CheckpointError, data_lib.DataError, ValueError) as e:
        return report_errors([last_line(e)], ctx, cfg["out"])
    except Exception as e:  # a bug or a system error: its traceback follows, the log says why
        ctx.write(f"error: {type(e).__name__}: {last_line(e)}")
        raise
    config_path = os.path.join(cfg["out"], "config.json")  # (a resumed run keeps its own)
    if ctx.main and not (cfg["resume"] and os.path.exists(config_path)):
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2)
    ctx.log("\n".join(describe_config(cfg, ctx)))
    total = cfg["total_iters"]
    if start_iter >= total:
        ctx.log(f"resume: the run already finished ({start_iter}/{total} iterations); nothing to do")
        return 0
    model = student if ctx.world == 1 else torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    model.train()
    received = []  # SIGTERM / SIGINT: save and stop, all processes together
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    stop_vote = StopVote(received, ctx.world)
    loaders, progress, metrics = {}, Progress(cfg, start_iter, ctx.device), None

    # 3. the loop: steps 2-10 per iteration, progress lines, evaluations, checkpoints
    for it in range(start_iter, total):
        semi = cfg["method"] != "supervised" and it >= cfg["warmup_iters"]
        if semi and it == cfg["warmup_iters"]:
            with progress.pause(it):  # the k-means is not training time
                start_semi_supervised(student, teacher, bank, data.labeled, cfg, ctx)
        try:
            batch = next_batch(loaders, data, cfg, ctx, it, semi)
            terms, finite = train_iteration(batch, (model, teacher, bank), optimizer, scaler, cfg,
                                            ctx, it, step_rng, semi)
        except data_lib.DataError as e:  # a file changed on disk since the data check
            return stop_on_bad_file(e, it, parts, best, step_rng, cfg, ctx)
        except torch.cuda.OutOfMemoryError:  # (exists in every torch requirements.txt allows)
            return report_out_of_memory(cfg, ctx, it, semi)
        progress.add(terms, finite, it)  # on the device; read back at the logging interval
        done = it + 1
        if (done % cfg["log_every"] == 0 or done == total) and not log_progress(progress, optimizer,
                                                                                 cfg, ctx, it, semi):
            stop_vote.close()
            return 3  # five non-finite losses in a row
        if done % cfg["eval_every"] == 0 or done == total:
            with progress.pause(done, evaluation=True):  # evaluation time is not training speed
                try:
                    results = run_evaluation(student, teacher, bank, data, cfg, ctx, semi)
                except data_lib.DataError as e:  # a val file changed on disk since the check
                    return stop_on_bad_file(e, done, parts, best, step_rng, cfg, ctx)
            metrics = record_evaluation(results, best, data, cfg, ctx, it, semi)
            if metrics["iter"] == best["iter"]:
                save_checkpoint("best.pt", done, parts, best, step_rng, cfg, ctx)
        stop = stop_vote()  # the same answer on every process: they stop together
        if done % cfg["save_every"] == 0 or done == total or stop:
            save_checkpoint("last.pt", done, parts, best, step_rng, cfg, ctx)
        if stop:
            stop_vote.close()
            ctx.log(f"interrupted: saved {cfg['out']}/last.pt at iteration {done}; continue with --resume auto")
            return 128 + (received[0] if received else signal.SIGTERM)

    # 4. the end: final.json with the last and the best evaluation
    stop_vote.close()
    summary = {"method": cfg["method"], "dataset": cfg["dataset"], "iters": total, "miou": metrics["miou"],
               "miou_proto": metrics["miou_proto"], "best_miou": best["miou"], "best_iter": best["iter"]}
    if ctx.main:
        with open(os.path.join(cfg["out"], "final.json"), "w") as f:
            json.dump(summary, f, indent=2)
    ctx.log("final: " + json.dumps(summary))
    return 0


# ================ PLUMBING: settings, processes, data order, checkpoints, progress, evaluation records
# None of it is needed to understand PCR; it makes the method run, resume and report.

# ---------------- Settings: parsed and checked from SETTINGS; a resumed run keeps its own

# Worked out from the data and the number of processes at every start, never compared.
DERIVED = {"local_batch", "iters_per_epoch", "total_iters", "total_epochs"}


class SetupError(Exception):
    """A flag or file that makes the run impossible; the message names it."""


class CheckpointError(Exception):
    """A checkpoint file that cannot be read."""


def flag_name(key):
    return "--" + key.replace("_", "-")


def preset_help(key):
    """' (default: X)', or ' (preset: toy 64; voc 513; ...)' where the presets differ: what a
    flag left out becomes (auto: worked out from the data or the run)."""
    groups = {}  # repr(value) -> (value, datasets), in PRESETS order
    for name, preset in PRESETS.items():
        value = preset.get(key, SETTINGS[key].default)
        groups.setdefault(repr(value), (value, []))[1].append(name)
    if len(groups) == 1:
        return "" if value is None or value is False else f" (default: {value})"
    return " (preset: " + "; ".join(f"{', '.join(names)} {'auto' if value is None else value}"
                                    for value, names in groups.values()) + ")"


def parse_args(argv=None):
    """{setting: value} of the flags the user gave: a flag left out is absent, not its
    default (a resumed run keeps its own); --help shows what it becomes."""
    parser = argparse.ArgumentParser(description="PCR trainer (launch commands: the module docstring)")
    for key, setting in SETTINGS.items():
        kind = setting.kind
        parser.add_argument(flag_name(key), help=setting.help + preset_help(key), **(
            dict(action="store_const", const=True) if kind is bool else
            dict(choices=kind, type=type(kind[0])) if isinstance(kind, tuple) else dict(type=kind)))
    return {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}


def resolve_config(given):
    """The declared defaults, then the dataset's preset, then every flag the user gave. --out defaults to
    runs/{dataset}_{labeled}_{method}_s{seed}: another dataset, split, method or seed never lands in (or
    resumes from) the quick start's directory. A folder is named after its root; 'lists': its labeled.txt."""
    cfg = {key: setting.default for key, setting in SETTINGS.items()}
    cfg.update(PRESETS[given.get("dataset", cfg["dataset"])])
    cfg.update(given)
    if not cfg["out"]:
        name = cfg["dataset"]
        if name == "folder" and cfg["data_root"]:
            name = "folder-" + (os.path.basename(os.path.normpath(cfg["data_root"])) or "root")
        labeled = "lists" if cfg["labeled"] is None else cfg["labeled"]
        cfg["out"] = os.path.join("runs", f"{name}_{labeled}_{cfg['method']}_s{cfg['seed']}")
    return cfg


def read_settings(argv):
    """The run's settings and every problem found without writing a file, all at once.
    Returns (cfg, ctx, the checkpoint to resume or None, its path, errors)."""
    given = parse_args(argv)
    cfg = resolve_config(given)
    errors, ckpt, path = [], None, None
    try:
        ctx = Context(cfg["device"])
    except SetupError as e:
        errors.append(str(e))
        ctx = Context("cpu")
    if cfg["resume"]:
        try:
            ckpt, path = find_resume_checkpoint(cfg, ctx)
        except (SetupError, CheckpointError) as e:
            errors.append(str(e))
        # without a checkpoint, --resume auto restarts a run that stopped before its first one
        origin = path if ckpt is not None else os.path.join(cfg["out"], "config.json")
        stored = ckpt["config"] if ckpt is not None else cfg["resume"] == "auto" and stored_config(origin)
        if stored:
            cfg, conflicts = resumed_config(cfg, given, stored, origin, ctx.log)
            errors += conflicts
    elif not cfg["print_config"]:  # (printing writes nothing)
        errors += occupied_out_error(cfg)
    errors += setup_errors(cfg, ctx, resuming=ckpt is not None)
    return cfg, ctx, ckpt, path, errors


def warmup_errors(cfg, total, source):
    if cfg["method"] != "supervised" and cfg["warmup_iters"] is not None and cfg["warmup_iters"] >= total:
        return [f"--warmup-iters {cfg['warmup_iters']} leaves no semi-supervised iteration of {total} ({source})"]
    return []


def setup_errors(cfg, ctx, resuming):
    """Every number out of its declared range, a global batch that does not split over the processes,
    an --out that cannot be written, a missing data root, split folder or ImageNet weights (data.py
    checks the contents once the run directory exists)."""
    errors = []
    for key, setting in SETTINGS.items():
        value = cfg[key]
        if setting.range is None or value is None:
            continue
        low, high, low_ok = setting.range
        if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high < math.inf else "")
            errors.append(f"{flag_name(key)} {value}: must be {bound}")
    if cfg["iters"]:
        errors += warmup_errors(cfg, cfg["iters"], f"--iters {cfg['iters']}")
    batch, world = cfg["batch_size"] or 0, ctx.world  # (a batch below 1 is named above)
    if batch >= 1 and batch % world:
        errors.append(f"--batch-size {batch} (global) does not split over {world} processes; pass a "
                      f"multiple of {world}, e.g. --batch-size {world * max(1, round(batch / world))}")
    elif batch >= 1 and batch // world < 2 and not (ctx.device.type == "cuda" and world > 1):
        # plain BatchNorm (ASPP's image pooling) needs two images; SyncBN pools processes
        errors.append(f"--batch-size {batch} leaves {batch // world} image per process; BatchNorm "
                      f"needs at least 2: pass --batch-size {2 * world}")
    existing = os.path.abspath(cfg["out"])
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        errors.append(f"--out {cfg['out']}: cannot write there ({existing} is "
                      f"{'not writable' if os.path.isdir(existing) else 'a file'})")
    errors += data_lib.location_errors(cfg["dataset"], cfg["data_root"], cfg["split_dir"])
    pretrained = cfg["pretrained"]
    named = pretrained in ("none", "torchvision") or pretrained.startswith("hub:")
    if not resuming and not named and not os.path.exists(pretrained):  # (a resumed run has them)
        errors.append(f"--pretrained: ImageNet weights not found at {pretrained}. The paper starts from "
                      "the deep-stem resnet101.pth / resnet50.pth that U2PL, UniMatch and CPS publish: put "
                      "it there or pass --pretrained PATH. Else --pretrained hub:resnet101s (same layout, "
                      "timm's weights, downloaded once; results may differ a little), --pretrained torchvision "
                      "(7x7 stem; results differ) or --pretrained none (from scratch; far below the paper).")
    return errors


def check_batches(cfg, ctx, data):
    """The schedule from the data's size and the number of processes: the local batch,
    iterations per epoch, total, warm-up, intervals."""
    if cfg["method"] != "supervised" and len(data.unlabeled) < cfg["batch_size"]:
        raise SetupError(f"--method {cfg['method']} needs at least --batch-size "
                         f"({cfg['batch_size']}) unlabeled images, the split has {len(data.unlabeled)}")
    cfg["local_batch"] = cfg["batch_size"] // ctx.world
    # an epoch is a pass over the unlabeled set (the labeled set for the supervised-only
    # baseline when there are no unlabeled images, so that it still has epochs)
    cfg["iters_per_epoch"] = max(1, (len(data.unlabeled) or len(data.labeled)) // cfg["batch_size"])
    cfg["total_iters"] = cfg["iters"] or cfg["epochs"] * cfg["iters_per_epoch"]
    cfg["total_epochs"] = math.ceil(cfg["total_iters"] / cfg["iters_per_epoch"])
    for error in warmup_errors(cfg, cfg["total_iters"], f"--epochs {cfg['total_epochs']} x "
                               f"{cfg['iters_per_epoch']} per epoch"):
        raise SetupError(error)
    if cfg["warmup_iters"] is None:
        cfg["warmup_iters"] = min(cfg["warmup_epochs"] * cfg["iters_per_epoch"], cfg["total_iters"] // 2)
    cfg["eval_every"] = cfg["eval_every"] or cfg["iters_per_epoch"]
    cfg["save_every"] = cfg["save_every"] or cfg["eval_every"]


def differs(key, value, stored):
    """A setting that changes training, set here (not left to the run), that the stored
    run has with another value (paths compared as absolute paths)."""
    if key not in SETTINGS or SETTINGS[key].live or value is None or key not in stored:
        return False
    if key in ("data_root", "split_dir", "pretrained") and stored[key] is not None:
        return os.path.abspath(str(value)) != os.path.abspath(str(stored[key]))
    return value != stored[key]


def resumed_config(cfg, given, stored, origin, log):
    """The stored run's settings with the harmless flags the user gave (logged); a flag
    that would change training is an error naming both values."""
    # keys a run of an older version did not store keep today's values
    resumed = {**cfg, **{key: value for key, value in stored.items() if key not in DERIVED}}
    errors = []
    for key, value in given.items():
        if differs(key, value, stored):
            errors.append(f"{flag_name(key)} {value} differs from the run's {flag_name(key)} {stored[key]} "
                          f"({origin}); a resumed run keeps its settings: drop the flag, or start a new "
                          "run with another --out")
            continue
        if key in stored and stored[key] != value and key not in ("out", "resume", "print_config"):
            log(f"resume: {flag_name(key)} {stored[key]} -> {value} (does not change training)")
        resumed[key] = value
    # the run continues where it was found (--resume auto: --out, else the checkpoint's folder)
    if "out" not in given:
        resumed["out"] = cfg["out"] if cfg["resume"] == "auto" else os.path.dirname(origin) or "."
    return resumed, errors


def stored_config(path):
    """The settings stored at path (a run's config.json, or a checkpoint's), or None."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception:
        return None


def occupied_out_error(cfg):
    """A new run must not take over a directory that holds a run (last.pt): say whether it
    is this run (continue it with --resume auto) or one with other settings (which)."""
    out = cfg["out"]
    if not os.path.exists(os.path.join(out, "last.pt")):
        return []
    stored = (stored_config(os.path.join(out, "config.json"))
              or stored_config(os.path.join(out, "last.pt")) or {})
    differences = [f"{flag_name(key)} {'unset' if stored[key] is None else stored[key]} there, "
                   f"{value} here" for key, value in cfg.items() if differs(key, value, stored)]
    if differences:
        return [f"--out {out} already holds a run with other settings ({'; '.join(differences)}); choose "
                "another --out, or continue that run with --resume auto (it keeps its own settings)"]
    return [f"--out {out} already holds this run (last.pt); continue it with --resume auto, or "
            "choose another --out"]


def describe_config(cfg, ctx):
    """The config summary: one line per section of SETTINGS (those the method does not use
    left out), then the schedule the run worked out. The full set is in config.json."""
    unused = {"supervised": ("unlabeled", "prototypes"), "meanteacher": ("prototypes",)}
    sections = {}
    for key, setting in SETTINGS.items():
        value = cfg[key]
        if setting.section not in unused.get(cfg["method"], ()) and value is not None and value is not False:
            sections.setdefault(setting.section, []).append(f"{key.replace('_', ' ')} {value}")
    semi = cfg["method"] != "supervised"
    return [f"{section}: {', '.join(items)}" for section, items in sections.items()] + [
        f"schedule: {plural(cfg['total_iters'], 'iteration')} = {plural(cfg['total_epochs'], 'epoch')} "
        f"of {cfg['iters_per_epoch']}" + (f", the first {cfg['warmup_iters']} supervised" if semi else "")
        + f" | {plural(ctx.world, 'process')} on {ctx.device if ctx.world == 1 else ctx.device.type}, "
        f"{cfg['local_batch']}" + (f" + {cfg['local_batch']}" if semi else "") + " images each | OHEM "
        f"min kept {cfg['ohem_min_kept_per_image']} x {cfg['local_batch']} = "
        f"{ohem_min_kept(cfg, cfg['local_batch'])} per process"]


# ---------------- The process: who am I, logging, errors

def pick_device(flag, local_rank=0):
    """--device 'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device (plain 'cuda' and 'auto'
    take cuda:LOCAL_RANK under torchrun), made current; a bad value is a SetupError."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SetupError(f"--device {flag!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {flag}, but no CUDA device is visible")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()  # (torchrun: a process per GPU, LOCAL_RANK's)
            raise SetupError(f"--device {flag}: there is no {device} ({count} visible)" + (
                f"; start at most {plural(count, 'process')} per node" if local_rank >= count else ""))
        torch.cuda.set_device(device)
    return device


class Context:
    """Who am I in the job: rank, world size, device; rank 0 alone prints and writes files.
    Built before anything is checked or written; connect() joins the process group once
    the setup checks have passed, so that a bad flag stops every process at once."""

    def __init__(self, device_flag):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.main, self.log_file, self.unwritten = self.rank == 0, None, []
        self.device = pick_device(device_flag, int(os.environ.get("LOCAL_RANK", "0")))

    def connect(self):
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))

    def open_log(self, out):
        """Make the run directory OUT (a failure is a SetupError) and append to OUT/log.txt from
        now on, starting with the lines logged before it was open."""
        if self.main:
            try:
                os.makedirs(out, exist_ok=True)
                self.log_file = open(os.path.join(out, "log.txt"), "a")
            except OSError as e:
                raise SetupError(f"--out {out}: cannot write the run directory: {e}")
            self.write(*self.unwritten)

    def write(self, *lines):
        """Lines for log.txt alone (once it is open), such as errors printed to stderr."""
        if self.log_file is not None:
            self.log_file.write("".join(line + "\n" for line in lines))
            self.log_file.flush()

    def log(self, *parts):
        if self.main:
            line = " ".join(str(p) for p in parts)
            print(line, flush=True)
            self.write(line) if self.log_file else self.unwritten.append(line)


def exit_process(code):
    """sys.exit(code) after leaving the process groups. Before torch 2.8, destroying a gloo group
    can deadlock (one of its threads needs the GIL it holds: pytorch/pytorch#154976, seen on 2.4),
    so there the process leaves by os._exit, its output flushed (log.txt is, line by line)."""
    if dist.is_available() and dist.is_initialized():
        if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 8):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
    sys.exit(code)


def last_line(error):
    # a DataError raised in a loader worker arrives wrapped in a traceback: keep its last line
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def report_errors(errors, ctx, out):
    """Every setup problem found, one 'error:' line each, also appended to the run's log.txt if it
    exists (else nothing is written). Exit code 2. As the processes mostly find the same problems,
    rank 0 reports first: another process waits 10 s, as its exit would stop rank 0 (torchrun)."""
    if not ctx.main:
        time.sleep(10)
    for error in errors:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if ctx.log_file is None and os.path.exists(os.path.join(out, "log.txt")):
        ctx.open_log(out)
    ctx.write(*(f"error: {error}" for error in errors))
    return 2


def stop_on_bad_file(error, it, parts, best, step_rng, cfg, ctx):
    """A listed file that fails during training (changed on disk since the check): write
    last.pt (one process: saving needs every process), name the file, exit code 2."""
    message = last_line(error).split("DataError: ", 1)[-1]  # (raised in a loader worker)
    if ctx.world == 1:
        save_checkpoint("last.pt", it, parts, best, step_rng, cfg, ctx)
        saved = f"saved {cfg['out']}/last.pt at iteration {it}"
    else:
        saved = f"{cfg['out']}/last.pt from the last save is kept"
    print(f"error: {message} (iteration {it}, process {ctx.rank}); {saved}: replace the file or "
          "drop it from the lists, then continue with --resume auto", file=sys.stderr, flush=True)
    return 2


def report_out_of_memory(cfg, ctx, it, semi):
    """The first semi-supervised iteration (the teacher pass, twice the student batch) is
    where a setting that fit the warm-up runs out: say what to change. Exit code 4."""
    print(f"error: out of {ctx.device.type.upper()} memory at iteration {it} on process "
          f"{ctx.rank} ({'semi-supervised' if semi else 'supervised'} step, "
          f"{cfg['local_batch']} + {cfg['local_batch'] if semi else 0} images of "
          f"{cfg['crop_size']} px per process, --amp {cfg['amp']}). Use --amp bf16, "
          + ("" if cfg["checkpoint_activations"] else "--checkpoint-activations, ")
          + f"more processes (torchrun; --batch-size is global) or a smaller --batch-size / "
          f"--crop-size; {cfg['out']}/last.pt, if any, resumes with --resume auto.",
          file=sys.stderr, flush=True)
    return 4


class StopVote:
    """Whether any process got SIGINT / SIGTERM, agreed by all processes, checked every iteration without a
    host-device sync: each iteration every process launches an asynchronous all-reduce (MAX) of its own flag,
    a CPU tensor on a gloo group, and reads the result launched the iteration before, which has long arrived.
    All processes read the same results at the same iterations: they stop together, within two iterations."""

    def __init__(self, received, world):
        self.received, self.world, self.pending = received, world, None
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def __call__(self):
        if self.world == 1:
            return bool(self.received)
        stop = self.close()
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        self.pending = dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group, async_op=True), flag
        return stop

    def close(self):
        """Waits for the vote in flight; returns whether it says stop."""
        if self.pending is None:
            return False
        (work, flag), self.pending = self.pending, None
        work.wait()
        return bool(flag.item())  # a CPU tensor: no device sync


# ---------------- Building: data, models, optimizer; the data check

def build_everything(cfg, ctx, resuming=False):
    """Data, student, teacher, prototype bank, optimizer, scaler (setup_errors has checked the weights)."""
    # resumed: no ImageNet weights needed, the same deep-stem network takes every weight from the checkpoint
    pretrained = "none" if resuming and cfg["pretrained"] != "torchvision" else cfg["pretrained"]
    data = data_lib.build_data(cfg["dataset"], cfg["data_root"], cfg["num_classes"], cfg["labeled"],
                               cfg["split_dir"], cfg["seed"], cfg["crop_size"],
                               out_dir=cfg["out"] if ctx.main else None, log=ctx.log)
    cfg["num_classes"] = data.num_classes
    torch.manual_seed(cfg["seed"])
    student = build_model(data.num_classes, cfg["backbone"], cfg["output_stride"], cfg["aux_weight"] > 0,
                          pretrained=pretrained, width=cfg["width"]).to(ctx.device)
    if ctx.device.type == "cuda":
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    # (True/False: the switch of runs before 'auto')
    on = cfg["channels_last"] in ("on", True) or (cfg["channels_last"] == "auto" and ctx.device.type == "cpu")
    ctx.memory_format = torch.channels_last if on else torch.contiguous_format
    student = student.to(memory_format=ctx.memory_format)
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if cfg["method"] != "supervised" else None
    student.checkpoint_activations = cfg["checkpoint_activations"]  # not the teacher's: no backward
    # own random stream, so that pcr, meanteacher and supervised share the warm-up exactly
    bank = None if cfg["method"] != "pcr" else PrototypeBank(
        data.num_classes, cfg["num_prototypes"], student.feature_dim, cfg["proto_momentum"],
        cfg["temperature"], generator=torch.Generator().manual_seed(cfg["seed"] + 1)).to(ctx.device)
    optimizer, scaler = make_optimizer(student, cfg, ctx.device)
    return data, student, teacher, bank, optimizer, scaler


def make_optimizer(student, cfg, device):
    """SGD over the backbone / head parameter groups (each remembers its base_lr for the
    poly schedule) and the GradScaler that guards every step."""
    # fused SGD skips a step with non-finite gradients on the device, without a host sync
    groups = param_groups(student, cfg["lr"], cfg["lr"] * cfg["head_lr_mult"])
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"], fused=True)
    # Zero momentum buffers up front: fused SGD otherwise allocates them uninitialised on its first step and
    # fills them in the kernel, which a non-finite first step (the rule under fp16's high first loss scale)
    # skips, leaving garbage for every later step. From zero, the first real step gives buf = grad.
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    # fp16 needs loss scaling; for bf16/fp32 a scale of 1 just detects non-finite steps
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if cfg["amp"] == "fp16" else 1.0,
                                  growth_interval=2000 if cfg["amp"] == "fp16" else 2**30)
    return optimizer, scaler


def check_data_before_training(data, cfg, ctx):
    """Rank 0 decodes every listed file (data.check_data, recorded in OUT/data_check.json);
    the other processes wait for its verdict. A bad file is the same DataError on every process
    (report_errors lets rank 0 print it first: the others would only repeat it)."""
    if data_lib.DATASETS[data.name].generated:
        return
    if cfg["skip_data_check"]:
        ctx.log("data check: skipped (--skip-data-check)")
        return
    verdict = [None]  # rank 0's error message
    if ctx.main:
        try:
            data_lib.check_data(data, cfg["workers"], ctx.log, os.path.join(cfg["out"], "data_check.json"))
        except data_lib.DataError as e:
            verdict[0] = str(e)
    if ctx.world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise data_lib.DataError(verdict[0])


# ---------------- Data order: the keys (index, seed) of every iteration are a pure function of (seed,
# iteration), and a sample of its key: any number of workers gives the same run, and a resumed run
# continues with exactly the batches it would have seen.

class TrainKeys(torch.utils.data.Sampler):
    """Endless (index, seed) keys for this process, from iteration start_iter on. An epoch has
    iters_per_epoch iterations of global_batch images, in a random permutation of the dataset
    (concatenated permutations when the dataset is smaller: the labeled set is repeated to the length of
    the unlabeled epoch). Process r of w takes every w-th image of each global batch."""

    def __init__(self, num_items, global_batch, iters_per_epoch, seed, stream, rank, world, start_iter):
        self.n, self.batch, self.ipe, self.start_iter = num_items, global_batch, iters_per_epoch, start_iter
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world

    def __iter__(self):
        it, needed = self.start_iter, self.ipe * self.batch
        while True:
            epoch = it // self.ipe
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            order = np.concatenate([rng.permutation(self.n) for _ in range(-(-needed // self.n))])
            seeds = rng.integers(0, 2**31 - 1, needed)
            for i in range(it - epoch * self.ipe, self.ipe):
                for j in range(i * self.batch + self.rank, (i + 1) * self.batch, self.world):
                    yield int(order[j]), int(seeds[j])
            it = (epoch + 1) * self.ipe


def detach_worker(worker_id):
    """Ctrl-C and torchrun's SIGTERM (killpg) reach the whole process group: the workers leave it, so that
    they keep loading while the trainer finishes the iteration and saves (a killed worker would crash the
    trainer). (SIGTERM keeps its default: Python's exit handler stops daemon workers with it.)"""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def next_batch(loaders, data, cfg, ctx, it, semi):
    """The iteration's labeled batch, and in the semi-supervised phase the unlabeled one, on
    the device. A loader (random stream 0: labeled, 1: unlabeled) starts at its first batch."""
    names = ("labeled", "unlabeled") if semi else ("labeled",)
    for stream, name in enumerate(names):
        if name not in loaders:
            dataset, workers = getattr(data, name), cfg["workers"]
            keys = TrainKeys(len(dataset), cfg["batch_size"], cfg["iters_per_epoch"], cfg["seed"], stream,
                             ctx.rank, ctx.world, start_iter=it)
            loaders[name] = iter(torch.utils.data.DataLoader(
                dataset, batch_size=cfg["local_batch"], sampler=keys, num_workers=workers,
                pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None, drop_last=True, worker_init_fn=detach_worker,
                # its own generator: creating the iterator draws a seed, which must not come from
                # the global RNG (dropout's), or a resumed run would diverge from an uninterrupted one
                generator=torch.Generator().manual_seed(cfg["seed"])))
    batch = {name: [x.to(ctx.device, non_blocking=True) for x in next(loaders[name])] for name in names}
    for x in batch.values():
        x[0] = x[0].contiguous(memory_format=ctx.memory_format)
    return batch


# ---------------- Checkpoints: written atomically; last.pt keeps its predecessor as last.prev.pt

def load_checkpoint(path, flag="--resume"):
    """Read a checkpoint written by this script; a missing file is a SetupError, a damaged
    one a CheckpointError, each naming the flag and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SetupError(f"{flag}: checkpoint {path} does not exist")
    except Exception as e:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}")


def find_resume_checkpoint(cfg, ctx):
    """--resume auto: OUT/last.pt, falling back to the previous one if it is damaged."""
    if cfg["resume"] != "auto":
        return load_checkpoint(cfg["resume"]), cfg["resume"]
    candidates = [p for p in (os.path.join(cfg["out"], n) for n in ("last.pt", "last.prev.pt"))
                  if os.path.exists(p)]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            ctx.log(f"warning: {e}" + ("; falling back to the previous checkpoint"
                                        if i + 1 < len(candidates) else ""))
    if candidates:
        raise SetupError(f"--resume: no readable checkpoint among {candidates}; delete them to start over")
    ctx.log(f"resume: no checkpoint in {cfg['out']}, starting from scratch")
    return None, None


def save_checkpoint(name, it, parts, best, step_rng, cfg, ctx):
    """Gather every process's RNG state, then rank 0 writes OUT/name through a temporary file, renamed (a
    crash never leaves half a file), unless the student holds non-finite values."""
    state = {"torch": torch.get_rng_state(), "step": step_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    states = [state] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, state)
    if not ctx.main:
        return
    weights = [v for v in parts["student"].state_dict().values() if v.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(v).all() for v in weights]).all()):  # one sync
        ctx.log(f"warning: the student holds non-finite values at iteration {it}; {name} "
                "not written, so the last good checkpoint stays")
        return
    ckpt = {"config": cfg, "iter": it, "best": best, "rng": states,
            **{key: None if part is None else part.state_dict() for key, part in parts.items()}}
    path = os.path.join(cfg["out"], name)
    if name == "last.pt" and os.path.exists(path):
        os.replace(path, os.path.join(cfg["out"], "last.prev.pt"))
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def resume(ckpt, path, parts, step_rng, ctx):
    """Load the checkpoint into every part; returns (start iteration, best evaluation)."""
    if ckpt is None:
        return 0, {"miou": -1.0, "iter": -1}
    try:
        for key, part in parts.items():
            if part is not None and ckpt.get(key) is not None:
                part.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError, KeyError) as e:
        saved = ckpt.get("config", {})
        raise SetupError(f"--resume {path}: the checkpoint does not fit this run (it was --method "
                         f"{saved.get('method')} --backbone {saved.get('backbone')} --width "
                         f"{saved.get('width')} with {saved.get('num_classes')} classes): "
                         f"{str(e).strip().splitlines()[0]}")
    if len(ckpt["rng"]) == ctx.world:
        state = ckpt["rng"][ctx.rank]
        torch.set_rng_state(state["torch"])
        step_rng.set_state(state["step"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    else:
        ctx.log(f"resume: the checkpoint was written by {len(ckpt['rng'])} processes, this run "
                f"has {ctx.world}: random streams restart (the run is not bit-exact)")
    ctx.log(f"resume: {path} at iteration {ckpt['iter']}")
    return ckpt["iter"], ckpt["best"]


# ---------------- Across processes and the health of a step

@torch.no_grad()
def average_buffers(module, ctx):
    """Replace the floating-point buffers (BN running statistics) by their mean over processes.
    Plain BatchNorm (CPU; CUDA uses SyncBatchNorm) updates its statistics from the local
    batch only, so they drift apart between processes, and so would the teacher, their
    EMA, and its evaluation. Mean of running means = running mean of the global batch."""
    buffers = [b for b in module.buffers() if b.dtype.is_floating_point]
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= ctx.world
    for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(mean.view_as(buffer))


@torch.no_grad()
def restore_buffers_if(bad, buffers, saved):
    """buffers <- saved (their flat copy from before the step) where the 0-dim bool `bad`, without a
    host sync: the forward pass updated the BN statistics before the loss was known, with NaN if any."""
    kept = torch.where(bad, saved, torch.cat([b.reshape(-1) for b in buffers]))
    torch._foreach_copy_(buffers, [v.view_as(b) for v, b in
                                   zip(kept.split([b.numel() for b in buffers]), buffers)])


# ---------------- Progress: loss means, speed, ETA; evaluation records

class Progress:
    """The progress line's numbers. add() keeps the loss sums and non-finite streaks on the device (no host
    sync); take() reads them back, once per --log-every. The clock counts training only: the k-means and the
    evaluations run inside pause(), which times the evaluations for the ETA. The ETA prices the warm-up and
    semi-supervised iterations left each at its measured duration, plus the evaluations left. A
    semi-supervised iteration not yet measured is guessed at SEMI_COST_GUESS warm-up ones (twice the
    student's images and the teacher's pass; measured 1.8-2.1x at the paper's scale, 2-3x at the toy's)."""
    SEMI_COST_GUESS = 2.5

    def __init__(self, cfg, start_iter, device, clock=time.monotonic):
        self.cfg, self.device, self.clock, self.count = cfg, device, clock, 0  # count: add()s since take()
        self.sums = torch.zeros(len(LOSS_TERMS) + 1, device=device)  # loss terms, non-finite steps
        # non-finite steps in a row, the longest such run, the last bad iteration; which terms were bad there
        self.streak, self.longest, self.bad_iter = torch.zeros(3, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(LOSS_TERMS), device=device)
        # training seconds and iterations of the warm-up and the semi-supervised phase; seconds and images
        # since the last speed(); seconds and number of the evaluations
        self.seconds, self.iters, self.interval, self.evals = [0.0, 0.0], [0, 0], [0.0, 0], [0.0, 0]
        self.mark, self.mark_iter = clock(), start_iter  # the time since then is not counted yet

    def add(self, terms, finite, it):
        values = torch.stack([terms[k].detach().float() if k in terms else self.sums.new_zeros(())
                              for k in LOSS_TERMS])
        self.sums += torch.cat([torch.nan_to_num(values * finite, nan=0.0, posinf=0.0, neginf=0.0),
                                (~finite).float().view(1)])
        self.streak = torch.where(finite, 0, self.streak + 1)
        self.longest = torch.maximum(self.longest, self.streak)
        self.bad_iter = torch.where(finite, self.bad_iter, it)
        self.bad_terms = torch.where(finite, self.bad_terms, (~torch.isfinite(values)).float())
        self.count += 1

    def take(self, world):
        """(mean loss terms over the global batch, non-finite steps, longest non-finite run,
        last bad iteration, which terms were non-finite there) since the last call."""
        if world > 1:  # a NaN on one process stops all of them together
            dist.all_reduce(self.longest, op=dist.ReduceOp.MAX)
            dist.all_reduce(self.sums)
            self.sums[:-1] /= world  # losses averaged, non-finite steps summed
        sums, count, self.count = self.sums.tolist(), max(self.count, 1), 0
        result = ([s / count for s in sums[:-1]], int(sums[-1]), int(self.longest), int(self.bad_iter),
                  self.bad_terms.tolist())
        self.sums.zero_()
        self.longest.zero_()
        return result

    def lap(self, done, evaluation=False):
        """The time since the mark was an evaluation, or iterations mark_iter..done-1 (of one phase)."""
        now = self.clock()
        seconds, iters, semi = now - self.mark, done - self.mark_iter, int(
            self.cfg["method"] != "supervised" and self.mark_iter >= self.cfg["warmup_iters"])
        if evaluation:
            self.evals = [self.evals[0] + seconds, self.evals[1] + 1]
        elif iters > 0:
            self.seconds[semi] += seconds
            self.iters[semi] += iters
            images = iters * self.cfg["batch_size"] * (1 + semi)
            self.interval = [self.interval[0] + seconds, self.interval[1] + images]
        self.mark, self.mark_iter = now, done

    @contextmanager
    def pause(self, done, evaluation=False):
        """The time spent inside is not training time; an evaluation's is measured for the ETA."""
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else lambda device: None
        synchronize(self.device)  # the queued iterations count as training
        self.lap(done)
        yield
        synchronize(self.device)
        self.lap(done, evaluation)

    def speed(self, done):
        """Images per second of training since the last call."""
        self.lap(done)
        (seconds, images), self.interval = self.interval, [0.0, 0]
        return images / max(seconds, 1e-9)

    def eta(self, done):
        """(seconds left, evaluations left out because none has been measured yet)."""
        total, every, (eval_seconds, evals) = self.cfg["total_iters"], self.cfg["eval_every"], self.evals
        warmup_left = max(0, (total if self.cfg["method"] == "supervised" else self.cfg["warmup_iters"]) - done)
        per = [s / n if n else None for s, n in zip(self.seconds, self.iters)]
        per_warmup = per[0] if per[0] is not None else (per[1] or 0.0) / self.SEMI_COST_GUESS
        per_semi = per[1] if per[1] is not None else per_warmup * self.SEMI_COST_GUESS
        seconds = warmup_left * per_warmup + (total - done - warmup_left) * per_semi
        # evaluations at done..total (the one at done runs after its progress line)
        left = total // every - (done - 1) // every + (total % every > 0) if done <= total else 0
        return (seconds + left * eval_seconds / evals, 0) if evals else (seconds, left)


def plural(count, word):
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def log_progress(progress, optimizer, cfg, ctx, it, semi):
    """The progress line (losses, lr, speed, ETA). Returns False, having said why, when the
    loss was non-finite for five iterations in a row: the run must stop."""
    done = it + 1
    means, skipped, longest, bad_iter, bad_terms = progress.take(ctx.world)
    if longest >= 5:
        bad = [n for n, b in zip(LOSS_TERMS, bad_terms) if b]
        ctx.log(f"error: the loss was non-finite for {longest} iterations in a row, last at iteration "
                f"{bad_iter} (terms: {', '.join(bad) or 'total'}). Stopping without saving; the last good "
                f"checkpoint is {cfg['out']}/last.pt. Try a lower --lr or --amp bf16/none.")
        return False
    speed = progress.speed(done)
    eta, evaluations_left_out = progress.eta(done)
    shown = LOSS_TERMS if cfg["method"] == "pcr" else LOSS_TERMS[:2]
    losses = " ".join(f"{k} {m:.4f}" for k, m in zip(LOSS_TERMS, means) if k in shown[:3 if semi else 1])
    ctx.log(f"it {done}/{cfg['total_iters']} | ep {it // cfg['iters_per_epoch']} | {losses} | "
            f"lr {optimizer.param_groups[0]['lr']:.2e} | {speed:.1f} img/s | eta {format_eta(eta)}"
            + (f" + {plural(evaluations_left_out, 'evaluation')}" if evaluations_left_out else "")
            + (f" | skipped {skipped}" if skipped else ""))
    return True


def run_evaluation(student, teacher, bank, data, cfg, ctx, semi):
    """Teacher (student before the semi-supervised phase), linear and prototype heads."""
    model = teacher if semi else student  # (semi: a method with a teacher)
    was_training = model.training
    model.eval()
    results = evaluate_lib.evaluate(
        model, data.val, data.num_classes, ctx.device, mode=cfg["eval_mode"], crop_size=cfg["crop_size"],
        heads=("linear", "proto") if semi and bank is not None else ("linear",), bank=bank,
        amp=None if cfg["amp"] == "none" else cfg["amp"], rank=ctx.rank, world_size=ctx.world, log=ctx.log)
    model.train(was_training)
    return results


def record_evaluation(results, best, data, cfg, ctx, it, semi):
    """Per-class IoU table and a summary line, one JSON line in metrics.jsonl; `best` is
    updated when the linear head's mIoU is the best so far. Returns the metrics."""
    done, linear = it + 1, results["linear"]
    if linear["miou"] > best["miou"]:
        best.update(miou=linear["miou"], iter=done)
    metrics = {"iter": done, "epoch": it // cfg["iters_per_epoch"], "model": "teacher" if semi else "student",
               "miou": linear["miou"], "pixel_acc": linear["pixel_acc"], "mean_acc": linear["mean_acc"],
               "iou": linear["iou"], "miou_proto": results["proto"]["miou"] if "proto" in results else None,
               "best_miou": best["miou"]}
    ctx.log(evaluate_lib.format_table(linear, data.class_names))
    ctx.log(f"eval it {done}: mIoU {linear['miou']:.2f}" + (f" | prototype head {metrics['miou_proto']:.2f}"
            if "proto" in results else "") + f" | best {best['miou']:.2f} (it {best['iter']})")
    if ctx.main:
        with open(os.path.join(cfg["out"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
    return metrics


if __name__ == "__main__":
    exit_process(main())
