"""GPU-path decisions that can be checked without a GPU: old-GPU fallbacks, the cache size check,
NCCL setup, per-rank random streams, optimizer flags on resume, one test-precision rule, and
torchrun runs (several ranks, several machines) on the CPU with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import CLASSES, make_image_tree, tiny_argv, tiny_config

from common import checkpoint as ckpt_io
from common import data as data_lib
from common import device as device_lib
from common import distributed, engine, evaluate, training
from common.training import RunConfig
from part_a import train as part_a_train

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def pretend_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch believes one GPU called ``name`` with this compute capability is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.fixture
def old_gpu(monkeypatch):
    pretend_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))


def test_an_old_gpu_trains_eager_by_default_and_refuses_an_explicit_compile(old_gpu):
    use_compile, notice = device_lib.resolve_compile(None, CUDA)
    assert use_compile is False and "P100" in notice and "eager" in notice
    with pytest.raises(ValueError, match="compute capability 7.0"):
        device_lib.resolve_compile(True, CUDA)
    assert device_lib.resolve_compile(False, CUDA) == (False, None)


def test_an_old_gpu_refuses_bf16_and_auto_picks_fp16(old_gpu):
    with pytest.raises(ValueError, match="no bf16"):
        device_lib.resolve_precision("bf16", CUDA)
    assert device_lib.resolve_precision("auto", CUDA) == torch.float16


def test_explicit_compile_on_an_old_gpu_fails_before_any_data_is_read(old_gpu, tmp_path, capsys):
    data_dir = tmp_path / "never_created"
    code = part_a_train.main(
        [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--device=cuda", "--compile=true"]
    )
    assert code == 2 and "compute capability 7.0" in capsys.readouterr().err
    assert not data_dir.exists()


def test_sync_bn_turns_compile_off_with_a_notice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for requested in (None, True):
        use_compile, notice = device_lib.resolve_compile(requested, CUDA, sync_bn=True)
        assert use_compile is False and "--sync_bn" in notice
    assert device_lib.resolve_compile(None, CUDA) == (True, None)


@pytest.fixture
def modern_gpu(monkeypatch):
    pretend_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))


def test_cuda_graphs_on_a_cpu_are_refused_before_any_data_is_read(tmp_path, capsys):
    data_dir = tmp_path / "never_created"
    code = part_a_train.main(
        [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--device=cpu", "--cuda_graphs"]
    )
    assert code == 2 and "--cuda_graphs true: CUDA graphs need a CUDA GPU" in capsys.readouterr().err
    assert not data_dir.exists()


def test_cuda_graphs_are_refused_with_nadam_in_fp16_and_under_torchrun(modern_gpu, monkeypatch):
    def graphs(**options):
        return device_lib.resolve(RunConfig(device="cuda", cuda_graphs=True, **options)).cuda_graphs

    with pytest.raises(ValueError, match="nadam has no fused kernel"):
        graphs(optimizer="nadam", precision="fp16")
    assert graphs(optimizer="nadam") and graphs(precision="fp16")  # nadam in bf16; fp16 with fused adam
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not under torchrun"):
        graphs()


def test_the_cuda_graphs_default_is_per_model_and_never_fails(modern_gpu, monkeypatch):
    def graphs(kind="part_a", **options):
        return device_lib.resolve(RunConfig(**{"device": "cuda", **options}), kind).cuda_graphs

    assert not graphs()  # off until measured
    monkeypatch.setitem(device_lib.CUDA_GRAPHS, "part_a", True)
    assert graphs() and not graphs("part_b")
    # Where they cannot run, the default is off rather than an error.
    assert not graphs(device="cpu") and not graphs(optimizer="nadam", precision="fp16")


def test_cuda_graphs_get_capturable_optimizers_and_cuda_fused_ones(modern_gpu):
    model = torch.nn.Linear(3, 2)
    graphs = device_lib.resolve(RunConfig(device="cuda", cuda_graphs=True))
    for name, flags in (
        ("adam", ("fused", "capturable")),
        ("adamw", ("fused", "capturable")),
        ("sgd", ("fused",)),
        ("nadam", ("capturable",)),
    ):
        group = training.build_optimizer(RunConfig(optimizer=name), model, None, graphs).param_groups[0]
        assert all(group[flag] for flag in flags), (name, group)
    plain = device_lib.resolve(RunConfig(device="cuda"))
    sgd, adam = (
        training.build_optimizer(RunConfig(optimizer=name), model, None, plain).param_groups[0]
        for name in ("sgd", "adam")
    )
    assert sgd["fused"] and adam["fused"] and not adam["capturable"]


@pytest.mark.parametrize("accelerator", ["mps", "xpu"])
def test_device_auto_takes_the_current_accelerator_with_defaults_it_supports(monkeypatch, accelerator):
    """Resolution only: MPS and XPU hardware is untested here."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args: torch.device(accelerator))
    policy = device_lib.resolve(RunConfig())
    assert policy.device == torch.device(accelerator) and policy.amp_dtype == torch.bfloat16
    assert not policy.compile and not policy.cuda_graphs and not policy.fused  # compile only when asked
    assert device_lib.resolve(RunConfig(compile=True, precision="fp32")).compile
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert device_lib.resolve(RunConfig()).device == torch.device("cpu")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("mps", "asks for MPS"),
        ("xpu:1", "asks for XPU"),
        ("gpu", "use auto"),
        ("meta", "use auto"),
        ("cuda:7", "asks for CUDA"),
    ],
)
def test_a_device_torch_cannot_use_here_is_one_clear_error(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        device_lib.resolve_device(name)


def test_the_cache_stays_on_devices_that_share_host_memory_and_xpu_memory_is_checked(monkeypatch):
    assert all(data_lib.fits_on_gpu(1 << 50, torch.device(name)) for name in ("mps", "cpu"))
    gib = 1 << 30
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    monkeypatch.setattr(torch.xpu, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.xpu, "memory_allocated", lambda device=None: 0)
    assert data_lib.fits_on_gpu(6 * gib, torch.device("xpu"))  # 4 GiB margin
    assert not data_lib.fits_on_gpu(7 * gib, torch.device("xpu"))


def test_memory_pytorch_cached_but_does_not_use_counts_as_free(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 41 * gib)  # 40 GiB cached, unused
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    # The margin is 25% of 80 GiB = 20 GiB: 6 + 40 GiB free leaves room for 26 GiB, not for 27.
    assert data_lib.fits_on_gpu(26 * gib, CUDA)
    assert not data_lib.fits_on_gpu(27 * gib, CUDA)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--nproc_per_node 2"):
        distributed.init_distributed("cuda")


def test_nccl_gets_the_device_and_a_timeout_for_compiling_ranks(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    info = distributed.init_distributed("cuda")
    assert (info.rank, info.local_rank, info.world_size) == (1, 1, 2)
    assert calls == [
        {"backend": "nccl", "timeout": timedelta(minutes=30), "device_id": torch.device("cuda", 1)}
    ]


def test_each_rank_draws_its_own_random_numbers_and_rank_0_those_of_one_process():
    def draws(rank):
        training.seed_everything(42)
        training.seed_rank(42, rank)
        return torch.rand(8)

    single = (training.seed_everything(42), torch.rand(8))[1]
    assert torch.equal(draws(0), single)
    assert not torch.equal(draws(1), single) and not torch.equal(draws(1), draws(2))


def test_resumed_optimizer_keeps_the_implementation_flags_built_for_this_device():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    saved = torch.optim.Adam([weight], lr=0.1, foreach=True)  # as built on another device
    weight.grad = torch.ones_like(weight)
    saved.step()
    resumed = torch.optim.Adam([weight], lr=0.1, foreach=False)
    training.load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["foreach"] is False
    assert (
        resumed.param_groups[0]["lr"] == 0.1 and int(resumed.state[weight]["step"]) == 1
    )  # the rest is loaded
    resumed.step()  # and it keeps stepping
    assert int(resumed.state[weight]["step"]) == 2


def test_test_accuracy_is_the_same_from_train_and_from_evaluate(prepared_data, tmp_path):
    config = tiny_config(prepared_data, tmp_path, "bf16", epochs=1, precision="bf16", test=True)
    trained = part_a_train.run(config)
    assert trained["test_precision"] == "fp32"
    evaluated = evaluate.evaluate_checkpoint(
        tmp_path / "bf16" / "best.pt", prepared_data, tmp_path / "figures", batch_size=16, device="cpu"
    )  # the run's eval_batch_size
    assert evaluated["test_loss"] == trained["test_loss"] and evaluated["test_acc"] == trained["test_acc"]
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["test_precision"] == "fp32"


def test_test_evaluation_turns_tf32_off_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return torch.zeros(len(x), 2)

    try:
        engine.evaluate_test(
            Probe(), [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))], torch.device("cpu")
        )
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_deterministic_runs_use_deterministic_kernels_and_the_next_run_goes_back(prepared_data, tmp_path):
    seen = []
    for name, deterministic in (("exact", True), ("fast", False)):
        config = tiny_config(prepared_data, tmp_path, name, epochs=1, deterministic=deterministic)
        part_a_train.run(
            config,
            epoch_callback=lambda epoch, metrics: seen.append(
                (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
            ),
        )
    assert seen == [(True, False), (False, True)]


# ---------------------------------------------------------------- torchrun on the CPU (gloo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(launcher: list[str], script: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, script, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out[-2000:] + err[-4000:]
    return out, err


def _torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@pytest.mark.slow
def test_two_ranks_resume_each_with_its_own_random_stream(prepared_data, tmp_path):
    # Dropout draws from each rank's generator: rank 1 must get its own state back on resume.
    common = tiny_argv(prepared_data, tmp_path, eval_batch_size=7, dropout=0.5, batch_size=4)
    _finish(_launch(_torchrun(), "part_a/train.py", [*common, "--epochs=2", "--name=straight"]))
    _finish(_launch(_torchrun(), "part_a/train.py", [*common, "--epochs=1", "--name=resumed"]))
    _finish(_launch(_torchrun(), "part_a/train.py", [*common, "--epochs=2", "--name=resumed", "--resume"]))

    straight = ckpt_io.load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = ckpt_io.load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    rank0, rank1 = straight["rng"]
    assert not torch.equal(rank0["torch"], rank1["torch"])


@pytest.mark.slow
def test_part_b_under_torchrun_prints_once_and_builds_the_test_cache_once(tmp_path):
    make_image_tree(tmp_path / "data", CLASSES, n_train=6, n_test=2)
    args = tiny_argv(tmp_path / "data", tmp_path / "runs", "b", epochs=1, batch_size=4, test=True, name="ft")
    out, err = _finish(_launch(_torchrun(), "part_b/train.py", args))
    assert out.count("resnet18 | weights none") == 1, out
    assert err.count("cache test 32px: 100%") == 1, err  # rank 0 decoded it, before training
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_samples"] == 2 * len(CLASSES)


@pytest.mark.slow
def test_two_machines_that_share_no_folder_each_prepare_their_own_data(tmp_path):
    port = _free_port()
    nodes = []
    for node in (0, 1):
        make_image_tree(tmp_path / f"node{node}" / "data", CLASSES, n_train=4, n_test=2)
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
        nodes.append(
            _launch(
                launcher,
                "part_a/train.py",
                tiny_argv(
                    tmp_path / f"node{node}" / "data",
                    tmp_path / f"node{node}" / "runs",
                    eval_batch_size=7,
                    epochs=1,
                    batch_size=4,
                    test=True,
                    name="two",
                ),
            )
        )
    for process in nodes:
        _finish(process)
    manifests = [(tmp_path / f"node{n}" / "data" / "split" / "manifest.csv").read_text() for n in (0, 1)]
    assert manifests[0] == manifests[1]  # the same deterministic split on both machines
    summary = json.loads((tmp_path / "node0" / "runs" / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_samples"] == 2 * len(CLASSES)
    assert not (tmp_path / "node1" / "runs").exists()  # only global rank 0 writes the run folder
