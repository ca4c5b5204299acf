"""The sweep: sweep.yaml -> Optuna mapping, the local runner, parallel workers, pruning, the report.

Most runner tests drive a fake training program (helpers.FAKE_PROGRAM, written to tmp_path) through
the same code path as part_a/train.py: it has the same three functions and reports val_acc per epoch,
but takes milliseconds. One end-to-end test trains the real CNN on the tiny generated dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shlex
import time
import warnings
from pathlib import Path

import matplotlib
import optuna
import pytest
import yaml
from helpers import fake_sweep, fake_sweep_argv
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from common import sweep
from common.config import to_cli
from common.sweep_report import best_command, spearman, write_report, write_trials_csv
from common.sweep_space import (
    SweepConfigError,
    load_sweep,
    make_pruner,
    make_sampler,
    parse_parameter,
    suggest,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_fake(tmp_path, spec, study, count, workers=1, enqueue=(), seed=None):
    storage = f"sqlite:///{tmp_path / f'{study}.db'}"
    if enqueue:
        created = optuna.create_study(study_name=study, storage=storage, direction="maximize")
        for params in enqueue:
            created.enqueue_trial(params)
    runs = sweep.Sweep(spec, study, storage, spec.fixed, str(tmp_path / "runs"), seed)
    return sweep.run_sweep(runs, count, workers)


# --- sweep.yaml -> Optuna -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"values": [16, 32, 64]}, CategoricalDistribution([16, 32, 64])),
        ({"values": [True, False]}, CategoricalDistribution([True, False])),
        ({"values": [[3, 5, 5], [3, 3, 3]]}, CategoricalDistribution(["3,5,5", "3,3,3"])),
        ({"distribution": "uniform", "min": 0.1, "max": 0.6}, FloatDistribution(0.1, 0.6)),
        (
            {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
            FloatDistribution(1e-4, 1e-2, log=True),
        ),
        ({"distribution": "int_uniform", "min": 2, "max": 9}, IntDistribution(2, 9)),
        (
            {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
            FloatDistribution(0.0, 1.0, step=0.25),
        ),
        ({"distribution": "q_uniform", "min": 16, "max": 128, "q": 16}, IntDistribution(16, 128, step=16)),
        ({"min": 1, "max": 5}, IntDistribution(1, 5)),  # inferred as wandb does: both ints -> int_uniform
        ({"min": 1, "max": 5.0}, FloatDistribution(1.0, 5.0)),
    ],
)
def test_distribution_maps_and_samples_stay_in_range(spec, expected):
    dist = parse_parameter("p", spec)
    assert dist == expected
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = []
    for _ in range(300):
        trial = study.ask()
        samples.append(suggest(trial, {"p": dist})["p"])
        study.tell(trial, 0.0)
    if isinstance(dist, CategoricalDistribution):
        assert set(samples) == set(dist.choices)  # every value proposed, nothing else
        return
    assert all(dist.low <= s <= dist.high for s in samples)
    if isinstance(dist, IntDistribution):
        assert all(isinstance(s, int) and (s - dist.low) % dist.step == 0 for s in samples)
    if dist.step is not None:
        assert all(math.isclose(round((s - dist.low) / dist.step) * dist.step + dist.low, s) for s in samples)
    if dist.log:  # log-uniform: half the samples below the geometric middle (uniform would give 9%)
        assert 0.35 < sum(s < 1e-3 for s in samples) / len(samples) < 0.65


def test_fixed_value_is_not_searched(tmp_path):
    spec = fake_sweep(
        tmp_path,
        {
            "quality": {"value": 0.7},
            "epochs": {"distribution": "constant", "value": 2},
            "crash": {"values": ["no"]},
        },
    )
    assert spec.fixed == {"quality": 0.7, "epochs": 2}
    assert list(spec.search_space) == ["crash"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"distribution": "log_uniform", "min": -9.21, "max": -4.61}, "log_uniform_values with min: 0.0001"),
        (
            {"distribution": "normal", "mu": 0, "sigma": 1},
            "cannot be mapped to Optuna; use one of uniform, int_",
        ),
        (
            {"distribution": "q_log_uniform_values", "min": 1, "max": 64, "q": 1},
            "q_uniform, log_uniform_values",
        ),
        ({"distribution": "q_uniform", "min": 0, "max": 10, "q": 3}, "multiple of q"),
        (
            {"distribution": "q_uniform", "min": 0, "max": 10, "q": 0},
            "`step > 0` must hold",
        ),  # Optuna's check
        ({"distribution": "int_uniform", "min": 0.5, "max": 10}, "int_uniform needs integer min and max"),
        ({"distribution": "uniform", "min": "1e-4", "max": 0.1}, "write 1.0e-4"),
        ({"distribution": "uniform", "min": 1.0, "max": 0.1}, "`low <= high` must hold"),
        ({"distribution": "log_uniform_values", "min": 0.0, "max": 0.1}, "`low > 0` must hold"),
        ({"distribution": "uniform", "max": 0.1}, "needs min and max"),
        ({"distribution": "cauchy", "min": 0, "max": 1}, "distribution cauchy cannot be mapped"),
        ({"values": [1, 2], "probabilities": [0.5, 0.5]}, "probabilities"),
        ({"values": []}, "non-empty list"),
    ],
)
def test_unmappable_parameter_errors_name_the_fix(spec, message):
    with pytest.raises(SweepConfigError, match="parameter 'p'") as raised:
        parse_parameter("p", spec)
    assert message in str(raised.value)


def test_methods_goal_and_hyperband_map(tmp_path):
    spec = fake_sweep(
        tmp_path,
        {"quality": {"values": [0.1, 0.9]}},
        method="grid",
        early_terminate={"type": "hyperband", "min_iter": 3, "eta": 2},
    )
    assert isinstance(make_sampler(spec), optuna.samplers.GridSampler)
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._reduction_factor) == (3, 2)
    assert spec.goal == "maximize"
    assert isinstance(
        make_sampler(fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}})),
        optuna.samplers.RandomSampler,
    )
    with pytest.raises(SweepConfigError, match="grid search needs values"):
        fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}}, method="grid")
    with pytest.raises(SweepConfigError, match="early_terminate"):
        fake_sweep(tmp_path, {"quality": {"values": [1.0]}}, early_terminate={"type": "envelope"})


# --- the project's sweep.yaml against part_a/train.py ---------------------------------------------


def test_sweep_yaml_is_a_valid_wandb_sweep_for_part_a_train():
    raw = yaml.safe_load(open("sweep.yaml"))
    assert raw["program"] == "part_a/train.py" and raw["method"] == "bayes"
    assert raw["metric"] == {"name": "val_acc", "goal": "maximize"}
    assert raw["early_terminate"]["type"] == "hyperband" and raw["early_terminate"]["min_iter"] >= 1
    assert raw["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    expected = {
        "n_filters",
        "activation",
        "filter_strategy",
        "augment",
        "batch_norm",
        "conv_bias",
        "dropout",
        "learning_rate",
        "weight_decay",
        "epochs",
        "kernel_size",
        "padding",
        "dense_neurons",
        "batch_size",
        "optimizer",
    }
    spec = load_sweep("sweep.yaml")
    assert expected <= set(spec.search_space)
    assert spec.search_space["learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert spec.search_space["weight_decay"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert spec.search_space["dropout"] == FloatDistribution(0.1, 0.6)


def test_every_sweep_value_parses_as_a_train_option():
    from part_a import train

    spec = load_sweep("sweep.yaml")
    sweep.check_program_accepts(sweep.load_program(spec.program), spec, spec.fixed)
    # Each parameter alone: an option of the script that keeps the proposed value.
    for name, dist in {**spec.fixed, **spec.search_space}.items():
        for value in getattr(dist, "choices", (dist.low, dist.high) if hasattr(dist, "low") else (dist,)):
            model_config, run_config = train.config_from_args(to_cli({name: value}))
            parsed = {**dataclasses.asdict(model_config), **dataclasses.asdict(run_config)}
            assert parsed[name] == value, (name, value)
    # Every combination of the structural choices builds at the default input size.
    structure = ["n_filters", "filter_strategy", "kernel_size", "padding"]
    for combo in itertools.product(*(spec.search_space[name].choices for name in structure)):
        train.config_from_args(to_cli(dict(zip(structure, combo, strict=True))))


def test_a_parameter_the_program_lacks_fails_before_any_trial(tmp_path):
    spec = fake_sweep(tmp_path, {"quality": {"values": [0.5]}, "momentum": {"values": [0.9]}})
    with pytest.raises(SweepConfigError, match="momentum=0.9 is not accepted"):
        sweep.check_program_accepts(sweep.load_program(spec.program), spec, spec.fixed)
    spec = fake_sweep(tmp_path, {"crash": {"values": ["no", "maybe"]}})
    with pytest.raises(SweepConfigError, match="crash='maybe'.*invalid choice"):
        sweep.check_program_accepts(sweep.load_program(spec.program), spec, spec.fixed)


# --- the runner -----------------------------------------------------------------------------------


def test_crashing_trial_is_recorded_failed_and_the_sweep_goes_on(tmp_path):
    spec = fake_sweep(
        tmp_path,
        {"quality": {"min": 0.0, "max": 1.0}, "crash": {"values": ["no", "yes"]}, "epochs": {"value": 2}},
    )
    study, interrupted = run_fake(
        tmp_path,
        spec,
        "crashy",
        count=3,
        enqueue=[
            {"quality": 0.3, "crash": "no"},
            {"quality": 0.9, "crash": "yes"},
            {"quality": 0.6, "crash": "no"},
        ],
    )
    assert not interrupted
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert study.best_trial.number == 2 and study.best_value == pytest.approx(0.6)
    assert all((tmp_path / "runs" / "crashy" / f"trial_{n}").is_dir() for n in range(3))

    rows = list(csv.DictReader(open(write_trials_csv(study, tmp_path / "crashy.csv"))))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert rows[1]["error"].startswith("RuntimeError") and rows[0]["val_acc"] == "0.3"
    assert rows[0]["epochs"] == "2" and rows[2]["crash"] == "no"  # fixed and searched parameters
    command = best_command(study)
    assert shlex.split(command)[:2] == ["python", spec.program]
    assert sorted(shlex.split(command)[2:]) == [
        "--crash=no",
        "--epochs=2",
        "--name=crashy_best",
        "--quality=0.6",
    ]


def test_an_interrupted_grid_point_runs_again_when_the_study_continues(tmp_path, monkeypatch):
    spec = fake_sweep(
        tmp_path, {"quality": {"values": [0.2, 0.5, 0.8]}, "epochs": {"value": 1}}, method="grid"
    )
    program = sweep.load_program(spec.program)
    finish = program.run

    def ctrl_c_at_half(config, epoch_callback=None):
        if config.quality == 0.5:
            raise KeyboardInterrupt
        return finish(config, epoch_callback)

    monkeypatch.setattr(program, "run", ctrl_c_at_half)
    study, interrupted = run_fake(tmp_path, spec, "grid", count=3, seed=3)
    assert interrupted and [t.user_attrs["error"] for t in study.trials if t.state == TrialState.FAIL] == [
        sweep.INTERRUPTED
    ]
    monkeypatch.setattr(program, "run", finish)
    study, interrupted = run_fake(tmp_path, spec, "grid", count=3, seed=3)
    complete = [t.params["quality"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert not interrupted and sorted(complete) == [0.2, 0.5, 0.8]  # the grid point was not lost
    [retry] = [t for t in study.trials if t.system_attrs.get("failed_trial") is not None]
    assert retry.params["quality"] == 0.5 and retry.state == TrialState.COMPLETE
    assert not retry.user_attrs["error"]  # not the error of the trial it retried
    study, _ = run_fake(tmp_path, spec, "grid", count=3, seed=3)  # the grid is done: nothing more runs
    assert len(study.trials) == len(complete) + 1


def test_every_queued_retry_runs_although_each_grid_point_has_finished(tmp_path):
    # Optuna's GridSampler stops the study once every point has finished, failed ones included; retries
    # queued for failed points (as the study queues them) must all run, not just the first.
    grid = {"quality": {"values": [0.2, 0.5, 0.8]}, "epochs": {"value": 1}}
    crashing = fake_sweep(tmp_path, {**grid, "crash": {"value": "yes"}}, method="grid")
    study, _ = run_fake(tmp_path, crashing, "redo", count=3)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    for trial in study.trials:
        study.enqueue_trial(trial.params)
    study, _ = run_fake(tmp_path, fake_sweep(tmp_path, grid, method="grid"), "redo", count=3)
    complete = [t.params["quality"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == [0.2, 0.5, 0.8] and len(study.trials) == 6


def test_a_seeded_sweep_proposes_the_same_trials_and_a_continued_one_new_ones(tmp_path):
    spec = fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}, "epochs": {"value": 1}})

    def proposals(study, count):
        return [t.params["quality"] for t in run_fake(tmp_path, spec, study, count=count, seed=7)[0].trials]

    first = proposals("a", 2)
    assert proposals("b", 2) == first  # another study, the same seed and history
    continued = proposals("a", 2)
    assert continued[:2] == first and len(set(continued[2:]) - set(first)) == 2  # not the first two again


def test_two_workers_finish_exactly_the_requested_trials(tmp_path):
    spec = fake_sweep(
        tmp_path, {"quality": {"min": 0.0, "max": 1.0}, "sleep": {"value": 0.3}, "epochs": {"value": 2}}
    )
    study, _ = run_fake(tmp_path, spec, "shared", count=6, workers=2)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["host"] for t in trials}) == 2  # both workers ran trials
    # Every trial, in either worker process, compiles into (and from) the sweep's own cache folder.
    envs = [json.loads(Path(t.user_attrs["run_dir"], "env.json").read_text()) for t in trials]
    cache = tmp_path / "runs" / "sweeps" / "shared_compile_cache"
    assert {env["TORCHINDUCTOR_CACHE_DIR"] for env in envs} == {str(cache)}
    study, _ = run_fake(tmp_path, spec, "shared", count=2)  # the same command again continues
    assert sorted(t.number for t in study.get_trials()) == list(range(8))


def test_a_dead_workers_trial_is_run_again_by_a_sweep_already_running(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_HEARTBEAT", "1")  # stale 3 s after its last heartbeat
    spec = fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}, "epochs": {"value": 1}})
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'dead.db'}")
    study = optuna.create_study(study_name="dead", storage=storage, direction="maximize")
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's own workers start trials in optimize
        dead = study.ask({"quality": FloatDistribution(0.0, 1.0)})  # a worker killed mid-trial: RUNNING
    storage.record_heartbeat(dead._trial_id)
    time.sleep(4.1)  # SQLite stamps whole seconds: 3.5 s can read as 3, not past the 3 s grace
    study, _ = run_fake(tmp_path, spec, "dead", count=1)  # its one trial finds the dead one first
    assert study.trials[0].state == TrialState.FAIL and sweep.was_interrupted(study.trials[0])
    [retry] = study.trials[1:]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["error"] == ""


def test_a_storage_url_that_does_not_parse_is_one_error_line(tmp_path, prepared_data, capsys):
    fake_sweep(tmp_path, {"quality": {"values": [0.5]}})
    argv = fake_sweep_argv(tmp_path, prepared_data, tmp_path, "--count", "1", "--storage", "not-a-url")
    assert sweep.main(argv) == 1
    assert capsys.readouterr().err == (
        "error: cannot open the study database: Could not parse SQLAlchemy URL from given URL string\n"
    )


def test_the_heartbeat_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SWEEP_HEARTBEAT", "2")
    storage = sweep.open_storage("sqlite://")
    assert (storage.heartbeat_interval, storage.grace_period) == (2, 6)
    for bad in ("0", "1.5", "soon"):
        monkeypatch.setenv("SWEEP_HEARTBEAT", bad)
        message = f"SWEEP_HEARTBEAT must be a whole number of seconds >= 1, got '{bad}'"
        with pytest.raises(ValueError, match=message):
            sweep.open_storage("sqlite://")


def test_hyperband_prunes_a_clearly_bad_trial(tmp_path):
    spec = fake_sweep(
        tmp_path,
        {"quality": {"min": 0.0, "max": 1.0}, "epochs": {"value": 9}},
        early_terminate={"type": "hyperband", "min_iter": 1, "max_iter": 9, "eta": 3},
    )
    good, bad = [0.9, 0.88, 0.92, 0.9], [0.05, 0.04, 0.06]
    study, _ = run_fake(tmp_path, spec, "pruning", count=7, enqueue=[{"quality": q} for q in good + bad])
    assert study.trials[0].state == TrialState.COMPLETE
    stopped_early = [
        t
        for t in study.trials[len(good) :]
        if t.state == TrialState.PRUNED and len(t.intermediate_values) < 9
    ]
    assert stopped_early, [(t.params, t.state, len(t.intermediate_values)) for t in study.trials]


def test_report_on_a_small_study(tmp_path):
    study = optuna.create_study(
        study_name="small", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1)
    )
    study.set_user_attr("metric", "val_acc")
    for _ in range(12):  # val_acc driven by learning_rate; the rest is noise
        trial = study.ask()
        lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("activation", ["relu", "gelu"])
        trial.suggest_int("dense_neurons", 32, 128)
        trial.set_user_attr("fixed", {"epochs": 5})
        study.tell(trial, 0.1 + 0.1 * math.log10(lr / 1e-4))
    pruned = study.ask()
    pruned.report(0.05, 1)
    study.tell(pruned, state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)

    style = dict(matplotlib.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's ExperimentalWarning (and its plots' others) stay inside
        written = write_report(study, tmp_path / "report")
    assert dict(matplotlib.rcParams) == style  # Optuna's plots switch to ggplot; not for later figures
    assert {p.name for p in written} == {"summary.md", "parallel_coordinates.png", "metric_per_trial.png"}
    assert all(p.stat().st_size > 10_000 for p in written if p.suffix == ".png")
    summary = (tmp_path / "report" / "summary.md").read_text()
    ranking = summary.split("## Parameter importance")[1].split("##")[0]
    assert "| 1 | learning_rate |" in ranking
    assert "| learning_rate | +1.00 | 12 |" in summary  # Spearman: monotone in learning_rate
    assert "| activation | " in summary and "## What the top 3 trials share" in summary
    assert "--learning_rate=" in summary and "12 complete, 1 pruned, 1 fail" in summary


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.8))  # ties averaged
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_report_with_too_few_trials_says_so(tmp_path):
    study = optuna.create_study(study_name="tiny", direction="maximize")
    study.optimize(lambda t: t.suggest_float("dropout", 0.1, 0.6), n_trials=2)
    write_report(study, tmp_path)
    assert "only 2 completed trials" in (tmp_path / "summary.md").read_text()


# --- several workers on one GPU: the logic, with CUDA patched (a GPU session measures the throughput) ----

GIB = 1 << 30


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(count, free)``: torch sees ``count`` GPUs of 80 GiB with ``free`` GiB free on each."""
    import torch

    def set_gpus(count, free):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free * GIB, 80 * GIB))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_gpus


def test_workers_beyond_the_gpus_share_them_each_within_a_fraction(gpus, monkeypatch):
    gpus(2, 79)
    assert sweep.gpu_shares(2) == [("0", None), ("1", None)]  # a GPU each: no limit
    shares = sweep.gpu_shares(5)  # GPU 0 runs workers 0, 2 and 4, GPU 1 runs 1 and 3
    assert [gpu for gpu, _ in shares] == ["0", "1", "0", "1", "0"]
    # The free memory split evenly, less a CUDA context (1 GiB) each, as a fraction of the GPU.
    assert shares[0][1] == shares[2][1] == shares[4][1] == pytest.approx((79 / 3 - 1) / 80)
    assert shares[1][1] == shares[3][1] == pytest.approx((79 / 2 - 1) / 80)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the GPUs the user lists, by their names
    assert [gpu for gpu, _ in sweep.gpu_shares(3)] == ["3", "5", "3"]
    gpus(0, 0)
    assert sweep.gpu_shares(3) == [(None, None)] * 3


def test_workers_that_do_not_fit_on_a_gpu_are_one_error_before_any_trial(
    gpus, tmp_path, prepared_data, capsys
):
    gpus(1, 14)  # 3 workers need 3 x (4 GiB for model and activations + 1 GiB of CUDA context)
    fake_sweep(tmp_path, {"quality": {"values": [0.5]}})
    argv = fake_sweep_argv(tmp_path, prepared_data, tmp_path, "--count", "3", "--workers", "3")
    assert sweep.main(argv) == 1
    message = "GPU 0 has 14.0 GiB free and 3 workers need 15 GiB; use fewer --workers"
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "fake_sweep").exists()  # no trial ran
    assert sweep.gpu_shares(2)[0][1] == pytest.approx((14 / 2 - 1) / 80)  # 2 fit


def test_a_worker_trains_on_its_gpu_within_its_share(tmp_path, monkeypatch):
    import torch

    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, _=None: fractions.append(f))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    spec = fake_sweep(tmp_path, {"quality": {"values": [0.5]}, "epochs": {"value": 1}})
    storage = f"sqlite:///{tmp_path / 'w.db'}"
    optuna.create_study(study_name="w", storage=storage, direction="maximize")
    assert sweep._work(sweep.Sweep(spec, "w", storage, spec.fixed, str(tmp_path)), 1, 0, "1", 0.3) is False
    assert json.loads((tmp_path / "w" / "trial_0" / "env.json").read_text())["CUDA_VISIBLE_DEVICES"] == "1"
    assert fractions == [0.3]


def test_the_data_goes_on_the_gpu_only_if_it_fits_in_the_workers_share(monkeypatch):
    import torch

    from common import data

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.25)
    # A quarter of 80 GiB is 20 GiB, the margin a quarter of that: 15 GiB of images fit, 16 do not
    # (the whole GPU would take 59).
    assert data.fits_on_gpu(15 * GIB, torch.device("cuda"))
    assert not data.fits_on_gpu(16 * GIB, torch.device("cuda"))


# --- end to end: the real CNN on the tiny generated dataset ---------------------------------------


@pytest.mark.slow
def test_real_sweep_end_to_end_and_report(prepared_data, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    tiny = [
        "epochs=2",
        "input_size=32",
        "batch_size=8",
        "n_filters=4",
        "dense_neurons=8",
        "kernel_size=3",
        "padding=same",
        "device=cpu",
        "compile=false",
    ]
    code = sweep.main(
        [
            "sweep.yaml",
            "--count",
            "3",
            "--study",
            "e2e",
            "--out_dir",
            str(out_dir),
            "--data_dir",
            str(prepared_data),
            "--set",
            *tiny,
        ]
    )
    assert code == 0
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{out_dir / 'sweeps' / 'e2e.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(0.0 <= t.value <= 1.0 for t in study.trials)
    assert all((out_dir / "e2e" / f"trial_{t.number}" / "summary.json").is_file() for t in study.trials)
    # Every trial read the one decoded cache at 32 px rather than building its own.
    assert len(list((prepared_data / "split" / "cache").glob("train-32-*.npy"))) == 1
    rows = list(csv.DictReader(open(out_dir / "sweeps" / "e2e_trials.csv")))
    assert len(rows) == 3 and rows[0]["input_size"] == "32"

    from part_a import train

    command = capsys.readouterr().out.split("best configuration:\n")[1].splitlines()[0]
    args = shlex.split(command)
    assert args[:2] == ["python", "part_a/train.py"]
    model_config, run_config = train.config_from_args(args[2:])
    assert (run_config.epochs, model_config.input_size, run_config.name) == (2, 32, "e2e_best")
    assert run_config.learning_rate == study.best_params["learning_rate"]

    assert sweep.main(["report", "--study", "e2e", "--out_dir", str(out_dir)]) == 0
    report = out_dir / "sweeps" / "e2e_report"
    assert {p.name for p in report.iterdir()} == {
        "summary.md",
        "parallel_coordinates.png",
        "metric_per_trial.png",
    }


def test_a_sweep_can_search_the_recipe_options(prepared_data, tmp_path):
    recipe = {
        "ema_decay": {"values": [0.5, 0.9]},
        "mixup_alpha": {"distribution": "uniform", "min": 0.1, "max": 0.4},
        "cutmix_alpha": {"values": [0.0, 1.0]},
        "tta": {"values": [True, False]},
    }
    tiny = {
        "epochs": 1,
        "input_size": 32,
        "batch_size": 8,
        "n_filters": 4,
        "dense_neurons": 8,
        "kernel_size": 3,
        "device": "cpu",
        "compile": False,
        "test": True,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "program": "part_a/train.py",
                "method": "random",
                "name": "recipe",
                "metric": {"name": "val_acc", "goal": "maximize"},
                "parameters": {**recipe, **{k: {"value": v} for k, v in tiny.items()}},
            }
        )
    )
    spec = load_sweep(path)
    assert set(recipe) <= set(spec.search_space)
    out_dir = tmp_path / "runs"
    assert (
        sweep.main([str(path), "--count", "1", "--out_dir", str(out_dir), "--data_dir", str(prepared_data)])
        == 0
    )
    study = optuna.load_study(study_name="recipe", storage=f"sqlite:///{out_dir / 'sweeps' / 'recipe.db'}")
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    ran_with = json.loads((out_dir / "recipe" / "trial_0" / "config.json").read_text())
    assert {name: ran_with[name] for name in recipe} == trial.params
    assert (
        json.loads((out_dir / "recipe" / "trial_0" / "summary.json").read_text())["test_tta"]
        == trial.params["tta"]
    )
