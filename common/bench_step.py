"""Training-step benchmark: eager fp32 NCHW, then channels_last, autocast and compile, side by side.

Each variant runs the project's real step (``engine.train_one_epoch``) on one batch kept in device
memory, so the figures isolate the model step from the data path. Model FLOP utilisation (MFU) is
achieved training FLOP/s over a matmul rate measured on the same device in the same run; a training
step is counted as 3x the forward FLOPs (backward is about twice the forward: Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", section 2.1; nanoGPT's estimate_mfu uses the same rule).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from common import engine


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    autocast: bool
    compile: bool


VARIANTS = (
    Variant("eager_fp32_nchw", False, False, False),
    Variant("channels_last", True, False, False),
    Variant("channels_last_autocast", True, True, False),
    Variant("channels_last_autocast_compile", True, True, True),
    Variant("channels_last_compile_fp32", True, False, True),
)


class _SameBatch:
    """``steps`` repetitions of one batch: a loader whose cost is zero."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps, self.batch_size = images, labels, steps, len(labels)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """Dense matmul rate on ``device``: the practical peak MFU is measured against."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def amp_dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def bench_variant(make_model, variant: Variant, *, input_size: int, batch_size: int, steps: int, repeats: int,
                  device: torch.device, num_classes: int = 10, seed: int = 0) -> dict:
    """Median steady-state images/s over ``repeats`` epochs of ``steps`` steps, plus warm-up time."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch_size, 3, input_size, input_size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    amp_dtype = amp_dtype_for(device) if variant.autocast else None
    ctx = engine.StepContext(device=device, amp_dtype=amp_dtype,
                             scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    runnable = torch.compile(model, dynamic=False) if variant.compile else model
    loss_fn = nn.CrossEntropyLoss()
    # Warm-up: compilation, cudnn autotuning, allocator growth. Reported apart from steady state.
    start = time.perf_counter()
    engine.train_one_epoch(runnable, _SameBatch(images, labels, 3), optimizer, None, loss_fn, ctx, epoch=0)
    _sync(device)
    warmup_s = time.perf_counter() - start
    rates = [engine.train_one_epoch(runnable, _SameBatch(images, labels, steps), optimizer, None, loss_fn, ctx,
                                    epoch=1)["images_per_s"] for _ in range(repeats)]
    return {"images_per_s": statistics.median(rates), "runs": rates, "warmup_s": warmup_s,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}


def bench_model(name: str, make_model, forward_flops: int, *, input_size: int, batch_size: int, steps: int,
                repeats: int, device: torch.device, variants=VARIANTS) -> dict:
    """All variants of one model with their ratio to eager and their MFU."""
    peaks = {"fp32": matmul_flops_per_s(device, torch.float32)}
    peaks[str(amp_dtype_for(device)).replace("torch.", "")] = matmul_flops_per_s(device, amp_dtype_for(device))
    results = {}
    for variant in variants:
        try:
            result = bench_variant(make_model, variant, input_size=input_size, batch_size=batch_size, steps=steps,
                                   repeats=repeats, device=device)
        except Exception as error:  # e.g. no compiler toolchain for torch.compile: report, keep going
            results[variant.name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        achieved = result["images_per_s"] * 3 * forward_flops
        result["achieved_tflop_s"] = achieved / 1e12
        result["mfu"] = achieved / peaks[result["amp_dtype"]]
        results[variant.name] = result
    eager = results.get(VARIANTS[0].name, {}).get("images_per_s")
    for result in results.values():
        if eager and "images_per_s" in result:
            result["ratio_to_eager"] = result["images_per_s"] / eager
    return {"model": name, "input_size": input_size, "batch_size": batch_size, "forward_gflops_per_image":
            forward_flops / 1e9, "matmul_tflop_s": {k: v / 1e12 for k, v in peaks.items()}, "variants": results}
