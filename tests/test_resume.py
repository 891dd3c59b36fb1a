"""Checkpoints, resume and fault handling of train.py on tiny CPU runs.

A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; SIGTERM
saves and exits 143; a non-finite loss skips the step and, five in a row, stops the run
without a corrupt checkpoint; a truncated checkpoint falls back to the previous one or
is a clear error.
"""
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

TOTAL = 16
TINY = ["--backbone", "resnet18", "--width", "0.125", "--crop-size", "32", "--batch-size", "2",
        "--workers", "0", "--warmup-iters", "3", "--log-every", "2"]
# 16 iterations, checkpoints at 4, 8, 12, 16, one evaluation at the end
RUN = TINY + ["--iters", str(TOTAL), "--save-every", "4", "--eval-every", str(TOTAL)]


def command(out, *extra):
    return [sys.executable, str(ROOT / "train.py"), *RUN, "--out", str(out), *extra]


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def train_here(out, *extra, base=RUN):
    """train.main in this process, on one thread like the subprocesses (CPU kernels may
    sum in another order on more threads), restoring the signal handlers it installs."""
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    torch.set_num_threads(1)
    try:
        return train.main(base + (["--out", str(out)] if out is not None else []) + list(extra))
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    """Recursive torch.equal over nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"  # (no tensor dump: they are long)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(a, b):
    assert a["iter"] == b["iter"] == TOTAL
    for key in ("student", "teacher", "prototypes", "optimizer", "scaler", "rng", "best"):
        assert_same_tensors(a[key], b[key], key)


def all_finite(obj):
    if isinstance(obj, torch.Tensor):
        return not obj.dtype.is_floating_point or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train_here(out) == 0
    return out


# ------------------------------------------------------------------ kill and resume

def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists():
            assert process.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    # the kill landed mid-run, so the resumed run really continues from a checkpoint
    assert not (out / "final.json").exists()
    killed_at = load(out / "last.pt")["iter"]
    assert 0 < killed_at < TOTAL

    assert train_here(out, "--resume", "auto") == 0
    assert f"resume: {out / 'last.pt'} at iteration {killed_at}" in (out / "log.txt").read_text()
    assert_same_training_state(load(out / "last.pt"), load(uninterrupted / "last.pt"))


def test_sigterm_saves_and_exits_143(uninterrupted, tmp_path):
    """SIGTERM to the whole process group, as torchrun (killpg) and a terminal send it:
    the data-loading worker must survive it until the trainer has saved."""
    out = tmp_path / "terminated"
    process = subprocess.Popen(command(out, "--workers", "1"), cwd=ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("it 2/"):
                os.killpg(process.pid, signal.SIGTERM)
                break
        lines += process.stdout.readlines()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines)
    assert process.returncode == 128 + signal.SIGTERM, output
    stopped_at = load(out / "last.pt")["iter"]
    assert 2 <= stopped_at < TOTAL
    assert f"interrupted: saved {out}/last.pt at iteration {stopped_at}" in output
    assert not (out / "final.json").exists()

    assert train_here(out, "--resume", "auto") == 0
    assert (out / "final.json").exists()
    # stopping at the end of an iteration loses nothing: still the uninterrupted result
    assert_same_training_state(load(out / "last.pt"), load(uninterrupted / "last.pt"))


def test_resume_of_a_finished_run_does_nothing(uninterrupted, tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(uninterrupted, out)
    before = (out / "last.pt").read_bytes()
    assert train_here(out, "--resume", "auto") == 0
    assert "the run already finished (16/16 iterations)" in (out / "log.txt").read_text()
    assert (out / "last.pt").read_bytes() == before


# ------------------------------------------------------------------ the run's settings

def test_resume_without_flags_continues_the_stored_run(uninterrupted, tmp_path):
    """`--out DIR --resume auto` alone: the schedule (--iters 16, --warm-up 3), the network,
    crop and batch all come from the checkpoint, not from the toy preset (1,800 iterations,
    width 0.25, crop 64, ...); no second k-means; config.json is kept. A harmless flag
    (--log-every) may change, and the log says so."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(uninterrupted / "last.prev.pt", out / "last.pt")
    shutil.copy(uninterrupted / "config.json", out / "config.json")
    config_before = (out / "config.json").read_bytes()
    assert load(out / "last.pt")["iter"] == 12
    assert train_here(out, "--resume", "auto", "--log-every", "4", base=[]) == 0
    log = (out / "log.txt").read_text()
    assert f"resume: {out / 'last.pt'} at iteration 12" in log
    assert "resume: --log-every 2 -> 4 (does not change training)" in log
    assert "schedule: 16 iterations" in log and "the first 3 supervised" in log
    assert "k-means" not in log
    assert (out / "config.json").read_bytes() == config_before
    assert_same_training_state(load(out / "last.pt"), load(uninterrupted / "last.pt"))


def test_plain_resume_auto_continues_the_default_run_directory(uninterrupted, tmp_path, monkeypatch):
    """`python train.py --resume auto` finds the quick start's runs/toy_16_pcr_s0, even
    when the run was written elsewhere and moved there, and continues it in place."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "toy_16_pcr_s0"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "final.json").unlink()
    shutil.copy(run_dir / "last.prev.pt", run_dir / "last.pt")
    stamp = (uninterrupted / "last.pt").stat().st_mtime_ns
    assert train_here(None, "--resume", "auto", base=[]) == 0  # no --out
    assert (run_dir / "final.json").exists()
    assert "at iteration 12" in (run_dir / "log.txt").read_text()
    assert (uninterrupted / "last.pt").stat().st_mtime_ns == stamp  # not written to


def test_resume_with_a_conflicting_flag_stops_naming_both_values(uninterrupted, tmp_path, capsys):
    out = tmp_path / "conflict"
    shutil.copytree(uninterrupted, out)
    (out / "final.json").unlink()
    shutil.copy(out / "last.prev.pt", out / "last.pt")
    before = (out / "last.pt").read_bytes()
    assert train_here(out, "--resume", "auto", "--batch-size", "4", "--crop-size", "32",
                      "--lr", "0.02", base=[]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    # every conflict at once; --crop-size 32 is the stored value, so no conflict
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"error: --batch-size 4 differs from the run's --batch-size 2 "
                                f"({out / 'last.pt'})")
    assert errors[1].startswith("error: --lr 0.02 differs from the run's --lr 0.01")
    assert "error: --batch-size 4 differs" in (out / "log.txt").read_text()  # the run's log has it
    assert (out / "last.pt").read_bytes() == before


# ------------------------------------------------------------------ damaged checkpoints

def truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_truncated_last_falls_back_to_previous(uninterrupted, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(uninterrupted, out)
    truncate(out / "last.pt")
    assert load(out / "last.prev.pt")["iter"] == 12
    assert train_here(out, "--resume", "auto") == 0
    log = (out / "log.txt").read_text()
    assert f"warning: checkpoint {out / 'last.pt'} is unreadable" in log
    assert "falling back to the previous checkpoint" in log
    assert f"resume: {out / 'last.prev.pt'} at iteration 12" in log
    # iterations 12..16 again from the previous checkpoint: the same end state
    assert_same_training_state(load(out / "last.pt"), load(uninterrupted / "last.pt"))


def test_truncated_resume_path_exits_2(uninterrupted, tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    shutil.copy(uninterrupted / "last.pt", damaged)
    truncate(damaged)
    assert train_here(tmp_path / "run", "--resume", str(damaged)) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {damaged} is unreadable (truncated or corrupt?)" in error


def test_both_checkpoints_damaged_is_a_clear_error(uninterrupted, tmp_path, capsys):
    out = tmp_path / "both"
    out.mkdir()
    for name in ("last.pt", "last.prev.pt"):
        shutil.copy(uninterrupted / name, out / name)
        truncate(out / name)
    assert train_here(out, "--resume", "auto") == 2
    error = capsys.readouterr().err
    assert (f"error: --resume: no readable checkpoint among ['{out / 'last.pt'}', "
            f"'{out / 'last.prev.pt'}']") in error
    assert not (out / "final.json").exists()  # never a silent restart from scratch


def test_missing_resume_path_is_a_clear_error(tmp_path, capsys):
    assert train_here(tmp_path, "--resume", str(tmp_path / "nope.pt")) == 2
    assert f"error: --resume: checkpoint {tmp_path / 'nope.pt'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ non-finite losses

def test_nonfinite_streak_stops_without_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    """From the first PCR iteration (it = 3, logged as "it 4/12") on, the prototype loss
    is NaN (with a gradient path, as a real overflow would be): 5 skipped steps, stop at
    the progress line "it 8/12" with exit code 3; checkpoints 4 and 6 were written
    during the streak and hold the weights of the last good step."""
    real = train.prototype_loss
    monkeypatch.setattr(train, "prototype_loss", lambda logits, target: real(logits, target) * math.nan)
    out = tmp_path / "nan"
    assert train_here(out, "--iters", "12", "--save-every", "2", "--eval-every", "12", base=TINY) == 3
    text = capsys.readouterr().out
    # (the iteration is 0-based here, while the progress lines count 1-based: it 8/12)
    assert ("error: the loss was non-finite for 5 iterations in a row, last at iteration 7 "
            "(terms: proto)") in text
    progress = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("it ")}
    assert progress["it 4/12"].endswith("skipped 1") and progress["it 6/12"].endswith("skipped 2")
    last, previous = load(out / "last.pt"), load(out / "last.prev.pt")
    assert (previous["iter"], last["iter"]) == (4, 6)  # nothing saved when stopping at 8
    assert all_finite(last) and all_finite(previous)
    # every step since iteration 3 was skipped: weights, momentum and prototypes unchanged
    parameters = {name for name, _ in train.build_model(6, "resnet18", width=0.125).named_parameters()}
    assert_same_tensors({k: v for k, v in last["student"].items() if k in parameters},
                        {k: v for k, v in previous["student"].items() if k in parameters})
    assert_same_tensors(last["optimizer"]["state"], previous["optimizer"]["state"])
    assert_same_tensors(last["prototypes"], previous["prototypes"])
    # bf16/fp32 runs keep a loss scale of 1: skips must not shrink it
    assert last["scaler"]["scale"] == 1.0


def test_single_nonfinite_step_is_skipped(tmp_path, monkeypatch, capsys):
    """A NaN pixel in one labeled image at iteration 5 makes every activation of that
    step NaN (BN mixes the batch): the step is skipped, the student (weights AND BN
    statistics) and the prototypes stay as they were, and the run goes on."""
    real = train.train_step
    before = {}

    def spy(batch, models, cfg, ctx, it, step_rng):
        student, _, bank = models
        before[it] = ({k: v.clone() for k, v in student.state_dict().items()},
                      bank.prototypes.clone() if it >= 3 else None)
        if it == 5:
            batch["labeled"][0][0, :, :2, :2] = math.nan
        return real(batch, models, cfg, ctx, it, step_rng)

    monkeypatch.setattr(train, "train_step", spy)
    out = tmp_path / "one-nan"
    assert train_here(out, "--iters", "8", "--eval-every", "8", base=TINY) == 0
    text = capsys.readouterr().out
    log_line = next(line for line in text.splitlines() if line.startswith("it 6/8"))
    assert log_line.endswith("skipped 1")
    assert not any(line.startswith(("it 4/8", "it 8/8")) and "skipped" in line
                   for line in text.splitlines())
    student_5, prototypes_5 = before[5]
    student_6, prototypes_6 = before[6]
    assert_same_tensors({k: v for k, v in student_6.items() if "num_batches_tracked" not in k},
                        {k: v for k, v in student_5.items() if "num_batches_tracked" not in k})
    assert torch.equal(prototypes_6, prototypes_5)
    # and training goes on afterwards
    assert not torch.equal(before[7][0]["classifier.4.weight"], student_6["classifier.4.weight"])
    last = load(out / "last.pt")
    assert all_finite(last)
    assert last["scaler"]["scale"] == 1.0


def test_resume_keeps_the_stored_aux_head(tmp_path):
    """A run with an aux head (--aux-weight > 0, Cityscapes' preset) resumed without flags: the
    toy preset's aux weight 0 must not drop the head the checkpoint holds."""
    out = tmp_path / "aux"
    assert train_here(out, "--iters", "3", "--warmup-iters", "1", "--eval-every", "3",
                      "--save-every", "2", "--aux-weight", "0.4", base=TINY) == 0
    shutil.copy(out / "last.prev.pt", out / "last.pt")  # iteration 2 of 3
    (out / "final.json").unlink()
    assert train_here(out, "--resume", "auto", base=[]) == 0
    assert load(out / "last.pt")["iter"] == 3 and any("aux" in k for k in load(out / "last.pt")["student"])
