"""Training augmentation for whole batches on the device: random resized crop and horizontal flip.

Parameters are drawn on the CPU from a ``torch.Generator`` (so a seed gives the same crops on any
device), one set per image, and applied by ``crop_flip`` to a uint8 batch, with a kernel chosen by
device (see there). The crop sampling follows torchvision's ``RandomResizedCrop.get_params``: up to
10 tries of an area fraction and a log-uniform aspect ratio; the first crop that fits wins, else a
central crop.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch

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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread. Per-image resizes are far too small to split: with two
    threads on a 2-core machine that also runs other jobs, each call waits for the busy core and the
    batch took 490 ms instead of 8 ms (torch 2.14, 2-core EPYC, 64 images at 224). To use more cores,
    give threads whole images (``DeviceLoader`` on the CPU does, through ``data.share_out``)."""
    threads = torch.get_num_threads()
    if threads == 1:  # e.g. the loader's helper threads: no process-wide setting written, nothing to restore
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def crop_flip(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int,
              kernel: str | None = None) -> torch.Tensor:
    """Crop each image of ``images`` (uint8 ``[B, H, W, 3]``) to its box, mirror it if asked and resize it
    to ``size`` x ``size``: float32 ``[B, 3, size, size]`` with channels_last strides, values in [0, 255].

    The result is torchvision's ``hflip(resized_crop(image, top, left, h, w, [size, size]))``: bilinear,
    half-pixel centres, clamped to the crop's own edges. Two kernels compute it, chosen by device
    (``kernel`` overrides, for tests):

    - ``"resize"`` (CPU): ``resize_crops`` (uint8 out, one resize per image), then one conversion of
      the whole batch to float. Rounded to uint8 on the way (|error| <= 1 level of 255).
    - ``"matmul"`` (other devices): separable bilinear as two batched matrix products,
      ``Wy @ image @ Wx^T``, with the flip folded into ``Wx``; exact up to float rounding (TF32 where
      the caller enables it for matmuls: |error| below 0.3 of 255). One launch-friendly batched path.
    """
    if kernel is None:
        kernel = "resize" if images.device.type == "cpu" else "matmul"
    if kernel == "resize":
        return to_float(resize_crops(images, crops, flips, size))
    if kernel == "matmul":
        return _crop_flip_matmul(images, crops, flips, size)
    raise ValueError(f"unknown crop_flip kernel {kernel!r}; use 'resize' or 'matmul'")


def resize_crops(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``crop_flip`` in uint8 on the CPU: ``[B, size, size, 3]``, written into ``out`` if given.

    One resize per image, run by torch's AVX2 uint8 kernel straight into the image's slot of ``out``
    (the ``.out`` form of the op: no per-image result to copy), with one intra-op thread (each image is
    far too small to split; see ``one_thread``). That kernel needs a contiguous channels_last input, so
    the crop is copied first, and the flip is applied during that copy: bilinear resizing with
    half-pixel centres commutes with mirroring, and the crop is never larger than the output.
    ``antialias=True`` selects the fast kernel; when upsampling, which every training crop is (a crop
    is at most the image, resized back to the image size), it is plain bilinear. A crop larger than
    ``size`` in either direction is resized with plain bilinear, like the matmul kernel. Measured for
    64 images at 224 on a 2-core EPYC, one thread (torch 2.14): 8 ms, against 12 ms resizing into a new
    tensor and then flipping and copying each result, 20 ms with ``antialias=False``, 27 ms resizing
    float crops, 85 ms for one ``grid_sample`` and 320 ms for the matmul kernel. The op releases the
    GIL, so threads can resize different images at once (``DeviceLoader`` does).
    """
    if out is None:
        out = torch.empty((len(images), size, size, 3), dtype=torch.uint8)
    source, target = images.permute(0, 3, 1, 2), out.permute(0, 3, 1, 2)  # NCHW views, channels_last strides
    antialiased, plain = torch.ops.aten._upsample_bilinear2d_aa.out, torch.ops.aten.upsample_bilinear2d.out
    channels_last, output_size = torch.channels_last, [size, size]
    with one_thread():
        for i, ((top, left, height, width), flip) in enumerate(zip(crops.to(torch.int64).tolist(), flips.tolist())):
            crop = source[i:i + 1, :, top:top + height, left:left + width]
            if flip:
                crop = crop.flip(3)  # a copy, laid out channels_last like its input
            crop = crop.contiguous(memory_format=channels_last)
            resize = antialiased if height <= size and width <= size else plain
            resize(crop, output_size, False, None, None, out=target[i:i + 1])
    return out


def to_float(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[B, 3, H, W]`` with channels_last strides (``[B, H, W, 3]`` permuted) from uint8
    ``[B, H, W, 3]``, values unchanged, on the same device; written into ``out`` (float32
    ``[B, H, W, 3]``) if given.

    On the CPU a new buffer comes from numpy, which asks the kernel for transparent huge pages on large
    arrays: first-touching a fresh 38 MB batch from torch's allocator costs one page fault per 4 kB,
    which made the conversion 2-3x slower (2-core EPYC, 64 images at 224)."""
    if out is None:
        if images.device.type != "cpu":
            return images.permute(0, 3, 1, 2).float()
        out = torch.from_numpy(np.empty(tuple(images.shape), dtype=np.float32))
    return out.copy_(images).permute(0, 3, 1, 2)


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


def _crop_flip_matmul(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    _, height, width, _ = images.shape
    top, left, crop_h, crop_w = crops.to(device=images.device, dtype=torch.float32).unbind(dim=1)
    rows = _bilinear_matrix(top, crop_h, size, height)
    columns = _bilinear_matrix(left, crop_w, size, width)
    columns = torch.where(flips.to(images.device)[:, None, None], columns.flip(1), columns)  # mirrored output
    x = images.permute(0, 3, 1, 2).float()
    x = rows.unsqueeze(1) @ x @ columns.transpose(1, 2).unsqueeze(1)  # [B, 3, size, size]
    return x.contiguous(memory_format=torch.channels_last)
