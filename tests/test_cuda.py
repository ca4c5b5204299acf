"""The CUDA paths: autocast with and without loss scaling, fused Adam, compiled training, a training
step that never synchronises with the host, CUDA graphs (against eager, with resume, compile and Part B's
gradual unfreezing), the GPU-resident and prefetching loaders, the matmul crop kernel, resume on the GPU,
per-rank CUDA random streams, Part B's gradual unfreezing under compile, the benchmark's GPU busy
share, and NCCL DDP. Run with ``python -m pytest -m cuda``; without a GPU they are skipped (conftest.py)."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSES, RepeatLoader, make_image_tree, tiny_argv, tiny_config
from torch import nn

from common import bench, engine, training
from common import checkpoint as ckpt_io
from common import data as data_lib
from common import device as device_lib
from common.augment import crop_flip, matmul_crops, resize_crops, sample_crops, sample_flips
from part_a import train as part_a_train
from part_a.model import ModelConfig, build_model
from part_b import train as part_b_train

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]
LEVEL = 1 / 255  # one uint8 step of an image, in [0, 1] units


tiny = functools.partial(tiny_config, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_under_autocast_learns_with_fused_adam(dtype):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(input_size=32, n_filters=8, n_blocks=3, kernel_size=3, dense_neurons=32, dropout=0.0)
    ).to(DEVICE, memory_format=torch.channels_last)
    images = torch.randn(16, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16, device=DEVICE) % 10
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ctx = engine.StepContext(device=DEVICE, amp_dtype=dtype, scaler=scaler)
    policy = device_lib.Policy(DEVICE, dtype, compile=False, cuda_graphs=False)
    config = training.RunConfig(learning_rate=3e-3, weight_decay=0.0)
    optimizer = training.build_optimizer(config, model, None, policy)
    assert optimizer.param_groups[0]["fused"] is True
    output_dtypes = []
    model.register_forward_hook(lambda module, inputs, output: output_dtypes.append(output.dtype))
    first = engine.train_one_epoch(
        model, RepeatLoader(images, labels, 1), optimizer, None, nn.CrossEntropyLoss(), ctx, 1
    )
    last = engine.train_one_epoch(
        model, RepeatLoader(images, labels, 150), optimizer, None, nn.CrossEntropyLoss(), ctx, 2
    )
    assert output_dtypes[0] == dtype  # the logits were computed in the autocast type
    assert first["train_loss"] > 1.5 and last["train_loss"] < 0.5 * first["train_loss"]
    if dtype == torch.float16:
        assert scaler.is_enabled() and scaler.get_scale() > 0  # the scaler ran and never hit zero


def test_fused_adam_steps_like_the_reference_implementation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).to(DEVICE)
    reference = copy.deepcopy(model)
    fused = training.build_optimizer(
        training.RunConfig(learning_rate=1e-3, weight_decay=1e-3),
        model,
        None,
        device_lib.Policy(DEVICE, None, compile=False, cuda_graphs=False),
    )
    plain = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=1e-3, foreach=False)
    for _ in range(5):
        x = torch.randn(32, 64, device=DEVICE)
        for net, optimizer in ((model, fused), (reference, plain)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_compiled_training_makes_one_train_and_one_eval_graph(prepared_data, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    frames = []
    summary = part_a_train.run(
        tiny(prepared_data, tmp_path, "compiled", epochs=3, compile=True, eval_batch_size=7),
        epoch_callback=lambda epoch, metrics: frames.append(counters["frames"]["ok"]),
    )
    assert summary["status"] == "finished"
    assert frames[0] > 0 and frames[0] == frames[1] == frames[2], frames
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


class SyncChecked:
    """A loader whose steps run with CUDA's sync debug mode set to error: from its first batch (the
    epoch's plan is copied to the GPU before it) until it is exhausted, i.e. through every step."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        first = next(batches)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield first
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")


SYNC_CASES = [
    pytest.param(
        optimizer,
        precision,
        extras,
        graphs,
        ema,
        id=f"{optimizer}-{precision}-{'clip_mix' if extras else 'plain'}-"
        f"{'graphs' if graphs else 'eager'}-{'ema' if ema else 'no_ema'}",
    )
    for optimizer in training.OPTIMIZERS
    for precision in ("bf16", "fp16", "fp32")
    for extras in (False, True)
    for graphs in (False, True)
    for ema in (False, True)
]


@pytest.mark.parametrize("optimizer, precision, extras, graphs, ema", SYNC_CASES)
def test_twenty_steps_never_synchronise_with_the_host(optimizer, precision, extras, graphs, ema):
    options = dict(grad_clip=1.0, mixup_alpha=0.4, cutmix_alpha=1.0, class_weights=True) if extras else {}
    config = training.RunConfig(
        device="cuda",
        optimizer=optimizer,
        precision=precision,
        cuda_graphs=graphs,
        ema_decay=0.9 if ema else 0.0,
        compile=False,
        lr_schedule="onecycle",
        **options,
    )
    if graphs and optimizer == "nadam" and precision == "fp16":
        with pytest.raises(ValueError, match="nadam has no fused kernel"):
            device_lib.resolve(config)
        return
    policy = device_lib.resolve(config)
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_size=32, n_filters=8, n_blocks=3, kernel_size=3, dense_neurons=32))
    parts = training.build_training(config, policy, model, 25, torch.arange(10), 10)
    images = torch.randint(0, 256, (8 * 20, 32, 32, 3), dtype=torch.uint8)

    def loader(batches: int) -> data_lib.DeviceLoader:
        return data_lib.DeviceLoader(
            images[: 8 * batches],
            torch.arange(8 * batches) % 10,
            8,
            DEVICE,
            train=True,
            augment=True,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
        )

    epoch = functools.partial(
        engine.train_one_epoch,
        parts.model,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        loss_fn=parts.loss_fn,
        ctx=parts.ctx,
        epoch=1,
    )
    epoch(loader(engine.WARMUP_STEPS + 2))  # warm-up and capture: torch.cuda.graph synchronises once
    try:
        if optimizer == "nadam" and precision == "fp16":  # no fused NAdam: GradScaler reads its check
            with pytest.raises(RuntimeError, match="synchroniz"):
                epoch(SyncChecked(loader(20)))
        else:
            assert math.isfinite(epoch(SyncChecked(loader(20)))["train_loss"])
    finally:  # a failed step leaves the loader unfinished, and with it the debug mode set
        torch.cuda.set_sync_debug_mode("default")


def _graph_captures(monkeypatch) -> list:
    captures, capture = [], engine._capture
    monkeypatch.setattr(engine, "_capture", lambda fn: captures.append(fn) or capture(fn))
    return captures


def test_cuda_graph_training_matches_eager_training_and_resumes_bit_for_bit(
    prepared_data, tmp_path, monkeypatch
):
    captures = _graph_captures(monkeypatch)
    options = dict(
        epochs=3,
        dropout=0.0,
        augment=True,
        lr_schedule="cosine",
        deterministic=True,
        precision="fp32",
        eval_batch_size=7,
    )
    eager = part_a_train.run(tiny(prepared_data, tmp_path, "eager", **options))
    graphed = part_a_train.run(tiny(prepared_data, tmp_path, "graphed", cuda_graphs=True, **options))
    assert len(captures) == 2  # one training and one validation step, replayed for three epochs
    part_a_train.run(tiny(prepared_data, tmp_path, "resumed", cuda_graphs=True, **{**options, "epochs": 1}))
    part_a_train.run(tiny(prepared_data, tmp_path, "resumed", cuda_graphs=True, resume=True, **options))
    weights = {
        name: ckpt_io.load_checkpoint(tmp_path / name / "last.pt")["model"]
        for name in ("eager", "graphed", "resumed")
    }
    for key, value in weights["graphed"].items():
        # Close, not equal: the graphs read a float32 learning rate, eager steps a Python float.
        torch.testing.assert_close(weights["eager"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(weights["resumed"][key], value), key
    assert graphed["best_val_acc"] == pytest.approx(eager["best_val_acc"], abs=0.05)


def _gradual_run(tmp_path: Path, **options) -> dict:
    """A tested 3-epoch Part B run on the GPU that unfreezes gradually."""
    make_image_tree(tmp_path / "data", CLASSES, n_train=8, n_test=2)
    where = (tmp_path / "data", tmp_path / "runs", "gradual", "b")
    config = tiny_config(
        *where, strategy="gradual", input_size=64, epochs=3, test=True, device="cuda", **options
    )
    return part_b_train.run(config)


def test_cuda_graphs_capture_each_trainable_set_of_gradual_unfreezing(tmp_path, monkeypatch):
    captures = _graph_captures(monkeypatch)
    summary = _gradual_run(tmp_path, batch_size=4, eval_batch_size=4, cuda_graphs=True)
    assert summary["status"] == "finished" and math.isfinite(summary["test_loss"])
    assert len(captures) == 4  # three trainable sets; one validation step (its model stays the same)


def test_a_compiled_model_trains_inside_cuda_graphs(prepared_data, tmp_path, monkeypatch):
    captures = _graph_captures(monkeypatch)
    summary = part_a_train.run(
        tiny(prepared_data, tmp_path, "both", epochs=2, compile=True, cuda_graphs=True, ema_decay=0.0)
    )
    assert summary["status"] == "finished" and len(captures) == 2


def test_the_step_benchmark_measures_how_busy_the_gpu_is():
    a = torch.randn(2048, 2048, device=DEVICE)
    busy = bench.gpu_busy_share(lambda: [a @ a for _ in range(20)], DEVICE)
    assert 0 < busy <= 1


@pytest.mark.parametrize("resident", [True, False], ids=["gpu_resident", "pinned_prefetch"])
@pytest.mark.parametrize("train, augment", [(True, True), (True, False), (False, False)])
def test_gpu_loaders_give_the_batches_of_the_cpu_loader(resident, train, augment, monkeypatch):
    if not resident:
        monkeypatch.setattr(data_lib, "fits_on_gpu", lambda nbytes, device: False)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 24, 24, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(37) % 10
    options = dict(
        batch_size=8, train=train, augment=augment, seed=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    cpu, gpu = (data_lib.DeviceLoader(images, labels, device=device, **options) for device in ("cpu", "cuda"))
    assert gpu.prefetch is not resident
    cpu.set_epoch(2)
    gpu.set_epoch(2)
    cpu_batches, gpu_batches = list(cpu), list(gpu)
    assert len(cpu_batches) == len(gpu_batches) == len(cpu) > 0
    # The CPU kernel rounds crops to uint8 (<= 1 level), the GPU's matmul kernel does not.
    tolerance = 1.5 * LEVEL / 0.2 if augment else 1e-5
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(cpu_batches, gpu_batches, strict=True):
        assert x_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=tolerance, rtol=0)
        assert torch.equal(y_gpu.cpu(), y_cpu)


def test_matmul_crop_kernel_on_the_gpu_matches_the_cpu_kernels():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 64, 48, 3), dtype=torch.uint8, generator=generator)
    crops, flips = sample_crops(16, 64, 48, generator), sample_flips(16, generator)
    for size in (32, 96):  # down- and upsampling
        cpu_uint8 = resize_crops(images, crops, flips, size)
        cpu_matmul = matmul_crops(images, crops, flips, size)
        with engine.exact_fp32():
            gpu = crop_flip(images.to(DEVICE), crops, flips, size).cpu()
        torch.testing.assert_close(
            gpu, cpu_matmul, atol=0.01, rtol=0
        )  # the same arithmetic (H200: 0.0018 apart)
        assert (gpu - cpu_uint8).abs().max() <= 1.01  # within the uint8 kernel's rounding, in levels of 255


def test_deterministic_resume_on_the_gpu_reaches_the_weights_of_an_uninterrupted_run_bit_for_bit(
    prepared_data, tmp_path
):
    options = dict(epochs=3, dropout=0.3, augment=True, lr_schedule="cosine", deterministic=True)
    part_a_train.run(tiny(prepared_data, tmp_path, "straight", **options))
    part_a_train.run(tiny(prepared_data, tmp_path, "resumed", **{**options, "epochs": 1}))
    part_a_train.run(tiny(prepared_data, tmp_path, "resumed", resume=True, **options))
    straight = ckpt_io.load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    resumed = ckpt_io.load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_a_run_saved_on_the_cpu_resumes_on_the_gpu_with_fused_adam(prepared_data, tmp_path, record_property):
    # fp32 so that the CPU epoch and the GPU epochs compute the same function (up to TF32).
    options = dict(epochs=3, dropout=0.3, augment=True, precision="fp32", lr_schedule="cosine")
    part_a_train.run(tiny(prepared_data, tmp_path, "straight", **options))
    part_a_train.run(tiny(prepared_data, tmp_path, "resumed", **{**options, "epochs": 1}, device="cpu"))
    summary = part_a_train.run(tiny(prepared_data, tmp_path, "resumed", resume=True, **options))
    assert summary["status"] == "finished" and summary["epochs_run"] == 3 and summary["device"] == "cuda"
    straight = ckpt_io.load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = ckpt_io.load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(group["fused"] for group in resumed["optimizer"]["param_groups"])
    worst = max(
        (straight["model"][k].double() - v.double()).abs().max().item()
        for k, v in resumed["model"].items()
        if v.is_floating_point()
    )
    record_property("max_abs_weight_difference_cpu_to_cuda", worst)
    # Close, not equal: one epoch in CPU fp32 and two in TF32 (H200: 0.055 apart, about what two
    # autotuned GPU runs differ by); a resume that lost the weights or the optimizer state is far off.
    assert worst < 0.2


def test_each_rank_has_its_own_cuda_random_stream_and_it_is_saved():
    training.seed_everything(42)
    single = torch.rand(4, device=DEVICE)
    training.seed_everything(42)
    training.seed_rank(42, 1)
    assert not torch.equal(torch.rand(4, device=DEVICE), single)
    state = ckpt_io.rng_state(DEVICE)
    expected = torch.rand(4, device=DEVICE)
    ckpt_io.set_rng_state(state, DEVICE)
    assert torch.equal(torch.rand(4, device=DEVICE), expected)


def test_part_b_gradual_unfreezing_trains_compiled_without_hitting_the_recompile_limit(tmp_path, monkeypatch):
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # raise instead of running eager
        monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    summary = _gradual_run(tmp_path, compile=True)
    assert summary["status"] == "finished" and summary["epochs_run"] == 3 and 0 <= summary["test_acc"] <= 1
    state = ckpt_io.load_checkpoint(tmp_path / "runs" / "gradual" / "last.pt")
    trained = ckpt_io.build_model_from_checkpoint(state)
    trained.set_epoch(3)
    assert trained.frozen_units == len(trained.layout.units) - 2  # two units unfrozen by epoch 3


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_like_one_with_the_global_batch(prepared_data, tmp_path):
    common = tiny_argv(
        prepared_data,
        tmp_path,
        batch_norm=False,
        dropout=0,
        device="cuda",
        precision="fp32",
        eval_batch_size=7,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, args in (
        ([sys.executable], ["--batch_size=8", "--name=single"]),
        (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
            ["--batch_size=4", "--name=ddp"],
        ),
    ):
        result = subprocess.run(
            [*launcher, "part_a/train.py", *common, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single = ckpt_io.load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    ddp = ckpt_io.load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
