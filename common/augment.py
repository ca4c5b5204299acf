"""Training augmentation for whole batches on the device: random resized crop and horizontal flip.

Parameters are drawn per image on the CPU from a ``torch.Generator`` (a seed gives the same crops on
any device), as torchvision's ``RandomResizedCrop.get_params`` draws them, and ``crop_flip`` applies them.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
CROP_ATTEMPTS = 10


def sample_crops(n: int, height: int, width: int, generator, scale=CROP_SCALE, ratio=CROP_RATIO):
    """float32 ``[n, 4]``: (top, left, crop height, crop width) in pixels for each of ``n`` images."""
    # All tries are drawn for every image, fitting or not, so the random stream never depends on the data.
    area = height * width * torch.empty(n, CROP_ATTEMPTS).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(n, CROP_ATTEMPTS).uniform_(*log_ratio, generator=generator).exp()
    crop_w = (area * aspect).sqrt().round()
    crop_h = (area / aspect).sqrt().round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first try that fits
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
    position = torch.rand(n, 2, generator=generator)
    top = (position[:, 0] * (height - crop_h + 1)).floor()
    left = (position[:, 1] * (width - crop_w + 1)).floor()

    # No try fitted: the largest central crop whose aspect ratio is within bounds.
    fallback_w, fallback_h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
    fitted = fits.any(dim=1)
    crop_h = torch.where(fitted, crop_h, float(fallback_h))
    crop_w = torch.where(fitted, crop_w, float(fallback_w))
    top = torch.where(fitted, top, float((height - fallback_h) // 2))
    left = torch.where(fitted, left, float((width - fallback_w) // 2))
    return torch.stack([top, left, crop_h, crop_w], dim=1)


def sample_flips(n: int, generator: torch.Generator, p: float = FLIP_PROBABILITY) -> torch.Tensor:
    """bool ``[n]``: which images are mirrored left to right."""
    return torch.rand(n, generator=generator) < p


def crop_flip(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Each image of ``images`` (uint8 ``[B, H, W, 3]``) cropped to its box, mirrored if asked and resized
    to ``size`` x ``size`` (float32 ``[B, size, size, 3]`` in [0, 255]), as torchvision's ``hflip(
    resized_crop(...))``: ``resize_crops`` on the CPU (the faster kernel there), ``matmul_crops`` elsewhere.
    """
    return (resize_crops if images.device.type == "cpu" else matmul_crops)(images, crops, flips, size)


def resize_crops(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """``crop_flip`` as one uint8 resize per image, rounded to uint8 once (within 1 level of 255)."""
    resized = []
    boxes = crops.to(torch.int64).tolist()
    for image, (top, left, height, width), flip in zip(images, boxes, flips.tolist(), strict=True):
        crop = image[top : top + height, left : left + width].permute(2, 0, 1)[None]
        crop = crop.flip(3) if flip else crop  # bilinear resizing (half-pixel centres) commutes with a flip
        # antialias selects torch's fast uint8 kernel; upsampling (every training crop) it is plain bilinear.
        antialias = height <= size and width <= size
        resized.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=antialias))
    return torch.cat(resized).permute(0, 2, 3, 1).float()


def _bilinear_matrix(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """float ``[B, size, extent]``: row o holds the weights by which output pixel o mixes input pixels,
    for bilinear resizing of ``[start, start + length)`` to ``size`` (half-pixel centres, as
    ``F.interpolate(align_corners=False)``, clamped to the crop)."""
    length = length[:, None]
    centres = torch.arange(size, dtype=torch.float32, device=start.device) + 0.5
    source = (centres * (length / size) - 0.5).clamp(min=0)
    lower = source.floor().minimum(length - 1)
    upper_weight = source - lower
    upper = (lower + 1).minimum(length - 1)
    matrix = torch.zeros(len(start), size, extent, dtype=torch.float32, device=start.device)
    matrix.scatter_add_(2, (lower + start[:, None]).long().unsqueeze(2), (1 - upper_weight).unsqueeze(2))
    matrix.scatter_add_(2, (upper + start[:, None]).long().unsqueeze(2), upper_weight.unsqueeze(2))
    return matrix


def matmul_crops(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """``crop_flip`` as two batched matrix products, ``Wy @ image @ Wx^T``, the flip folded into ``Wx``:
    exact up to float rounding (TF32 where the caller enables it), one launch-friendly batched path."""
    _, height, width, _ = images.shape
    top, left, crop_h, crop_w = crops.to(device=images.device, dtype=torch.float32).unbind(dim=1)
    rows = _bilinear_matrix(top, crop_h, size, height)
    columns = _bilinear_matrix(left, crop_w, size, width)
    columns = torch.where(flips.to(images.device)[:, None, None], columns.flip(1), columns)  # mirrored output
    x = rows.unsqueeze(1) @ images.permute(0, 3, 1, 2).float() @ columns.transpose(1, 2).unsqueeze(1)
    return x.permute(0, 2, 3, 1)
