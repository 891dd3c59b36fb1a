"""bench.py: the report, the breakdown (train.py's own step cut at its labels), and the
small formulas."""
import json
import time

import pytest
import torch

import bench
import train

TINY = ["--device", "cpu", "--backbone", "resnet18", "--width", "0.125", "--crop-size", "33",
        "--batch-size", "2"]
PARTS = ["teacher forward + pseudo-labels", "cutmix", "student forward", "supervised loss (OHEM)",
         "unsupervised loss", "pixel sampling + targets", "prototype logits", "prototype loss",
         "backward (network + losses)", "optimizer step", "prototype update", "EMA teacher"]


def test_main_prints_table_then_json(capsys):
    assert bench.main(TINY + ["--iters", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])  # the JSON line comes last
    table = "\n".join(lines[:-1])
    for kind in ("supervised", "inherent", "meanteacher", "pcr"):
        assert any(line.startswith(kind + " ") for line in lines), kind
    for part in PARTS:
        assert part in table, part
    assert "upsampled prototype head" in table and "GFLOP" in table
    for key in ("pcr_step_s", "supervised_step_s", "meanteacher_step_s", "inherent_s",
                "peak_mem_bytes", "device", "overhead_ratio", "breakdown_s", "flops_per_pcr_step"):
        assert key in summary, key
    assert summary["device_type"] == "cpu" and summary["device"]
    for key in ("pcr_step_s", "supervised_step_s", "meanteacher_step_s", "inherent_s"):
        assert summary[key] > 0
    assert summary["overhead_ratio"] == pytest.approx(summary["pcr_step_s"] / summary["inherent_s"])
    assert summary["overhead_ratio_paired"] == pytest.approx(summary["overhead_ratio"])  # one round
    assert summary["peak_mem_bytes"] >= summary["peak_mem_bytes_by_step"]["supervised"] > 0
    breakdown = summary["breakdown_s"]
    assert list(breakdown) == PARTS and all(v > 0 for v in breakdown.values())
    # the table's "sum of parts" row is the JSON breakdown's sum (that the parts are train.py's
    # labels of one PCR iteration is proved without timers in test_breakdown_is_the_real_...;
    # a wall-clock ratio between two separately timed runs flaked on a loaded 2-core box)
    sum_row = next(line for line in lines if line.strip().startswith("sum of parts"))
    assert float(sum_row.split()[3]) == pytest.approx(1000 * sum(breakdown.values()), abs=0.051)
    inherent_parts = summary["inherent_breakdown_s"]  # with one repeat they sum to the step
    assert sum(inherent_parts.values()) == pytest.approx(summary["inherent_s"])
    assert set(bench.INHERENT_COUNTERPART) <= set(breakdown)
    own = [part for part in PARTS if part not in bench.INHERENT_COUNTERPART]
    assert len(own) == 8 and summary["machinery_s"] == pytest.approx(sum(breakdown[p] for p in own))
    # the same channel count and crop in the analytic formula as in the run (width 0.125)
    assert summary["upsampled_head_bytes"] == 2 * 4 * 64 * 33 * 33 * 4
    assert summary["flops_per_pcr_step"] > 0 and summary["mfu"] is None  # MFU: CUDA only
    if bench.c_allocated() is not None:  # glibc
        assert 0 < summary["pcr_allocator_peak_bytes"] < summary["peak_mem_bytes"]
        assert "C allocator's peak above its start" in table


def test_allocation_peak_counts_what_is_held_at_once():
    """AllocationPeak: 40 MB held together, then freed, then 24 MB: a peak of 40 MB."""
    if bench.c_allocated() is None:
        pytest.skip("no glibc mallinfo2")
    with bench.AllocationPeak() as allocations:
        first = torch.ones(10_000_000)  # 40 MB
        del first
        second = torch.ones(6_000_000)  # 24 MB
    assert 40e6 <= allocations.peak - allocations.start < 41e6
    del second


def test_compare_checkpointing_runs_each_setting_in_a_fresh_process(capsys):
    assert bench.main(TINY + ["--iters", "1", "--warmup", "0", "--compare-checkpointing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    runs = summary["runs"]
    assert [runs[s]["checkpoint_activations"] for s in ("without", "with")] == [False, True]
    assert runs["with"]["crop_size"] == 33 and runs["with"]["device_type"] == "cpu"
    assert summary["time_ratio"] > 0  # paired steps in the parent process
    assert summary["memory_ratio"] == pytest.approx(runs["with"]["peak_mem_bytes"]
                                                    / runs["without"]["peak_mem_bytes"])
    assert summary["allocator_peak_ratio"] == pytest.approx(runs["with"]["pcr_allocator_peak_bytes"]
                                                            / runs["without"]["pcr_allocator_peak_bytes"])
    # recomputation is counted: the checkpointed step does more arithmetic
    assert runs["with"]["flops_per_pcr_step"] > runs["without"]["flops_per_pcr_step"]
    table = "\n".join(lines[:-1])
    assert "device: " in table and "with / without: process peak RSS" in table and "paired steps" in table
    assert [line.split()[0] for line in lines[3:5]] == ["without", "with"]
    # the flag reaches the student only
    run = bench.build_run(bench.parse_args(TINY + ["--checkpoint-activations"]), torch.device("cpu"))
    assert run.student.checkpoint_activations and not run.teacher.checkpoint_activations


def _state(run):
    return ([p.detach().clone() for p in run.student.parameters()],
            {k: v.clone() for k, v in run.teacher.state_dict().items()},
            run.bank.prototypes.clone(), run.step_rng.get_state())


def test_breakdown_is_the_real_train_iteration_cut_at_its_labels():
    """pcr_iteration_parts runs train.train_iteration itself, its record_function labels
    swapped for the clock: the laps are train.py's labels in order, and from the same state
    the losses, weights, teacher, prototypes and RNG state are those of loop_iteration."""
    args = bench.parse_args(TINY)
    device = torch.device("cpu")
    reference, timed = bench.build_run(args, device), bench.build_run(args, device)
    batch = bench.synthetic_batch(2, 33, args.num_classes, device, False, seed=3)
    for step in range(2):  # the second step has SGD momentum and moved prototypes
        torch.manual_seed(10 + step)  # dropout
        expected = bench.loop_iteration(reference, batch, "pcr")
        torch.manual_seed(10 + step)
        clock = bench.Clock(device)
        got = bench.pcr_iteration_parts(timed, batch, clock)
        assert list(clock.seconds()) == PARTS
        assert train.record_function is torch.profiler.record_function  # put back
        assert got.keys() == expected.keys() == {"sup", "unsup", "proto"}
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        (params_a, teacher_a, bank_a, rng_a), (params_b, teacher_b, bank_b, rng_b) = \
            _state(reference), _state(timed)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
        assert torch.equal(bank_a, bank_b) and torch.equal(rng_a, rng_b)


def test_the_parts_are_record_function_labels_a_profiler_sees():
    """The labels bench reads are real torch.profiler.record_function ranges of
    train.train_iteration, in order, each entered once per PCR iteration."""
    args = bench.parse_args(TINY)
    run = bench.build_run(args, torch.device("cpu"))
    batch = bench.synthetic_batch(2, 33, args.num_classes, torch.device("cpu"), False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        bench.loop_iteration(run, batch, "pcr")
    labels = [event for event in profiler.events() if event.name in PARTS]
    labels.sort(key=lambda event: event.time_range.start)
    assert [event.name for event in labels] == PARTS
    # the ranges follow one another without overlapping
    for before, after in zip(labels, labels[1:]):
        assert before.time_range.end <= after.time_range.start


def test_loop_iteration_matches_train_step_directly():
    """loop_iteration's losses are train.train_step's on the same state (PCR and mean teacher)."""
    args = bench.parse_args(TINY)
    device = torch.device("cpu")
    for method in ("pcr", "meanteacher", "supervised"):
        run_a, run_b = bench.build_run(args, device), bench.build_run(args, device)
        batch = bench.synthetic_batch(2, 33, args.num_classes, device, False, seed=4)
        torch.manual_seed(5)
        got = bench.loop_iteration(run_a, batch, method)
        torch.manual_seed(5)
        cfg = dict(run_b.cfg, method=method)
        step_batch = batch if method != "supervised" else {"labeled": batch["labeled"]}
        expected, _ = train.train_step(step_batch, (run_b.student, run_b.teacher, run_b.bank), cfg,
                                       run_b.ctx, run_b.it, run_b.step_rng)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key].detach(), expected[key].detach()), (method, key)


def test_inherent_iteration_trains_the_student_only():
    args = bench.parse_args(TINY)
    run = bench.build_run(args, torch.device("cpu"))
    batch = bench.synthetic_batch(2, 33, args.num_classes, torch.device("cpu"), False)
    before = _state(run)
    clock = bench.Clock(torch.device("cpu"))
    bench.inherent_iteration(run, batch, clock)
    after = _state(run)
    assert list(clock.seconds()) == ["teacher forward", "student forward", "backward (network)",
                                     "optimizer step"]
    assert set(bench.INHERENT_COUNTERPART.values()) == set(clock.seconds())
    assert not all(torch.equal(a, b) for a, b in zip(before[0], after[0]))  # SGD stepped
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])    # teacher untouched
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])


def test_upsampled_head_bytes_by_hand():
    # VOC per GPU: 8 images x 512 x 513 x 513; 513^2 = 263169, x 512 x 8 = 1077940224 values
    assert bench.upsampled_head_bytes(8, 512, 513, "none") == 1077940224 * 4 * 2
    assert bench.upsampled_head_bytes(8, 512, 513, "bf16") == 1077940224 * 2 * 2


def test_peak_tflops_table(monkeypatch):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.0, "bf16")
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16") == (756.0, "bf16")
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB", "fp16") == (312.0, "fp16")
    assert bench.peak_tflops("NVIDIA GeForce GTX 1080", "bf16") == (None, "bf16")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if getattr(conv, "fp32_precision", None) is None:  # older torch (2.4 included): allow_tf32
        owner, name, tf32, ieee = torch.backends.cudnn, "allow_tf32", True, False
    else:
        owner, name, tf32, ieee = conv, "fp32_precision", "tf32", "ieee"
    precision = getattr(owner, name)
    try:
        setattr(owner, name, tf32)
        assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "none") == (156.0, "tf32")
        setattr(owner, name, ieee)
        assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "none") == (67.0, "fp32")
    finally:
        setattr(owner, name, precision)


def test_clock_laps_partition_the_time():
    clock = bench.Clock(torch.device("cpu"))
    begin = time.perf_counter()
    clock.start()
    time.sleep(0.02)
    clock.lap("a")
    time.sleep(0.01)
    clock.lap("b")
    time.sleep(0.01)
    clock.lap("a")  # a repeated name accumulates
    total = time.perf_counter() - begin
    parts = clock.seconds()
    assert list(parts) == ["a", "b"]
    assert parts["a"] >= 0.03 and parts["b"] >= 0.01 and sum(parts.values()) <= total


def test_prototype_update_mode_matches_the_loop(capsys):
    argv = ["--device", "cpu", "--prototype-update", "--points", "3000", "--num-classes", "6",
            "--prototypes", "3", "--iters", "1", "--warmup", "0"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert "PrototypeBank.update" in "\n".join(lines[:-1])
    assert (summary["points"], summary["num_classes"], summary["prototypes"]) == (3000, 6, 3)
    assert 0 <= summary["max_abs_diff"] <= 1e-6
    assert min(summary["loop_s"], summary["update_s"], summary["read_s"]) > 0
    assert summary["speedup"] == pytest.approx(summary["loop_s"] / summary["update_s"])


def test_loop_prototype_update_by_hand():
    # 2 classes x 2 prototypes of 2-d; pixel 2 is ignored, prototype (1, 0) gets nothing.
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [-1.0, 0.0]]])
    features = torch.tensor([[3.0, 1.0], [5.0, 3.0], [9.0, 9.0], [0.0, 4.0]])
    targets = torch.tensor([0, 0, 255, 1])
    nearest = torch.tensor([[0, 1], [0, 0], [1, 1], [1, 1]])
    out = bench.loop_prototype_update(prototypes, features, targets, nearest, 0.5)
    expected = torch.tensor([[[2.5, 1.0], [0.0, 1.0]], [[2.0, 2.0], [-0.5, 2.0]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("argv, message", [
    (["--crop-size", "16"], "--crop-size must be >= 33"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--width", "0"], "--width must be > 0"),
    (["--device", "cpu", "--sync-check"], "--sync-check needs a CUDA device"),
    (["--device", "cpu", "--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': expected auto, cpu, cuda or cuda:N"),
    (["--prototype-update", "--points", "0"], "--points must be >= 1"),
    (["--checkpoint-activations", "--compile"], "--checkpoint-activations with --compile is not supported"),
    (["--compare-checkpointing", "--checkpoint-activations"], "--compare-checkpointing runs both"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_cuda_device_always_carries_its_index(monkeypatch):
    """torch.cuda.set_device refuses torch.device("cuda"): pick_device (train.py's, which bench.py
    and evaluate.py use) names the index, LOCAL_RANK's for a bare 'cuda', and refuses one that
    does not exist before set_device would fail with a CUDA error."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert train.pick_device("cuda") == torch.device("cuda", 0)
    assert train.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert train.pick_device("cuda:1") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", i) for i in (0, 1, 1)]
    with pytest.raises(train.SetupError,
                       match=r"--device cuda: there is no cuda:2 \(2 visible\); start at most 2 processes per node"):
        train.pick_device("cuda", local_rank=2)  # torchrun with more processes than GPUs
    with pytest.raises(train.SetupError, match="--device cuda:5: there is no cuda:5"):
        train.pick_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(train.SetupError, match=r"no cuda:1 \(1 visible\); start at most 1 process per"):
        train.pick_device("auto", local_rank=1)
