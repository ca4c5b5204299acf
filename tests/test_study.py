"""The whole study (common/study.py) on generated data, run five times in one module-scoped chain:

1. the evaluation step crashes (a simulated bug): the command fails, the finished steps stay recorded;
2. the same command again: the crashed step is redone, Part B has no weights (an empty hub cache and
   no network) and is reported as skipped, the report is written;
3. with a weights file, Ctrl-C in the middle of Part B: the command exits 1;
4. the same command again: Part B continues, the interrupted strategy runs again, the report is complete;
5. once more: every step is reused.
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import torchvision
from optuna.trial import TrialState

from common import checkpoint as ckpt_io
from common import evaluate, files, flops, study, sweep
from common.config import to_cli
from common.sweep_space import load_sweep
from conftest import CLASSES, make_image_tree

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _snapshot(runs: Path) -> SimpleNamespace:
    """What a run of the study leaves: its state, results and report, every checkpoint's mtime, and the
    trials of each sweep database."""
    trials = {db.stem: optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}").get_trials()
              for db in (runs / "sweeps").glob("*.db")}
    report = runs / "study" / "report.md"
    return SimpleNamespace(state=files.read_json(runs / "study" / "state.json"),
                           results=files.read_json(runs / "study" / "results.json"),
                           report=report.read_text() if report.is_file() else "",
                           mtimes={str(p): p.stat().st_mtime_ns for p in sorted(runs.rglob("*.pt"))},
                           figures={p.name: p.stat().st_mtime_ns for p in (runs / "study").glob("*.png")},
                           trials=trials)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_image_tree(root / "data", CLASSES, n_train=10, n_test=3)
    weights = root / "resnet18.pth"  # torchvision's architecture and keys, random values: no download
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    runs = root / "runs"
    argv = ["--data_dir", str(root / "data"), "--out_dir", str(runs), "--quick"]
    with_weights = [*argv, "--part_b_weights", str(weights)]
    out = SimpleNamespace(root=root, runs=runs, weights=weights, argv=argv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        patch.setenv("TORCH_HOME", str(root / "torch"))  # an empty hub cache
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # any download is refused at once
            patch.setenv(name, "http://127.0.0.1:9")
        patch.setenv("no_proxy", "")
        patch.setenv("NO_PROXY", "")

        finish_evaluation = evaluate.evaluate_checkpoint

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash in the evaluation step")

        patch.setattr(evaluate, "evaluate_checkpoint", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            study.main(argv)
        out.crashed = _snapshot(runs)
        patch.setattr(evaluate, "evaluate_checkpoint", finish_evaluation)

        assert study.main(argv) == 0
        out.without_weights = _snapshot(runs)

        from common import engine
        train_one_epoch, calls = engine.train_one_epoch, []

        def ctrl_c_in_the_second_run(model, *args):  # every Part B epoch (2 per run)
            calls.append(model.config.strategy)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return train_one_epoch(model, *args)

        patch.setattr(engine, "train_one_epoch", ctrl_c_in_the_second_run)
        assert study.main(with_weights) == 1
        out.interrupted, out.interrupted_strategy = _snapshot(runs), calls[-1]
        patch.setattr(engine, "train_one_epoch", train_one_epoch)

        assert study.main(with_weights) == 0
        out.finished = _snapshot(runs)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert study.main(with_weights) == 0
        out.again, out.again_printed = _snapshot(runs), printed.getvalue()
    return out


def test_the_report_numbers_are_the_run_folders(chain):
    results, report = chain.finished.results, chain.finished.report
    sweep_db = chain.runs / "sweeps" / "part_a_sweep_quick.db"
    best_trial = optuna.load_study(study_name="part_a_sweep_quick", storage=f"sqlite:///{sweep_db}").best_trial
    assert results["sweep"]["best"]["params"] == best_trial.params
    assert results["sweep"]["trials"] == {"complete": study.QUICK_COUNT}
    run_dir = Path(results["best_model"]["run_dir"])
    assert run_dir == Path(best_trial.user_attrs["run_dir"])  # the trial's own run, tested
    config = files.read_json(run_dir / "config.json")
    assert all(config[name] == value for name, value in best_trial.params.items())
    assert all(arg in report for arg in to_cli(best_trial.params))  # the command that reproduces it

    summary = files.read_json(run_dir / "summary.json")
    assert results["best_model"]["test_acc"] == summary["test_acc"]
    assert results["best_model"]["per_class"] == summary["test_per_class_acc"]
    assert list(summary["test_per_class_acc"]) == CLASSES
    assert f"| test (loss {summary['test_loss']:.4f}) | {summary['test_acc']:.4f} |" in report

    # Question 1 against PyTorch: FlopCounterMode and the parameters of the tested checkpoint's model.
    model = ckpt_io.build_model_from_checkpoint(ckpt_io.load_checkpoint(run_dir / "best.pt"))
    size = config["input_size"]
    macs = sum(flops.torch_flop_counts(model, (3, size, size)).values()) // flops.FLOPS_PER_MAC
    params = sum(p.numel() for p in model.parameters())
    assert (results["question1"]["macs"], results["question1"]["params"]) == (macs, params)
    assert f"**{macs:,} multiply-accumulates" in report and f"**{params:,} parameters**" in report

    for name in ("prediction_grid", "confusion_matrix", "first_layer_filters", "guided_backprop",
                 "sweep_metric_per_trial", "sweep_parallel_coordinates", "sweep_importance", "sweep_correlations"):
        assert f"({name}.png)" in report and (chain.runs / "study" / f"{name}.png").stat().st_size > 5_000, name
    assert "## Observations" in report and "importance" in results["sweep"]["observations"][0]


def test_the_part_b_table_is_the_strategies_run_folders(chain):
    part_b = chain.finished.results["part_b"]
    assert list(part_b["rows"]) == ["head", "freeze_k", "full", "gradual", "mlp_head"]
    for strategy, row in part_b["rows"].items():
        run_dir = Path(row["run_dir"])
        summary, config = files.read_json(run_dir / "summary.json"), files.read_json(run_dir / "config.json")
        assert config["strategy"] == strategy and config["weights"] == str(chain.weights)
        assert (row["test_acc"], row["best_val_acc"], row["epochs"], row["trainable_params"]) == (
            summary["test_acc"], summary["best_val_acc"], summary["epochs_run"], summary["trainable_params"])
        assert f"{row['best_val_acc']:.4f} | {row['test_acc']:.4f} |" in chain.finished.report
    rows = part_b["rows"]
    assert rows["head"]["trainable_params"] < rows["freeze_k"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["gradual"]["trainable_params"] == rows["head"]["trainable_params"]  # epoch 1: the head only
    assert rows["gradual"]["trainable_params_last_epoch"] > rows["gradual"]["trainable_params"]  # epoch 2: + layer4
    assert rows["mlp_head"]["head"] == [512, 512, 256, 10] and rows["full"]["head"] == [512, 10]
    assert "The 1,000-class ImageNet classifier `fc` was replaced" in chain.finished.report


def test_part_b_without_weights_is_reported_and_the_rest_completes(chain):
    state, report = chain.without_weights.state, chain.without_weights.report
    assert state["part_b"]["status"] == "skipped"
    assert all(state[name]["status"] == "done"
               for name in ("prepare", "part_a_sweep", "part_a_best", "part_a_evaluate"))
    hub_file = chain.root / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "Not run (skipped)" in report and str(hub_file) in report and "--part_b_weights FILE" in report
    assert "| test (loss" in report and "part_b_strategies_quick" not in chain.without_weights.trials  # no trial ran


def test_a_crashed_step_is_redone_and_nothing_finished_is_lost(chain):
    crashed, after = chain.crashed, chain.without_weights
    assert crashed.state["part_a_evaluate"]["status"] == "failed"
    assert crashed.state["part_a_evaluate"]["error"] == "RuntimeError: simulated crash in the evaluation step"
    assert after.state["part_a_evaluate"]["status"] == "done"
    for name in ("prepare", "part_a_sweep", "part_a_best"):  # finished before the crash, reused after it
        assert after.state[name] == crashed.state[name]
    assert after.mtimes == crashed.mtimes and len(after.trials["part_a_sweep_quick"]) == study.QUICK_COUNT


def test_an_interrupted_part_b_continues_and_ends_with_an_uninterrupted_runs_figures(chain, tmp_path, monkeypatch):
    interrupted = chain.interrupted.trials["part_b_strategies_quick"]
    assert [t.state for t in interrupted] == [TrialState.COMPLETE, TrialState.FAIL]
    assert interrupted[1].user_attrs["error"] == sweep.INTERRUPTED
    assert chain.interrupted.state["part_b"]["status"] == "failed"
    finished = chain.finished.trials["part_b_strategies_quick"]
    assert interrupted[0].datetime_complete == finished[0].datetime_complete  # the finished trial was kept
    assert sum(t.state == TrialState.COMPLETE for t in finished) == 5 and len(finished) == 6
    # The interrupted strategy, trained again by the study, has the figures of a run never interrupted.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from part_b import train as part_b_train
    strategy = chain.interrupted_strategy
    argv = to_cli({**study.QUICK_PART_B, "weights": chain.weights, "strategy": strategy, "test": True,
                   "data_dir": chain.root / "data", "out_dir": tmp_path, "name": "uninterrupted"})
    assert part_b_train.main(argv) == 0
    alone = files.read_json(tmp_path / "uninterrupted" / "summary.json")
    row = chain.finished.results["part_b"]["rows"][strategy]
    assert (row["best_val_acc"], row["test_acc"]) == (alone["best_val_acc"], alone["test_acc"])


def test_a_second_run_reuses_every_finished_step(chain):
    finished, again = chain.finished, chain.again
    assert again.state == finished.state  # no step ran: the same finish times and durations
    assert again.mtimes == finished.mtimes and again.figures.keys() >= {"prediction_grid.png", "guided_backprop.png"}
    assert {k: v for k, v in again.figures.items() if not k.startswith("sweep_")} == {
        k: v for k, v in finished.figures.items() if not k.startswith("sweep_")}  # evaluation not redone
    assert {name: len(t) for name, t in again.trials.items()} == {name: len(t) for name, t in finished.trials.items()}
    assert all(f"study: {name}: reused" in chain.again_printed for name in finished.state)
    drop_dates = lambda text: [line for line in text.splitlines() if not line.startswith("Written by")]  # noqa: E731
    assert drop_dates(again.report) == drop_dates(finished.report)


def test_the_best_configuration_is_trained_again_when_its_trial_run_is_gone(chain, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = study.config_from_args([*chain.argv[:2], "--out_dir", str(tmp_path), "--quick"])
    plan = study.make_plan(study.PART_A_SWEEP, config, study.QUICK_PART_A, study.QUICK_COUNT)
    db = chain.runs / "sweeps" / "part_a_sweep_quick.db"
    trial = copy.deepcopy(optuna.load_study(study_name=plan.study, storage=f"sqlite:///{db}").best_trial)
    trial_dir = Path(trial.user_attrs["run_dir"])
    trial.user_attrs = {**trial.user_attrs, "run_dir": str(tmp_path / "gone")}
    result = study.best_run(trial, plan, config)
    run_dir = Path(result["run_dir"])
    assert result["retrained"] and run_dir == tmp_path / f"part_a_sweep_quick_best_{trial.number}"
    summary, original = files.read_json(run_dir / "summary.json"), files.read_json(trial_dir / "summary.json")
    assert summary["status"] == "finished" and 0 <= summary["test_acc"] <= 1
    assert summary["best_val_acc"] == original["best_val_acc"]  # same options and seed: the same run on a CPU
    mtime = (run_dir / "best.pt").stat().st_mtime_ns
    assert study.best_run(trial, plan, config)["run_dir"] == str(run_dir)  # finished and tested: not run again
    assert (run_dir / "best.pt").stat().st_mtime_ns == mtime


def test_part_b_sweep_is_a_grid_of_the_strategies_that_part_b_train_accepts():
    from part_b.model import STRATEGIES
    spec = load_sweep("part_b/sweep.yaml")
    assert spec.program == "part_b/train.py" and spec.method == "grid" and spec.metric == "val_acc"
    assert list(spec.search_space) == ["strategy"] and spec.search_space["strategy"].choices == STRATEGIES
    assert spec.fixed["test"] is True and spec.fixed["model"] == "resnet50"
    sweep.check_program_accepts(sweep.load_program(spec.program), spec, spec.fixed)


@pytest.mark.parametrize("argv, fragment", [(["--count", "0"], "--count"), (["--workers", "0"], "--workers")])
def test_bad_options_fail_before_anything_runs(tmp_path, capsys, argv, fragment):
    assert study.main([*argv, "--out_dir", str(tmp_path / "runs")]) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "runs").exists()

