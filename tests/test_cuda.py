"""The CUDA paths: the same results as the CPU references, AMP, SyncBN, checkpoints across
devices, and no host-device synchronisation inside a training iteration.

These tests need a GPU and are skipped where there is none (CI has none); run them on a
GPU machine with `python -m pytest tests/test_cuda.py`.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from cutmix import cutmix_mask, mix  # noqa: E402
from prototypes import PrototypeBank, sample_features, sample_points, sum_rows_by_index  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["--backbone", "resnet18", "--width", "0.125", "--crop-size", "32", "--batch-size", "2",
        "--workers", "0", "--log-every", "2", "--device", "cuda"]


class no_sync:
    """Fail on any host-device synchronisation inside the block."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def test_prototype_update_matches_the_loop_without_a_sync():
    gen = torch.Generator().manual_seed(0)
    num_classes, num_prototypes, dim, n = 6, 3, 32, 4000
    features = torch.randn(n, dim, generator=gen)
    targets = torch.randint(0, num_classes - 1, (n,), generator=gen)  # class 5 gets nothing
    targets[torch.rand(n, generator=gen) < 0.2] = 255
    bank = PrototypeBank(num_classes, num_prototypes, dim, momentum=0.9,
                         generator=torch.Generator().manual_seed(0)).cuda()
    before = bank.prototypes.cpu().clone()
    features_gpu, targets_gpu = features.cuda(), targets.cuda()
    with no_sync():
        logits, nearest = bank(features_gpu)
        bank.update(features_gpu, targets_gpu, nearest)
    expected = bench.loop_prototype_update(before.double(), features.double(), targets,
                                           nearest.cpu(), 0.9)
    torch.testing.assert_close(bank.prototypes.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(bank.prototypes[5].cpu(), before[5])
    cosine = F.normalize(features.double(), dim=1) @ F.normalize(before.double(), dim=2).reshape(-1, dim).t()
    best, best_index = cosine.view(n, num_classes, num_prototypes).max(dim=2)
    torch.testing.assert_close(logits.cpu().double(), best / 0.1, atol=1e-4, rtol=1e-4)
    assert (nearest.cpu() == best_index).float().mean() > 0.999


def test_row_sums_by_index_add_match_the_grouped_cpu_path():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1000, 16, generator=gen)
    index = torch.randint(0, 8, (1000,), generator=gen)  # 7 = dropped
    sums_cpu, counts_cpu = sum_rows_by_index(values, index, 7, grouped=True)
    values_gpu, index_gpu = values.cuda(), index.cuda()
    with no_sync():
        sums, counts = sum_rows_by_index(values_gpu, index_gpu, 7)
    torch.testing.assert_close(sums.cpu(), sums_cpu, atol=1e-4, rtol=1e-5)
    assert torch.equal(counts.cpu(), counts_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_features_match_upsampling(dtype):
    gen = torch.Generator().manual_seed(2)
    feature = torch.randn(2, 8, 9, 11, generator=gen).to(dtype)
    cpu_gen = torch.Generator().manual_seed(3)
    ys, xs = sample_points(33, 41, 8, generator=cpu_gen)
    expected = F.interpolate(feature.float(), size=(33, 41), mode="bilinear",
                             align_corners=True)[:, :, ys, xs].transpose(1, 2)
    feature_gpu = feature.cuda().requires_grad_()
    with no_sync():
        ys_gpu, xs_gpu = sample_points(33, 41, 8, generator=torch.Generator().manual_seed(3),
                                       device="cuda")
        values = sample_features(feature_gpu, ys_gpu, xs_gpu, (33, 41))
        values.sum().backward()
    assert values.dtype == torch.float32 and values.shape == (2, 64, 8)
    torch.testing.assert_close(values.cpu(), expected, atol=1e-5, rtol=1e-5)
    assert feature_gpu.grad is not None and torch.isfinite(feature_gpu.grad.float()).all()


def test_cutmix_on_the_gpu_equals_the_cpu():
    mask_cpu = cutmix_mask(4, 20, 30, p=1.0, generator=torch.Generator().manual_seed(4))
    with no_sync():
        mask = cutmix_mask(4, 20, 30, p=1.0, generator=torch.Generator().manual_seed(4),
                           device="cuda")
        images = mix(torch.arange(4.0, device="cuda").view(4, 1, 1, 1).expand(4, 3, 20, 30), mask)
    assert torch.equal(mask.cpu(), mask_cpu)
    expected = torch.where(mask_cpu[:, None], torch.arange(4.0).roll(-1).view(4, 1, 1, 1),
                           torch.arange(4.0).view(4, 1, 1, 1)).expand(4, 3, 20, 30)
    assert torch.equal(images.cpu(), expected)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_iteration_learns_without_a_sync(amp):
    """A PCR iteration (SyncBatchNorm, fused SGD, GradScaler, prototype update, EMA) on a
    fixed batch: no host sync after the first one, finite losses, and the loss goes down."""
    torch.manual_seed(0)
    cfg = train.resolve_config(train.parse_args(TINY + ["--lr", "0.01", "--amp", amp]))
    cfg.update(iters_per_epoch=10, total_epochs=10, total_iters=100, warmup_iters=0, local_batch=2)
    ctx = train.Context("cuda")
    data, student, teacher, bank, optimizer, scaler = train.build_everything(cfg, ctx)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in student.modules())

    def stacked(dataset):
        return [torch.stack(x).cuda() for x in zip(*(dataset[(i, i)] for i in range(2)))]

    batch = {"labeled": stacked(data.labeled), "unlabeled": stacked(data.unlabeled)}
    train.init_prototypes(bank, student, data.labeled, cfg, ctx)
    teacher.load_state_dict(student.state_dict())
    losses = []
    for it in range(12):
        rng = torch.Generator().manual_seed(0)  # same boxes and sampled pixels every step
        if it == 0:  # cuDNN picks its algorithms here
            terms, finite = train.train_iteration(batch, (student, teacher, bank), optimizer,
                                                  scaler, cfg, ctx, it, rng, True)
        else:
            with no_sync():
                terms, finite = train.train_iteration(batch, (student, teacher, bank), optimizer,
                                                      scaler, cfg, ctx, it, rng, True)
        assert set(terms) == {"sup", "unsup", "proto"} and bool(finite)
        losses.append(sum(t.item() for t in terms.values()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.isfinite(bank.prototypes).all()


def test_run_resume_and_evaluate_on_the_gpu(tmp_path, capsys):
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    args = TINY + ["--iters", "6", "--warmup-iters", "2", "--eval-every", "3", "--save-every", "3",
                   "--amp", "bf16"]
    assert train.main(args + ["--out", str(out)]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["iters"] == 6 and final["miou_proto"] is not None
    # the checkpoints load on the CPU, and a run resumed from iteration 3 continues on the GPU
    ckpt = torch.load(out / "last.prev.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 3
    assert train.main(args + ["--out", str(resumed), "--resume", str(out / "last.prev.pt")]) == 0
    assert "resume: " in capsys.readouterr().out
    assert json.loads((resumed / "final.json").read_text())["iters"] == 6
    # evaluate.py on the GPU agrees with the CPU on the same checkpoint
    scores = {}
    for device in ("cuda", "cpu"):
        target = tmp_path / f"{device}.json"
        assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--device", device,
                              "--head", "both", "--amp", "none", "--out-json", str(target)]) == 0
        scores[device] = json.loads(target.read_text())
    for key in ("miou", "miou_proto"):
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], abs=0.5), key
