"""Speed and memory of one training iteration: supervised, mean teacher, PCR, and the
network's inherent work; a breakdown of the PCR step into its parts.

    inherent = student forward + backward on B_l + B_u images, teacher forward on B_u
               images, SGD step (with train.py's GradScaler), nothing else
    overhead = pcr_step / inherent   (target: <= 1.10)

Every step kind runs train.py's own functions on a synthetic batch (random images,
random labels with 10% ignored pixels), so no dataset is needed. The kinds are timed
in turns (supervised, inherent, meanteacher, PCR, breakdown, then again), which spreads
the noise of a shared machine evenly over them; each kind runs twice in a row and the
second run is timed (steady state, as in training); each figure is the median of --iters
repeats after --warmup rounds. The breakdown runs train.train_iteration itself: its parts
are the blocks train.py labels with torch.profiler.record_function (the same labels show
in any torch.profiler trace of training), timed on the device's timeline.

CPU, the reference configuration of the README (~5 minutes on 2 idle cores, 20 on busy
ones; --iters 1 --warmup 0 for a quick look):
    python bench.py --device cpu --backbone resnet18 --crop-size 129 --batch-size 4

One GPU, the paper's VOC setting per GPU (4 + 4 images of 513 x 513, OS 8):
    python bench.py --device cuda --backbone resnet101 --crop-size 513 --batch-size 4 \
        --amp bf16 --channels-last
    python bench.py --device cuda --backbone resnet101 --crop-size 513 --batch-size 4  # fp32 / TF32
    add --sync-check to prove that the PCR step never waits for the GPU

Peak memory and time of the PCR step without and with --checkpoint-activations (the
student's backbone recomputed in the backward pass), each in a fresh process:
    python bench.py --device cpu --backbone resnet50 --crop-size 257 --batch-size 2 \
        --iters 1 --warmup 0 --compare-checkpointing

The prototype update alone, against the per-class, per-prototype loop it replaces
(issue 2's comparison: N = 16384, 21 classes x 4 prototypes, 512-d):
    python bench.py --device cpu --prototype-update

The last line printed is one JSON object (for scripts); the table above it is for people.
"""
import argparse
import copy
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import train
from model import BACKBONES, build_model
from prototypes import PrototypeBank

# Dense peak TFLOPS: (name fragment, bf16/fp16, tf32, fp32). The first matching fragment
# wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 378.0, 51.0),
    ("H100", 989.0, 495.0, 67.0),
    ("H200", 989.0, 495.0, 67.0),
    ("A100", 312.0, 156.0, 19.5),
]
STEP_KINDS = ("supervised", "inherent", "meanteacher", "pcr")  # in increasing memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Speed and memory of the PCR training step "
                                "(see the module docstring for the reference commands)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    a("--backbone", default="resnet18", choices=sorted(BACKBONES))
    a("--output-stride", type=int, default=8, choices=[8, 16])
    a("--crop-size", type=int, default=129, help="square training crop")
    a("--batch-size", type=int, default=4, help="labeled images per process; the unlabeled batch is equal")
    a("--num-classes", type=int, default=21, help="classes (VOC: 21)")
    a("--width", type=float, default=1.0, help="channel multiplier of the network (1.0 = the paper's)")
    a("--amp", default="none", choices=["bf16", "fp16", "none"], help="mixed precision")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", action="store_true", help="torch.compile the student")
    a("--checkpoint-activations", action="store_true", help="recompute the student's backbone "
      "in the backward pass (train.py's flag)")
    a("--compare-checkpointing", action="store_true", help="run the benchmark twice, each in a "
      "fresh process, without and with --checkpoint-activations; report the PCR step's peak "
      "memory and time of each")
    a("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    a("--iters", type=int, default=5, help="timed repeats of every step kind (the median is reported)")
    a("--warmup", type=int, default=1, help="untimed rounds first (cuDNN autotuning, compilation, caches)")
    a("--peak-tflops", type=float, help="peak dense TFLOPS of the device for the MFU "
      "(default: from a table of known GPUs, by name and precision)")
    a("--prototype-update", action="store_true", help="time only PrototypeBank.update (given "
      "`nearest`) against a per-class, per-prototype loop and one read of the features, at "
      "--points x 512-d features and --num-classes x --prototypes; 10 x --iters repeats")
    a("--points", type=int, default=16384, help="--prototype-update: sampled pixels N")
    a("--prototypes", type=int, default=4, help="--prototype-update: prototypes per class")
    a("--sync-check", action="store_true", help="CUDA: run one PCR step under "
      "torch.cuda.set_sync_debug_mode('error'); fails if the step waits for the GPU")
    args = p.parse_args(argv)
    for flag, value, low in (("--crop-size", args.crop_size, 33), ("--batch-size", args.batch_size, 1),
                             ("--num-classes", args.num_classes, 2), ("--iters", args.iters, 1),
                             ("--warmup", args.warmup, 0), ("--points", args.points, 1),
                             ("--prototypes", args.prototypes, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.width <= 0:
        p.error(f"--width must be > 0, got {args.width}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.compile and (args.checkpoint_activations or args.compare_checkpointing):
        p.error("--checkpoint-activations with --compile is not supported (torch.compile "
                "would need its own recompute contexts)")
    if args.compare_checkpointing and (args.checkpoint_activations or args.prototype_update):
        p.error("--compare-checkpointing runs both settings of the PCR step by itself")
    return args


# ----------------------------------------------------------------------------------------
# Device, clock, memory

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = models[0] if models else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class Clock:
    """Laps on the device's timeline: CUDA events (read only at the end, so timing adds
    no host-device sync) or the host clock on CPU. lap(name) closes the part that began
    at the previous lap (or start)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self):
        self.marks = [(None, self._now())]

    def lap(self, name):
        self.marks.append((name, self._now()))

    @contextmanager
    def part(self, name):
        """Stands in for torch.profiler.record_function(name): laps `name` at the block's end."""
        yield
        self.lap(name)

    def seconds(self):
        """{part name: seconds}, in lap order (a repeated name accumulates)."""
        if self.cuda:
            torch.cuda.synchronize()
        parts = {}
        for (_, begin), (name, end) in zip(self.marks, self.marks[1:]):
            elapsed = begin.elapsed_time(end) / 1000 if self.cuda else end - begin
            parts[name] = parts.get(name, 0.0) + elapsed
        return parts


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS so far
    (the kernel keeps one high-water mark per process that cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def c_allocated():
    """Bytes the C allocator (glibc >= 2.33, which torch's CPU tensors come from) has handed
    out and not got back, heap and mmap; None elsewhere."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


class AllocationPeak(TorchDispatchMode):
    """CPU: the most bytes c_allocated() held after any operator inside, minus those at the
    start: the allocator's peak, which RSS overstates (freed heap pages stay resident)."""

    def __enter__(self):
        self.start = self.peak = c_allocated()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, c_allocated())
        return out


def upsampled_head_bytes(images, channels, crop, amp):
    """Memory the prototype head would need had it upsampled the feature map to image
    size, as the original code did: images x C x H x W x bytes, once for the forward
    activation and once for its gradient."""
    return 2 * images * channels * crop * crop * (2 if amp != "none" else 4)


def peak_tflops(name, amp):
    """(TFLOPS, precision label) from PEAK_TFLOPS, or (None, label) for an unknown device."""
    if amp != "none":
        precision = "bf16" if amp == "bf16" else "fp16"
    else:  # fp32 convolutions run on the TF32 tensor cores unless the user disabled it
        conv = getattr(torch.backends.cudnn, "conv", None)
        setting = getattr(conv, "fp32_precision", None)
        tf32 = setting == "tf32" if setting is not None else torch.backends.cudnn.allow_tf32
        precision = "tf32" if tf32 else "fp32"
    for fragment, half, tf32_rate, fp32_rate in PEAK_TFLOPS:
        if fragment in name:
            return {"bf16": half, "fp16": half, "tf32": tf32_rate, "fp32": fp32_rate}[precision], precision
    return None, precision


# ----------------------------------------------------------------------------------------
# Models, batch, and the step kinds (each one full iteration of train.py's loop)

def build_run(args, device):
    """Student, teacher, prototype bank, optimizer and scaler as train.build_everything
    makes them for one process (its data part aside), plus the trainer's settings."""
    cfg = train.resolve_config(train.parse_args(["--dataset", "voc"]))
    cfg.update(backbone=args.backbone, output_stride=args.output_stride, crop_size=args.crop_size,
               batch_size=args.batch_size, num_classes=args.num_classes, width=args.width,
               amp=args.amp, channels_last=args.channels_last, aux_weight=0.0,
               method="pcr", warmup_iters=0, iters_per_epoch=1000, total_epochs=80, total_iters=80000)
    torch.manual_seed(0)
    student = build_model(args.num_classes, args.backbone, args.output_stride, aux=False,
                          width=args.width).to(device)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.checkpoint_activations = args.checkpoint_activations
    bank = PrototypeBank(args.num_classes, cfg["num_prototypes"], student.feature_dim,
                         cfg["proto_momentum"], cfg["temperature"],
                         generator=torch.Generator().manual_seed(1)).to(device)
    optimizer, scaler = train.make_optimizer(student, cfg, device)
    model = torch.compile(student, dynamic=False) if args.compile else student
    return SimpleNamespace(cfg=cfg, ctx=SimpleNamespace(device=device, world=1), model=model, student=student,
                           teacher=teacher, bank=bank, optimizer=optimizer, scaler=scaler,
                           step_rng=torch.Generator().manual_seed(0), it=cfg["iters_per_epoch"])


def synthetic_batch(batch_size, crop, num_classes, device, channels_last, seed=0):
    """Labeled and unlabeled images ~ N(0, 1), labels uniform with 10% ignored (255), and
    the last eighth of the unlabeled rows marked as crop padding."""
    gen = torch.Generator().manual_seed(seed)
    image_l = torch.randn(batch_size, 3, crop, crop, generator=gen)
    image_u = torch.randn(batch_size, 3, crop, crop, generator=gen)
    label_l = torch.randint(0, num_classes, (batch_size, crop, crop), generator=gen)
    label_l[torch.rand(label_l.shape, generator=gen) < 0.1] = train.IGNORE
    padding_u = torch.zeros(batch_size, crop, crop, dtype=torch.bool)
    padding_u[:, crop - crop // 8:] = True
    if channels_last:
        image_l = image_l.contiguous(memory_format=torch.channels_last)
        image_u = image_u.contiguous(memory_format=torch.channels_last)
    return {"labeled": [image_l.to(device), label_l.to(device)],
            "unlabeled": [image_u.to(device), padding_u.to(device)]}


def loop_iteration(run, batch, method):
    """One iteration of train.py's loop (its lr schedule and log bookkeeping aside):
    train.train_iteration. Returns the loss terms."""
    cfg = dict(run.cfg, method=method)
    semi = method != "supervised"
    if not semi:
        batch = {"labeled": batch["labeled"]}
    models = (run.model, run.teacher if semi else None, run.bank if method == "pcr" else None)
    terms, _ = train.train_iteration(batch, models, run.optimizer, run.scaler, cfg, run.ctx, run.it,
                                     run.step_rng, semi)
    return terms


def inherent_iteration(run, batch, clock):
    """The work any mean-teacher segmenter does: teacher forward on the unlabeled images,
    student forward and backward on all images, SGD step. The loss is the cheapest one
    that reaches every weight: the mean of the stride-4 logits. clock.lap after each part."""
    image_l, _ = batch["labeled"]
    image_u, _ = batch["unlabeled"]
    clock.start()
    with torch.no_grad(), train.autocast(run.cfg["amp"], run.ctx.device):
        run.teacher(image_u)
    clock.lap("teacher forward")
    with train.autocast(run.cfg["amp"], run.ctx.device):
        logits, _, _ = run.model(torch.cat([image_l, image_u]))
    clock.lap("student forward")
    loss = logits.float().mean()
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clock.lap("backward (network)")
    run.scaler.step(run.optimizer)
    run.scaler.update(None if run.cfg["amp"] == "fp16" else 1.0)
    clock.lap("optimizer step")


# PCR parts that do the inherent work, and the inherent part they compare to.
INHERENT_COUNTERPART = {"teacher forward + pseudo-labels": "teacher forward",
                        "student forward": "student forward",
                        "backward (network + losses)": "backward (network)",
                        "optimizer step": "optimizer step"}


def pcr_iteration_parts(run, batch, clock):
    """loop_iteration(run, batch, "pcr"), that is the real train.train_iteration, cut into
    the parts that train.py labels with torch.profiler.record_function. While it runs,
    train's `record_function` is swapped for clock.part, which laps the clock when a
    labelled block ends: a part is the time from the end of the previous part (or the
    start) to the end of its label, so the parts partition the iteration up to its last
    label. Returns the loss terms."""
    clock.start()
    with mock.patch.object(train, "record_function", clock.part):
        return loop_iteration(run, batch, "pcr")


def step_flops(run, batch):
    """FLOPs of one PCR iteration (counted on the eager student: compilation changes the
    kernels, not the arithmetic)."""
    eager = SimpleNamespace(**vars(run))
    eager.model = run.student
    counter = FlopCounterMode(display=False)
    with counter:
        loop_iteration(eager, batch, "pcr")
    return counter.get_total_flops()


def sync_check(run, batch):
    """None if a PCR iteration runs under set_sync_debug_mode('error'), else the error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop_iteration(run, batch, "pcr")
        return None
    except RuntimeError as error:
        return str(error).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------

def measure(args, device):
    run = build_run(args, device)
    batch = synthetic_batch(args.batch_size, args.crop_size, args.num_classes, device, args.channels_last)

    def timed_step(method):
        def step(clock):
            clock.start()
            loop_iteration(run, batch, method)
            clock.lap(method)
        return step

    steps = {"supervised": timed_step("supervised"),
             "inherent": lambda clock: inherent_iteration(run, batch, clock),
             "meanteacher": timed_step("meanteacher"),
             "pcr": timed_step("pcr")}
    times = {kind: [] for kind in STEP_KINDS}
    memory = {kind: 0 for kind in STEP_KINDS}
    parts = {}           # PCR step by part: name -> seconds per repeat
    inherent_parts = {}  # the inherent step by part
    load = []  # 1-minute load average of the machine, once per timed round
    clock = Clock(device)
    for round_index in range(args.warmup + args.iters):
        timed = round_index >= args.warmup
        for kind in STEP_KINDS:
            # Twice, timing the second: the allocator then holds what this kind needs, as
            # in training, where every iteration is of one kind (on CPU, memory that a
            # smaller kind gave back to the OS costs page faults when touched again).
            steps[kind](clock)
            reset_peak_memory(device)
            steps[kind](clock)
            laps = clock.seconds()
            # CPU: the process's running peak, right after the kind's first run (the
            # kinds run in increasing memory, so this bounds each kind from above)
            if device.type == "cuda" or round_index == 0:
                memory[kind] = max(memory[kind], peak_memory(device))
            if timed:
                times[kind].append(sum(laps.values()))
                if kind == "inherent":
                    for name, seconds in laps.items():
                        inherent_parts.setdefault(name, []).append(seconds)
        pcr_iteration_parts(run, batch, clock)
        laps = clock.seconds()
        missing = set(INHERENT_COUNTERPART) - set(laps)
        if missing:
            raise RuntimeError(f"bench: train.train_iteration no longer labels {sorted(missing)} "
                               "with record_function; update INHERENT_COUNTERPART")
        if timed:
            load.append(os.getloadavg()[0])
            for name, seconds in laps.items():
                parts.setdefault(name, []).append(seconds)
    result = {
        "times": {kind: statistics.median(values) for kind, values in times.items()},
        # PCR and inherent of the same round ran seconds apart, under the same load
        "paired_ratio": statistics.median(p / i for p, i in zip(times["pcr"], times["inherent"])),
        "memory": memory,
        "parts": {name: statistics.median(values) for name, values in parts.items()},
        "inherent_parts": {name: statistics.median(values) for name, values in inherent_parts.items()},
        "flops": step_flops(run, batch),
        "sync_error": None,
        "load_average": statistics.median(load),
        "feature_dim": run.student.feature_dim,
    }
    if args.sync_check:
        result["sync_error"] = sync_check(run, batch)
    result["allocator_peak"] = None
    if device.type == "cpu" and c_allocated() is not None:  # one more PCR step, untimed
        with AllocationPeak() as allocations:
            loop_iteration(run, batch, "pcr")
        result["allocator_peak"] = allocations.peak - allocations.start
    return result


# ----------------------------------------------------------------------------------------
# --prototype-update: the update alone against the loop it replaces

def loop_prototype_update(prototypes, features, targets, nearest, momentum):
    """The per-class, per-prototype loop with boolean masks (how the original did it):
    the baseline of --prototype-update and the reference of tests/test_prototypes.py."""
    prototypes = prototypes.clone()
    num_classes, num_prototypes, _ = prototypes.shape
    for k in range(num_classes):
        for m in range(num_prototypes):
            assigned = (targets == k) & (nearest[:, k] == m)
            if assigned.sum().item() > 0:
                prototypes[k, m] = (momentum * prototypes[k, m]
                                    + (1 - momentum) * features[assigned].mean(dim=0))
    return prototypes


def measure_prototype_update(args, device, dim=512):
    """Medians of the loop, bank.update and features.sum(0) (one read of the features,
    the floor for anything that reads them), timed in turns; and the largest difference
    between the loop's and the update's prototypes."""
    generator = torch.Generator().manual_seed(0)
    bank = PrototypeBank(args.num_classes, args.prototypes, dim, generator=generator).to(device)
    features = torch.randn(args.points, dim, generator=generator).to(device)
    targets = torch.randint(0, args.num_classes, (args.points,), generator=generator).to(device)
    targets[::10] = train.IGNORE
    _, nearest = bank(features)
    start = bank.prototypes.clone()
    expected = loop_prototype_update(start, features, targets, nearest, bank.momentum)
    bank.update(features, targets, nearest)
    max_abs_diff = (bank.prototypes - expected).abs().max().item()
    kinds = {"loop": lambda: loop_prototype_update(start, features, targets, nearest, bank.momentum),
             "update": lambda: bank.update(features, targets, nearest),
             "read": lambda: features.sum(dim=0)}
    times = {kind: [] for kind in kinds}
    clock = Clock(device)
    for round_ in range(args.warmup + 10 * args.iters):
        for kind, run in kinds.items():
            clock.start()
            run()
            clock.lap(kind)
            if round_ >= args.warmup:
                times[kind].append(clock.seconds()[kind])
    return {kind: statistics.median(values) for kind, values in times.items()}, max_abs_diff


def report_prototype_update(args, name, times, max_abs_diff):
    print(f"prototype update: N = {args.points} points x 512-d, {args.num_classes} classes x "
          f"{args.prototypes} prototypes, 10% ignored")
    print(f"device: {name} | load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"median of {10 * args.iters} repeats after {args.warmup} warm-up round(s)\n")
    print(f"{'':<40}{'ms':>8}{'loop / this':>14}")
    labels = {"loop": "per-class, per-prototype loop", "update": "PrototypeBank.update",
              "read": "one read of the features (sum(0))"}
    for kind, label in labels.items():
        print(f"{label:<40}{1000 * times[kind]:>8.2f}{times['loop'] / times[kind]:>14.2f}")
    print(f"largest |update - loop| over the prototypes: {max_abs_diff:.2e}")
    summary = {"device": name, "points": args.points, "num_classes": args.num_classes,
               "prototypes": args.prototypes, "threads": torch.get_num_threads(),
               "loop_s": times["loop"], "update_s": times["update"], "read_s": times["read"],
               "speedup": times["loop"] / times["update"], "update_over_read": times["update"] / times["read"],
               "max_abs_diff": max_abs_diff}
    print(json.dumps(summary))
    return summary


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def report(args, device, name, result):
    """The table for people, then the JSON line for scripts (last)."""
    times, memory, parts = result["times"], result["memory"], result["parts"]
    inherent = times["inherent"]
    images = 2 * args.batch_size
    precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[args.amp]
    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"bench: {args.backbone} x{args.width:g} OS{args.output_stride}, crop {args.crop_size}, "
          f"batch {args.batch_size} + {args.batch_size}, {args.num_classes} classes, {precision}, "
          f"{layout}{', compiled' if args.compile else ''}"
          f"{', backbone recomputed in the backward pass' if args.checkpoint_activations else ''}")
    print(f"device: {name}" + (f" | load average {result['load_average']:.2f} (1 min, median over "
                                f"the rounds)" if device.type == "cpu" else ""))
    print(f"median of {args.iters} repeats after {args.warmup} warm-up round(s)\n")
    mem_note = "peak mem" if device.type == "cuda" else "process peak RSS*"
    print(f"{'step':<34}{'seconds':>10}{'x inherent':>12}{mem_note:>20}")
    for kind in STEP_KINDS:
        print(f"{kind:<34}{times[kind]:>10.4f}{times[kind] / inherent:>12.3f}"
              f"{human_bytes(memory[kind]):>20}")
    if device.type == "cpu":
        print("* RSS cannot be reset: each figure is the process's peak so far, taken after the\n"
              "  kind's first run; the kinds run in increasing memory, so it bounds the kind's peak.")
        if result["allocator_peak"] is not None:
            print(f"  PCR step, C allocator's peak above its start: {human_bytes(result['allocator_peak'])}"
                  " (glibc mallinfo2 after every operator of one more step)")
    total = sum(parts.values())
    inherent_parts = result["inherent_parts"]
    print(f"\n{'PCR step by part':<34}{'ms':>10}{'share':>10}{'inherent ms':>14}{'extra ms':>10}")
    for part, seconds in parts.items():
        line = f"  {part:<32}{1000 * seconds:>10.1f}{100 * seconds / total:>9.1f}%"
        if part in INHERENT_COUNTERPART:
            counterpart = inherent_parts[INHERENT_COUNTERPART[part]]
            line += f"{1000 * counterpart:>14.1f}{1000 * (seconds - counterpart):>10.1f}"
        else:
            line += f"{'':>14}{1000 * seconds:>10.1f}"
        print(line)
    inherent_total = sum(inherent_parts.values())
    print(f"  {'sum of parts':<32}{1000 * total:>10.1f}{'':>10}{1000 * inherent_total:>14.1f}"
          f"{1000 * (total - inherent_total):>10.1f}")
    print(f"  (the steps timed alone: PCR {1000 * times['pcr']:.1f} ms, inherent {1000 * inherent:.1f} ms;"
          f" 'extra' = PCR's cost beyond the network's work)")
    machinery = sum(seconds for part, seconds in parts.items() if part not in INHERENT_COUNTERPART)
    print(f"PCR / inherent: {times['pcr'] / inherent:.3f} (medians), {result['paired_ratio']:.3f} "
          f"(median of the per-round ratios); PCR's own parts outside the network passes: "
          f"{1000 * machinery:.1f} ms = {100 * machinery / inherent:.1f}% of the inherent step")

    dim = result["feature_dim"]
    upsampled = upsampled_head_bytes(images, dim, args.crop_size, args.amp)
    print(f"\nupsampled prototype head (not used; the original's): {images} x {dim} x "
          f"{args.crop_size} x {args.crop_size} x {2 if args.amp != 'none' else 4} B x 2 (fwd + bwd) "
          f"= {human_bytes(upsampled)}")
    flops = result["flops"]
    pcr = times["pcr"]
    images_per_s = images / pcr
    line = f"PCR step: {flops / 1e9:.1f} GFLOP, {flops / pcr / 1e12:.3f} TFLOPS achieved, " \
           f"{images_per_s:.1f} images/s (student images)"
    peak, peak_precision = (None, None)
    mfu = None
    if device.type == "cuda":
        peak, peak_precision = peak_tflops(name, args.amp)
        if args.peak_tflops is not None:
            peak = args.peak_tflops
        if peak is not None:
            mfu = flops / pcr / (peak * 1e12)
            line += f", MFU {100 * mfu:.1f}% of {peak:g} TFLOPS ({peak_precision})"
        else:
            line += f", MFU unknown ({name} not in the table; pass --peak-tflops)"
    print(line)
    if args.sync_check:
        error = result["sync_error"]
        print("sync check: " + ("passed, no host-device sync inside the PCR step" if error is None
                                else f"FAILED, the PCR step synchronises: {error}"))
    summary = {
        "device": name, "device_type": device.type, "backbone": args.backbone, "width": args.width,
        "output_stride": args.output_stride, "crop_size": args.crop_size, "batch_size": args.batch_size,
        "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "checkpoint_activations": args.checkpoint_activations,
        "iters": args.iters, "warmup": args.warmup,
        "pcr_step_s": pcr, "supervised_step_s": times["supervised"],
        "meanteacher_step_s": times["meanteacher"], "inherent_s": inherent,
        "overhead_ratio": pcr / inherent, "overhead_ratio_paired": result["paired_ratio"],
        "machinery_s": machinery,
        "peak_mem_bytes": memory["pcr"], "peak_mem_bytes_by_step": memory,
        "pcr_allocator_peak_bytes": result["allocator_peak"],
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss_running",
        "breakdown_s": parts, "inherent_breakdown_s": inherent_parts, "upsampled_head_bytes": upsampled,
        "flops_per_pcr_step": flops, "images_per_s": images_per_s,
        "peak_tflops": peak, "mfu": mfu,
        "sync_check": None if not args.sync_check else ("passed" if result["sync_error"] is None
                                                        else result["sync_error"]),
    }
    if device.type == "cpu":
        summary["load_average"] = result["load_average"]
    print(json.dumps(summary))
    return summary


def paired_time_ratio(args, device):
    """Median over --iters rounds (after --warmup) of the PCR step's time with / without
    checkpointing, the two timed back to back on one model (each after an untimed step of
    its own setting), so that a shared machine's changing load weighs on both alike."""
    run = build_run(args, device)
    batch = synthetic_batch(args.batch_size, args.crop_size, args.num_classes, device, args.channels_last)
    clock, ratios = Clock(device), []
    for round_index in range(args.warmup + args.iters):
        seconds = []
        for checkpointed in (False, True):
            run.student.checkpoint_activations = checkpointed
            loop_iteration(run, batch, "pcr")
            clock.start()
            loop_iteration(run, batch, "pcr")
            clock.lap("pcr")
            seconds.append(clock.seconds()["pcr"])
        if round_index >= args.warmup:
            ratios.append(seconds[1] / seconds[0])
    return statistics.median(ratios)


def compare_checkpointing(argv, args, device):
    """--compare-checkpointing: bench.py with argv without, then with --checkpoint-activations,
    each in a fresh process (on CPU the peak RSS of a process cannot be reset): the PCR step's
    peak memory and median time of each; then, in this process, paired_time_ratio. One JSON
    line holds it all."""
    runs = {}
    for setting, extra in (("without", []), ("with", ["--checkpoint-activations"])):
        command = [sys.executable, os.path.abspath(__file__),
                   *[a for a in argv if a != "--compare-checkpointing"], *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"bench: {' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
        runs[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    first, (memory_ratio, allocator_ratio) = runs["without"], (
        runs["with"][key] / runs["without"][key] if runs["without"][key] else None
        for key in ("peak_mem_bytes", "pcr_allocator_peak_bytes"))
    time_ratio = paired_time_ratio(args, device)
    print(f"bench --compare-checkpointing: {first['backbone']} x{first['width']:g} "
          f"OS{first['output_stride']}, crop {first['crop_size']}, batch {first['batch_size']} + "
          f"{first['batch_size']}, --amp {first['amp']}, median of {first['iters']} PCR steps, "
          f"each setting in a fresh process")
    print(f"device: {first['device']}")
    memory = "peak mem" if first["device_type"] == "cuda" else "process peak RSS"
    allocator = first["pcr_allocator_peak_bytes"] is not None
    print(f"{'backbone recomputed':<22}{'PCR step s':>12}{memory:>20}"
          + (f"{'C allocator peak*':>20}" if allocator else ""))
    for setting, summary in runs.items():
        print(f"{setting:<22}{summary['pcr_step_s']:>12.4f}{human_bytes(summary['peak_mem_bytes']):>20}"
              + (f"{human_bytes(summary['pcr_allocator_peak_bytes']):>20}" if allocator else ""))
    print(f"with / without: {memory} {memory_ratio:.3f}x"
          + (f", C allocator peak* {allocator_ratio:.3f}x" if allocator else "")
          + f"; time {time_ratio:.3f}x (median of {args.iters} paired steps in one process)"
          + ("\n* of one PCR step above its start (bench.AllocationPeak)" if allocator else ""))
    print(json.dumps({"device": first["device"], "time_ratio": time_ratio, "memory_ratio": memory_ratio,
                      "allocator_peak_ratio": allocator_ratio, "runs": runs}))
    return 0


def main(argv=None):
    args = parse_args(argv)

    def parser_error(message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        device = train.pick_device(args.device)  # made current: events and memory statistics of it
    except train.SetupError as e:
        parser_error(str(e))
    if args.sync_check and device.type != "cuda":
        parser_error("--sync-check needs a CUDA device (--device cuda)")
    if args.amp == "fp16" and device.type != "cuda":
        parser_error("--amp fp16 needs a CUDA device; use --amp bf16 or none on CPU")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.compare_checkpointing:
        return compare_checkpointing(sys.argv[1:] if argv is None else argv, args, device)
    name = device_name(device)
    if args.prototype_update:
        report_prototype_update(args, name, *measure_prototype_update(args, device))
        return 0
    result = measure(args, device)
    summary = report(args, device, name, result)
    return 1 if args.sync_check and summary["sync_check"] != "passed" else 0


if __name__ == "__main__":
    sys.exit(main())
