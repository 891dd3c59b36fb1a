"""train.py end to end: a training step learns, a toy run writes its run directory, the real
dataset layouts train through the documented flags, presets, and loud failures."""
import functools
import json
import math
import os
import re
import sys
import types

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prototypes  # noqa: E402
import train  # noqa: E402
import data as data_lib  # noqa: E402
from test_data import break_folder_root, make_cityscapes_root, make_folder_root, make_voc_root  # noqa: E402

TINY = ["--backbone", "resnet18", "--width", "0.125", "--crop-size", "32", "--batch-size", "2",
        "--workers", "0", "--log-every", "2"]


def run_main(args, capsys):
    code = train.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_training_step_lowers_the_loss_on_a_fixed_batch():
    """Ten PCR steps on one batch: every loss term is finite and the total goes down."""
    torch.manual_seed(0)
    cfg = train.resolve_config(train.parse_args(TINY + ["--lr", "0.01"]))
    cfg.update(iters_per_epoch=10, total_epochs=10, warmup_iters=0, local_batch=2)
    ctx = train.Context("cpu")
    data, student, teacher, bank, optimizer, scaler = train.build_everything(cfg, ctx)
    batch = {"labeled": [torch.stack(x) for x in zip(*(data.labeled[(i, i)] for i in range(2)))],
             "unlabeled": [torch.stack(x) for x in zip(*(data.unlabeled[(i, i)] for i in range(2)))]}
    train.init_prototypes(bank, student, data.labeled, cfg, ctx)
    teacher.load_state_dict(student.state_dict())
    rng = torch.Generator().manual_seed(0)
    losses = []
    for it in range(10):
        rng.manual_seed(0)  # same CutMix boxes and sampled pixels every step
        terms, (feature, target, nearest) = train.train_step(batch, (student, teacher, bank), cfg, ctx, it, rng)
        assert set(terms) == {"sup", "unsup", "proto"}
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        bank.update(feature, target, nearest)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_toy_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_main(TINY + ["--iters", "6", "--warmup-iters", "2", "--eval-every", "3",
                                       "--out", str(out)], capsys)
    assert code == 0
    for name in ("config.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "final.json",
                 "labeled.txt", "unlabeled.txt", "val.txt"):
        assert (out / name).exists(), name
    final = json.loads((out / "final.json").read_text())
    assert final["iters"] == 6 and final["miou"] >= 0 and final["miou_proto"] is not None
    assert final["best_miou"] >= final["miou"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics] == [3, 6]
    assert metrics[0]["model"] == "teacher" and metrics[0]["miou_proto"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "pcr" and config["width"] == 0.125
    # progress lines carry every loss term, lr, speed and ETA; evaluation prints the IoU table
    assert "sup " in stdout and "unsup " in stdout and "proto " in stdout
    assert " lr " in stdout and "img/s" in stdout and "eta " in stdout
    assert "background" in stdout and "mIoU" in stdout
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 6 and ckpt["prototypes"]["prototypes"].shape == (6, 4, 64)
    # a second run into the same folder must not overwrite it silently; it says whether
    # the folder holds this run or one with other settings, and which
    code, _, err = run_main(TINY + ["--iters", "6", "--out", str(out)], capsys)
    assert code == 2 and f"--out {out} already holds this run (last.pt); continue it with --resume auto" in err
    code, _, err = run_main(TINY + ["--iters", "6", "--lr", "0.02", "--seed", "1", "--out", str(out)], capsys)
    assert code == 2 and (f"--out {out} already holds a run with other settings (--seed 0 there, 1 here; "
                          "--lr 0.01 there, 0.02 here)") in err


@pytest.mark.parametrize("method", ["supervised", "meanteacher"])
def test_baselines_run(tmp_path, capsys, method):
    out = tmp_path / method
    code, stdout, _ = run_main(TINY + ["--method", method, "--iters", "4", "--warmup-iters", "2",
                                       "--eval-every", "4", "--out", str(out)], capsys)
    assert code == 0
    final = json.loads((out / "final.json").read_text())
    assert final["miou_proto"] is None
    assert ("unsup " in stdout) == (method == "meanteacher") and "proto " not in stdout


def test_folder_dataset_trains(tmp_path, capsys):
    root = tmp_path / "mydata"
    make_folder_root(str(root), n_labeled=4, n_unlabeled=6, n_val=2, num_classes=3)
    out = tmp_path / "run"
    code, stdout, _ = run_main(TINY + ["--dataset", "folder", "--data-root", str(root), "--num-classes", "3",
                                       "--pretrained", "none", "--crop-size", "24", "--iters", "4",
                                       "--warmup-iters", "2", "--out", str(out)], capsys)
    assert code == 0, stdout
    assert "4 labeled / 6 unlabeled / 2 val" in stdout
    assert json.loads((out / "final.json").read_text())["iters"] == 4


def test_voc_layout_with_published_split_lists_trains(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    train_ids, extra_ids, val_ids = make_voc_root(root, n_train=40, n_extra=60, n_val=4)
    split = tmp_path / "splits" / "20"
    split.mkdir(parents=True)
    labeled = train_ids[:20]
    (split / "labeled.txt").write_text("\n".join(labeled) + "\n")
    (split / "unlabeled.txt").write_text("\n".join(i for i in train_ids + extra_ids if i not in labeled))
    code, stdout, err = run_main(TINY + ["--dataset", "voc", "--data-root", str(root), "--labeled", "20",
                                         "--split-dir", str(split), "--pretrained", "none", "--crop-size", "24",
                                         "--iters", "3", "--warmup-iters", "1", "--out", str(tmp_path / "run")],
                                 capsys)
    assert code == 0, err
    assert "20 labeled / 80 unlabeled / 4 val" in stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["head_lr_mult"] == 10.0 and config["num_classes"] == 21
    assert "head lr mult 10.0" in stdout and "num classes 21" in stdout  # the preset's summary


def test_cityscapes_layout_trains_with_aux_head(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    paths = make_cityscapes_root(root, train_cities=(("aachen", 6), ("bremen", 6)), val_cities=(("lindau", 2),))
    split = tmp_path / "split"
    split.mkdir()
    (split / "labeled.txt").write_text("\n".join(paths["train"][:4]))
    (split / "unlabeled.txt").write_text("\n".join(paths["train"][4:]))
    code, stdout, err = run_main(TINY + ["--dataset", "cityscapes", "--data-root", str(root), "--labeled", "4",
                                         "--split-dir", str(split), "--pretrained", "none", "--crop-size", "24",
                                         "--iters", "3", "--warmup-iters", "1", "--out", str(tmp_path / "run")],
                                 capsys)
    assert code == 0, err
    assert "4 labeled / 8 unlabeled / 2 val" in stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    student = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["student"]
    assert any(key.startswith("aux_classifier.") for key in student)  # aux_weight 0.4: an aux head
    assert config["aux_weight"] == 0.4 and config["eval_mode"] == "sliding"
    assert "aux weight 0.4" in stdout and "evaluation: eval mode sliding" in stdout


def test_paper_presets():
    cfg = train.resolve_config(train.parse_args(["--dataset", "voc", "--labeled", "366"]))
    expected = dict(backbone="resnet101", output_stride=8, crop_size=513, epochs=80, lr=0.001,
                    head_lr_mult=10.0, weight_decay=1e-4, num_prototypes=4, conf_threshold=0.8,
                    aux_weight=0.0, batch_size=16, num_classes=21, width=1.0, temperature=0.1,
                    proto_momentum=0.99, ema_decay=0.99, grid=32, ohem_thresh=0.7,
                    ohem_min_kept_per_image=50000, drop_start=0.2, cutmix_prob=0.5, momentum=0.9)
    assert {k: cfg[k] for k in expected} == expected
    cfg = train.resolve_config(train.parse_args(["--dataset", "cityscapes", "--lr", "0.02"]))
    expected = dict(crop_size=769, epochs=200, lr=0.02, head_lr_mult=1.0, weight_decay=5e-4,
                    num_prototypes=3, conf_threshold=0.65, aux_weight=0.4,
                    num_classes=19, eval_mode="sliding")
    assert {k: cfg[k] for k in expected} == expected


def test_missing_pretrained_weights_stop_the_paper_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["--dataset", "voc", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")],
                            capsys)
    assert code == 2
    assert "pretrained/resnet101.pth" in err and "--pretrained torchvision" in err


def test_bad_inputs_exit_nonzero_naming_the_culprit(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run_main(TINY + ["--dataset", "folder", "--data-root", str(missing), "--num-classes", "3",
                                    "--pretrained", "none", "--out", str(tmp_path / "r1")], capsys)
    assert code == 2 and str(missing) in err.strip().splitlines()[-1]
    code, _, err = run_main(TINY + ["--num-classes", "9", "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "--num-classes" in err
    with pytest.raises(SystemExit):  # argparse: not a method
        train.parse_args(["--method", "fixmatch"])


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-0.01"], "--lr -0.01: must be > 0"),
    (["--cutmix-prob", "1.5"], "--cutmix-prob 1.5: must be >= 0 and <= 1"),
    (["--conf-threshold", "nan"], "--conf-threshold nan: must be >= 0 and <= 1"),
    (["--num-prototypes", "0"], "--num-prototypes 0: must be >= 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1: must be >= 0"),
    (["--iters", "4", "--warmup-iters", "4"], "--warmup-iters 4 leaves no semi-supervised iteration"),
])
def test_out_of_range_flags_stop_before_anything_is_built(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, _, err = run_main(TINY + flags + ["--out", str(out)], capsys)
    assert code == 2 and message in err.strip().splitlines()[-1]
    assert not out.exists()  # nothing written: the run stops before the run directory exists


def test_loss_weight_and_cutmix_flags_reach_the_config(tmp_path, capsys):
    code, out, _ = run_main(["--cutmix-prob", "1", "--unsup-weight", "2", "--proto-weight", "0.5",
                             "--ema-decay", "0.999", "--print-config"], capsys)
    config = json.loads(out)
    assert code == 0 and (config["cutmix_prob"], config["unsup_weight"], config["proto_weight"],
                          config["ema_decay"]) == (1.0, 2.0, 0.5, 0.999)


def test_warmup_longer_than_the_epochs_stops(tmp_path, capsys):
    # 480 unlabeled / batch 2 = 240 iterations per epoch: one epoch cannot hold 240 warm-up ones
    code, _, err = run_main(TINY + ["--epochs", "1", "--warmup-iters", "240", "--out", str(tmp_path)],
                            capsys)
    assert code == 2 and ("--warmup-iters 240 leaves no semi-supervised iteration of 240 "
                          "(--epochs 1 x 240 per epoch)") in err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, warmup", [
    ([], 60),                                        # every preset: one epoch
    (["--warmup-epochs", "6", "--epochs", "8"], 240),  # at most half the run
    (["--warmup-epochs", "2"], 120),
    (["--warmup-epochs", "2", "--warmup-iters", "7"], 7),  # iterations override epochs
    (["--dataset", "voc", "--iters", "1000"], 30),   # VOC's batch 16: 30 iterations per epoch
    (["--method", "supervised", "--warmup-epochs", "9", "--epochs", "4"], 120),
])
def test_warmup_from_the_preset_epochs(flags, warmup):
    cfg = train.resolve_config(train.parse_args(flags))
    data = types.SimpleNamespace(labeled=[None] * 16, unlabeled=[None] * 480)
    train.check_batches(cfg, types.SimpleNamespace(world=1), data)
    assert cfg["iters_per_epoch"] == 480 // cfg["batch_size"] and cfg["warmup_iters"] == warmup


def test_a_skipped_first_step_leaves_the_optimizer_clean():
    """fp16 training skips its first steps (the loss scale starts at 2^16 and the
    gradients overflow). Fused SGD must come out of that with defined momentum buffers:
    the next finite step equals one plain SGD step from a fresh state."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(64, 64)
            self.head = torch.nn.Linear(64, 3)

    torch.manual_seed(0)
    net = Net()
    cfg = dict(lr=0.1, head_lr_mult=10.0, momentum=0.9, weight_decay=1e-4, amp="fp16")
    optimizer, scaler = train.make_optimizer(net, cfg, torch.device("cpu"))
    assert scaler.get_scale() == 2.0**16
    params = list(net.parameters())
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    reference = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.SGD([{"params": reference[:2], "lr": 0.1}, {"params": reference[2:], "lr": 1.0}],
                            momentum=0.9, weight_decay=1e-4)
    scaler.scale(torch.ones(()))  # the scaler starts its scale lazily, as in a real step
    for p in params:  # an overflowing step: skipped, scale halved
        p.grad = torch.full_like(p, math.inf)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    grads = [torch.randn_like(p) for p in params]
    for p, r, g in zip(params, reference, grads):
        p.grad = g * scaler.get_scale()  # as scaler.scale(loss).backward() would give
        r.grad = g.clone()
    scaler.step(optimizer)
    plain.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach())


def test_out_of_memory_stops_with_the_settings_and_what_to_change(tmp_path, capsys, monkeypatch):
    """Running out of memory at the first semi-supervised step (twice the batch of the
    warm-up) ends the run with exit code 4 and a message naming the batch, crop and amp."""
    real = train.train_iteration

    def fail_when_semi(*args):
        if args[-1]:  # semi
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(train, "train_iteration", fail_when_semi)
    code, _, err = run_main(TINY + ["--iters", "4", "--warmup-iters", "2", "--save-every", "2",
                                    "--out", str(tmp_path / "oom")], capsys)
    assert code == 4
    assert ("out of CPU memory at iteration 2 on process 0 (semi-supervised step, 2 + 2 images "
            "of 32 px per process, --amp none). Use --amp bf16, --checkpoint-activations, more") in err
    assert torch.load(tmp_path / "oom" / "last.pt", weights_only=True)["iter"] == 2


FOLDER = ["--dataset", "folder", "--pretrained", "none", "--crop-size", "24", "--num-classes", "3"]


def test_bad_files_are_all_reported_before_the_first_iteration(tmp_path, capsys, monkeypatch):
    """An RGB colour mask, a bad value in a val mask and a corrupt unlabeled JPEG: one error
    naming the three files, exit code 2, and no training iteration ran."""
    root = tmp_path / "mine"
    make_folder_root(str(root), n_labeled=4, n_unlabeled=6, n_val=3)
    bad = break_folder_root(str(root))
    iterations = []
    monkeypatch.setattr(train, "train_iteration", lambda *args: iterations.append(args))
    out = tmp_path / "run"
    code, stdout, err = run_main(TINY + FOLDER + ["--data-root", str(root), "--iters", "4",
                                                  "--warmup-iters", "2", "--out", str(out)], capsys)
    assert code == 2 and not iterations and not (out / "last.pt").exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the data check found 3 bad file(s)") and all(n in line for n in bad)
    assert "colour-coded RGB image" in stdout and "data check: val: mask" in stdout
    assert json.loads((out / "data_check.json").read_text())["ok"] is False


def test_data_check_is_recorded_and_a_file_failing_during_training_saves_and_names_it(
        tmp_path, capsys, monkeypatch):
    """The check passes and is recorded; then the unlabeled images break (changed on disk):
    the semi-supervised phase stops at its first batch, read by a loader worker, with
    last.pt written and the file named. With the files restored as they were, --resume auto
    skips the check and finishes."""
    root = tmp_path / "mine"
    make_folder_root(str(root), n_labeled=4, n_unlabeled=6, n_val=2)
    unlabeled = sorted((root / "JPEGImages").glob("u*"))
    saved = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in unlabeled}
    real_check = data_lib.check_data

    def check_then_break(*args, **kwargs):
        record = real_check(*args, **kwargs)
        for path in unlabeled:
            path.write_bytes(saved[path][0][:60])
        return record

    monkeypatch.setattr(data_lib, "check_data", check_then_break)
    out = tmp_path / "run"
    args = TINY + FOLDER + ["--data-root", str(root), "--iters", "4", "--warmup-iters", "2",
                            "--workers", "1", "--out", str(out)]
    code, stdout, err = run_main(args, capsys)
    assert "data check: 12 images and 6 masks decode" in stdout
    assert json.loads((out / "data_check.json").read_text())["ok"] is True
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot decode image ") and "JPEGImages/u" in line
    assert f"saved {out}/last.pt at iteration 2" in line and "Traceback" not in line
    assert torch.load(out / "last.pt", weights_only=True)["iter"] == 2
    monkeypatch.setattr(data_lib, "check_data", real_check)
    for path, (payload, mtime) in saved.items():
        path.write_bytes(payload)
        os.utime(path, ns=(mtime, mtime))
    code, stdout, err = run_main(args + ["--resume", "auto"], capsys)
    assert code == 0, err
    assert "data check: skipped" in stdout and "resume:" in stdout


def test_skip_data_check_and_a_val_file_failing_at_evaluation(tmp_path, capsys):
    """--skip-data-check trains on a bad val mask; the evaluation then stops the run with
    last.pt written at that iteration and the mask named."""
    root = tmp_path / "mine"
    make_folder_root(str(root), n_labeled=4, n_unlabeled=4, n_val=3)
    break_folder_root(str(root))  # l1.png and u2.jpg are not listed here
    (root / "labeled.txt").write_text("l0\nl2\nl3\n")
    (root / "unlabeled.txt").write_text("u0\nu1\nu3\n")
    (root / "val.txt").write_text("v0\nv2\n")
    out = tmp_path / "run"
    code, stdout, err = run_main(TINY + FOLDER + ["--data-root", str(root), "--iters", "4",
                                                  "--warmup-iters", "2", "--eval-every", "2",
                                                  "--skip-data-check", "--out", str(out)], capsys)
    assert code == 2 and "data check: skipped (--skip-data-check)" in stdout
    assert not (out / "data_check.json").exists() and "it 2/4" in stdout
    line = err.strip().splitlines()[-1]
    assert re.search(r"^error: mask \S*v2\.png has values 9 .* saved \S*last\.pt at iteration 2", line)
    assert torch.load(out / "last.pt", weights_only=True)["iter"] == 2


def test_folder_preset_and_classes_txt(tmp_path, capsys):
    """The folder preset is the small-data one; classes.txt alone sets the class count."""
    cfg = train.resolve_config(train.parse_args(["--dataset", "folder"]))
    assert (cfg["backbone"], cfg["pretrained"], cfg["output_stride"], cfg["crop_size"],
            cfg["batch_size"]) == ("resnet50", "torchvision", 16, 321, 8)
    root = tmp_path / "mine"
    make_folder_root(str(root), n_labeled=2, n_unlabeled=2, n_val=1)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    folder = [a for a in FOLDER if a not in ("--num-classes", "3")]
    code, stdout, err = run_main(TINY + folder + ["--data-root", str(root), "--iters", "2",
                                                  "--warmup-iters", "1", "--out", str(tmp_path / "r")],
                                 capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["num_classes"] == 3
    assert "sky" in stdout and "car" in stdout  # the IoU table names the classes
    code, _, err = run_main(TINY + FOLDER + ["--data-root", str(root), "--num-classes", "4",
                                             "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "classes.txt names 3 classes but --num-classes is 4" in err


class HostReads(TorchFunctionMode):
    """Fails on every read of a tensor's value by the host (item, bool, int, tolist,
    nonzero, boolean-mask or 0-dim-tensor indexing, ...): on a GPU each of them makes the
    host wait for the device. Lets CI, which has no GPU, guard the CUDA promise that a
    training iteration never synchronises (tests/test_cuda.py checks it on a real GPU)."""
    READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
             Tensor.__index__, Tensor.nonzero, torch.nonzero, Tensor.masked_select,
             torch.masked_select, Tensor.unique, torch.unique, torch.bincount, Tensor.bincount}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read: {func.__name__}")
        if func in (Tensor.__getitem__, Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            for part in index:
                if isinstance(part, Tensor) and (part.dtype == torch.bool or part.dim() == 0):
                    raise AssertionError(f"host read: {func.__name__} with a "
                                         f"{'boolean mask' if part.dtype == torch.bool else '0-dim tensor'}")
        return func(*args, **(kwargs or {}))


def test_host_reads_are_caught():
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: bool(x[0] > 1), lambda: x[x > 2],
                 lambda: x[torch.tensor(1)], lambda: int(x[3]), lambda: torch.nonzero(x)):
        with pytest.raises(AssertionError, match="host read"), HostReads():
            read()
    with HostReads():
        x[torch.tensor([1, 2])], torch.where(x > 2, x, 0)  # index arrays and where are fine


@pytest.mark.parametrize("method", ["pcr", "supervised"])
def test_training_iteration_reads_nothing_on_the_host(method, monkeypatch):
    """train_iteration along its CUDA code paths (strided point gather, index_add_ row
    sums, sorted entropies) under HostReads: no value goes to the host, so nothing waits for a GPU."""
    monkeypatch.setattr(train, "sample_features", functools.partial(prototypes.sample_features, rows=False))
    monkeypatch.setattr(prototypes, "sum_rows_by_index",
                        functools.partial(prototypes.sum_rows_by_index, grouped=False))
    monkeypatch.setattr(train, "sorted_value_at", functools.partial(train.sorted_value_at, host_read=False))
    torch.manual_seed(0)
    cfg = train.resolve_config(train.parse_args(TINY + ["--method", method]))
    cfg.update(iters_per_epoch=10, total_epochs=10, total_iters=100, warmup_iters=1, local_batch=2)
    ctx = train.Context("cpu")
    data, student, teacher, bank, optimizer, scaler = train.build_everything(cfg, ctx)
    batch = {"labeled": [torch.stack(x) for x in zip(*(data.labeled[(i, i)] for i in range(2)))],
             "unlabeled": [torch.stack(x) for x in zip(*(data.unlabeled[(i, i)] for i in range(2)))]}
    if bank is not None:
        train.init_prototypes(bank, student, data.labeled, cfg, ctx)
    rng = torch.Generator().manual_seed(0)
    models = (student, teacher, bank)
    for it in range(3):  # warm-up step, then semi-supervised steps
        semi = method != "supervised" and it >= 1
        with HostReads():
            terms, finite = train.train_iteration(batch, models, optimizer, scaler, cfg, ctx, it, rng, semi)
        assert bool(finite) and set(terms) == ({"sup", "unsup", "proto"} if semi else {"sup"})


def test_teacher_is_the_student_in_the_first_semi_supervised_epoch_then_an_ema():
    """docs/METHOD.md step 10: during the first semi-supervised epoch (here iterations 1-3 of
    3 per epoch after 1 warm-up iteration) the teacher equals the student bit for bit
    after every iteration; afterwards teacher = a teacher + (1 - a) student with
    a = min(1 - 1/(t + 1), 0.99), t = iterations since the semi-supervised phase began."""
    torch.manual_seed(0)
    cfg = train.resolve_config(train.parse_args(TINY))
    cfg.update(iters_per_epoch=3, total_epochs=4, total_iters=12, warmup_iters=1, local_batch=2)
    ctx = train.Context("cpu")
    data, student, teacher, bank, optimizer, scaler = train.build_everything(cfg, ctx)
    batch = {"labeled": [torch.stack(x) for x in zip(*(data.labeled[(i, i)] for i in range(2)))],
             "unlabeled": [torch.stack(x) for x in zip(*(data.unlabeled[(i, i)] for i in range(2)))]}
    rng = torch.Generator().manual_seed(0)
    models = (student, teacher, bank)
    train.train_iteration(batch, models, optimizer, scaler, cfg, ctx, 0, rng, semi=False)
    train.init_prototypes(bank, student, data.labeled, cfg, ctx)
    teacher.load_state_dict(student.state_dict())  # as main does when the warm-up ends
    for it in range(1, 7):
        before = {k: v.double().clone() for k, v in teacher.state_dict().items()}
        train.train_iteration(batch, models, optimizer, scaler, cfg, ctx, it, rng, semi=True)
        t = it - cfg["warmup_iters"]
        for name, value in teacher.state_dict().items():
            own = student.state_dict()[name]
            if t < cfg["iters_per_epoch"] or not value.dtype.is_floating_point:
                assert torch.equal(value, own), (it, name)
            else:
                alpha = min(1 - 1 / (t + 1), 0.99)  # 0.75, 0.8, 0.833
                expected = alpha * before[name] + (1 - alpha) * own.double()
                assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6), (it, name)
        if t >= cfg["iters_per_epoch"]:
            params = [(teacher.state_dict()[k], v) for k, v in student.named_parameters()]
            assert any(not torch.equal(a, b) for a, b in params), it  # the EMA lags


@pytest.mark.parametrize("device, amp", [
    ("cpu", "none"), ("cpu", "bf16"),
    pytest.param("cuda", "bf16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_checkpoint_activations_change_nothing_but_memory(monkeypatch, device, amp):
    """--checkpoint-activations through a warm-up iteration, the k-means prototypes, a
    semi-supervised iteration in the first epoch (teacher = student) and one after (EMA):
    loss terms, gradients, weights, BN statistics, prototypes and teacher are bit-identical
    to the run without, and only the student's training passes were checkpointed (one per
    stem and residual block), never the teacher's nor the k-means features. On CUDA, whose
    backward kernels add in no fixed order, floats agree to a tolerance and the BN batch
    counters exactly (a recomputation that updated BN would count twice)."""
    model_module = sys.modules[train.build_model.__module__]
    calls, real = [], model_module.checkpoint

    def counted(function, x, *modules, **kwargs):
        calls.append(modules)
        return real(function, x, *modules, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counted)
    runs = []
    for flags in ([], ["--checkpoint-activations"]):
        torch.manual_seed(0)
        cfg = train.resolve_config(train.parse_args(TINY + flags + ["--device", device, "--amp", amp]))
        cfg.update(iters_per_epoch=1, total_epochs=4, total_iters=4, warmup_iters=1, local_batch=2)
        ctx = train.Context(device)
        data, student, teacher, bank, optimizer, scaler = train.build_everything(cfg, ctx)
        assert student.checkpoint_activations == bool(flags) and not teacher.checkpoint_activations
        batch = {name: [torch.stack(x).to(ctx.device) for x in zip(*map(getattr(data, name).__getitem__,
                                                                        [(0, 0), (1, 1)]))]
                 for name in ("labeled", "unlabeled")}
        rng, states = torch.Generator().manual_seed(0), []
        for it in range(3):
            if it == cfg["warmup_iters"]:
                train.start_semi_supervised(student, teacher, bank, data.labeled, cfg, ctx)
            torch.manual_seed(100 + it)  # dropout
            terms, finite = train.train_iteration(batch, (student, teacher, bank), optimizer, scaler,
                                                  cfg, ctx, it, rng, semi=it >= 1)
            assert bool(finite) and len(terms) == (3 if it else 1)
            states.append({**{"loss " + k: v.detach() for k, v in terms.items()},
                           **{"grad " + k: p.grad.clone() for k, p in student.named_parameters()},
                           **{"student " + k: v.clone() for k, v in student.state_dict().items()},
                           **{"teacher " + k: v.clone() for k, v in teacher.state_dict().items()},
                           "prototypes": bank.prototypes.clone()})
        runs.append(states)
        if not flags:
            assert calls == []
    student_modules = {id(m) for m in student.modules()}
    assert len(calls) == 3 * 9  # three student forwards, resnet18: stem + 8 blocks
    assert all(id(m) in student_modules for modules in calls for m in modules)
    for it, (plain, recomputed) in enumerate(zip(*runs)):
        assert plain.keys() == recomputed.keys()
        for name, value in plain.items():
            if device == "cpu" or not value.is_floating_point():
                assert torch.equal(value, recomputed[name]), (it, name)
            else:
                torch.testing.assert_close(value, recomputed[name], rtol=1e-2, atol=1e-3, msg=f"{it} {name}")
    assert not torch.equal(runs[0][2]["teacher backbone.bn1.running_mean"],
                           runs[0][2]["student backbone.bn1.running_mean"])  # an EMA by then


def test_checkpoint_activations_may_change_when_a_run_resumes():
    cfg = train.resolve_config(train.parse_args(TINY + ["--checkpoint-activations"]))
    stored, lines = dict(cfg, checkpoint_activations=False), []
    resumed, errors = train.resumed_config(cfg, {"checkpoint_activations": True}, stored,
                                           "run/last.pt", lines.append)
    assert errors == [] and resumed["checkpoint_activations"] is True
    assert lines == ["resume: --checkpoint-activations False -> True (does not change training)"]


# ------------------------------------------------------------------ a user's first hour

def test_out_defaults_to_a_directory_named_after_the_run():
    def out(*flags):
        return train.resolve_config(train.parse_args(list(flags)))["out"]
    assert out() == os.path.join("runs", "toy_16_pcr_s0")
    assert out("--dataset", "voc", "--labeled", "732", "--method", "supervised", "--seed", "2") == \
        os.path.join("runs", "voc_732_supervised_s2")
    assert out("--dataset", "folder", "--data-root", "/data/coins/") == \
        os.path.join("runs", "folder-coins_lists_pcr_s0")
    assert out("--out", "elsewhere") == "elsewhere"


def test_every_setup_error_is_reported_at_once_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained/resnet101.pth here
    out = tmp_path / "run"
    code, _, err = run_main(["--dataset", "voc", "--data-root", "/nonexistent", "--lr", "-1",
                             "--out", str(out)], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, err
    assert errors[0] == "error: --lr -1.0: must be > 0"
    assert errors[1] == "error: --data-root /nonexistent does not exist (or is not a folder)"
    assert errors[2].startswith("error: --pretrained: ImageNet weights not found at pretrained/resnet101.pth")
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_an_error_after_the_run_directory_exists_is_in_its_log(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(TINY + ["--num-classes", "9", "--out", str(out)], capsys)
    assert code == 2
    assert "error: --num-classes 9: the toy dataset has 6 classes" in err
    assert "error: --num-classes 9: the toy dataset has 6 classes" in (out / "log.txt").read_text()


def test_help_shows_preset_values_instead_of_none(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "(preset: toy, cityscapes 0.01; voc, folder 0.001)" in text  # --lr
    assert "(preset: toy 64; voc 513; cityscapes 769; folder 321)" in text  # --crop-size
    assert "(default: 0.99)" in text and "(default: pcr)" in text
    assert "runs/DATASET_LABELED_METHOD_sSEED" in text


def test_config_is_described_in_a_few_lines():
    cfg = train.resolve_config(train.parse_args(["--method", "meanteacher"]))
    cfg.update(iters_per_epoch=60, total_iters=60, total_epochs=1, warmup_iters=30, eval_every=60,
               save_every=60, num_classes=1, local_batch=8)
    ctx = types.SimpleNamespace(world=1, device=torch.device("cpu"))
    lines = train.describe_config(cfg, ctx)
    assert len(lines) <= 10 and all(len(line) < 240 for line in lines)
    text = "\n".join(lines)
    sections = [line.split(":")[0] for line in lines]
    assert sections == ["run", "model", "training", "optimizer", "losses", "unlabeled", "evaluation",
                        "process", "schedule"]  # mean teacher has no prototypes
    assert "60 iterations = 1 epoch of 60, the first 30 supervised" in text
    assert "1 process on cpu, 8 + 8 images each" in text and "unsup weight 1.0" in text
    assert "min kept 50000 x 8 = 400000 per process" in text


def test_speed_and_eta_on_a_fake_clock():
    """Warm-up 1 s / iteration, k-means 10 s, semi-supervised 3 s / iteration, evaluation
    5 s. Speed counts training only; the ETA adds each phase at its own measured speed
    (the semi-supervised one guessed at SEMI_COST_GUESS x the warm-up until measured) and
    the evaluations once one has been measured."""
    now = [100.0]
    cfg = dict(method="pcr", warmup_iters=4, total_iters=12, eval_every=6, batch_size=2)
    progress = train.Progress(cfg, 0, torch.device("cpu"), clock=lambda: now[0])
    guess = train.Progress.SEMI_COST_GUESS
    now[0] += 2  # iterations 0, 1
    assert progress.speed(2) == pytest.approx(2 * 2 / 2)  # labeled images only in the warm-up
    # 2 warm-up iterations left at 1 s, 8 semi-supervised at the guess; evaluations at 6 and 12
    assert progress.eta(2) == (pytest.approx(2 * 1 + 8 * guess), 2)
    now[0] += 2  # iterations 2, 3
    with progress.pause(4):  # prototype k-means
        now[0] += 10
    now[0] += 6  # iterations 4, 5
    # since the last line: 2 warm-up iterations (2 images each) in 2 s and 2 semi-supervised
    # ones (2 + 2 images) in 6 s; the 10 s of k-means left out
    assert progress.speed(6) == pytest.approx((2 * 2 + 2 * 4) / 8)
    assert progress.eta(6) == (pytest.approx(6 * 3), 2)
    with progress.pause(6, evaluation=True):
        now[0] += 5
    now[0] += 6  # iterations 6, 7
    # the evaluation's 5 s are neither in the speed nor counted as iterations
    assert progress.speed(8) == pytest.approx(2 * 4 / 6)
    assert progress.eta(8) == (pytest.approx(4 * 3 + 1 * 5), 0)
    # a resumed run (no warm-up left, nothing measured yet) guesses nothing it need not
    resumed = train.Progress(cfg, 8, torch.device("cpu"), clock=lambda: now[0])
    now[0] += 6  # iterations 8, 9
    assert resumed.speed(10) == pytest.approx(2 * 4 / 6)
    assert resumed.eta(10) == (pytest.approx(2 * 3), 1)


def test_progress_keeps_the_loss_bookkeeping_on_the_device():
    cfg = dict(method="pcr", warmup_iters=0, total_iters=4, eval_every=4, batch_size=2)
    progress = train.Progress(cfg, 0, torch.device("cpu"))
    ok, bad = torch.tensor(True), torch.tensor(False)
    progress.add({"sup": torch.tensor(1.0), "unsup": torch.tensor(2.0)}, ok, 0)
    progress.add({"sup": torch.tensor(math.nan), "unsup": torch.tensor(2.0)}, bad, 1)
    progress.add({"sup": torch.tensor(3.0), "unsup": torch.tensor(2.0)}, ok, 2)
    means, skipped, longest, bad_iter, last_bad = progress.take(1)
    assert means == [pytest.approx(4 / 3), pytest.approx(4 / 3), 0.0]  # skipped step counts 0
    assert (skipped, longest, bad_iter, last_bad) == (1, 1, 1, [1.0, 0.0, 0.0])
    assert progress.take(1)[:3] == ([0.0, 0.0, 0.0], 0, 0)  # reset
