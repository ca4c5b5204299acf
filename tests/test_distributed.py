"""torchrun with two CPU processes (gloo) trains like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_argv

from common.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _train(args: list[str], tmp_path: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, "part_a/train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(prepared_data, tmp_path):
    # No batch norm (per-process statistics on CPU, where SyncBatchNorm does not run) and no
    # dropout (per-process random masks): everything else is deterministic and must agree, the
    # weight average (validated and saved) included.
    common = tiny_argv(prepared_data, tmp_path, batch_norm=False, dropout=0, ema_decay=0.8, eval_batch_size=7)
    _train([*common, "--batch_size=8", "--name=single"], tmp_path, [sys.executable])
    ddp = _train(
        [*common, "--batch_size=4", "--name=ddp"],
        tmp_path,
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )

    single_state, ddp_state = (
        load_checkpoint(tmp_path / "single" / "last.pt"),
        load_checkpoint(tmp_path / "ddp" / "last.pt"),
    )
    for weights in ("model", "ema"):
        for key, value in single_state[weights].items():
            torch.testing.assert_close(
                ddp_state[weights][key], value, rtol=1e-4, atol=1e-5, msg=(weights, key)
            )
    single_metrics, ddp_metrics = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("single", "ddp")
    )
    assert len(ddp_metrics) == 2  # one line per epoch: only rank 0 writes
    for one, two in zip(single_metrics, ddp_metrics, strict=True):
        assert two["val_acc"] == pytest.approx(one["val_acc"])  # every val sample counted once across ranks
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert ddp.stdout.count("epoch   2/2") == 1  # rank 1 prints nothing
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


def _check_finite_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from common import engine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Only rank 1 saw a non-finite loss (at step 6); rank 0 must stop too, with the same step.
        engine._check_finite(torch.tensor(5 if rank == 1 else -1), epoch=3)
        results[rank] = "no error"
    except engine.NonFiniteLossError as error:
        results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_check_finite_on_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    assert results.keys() == {0, 1}
    assert all("epoch 3, step 6" in message for message in results.values()), results
