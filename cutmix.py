"""CutMix for the unlabeled stream (docs/METHOD.md section 3 step 3).

Imports only torch, so the file can be copied into another project on its own. Random numbers come only from
the torch.Generator given (never the global RNG). Usage (tests/test_copyable.py runs it on this file alone):

    >>> import torch
    >>> from cutmix import cutmix_mask, mix
    >>> gen = torch.Generator().manual_seed(0)
    >>> images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4, 16, 16))
    >>> mask = cutmix_mask(4, 16, 16, p=1.0, generator=gen)    # (4, 16, 16) bool, one box each
    >>> mixed_images, mixed_labels = mix(images, mask), mix(labels, mask)
    >>> torch.equal(mixed_labels[0][mask[0]], labels[1][mask[0]])
    True
"""

import torch


def _to_device(tensor, device):
    """Move a CPU tensor to `device` without blocking the host on a CUDA stream."""
    if device is None or torch.device(device) == tensor.device:
        return tensor
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        # A pageable copy would synchronise the stream; a pinned one is queued.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cutmix_mask(batch_size, height, width, p=0.5, *, generator, device=None):
    """Boxes covering half of each image, for the whole batch with probability p.

    One coin flip per call: with probability 1 - p the mask is all False. Otherwise image i gets its own box,
    drawn as U2PL's generate_cutout_mask draws it: width w uniform on the integers [floor(W/2) + 1, W - 1]
    (never the full width; for W < 3, where that range is empty, w = W), height h = round(H W / (2 w)) with
    ties to even as numpy rounds (so w h ~ H W / 2, and h < H), top-left corner uniform over the positions
    that keep the box inside the image.
    Returns bool (B, H, W), True inside the box, on `device` (default: the generator's). As many numbers
    are drawn from `generator` whether or not the coin succeeds: a seeded run stays reproducible."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"cutmix_mask: generator must be a torch.Generator (this module never "
                        f"draws from the global RNG), got {type(generator).__name__}")
    if batch_size < 1 or height < 1 or width < 1:
        raise ValueError(f"cutmix_mask: batch_size, height and width must be >= 1, got "
                         f"{batch_size}, {height}, {width}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix_mask: p must be in [0, 1], got {p}")
    rng_device = generator.device

    def uniform_int(low, count):
        # Integers uniform on [low, low + count), elementwise; float64 so that u * count < count.
        u = torch.rand(batch_size, generator=generator, device=rng_device, dtype=torch.float64)
        return low + (u * count).long().clamp_max(count - 1)

    apply = torch.rand((), generator=generator, device=rng_device) < p          # coin, ()
    narrowest = min(width // 2 + 1, width)
    box_w = uniform_int(narrowest, max(width - narrowest, 1))                   # (B,) [W/2+1, W-1]
    # float64 holds H W / (2 w) exactly when it is a tie (n + 0.5), so torch.round's
    # ties-to-even matches np.round, which the reference uses (W = 513, w = 361: 364).
    box_h = torch.round(height * width / (2.0 * box_w.double())).long().clamp(1, height)  # (B,)
    top = uniform_int(0, height - box_h + 1)
    left = uniform_int(0, width - box_w + 1)
    box = torch.stack([top, top + box_h, left, left + box_w, apply.long().expand(batch_size)])
    box = _to_device(box, device)                                               # (5, B)
    top, bottom, left, right, apply = box[:, :, None, None]                     # (B, 1, 1) each
    rows = torch.arange(height, device=box.device)[:, None]                     # (H, 1)
    cols = torch.arange(width, device=box.device)[None, :]                      # (1, W)
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right) & (apply > 0)


def mix(x, mask):
    """Paste the box content of image (i + 1) mod B into image i.

    x (B, ..., H, W): images (B, C, H, W), labels (B, H, W), confidences (B, H, W), ...;
    mask bool (B, H, W) from `cutmix_mask`. Returns
        out[i] = where(mask[i], x[(i + 1) mod B], x[i])
    with the mask broadcast over the dimensions between B and (H, W). Applying the same
    mask to images, pseudo-labels and confidences keeps them consistent."""
    if mask.dim() != 3 or x.dim() < 3 or x.shape[0] != mask.shape[0] or x.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mix: x must be (B, ..., H, W) matching mask (B, H, W), got "
                         f"x {tuple(x.shape)} and mask {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mix: mask must be bool, got {mask.dtype}")
    mask = mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[1:])
    return torch.where(mask, x.roll(-1, dims=0), x)
