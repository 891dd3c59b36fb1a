"""Losses, schedules, EMA and data order of train.py against independent computations."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prototypes
import train


def slow_ohem(logits, target, thresh, min_kept):
    """Reference: a direct float64 reading of docs/METHOD.md step 5."""
    logits = logits.double().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).numpy()
    target = target.flatten().numpy()
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    valid = np.flatnonzero(target != 255)
    p = np.array([prob[i, target[i]] for i in valid])
    if len(valid) < min_kept:
        kept = valid
    else:
        threshold = max(thresh, np.sort(p)[min_kept - 1])
        kept = valid[p <= threshold]
    if len(kept) == 0:
        return 0.0
    return float(np.mean([-math.log(prob[i, target[i]]) for i in kept]))


@pytest.mark.parametrize("min_kept", [1, 10, 50, 10_000])
def test_ohem_matches_reference(min_kept):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7) * 3
    target = torch.randint(0, 4, (2, 6, 7))
    target[0, :2] = 255
    got = train.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=min_kept)
    assert got.item() == pytest.approx(slow_ohem(logits, target, 0.7, min_kept), rel=1e-5)


def test_ohem_hand_case():
    # 4 valid pixels with ground-truth probabilities 0.9, 0.6, 0.8, 0.5 (2 classes); one ignored
    p = torch.tensor([0.9, 0.6, 0.8, 0.5, 0.5])
    logits = torch.stack([torch.log(p), torch.log(1 - p)]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    # min_kept 2: 2nd smallest is 0.6 < 0.7, so the threshold is 0.7 -> keep 0.6 and 0.5
    expected = -(math.log(0.6) + math.log(0.5)) / 2
    assert train.ohem_cross_entropy(logits, target, 0.7, 2).item() == pytest.approx(expected, rel=1e-5)
    # min_kept 3: 3rd smallest is 0.8 > 0.7 -> keep 0.5, 0.6, 0.8
    expected = -(math.log(0.6) + math.log(0.5) + math.log(0.8)) / 3
    assert train.ohem_cross_entropy(logits, target, 0.7, 3).item() == pytest.approx(expected, rel=1e-5)
    # fewer valid pixels than min_kept: everything valid counts
    expected = -sum(math.log(x) for x in (0.9, 0.6, 0.8, 0.5)) / 4
    assert train.ohem_cross_entropy(logits, target, 0.7, 5).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = train.ohem_cross_entropy(logits, torch.full((1, 4, 4), 255), 0.7, 5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def slow_entropy_ce(logits, pseudo_label, entropy, drop):
    logits = logits.double().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    log_prob = torch.log_softmax(logits, 1).numpy()
    y, h = pseudo_label.flatten().numpy(), entropy.double().flatten().numpy()
    valid = [i for i in range(len(y)) if y[i] != 255]
    valid.sort(key=lambda i: h[i])
    kept = valid[: int(math.floor(len(valid) * (1 - drop)))]
    if not kept:
        return 0.0
    # U2PL's weight: all pixels of the batch (padding included) over the kept ones
    return len(y) / len(kept) * float(np.mean([-log_prob[i, y[i]] for i in kept]))


@pytest.mark.parametrize("host_read", [True, False])  # CPU's selection, CUDA's sort
@pytest.mark.parametrize("drop", [0.0, 0.05, 0.2, 0.5, 0.99])
def test_entropy_filtered_ce_matches_reference(drop, host_read, monkeypatch):
    monkeypatch.setattr(train, "sorted_value_at", functools.partial(train.sorted_value_at, host_read=host_read))
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 8, 9)
    pseudo_label = torch.randint(0, 5, (2, 8, 9))
    pseudo_label[1, 3:] = 255
    entropy = torch.rand(2, 8, 9)
    got = train.entropy_filtered_cross_entropy(logits, pseudo_label, entropy, drop)
    assert got.item() == pytest.approx(slow_entropy_ce(logits, pseudo_label, entropy, drop), rel=1e-5)


def test_entropy_filter_drops_the_most_uncertain():
    # 10 pixels; with drop 0.2 the two highest-entropy ones must not matter at all
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 0, 0, 8:] = -50.0  # huge loss on pixels 8, 9 (label 0)
    pseudo_label = torch.zeros(1, 1, 10, dtype=torch.long)
    entropy = torch.arange(10.0).view(1, 1, 10)
    # 8 kept pixels of loss log 2 each, weighted by 10 pixels / 8 kept
    assert train.entropy_filtered_cross_entropy(logits, pseudo_label, entropy, 0.2).item() == \
        pytest.approx(10 / 8 * math.log(2), rel=1e-5)
    assert train.entropy_filtered_cross_entropy(logits, pseudo_label, entropy, 0.0).item() > 5


@pytest.mark.parametrize("drop, padded, expected_weight", [
    (0.2, 0, 20 / 16),   # 20 valid, 16 kept: 1.25 x the plain mean, as early in training
    (0.0, 0, 1.0),       # nothing dropped, nothing padded: the plain mean, as at the end
    (0.2, 5, 20 / 12),   # 15 valid (5 padded, 255), floor(15 x 0.8) = 12 kept
    (0.0, 5, 20 / 15),   # padding alone still counts in N
])
def test_unsupervised_loss_weight_is_all_pixels_over_kept(drop, padded, expected_weight):
    """Hand case: 20 pixels with known per-pixel losses; L = N / #kept x mean over kept."""
    torch.manual_seed(4)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    pseudo_label = torch.randint(0, 3, (1, 4, 5))
    pseudo_label.view(-1)[:padded] = 255
    entropy = torch.randperm(20).double().view(1, 4, 5)  # distinct: the drop is unambiguous
    nll = -torch.log_softmax(logits, 1).gather(1, pseudo_label.clamp(max=2)[:, None])[:, 0]
    valid = pseudo_label != 255
    num_keep = math.floor(int(valid.sum()) * (1 - drop))
    kept_entropy = entropy[valid].sort().values[:num_keep]
    kept = valid & (entropy <= kept_entropy.max())
    assert int(kept.sum()) == num_keep and 20 / num_keep == pytest.approx(expected_weight)
    expected = expected_weight * float(nll[kept].mean())
    got = train.entropy_filtered_cross_entropy(logits.float(), pseudo_label, entropy.float(), drop)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_unsupervised_loss_with_a_quarter_padded_is_1_6x_the_plain_mean():
    """The issue's measurement: 23% padding and drop 0.2 give about 1 / (0.77 x 0.8) = 1.62."""
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 10, 10)
    pseudo_label = torch.randint(0, 4, (2, 10, 10))
    pseudo_label[:, :, 8:] = 255  # 20 + 3 of every 100 pixels padded
    pseudo_label[:, 0, :3] = 255
    entropy = torch.rand(2, 10, 10)
    got = train.entropy_filtered_cross_entropy(logits, pseudo_label, entropy, 0.2)
    valid = pseudo_label != 255
    num_keep = math.floor(int(valid.sum()) * 0.8)
    threshold = entropy[valid].sort().values[num_keep]
    kept = valid & (entropy < threshold)
    plain = F.cross_entropy(logits, torch.where(kept, pseudo_label, 255), ignore_index=255)
    assert got.item() / plain.item() == pytest.approx(200 / num_keep, rel=1e-5)


@pytest.mark.parametrize("images, expected", [(1, 50000), (2, 100000), (4, 200000), (16, 800000)])
def test_ohem_min_kept_scales_with_the_labeled_images_of_the_process(images, expected):
    cfg = train.resolve_config(train.parse_args(["--dataset", "voc"]))
    assert train.ohem_min_kept(cfg, images) == expected
    # the reference's 2 images per GPU at crop 513 keep ~19% of the pixels; so does any count
    assert train.ohem_min_kept(cfg, images) / (images * 513 * 513) == pytest.approx(0.19, abs=0.005)


@pytest.mark.parametrize("images", [1, 2, 4])
def test_supervised_loss_uses_min_kept_of_its_batch(images):
    torch.manual_seed(6)
    # threshold 0: OHEM keeps exactly the min_kept hardest pixels, so min_kept shows
    cfg = dict(ohem_thresh=0.0, ohem_min_kept_per_image=7, aux_weight=0.0)
    logits = torch.randn(images, 4, 5, 6) * 3
    label = torch.randint(0, 4, (images, 5, 6))
    got = train.supervised_losses(logits, None, label, cfg)
    assert got.item() == pytest.approx(slow_ohem(logits, label, 0.0, 7 * images), rel=1e-5)
    if images > 1:
        assert got.item() != pytest.approx(slow_ohem(logits, label, 0.0, 7), rel=1e-3)


def test_drop_schedule():
    assert train.drop_fraction_at(0, 80) == pytest.approx(0.2)
    assert train.drop_fraction_at(40, 80) == pytest.approx(0.1)
    assert train.drop_fraction_at(80, 80) == pytest.approx(0.0)


def test_prototype_loss_ignores_255():
    torch.manual_seed(2)
    logits = torch.randn(20, 4)
    target = torch.randint(0, 4, (20,))
    target[::3] = 255
    expected = F.cross_entropy(logits.double(), target, ignore_index=255)
    assert prototypes.prototype_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert prototypes.prototype_loss(logits, torch.full((20,), 255)).item() == 0.0


def test_poly_lr():
    assert train.poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert train.poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert train.poly_lr(0.01, 99, 100) == pytest.approx(0.01 * 0.01 ** 0.9)


def test_ema_alpha_and_update():
    assert train.ema_alpha(0) == 0.0
    assert train.ema_alpha(1) == pytest.approx(0.5)
    assert train.ema_alpha(10**6) == pytest.approx(0.99)
    torch.manual_seed(3)
    student = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    student(torch.randn(4, 2, 3, 3))  # move the student's running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train.ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        if v.dtype.is_floating_point:
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * s, atol=1e-6), k
        else:
            assert torch.equal(v, s), k
    plain_teacher, plain_student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)  # no BN counters
    expected = 0.5 * plain_teacher.weight.detach() + 0.5 * plain_student.weight.detach()
    train.ema_update(plain_teacher, plain_student, 0.5)
    assert torch.allclose(plain_teacher.weight, expected)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_keys_cover_the_epoch_once_split_over_ranks():
    n, batch, ipe, world = 23, 4, 5, 2  # 5 iterations of 4 images = 20 of 23 per epoch
    streams = [iter(train.TrainKeys(n, batch, ipe, seed=7, stream=1, rank=r, world=world, start_iter=0))
               for r in range(world)]
    per_rank = [take(s, ipe * batch // world) for s in streams]
    indices = [i for keys in per_rank for i, _ in keys]
    assert len(indices) == len(set(indices)) == ipe * batch  # no image twice in an epoch
    # next epoch: a different order
    nxt = [i for i, _ in take(streams[0], ipe * batch // world)]
    assert nxt != [i for i, _ in per_rank[0]]


def test_train_keys_repeat_a_small_labeled_set_evenly():
    keys = take(iter(train.TrainKeys(3, 4, 3, seed=0, stream=0, rank=0, world=1, start_iter=0)), 12)
    counts = np.bincount([i for i, _ in keys], minlength=3)
    assert counts.tolist() == [4, 4, 4]


def test_train_keys_resume_continues_the_same_stream():
    full = take(iter(train.TrainKeys(50, 6, 4, seed=3, stream=0, rank=1, world=2, start_iter=0)), 3 * 11)
    resumed = take(iter(train.TrainKeys(50, 6, 4, seed=3, stream=0, rank=1, world=2, start_iter=5)), 3 * 6)
    assert resumed == full[3 * 5:]
