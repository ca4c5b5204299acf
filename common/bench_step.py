"""Training-step benchmark: eager fp32 NCHW, then channels_last, autocast and compile, side by side.

Each variant runs the project's real step (``engine.train_one_epoch``) on one batch kept in device
memory, so the figures isolate the model step from the data path. Model FLOP utilisation (MFU) is
achieved training FLOP/s over a matmul rate measured on the same device in the same run; a training
step is counted as 3x the forward FLOPs (backward is about twice the forward: Kaplan et al. 2020,
"Scaling Laws for Neural Language Models", section 2.1; nanoGPT's estimate_mfu uses the same rule).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from common import bench_data, engine
from common.training import resolve_device


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
    return 2 * size**3 / min(times)  # a peak: the best repeat, least disturbed by other work


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """What ``--precision auto`` trains with on CUDA; bf16 elsewhere (the CPU autocast type)."""
    from common.training import cuda_amp_dtype
    return cuda_amp_dtype(device) if device.type == "cuda" else torch.bfloat16


def fp32_name(device: torch.device) -> str:
    """fp32 matmuls and convolutions run on TF32 tensor cores under the training flags on CUDA."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


@contextlib.contextmanager
def training_backends(device: torch.device) -> Iterator[None]:
    """The backend flags a training run sets on CUDA (cuDNN autotuning, TF32), restored afterwards so
    that a baseline measured later in the same process runs with torch's defaults."""
    if device.type != "cuda":
        yield
        return
    from common.training import configure_cuda_backends
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    configure_cuda_backends()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _Prepared:
    """One variant, built and warmed up (compiled, autotuned), ready to be timed."""

    def __init__(self, make_model, variant: Variant, *, input_size: int, batch_size: int, steps: int,
                 device: torch.device, num_classes: int = 10, seed: int = 0):
        torch.manual_seed(seed)
        memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
        model = make_model().to(device).to(memory_format=memory_format)
        images = torch.randn(batch_size, 3, input_size, input_size, device=device).to(memory_format=memory_format)
        labels = torch.randint(0, num_classes, (batch_size,), device=device)
        self.amp_dtype = amp_dtype_for(device) if variant.autocast else None
        self.ctx = engine.StepContext(device=device, amp_dtype=self.amp_dtype, scaler=torch.amp.GradScaler(
            device.type, enabled=self.amp_dtype == torch.float16))
        from common.training import RunConfig, build_optimizer
        self.optimizer = build_optimizer(RunConfig(learning_rate=1e-4, weight_decay=0.0), model, None, device)
        self.model = torch.compile(model, dynamic=False) if variant.compile else model
        self.loader = _SameBatch(images, labels, steps)
        # Warm-up: compilation, cudnn autotuning, allocator growth; reported apart from steady state.
        start = time.perf_counter()
        self._epoch(_SameBatch(images, labels, 3))
        _sync(device)
        self.warmup_s = time.perf_counter() - start

    def _epoch(self, loader) -> dict:
        return engine.train_one_epoch(self.model, loader, self.optimizer, None, nn.functional.cross_entropy,
                                      self.ctx, epoch=0)

    def time_once(self) -> float:
        return self._epoch(self.loader)["images_per_s"]


def bench_model(name: str, make_model, forward_flops: int, *, input_size: int, batch_size: int, steps: int,
                repeats: int, device: torch.device, variants=VARIANTS) -> dict:
    """All variants of one model: median images/s, ratio to eager, MFU and warm-up time.

    Repeats are interleaved (variant 1, 2, 3, then 1, 2, 3 again ...) so that a change in machine
    load during the run affects every variant alike and the ratios stay fair.
    """
    with training_backends(device):
        return _bench_model(name, make_model, forward_flops, input_size=input_size, batch_size=batch_size,
                            steps=steps, repeats=repeats, device=device, variants=variants)


def _bench_model(name: str, make_model, forward_flops: int, *, input_size: int, batch_size: int, steps: int,
                 repeats: int, device: torch.device, variants) -> dict:
    # The matmul peak of each precision the variants use, under the same backend flags (a bf16 matmul
    # on a CPU without bf16 units is slow to measure and only needed when an autocast variant runs).
    peaks = {fp32_name(device): matmul_flops_per_s(device, torch.float32)}
    if any(v.autocast for v in variants):
        peaks[str(amp_dtype_for(device)).replace("torch.", "")] = matmul_flops_per_s(device, amp_dtype_for(device))
    prepared, results = {}, {}
    for variant in variants:
        try:
            prepared[variant.name] = _Prepared(make_model, variant, input_size=input_size, batch_size=batch_size,
                                               steps=steps, device=device)
        except Exception as error:  # e.g. no compiler toolchain for torch.compile: report, keep going
            results[variant.name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    runs: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats):
        for variant_name, runner in prepared.items():
            runs[variant_name].append(runner.time_once())
    for variant_name, runner in prepared.items():
        rate = statistics.median(runs[variant_name])
        precision = str(runner.amp_dtype).replace("torch.", "") if runner.amp_dtype else fp32_name(device)
        achieved = rate * 3 * forward_flops
        results[variant_name] = {"images_per_s": rate, "runs": runs[variant_name], "warmup_s": runner.warmup_s,
                                 "amp_dtype": precision, "achieved_tflop_s": achieved / 1e12,
                                 "mfu": achieved / peaks[precision]}
    eager = results.get(VARIANTS[0].name, {}).get("images_per_s")
    for result in results.values():
        if eager and "images_per_s" in result:
            result["ratio_to_eager"] = result["images_per_s"] / eager
    return {"model": name, "input_size": input_size, "batch_size": batch_size, "forward_gflops_per_image":
            forward_flops / 1e9, "matmul_tflop_s": {k: v / 1e12 for k, v in peaks.items()}, "variants": results}


# ---------------------------------------------------------------- command-line sections

STEP_QUICK = dict(input_size=32, batch_size=8, steps=2, repeats=1, models="part_a", variants="eager_fp32_nchw,channels_last")
E2E_QUICK = dict(images=40, input_size=32, batch_size=8)


@dataclass
class StepBenchConfig:
    models: str = field(default="part_a,resnet50", metadata={"help": "comma list: part_a (the best configuration), resnet50"})
    input_size: int = field(default=224, metadata={"help": "square input side"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    steps: int = field(default=20, metadata={"help": "steps per timed repeat"})
    repeats: int = field(default=3, metadata={"help": "timed repeats (the median is reported)"})
    variants: str = field(default="all", metadata={"help": "comma list of variants or 'all': " + ", ".join(v.name for v in VARIANTS)})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    quick: bool = field(default=False, metadata={"help": f"a seconds-long smoke run: {STEP_QUICK}"})


@dataclass
class E2EBenchConfig:
    images: int = field(default=500, metadata={"help": "generated 800x600 training JPEGs"})
    input_size: int = field(default=224, metadata={"help": "training resolution"})
    batch_size: int = field(default=32, metadata={"help": "training batch size (both loops)"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers of the plain loop"})
    compile: bool | None = field(default=None, metadata={"help": "compile our loop's model; default: on for CUDA"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    quick: bool = field(default=False, metadata={"help": f"a seconds-long smoke run: {E2E_QUICK}"})


def _model_factory(name: str, input_size: int):
    if name == "part_a":
        from part_a.model import ModelConfig, build_model
        return lambda: build_model(ModelConfig(input_size=input_size))
    if name == "resnet50":
        import torchvision
        return lambda: torchvision.models.resnet50(num_classes=10)
    raise ValueError(f"unknown benchmark model {name!r}; use part_a or resnet50")


def _wanted(config: StepBenchConfig) -> tuple[list[str], list[str]]:
    """The variant and model names the options ask for."""
    variants = config.variants.split(",") if config.variants != "all" else [v.name for v in VARIANTS]
    variants = [v.strip() for v in variants]
    return variants, [m.strip() for m in config.models.split(",") if m.strip()]


def check_step(config: StepBenchConfig) -> StepBenchConfig:
    """The options with --quick applied (it replaces only those left at their defaults), refused before
    anything runs if a variant, model or device is unknown."""
    if config.quick:
        defaults = StepBenchConfig()
        config = StepBenchConfig(**{k: STEP_QUICK[k] if k in STEP_QUICK and v == getattr(defaults, k) else v
                                    for k, v in config.__dict__.items()})
    resolve_device(config.device)
    variants, models = _wanted(config)
    unknown = set(variants) - {v.name for v in VARIANTS}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
    for name in models:
        _model_factory(name, config.input_size)
    return config


def run_step(config: StepBenchConfig) -> dict:
    """Training-step images/s per model and variant, with ratios to eager, MFU and warm-up time."""
    from common.flops import count_module
    device = resolve_device(config.device)
    wanted, models = _wanted(config)
    variants = [v for v in VARIANTS if v.name in wanted]
    results = []
    for name in models:
        make_model = _model_factory(name, config.input_size)
        forward_flops = count_module(make_model(), (3, config.input_size, config.input_size)).flops
        results.append(bench_model(name, make_model, forward_flops, input_size=config.input_size,
                                   batch_size=config.batch_size, steps=config.steps, repeats=config.repeats,
                                   device=device, variants=variants))
    return {"section": "step", "hardware": bench_data.hardware(device), "config": config.__dict__, "models": results}


def _plain_epoch(model: nn.Module, loader, device: torch.device) -> tuple[float, int]:
    """The loop most scripts write: eager fp32, NCHW, a host sync per step for the loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        seen += len(labels)
    _sync(device)
    return time.perf_counter() - start, seen


def check_e2e(config: E2EBenchConfig) -> E2EBenchConfig:
    """The options with --quick applied, refused before any image is written if they cannot run."""
    if config.quick:
        config = E2EBenchConfig(**{**config.__dict__, **E2E_QUICK})
    bench_data.check_images(config.images, config.batch_size)
    resolve_device(config.device)
    return config


def run_e2e(config: E2EBenchConfig) -> dict:
    """One training epoch, data included: our cache + engine versus ImageFolder + a plain loop."""
    from common import training
    from common.data import DeviceLoader, load_cache, prepare
    from part_a.model import MEAN, STD  # the benchmark trains the Part A model, by design
    device = resolve_device(config.device)
    use_compile = device.type == "cuda" if config.compile is None else config.compile
    make_model = _model_factory("part_a", config.input_size)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        bench_data.generate(Path(tmp), config.images)
        with contextlib.redirect_stdout(sys.stderr):
            split_dir = prepare(tmp, val_fraction=bench_data.VAL_FRACTION)
        start = time.perf_counter()
        cached = load_cache(split_dir, "train", config.input_size)
        cache_build_s = time.perf_counter() - start

        # Ours: the project's defaults for this device (channels_last; bf16 and compile on CUDA, with
        # the backend flags training sets); the plain loop then runs with torch's defaults.
        with training_backends(device):
            torch.manual_seed(0)
            model = make_model().to(device).to(memory_format=torch.channels_last)
            amp_dtype = training.resolve_precision("auto", device)
            ctx = engine.StepContext(device=device, amp_dtype=amp_dtype,
                                     scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))
            optimizer = training.build_optimizer(training.RunConfig(learning_rate=1e-4, weight_decay=0.0), model,
                                                 None, device)
            runnable = torch.compile(model, dynamic=False) if use_compile else model
            loader = DeviceLoader(cached.images, cached.labels, config.batch_size, device, train=True, augment=True,
                                  seed=0, mean=MEAN, std=STD)
            epochs = []
            for epoch in range(2):  # the first warms up (and compiles)
                start = time.perf_counter()
                loader.set_epoch(epoch)
                epochs.append(engine.train_one_epoch(runnable, loader, optimizer, None, nn.CrossEntropyLoss(), ctx,
                                                     epoch=epoch))
                epochs[-1]["wall_s"] = time.perf_counter() - start

        torch.manual_seed(0)
        folder = bench_data.imagefolder_loader(split_dir / "train", bench_data.DataBenchConfig(
            size=config.input_size, batch_size=config.batch_size, workers=config.workers), device)
        plain_s, plain_seen = _plain_epoch(make_model().to(device), folder, device)
    ours, plain_rate = epochs[1]["images_per_s"], plain_seen / plain_s
    return {"section": "e2e", "hardware": bench_data.hardware(device), "config": config.__dict__,
            "ours": {"images_per_s": ours, "compile": use_compile, "channels_last": True,
                     "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                     "first_epoch_s_incl_compile": epochs[0]["wall_s"], "cache_build_s": cache_build_s},
            "plain_imagefolder_eager": {"images_per_s": plain_rate, "workers": config.workers},
            "ratio": ours / plain_rate}
