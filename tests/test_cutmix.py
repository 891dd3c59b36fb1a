"""Tests for cutmix.py against Python loops and the box rules of docs/METHOD.md step 3."""

import numpy as np
import pytest
import torch

from cutmix import cutmix_mask, mix


def box_of(mask):
    """(top, bottom, left, right) of the single rectangle a (H, W) mask holds, checked."""
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    rectangle = torch.zeros_like(mask)
    rectangle[top:bottom, left:right] = True
    assert torch.equal(mask, rectangle), "mask is not one filled rectangle"
    return top, bottom, left, right


def test_coin_fails_gives_empty_mask_and_succeeds_gives_boxes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        mask = cutmix_mask(4, 20, 30, p=0.0, generator=generator)
        assert mask.dtype == torch.bool and mask.shape == (4, 20, 30) and not mask.any()
        mask = cutmix_mask(4, 20, 30, p=1.0, generator=generator)
        assert mask.flatten(1).any(dim=1).all()


def test_coin_probability():
    generator = torch.Generator().manual_seed(0)
    mixed = sum(bool(cutmix_mask(1, 8, 8, p=0.3, generator=generator).any()) for _ in range(1000))
    assert 250 <= mixed <= 350          # binomial(1000, 0.3): mean 300, std 14.5


def reference_height(height, width, box_w):
    """U2PL's generate_cutout_mask: h = np.round(H W / 2 / w), numpy's ties-to-even."""
    return int(np.round(height * width / 2 / box_w))


@pytest.mark.parametrize("height, width", [(20, 30), (17, 23), (65, 65), (1, 7), (9, 1), (5, 2)])
def test_boxes_cover_half_the_image_and_stay_inside(height, width):
    masks = cutmix_mask(300, height, width, p=1.0, generator=torch.Generator().manual_seed(1))
    for mask in masks:
        top, bottom, left, right = box_of(mask)
        box_h, box_w = bottom - top, right - left
        if width >= 3:
            assert width // 2 + 1 <= box_w <= width - 1
        else:  # the reference's range is empty: the whole width
            assert box_w == width
        assert box_h == min(max(reference_height(height, width, box_w), 1), height)
        if box_h > 1:
            assert abs(box_h * box_w - height * width / 2) <= box_w / 2
        assert 0 <= top and bottom <= height and 0 <= left and right <= width


@pytest.mark.parametrize("height, size", [(33, 513), (64, 64), (65, 65)])
def test_width_range_is_the_reference_one_never_full_width(height, size):
    """w uniform on [floor(W/2) + 1, W - 1]: every width occurs, W itself never does."""
    generator = torch.Generator().manual_seed(3)
    widths, heights = [], []
    for _ in range(10):  # 5000 boxes at 513 (256 widths): P(one never drawn) ~ 1e-6
        masks = cutmix_mask(500, height, size, p=1.0, generator=generator)
        widths.append(masks.any(dim=1).sum(1))                                # (B,)
        heights.append(masks.any(dim=2).sum(1))
        assert torch.equal(masks.flatten(1).sum(1), widths[-1] * heights[-1])  # rectangles
    widths, heights = torch.cat(widths), torch.cat(heights)
    assert set(widths.tolist()) == set(range(size // 2 + 1, size))           # all, and only these
    expected = torch.tensor([reference_height(height, size, w) for w in widths.tolist()])
    assert torch.equal(heights, expected)


def test_height_rounds_ties_to_even_as_numpy():
    # W = H = 513, w = 361: H W / (2 w) = 364.5 exactly; np.round gives 364, half-up 365
    assert reference_height(513, 513, 361) == 364
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        masks = cutmix_mask(64, 513, 513, p=1.0, generator=generator)
        widths = masks.any(dim=1).sum(1)
        if (widths == 361).any():
            assert (masks[widths == 361].any(dim=2).sum(1) == 364).all()
            return
    pytest.fail("no box of width 361 in 2560 draws")


def test_box_widths_and_positions_are_roughly_uniform():
    height, width = 16, 20
    masks = cutmix_mask(4000, height, width, p=1.0, generator=torch.Generator().manual_seed(2))
    boxes = [box_of(mask) for mask in masks]
    widths = torch.tensor([right - left for _, _, left, right in boxes])
    counts = torch.bincount(widths, minlength=width + 1)[width // 2 + 1:]     # w = 11..20
    assert counts[-1] == 0                                                     # never w = W
    counts = counts[:-1]                                                       # 4000 / 9 each
    assert counts.min() > 444 - 85 and counts.max() < 444 + 85
    # For the widest boxes (w = 11, so 10 possible left edges) the left edge is uniform;
    # every left/top edge that keeps the box inside occurs.
    lefts = torch.tensor([left for _, _, left, right in boxes if right - left == 11])
    left_counts = torch.bincount(lefts, minlength=10)
    assert len(left_counts) == 10 and left_counts.min() > 0.5 * len(lefts) / 10
    for w in range(width // 2 + 1, width):
        h = reference_height(height, width, w)
        tops = {top for top, bottom, left, right in boxes if right - left == w}
        assert tops == set(range(height - h + 1))


def test_mask_is_reproducible_with_a_seeded_generator():
    first = cutmix_mask(6, 33, 33, p=0.5, generator=torch.Generator().manual_seed(7))
    second = cutmix_mask(6, 33, 33, p=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    generator = torch.Generator().manual_seed(7)
    draws = [cutmix_mask(6, 33, 33, p=1.0, generator=generator) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert cutmix_mask(2, 8, 8, generator=generator, device="cpu").device.type == "cpu"


def test_the_generator_is_required_and_the_global_rng_is_never_drawn():
    for generator in ((), (None,)):  # left out, or None
        with pytest.raises(TypeError, match="generator"):
            cutmix_mask(2, 8, 8, p=1.0, **dict(zip(["generator"], generator)))
    state = torch.get_rng_state()
    cutmix_mask(4, 16, 16, p=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_mix_matches_python_loop_and_keeps_streams_consistent():
    torch.manual_seed(0)
    batch, channels, height, width = 3, 2, 6, 7
    images = torch.randn(batch, channels, height, width)
    labels = torch.randint(0, 5, (batch, height, width))
    confidences = torch.rand(batch, height, width)
    mask = cutmix_mask(batch, height, width, p=1.0, generator=torch.Generator().manual_seed(0))
    mixed_images, mixed_labels, mixed_confidences = (mix(images, mask), mix(labels, mask),
                                                     mix(confidences, mask))
    source = torch.zeros(batch, height, width, dtype=torch.long)
    for i in range(batch):
        for y in range(height):
            for x in range(width):
                j = (i + 1) % batch if mask[i, y, x] else i
                source[i, y, x] = j
                assert torch.equal(mixed_images[i, :, y, x], images[j, :, y, x])
                assert mixed_labels[i, y, x] == labels[j, y, x]
                assert mixed_confidences[i, y, x] == confidences[j, y, x]
    assert (source != torch.arange(batch)[:, None, None]).any()   # something moved
    assert mixed_labels.dtype == labels.dtype and mixed_images.shape == images.shape
    # An all-False mask leaves everything as it was.
    empty = torch.zeros(batch, height, width, dtype=torch.bool)
    assert torch.equal(mix(images, empty), images) and torch.equal(mix(labels, empty), labels)


def test_bad_input_is_a_clear_error():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mix: x must be \(B, \.\.\., H, W\)"):
        mix(torch.zeros(2, 3, 5, 4), mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        mix(torch.zeros(2, 4, 4), mask.float())
    with pytest.raises(ValueError, match="p must be in"):
        cutmix_mask(2, 4, 4, p=1.5, generator=torch.Generator())
