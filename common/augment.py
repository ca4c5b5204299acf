"""Training augmentation for whole batches on the device: random resized crop and horizontal flip.

Parameters are drawn on the CPU from a ``torch.Generator`` (so a seed gives the same crops on any
device), one set per image, and applied with a single ``grid_sample`` call for the whole batch. The
crop sampling follows torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area
fraction and a log-uniform aspect ratio; the first crop that fits wins, else a central crop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
CROP_ATTEMPTS = 10


def sample_crops(n: int, height: int, width: int, generator: torch.Generator,
                 scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """float32 ``[n, 4]``: (top, left, crop height, crop width) in pixels for each of ``n`` images."""
    # All tries are drawn for every image, fitting or not, so the random stream never depends on the data.
    area = height * width * torch.empty(n, CROP_ATTEMPTS).uniform_(*scale, generator=generator)
    aspect = torch.empty(n, CROP_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                    generator=generator).exp()
    crop_w = (area * aspect).sqrt().round()
    crop_h = (area / aspect).sqrt().round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first try that fits
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)
    position = torch.rand(n, 2, generator=generator)
    top = (position[:, 0] * (height - crop_h + 1)).floor()
    left = (position[:, 1] * (width - crop_w + 1)).floor()

    # No try fitted: the largest central crop whose aspect ratio is within bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
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
    """Crop each image of ``images`` (float ``[B, C, H, W]``) to its box, mirror it if asked, and resize
    it to ``size`` x ``size`` with bilinear interpolation; ``crops`` and ``flips`` are on its device."""
    batch, channels, height, width = images.shape
    top, left, crop_h, crop_w = crops.to(images.dtype).unbind(dim=1)
    # With align_corners=False, -1 and +1 are the outer edges of the first and last pixels, so the box
    # [left, left + w) has centre (2 left + w) / W - 1 and half-width w / W in grid_sample's coordinates.
    mirror = 1.0 - 2.0 * flips.to(images.dtype)
    centres = (torch.arange(size, dtype=images.dtype, device=images.device) * 2 + 1) / size - 1
    grid_x = (crop_w / width * mirror)[:, None] * centres + ((2 * left + crop_w) / width - 1)[:, None]
    grid_y = (crop_h / height)[:, None] * centres + ((2 * top + crop_h) / height - 1)[:, None]
    # The transform has no rotation, so x depends on the column only and y on the row only: building the
    # grid by broadcasting gives what affine_grid would, without its per-pixel batched matmul (slow on CPU).
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
