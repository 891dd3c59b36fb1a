"""train.py under torchrun on CPU (gloo): 2 processes on one node, 2 nodes x 1 process
over loopback, the global batch check, resuming with another number of processes, and
tests/replicas.py's check_replicas_equal (the proof, after every evaluation of the
2-process run, that every process holds the same teacher and prototypes) against
hand-made differences.
"""
import math
import os
import signal
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import train  # noqa: E402
from children import run, run_all, spawn  # noqa: E402
from prototypes import PrototypeBank  # noqa: E402
from replicas import bit_checksum, check_replicas_equal  # noqa: E402

ITERS = 6
# global batch 4 = 2 per process (the ASPP pooling BN needs 2); one evaluation at the end
TINY = ["--backbone", "resnet18", "--width", "0.125", "--crop-size", "32", "--batch-size", "4",
        "--workers", "0", "--iters", str(ITERS), "--warmup-iters", "3", "--eval-every", str(ITERS),
        "--log-every", "2"]
REPLICAS = "replicas: teacher and prototypes identical on 2 processes"


def environment():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(launch, out, *extra, script=ROOT / "train.py"):
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(script),
            *TINY, "--out", str(out), *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_lines(text, start):
    return sum(line.startswith(start) for line in text.splitlines())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-processes")
    done = run(torchrun(["--standalone", "--nproc_per_node=2"], out, "--save-every", "2",
                        script=ROOT / "tests" / "replicas.py"), cwd=ROOT, env=environment(), timeout=300)
    return out, done.returncode, done.stdout + done.stderr


def test_two_processes_one_node(two_processes):
    out, rc, output = two_processes
    assert rc == 0, output
    # the teacher and the prototypes are bit-identical on both processes (else an error)
    assert count_lines(output, REPLICAS) == 1
    # only rank 0 prints and writes: every line once
    assert count_lines(output, "it 2/6 |") == 1
    assert count_lines(output, "final: ") == 1
    log = (out / "log.txt").read_text()
    assert count_lines(log, "it 2/6 |") == 1 and count_lines(log, "final: ") == 1
    assert count_lines(log, REPLICAS) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "final.json").exists()
    assert not list(out.glob("*.tmp"))
    # evaluation is sharded (50 of the 100 toy val images each) and summed over processes
    # (the table counts the pixels of all 100 images of 80 x 80)
    assert "eval 50/50 images (rank 0 of 2)" in output
    assert "(640000 pixels)" in output
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["iter"] == ITERS
    assert len(checkpoint["rng"]) == 2  # both processes' random streams, for an exact resume
    assert not torch.equal(checkpoint["rng"][0]["step"], checkpoint["rng"][1]["step"])


def test_checkpoint_activations_under_ddp_change_nothing(two_processes, tmp_path):
    """The same 2-process run with --checkpoint-activations (the student's backbone
    recomputed inside DistributedDataParallel's backward): student, teacher and prototypes
    bit-identical to the run without."""
    plain, rc, output = two_processes
    assert rc == 0, output
    out = tmp_path / "checkpointed"
    done = run(torchrun(["--standalone", "--nproc_per_node=2"], out, "--save-every", "2",
                        "--checkpoint-activations", script=ROOT / "tests" / "replicas.py"),
               cwd=ROOT, env=environment(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    expected, got = (torch.load(d / "last.pt", map_location="cpu", weights_only=True) for d in (plain, out))
    assert got["config"]["checkpoint_activations"] and not expected["config"]["checkpoint_activations"]
    for part in ("student", "teacher", "prototypes"):
        assert expected[part].keys() == got[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(value, got[part][key]), (part, key)


def test_resume_with_another_number_of_processes(two_processes, tmp_path):
    """A 2-process checkpoint continues on 1 process, with a warning, not a crash."""
    out, rc, output = two_processes
    assert rc == 0, output
    run_dir = tmp_path / "one-process"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes((out / "last.prev.pt").read_bytes())  # iteration 4 of 6
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    torch.set_num_threads(1)
    try:
        rc = train.main(TINY + ["--out", str(run_dir), "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert rc == 0
    log = (run_dir / "log.txt").read_text()
    assert ("resume: the checkpoint was written by 2 processes, this run has 1: random streams "
            "restart (the run is not bit-exact)") in log
    assert f"resume: {run_dir / 'last.pt'} at iteration 4" in log
    assert torch.load(run_dir / "last.pt", weights_only=True)["iter"] == ITERS


def test_two_nodes_over_loopback(tmp_path):
    """2 torchrun agents (one per "node") meeting at a c10d rendezvous on 127.0.0.1."""
    out = tmp_path / "two-nodes"
    port = free_port()
    agents = run_all([torchrun(["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                f"--rdzv-id=pcr-test-{port}"], out, script=ROOT / "tests" / "replicas.py")
                       for node in (0, 1)], cwd=ROOT, env=environment(), timeout=300)
    both = "".join(agent.stdout for agent in agents)
    assert [agent.returncode for agent in agents] == [0, 0], both
    assert count_lines(both, REPLICAS) == 1
    assert count_lines(both, "final: ") == 1
    assert "2 processes on cpu" in both
    assert (out / "final.json").exists()


def test_global_batch_must_split_over_processes(tmp_path):
    """Checked before any file is written, printed once (rank 0), exit code 2, no traceback
    through train.py (torchrun's launcher adds its own failure report after it)."""
    out = tmp_path / "odd"
    done = run(torchrun(["--standalone", "--nproc_per_node=2"], out, "--batch-size", "3"),
               cwd=ROOT, env=environment(), timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch-size 3 (global) does not split over 2 processes; pass a "
                      "multiple of 2, e.g. --batch-size 4"], output
    assert "train.py\", line" not in output  # no traceback of the trainer
    assert "exitcode  : 2" in output
    assert not out.exists()  # no split lists, no log.txt


def test_bad_data_under_two_processes_is_reported_once(tmp_path):
    """Rank 0 checks the files, rank 1 waits for its verdict: one error line, both exit."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data import break_folder_root, make_folder_root
    root = tmp_path / "mine"
    make_folder_root(str(root), n_labeled=4, n_unlabeled=6, n_val=3)
    break_folder_root(str(root))
    done = run(torchrun(["--standalone", "--nproc_per_node=2"], tmp_path / "run",
                        "--dataset", "folder", "--data-root", str(root), "--num-classes",
                        "3", "--pretrained", "none", "--crop-size", "24"),
               cwd=ROOT, env=environment(), timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert count_lines(output, "error: the data check found 3 bad file(s)") == 1, output
    assert count_lines(output, "data check: val: mask") == 1


# ------------------------------------------------------------------ replicas.check_replicas_equal

def slow_bit_checksum(tensor):
    """Reference: numpy int32 bit patterns, Python integers (no overflow), then wrapped
    to int64 as torch's sums wrap."""
    bits = tensor.detach().numpy().astype(np.float32).reshape(-1).view(np.int32)
    plain = sum(int(b) for b in bits)
    weighted = sum(int(b) * (i % 1021 + 1) for i, b in enumerate(bits))

    def wrap(x):
        return (x + 2**63) % 2**64 - 2**63

    return [wrap(plain), wrap(weighted)]


def test_bit_checksum_matches_reference():
    torch.manual_seed(0)
    for tensor in (torch.randn(3, 5), torch.randn(2500) * 1e30, torch.tensor([-0.0, 0.0, 1.0])):
        assert bit_checksum(tensor).tolist() == slow_bit_checksum(tensor)
    # int64 buffers (BN's num_batches_tracked) are summed as they are
    assert bit_checksum(torch.tensor([3, 4])).tolist() == [7, 3 * 1 + 4 * 2]


def make_replica(seed=0):
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher[1].running_var.uniform_(0.5, 2.0)
    bank = PrototypeBank(3, 2, 4, generator=torch.Generator().manual_seed(0))
    return teacher, bank


def check_against(monkeypatch, mine, other):
    """check_replicas_equal on process 0 of 2, where process 1 holds `other`."""
    sent = []
    ctx = types.SimpleNamespace(world=2, rank=0, main=True, log=sent.append)

    def capture(outputs, tensor):  # what a process contributes to the all_gather
        sent.append(tensor.clone())
        for o in outputs:
            o.copy_(tensor)

    monkeypatch.setattr(torch.distributed, "all_gather", capture)
    check_replicas_equal(*other, ctx)
    theirs = sent[0]
    sent.clear()
    monkeypatch.setattr(torch.distributed, "all_gather",
                        lambda outputs, tensor: (outputs[0].copy_(tensor), outputs[1].copy_(theirs)))
    check_replicas_equal(*mine, ctx)
    return sent


def test_check_replicas_equal_passes_identical_copies(monkeypatch):
    assert check_against(monkeypatch, make_replica(), make_replica()) == [REPLICAS]


@pytest.mark.parametrize("where", ["teacher.1.running_var", "teacher.0.weight", "prototypes"])
def test_check_replicas_equal_finds_one_ulp(monkeypatch, where):
    mine, other = make_replica(), make_replica()
    tensor = other[1].prototypes if where == "prototypes" else other[0].state_dict()[where.split(".", 1)[1]]
    flat = tensor.view(-1)
    flat[1] = torch.nextafter(flat[1], torch.tensor(float("inf")))  # 1 ulp
    with pytest.raises(RuntimeError, match=f"process 1 holds a different {where} than process 0"):
        check_against(monkeypatch, mine, other)


def test_check_replicas_equal_finds_swapped_values(monkeypatch):
    """Same values in another order: the plain sums agree, the position-weighted do not."""
    mine, other = make_replica(), make_replica()
    prototypes = other[1].prototypes.view(-1)
    prototypes[[0, 1]] = prototypes[[1, 0]].clone()
    with pytest.raises(RuntimeError, match="different prototypes"):
        check_against(monkeypatch, mine, other)


# ------------------------------------------------------------------ progress-line losses

def log_sums_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    # rank r: 4 steps with losses (1 + r, 10 (1 + r), 100 (1 + r)), the last r non-finite
    cfg = dict(method="pcr", warmup_iters=0, total_iters=10, eval_every=10, batch_size=2)
    progress = train.Progress(cfg, 0, torch.device("cpu"))
    terms = dict(zip(train.LOSS_TERMS, torch.tensor([1.0, 10.0, 100.0]) * (1 + rank)))
    for it in range(4):
        finite = it < 4 - rank
        progress.add({k: v if finite else v * math.nan for k, v in terms.items()},
                     torch.tensor(finite), it)
    means, skipped, longest, _, _ = progress.take(world)
    torch.save((means, skipped, longest), os.path.join(out_dir, f"rank{rank}.pt"))


def test_progress_losses_are_averaged_over_processes(tmp_path):
    spawn(log_sums_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, timeout=120)
    for rank in range(3):
        means, skipped, longest = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # losses: the mean over processes and steps, a non-finite step counting 0:
        # (4 x 1 + 3 x 2 + 2 x 3) / 3 / 4 (x 1, 10, 100); non-finite steps 0 + 1 + 2, summed;
        # the longest non-finite run, 2 on process 2, everywhere
        assert means == pytest.approx([4 / 3, 40 / 3, 400 / 3])
        assert (skipped, longest) == (3, 2)


# ------------------------------------------------------------------ stopping on a signal

def stop_vote_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    received = []
    vote = train.StopVote(received, world)
    stopped_at = None
    for it in range(20):
        if rank == world - 1 and it == 3:  # the signal reaches one process only
            received.append(signal.SIGTERM)
        if vote():
            stopped_at = it
            break
    vote.close()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(str(stopped_at))


def test_a_signal_to_one_process_stops_all_at_the_next_iteration(tmp_path):
    """The vote launched at iteration 3 (after the signal) is read at iteration 4 by every
    process: all stop there together, none waits in a collective for the others."""
    spawn(stop_vote_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, timeout=120)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(3)] == ["4"] * 3


def test_a_single_process_stops_at_once():
    received = []
    vote = train.StopVote(received, 1)
    assert not vote()
    received.append(signal.SIGINT)
    assert vote()


@pytest.mark.parametrize("version, leaves_by", [("2.4.0+cu121", "os._exit"), ("2.7.1", "os._exit"),
                                                 ("2.8.0", "destroy"), ("2.14.1", "destroy")])
def test_exit_process_skips_the_process_group_teardown_before_torch_2_8(monkeypatch, version, leaves_by):
    """Before torch 2.8 destroying a gloo group can deadlock (train.exit_process): the process
    leaves by os._exit, with its exit code; from 2.8 on it destroys its groups, then sys.exit."""
    calls = []

    def fake_exit(code):
        calls.append("os._exit")
        raise SystemExit(code)
    monkeypatch.setattr(train.torch, "__version__", version)
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(train.os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as leaving:
        train.exit_process(3)
    assert leaving.value.code == 3 and calls == [leaves_by]
