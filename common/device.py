"""The device policy, one place for training, evaluation and the benchmarks: device, autocast precision,
torch.compile, CUDA graphs, backend flags, and how a model is placed and wrapped.

    policy = device.resolve(run_config, kind)     # ValueError for a combination that cannot work
    model = device.place(model, policy)           # flags, device, memory format, SyncBatchNorm
    trained = device.wrap(model, policy, info)    # DDP, then torch.compile

CUDA and the CPU are tested; MPS and XPU follow torch's documented support, untested here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from common.distributed import DistInfo

# CUDA graphs by default, per kind of model: off until a GPU measurement shows a gain (docs/benchmarks.md).
CUDA_GRAPHS = {"part_a": False, "part_b": False}
AVAILABLE = dict(cpu=lambda: True, cuda=lambda: torch.cuda.is_available())
AVAILABLE.update(mps=lambda: torch.backends.mps.is_available(), xpu=lambda: torch.xpu.is_available())


@dataclass(frozen=True)
class Policy:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast type; None: fp32
    compile: bool
    cuda_graphs: bool  # each training and validation step captured once and replayed (engine.Step)
    channels_last: bool = True
    sync_bn: bool = False  # SyncBatchNorm: batch statistics over every rank's batch
    deterministic: bool = False
    notice: str | None = None  # a default or request overridden, said once at the start

    @property
    def fused(self) -> bool:  # one launch for all parameters; GradScaler then leaves overflows to the kernel
        return self.device.type == "cuda"


def resolve(config, kind: str | None = None) -> Policy:
    """The policy of a ``RunConfig`` (``kind``: whose CUDA-graph default applies); ``ValueError`` names an
    option that cannot work here. Under torchrun the run then gives each process its GPU."""
    device = resolve_device(config.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    amp_dtype = resolve_precision(config.precision, device)
    sync_bn = config.sync_bn and world_size > 1 and device.type == "cuda"  # SyncBatchNorm needs GPUs
    compiled, notice = resolve_compile(config.compile, device, sync_bn)
    problem = _cuda_graphs_problem(config, device, amp_dtype, world_size)
    if config.cuda_graphs and problem:
        raise ValueError(f"--cuda_graphs true: {problem}; drop --cuda_graphs")
    graphs = CUDA_GRAPHS.get(kind, False) if config.cuda_graphs is None else config.cuda_graphs
    flags = (config.channels_last, sync_bn, config.deterministic, notice)
    return Policy(device, amp_dtype, compiled, graphs and problem is None, *flags)


def _cuda_graphs_problem(config, device: torch.device, amp_dtype, world_size: int) -> str | None:
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA GPU and the device is {device}"
    if world_size > 1:
        return "not under torchrun: DDP's gradient all-reduce is not captured here"
    if config.optimizer == "nadam" and amp_dtype == torch.float16:
        why = "nadam has no fused kernel, so fp16 loss scaling reads its overflow check on the host per step"
        return f"{why}; use adam, adamw or sgd, or --precision bf16 or fp32"
    return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        accelerator = getattr(torch, "accelerator", None)  # torch 2.6 and newer; before it, CUDA only
        if accelerator is not None and accelerator.is_available():
            return torch.device(accelerator.current_accelerator().type)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in AVAILABLE:
        raise ValueError(f"--device {name}: use auto, cpu, cuda, cuda:N, mps or xpu")
    if not AVAILABLE[device.type]():
        kind, build = device.type.upper(), f"torch {torch.__version__}, CUDA build: {torch.version.cuda}"
        raise ValueError(f"--device {name} asks for {kind}, but {build} sees none here; use --device cpu")
    count = getattr(torch, device.type).device_count() if device.type in ("cuda", "xpu") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: only {count} {device.type.upper()} device(s) are visible")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on MPS, XPU and CUDA from compute capability 8.0, fp16 with loss scaling on older GPUs
    (``torch.cuda.is_bf16_supported()`` says yes to GPUs that only emulate bf16), fp32 on the CPU."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if precision == "auto":
        return torch.bfloat16 if device.type in ("mps", "xpu") else None
    if precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        why = f"{_gpu_name(device)} has no bf16 arithmetic (it needs compute capability 8.0 or newer)"
        raise ValueError(f"--precision bf16: {why}; use --precision auto (fp16 with loss scaling) or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def resolve_compile(requested: bool | None, device: torch.device, sync_bn: bool = False) -> tuple:
    """Whether to ``torch.compile`` (by default on CUDA only), and a notice when the default or the
    request is overridden. Inductor's Triton kernels need compute capability 7.0: on older GPUs (P100,
    K80) the default is eager and ``--compile true`` fails here, before training. SyncBatchNorm breaks
    the graph at every BN layer; on ResNet50 the pieces exceed Dynamo's recompile limit and the rest
    runs eager anyway, so with it training runs eager."""
    use_compile = device.type == "cuda" if requested is None else requested
    if use_compile and device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        if requested:
            why = f"torch.compile needs compute capability 7.0 or newer and {_gpu_name(device)} is older"
            raise ValueError(f"--compile true: {why}; drop --compile")
        return False, f"notice: {_gpu_name(device)} is too old for torch.compile (Triton); it trains eager"
    if use_compile and sync_bn:
        return False, "notice: --sync_bn splits compiled graphs at every batch norm: no torch.compile"
    return use_compile, None


def _gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def place(model: nn.Module, policy: Policy) -> nn.Module:
    """Backend flags set, ``model`` on the device and memory format (SyncBatchNorm if asked).

    TF32 for fp32 matmuls and convolutions on CUDA, and cuDNN autotuning unless ``deterministic``: it
    picks kernels by timing, some add atomically, and two runs then differ in bits training grows."""
    torch.backends.cudnn.benchmark = not policy.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if policy.deterministic:  # cuBLAS reads this when it first makes its workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(policy.deterministic)  # process-wide: a sweep's next trial resets it
    memory_format = torch.channels_last if policy.channels_last else torch.preserve_format
    model.to(policy.device, memory_format=memory_format)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if policy.sync_bn else model


def wrap(model: nn.Module, policy: Policy, info: DistInfo) -> nn.Module:
    """DDP (under torchrun), then torch.compile, around the raw ``model``."""
    if info.enabled:
        device_ids = [policy.device.index] if policy.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if not policy.compile:
        return model
    # Dynamo's per-function cache (8 entries) would fill with graphs never used again (earlier sweep
    # trials in this process, earlier trainable sets) and training would silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False)
