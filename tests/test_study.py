"""The whole study (common/study.py) on a 4-class folder of one's own images, run in one module-scoped chain:

1. the evaluation crashes (a simulated bug): the command fails, the finished sweep stays recorded;
2. the same command again: the crashed step is redone, Part B has no weights (an empty hub cache and
   no network) and is reported as skipped, the report is written;
3. with a weights file, every Part B run fails: the command exits 1 naming the first error;
4. the same command again: the failed runs are retried; Ctrl-C in the second one: exit 1;
5. the same command again: Part B continues, the interrupted strategy runs again, the report is complete;
6. once more: every step is reused;
7. (in the last of its tests) with the best run's folder, a figure and a Part B run's folder deleted:
   exactly those are made again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import torchvision
from helpers import class_image
from matplotlib import pyplot as plt
from optuna.trial import TrialState

from common import checkpoint as ckpt_io
from common import data, evaluate, files, flops, study, study_report, sweep, sweep_report
from common.config import UserError, to_cli
from common.sweep_space import load_sweep

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)
OWN_CLASSES = ["ant", "Bee", "cat", "dog fish"]  # 15 images each: 9 train, 3 validation, 3 test


def _trials(runs: Path, prefix: str) -> list:
    db = next((runs / "sweeps").glob(f"{prefix}*.db"))
    return optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}").get_trials()


def _snapshot(runs: Path) -> SimpleNamespace:
    """What a run of the study leaves: its state, results and report, every checkpoint's mtime, and the
    trials of each sweep database."""
    report = runs / "study" / "report.md"
    return SimpleNamespace(
        state=files.read_json(runs / "study" / "state.json"),
        results=files.read_json(runs / "study" / "results.json"),
        report=report.read_text() if report.is_file() else "",
        mtimes={str(p): p.stat().st_mtime_ns for p in sorted(runs.rglob("*.pt"))},
        figures={p.name: p.stat().st_mtime_ns for p in (runs / "study").glob("*.png")},
        trials={db.stem.rsplit("_", 1)[0]: _trials(runs, db.stem) for db in (runs / "sweeps").glob("*.db")},
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for index, name in enumerate(OWN_CLASSES):
        (root / "photos" / name).mkdir(parents=True)
        rng = np.random.default_rng(index)
        for i in range(15):
            class_image(index, rng).save(root / "photos" / name / f"{i}.jpg", quality=90)
    data.prepare(root / "data", source=root / "photos")
    weights = root / "resnet18.pth"  # torchvision's architecture and keys, random values: no download
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    runs = root / "runs"
    argv = ["--data_dir", str(root / "data"), "--out_dir", str(runs), "--quick"]
    with_weights = [*argv, "--part_b_weights", str(weights)]
    out = SimpleNamespace(root=root, runs=runs, weights=weights, argv=argv)
    from part_b import train as part_b_train

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch"))  # an empty hub cache
        for name in (
            "https_proxy",
            "HTTPS_PROXY",
            "http_proxy",
            "HTTP_PROXY",
        ):  # any download is refused at once
            patch.setenv(name, "http://127.0.0.1:9")
        patch.setenv("no_proxy", "")
        patch.setenv("NO_PROXY", "")

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash in the evaluation step")

        with patch.context() as crashing:
            crashing.setattr(evaluate, "evaluate_checkpoint", crash)
            with pytest.raises(RuntimeError, match="simulated crash"):
                study.main(argv)
        out.crashed = _snapshot(runs)
        assert study.main(argv) == 0
        out.without_weights = _snapshot(runs)

        def fail(model_config):
            raise RuntimeError("simulated failure of every Part B run")

        with patch.context() as failing, contextlib.redirect_stderr(io.StringIO()) as stderr:
            failing.setattr(part_b_train, "_build", fail)
            assert study.main(with_weights) == 1
        out.all_failed, out.all_failed_stderr = _snapshot(runs), stderr.getvalue()

        from common import engine

        train_one_epoch, calls = engine.train_one_epoch, []

        def ctrl_c_in_the_second_run(model, *args):  # every Part B epoch (2 per run)
            calls.append(model.config.strategy)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return train_one_epoch(model, *args)

        with patch.context() as interrupting:
            interrupting.setattr(engine, "train_one_epoch", ctrl_c_in_the_second_run)
            assert study.main(with_weights) == 1
        out.interrupted, out.interrupted_strategy = _snapshot(runs), calls[-1]
        assert study.main(with_weights) == 0
        out.finished = _snapshot(runs)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert study.main(with_weights) == 0
        out.again, out.again_printed = _snapshot(runs), printed.getvalue()

    return out


def test_the_report_numbers_are_the_run_folders(chain):
    results, report = chain.finished.results, chain.finished.report
    db = next((chain.runs / "sweeps").glob("part_a_sweep_quick_*.db"))
    best_trial = optuna.load_study(study_name=db.stem, storage=f"sqlite:///{db}").best_trial
    assert results["sweep"]["best"]["params"] == best_trial.params
    assert results["sweep"]["trials"] == {"complete": study.QUICK_COUNT}
    run_dir = Path(results["best_model"]["run_dir"])
    # 4 classes: the trial's own run is the best configuration trained for its full epochs, and tested.
    assert run_dir == Path(best_trial.user_attrs["run_dir"]) and not results["best_model"]["retrained"]
    config = files.read_json(run_dir / "config.json")
    assert all(config[name] == value for name, value in best_trial.params.items())
    assert all(arg in report for arg in to_cli(best_trial.params))  # the command that reproduces it
    assert config["num_classes"] == 4 and config["batch_size"] == 18  # 36 training images: half of them

    summary = files.read_json(run_dir / "summary.json")
    assert results["best_model"]["test_acc"] == summary["test_acc"]
    assert results["best_model"]["per_class"] == summary["test_per_class_acc"]
    assert sorted(summary["test_per_class_acc"]) == sorted(OWN_CLASSES)
    assert f"| test (loss {summary['test_loss']:.4f}) | {summary['test_acc']:.4f} |" in report

    # The data as the split holds it, and the test set as prepare made it: not iNaturalist's.
    classes = ", ".join(results["data"]["classes"])
    assert f"4 classes ({classes}); 36 training, 12 validation and 12 test images" in report
    assert f"Test set: a stratified 20% of each class of `{chain.root / 'photos'}`" in report
    assert "original `val/`" not in report and "10 outputs" not in report

    # Question 1 against PyTorch: FlopCounterMode and the parameters of the tested checkpoint's model.
    model = ckpt_io.build_model_from_checkpoint(ckpt_io.load_checkpoint(run_dir / "best.pt"))
    size = config["input_size"]
    macs = sum(flops.torch_flop_counts(model, (3, size, size)).values()) // flops.FLOPS_PER_MAC
    params = sum(p.numel() for p in model.parameters())
    assert (results["question1"]["macs"], results["question1"]["params"]) == (macs, params)
    assert f"**{macs:,} multiply-accumulates" in report and f"**{params:,} parameters**" in report
    for name in (
        "prediction_grid",
        "confusion_matrix",
        "first_layer_filters",
        "guided_backprop",
        "sweep_metric_per_trial",
    ):
        assert f"({name}.png)" in report and (chain.runs / "study" / f"{name}.png").stat().st_size > 5_000, (
            name
        )
    assert "## Observations" in report


def test_the_part_b_table_is_the_strategies_run_folders(chain):
    part_b = chain.finished.results["part_b"]
    assert list(part_b["rows"]) == ["head", "freeze_k", "full", "gradual", "mlp_head"]
    for strategy, row in part_b["rows"].items():
        run_dir = Path(row["run_dir"])
        summary, config = files.read_json(run_dir / "summary.json"), files.read_json(run_dir / "config.json")
        assert config["strategy"] == strategy and config["weights"] == str(chain.weights)
        assert config["batch_size"] == 18  # the quick study's 64, fitted to 36 training images
        assert (row["test_acc"], row["best_val_acc"], row["epochs"], row["trainable_params"]) == (
            summary["test_acc"],
            summary["best_val_acc"],
            summary["epochs_run"],
            summary["trainable_params"],
        )
        assert f"{row['best_val_acc']:.4f} | {row['test_acc']:.4f} |" in chain.finished.report
    rows = part_b["rows"]
    assert (
        rows["head"]["trainable_params"]
        < rows["freeze_k"]["trainable_params"]
        < rows["full"]["trainable_params"]
    )
    assert rows["gradual"]["trainable_params"] == rows["head"]["trainable_params"]  # epoch 1: the head only
    assert (
        rows["gradual"]["trainable_params_last_epoch"] > rows["gradual"]["trainable_params"]
    )  # epoch 2: + layer4
    assert rows["mlp_head"]["head"] == [512, 512, 256, 4] and rows["full"]["head"] == [512, 4]
    assert (
        "The 1,000-class ImageNet classifier `fc` was replaced by a new, randomly initialised head with "
        "4 outputs" in chain.finished.report
    )


def test_part_b_without_weights_is_reported_and_the_rest_completes(chain):
    state, report = chain.without_weights.state, chain.without_weights.report
    assert state["part_b"]["status"] == "skipped"
    assert all(state[name]["status"] == "done" for name in ("part_a_sweep", "part_a_best"))
    hub_file = chain.root / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "Not run (skipped)" in report and str(hub_file) in report and "--part_b_weights FILE" in report
    assert (
        "| test (loss" in report and "part_b_strategies_quick" not in chain.without_weights.trials
    )  # no trial ran


def test_a_crashed_step_is_redone_and_nothing_finished_is_lost(chain):
    crashed, after = chain.crashed, chain.without_weights
    assert crashed.state["part_a_best"]["status"] == "failed"
    assert crashed.state["part_a_best"]["error"] == "RuntimeError: simulated crash in the evaluation step"
    assert after.state["part_a_best"]["status"] == "done"
    assert after.state["part_a_sweep"] == crashed.state["part_a_sweep"]  # finished before the crash, reused
    assert after.mtimes == crashed.mtimes and len(after.trials["part_a_sweep_quick"]) == study.QUICK_COUNT


def test_a_step_whose_every_run_failed_fails_and_is_retried(chain):
    state, stderr = chain.all_failed.state, chain.all_failed_stderr
    assert state["part_b"]["status"] == "failed"
    assert [t.state for t in chain.all_failed.trials["part_b_strategies_quick"]] == [TrialState.FAIL] * 5
    assert len(stderr.splitlines()) == 1
    assert stderr.startswith("error: no trial of study part_b_strategies_quick_")
    assert "the first error: RuntimeError: simulated failure of every Part B run" in stderr
    assert "Not finished (failed)" in chain.all_failed.report and "| test (loss" in chain.all_failed.report
    # The next run retried each failed strategy (as a new trial) before anything else.
    failed, retried = (
        chain.all_failed.trials["part_b_strategies_quick"],
        chain.finished.trials["part_b_strategies_quick"][5:10],
    )
    assert [t.system_attrs.get("failed_trial") for t in retried] == [0, 1, 2, 3, 4]
    assert [t.params for t in retried] == [t.params for t in failed]


def test_an_interrupted_part_b_continues_and_ends_with_an_uninterrupted_runs_figures(chain, tmp_path):
    interrupted = chain.interrupted.trials["part_b_strategies_quick"][5:]
    assert [t.state for t in interrupted] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.WAITING] * 3
    assert interrupted[1].user_attrs["error"] == sweep.INTERRUPTED
    assert chain.interrupted.state["part_b"]["status"] == "interrupted"
    assert "Not finished (interrupted)" in chain.interrupted.report
    finished = chain.finished.trials["part_b_strategies_quick"]
    assert interrupted[0].datetime_complete == finished[5].datetime_complete  # the finished trial was kept
    assert sum(t.state == TrialState.COMPLETE for t in finished) == 5 and len(finished) == 11
    assert "interrupted" not in chain.finished.report.split("## Part B")[1]  # its retry finished
    # The interrupted strategy, trained again by the study, has the figures of a run never interrupted.
    from part_b import train as part_b_train

    strategy = chain.interrupted_strategy
    argv = to_cli(
        {
            **study.QUICK_PART_B,
            "batch_size": 18,
            "weights": chain.weights,
            "strategy": strategy,
            "test": True,
            "data_dir": chain.root / "data",
            "out_dir": tmp_path,
            "name": "uninterrupted",
        }
    )
    assert part_b_train.main(argv) == 0
    alone = files.read_json(tmp_path / "uninterrupted" / "summary.json")
    row = chain.finished.results["part_b"]["rows"][strategy]
    assert (row["best_val_acc"], row["test_acc"]) == (alone["best_val_acc"], alone["test_acc"])


def test_a_second_run_reuses_every_finished_step(chain):
    finished, again = chain.finished, chain.again
    assert again.state == finished.state  # no step ran: the same finish times and durations
    assert again.mtimes == finished.mtimes and again.figures.keys() >= {
        "prediction_grid.png",
        "guided_backprop.png",
    }
    assert {k: v for k, v in again.figures.items() if not k.startswith("sweep_")} == {
        k: v for k, v in finished.figures.items() if not k.startswith("sweep_")
    }  # evaluation not redone
    assert {name: len(t) for name, t in again.trials.items()} == {
        name: len(t) for name, t in finished.trials.items()
    }
    assert all(f"study: {name}: reused" in chain.again_printed for name in finished.state)
    drop_dates = lambda text: [line for line in text.splitlines() if not line.startswith("Written by")]  # noqa: E731
    assert drop_dates(again.report) == drop_dates(finished.report)


def test_deleted_outputs_are_made_again_and_nothing_else_is_lost(chain):
    """Last of the chain's tests: it deletes the best run's folder, a figure and a Part B run's folder."""
    before = chain.again
    best_dir = Path(before.results["best_model"]["run_dir"])
    lost_strategy, lost_row = next(iter(before.results["part_b"]["rows"].items()))
    shutil.rmtree(best_dir)
    shutil.rmtree(lost_row["run_dir"])
    (chain.runs / "study" / "guided_backprop.png").unlink()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert study.main([*chain.argv, "--part_b_weights", str(chain.weights)]) == 0
    after = _snapshot(chain.runs)
    assert "study: part_a_sweep: reused" in printed.getvalue()
    assert "study: part_a_best ..." in printed.getvalue()
    # The best trial's run folder is gone: the configuration is trained again, to the same result on a CPU.
    best = after.results["best_model"]
    assert best["retrained"] and Path(best["run_dir"]) != best_dir
    assert Path(best["run_dir"], "best.pt").is_file()
    assert (best["val_acc"], best["train_acc"]) == (
        before.results["best_model"]["val_acc"],
        before.results["best_model"]["train_acc"],
    )
    assert (chain.runs / "study" / "guided_backprop.png").is_file()
    assert "(guided_backprop.png)" in after.report
    # The lost strategy ran again, as one more trial, to the same numbers; the other strategies were kept.
    rows, old_rows = after.results["part_b"]["rows"], before.results["part_b"]["rows"]
    assert rows[lost_strategy]["run_dir"] != lost_row["run_dir"]
    assert len(after.trials["part_b_strategies_quick"]) == 12
    assert rows[lost_strategy]["test_acc"] == old_rows[lost_strategy]["test_acc"]
    assert {k: v for k, v in rows.items() if k != lost_strategy} == {
        k: v for k, v in old_rows.items() if k != lost_strategy
    }
    kept = {
        path: mtime
        for path, mtime in before.mtimes.items()
        if not path.startswith((str(best_dir), lost_row["run_dir"]))
    }
    assert {path: after.mtimes[path] for path in kept} == kept


def test_every_input_that_changes_a_result_redoes_its_step_and_no_other(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"first")
    base, dataset = study.StudyConfig(quick=True), study.Dataset("a" * 64, train_images=36)
    steps, ran = study.Steps(tmp_path / "state.json"), []

    def run(config: study.StudyConfig = base, data: study.Dataset = dataset) -> set[str]:
        """The steps that ran, of the two sweeps planned for ``config`` and ``data``."""
        plans = {
            "sweep": study.make_plan(study.PART_A_SWEEP, config, data, config.count or 5),
            "part_b": study.make_plan(study.PART_B_SWEEP, config, data, weights=str(weights)),
        }
        ran.clear()
        for name, plan in plans.items():
            steps.run(
                name, dataclasses.asdict(plan), lambda n=name: ran.append(n) or {"outputs": [str(weights)]}
            )
        return set(ran)

    assert run() == {"sweep", "part_b"} and run() == set()
    both, other_data, bigger_data = (
        {"sweep", "part_b"},
        dataclasses.replace(dataset, fingerprint="b" * 64),
        dataclasses.replace(dataset, train_images=999),
    )
    for config, changed_data, redone in [
        (dataclasses.replace(base, workers=2), dataset, set()),  # no result
        (dataclasses.replace(base, count=6), dataset, {"sweep"}),
        (dataclasses.replace(base, seed=1), dataset, both),
        (base, other_data, both),
        (dataclasses.replace(base, quick=False), bigger_data, both),
    ]:
        assert run(config, changed_data) == redone
        assert run() == redone  # and back
    weights.write_bytes(b"other weights, same file name")
    assert run() == {"part_b"} and run() == set()
    weights.unlink()  # a step's output gone: the step is redone (here both list the same file)
    assert run() == {"sweep", "part_b"}


def test_batch_sizes_fit_the_training_images_or_the_study_refuses():
    tiny = study.Dataset("a" * 64, train_images=10)
    quick = study.make_plan(study.PART_B_SWEEP, study.StudyConfig(quick=True), tiny)
    assert quick.overrides["batch_size"] == 5  # at least two steps per epoch
    with pytest.raises(UserError, match="batch_size 128 is larger than the 10 training images"):
        study.make_plan(study.PART_A_SWEEP, study.StudyConfig(), tiny, 30)


def test_the_report_says_what_the_test_set_is(prepared_data, tmp_path):
    inaturalist = study_report.data_results(prepared_data / "split")
    assert inaturalist["test"] == "the original `val/` of iNaturalist-12K"
    for name in ("ant", "bee"):
        for side, count in (("train", 4), ("test", 1)):
            folder = tmp_path / "own" / side / name
            folder.mkdir(parents=True)
            for i in range(count):
                class_image(len(name), np.random.default_rng(i)).save(folder / f"{i}.png")
    split_dir = data.prepare(tmp_path / "data", source=tmp_path / "own")
    assert study_report.data_results(split_dir)["test"] == f"the test folder given in `{tmp_path / 'own'}`"


def test_the_test_row_shows_the_test_accuracy(tmp_path):
    """A run whose validation and test accuracy differ: each row shows its own."""
    files.write_json(
        tmp_path / "summary.json",
        {
            "best_epoch": 2,
            "epochs_run": 3,
            "best_val_acc": 0.5,
            "test_acc": 0.75,
            "test_loss": 0.625,
            "test_per_class_acc": {"ant": 1.0, "bee": 0.5},
            "device": "cpu",
        },
    )
    files.write_json(tmp_path / "config.json", {"augment": False})
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "train_acc": e / 10}) + "\n" for e in (1, 2, 3))
    )
    best = study_report.best_model_results(
        {"run_dir": str(tmp_path), "trial": 0, "retrained": False, "figures": []}
    )
    data = {
        "split_dir": "split",
        "classes": ["ant", "bee"],
        "images": {"train": 4, "val": 2, "test": 2},
        "test": "a test folder",
        "val": "a stratified 20% of each class of `photos`",
    }
    question1 = {
        "input_size": 8,
        "macs": 1,
        "flops": 2,
        "element_ops": 3,
        "params": 4,
        "model_params": 4,
        "text": "",
    }
    sweep = {
        "study": "s",
        "file": "sweep.yaml",
        "method": "bayes",
        "metric": "val_acc",
        "maximize": True,
        "trials": {"complete": 1},
        "complete": 1,
        "space": {},
        "fixed": {},
        "figures": [],
        "order": [],
        "best": {"trial": 0, "value": 0.5, "params": {}, "command": "", "run_dir": str(tmp_path)},
        "importance": {},
        "importance_method": "too few trials",
        "correlations": {},
        "observations": [],
    }
    lines = study_report.render(
        {
            "written": "now",
            "data": data,
            "question1": question1,
            "sweep": sweep,
            "best_model": best,
            "part_b": {"status": "not run", "reason": ""},
            "steps": {},
        }
    ).splitlines()
    assert "| test (loss 0.6250) | 0.7500 |" in lines
    assert "| validation (best val_acc: epoch 2 of 3) | 0.5000 |" in lines
    assert "| train (epoch 2, on the batches as they trained) | 0.2000 |" in lines  # config.json: no augment


def _small_study(objective) -> optuna.Study:
    small = optuna.create_study(
        study_name="small", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )
    small.set_user_attr("metric", "val_acc")
    small.optimize(lambda t: objective(t.suggest_float("lr", 0.1, 1.0), t.suggest_int("k", 1, 3)), n_trials=6)
    return small


def test_the_importance_figure_has_one_title():
    small = _small_study(lambda lr, k: lr + 0.1 * k)
    importance, method = sweep_report.parameter_importance(small)
    figure = sweep_report.plot_importance(small, method)
    titles = [figure.axes[0].get_title(loc) for loc in ("left", "center", "right")]
    plt.close(figure)
    assert importance and [title for title in titles if title] == [
        f"small:\nparameter importance ({method.split(' (')[0]})"
    ]


def test_a_metric_that_never_varied_ranks_no_parameter():
    small = _small_study(lambda lr, k: 0.25)
    importance, method = sweep_report.parameter_importance(small)
    correlations = sweep_report.correlations(small.trials)
    assert importance == {} and method == "val_acc was 0.25 in every completed trial"
    assert sweep_report.observations(importance, method, correlations, "val_acc") == []


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
