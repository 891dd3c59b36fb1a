"""PCR: semi-supervised semantic segmentation with prototype-based consistency regularization.

Xu, Liu, Bian, Yang, NeurIPS 2022 (arXiv 2210.04388). The algorithm, step by step, is in
docs/METHOD.md; this file follows its section 3 from top to bottom.

Toy run on the CPU (embedded data, no download, a few minutes):
    python train.py

One GPU, the paper's VOC 366 experiment (global batch 16 + 16 on one card):
    python train.py --dataset voc --data-root data/VOC2012 --labeled 366

One node, 4 GPUs (16 + 16 split as 4 + 4 per GPU):
    torchrun --standalone --nproc_per_node=4 train.py --dataset voc --data-root data/VOC2012 --labeled 366

Two nodes with 4 GPUs each (run on every node; the endpoint is node 0's address):
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=pcr train.py --dataset cityscapes --data-root data/cityscapes --labeled 744

Each run lives in --out (default runs/DATASET_LABELED_METHOD_sSEED, e.g. runs/toy_16_pcr_s0).
An interrupted run continues with `--resume auto` (same --out, or the same flags that named
it): every setting comes from the checkpoint, and a flag that would change training stops
the resume, naming the flag and both values.
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


# The loss terms, in the order the progress line shows them (L = their sum, step 8).
LOSS_TERMS = ("sup", "unsup", "proto")


# Paper settings (docs/METHOD.md section 5) plus the toy default. Flags override any entry.
# batch_size is the GLOBAL labeled batch; the unlabeled batch has the same size.
PRESETS = {
    "toy": dict(backbone="resnet18", width=0.25, pretrained="none", output_stride=8, crop_size=64,
                batch_size=8, epochs=30, lr=0.01, head_lr_mult=1.0,
                weight_decay=1e-4, num_prototypes=4, conf_threshold=0.8, aux_weight=0.0,
                labeled=data_lib.TOY_LABELED, eval_mode="whole", eval_every=600),
    "voc": dict(backbone="resnet101", pretrained="pretrained/resnet101.pth", output_stride=8,
                crop_size=513, batch_size=16, epochs=80, lr=0.001, head_lr_mult=10.0,
                weight_decay=1e-4, num_prototypes=4, conf_threshold=0.8, aux_weight=0.0,
                labeled=366, eval_mode="whole", eval_every=None),
    "cityscapes": dict(backbone="resnet101", pretrained="pretrained/resnet101.pth",
                       output_stride=8, crop_size=769, batch_size=16, epochs=200, lr=0.01,
                       head_lr_mult=1.0, weight_decay=5e-4, num_prototypes=3,
                       conf_threshold=0.65, aux_weight=0.4, labeled=744,
                       eval_mode="sliding", eval_every=None),
    # users' own data in VOC layout, usually tens to thousands of images: VOC's optimiser
    # recipe on a lighter network whose ImageNet weights torchvision downloads by itself
    # (resnet50, 7x7 stem, output stride 16, crop 321, batch 8 + 8). For the paper's network,
    # pass VOC's settings (--backbone resnet101 --pretrained pretrained/resnet101.pth
    # --output-stride 8 --crop-size 513 --batch-size 16).
    "folder": dict(backbone="resnet50", pretrained="torchvision",
                   output_stride=16, crop_size=321, batch_size=8, epochs=80, lr=0.001,
                   head_lr_mult=10.0, weight_decay=1e-4, num_prototypes=4,
                   conf_threshold=0.8, aux_weight=0.0, labeled=None, eval_mode="whole",
                   eval_every=None),
}


# Settings shared by every dataset (docs/METHOD.md section 3).
COMMON = dict(width=1.0, warmup_epochs=1, momentum=0.9, poly_power=0.9, ohem_thresh=0.7,
              ohem_min_kept_per_image=50000, drop_start=0.2, cutmix_prob=0.5, unsup_weight=1.0,
              proto_weight=1.0, temperature=0.1, proto_momentum=0.99, grid=32, ema_decay=0.99)


# ========================================================================================
# THE METHOD: docs/METHOD.md sections 3 and 4, in the order of the steps. Losses, schedules,
# one training iteration (steps 2-10) and the prototype initialisation that opens the
# semi-supervised phase. Everything after the PLUMBING banner below only runs it.
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Losses (steps 5-7; the prototype loss is prototypes.prototype_loss). Each returns a scalar
# float32 tensor and never syncs with the host: counts stay tensors, empty selections
# give 0, not NaN.

def ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100000):
    """Online hard example mining CE (step 5).

    p_i = softmax(logits)_i[target_i] for valid pixels (target != 255).
    If #valid < min_kept every valid pixel is kept; otherwise pixels with
    p_i <= max(thresh, p_(min_kept)) are kept, p_(k) being the k-th smallest p.
    L = sum_{kept} -log p_i / #kept.
    logits (B, K, H, W), target (B, H, W).
    """
    logits = logits.float()
    valid = target != IGNORE
    safe_target = torch.where(valid, target, 0)
    log_prob = F.log_softmax(logits, dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
    prob = torch.where(valid, log_prob.exp(), 1.0).flatten()  # invalid pixels sort last
    num_valid = valid.sum()
    k = min(min_kept, prob.numel())
    kth_smallest = prob.kthvalue(k).values
    threshold = torch.where(num_valid < min_kept, math.inf,
                            torch.clamp(kth_smallest, min=thresh))
    kept = valid & (prob.view_as(valid) <= threshold)
    return -(log_prob * kept).sum() / kept.sum().clamp(min=1)


def ohem_min_kept(cfg, num_labeled):
    """OHEM's min_kept for a process holding num_labeled labeled images: 50000 per image.
    The reference ran min_kept = 100000 per process with 2 labeled images per GPU; scaling
    with the images keeps its kept share (~19% at crop 513) on any number of processes."""
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
    logits (B, K, H, W), pseudo_label / entropy (B, H, W).
    """
    valid = pseudo_label != IGNORE
    num_valid = valid.sum()
    # entropies in ascending order with the invalid pixels first (as -inf); the threshold
    # is the first dropped value, found by index arithmetic instead of a host-side count
    flat = torch.where(valid, entropy, -math.inf).flatten()
    ordered = flat.sort().values
    num_keep = torch.floor(num_valid * (1.0 - drop_fraction)).long()
    first_dropped = (flat.numel() - num_valid + num_keep).clamp(max=flat.numel() - 1)
    # gather, not ordered[first_dropped]: indexing by a 0-dim tensor reads it on the host
    first_dropped_value = ordered.gather(0, first_dropped.reshape(1)).squeeze(0)
    threshold = torch.where(num_keep >= num_valid, math.inf, first_dropped_value)
    kept = valid & (entropy < threshold)
    nll = F.cross_entropy(logits.float(), torch.where(kept, pseudo_label, 0), reduction="none")
    num_kept = kept.sum().clamp(min=1)
    return (nll * kept).sum() / num_kept * (kept.numel() / num_kept)


# ----------------------------------------------------------------------------------------
# Schedules: the entropy drop (step 6), the learning rate (step 8), the teacher (step 10)

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
    t_state, s_state = teacher.state_dict(), student.state_dict()
    floats = [k for k, v in t_state.items() if v.dtype.is_floating_point]
    torch._foreach_lerp_([t_state[k] for k in floats], [s_state[k] for k in floats], 1.0 - alpha)
    for k, v in t_state.items():
        if not v.dtype.is_floating_point:  # BN's num_batches_tracked
            v.copy_(s_state[k])


@torch.no_grad()
def teacher_update(teacher, student, t, cfg):
    """Step 10 after t semi-supervised iterations (0 = the first one). During the first
    semi-supervised epoch (t < iters_per_epoch) the teacher IS the student: its state is
    copied, as the reference copies the student's parameters into the teacher at every
    iteration of that epoch. Afterwards: EMA with alpha = min(1 - 1/(t + 1), ema_decay)."""
    if t < cfg["iters_per_epoch"]:
        torch._foreach_copy_(list(teacher.state_dict().values()), list(student.state_dict().values()))
    else:
        ema_update(teacher, student, ema_alpha(t, cfg["ema_decay"]))


# ----------------------------------------------------------------------------------------
# One iteration (steps 2-10)

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
    drop = drop_fraction_at(epoch, cfg["epochs"], cfg["drop_start"])
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
        target_u = torch.where(confidence[:, ys, xs] >= cfg["conf_threshold"],
                               pseudo_label[:, ys, xs], IGNORE)
        target = torch.cat([target_l, target_u]).flatten()  # (B*P,)
    with record_function("prototype logits"):
        prototype_logits, nearest = bank(point_feature)  # pre-update prototypes
    with record_function("prototype loss"):
        terms["proto"] = cfg["proto_weight"] * prototype_loss(prototype_logits, target)
    return terms, (point_feature.detach(), target, nearest)


def train_iteration(batch, models, optimizer, scaler, cfg, ctx, it, step_rng, semi):
    """Steps 2-10: train_step (2-7), then step 8's learning rate, backward and SGD step,
    the prototype update (9) and the teacher update (10).
    Returns the loss terms and `finite` (0-dim bool on the device). A non-finite loss
    leaves no trace: the scaler skips the step, the BN statistics that the forward pass
    updated are restored, and no pixel reaches the prototypes. No host sync."""
    model, teacher, bank = models
    student = unwrap(model)
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


# ----------------------------------------------------------------------------------------
# Prototype initialisation and the start of the semi-supervised phase (section 4)

@torch.no_grad()
def labeled_features(model, dataset, cfg, ctx, max_per_class=3000):
    """Student features (D-dim) and labels at grid-sampled pixels of the labeled images.

    Every process reads its share of the images; the result is gathered on all processes,
    then at most max_per_class pixels per class are kept at random.
    """
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
        images = torch.stack(images).to(ctx.device)
        masks = torch.stack(masks).to(ctx.device)
        with autocast(cfg["amp"], ctx.device):
            _, feature, _ = model(images)
        ys, xs = sample_points(crop, crop, grid, generator=gen, device=ctx.device)
        feats.append(sample_features(feature.float(), ys, xs, (crop, crop)).flatten(0, 1))
        labels.append(masks[:, ys, xs].flatten())
    model.train(was_training)
    dim = model.feature_dim
    feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=ctx.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=ctx.device)
    if ctx.world > 1:  # pad to equal length with ignored rows, then gather
        size = torch.tensor([len(labels)], device=ctx.device)
        sizes = [torch.zeros_like(size) for _ in range(ctx.world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
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


# ========================================================================================
# PLUMBING: flags, the data order, processes, checkpoints, progress, building and recording.
# None of it is needed to understand PCR; it makes the method above run, resume and report.
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Flags and their checks

# Flags whose default is neither a preset entry nor derived from the run.
FLAG_DEFAULTS = dict(dataset="toy", method="pcr", save_every=0, log_every=20, seed=0,
                     workers=min(4, os.cpu_count() or 1), device="auto", amp="none",
                     channels_last=False, print_config=False, skip_data_check=False)


def preset_help(key):
    """' (preset: toy 64, voc 513, ...)' from PRESETS, or ' (default: X)' when every preset
    (or COMMON) agrees, so that --help tells what a flag left out becomes."""
    values = {name: preset.get(key, COMMON.get(key)) for name, preset in PRESETS.items()
              if key in preset or key in COMMON}
    if not values:
        return ""
    if len(set(map(repr, values.values()))) == 1:
        return f" (default: {next(iter(values.values()))})"
    groups = {}  # value -> datasets, in PRESETS order
    for name, value in values.items():
        groups.setdefault(repr(value), (value, []))[1].append(name)
    shown = "; ".join(f"{', '.join(names)} {value}" for value, names in groups.values())
    return f" (preset: {shown})"


def parse_args(argv=None):
    """Every flag parses to None when left out, so that resolve_config (and a resumed run)
    can tell the flags the user gave from the defaults; the defaults are in --help."""
    p = argparse.ArgumentParser(description="PCR trainer (see the module docstring for launch commands)")

    def a(flag, help, **kwargs):
        key = flag[2:].replace("-", "_")
        shown = (f" (default: {FLAG_DEFAULTS[key]})" if key in FLAG_DEFAULTS and "help_default" not in kwargs
                 else kwargs.pop("help_default", preset_help(key)))
        p.add_argument(flag, default=None, help=help + shown, **kwargs)

    a("--dataset", choices=sorted(PRESETS), help="dataset and its preset")
    a("--data-root", help="dataset root (VOC: the VOC2012 folder; Cityscapes: holds leftImg8bit/ and gtFine/)")
    a("--num-classes", type=int, help="number of classes (--dataset folder: needed only without "
      "DATA_ROOT/classes.txt, which names one class per line)",
      help_default=" (voc 21, cityscapes 19, toy 6)")
    a("--labeled", type=int, help="number of labeled images: VOC 92/183/366/732/1464 (classic) or "
      "662/1323/2646/5291 (blended), Cityscapes 186/372/744/1488; folder: all of labeled.txt",
      help_default=" (preset: toy 16; voc 366; cityscapes 744)")
    a("--split-dir", help="folder with labeled.txt / unlabeled.txt (and val.txt) of a published split")
    a("--method", choices=["pcr", "meanteacher", "supervised"],
      help="pcr; meanteacher = pcr without prototypes; supervised = labeled images only")
    a("--backbone", choices=sorted(BACKBONES), help="ResNet depth (model.BACKBONES)")
    a("--width", type=float, help="channel multiplier of the whole network (1.0 = the paper's; "
      "the toy preset uses a thin network to train in minutes on a CPU)")
    a("--pretrained", help="'none', 'torchvision' (7x7 stem, torchvision ImageNet weights), "
      "'hub:resnet101s' / 'hub:resnet50s' (deep stem, timm's ImageNet weights from the Hugging Face "
      "hub, downloaded once into torch's hub cache) or the path of a deep-stem ImageNet checkpoint")
    a("--output-stride", type=int, choices=[8, 16], help="backbone output stride (paper: 8)")
    a("--crop-size", type=int, help="training crop (square)")
    a("--batch-size", type=int, help="GLOBAL labeled batch over all processes; the unlabeled batch is equal")
    a("--epochs", type=int, help="epochs; one epoch = one pass over the unlabeled set")
    a("--iters", type=int, help="total iterations (overrides --epochs)", help_default=" (default: from --epochs)")
    a("--warmup-epochs", type=int, help="supervised-only epochs before the semi-supervised phase "
      "(at most half the run)")
    a("--warmup-iters", type=int, help="supervised-only iterations before the semi-supervised phase "
      "(overrides --warmup-epochs)", help_default=" (default: from --warmup-epochs)")
    a("--lr", type=float, help="base learning rate of the backbone")
    a("--head-lr-mult", type=float, help="learning-rate multiplier of decoder and heads")
    a("--weight-decay", type=float, help="SGD weight decay")
    a("--num-prototypes", type=int, help="micro-prototypes per class (M)")
    a("--conf-threshold", type=float, help="teacher confidence needed for an unlabeled pixel to "
      "train the prototype head (gamma)")
    a("--aux-weight", type=float, help="weight of the auxiliary layer3 loss (0 = no aux head)")
    a("--cutmix-prob", type=float, help="probability that an iteration's unlabeled batch is CutMixed")
    a("--unsup-weight", type=float, help="weight of the unsupervised loss L_u")
    a("--proto-weight", type=float, help="weight of the prototype consistency loss")
    a("--ema-decay", type=float, help="upper bound of the teacher's EMA momentum")
    a("--ohem-min-kept-per-image", type=int, help="OHEM keeps at least this many pixels per labeled "
      "image of a process (the reference's 100000 for its 2 images per GPU)")
    a("--eval-mode", choices=["whole", "sliding", "center"], help="evaluation protocol")
    a("--eval-every", type=int, help="evaluate every N iterations",
      help_default=" (preset: toy 300, others once per epoch)")
    a("--save-every", type=int, help="write last.pt every N iterations (0: at every evaluation)")
    a("--log-every", type=int, help="print a progress line every N iterations")
    a("--seed", type=int, help="random seed (data order, splits, initialisation)")
    a("--workers", type=int, help="data-loading processes per training process",
      help_default=" (default: min(4, CPU count))")
    a("--device", help="'auto', 'cpu', 'cuda' (torchrun picks cuda:LOCAL_RANK)")
    a("--amp", choices=["bf16", "fp16", "none"], help="mixed precision (CUDA; bf16 also on CPU)")
    a("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)",
      help_default="")
    a("--out", help="run directory: config, log, metrics, checkpoints",
      help_default=" (default: runs/DATASET_LABELED_METHOD_sSEED, e.g. runs/toy_16_pcr_s0)")
    a("--resume", help="'auto' (OUT/last.pt if present) or a checkpoint path; the run's settings "
      "come from the checkpoint", help_default="")
    a("--print-config", action="store_true", help="print the resolved settings and exit", help_default="")
    a("--skip-data-check", action="store_true", help="do not read every listed image and mask "
      "before training (the check decodes them all, in parallel over --workers: about half a minute "
      "of one core for VOC; a passed check is recorded in OUT/data_check.json and not repeated "
      "on resume while the files are unchanged)", help_default="")
    return p.parse_args(argv)


def explicit_flags(args):
    """{config key: value} of the flags given on the command line."""
    return {key: value for key, value in vars(args).items() if value is not None}


def default_out(cfg):
    """runs/{dataset}_{labeled}_{method}_s{seed}: another dataset, split, method or seed
    never lands in (or resumes from) the run directory of the quick start. A folder
    dataset is named after its root; without --labeled its labeled.txt is the split."""
    name = cfg["dataset"]
    if name == "folder" and cfg.get("data_root"):
        name = "folder-" + (os.path.basename(os.path.normpath(cfg["data_root"])) or "root")
    labeled = cfg["labeled"] if cfg["labeled"] is not None else "lists"
    return os.path.join("runs", f"{name}_{labeled}_{cfg['method']}_s{cfg['seed']}")


def resolve_config(args):
    """Preset of the dataset, overridden by every flag the user gave."""
    given = explicit_flags(args)
    cfg = {key: None for key in vars(args)}
    cfg.update(COMMON)
    cfg.update(FLAG_DEFAULTS)
    cfg.update(PRESETS[given.get("dataset", FLAG_DEFAULTS["dataset"])])
    cfg.update(given)
    if cfg["dataset"] == "voc":
        cfg["num_classes"] = cfg["num_classes"] or 21
    if cfg["dataset"] == "cityscapes":
        cfg["num_classes"] = cfg["num_classes"] or 19
    cfg["aux"] = cfg["aux_weight"] > 0
    if cfg["out"] is None:
        cfg["out"] = default_out(cfg)
    return cfg


# flag -> (config key, lowest allowed, highest allowed, whether the lowest itself is allowed)
FLAG_RANGES = {
    "--width": ("width", 0, math.inf, False), "--crop-size": ("crop_size", 16, math.inf, True),
    "--batch-size": ("batch_size", 1, math.inf, True), "--epochs": ("epochs", 1, math.inf, True),
    "--iters": ("iters", 1, math.inf, True), "--warmup-iters": ("warmup_iters", 0, math.inf, True),
    "--warmup-epochs": ("warmup_epochs", 0, math.inf, True),
    "--lr": ("lr", 0, math.inf, False), "--head-lr-mult": ("head_lr_mult", 0, math.inf, False),
    "--weight-decay": ("weight_decay", 0, math.inf, True),
    "--num-prototypes": ("num_prototypes", 1, math.inf, True),
    "--conf-threshold": ("conf_threshold", 0, 1, True), "--aux-weight": ("aux_weight", 0, math.inf, True),
    "--cutmix-prob": ("cutmix_prob", 0, 1, True), "--unsup-weight": ("unsup_weight", 0, math.inf, True),
    "--proto-weight": ("proto_weight", 0, math.inf, True), "--ema-decay": ("ema_decay", 0, 1, True),
    "--ohem-min-kept-per-image": ("ohem_min_kept_per_image", 1, math.inf, True),
    "--eval-every": ("eval_every", 1, math.inf, True), "--save-every": ("save_every", 0, math.inf, True),
    "--log-every": ("log_every", 1, math.inf, True), "--workers": ("workers", 0, math.inf, True),
}


def flag_errors(cfg):
    """Every out-of-range number (the flag is named); nothing is built or written yet."""
    errors = []
    for flag, (key, low, high, low_ok) in FLAG_RANGES.items():
        value = cfg.get(key)
        if value is None:
            continue
        if not (math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high):
            bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high < math.inf else "")
            errors.append(f"{flag} {value}: must be {bound}")
    if (cfg["method"] != "supervised" and cfg["warmup_iters"] is not None and cfg["iters"]
            and cfg["warmup_iters"] >= cfg["iters"]):
        errors.append(f"--warmup-iters {cfg['warmup_iters']} leaves no semi-supervised iteration "
                      f"of --iters {cfg['iters']}")
    return errors


def process_errors(cfg, ctx):
    """The global batch against the number of processes: checkable before any file is
    written (torchrun's processes all find the same problem; rank 0 reports it)."""
    batch = cfg["batch_size"]
    if not isinstance(batch, int) or batch < 1:
        return []  # flag_errors names it
    if batch % ctx.world:
        return [f"--batch-size {batch} (global) does not split over {ctx.world} processes; pass a "
                f"multiple of {ctx.world}, e.g. --batch-size {ctx.world * max(1, round(batch / ctx.world))}"]
    cfg["local_batch"] = batch // ctx.world
    if cfg["local_batch"] < 2 and not (ctx.device.type == "cuda" and ctx.world > 1):
        # plain BatchNorm (ASPP's image pooling) needs two images; SyncBN pools processes
        return [f"--batch-size {batch} leaves {cfg['local_batch']} image per process; "
                f"BatchNorm needs at least 2: pass --batch-size {2 * ctx.world}"]
    return []


def file_errors(cfg, resuming):
    """An --out that cannot be written, a missing data root, split folder or ImageNet
    weights, all at once (data.py checks the contents once the run directory exists)."""
    errors = []
    existing = os.path.abspath(cfg["out"])
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        errors.append(f"--out {cfg['out']}: cannot write there ({existing} is "
                      f"{'not writable' if os.path.isdir(existing) else 'a file'})")
    if cfg["dataset"] != "toy":
        if cfg["data_root"] is None:
            errors.append(f"--data-root is required for --dataset {cfg['dataset']}")
        elif not os.path.isdir(cfg["data_root"]):
            errors.append(f"--data-root {cfg['data_root']} does not exist")
    if cfg["split_dir"] is not None and not os.path.isdir(cfg["split_dir"]):
        errors.append(f"--split-dir {cfg['split_dir']} does not exist")
    pretrained = cfg["pretrained"]
    # a resumed run takes every weight from its checkpoint
    named = pretrained in ("none", "torchvision") or pretrained.startswith("hub:")
    if not resuming and not named and not os.path.exists(pretrained):
        errors.append(
            f"--pretrained: ImageNet weights not found at {pretrained}. The paper settings "
            "start from the deep-stem ResNet checkpoints (resnet50.pth / resnet101.pth) that "
            "U2PL, UniMatch and CPS publish (links in their READMEs); put the file there or pass "
            "--pretrained PATH. Alternatives: --pretrained hub:resnet101s or hub:resnet50s (the "
            "same deep-stem layout, timm's ImageNet weights from the Hugging Face hub, downloaded "
            "once; results may differ a little from the paper's), --pretrained torchvision (7x7 "
            "stem, torchvision's ImageNet weights; results differ from the paper) or --pretrained "
            "none (from scratch; far below the paper).")
    return errors


def check_batches(cfg, ctx, data):
    """The schedule from the data's size: iterations per epoch, total, warm-up, intervals."""
    pool = len(data.unlabeled) if cfg["method"] != "supervised" else 0
    if cfg["method"] != "supervised" and pool < cfg["batch_size"]:
        raise SetupError(f"--method {cfg['method']} needs at least --batch-size "
                         f"({cfg['batch_size']}) unlabeled images, the split has {pool}")
    # an epoch is a pass over the unlabeled set (the labeled set for the supervised-only
    # baseline when there are no unlabeled images, so that it still has epochs)
    cfg["iters_per_epoch"] = max(1, (len(data.unlabeled) or len(data.labeled)) // cfg["batch_size"])
    cfg["total_iters"] = cfg["iters"] or cfg["epochs"] * cfg["iters_per_epoch"]
    cfg["epochs"] = math.ceil(cfg["total_iters"] / cfg["iters_per_epoch"])
    if cfg["warmup_iters"] is None:
        cfg["warmup_iters"] = min(cfg["warmup_epochs"] * cfg["iters_per_epoch"], cfg["total_iters"] // 2)
    elif cfg["method"] != "supervised" and cfg["warmup_iters"] >= cfg["total_iters"]:
        raise SetupError(f"--warmup-iters {cfg['warmup_iters']} leaves no semi-supervised iteration "
                         f"of {cfg['total_iters']} (--epochs {cfg['epochs']} x "
                         f"{cfg['iters_per_epoch']} per epoch)")
    cfg["eval_every"] = cfg["eval_every"] or cfg["iters_per_epoch"]
    cfg["save_every"] = cfg["save_every"] or cfg["eval_every"]


# ----------------------------------------------------------------------------------------
# A run's settings: a resumed run keeps them, a new run does not take another's directory

# Flags that a resumed run may change: they do not touch what is trained (loader
# processes, how often to log / save / evaluate, where the run lives, the device and
# memory layout; the last two change the order of float sums, as another GPU would).
RESUME_MAY_CHANGE = {"workers", "log_every", "save_every", "eval_every", "device",
                     "channels_last", "out", "resume", "print_config", "skip_data_check"}


# Worked out from the data and the number of processes at every start.
DERIVED = {"local_batch", "iters_per_epoch", "total_iters"}


def flag_name(key):
    return "--" + key.replace("_", "-")


def same_setting(key, a, b):
    if key in ("data_root", "split_dir", "pretrained") and a is not None and b is not None:
        return os.path.abspath(str(a)) == os.path.abspath(str(b))
    return a == b


def resumed_config(cfg, given, stored, origin, log):
    """The stored run's settings, with the harmless flags the user gave (logged).
    A flag that would change training and differs from the stored value is an error."""
    resumed = dict(cfg)  # keys a run of an older version did not store keep today's values
    resumed.update({key: value for key, value in stored.items() if key not in DERIVED})
    errors = []
    for key, value in given.items():
        if (key not in stored or same_setting(key, value, stored[key])
                or key in ("resume", "out", "print_config")
                or (key == "epochs" and stored.get("iters"))):  # (--iters overrides it)
            resumed[key] = value
        elif key in RESUME_MAY_CHANGE:
            resumed[key] = value
            log(f"resume: {flag_name(key)} {stored[key]} -> {value} (does not change training)")
        else:
            errors.append(f"{flag_name(key)} {value} differs from the run's {flag_name(key)} "
                          f"{stored[key]} ({origin}); a resumed run keeps its settings: drop the "
                          f"flag, or start a new run with another --out")
    # the run continues where it was found (--resume auto: --out, else the checkpoint's folder)
    if "out" not in given:
        resumed["out"] = cfg["out"] if cfg["resume"] == "auto" else os.path.dirname(origin) or "."
    return resumed, errors


def setting_differences(fresh, stored):
    """'--flag STORED there, FRESH here' for each training setting the two runs differ in
    (settings the fresh run leaves to the data, like the warm-up's iterations, are skipped)."""
    differences = []
    for key, value in fresh.items():
        if (key in RESUME_MAY_CHANGE or key in DERIVED or key not in stored
                or (value is None and key != "iters")
                or (key == "epochs" and (fresh.get("iters") or stored.get("iters")))):
            continue  # (a stored run's epochs are worked out from its --iters)
        if not same_setting(key, value, stored[key]):
            differences.append(f"{flag_name(key)} {'unset' if stored[key] is None else stored[key]} "
                               f"there, {'unset' if value is None else value} here")
    return differences


def stored_config(out):
    """The settings of the run in directory out (config.json, else last.pt), or None."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    try:
        return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["config"]
    except Exception:
        return None


def occupied_out_error(cfg):
    """A new run must not take over a directory that holds a run (last.pt): say whether it
    is this run (continue it with --resume auto) or one with other settings (which)."""
    out = cfg["out"]
    if not os.path.exists(os.path.join(out, "last.pt")):
        return []
    stored = stored_config(out)
    differences = None if stored is None else setting_differences(cfg, stored)
    if differences:
        return [f"--out {out} already holds a run with other settings ({'; '.join(differences)}); "
                "choose another --out, or continue that run with --resume auto (it keeps its "
                "own settings)"]
    return [f"--out {out} already holds this run (last.pt); continue it with --resume auto, or "
            "choose another --out"]


# ----------------------------------------------------------------------------------------
# Data order. A sample is a pure function of its key (index, seed), and the keys of every
# iteration are a pure function of (seed, iteration): runs are repeatable with any number
# of workers, and a resumed run continues with exactly the batches it would have seen.

class TrainKeys(torch.utils.data.Sampler):
    """Endless (index, seed) keys for this process, from iteration start_iter on.

    An epoch has iters_per_epoch iterations of global_batch images. The epoch's order is a
    random permutation of the dataset (concatenated permutations when the dataset is
    smaller: the labeled set is repeated to the length of the unlabeled epoch).
    Process r of w takes every w-th image of each global batch.
    """

    def __init__(self, num_items, global_batch, iters_per_epoch, seed, stream, rank, world, start_iter):
        self.n, self.batch, self.ipe = num_items, global_batch, iters_per_epoch
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self.start_iter = start_iter

    def epoch_keys(self, epoch):
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        needed = self.ipe * self.batch
        order = np.concatenate([rng.permutation(self.n) for _ in range(-(-needed // self.n))])
        return order[:needed], rng.integers(0, 2**31 - 1, needed)

    def __iter__(self):
        it = self.start_iter
        while True:
            epoch = it // self.ipe
            order, seeds = self.epoch_keys(epoch)
            for i in range(it - epoch * self.ipe, self.ipe):
                for j in range(i * self.batch + self.rank, (i + 1) * self.batch, self.world):
                    yield int(order[j]), int(seeds[j])
            it = (epoch + 1) * self.ipe


def detach_worker(worker_id):
    """Ctrl-C and torchrun's SIGTERM (killpg) reach the whole process group: the workers
    leave it, so that they keep loading while the trainer finishes the iteration and
    saves (a killed worker would crash the trainer). (SIGTERM keeps its default: Python's
    exit handler stops daemon workers with it.)"""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, cfg, ctx, local_batch, global_batch, stream, start_iter):
    keys = TrainKeys(len(dataset), global_batch, cfg["iters_per_epoch"], cfg["seed"], stream,
                     ctx.rank, ctx.world, start_iter)
    workers = cfg["workers"]
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=keys, num_workers=workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, drop_last=True, worker_init_fn=detach_worker,
        # its own generator: creating the iterator draws a seed, which must not come from the
        # global RNG (dropout's), or a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(cfg["seed"])))


# ----------------------------------------------------------------------------------------
# The process: who am I, logging, errors

class Context:
    """Who am I in the job: rank, world size, device; rank 0 alone prints and writes files.

    Built before anything is checked or written; connect() joins the process group once
    the setup checks have passed, so that a bad flag stops every process at once."""

    def __init__(self, device_flag):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.log_file, self.unwritten = None, []
        self.device = pick_device(device_flag, local_rank)

    def connect(self):
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=30))

    def open_log(self, path):
        """Append to path from now on, starting with the lines logged before it was open."""
        if not self.main:
            return
        self.log_file = open(path, "a")
        for line in self.unwritten:
            self.log_file.write(line + "\n")
        self.unwritten = []
        self.log_file.flush()

    def log(self, *parts):
        if not self.main:
            return
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()
        else:
            self.unwritten.append(line)


def pick_device(flag, local_rank=0):
    """--device 'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device (plain 'cuda' and 'auto'
    take cuda:LOCAL_RANK under torchrun), made current; a bad value is a SetupError."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise SetupError(f"--device {flag!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {flag}, but no CUDA device is visible")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


class CheckpointError(Exception):
    """A checkpoint file that cannot be read."""


class SetupError(Exception):
    """A flag or file that makes the run impossible; the message names it."""


def last_line(error):
    # a DataError raised in a loader worker arrives wrapped in a traceback: keep its last line
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def report_errors(errors, ctx, out):
    """Every setup problem found, one 'error:' line each, printed by rank 0 only, and
    appended to the run's log.txt if the run directory already has one. A start that
    fails before its run directory exists writes nothing at all: no directory, no empty
    log, no split lists."""
    if not ctx.main:
        return 2
    for error in errors:
        print(f"error: {error}", file=sys.stderr, flush=True)
    if ctx.log_file is None and os.path.exists(os.path.join(out, "log.txt")):
        ctx.open_log(os.path.join(out, "log.txt"))
    if ctx.log_file is not None:
        ctx.log_file.write("".join(f"error: {error}\n" for error in errors))
        ctx.log_file.flush()
    return 2


# ----------------------------------------------------------------------------------------
# Checkpoints

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag="--resume"):
    """Read a checkpoint written by this script; a missing file is a SetupError, a damaged
    one a CheckpointError, each naming the flag and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SetupError(f"{flag}: checkpoint {path} does not exist")
    except Exception as e:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}")


def find_resume_checkpoint(cfg, ctx):
    """--resume auto: OUT/last.pt, falling back to the previous one if it is damaged."""
    if cfg["resume"] != "auto":
        return load_checkpoint(cfg["resume"]), cfg["resume"]
    candidates = [os.path.join(cfg["out"], n) for n in ("last.pt", "last.prev.pt")]
    for i, path in enumerate(candidates):
        if not os.path.exists(path):
            continue
        try:
            return load_checkpoint(path), path
        except CheckpointError as e:
            ctx.log(f"warning: {e}")
            if i + 1 < len(candidates):
                ctx.log("warning: falling back to the previous checkpoint")
    existing = [p for p in candidates if os.path.exists(p)]
    if existing:
        raise SetupError(f"--resume: no readable checkpoint among {existing}; delete them to start over")
    ctx.log(f"resume: no checkpoint in {cfg['out']}, starting from scratch")
    return None, None


def rng_state(step_rng):
    state = {"torch": torch.get_rng_state(), "step": step_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, step_rng):
    torch.set_rng_state(state["torch"])
    step_rng.set_state(state["step"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run, cfg, ctx, it, name="last.pt"):
    """Gather every process's RNG state, then rank 0 writes OUT/name atomically (last.pt
    keeps its predecessor as last.prev.pt). A student holding non-finite values is not
    written, so that the last good checkpoint stays."""
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, rng_state(run.step_rng))
    else:
        states = [rng_state(run.step_rng)]
    if not ctx.main:
        return
    weights = [v for v in run.student.state_dict().values() if v.is_floating_point()]
    if not bool(torch.stack([torch.isfinite(v).all() for v in weights]).all()):  # one sync
        ctx.log(f"warning: the student holds non-finite values at iteration {it}; {name} "
                "not written, so the last good checkpoint stays")
        return
    ckpt = {"config": cfg, "iter": it, "best": run.best,
            "student": run.student.state_dict(),
            "teacher": run.teacher.state_dict() if run.teacher is not None else None,
            "prototypes": run.bank.state_dict() if run.bank is not None else None,
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": states}
    path = os.path.join(cfg["out"], name)
    if name == "last.pt" and os.path.exists(path):
        os.replace(path, os.path.join(cfg["out"], "last.prev.pt"))
    atomic_save(ckpt, path)


def resume(ckpt, path, ctx, student, teacher, bank, optimizer, scaler, step_rng):
    """Load the checkpoint into everything; returns (start iteration, best score)."""
    start_iter, best = 0, {"miou": -1.0, "iter": -1}
    if ckpt is None:
        return start_iter, best
    try:
        unwrap(student).load_state_dict(ckpt["student"])
        if teacher is not None and ckpt.get("teacher"):
            teacher.load_state_dict(ckpt["teacher"])
        if bank is not None and ckpt.get("prototypes"):
            bank.load_state_dict(ckpt["prototypes"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        saved = ckpt.get("config", {})
        raise SetupError(
            f"--resume {path}: the checkpoint does not fit this run (it was --method "
            f"{saved.get('method')} --backbone {saved.get('backbone')} --width {saved.get('width')} "
            f"with {saved.get('num_classes')} classes): {str(e).strip().splitlines()[0]}")
    scaler.load_state_dict(ckpt["scaler"])
    start_iter, best = ckpt["iter"], ckpt["best"]
    if len(ckpt["rng"]) == ctx.world:
        set_rng_state(ckpt["rng"][ctx.rank], step_rng)
    else:
        ctx.log(f"resume: the checkpoint was written by {len(ckpt['rng'])} processes, this run "
                f"has {ctx.world}: random streams restart (the run is not bit-exact)")
    ctx.log(f"resume: {path} at iteration {start_iter}")
    return start_iter, best


# ----------------------------------------------------------------------------------------
# Across processes and the health of a step

@torch.no_grad()
def average_buffers(module, ctx):
    """Replace the floating-point buffers (BN running statistics) by their mean over processes.

    Plain BatchNorm (CPU; CUDA uses SyncBatchNorm) updates its statistics from the local
    batch only, so they drift apart between processes, and so would the teacher, their
    EMA, and its evaluation. Mean of running means = running mean of the global batch.
    """
    buffers = [b for b in module.buffers() if b.dtype.is_floating_point]
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= ctx.world
    for buffer, mean in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(mean.view_as(buffer))


@torch.no_grad()
def restore_buffers_if(bad, buffers, saved):
    """buffers <- saved (their flat copy from before the step) where the 0-dim bool `bad`,
    on the device, without a host sync. The forward pass updates the BN statistics before
    the loss is known (with NaN when the activations were), and a skipped step must leave
    no trace in the student, nor in the teacher that averages it."""
    current = torch.cat([b.reshape(-1) for b in buffers])
    kept = torch.where(bad, saved, current)
    torch._foreach_copy_(buffers, [v.view_as(b) for v, b in
                                   zip(kept.split([b.numel() for b in buffers]), buffers)])


def bit_checksum(tensor):
    """(2,) int64: sum of the tensor's bit patterns b_i (floats read as integers of the
    same width), plain and weighted by position: [sum_i b_i, sum_i b_i (i mod 1021 + 1)].
    Integer sums are exact in any order (wrapping on overflow), so equal tensors give
    equal checksums whatever the thread count; a float sum would not."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    flat = flat.long()
    position = torch.arange(len(flat), device=flat.device) % 1021 + 1
    return torch.stack([flat.sum(), (flat * position).sum()])


@torch.no_grad()
def check_replicas_equal(teacher, bank, ctx):
    """Every process must hold the same teacher (parameters and BN statistics) and the
    same prototypes; raise naming the first tensor that differs (a distributed bug).

    Called at each evaluation, not per iteration: all processes all-gather one (T, 2)
    checksum tensor (bit_checksum of each of the T tensors) and compare them.
    """
    if ctx.world == 1 or (teacher is None and bank is None):
        return
    named = [] if teacher is None else [("teacher." + k, v) for k, v in teacher.state_dict().items()]
    if bank is not None:
        named.append(("prototypes", bank.prototypes))
    checksums = torch.stack([bit_checksum(v) for _, v in named])  # (T, 2)
    gathered = [torch.empty_like(checksums) for _ in range(ctx.world)]
    dist.all_gather(gathered, checksums)
    for rank, other in enumerate(gathered):
        differs = (other != gathered[0]).any(dim=1).tolist()
        if any(differs):
            raise RuntimeError(
                f"replicas: process {rank} holds a different {named[differs.index(True)][0]} "
                f"than process 0 (and {sum(differs)} tensor(s) differ in all); the processes "
                f"should hold identical copies")
    what = " and ".join(n for n, present in (("teacher", teacher), ("prototypes", bank))
                        if present is not None)
    ctx.log(f"replicas: {what} identical on {ctx.world} processes")


def reduce_log_sums(log_sums, world):
    """In place over all processes: the loss sums (one per LOSS_TERMS) averaged, so the progress line
    shows the global batch's losses; the non-finite step count (last) summed."""
    dist.all_reduce(log_sums)
    log_sums[:len(LOSS_TERMS)] /= world
    return log_sums


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------
# Progress: loss sums, speed, ETA, signals, the config summary

class Progress:
    """Loss sums, non-finite streaks, speed and ETA of the training loop.

    add() keeps the per-iteration bookkeeping on the device (no host sync); take() reads it
    back, once per --log-every. Time counts training only: evaluations and the prototype
    k-means run inside pause(). The ETA adds the remaining warm-up iterations, the
    remaining semi-supervised ones and the remaining evaluations, each at its own measured
    duration. Until a semi-supervised iteration has been measured it is guessed at
    SEMI_COST_GUESS warm-up iterations: it runs the student on twice the images (labeled
    and unlabeled) plus the teacher's forward pass on the unlabeled half, ~2.3x the work.
    Measured PCR / supervised step: 1.8x (bench.py, resnet18, crop 129, CPU), 1.8x / 2.1x
    (resnet101, crop 513, H100, bf16 / fp32), 2.0-3.1x for the small toy steps on a 2-core
    CPU. (The one-off prototype k-means is in neither phase.) Until an
    evaluation has been measured the ETA is training only, and says how many evaluations
    it leaves out.
    """
    SEMI_COST_GUESS = 2.5

    def __init__(self, cfg, start_iter, device, clock=time.monotonic):
        self.cfg, self.device, self.clock = cfg, device, clock
        terms = len(LOSS_TERMS)
        self.sums = torch.zeros(terms + 1, device=device)  # one per LOSS_TERMS, non-finite steps
        # current and longest run of non-finite steps, last bad iteration and its terms
        self.streak = torch.zeros((), device=device, dtype=torch.long)
        self.longest, self.bad_iter = torch.zeros_like(self.streak), torch.zeros_like(self.streak)
        self.last_bad = torch.zeros(terms, device=device)
        self.count = 0  # iterations summed since the last take()
        self.seconds, self.iters = {False: 0.0, True: 0.0}, {False: 0, True: 0}  # by semi
        self.interval_seconds, self.interval_images = 0.0, 0  # since the last progress line
        self.eval_seconds, self.evals = 0.0, 0
        self.mark, self.mark_iter = clock(), start_iter  # training since then is not counted yet

    def semi(self, it):
        return self.cfg["method"] != "supervised" and it >= self.cfg["warmup_iters"]

    def add(self, terms, finite, it):
        """One iteration's loss terms and finiteness (device tensors), without a sync."""
        values = torch.stack([terms.get(k, torch.zeros((), device=self.device)).detach().float()
                              for k in LOSS_TERMS])
        self.sums += torch.cat([torch.nan_to_num(values * finite, nan=0.0, posinf=0.0, neginf=0.0),
                                (~finite).float().view(1)])
        self.streak = torch.where(finite, 0, self.streak + 1)
        self.longest = torch.maximum(self.longest, self.streak)
        self.bad_iter = torch.where(finite, self.bad_iter, it)
        self.last_bad = torch.where(finite, self.last_bad, (~torch.isfinite(values)).float())
        self.count += 1

    def take(self, world):
        """(mean losses, one per LOSS_TERMS; non-finite steps; longest non-finite streak;
        last bad iteration; which terms were non-finite there) over the global batch since
        the last call, then reset."""
        if world > 1:  # a NaN on one process stops all of them together
            dist.all_reduce(self.longest, op=dist.ReduceOp.MAX)
            reduce_log_sums(self.sums, world)
        sums = self.sums.tolist()
        result = ([s / max(self.count, 1) for s in sums[:-1]], int(sums[-1]), int(self.longest),
                  int(self.bad_iter), self.last_bad.tolist())
        self.sums.zero_()
        self.longest.zero_()
        self.count = 0
        return result

    def lap(self, done):
        """Iterations mark_iter..done-1 took the time since the mark (one phase: pause()
        runs at the phase change)."""
        now = self.clock()
        if done > self.mark_iter:
            semi = self.semi(self.mark_iter)
            images = self.cfg["batch_size"] * (2 if semi else 1)
            self.seconds[semi] += now - self.mark
            self.iters[semi] += done - self.mark_iter
            self.interval_seconds += now - self.mark
            self.interval_images += (done - self.mark_iter) * images
        self.mark, self.mark_iter = now, done

    def stop_clock(self, done):
        """Training stops at iteration done (until start_clock)."""
        synchronize(self.device)  # the queued iterations count as training (once per pause)
        self.lap(done)

    def start_clock(self, evaluation=False):
        """Training goes on; the time since stop_clock was an evaluation's, or not counted."""
        synchronize(self.device)
        now = self.clock()
        if evaluation:
            self.eval_seconds += now - self.mark
            self.evals += 1
        self.mark = now

    @contextmanager
    def pause(self, done, evaluation=False):
        """Time spent inside is not training time; an evaluation's is measured for the ETA."""
        self.stop_clock(done)
        yield
        self.start_clock(evaluation)

    def speed(self, done):
        """Images per second of training since the last call (lap first)."""
        self.lap(done)
        speed = self.interval_images / max(self.interval_seconds, 1e-9)
        self.interval_seconds, self.interval_images = 0.0, 0
        return speed

    def evaluations_left(self, done):
        """Evaluations at iterations done..total (the one at done runs after its progress line)."""
        every, total = self.cfg["eval_every"], self.cfg["total_iters"]
        if done > total:
            return 0
        return total // every - (done - 1) // every + (1 if total % every else 0)

    def eta(self, done):
        """(seconds, evaluations not included because none has been measured yet)."""
        total = self.cfg["total_iters"]
        warmup_end = total if self.cfg["method"] == "supervised" else self.cfg["warmup_iters"]
        warmup_left = max(0, warmup_end - max(done, 0))
        semi_left = total - done - warmup_left
        per_warmup = self.seconds[False] / self.iters[False] if self.iters[False] else None
        per_semi = self.seconds[True] / self.iters[True] if self.iters[True] else None
        if per_semi is None:
            per_semi = (per_warmup or 0.0) * self.SEMI_COST_GUESS
        if per_warmup is None:
            per_warmup = per_semi / self.SEMI_COST_GUESS
        seconds = warmup_left * per_warmup + semi_left * per_semi
        evaluations = self.evaluations_left(done)
        if self.evals:
            return seconds + evaluations * self.eval_seconds / self.evals, 0
        return seconds, evaluations


class StopVote:
    """Whether any process got SIGINT / SIGTERM, agreed by all processes, checked every
    iteration without a host-device sync. Each iteration every process launches an
    asynchronous all-reduce (MAX) of its own flag, a CPU tensor on a gloo group (CPU
    runs and NCCL runs alike), and reads the result launched the iteration before, which
    has long arrived. Every process reads the same results at the same iterations, so all
    stop together, within two iterations of the signal."""

    def __init__(self, received, world):
        self.received, self.world, self.pending = received, world, None
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def __call__(self):
        if self.world == 1:
            return bool(self.received)
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
                        flag)
        return stop

    def close(self):
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def plural(count, word):
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def describe_config(cfg, ctx):
    """The resolved settings in a few lines (the full set is in config.json)."""
    method, semi = cfg["method"], cfg["method"] != "supervised"
    labeled = cfg["labeled"] if cfg["labeled"] is not None else "all listed"
    lines = [
        f"run: {method} on {cfg['dataset']}" + (f" ({cfg['data_root']})" if cfg["data_root"] else "")
        + f", {labeled} labeled, seed {cfg['seed']} -> {cfg['out']} (full config: config.json)",
        f"model: {cfg['backbone']}" + (f" x{cfg['width']}" if cfg["width"] != 1.0 else "")
        + f", output stride {cfg['output_stride']}, {plural(cfg['num_classes'], 'class')}, "
        f"pretrained {cfg['pretrained']}" + (f", aux head x{cfg['aux_weight']}" if cfg["aux"] else "")
        + f" | {plural(ctx.world, 'process')} on {ctx.device if ctx.world == 1 else ctx.device.type}, "
        f"amp {cfg['amp']}",
        f"schedule: {plural(cfg['total_iters'], 'iteration')} = {plural(cfg['epochs'], 'epoch')} of "
        f"{cfg['iters_per_epoch']}" + (f", the first {cfg['warmup_iters']} supervised" if semi else "")
        + f" | global batch {cfg['batch_size']}" + (f" + {cfg['batch_size']} unlabeled" if semi else "")
        + f", crop {cfg['crop_size']}",
        f"optimizer: SGD lr {cfg['lr']} (heads x{cfg['head_lr_mult']}), poly {cfg['poly_power']}, "
        f"momentum {cfg['momentum']}, weight decay {cfg['weight_decay']}",
        f"losses: OHEM CE (p <= {cfg['ohem_thresh']}, min kept {cfg['ohem_min_kept_per_image']} x "
        f"{cfg['local_batch']} = {ohem_min_kept(cfg, cfg['local_batch'])} per process)"
        + (f" | unlabeled x{cfg['unsup_weight']}, highest-entropy {cfg['drop_start']:.0%} -> 0% "
           f"dropped, CutMix p {cfg['cutmix_prob']}, teacher EMA {cfg['ema_decay']}" if semi else "")
        + (f" | prototypes x{cfg['proto_weight']}: {cfg['num_prototypes']} per class, T "
           f"{cfg['temperature']}, confidence >= {cfg['conf_threshold']}" if method == "pcr" else ""),
        f"evaluation: {cfg['eval_mode']}, every {plural(cfg['eval_every'], 'iteration')}; last.pt every "
        f"{plural(cfg['save_every'], 'iteration')}",
    ]
    return lines


def log_progress(progress, run, cfg, ctx, it, semi):
    """The progress line (losses, lr, speed, ETA). Returns False, having said why, when the
    loss was non-finite for five iterations in a row: the run must stop."""
    done = it + 1
    means, skipped, longest, bad_iter, last_bad = progress.take(ctx.world)
    if longest >= 5:
        bad = [n for n, b in zip(LOSS_TERMS, last_bad) if b]
        ctx.log(f"error: the loss was non-finite for {longest} iterations in a row, last "
                f"at iteration {bad_iter} (terms: {', '.join(bad) or 'total'}). Stopping without "
                f"saving; the last good checkpoint is {cfg['out']}/last.pt. Try a lower --lr "
                f"or --amp bf16/none.")
        return False
    speed = progress.speed(done)
    eta, evaluations_left_out = progress.eta(done)
    losses = " ".join(f"{k} {m:.4f}" for k, m in zip(LOSS_TERMS, means)
                      if k == "sup" or (semi and (k != "proto" or run.bank is not None)))
    ctx.log(f"it {done}/{cfg['total_iters']} | ep {it // cfg['iters_per_epoch']} | {losses} | "
            f"lr {run.optimizer.param_groups[0]['lr']:.2e} | {speed:.1f} img/s | "
            f"eta {format_eta(eta)}"
            + (f" + {plural(evaluations_left_out, 'evaluation')}" if evaluations_left_out else "")
            + (f" | skipped {skipped}" if skipped else ""))
    return True


# ----------------------------------------------------------------------------------------
# Building the run, evaluating, recording, and the loop

def build_everything(cfg, ctx, resuming=False):
    """Data, student, teacher, prototype bank, optimizer, scaler. (file_errors has checked
    the ImageNet weights; a resumed run does not need them.)"""
    pretrained = cfg["pretrained"]
    if resuming and pretrained != "torchvision":
        pretrained = "none"  # the same deep-stem network; every weight comes from the checkpoint
    data = data_lib.build_data(cfg["dataset"], cfg["data_root"], cfg["num_classes"], cfg["labeled"],
                               cfg["split_dir"], cfg["seed"], cfg["crop_size"],
                               out_dir=cfg["out"] if ctx.main else None, log=ctx.log)
    cfg["num_classes"] = data.num_classes
    torch.manual_seed(cfg["seed"])
    student = build_model(data.num_classes, cfg["backbone"], cfg["output_stride"], cfg["aux"],
                          pretrained=pretrained, width=cfg["width"]).to(ctx.device)
    if ctx.device.type == "cuda":
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if cfg["channels_last"]:
        student = student.to(memory_format=torch.channels_last)
    teacher = None
    if cfg["method"] != "supervised":
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
    bank = None
    if cfg["method"] == "pcr":
        # own random stream, so that pcr, meanteacher and supervised share the warm-up exactly
        bank = PrototypeBank(data.num_classes, cfg["num_prototypes"], student.feature_dim,
                             cfg["proto_momentum"], cfg["temperature"],
                             generator=torch.Generator().manual_seed(cfg["seed"] + 1)).to(ctx.device)
    optimizer, scaler = make_optimizer(student, cfg, ctx.device)
    return data, student, teacher, bank, optimizer, scaler


def make_optimizer(student, cfg, device):
    """SGD over the backbone / head parameter groups (each remembers its base_lr for the
    poly schedule) and the GradScaler that guards every step."""
    groups = param_groups(student, cfg["lr"], cfg["lr"] * cfg["head_lr_mult"])
    for g in groups:
        g["base_lr"] = g["lr"]
    # fused SGD skips a step with non-finite gradients on the device, without a host sync
    optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"], fused=True)
    # Zero momentum buffers up front. Fused SGD otherwise allocates them uninitialised on
    # its first step and fills them in the kernel, which a non-finite first step (the rule
    # under fp16, whose loss scale starts high) skips: the garbage then enters every later
    # step. From zero, the first real step gives buf = grad, as a fresh buffer would.
    for group in groups:
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    # fp16 needs loss scaling; for bf16/fp32 a scale of 1 just detects non-finite steps
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if cfg["amp"] == "fp16" else 1.0,
                                  growth_interval=2000 if cfg["amp"] == "fp16" else 2**30)
    return optimizer, scaler


class Run:
    """Everything main trains and saves, in one place: data, student (and its DDP wrapper
    `model`), teacher, prototype bank, optimizer, scaler, the step's random stream, the
    iteration to start from and the best evaluation so far."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def setup(argv):
    """Flags, stored settings of a resumed run, and every check that needs no file written.
    Returns (cfg, ctx, checkpoint, its path, errors); nothing is written here."""
    args = parse_args(argv)
    given = explicit_flags(args)
    cfg = resolve_config(args)
    errors = []
    try:
        ctx = Context(cfg["device"])
    except SetupError as e:
        errors.append(str(e))
        ctx = Context("cpu")
    ckpt, path = None, None
    if cfg["resume"]:
        try:
            ckpt, path = find_resume_checkpoint(cfg, ctx)
        except (SetupError, CheckpointError) as e:
            errors.append(str(e))
        stored, origin = None, None
        if ckpt is not None:
            stored, origin = ckpt.get("config"), path
        elif cfg["resume"] == "auto" and os.path.exists(os.path.join(cfg["out"], "config.json")):
            # the run stopped before its first checkpoint: it starts again, with its settings
            stored, origin = stored_config(cfg["out"]), os.path.join(cfg["out"], "config.json")
        if stored:
            cfg, conflicts = resumed_config(cfg, given, stored, origin, ctx.log)
            errors += conflicts
    elif not cfg["print_config"]:  # (printing writes nothing)
        errors += occupied_out_error(cfg)
    errors += flag_errors(cfg)
    errors += process_errors(cfg, ctx)
    errors += file_errors(cfg, resuming=ckpt is not None)
    return cfg, ctx, ckpt, path, errors


def start_run(cfg, ctx, ckpt, ckpt_path):
    """After the checks of setup(): the run directory and its log, the process group, data,
    models, schedule, the checkpoint's state, the data check, config.json and the config
    summary. Returns (Run, None), or (None, exit code) with the error reported."""
    if ctx.main:  # before joining the other processes: a failure here stops the job at once
        try:
            os.makedirs(cfg["out"], exist_ok=True)
            ctx.open_log(os.path.join(cfg["out"], "log.txt"))
        except OSError as e:
            return None, report_errors([f"--out {cfg['out']}: cannot write the run directory: {e}"],
                                       ctx, cfg["out"])
    try:
        ctx.connect()
        data, student, teacher, bank, optimizer, scaler = build_everything(cfg, ctx, ckpt is not None)
        check_batches(cfg, ctx, data)
        step_rng = torch.Generator().manual_seed(cfg["seed"] * 1000 + ctx.rank)
        start_iter, best = resume(ckpt, ckpt_path, ctx, student, teacher, bank, optimizer, scaler,
                                  step_rng)
        check_data_before_training(data, cfg, ctx)
    except (SetupError, CheckpointError, data_lib.DataError, ValueError) as e:
        return None, report_errors([last_line(e)], ctx, cfg["out"])
    except Exception as e:  # a bug or a system error: its traceback follows, the log says why
        if ctx.log_file is not None:
            ctx.log_file.write(f"error: {type(e).__name__}: {last_line(e)}\n")
            ctx.log_file.flush()
        raise
    config_path = os.path.join(cfg["out"], "config.json")
    if ctx.main and not (cfg["resume"] and os.path.exists(config_path)):  # a resumed run keeps it
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2)
    for line in describe_config(cfg, ctx):
        ctx.log(line)
    model = student
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    model.train()
    return Run(data=data, student=student, model=model, teacher=teacher, bank=bank,
               optimizer=optimizer, scaler=scaler, step_rng=step_rng, start_iter=start_iter,
               best=best), None


def check_data_before_training(data, cfg, ctx):
    """Rank 0 decodes every listed file (data.check_data, recorded in OUT/data_check.json);
    the other processes wait for its verdict. A bad file is one DataError, printed by rank 0
    alone: the others exit quietly with the same code."""
    if data_lib.DATASETS[data.name].generated:
        return
    if cfg["skip_data_check"]:
        ctx.log("data check: skipped (--skip-data-check)")
        return
    error = None
    if ctx.main:
        try:
            data_lib.check_data(data, cfg["workers"], ctx.log, os.path.join(cfg["out"], "data_check.json"))
        except data_lib.DataError as e:
            error = str(e)
    if ctx.world > 1:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        if not ctx.main:
            raise SystemExit(2)
        raise data_lib.DataError(error)


def next_batch(loaders, run, cfg, ctx, it, semi):
    """The iteration's labeled batch, and in the semi-supervised phase the unlabeled one
    (its loader starts there), on the device."""
    if semi and "unlabeled" not in loaders:
        loaders["unlabeled"] = make_loader(run.data.unlabeled, cfg, ctx, cfg["local_batch"],
                                           cfg["batch_size"], stream=1, start_iter=it)
    batch = {name: [x.to(ctx.device, non_blocking=True) for x in next(loaders[name])]
             for name in (("labeled", "unlabeled") if semi else ("labeled",))}
    if cfg["channels_last"]:
        for x in batch.values():
            x[0] = x[0].contiguous(memory_format=torch.channels_last)
    return batch


def stop_on_bad_file(error, it, run, cfg, ctx):
    """A listed file that fails during training (changed on disk since the check): write
    last.pt (one process: saving needs every process), name the file, return exit code 2."""
    # a DataError raised in a loader worker arrives re-raised with the worker's traceback,
    # whose last line is "data.DataError: <message>"
    message = str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]
    if ctx.world == 1:
        save_checkpoint(run, cfg, ctx, it)
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
          f"{cfg['crop_size']} px per process, --amp {cfg['amp']}). Use --amp bf16, more "
          f"processes (torchrun; --batch-size is global) or a smaller --batch-size / "
          f"--crop-size; {cfg['out']}/last.pt, if any, resumes with --resume auto.",
          file=sys.stderr, flush=True)
    return 4


def run_evaluation(run, cfg, ctx, semi):
    """Teacher (student before the semi-supervised phase), linear and prototype heads."""
    model = run.teacher if semi and run.teacher is not None else run.student
    was_training = model.training
    model.eval()
    heads = ("linear", "proto") if (semi and run.bank is not None) else ("linear",)
    results = evaluate_lib.evaluate(
        model, run.data.val, run.data.num_classes, ctx.device, mode=cfg["eval_mode"],
        crop_size=cfg["crop_size"], heads=heads, bank=run.bank,
        amp=None if cfg["amp"] == "none" else cfg["amp"], rank=ctx.rank, world_size=ctx.world,
        log=ctx.log)
    model.train(was_training)
    return results


def record_evaluation(results, run, cfg, ctx, it, semi):
    """Per-class IoU table and a summary line, one JSON line in metrics.jsonl, best.pt
    when the linear head's mIoU is the best so far. Returns the metrics."""
    done, linear = it + 1, results["linear"]
    metrics = {"iter": done, "epoch": it // cfg["iters_per_epoch"],
               "model": "teacher" if semi and run.teacher is not None else "student",
               "miou": linear["miou"], "pixel_acc": linear["pixel_acc"],
               "mean_acc": linear["mean_acc"], "iou": linear["iou"],
               "miou_proto": results["proto"]["miou"] if "proto" in results else None}
    ctx.log(evaluate_lib.format_table(linear, run.data.class_names))
    is_best = linear["miou"] > run.best["miou"]
    if is_best:
        run.best = {"miou": linear["miou"], "iter": done}
    metrics["best_miou"] = run.best["miou"]
    ctx.log(f"eval it {done}: mIoU {linear['miou']:.2f}"
            + (f" | prototype head {metrics['miou_proto']:.2f}" if "proto" in results else "")
            + f" | best {run.best['miou']:.2f} (it {run.best['iter']})")
    if ctx.main:
        with open(os.path.join(cfg["out"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if is_best:
        save_checkpoint(run, cfg, ctx, done, "best.pt")
    return metrics


def finish(run, cfg, ctx, last_metrics):
    """final.json and the final line: the last and the best evaluation."""
    summary = {"method": cfg["method"], "dataset": cfg["dataset"], "iters": cfg["total_iters"],
               "miou": last_metrics["miou"], "miou_proto": last_metrics["miou_proto"],
               "best_miou": run.best["miou"], "best_iter": run.best["iter"]}
    if ctx.main:
        with open(os.path.join(cfg["out"], "final.json"), "w") as f:
            json.dump(summary, f, indent=2)
    ctx.log("final: " + json.dumps(summary))
    if ctx.world > 1:
        dist.destroy_process_group()
    return 0


def main(argv=None):
    cfg, ctx, ckpt, ckpt_path, errors = setup(argv)
    if cfg["print_config"] and not errors:
        print(json.dumps(cfg, indent=2))
        return 0
    if errors:
        return report_errors(errors, ctx, cfg["out"])
    run, code = start_run(cfg, ctx, ckpt, ckpt_path)
    del ckpt  # its tensors are in the models now
    if run is None:
        return code
    total = cfg["total_iters"]
    if run.start_iter >= total:
        ctx.log(f"resume: the run already finished ({run.start_iter}/{total} iterations); nothing to do")
        return 0
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
    stop_vote = StopVote(stop_signal, ctx.world)
    loaders = {"labeled": make_loader(run.data.labeled, cfg, ctx, cfg["local_batch"], cfg["batch_size"],
                                      stream=0, start_iter=run.start_iter)}
    progress, last_metrics = Progress(cfg, run.start_iter, ctx.device), None

    for it in range(run.start_iter, total):
        semi = cfg["method"] != "supervised" and it >= cfg["warmup_iters"]
        if semi and it == cfg["warmup_iters"]:
            with progress.pause(it):  # the k-means is not training time
                start_semi_supervised(run.student, run.teacher, run.bank, run.data.labeled, cfg, ctx)
        try:
            batch = next_batch(loaders, run, cfg, ctx, it, semi)
        except data_lib.DataError as e:  # a file changed on disk since the data check
            return stop_on_bad_file(e, it, run, cfg, ctx)
        try:  # steps 2-10
            terms, finite = train_iteration(batch, (run.model, run.teacher, run.bank), run.optimizer,
                                            run.scaler, cfg, ctx, it, run.step_rng, semi)
        except torch.cuda.OutOfMemoryError:  # this name exists in every torch requirements.txt allows
            return report_out_of_memory(cfg, ctx, it, semi)
        progress.add(terms, finite, it)  # on the device; read back at the logging interval

        done = it + 1
        if (done % cfg["log_every"] == 0 or done == total) and not log_progress(progress, run, cfg,
                                                                                 ctx, it, semi):
            stop_vote.close()
            return 3
        if done % cfg["eval_every"] == 0 or done == total:
            with progress.pause(done, evaluation=True):  # evaluation time is not training speed
                try:
                    results = run_evaluation(run, cfg, ctx, semi)
                except data_lib.DataError as e:  # a val file changed on disk since the check
                    return stop_on_bad_file(e, done, run, cfg, ctx)
                check_replicas_equal(run.teacher, run.bank, ctx)
            last_metrics = record_evaluation(results, run, cfg, ctx, it, semi)
        stop = stop_vote()  # the same answer on every process: they stop together
        if done % cfg["save_every"] == 0 or done == total or stop:
            save_checkpoint(run, cfg, ctx, done)
        if stop:
            stop_vote.close()
            ctx.log(f"interrupted: saved {cfg['out']}/last.pt at iteration {done}; "
                    f"continue with --resume auto")
            return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)
    stop_vote.close()
    return finish(run, cfg, ctx, last_metrics)


if __name__ == "__main__":
    sys.exit(main())
