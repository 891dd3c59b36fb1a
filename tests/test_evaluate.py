"""Tests for evaluate.py: metrics against hand-made cases and slow loops, the
evaluation protocols against independent computations, the distributed reduction, and
the command line on a tiny real checkpoint."""

import functools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate as ev  # noqa: E402
from children import run, spawn  # noqa: E402
from prototypes import PrototypeBank  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ stand-in models

class PointwiseNet(nn.Module):
    """1x1 convolutions at stride 1: every output pixel depends on its own input pixel
    only, so the net commutes with translation, cropping and mirroring."""

    def __init__(self, num_classes=4, dim=6):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 1)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x):
        feature = torch.tanh(self.embed(x))
        return self.classifier(feature), feature, None


class StridedNet(nn.Module):
    """Stride 4 with zero-padded 3x3 convolutions and an asymmetric kernel: outputs
    depend on the position of the window and are not mirror-symmetric."""

    def __init__(self, num_classes=4, dim=6):
        super().__init__()
        self.down = nn.Conv2d(3, dim, 4, stride=4)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)
        self.classifier = nn.Conv2d(dim, num_classes, 3, padding=1)

    def forward(self, x):
        feature = torch.tanh(self.mix(torch.tanh(self.down(x))))
        return self.classifier(feature), feature, None


def make_model(kind, seed=0, num_classes=4, dim=6):
    torch.manual_seed(seed)
    return {"pointwise": PointwiseNet, "strided": StridedNet}[kind](num_classes, dim).eval()


def make_bank(num_classes=4, dim=6, seed=1):
    return PrototypeBank(num_classes, 3, dim, generator=torch.Generator().manual_seed(seed))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def make_dataset(count=5, num_classes=4, seed=2):
    """Random images of varied sizes with random labels incl. ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        height, width = 12 + 4 * (i % 3), 16 + 4 * (i % 2)
        image = torch.randn(3, height, width, generator=generator)
        label = torch.randint(0, num_classes, (height, width), generator=generator)
        label[torch.rand(height, width, generator=generator) < 0.1] = 255
        items.append((image, label, f"img{i}"))
    return ListDataset(items)


# ------------------------------------------------------------------ metrics

def slow_confusion(pred, target, num_classes, ignore_index=255):
    cm = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t != ignore_index:
            cm[t][p] += 1
    return torch.tensor(cm)


def slow_metrics(cm):
    cm = cm.tolist()
    k = len(cm)
    ious, accs = [], []
    for c in range(k):
        tp = cm[c][c]
        gt = sum(cm[c])
        pr = sum(cm[r][c] for r in range(k))
        union = gt + pr - tp
        ious.append(100.0 * tp / union if union > 0 else None)
        if gt > 0:
            accs.append(100.0 * tp / gt)
    present = [v for v in ious if v is not None]
    total = sum(sum(row) for row in cm)
    return {"miou": sum(present) / len(present), "iou": ious,
            "pixel_acc": 100.0 * sum(cm[c][c] for c in range(k)) / total,
            "mean_acc": sum(accs) / len(accs), "pixels": total}


def test_confusion_and_metrics_hand_made_case():
    # class 0: GT at 0, 1, 5, predicted at 0, 5          -> TP 2, union 3
    # class 1: GT at 2, 3, predicted at 1, 2             -> TP 1, union 3
    # class 2: predicted only at 4, where GT is ignored  -> absent (None)
    # class 3: never in GT, predicted at 3               -> IoU 0, counts in the mean
    target = torch.tensor([0, 0, 1, 1, 255, 0])
    pred = torch.tensor([0, 1, 1, 3, 2, 0])
    cm = ev.confusion_matrix(pred, target, 4)
    expected = torch.tensor([[2, 1, 0, 0],
                             [0, 1, 0, 1],
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]])
    assert cm.dtype == torch.long
    assert torch.equal(cm, expected)
    metrics = ev.metrics_from_confusion(cm)
    assert metrics["iou"][0] == pytest.approx(200 / 3)
    assert metrics["iou"][1] == pytest.approx(100 / 3)
    assert metrics["iou"][2] is None
    assert metrics["iou"][3] == 0.0
    assert metrics["miou"] == pytest.approx((200 / 3 + 100 / 3 + 0) / 3)
    assert metrics["pixel_acc"] == pytest.approx(60.0)
    assert metrics["mean_acc"] == pytest.approx((200 / 3 + 50) / 2)
    assert metrics["pixels"] == 5


def test_confusion_and_metrics_match_slow_loop():
    torch.manual_seed(0)
    num_classes = 6
    pred = torch.randint(0, num_classes, (2, 17, 23))
    target = torch.randint(0, num_classes - 1, (2, 17, 23))  # last class never in GT
    target[torch.rand(2, 17, 23) < 0.2] = 255
    cm = ev.confusion_matrix(pred, target, num_classes)
    assert torch.equal(cm, slow_confusion(pred, target, num_classes))
    metrics = ev.metrics_from_confusion(cm)
    expected = slow_metrics(cm)
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-12)
    assert metrics["pixels"] == expected["pixels"]
    assert metrics["iou"] == pytest.approx(expected["iou"], rel=1e-12)


def test_confusion_ignores_out_of_range_targets_and_checks_shapes():
    pred = torch.tensor([0, 1, 1])
    target = torch.tensor([0, 7, 1])
    assert torch.equal(ev.confusion_matrix(pred, target, 2), torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match="same shape"):
        ev.confusion_matrix(pred, target[:2], 2)


def test_metrics_without_pixels_are_nan():
    metrics = ev.metrics_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert math.isnan(metrics["miou"]) and metrics["iou"] == [None, None, None]


def test_format_table():
    cm = ev.confusion_matrix(torch.tensor([0, 1, 1, 3, 2, 0]),
                             torch.tensor([0, 0, 1, 1, 255, 0]), 4)
    metrics = ev.metrics_from_confusion(cm)
    table = ev.format_table(metrics, ["background", "cat", "dog", "tree"])
    lines = table.splitlines()
    assert lines[1].split() == ["background", "66.67"]
    assert lines[3].split() == ["dog", "-"]
    assert lines[4].split() == ["tree", "0.00"]
    assert lines[-1].startswith("mIoU 33.33  pixel acc 60.00  mean acc 58.33")
    assert ev.format_table(metrics).splitlines()[2].split() == ["1", "33.33"]


# ------------------------------------------------------------------ protocols

def test_window_starts_and_center_box():
    assert ev.window_starts(10, 8, 5) == [0, 2]
    assert ev.window_starts(14, 8, 5) == [0, 5, 6]
    assert ev.window_starts(8, 8, 3) == [0]
    assert ev.window_starts(5, 8, 3) == [0]
    # Cityscapes 1024 x 2048, window 769, stride 513
    assert ev.window_starts(1024, 769, 513) == [0, 255]
    assert ev.window_starts(2048, 769, 513) == [0, 513, 1026, 1279]
    assert ev.center_box(10, 20, 8) == (1, 6, 8, 8)
    assert ev.center_box(5, 20, 8) == (0, 6, 5, 8)


@pytest.mark.parametrize("crop, stride", [(8, 3), (8, 8), (5, 2), (32, 7), (11, 10)])
def test_sliding_equals_whole_for_pointwise_model(crop, stride):
    # A pointwise net gives the same logits for a pixel in every window (and ignores
    # the zero padding of small images), so sliding must equal whole for any window.
    model, bank = make_model("pointwise"), make_bank()
    image = torch.randn(1, 3, 13, 19)
    for head in ("linear", "proto"):
        whole = ev.predict(model, image, 4, mode="whole", head=head, bank=bank)
        sliding = ev.predict(model, image, 4, mode="sliding", crop_size=crop, stride=stride,
                             head=head, bank=bank)
        assert sliding.shape == (1, 4, 13, 19) and sliding.dtype == torch.float32
        torch.testing.assert_close(sliding, whole, rtol=1e-5, atol=1e-5)


def test_sliding_with_one_covering_window_equals_whole():
    # Window = image size: one window, no padding, so any model gives the whole result.
    model, bank = make_model("strided"), make_bank()
    image = torch.randn(1, 3, 16, 16)
    for head in ("linear", "proto"):
        whole = ev.predict(model, image, 4, head=head, bank=bank)
        sliding = ev.predict(model, image, 4, mode="sliding", crop_size=16, stride=5,
                             head=head, bank=bank)
        torch.testing.assert_close(sliding, whole)


def test_sliding_matches_independent_window_loop():
    # 10 x 14 image, window 8, stride 5: rows start at 0, 2; columns at 0, 5, 6.
    model = make_model("strided")
    image = torch.randn(1, 3, 10, 14)
    total = torch.zeros(1, 4, 10, 14, dtype=torch.float64)
    count = torch.zeros(10, 14, dtype=torch.float64)
    for top in (0, 2):
        for left in (0, 5, 6):
            logits = model(image[..., top:top + 8, left:left + 8])[0]
            total[..., top:top + 8, left:left + 8] += F.interpolate(
                logits, size=(8, 8), mode="bilinear", align_corners=True).double()
            count[top:top + 8, left:left + 8] += 1
    expected = (total / count).float()
    got = ev.predict(model, image, 4, mode="sliding", crop_size=8, stride=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sliding_pads_small_images_with_zeros():
    # 6 x 14 image, window 8: padded to 8 x 14, windows at rows 0, columns 0, 5, 6.
    model = make_model("strided")
    image = torch.randn(1, 3, 6, 14)
    padded = torch.cat([image, torch.zeros(1, 3, 2, 14)], dim=2)
    total = torch.zeros(1, 4, 8, 14)
    count = torch.zeros(8, 14)
    for left in (0, 5, 6):
        logits = model(padded[..., :, left:left + 8])[0]
        total[..., left:left + 8] += F.interpolate(logits, size=(8, 8), mode="bilinear",
                                                   align_corners=True)
        count[:, left:left + 8] += 1
    got = ev.predict(model, image, 4, mode="sliding", crop_size=8, stride=5)
    torch.testing.assert_close(got, (total / count)[..., :6, :], rtol=1e-5, atol=1e-5)


def test_default_stride_is_two_thirds_of_crop(monkeypatch):
    seen = []
    monkeypatch.setattr(ev, "window_starts",
                        lambda length, crop, stride: seen.append(stride) or [0])
    ev.predict(make_model("pointwise"), torch.randn(1, 3, 8, 8), 4, mode="sliding",
               crop_size=769)
    assert seen == [513, 513]


def test_flip_on_symmetric_input():
    # Mirror-symmetric input: the flip-averaged prediction must be mirror-symmetric
    # even for a model that is not, and equal log(mean of the two softmaxes).
    half = torch.randn(1, 3, 12, 8)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # (1, 3, 12, 16)
    model = make_model("strided")
    plain = ev.predict(model, image, 4)
    mirrored_back = ev.predict(model, image.flip(-1), 4).flip(-1)
    averaged = ev.predict(model, image, 4, flip=True)
    expected = ((plain.double().softmax(1) + mirrored_back.double().softmax(1)) / 2).log()
    torch.testing.assert_close(averaged.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(averaged, averaged.flip(-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)
    # A mirror-equivariant model on a symmetric input: flipping changes nothing.
    pointwise = make_model("pointwise")
    torch.testing.assert_close(ev.predict(pointwise, image, 4, flip=True),
                               ev.predict(pointwise, image, 4).log_softmax(1),
                               rtol=1e-5, atol=1e-5)


def test_multi_scale_averages_softmax():
    model = make_model("strided")
    image = torch.randn(1, 3, 16, 20)
    small = F.interpolate(image, size=(8, 10), mode="bilinear", align_corners=True)
    small_logits = F.interpolate(ev.predict(model, small, 4), size=(16, 20), mode="bilinear",
                                 align_corners=True)
    full_logits = ev.predict(model, image, 4)
    expected = ((small_logits.softmax(1) + full_logits.softmax(1)) / 2).log()
    got = ev.predict(model, image, 4, scales=(0.5, 1.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_center_mode_predicts_the_center_box():
    model = make_model("strided")
    image = torch.randn(1, 3, 14, 22)
    got = ev.predict(model, image, 4, mode="center", crop_size=8)
    top, left, height, width = ev.center_box(14, 22, 8)
    assert got.shape == (1, 4, 8, 8)
    torch.testing.assert_close(got, ev.predict(model, image[..., top:top + 8, left:left + 8], 4))


def test_proto_head_chunked_equals_full_upsampling():
    torch.manual_seed(0)
    bank = PrototypeBank(5, 3, 16, generator=torch.Generator().manual_seed(0))
    feature = torch.randn(2, 16, 5, 7)
    full = F.interpolate(feature, size=(19, 27), mode="bilinear", align_corners=True)
    expected = bank(full.permute(0, 2, 3, 1).reshape(-1, 16))[0]
    expected = expected.view(2, 19, 27, 5).permute(0, 3, 1, 2)
    for chunk_pixels in (1, 60, 200, None):  # 1 row, 1 row, 3 rows, everything
        got = ev.prototype_logits_map(feature, bank, (19, 27), chunk_pixels=chunk_pixels)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_proto_head_chunks_are_bounded(monkeypatch):
    # 1024 x 2048 with D = 512: at most 64 MB of full-resolution features per chunk.
    sizes = []

    class Recorder(nn.Module):
        def forward(self, features):
            sizes.append(features.numel() * 4)
            zeros = features.new_zeros(len(features), 2)
            return zeros, zeros.long()

    ev.prototype_logits_map(torch.zeros(1, 512, 4, 8), Recorder(), (64, 2048))
    ev.prototype_logits_map(torch.zeros(1, 512, 4, 8), Recorder(), (64, 2048),
                            chunk_pixels=4096)
    assert max(sizes) <= ev.PROTO_CHUNK_BYTES and len(sizes) == 4 + 32


def test_amp_bf16_runs_and_returns_float32():
    model, bank = make_model("strided"), make_bank()
    image = torch.randn(1, 3, 16, 16)
    logits = ev.predict(model, image, 4, amp="bf16", head="proto", bank=bank)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ev.predict(model, image, 4, head="proto", bank=bank),
                               rtol=0.1, atol=0.5)


def test_bad_arguments_give_clear_errors():
    model, image = make_model("pointwise"), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="--mode"):
        ev.predict(model, image, 4, mode="tiles")
    with pytest.raises(ValueError, match="--stride"):
        ev.predict(model, image, 4, mode="sliding", crop_size=8, stride=9)
    with pytest.raises(ValueError, match="--scales"):
        ev.predict(model, image, 4, scales=(0.0,))
    with pytest.raises(ValueError, match="PrototypeBank"):
        ev.predict(model, image, 4, head="proto")
    with pytest.raises(ValueError, match="--amp"):
        ev.predict(model, image, 4, amp="fp8")
    with pytest.raises(ValueError, match="expected num_classes = 5"):
        ev.predict(model, image, 5)


# ------------------------------------------------------------------ evaluate

def manual_confusion(model, dataset, num_classes, head="linear", bank=None, **kwargs):
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for image, label, _ in dataset:
        pred = ev.predict(model, image[None], num_classes, head=head, bank=bank, **kwargs)
        cm += slow_confusion(pred[0].argmax(0), label, num_classes)
    return cm


def test_evaluate_matches_per_image_predictions_and_keeps_model_state():
    model, bank, dataset = make_model("strided"), make_bank(), make_dataset()
    logs = []
    metrics = ev.evaluate(model, dataset, 4, "cpu", heads=("linear", "proto"), bank=bank,
                          log=logs.append)
    assert not model.training
    for head in ("linear", "proto"):
        expected = ev.metrics_from_confusion(manual_confusion(model, dataset, 4, head, bank))
        assert metrics[head] == expected
    assert metrics["linear"]["pixels"] == sum(int((label != 255).sum()) for _, label, _ in dataset)
    assert logs[-1].startswith("eval 5/5 images") and "ETA 0:00:00" in logs[-1]
    model.train()
    ev.evaluate(model, dataset, 4, "cpu", log=logs.append)
    assert model.training  # evaluate leaves the caller's choice alone


def test_evaluate_center_mode_scores_the_center_box_of_the_label():
    model, dataset = make_model("strided"), make_dataset(3)
    metrics = ev.evaluate(model, dataset, 4, "cpu", mode="center", crop_size=8,
                          log=lambda line: None)
    cm = torch.zeros(4, 4, dtype=torch.long)
    for image, label, _ in dataset:
        top, left, height, width = ev.center_box(*label.shape, 8)
        pred = ev.predict(model, image[None, :, top:top + height, left:left + width], 4)
        cm += slow_confusion(pred[0].argmax(0), label[top:top + height, left:left + width], 4)
    assert metrics["linear"] == ev.metrics_from_confusion(cm)
    assert metrics["linear"]["pixels"] < sum(label.numel() for _, label, _ in dataset) / 2


def test_evaluate_rejects_bad_labels_and_undistributed_sharding():
    model, dataset = make_model("pointwise"), make_dataset(2)
    dataset.items[1][1][0, 0] = 7
    with pytest.raises(ValueError, match=r"'img1'.*\[7\]"):
        ev.evaluate(model, dataset, 4, "cpu", log=lambda line: None)
    with pytest.raises(ValueError, match="torch.distributed"):
        ev.evaluate(model, make_dataset(2), 4, "cpu", rank=0, world_size=2)


def _distributed_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    metrics = ev.evaluate(make_model("strided"), make_dataset(), 4, "cpu",
                          heads=("linear", "proto"), bank=make_bank(), rank=rank,
                          world_size=world_size, log=lambda line: None)
    torch.save({"metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_distributed_evaluation_equals_single_process(tmp_path):
    # 5 images: rank 0 gets 3, rank 1 gets 2; the reduced matrices must equal one process.
    spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, timeout=120)
    single = ev.evaluate(make_model("strided"), make_dataset(), 4, "cpu",
                         heads=("linear", "proto"), bank=make_bank(), log=lambda line: None)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["metrics"] == single  # includes the pixel count, so no double counting


# ------------------------------------------------------------------ command line

TOY_CLASSES = 6


def _toy_models():
    from model import build_model
    torch.manual_seed(3)
    student = build_model(TOY_CLASSES, "resnet18", 16, False)
    teacher = build_model(TOY_CLASSES, "resnet18", 16, False)
    bank = PrototypeBank(TOY_CLASSES, 2, 512, generator=torch.Generator().manual_seed(0))
    return student, teacher, bank


def _save_toy_checkpoint(run_dir, iteration=5, **changes):
    """A checkpoint in train.py's format: random resnet18 weights, toy data, 2 val images."""
    student, teacher, bank = _toy_models()
    config = dict(dataset="toy", data_root=None, num_classes=TOY_CLASSES, labeled=1,
                  split_dir=str(run_dir / "splits"), seed=0, backbone="resnet18",
                  output_stride=16, crop_size=64, eval_mode="whole",
                  num_prototypes=2, temperature=0.1, amp="none", out=str(run_dir),
                  warmup_iters=2, method="pcr")
    checkpoint = {"config": config, "iter": iteration, "best": {"miou": 0.0, "iter": iteration},
                  "student": student.state_dict(), "teacher": teacher.state_dict(),
                  "prototypes": bank.state_dict()}
    checkpoint.update(changes)
    path = run_dir / f"it{iteration}.pt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "splits").mkdir()
    for which, names in {"labeled": ["labeled_0000"], "unlabeled": ["unlabeled_0000"],
                         "val": ["val_0000", "val_0001"]}.items():
        (run_dir / "splits" / f"{which}.txt").write_text("\n".join(names) + "\n")
    return run_dir, _save_toy_checkpoint(run_dir)


@functools.lru_cache(maxsize=None)
def _in_process(run_dir, weights, heads=("linear",), **settings):
    """Independent of the CLI: the models rebuilt by hand, evaluate() called directly
    (cached: the same evaluation serves several tests)."""
    import data
    student, teacher, bank = _toy_models()
    model = {"student": student, "teacher": teacher}[weights].eval()
    val = data.build_data("toy", split_dir=str(run_dir / "splits"), log=lambda *a: None).val
    return ev.evaluate(model, val, TOY_CLASSES, "cpu", heads=heads, bank=bank,
                       log=lambda line: None, **settings)


def _last_json_line(run_dir):
    import json
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_cli_subprocess_reproduces_in_process_evaluation(toy_run, tmp_path):
    run_dir, checkpoint = toy_run
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = run(
        [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(checkpoint),
         "--head", "both", "--save-dir", str(tmp_path / "pictures"), "--device", "cpu",
         "--prototype-map"],
        env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = _in_process(run_dir, "teacher", heads=("linear", "proto"))
    result_line = [line for line in done.stdout.splitlines() if line.startswith("result:")][0]
    assert f"linear mIoU {expected['linear']['miou']:.2f}" in result_line
    assert f"proto mIoU {expected['proto']['miou']:.2f}" in result_line
    assert "background" in done.stdout and "eval 2/2 images" in done.stdout
    record = _last_json_line(run_dir)
    assert record["source"] == "evaluate.py" and record["model"] == "teacher"
    assert record["miou"] == expected["linear"]["miou"]
    assert record["miou_proto"] == expected["proto"]["miou"]
    assert record["iou"] == expected["linear"]["iou"]
    # pictures of both heads: palette masks at the image's size (80 x 80 toy images), and
    # image | truth | per head prediction, errors, enlarged 4x to 320 px, plus captions
    # and a legend; the prototype map: image | map
    from PIL import Image
    for name in ("val_0000", "val_0001"):
        for suffix in ("", "_proto"):
            mask = Image.open(tmp_path / "pictures" / f"{name}{suffix}.png")
            assert mask.size == (80, 80) and mask.mode == "P"
        compare = Image.open(tmp_path / "pictures" / f"{name}_compare.png")
        assert compare.width == 6 * 320 + 5 * 4 and compare.height > 320 + 20
        pair = Image.open(tmp_path / "pictures" / f"{name}_prototypes.png")
        assert pair.width == 2 * 320 + 4 and pair.height > 320 + 20


def test_cli_student_and_flag_overrides(toy_run, capsys, tmp_path):
    import json
    run_dir, checkpoint = toy_run
    out_json = tmp_path / "metrics.json"
    # center mode with a 48-pixel box: the cheapest protocol (sliding is tested above)
    assert ev.main(["--checkpoint", str(checkpoint), "--student", "--mode", "center",
                    "--crop-size", "48", "--device", "cpu", "--out-json", str(out_json)]) == 0
    expected = _in_process(run_dir, "student", mode="center", crop_size=48)
    record = _last_json_line(run_dir)
    assert record["model"] == "student" and record["mode"] == "center"
    assert record["crop_size"] == 48 and record["pixels"] == expected["linear"]["pixels"]
    assert 0 < record["pixels"] <= 2 * 48 * 48  # only the center boxes are scored
    assert record["miou"] == expected["linear"]["miou"]
    assert json.loads(out_json.read_text())["metrics"]["linear"] == expected["linear"]
    assert f"mIoU {expected['linear']['miou']:.2f}" in capsys.readouterr().out


def test_cli_uses_student_before_the_teacher_exists(toy_run, capsys):
    run_dir, _ = toy_run
    warmup = _save_toy_checkpoint(run_dir, iteration=2)  # iteration <= warmup_iters
    assert ev.main(["--checkpoint", str(warmup), "--device", "cpu", "--mode", "center",
                    "--crop-size", "48"]) == 0
    assert "note: evaluating the student" in capsys.readouterr().out
    record = _last_json_line(run_dir)
    assert record["model"] == "student" and record["iter"] == 2
    expected = _in_process(run_dir, "student", mode="center", crop_size=48)
    assert record["miou"] == expected["linear"]["miou"]


def test_cli_images_writes_palette_masks_that_read_back_as_the_predicted_ids(
        toy_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    import data
    run_dir, checkpoint = toy_run
    folder = tmp_path / "photos"
    folder.mkdir()
    generator = np.random.default_rng(0)
    sizes = {"wide.png": (50, 37), "tall.jpg": (41, 66)}  # (width, height)
    for name, (width, height) in sizes.items():
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    assert ev.main(["--checkpoint", str(checkpoint), "--images", str(folder),
                    "--save-dir", str(out), "--device", "cpu", "--prototype-map"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "tall_mask.png", "tall_overlay.png", "tall_prototypes.png",
        "wide_mask.png", "wide_overlay.png", "wide_prototypes.png"]
    progress = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("predict ")]
    assert len(progress) == 1 and progress[0].startswith("predict 2/2 images")  # < 10 s: last only
    _, teacher, _ = _toy_models()
    palette = data.voc_palette()
    for name, (width, height) in sizes.items():
        stem = Path(name).stem
        image = data.normalize(data.read_image(folder / name))[None]
        pred = ev.predict(teacher.eval(), image, TOY_CLASSES)[0].argmax(0).numpy()
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == (width, height) and mask.mode == "P"
        assert np.array_equal(np.asarray(mask), pred)  # pixel value = class id
        assert np.array_equal(np.asarray(mask.convert("RGB")), palette[pred])  # VOC colours
        # what --dataset folder reads: the same ids
        assert np.array_equal(data.read_label(out / f"{stem}_mask.png", TOY_CLASSES), pred)
        # the overlay is enlarged to a short side >= 256 (integer factor), legend below;
        # background (class 0) shows the image itself, other classes are blended
        factor = -(-256 // min(width, height))
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape[1] == factor * width and overlay.shape[0] > factor * height
        top_left = overlay[:factor * height:factor, ::factor]
        rgb = np.asarray(data.read_image(folder / name))
        blend = ev.overlay_picture(rgb, palette[pred])
        expected = np.where((pred == 0)[..., None], rgb, blend)
        assert np.array_equal(top_left, expected)
    # the masks serve as labels of a --dataset folder as they are
    import shutil
    root = tmp_path / "folder"
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    for name in sizes:
        shutil.copy(folder / name, root / "JPEGImages" / name)
        shutil.copy(out / f"{Path(name).stem}_mask.png",
                    root / "SegmentationClass" / f"{Path(name).stem}.png")
    for which, stem in (("labeled", "wide"), ("unlabeled", "tall"), ("val", "tall")):
        (root / f"{which}.txt").write_text(stem + "\n")
    folder_data = data.build_data("folder", str(root), num_classes=TOY_CLASSES,
                                  log=lambda *a: None)
    _, label, _ = folder_data.val[0]
    assert np.array_equal(label.numpy(), np.asarray(Image.open(out / "tall_mask.png")))


def test_cli_errors_are_one_clear_message(toy_run, tmp_path, capsys):
    run_dir, checkpoint = toy_run

    def error_of(*argv):
        assert ev.main(list(argv)) == 2
        return capsys.readouterr().err

    assert "--checkpoint" in error_of("--checkpoint", str(tmp_path / "missing.pt"))
    assert "does not exist" in error_of("--checkpoint", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "unreadable" in error_of("--checkpoint",
                                                                str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert "not a train.py checkpoint" in error_of("--checkpoint", str(tmp_path / "other.pt"))
    no_bank = _save_toy_checkpoint(tmp_path, iteration=7, prototypes=None)
    assert "holds no prototypes" in error_of("--checkpoint", str(no_bank), "--head", "proto",
                                             "--device", "cpu")
    assert "--prototype-map: --checkpoint" in error_of(
        "--checkpoint", str(no_bank), "--prototype-map", "--save-dir", str(tmp_path / "p"),
        "--device", "cpu")
    assert "--prototype-map needs --save-dir" in error_of("--checkpoint", str(checkpoint),
                                                          "--prototype-map", "--device", "cpu")
    assert "--images needs --save-dir" in error_of("--checkpoint", str(checkpoint), "--images",
                                                   str(tmp_path), "--device", "cpu")
    assert "--scales" in error_of("--checkpoint", str(checkpoint), "--scales", "1,x",
                                  "--device", "cpu")
    assert "--stride" in error_of("--checkpoint", str(checkpoint), "--mode", "sliding",
                                  "--stride", "500", "--device", "cpu")


def test_error_picture_and_side_by_side():
    import numpy as np
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    label = np.array([[0, 1, 255], [2, 2, 1]])
    prediction = np.array([[0, 2, 1], [2, 0, 1]])
    picture = ev.error_picture(image, label, prediction)
    assert picture[0, 0].tolist() == [60, 60, 60]       # correct: the image at 30%
    assert picture[0, 1].tolist() == [255, 0, 0]        # wrong: red
    assert picture[0, 2].tolist() == [128, 128, 128]    # ignored: neutral grey
    assert picture[1, 1].tolist() == [255, 0, 0]
    joined = ev.side_by_side([image, picture], gap=4)
    assert joined.shape == (2, 3 + 4 + 3, 3) and (joined[:, 3:7] == 255).all()
    assert (joined[:, 7:] == picture).all()
    assert ev.overlay_picture(image, np.zeros_like(image))[0, 0].tolist() == [100, 100, 100]


# ------------------------------------------------------------------ pictures, progress

class RedThresholdNet(nn.Module):
    """Class 2 where the (normalised) red channel is positive, class 0 elsewhere; the
    feature is the image itself, at stride 1."""

    def forward(self, x):
        red = x[:, :1]
        logits = torch.cat([-red, torch.zeros_like(red), red], dim=1)
        return logits, x, None


def test_palette_mask_reads_back_as_class_ids(tmp_path):
    import numpy as np
    from PIL import Image
    import data
    ids = np.random.default_rng(0).integers(0, 21, (9, 13)).astype(np.uint8)
    ids[0, :3] = 255
    palette = data.voc_palette()
    ev.palette_mask(ids, palette).save(tmp_path / "mask.png")
    mask = Image.open(tmp_path / "mask.png")
    assert mask.mode == "P" and np.array_equal(np.asarray(mask), ids)
    assert np.array_equal(np.asarray(mask.convert("RGB")), palette[ids])
    assert np.array_equal(data.read_label(tmp_path / "mask.png", 21), ids)


def test_enlarge_is_nearest_neighbour_by_an_integer_factor():
    import numpy as np
    picture = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    big = ev.enlarge(picture)
    assert big.shape == (300, 400, 3)  # ceil(256 / 60) = 5
    assert np.array_equal(big[::5, ::5], picture) and np.array_equal(big[4::5, 4::5], picture)
    assert ev.enlarge(np.zeros((256, 300, 3), np.uint8)).shape == (256, 300, 3)
    assert ev.enlarge(np.zeros((2, 5000, 3), np.uint8)).shape == (2, 5000, 3)  # long side


def test_overlay_leaves_the_cleared_class_transparent():
    import numpy as np
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.full((2, 2, 3), 200, np.uint8)
    clear = np.array([[True, False], [False, True]])
    overlay = ev.overlay_picture(image, mask, clear=clear)
    assert overlay[0, 0].tolist() == [100] * 3 and overlay[1, 1].tolist() == [100] * 3
    assert overlay[0, 1].tolist() == [150] * 3 and overlay[1, 0].tolist() == [150] * 3


def test_legend_wraps_and_draws_every_entry():
    import data
    palette = data.voc_palette()
    one = ev.legend([(palette[[1]], "aeroplane")], 300)
    many = ev.legend([(palette[[k]], name) for k, name in enumerate(data.VOC_CLASSES)], 300)
    assert one.shape[1] == many.shape[1] == 300 and many.shape[0] > 3 * one.shape[0] // 2
    # the swatch of every class is drawn with its palette colour
    colours = {tuple(c) for c in many.reshape(-1, 3).tolist()}
    assert all(tuple(palette[k].tolist()) in colours for k in range(21))
    assert (one < 128).all(axis=2).any()  # dark text pixels on the white strip


def test_images_overlay_shows_the_image_where_background_is_predicted(tmp_path):
    import numpy as np
    from PIL import Image
    import data
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:, 32:] = 250  # bright right half: red > mean -> class 2; dark left: class 0
    pixels[:, :32] = (10, 60, 20)
    Image.fromarray(pixels).save(tmp_path / "half.png")
    palette = data.voc_palette()
    lines = []
    ev.evaluate(RedThresholdNet(), ev.ImageFiles(tmp_path / "half.png"), 3, "cpu",
                save_dir=tmp_path / "out", palette=palette, log=lines.append,
                class_names=["background", "a", "b"], background=0)
    ids = np.asarray(Image.open(tmp_path / "out" / "half_mask.png"))
    assert (ids[:, :32] == 0).all() and (ids[:, 32:] == 2).all()
    overlay = np.asarray(Image.open(tmp_path / "out" / "half_overlay.png"))[:280:7, ::7]
    assert overlay.shape == (40, 64, 3)  # enlarged 7x (ceil(256 / 40))
    assert np.array_equal(overlay[:, :32], pixels[:, :32])  # background: the image itself
    blend = np.round(0.5 * pixels[:, 32:] + 0.5 * palette[2].astype(float)).astype(np.uint8)
    assert np.array_equal(overlay[:, 32:], blend)
    assert len(lines) == 1 and lines[0].startswith("predict 1/1 images")


def test_evaluate_progress_is_time_based(tmp_path):
    model, dataset = make_model("strided"), make_dataset(count=5)
    ticks = iter([0.0, 3.0, 6.0, 9.0, 12.0, 15.0])  # start, then after each image
    logs = []
    ev.evaluate(model, dataset, 4, "cpu", log=logs.append, clock=lambda: next(ticks))
    # a line once 10 s have passed since the last one (image 4 at 12 s), and the last
    assert [line.split()[1] for line in logs] == ["4/5", "5/5"]
    assert "0.33 img/s" in logs[0] and "ETA 0:00:03" in logs[0]
    logs.clear()
    ev.evaluate(model, dataset, 4, "cpu", log=logs.append, clock=lambda: 0.0)
    assert [line.split()[1] for line in logs] == ["5/5"]


def test_nearest_prototype_map_hand_made_case():
    # K = 2 classes x M = 3 prototypes on the axes of R^3 (class 1: negative axes); the
    # feature map at the image's own size (no interpolation): pixel = a mix of axes
    bank = PrototypeBank(2, 3, 3, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3)
    bank.prototypes.copy_(torch.stack([eye, -eye]))
    feature = torch.tensor([[[0.9, 0.1, 0.0], [0.1, 0.9, 0.2], [0.0, 0.2, 0.9]],
                            [[-0.9, 0.0, 0.1], [0.2, -0.8, 0.1], [0.1, 0.2, -0.7]]])  # (2, 3, D)
    feature = feature.permute(2, 0, 1).unsqueeze(0)  # (1, D, 2, 3)
    classes = torch.tensor([[[0, 0, 0], [1, 1, 1]]])
    expected = torch.tensor([[[0, 1, 2], [0, 1, 2]]])
    assert torch.equal(ev.class_prototype_cosines(feature, bank, classes).argmax(1), expected)
    # the class decides which prototypes compete: under class 1 a pixel takes the axis
    # with its smallest component (largest cosine with a negative axis), under class 0
    # the axis with its largest
    expected_other = torch.tensor([[[2, 0, 0], [2, 0, 1]]])
    got = ev.class_prototype_cosines(feature, bank, 1 - classes).argmax(1)
    assert torch.equal(got, expected_other)


def test_nearest_prototype_map_matches_slow_loop_after_upsampling():
    torch.manual_seed(0)
    bank = PrototypeBank(3, 4, 5, generator=torch.Generator().manual_seed(0))
    feature = torch.randn(2, 5, 3, 4)
    size = (7, 10)
    classes = torch.randint(0, 3, (2, *size))
    full = F.interpolate(feature, size=size, mode="bilinear", align_corners=True).double()
    units = F.normalize(bank.prototypes.double(), dim=2)
    expected = torch.empty(2, 4, *size, dtype=torch.float64)
    for b in range(2):
        for y in range(size[0]):
            for x in range(size[1]):
                f = F.normalize(full[b, :, y, x], dim=0)
                expected[b, :, y, x] = units[classes[b, y, x]] @ f
    for chunk_pixels in (1, 25, None):
        got = ev.class_prototype_cosines(feature, bank, classes, chunk_pixels)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.argmax(1), expected.argmax(1))


class RecordingNet(PointwiseNet):
    """PointwiseNet that records the size of every image it is called with."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return super().forward(x)


def test_prototype_map_follows_the_protocol():
    model, bank = RecordingNet().eval(), make_bank()
    image = torch.randn(1, 3, 13, 19)
    classes = ev.predict(model, image, 4, head="proto", bank=bank).argmax(1)
    feature = model(image)[1]

    def sizes_of(**protocol):
        model.sizes.clear()
        nearest = ev.predict_nearest_prototypes(model, image, bank, box_classes, **protocol)
        return nearest, model.sizes

    box_classes = classes
    whole, sizes = sizes_of()
    assert sizes == [(13, 19)]  # one forward pass at the image's size
    assert torch.equal(whole, ev.class_prototype_cosines(feature, bank, classes).argmax(1))
    sliding, sizes = sizes_of(mode="sliding", crop_size=8, stride=5)
    assert sizes == [(8, 8)] * 8  # windows: rows 0, 5; columns 0, 5, 10, 11
    assert torch.equal(sliding, whole)  # pointwise: every window sees the same features
    flipped, sizes = sizes_of(flip=True, scales=(1.0, 0.5))
    assert sizes == [(13, 19), (13, 19), (6, 10), (6, 10)]
    assert flipped.shape == whole.shape
    box_classes = classes[:, 2:10, 5:13]  # center_box(13, 19, 8) = (2, 5, 8, 8)
    center, sizes = sizes_of(mode="center", crop_size=8)
    assert sizes == [(8, 8)] and torch.equal(center, whole[:, 2:10, 5:13])


def test_evaluate_draws_the_prototype_map_by_the_same_windows(tmp_path):
    import numpy as np
    from PIL import Image
    import data
    model, bank, dataset = RecordingNet().eval(), make_bank(), make_dataset(1)
    palette = data.voc_palette()
    ev.evaluate(model, dataset, 4, "cpu", mode="sliding", crop_size=8, stride=8,
                heads=("proto",), bank=bank, save_dir=tmp_path, palette=palette,
                prototype_map=True, log=lambda line: None)
    assert set(model.sizes) == {(8, 8)}  # prediction and map: 8 x 8 windows only
    image, _, _ = dataset[0]
    classes = ev.predict(model, image[None], 4, head="proto", bank=bank).argmax(1)
    nearest = ev.class_prototype_cosines(model(image[None])[1], bank, classes).argmax(1)
    shades = ev.prototype_shades(palette, 4, 3)
    expected = shades[classes[0].numpy(), nearest[0].numpy()]  # (12, 16, 3)
    factor = 22  # ceil(256 / 12)
    top = ev.titled(np.zeros((1, 1, 3), np.uint8), "nearest micro-prototype").shape[0] - 1
    left = 16 * factor + 4
    picture = np.asarray(Image.open(tmp_path / "img0_prototypes.png").convert("RGB"))
    shown = picture[top:top + 12 * factor:factor, left:left + 16 * factor:factor]
    assert np.array_equal(shown, expected)
    assert len(np.unique(nearest)) > 1  # more than one shade: the comparison can fail


def test_prototype_shades():
    import numpy as np
    import data
    palette = data.voc_palette()
    shades = ev.prototype_shades(palette, 21, 5)
    assert shades.shape == (21, 5, 3) and shades.dtype == np.uint8
    assert np.array_equal(shades[1:, 2], palette[1:21])  # the middle shade is the colour
    for k in range(21):  # M distinct shades per class, background (black) included
        assert len({tuple(c) for c in shades[k].tolist()}) == 5, k
    assert (shades[0, :, 0] == shades[0, :, 1]).all()  # black -> greys
    brightness = shades[1].astype(int).sum(axis=1)
    assert (np.diff(brightness) > 0).all()  # darker to lighter
    assert ev.prototype_shades(palette, 3, 1)[1:, 0].tolist() == palette[1:3].tolist()


def test_cli_checkpoint_may_be_a_run_directory(toy_run, tmp_path, capsys):
    import shutil
    _, checkpoint = toy_run
    run = tmp_path / "run"
    run.mkdir()
    assert ev.main(["--checkpoint", str(run), "--device", "cpu"]) == 2
    assert "without best.pt or last.pt" in capsys.readouterr().err
    shutil.copy(checkpoint, run / "last.pt")
    args = ["--checkpoint", str(run), "--device", "cpu", "--mode", "center", "--crop-size", "16"]
    assert ev.main(args) == 0
    assert f"using {run / 'last.pt'} (it has no best.pt yet)" in capsys.readouterr().out
    shutil.copy(checkpoint, run / "best.pt")
    assert ev.main(args) == 0
    out = capsys.readouterr().out
    assert f"using {run / 'best.pt'}" in out and f"evaluate {run / 'best.pt'}" in out


def test_class_names_for_pictures_come_from_the_dataset_table_or_classes_txt(tmp_path):
    """--images has no dataset to ask: the names of toy / voc / cityscapes come from
    data.DATASETS, a folder run's as training named them (classes.txt, class_names.txt), else numbered names."""
    import data as data_lib
    assert ev.class_names_of({"dataset": "toy", "num_classes": len(data_lib.TOY_CLASSES)}) == \
        list(data_lib.TOY_CLASSES)
    assert ev.class_names_of({"dataset": "cityscapes", "num_classes": 19})[0] == "road"
    (tmp_path / "classes.txt").write_text("background\ncoin\nring\n")
    folder = {"dataset": "folder", "num_classes": 3, "data_root": str(tmp_path)}
    assert ev.class_names_of(folder) == ["background", "coin", "ring"]
    assert ev.class_names_of(dict(folder, num_classes=4)) == [f"class {k}" for k in range(4)]
    assert ev.class_names_of({"dataset": "folder", "num_classes": 2, "data_root": None}) == \
        ["class 0", "class 1"]
    os.rename(tmp_path / "classes.txt", tmp_path / "class_names.txt")  # labelme2voc's name for it
    assert ev.class_names_of(folder) == ["background", "coin", "ring"]
    os.remove(tmp_path / "class_names.txt")  # no names: training's own, class0, class1, ...
    assert ev.class_names_of(folder) == ["class0", "class1", "class2"]
