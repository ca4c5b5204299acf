"""Read a wandb sweep file (``sweep.yaml``) and map it onto Optuna (the table: docs/sweeps.md).

The same file drives ``wandb sweep`` online and ``common/sweep.py`` offline, so this module accepts
the wandb format as it is (wandb's default goal is minimize) and refuses, with the replacement to
write, anything Optuna cannot reproduce faithfully.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

METHODS = ("bayes", "random", "grid")
GOALS = ("maximize", "minimize")
RANGES = ("uniform", "int_uniform", "q_uniform", "log_uniform_values")


class SweepConfigError(ValueError):
    """The sweep file asks for something the local runner cannot do; the message says what to write."""


@dataclass(frozen=True)
class SweepSpec:
    program: str
    method: str
    metric: str
    goal: str
    search_space: dict[str, BaseDistribution]
    fixed: dict[str, Any]
    hyperband: dict[str, Any] | None = None  # HyperbandPruner's arguments (resources are epochs)
    name: str | None = None


def _number(name: str, key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = isinstance(value, str) and "e" in value.lower()
        hint = " (YAML reads a number like 1e-4 as text; write 1.0e-4 or 0.0001)" if text else ""
        raise SweepConfigError(f"parameter {name!r}: {key} must be a number, got {value!r}{hint}")
    return value


def _choice(value: Any) -> Any:
    """Optuna stores only scalars; a list choice (a kernel size per block) travels as '3,5,5,7,7'."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SweepConfigError(f"cannot use {value!r} as a sweep value; use a number, string, boolean or list")


def parse_parameter(name: str, spec: Any) -> BaseDistribution | Any:
    """One wandb parameter spec -> an Optuna distribution, or the plain value when it is fixed."""
    problem = f"parameter {name!r}: "
    if not isinstance(spec, dict) or "parameters" in spec:
        raise SweepConfigError(problem + f"must be a flat mapping like {{values: [...]}}, got {spec!r}")
    if "probabilities" in spec:
        raise SweepConfigError(problem + "Optuna cannot weigh values; drop probabilities")
    if "distribution" in spec:
        distribution = spec["distribution"]
    elif "value" in spec or "values" in spec:
        distribution = "constant" if "value" in spec else "categorical"
    elif "min" in spec and "max" in spec:  # inferred as wandb does
        distribution = "int_uniform" if all(type(spec[k]) is int for k in ("min", "max")) else "uniform"
    else:
        raise SweepConfigError(problem + f"needs value, values, or min and max; got {spec!r}")
    if distribution == "constant":
        if "value" not in spec:
            raise SweepConfigError(problem + "distribution constant needs a value")
        return _choice(spec["value"])
    if distribution == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepConfigError(problem + f"values must be a non-empty list, got {values!r}")
        return CategoricalDistribution([_choice(v) for v in values])
    if distribution == "log_uniform" and "min" in spec and "max" in spec:  # its min and max are exponents
        low, high = (f"{math.exp(_number(name, key, spec[key])):.6g}" for key in ("min", "max"))
        raise SweepConfigError(problem + f"write log_uniform_values with min: {low} and max: {high}")
    if distribution not in RANGES:  # normal, q_log_uniform, ...: Optuna draws no bell, steps no log scale
        ranges = f"use one of {', '.join(RANGES)} over the range you care about, or list values"
        raise SweepConfigError(problem + f"distribution {distribution} cannot be mapped to Optuna; {ranges}")
    if "min" not in spec or "max" not in spec:
        raise SweepConfigError(problem + f"distribution {distribution} needs min and max")
    low, high = _number(name, "min", spec["min"]), _number(name, "max", spec["max"])
    step = _number(name, "q", spec.get("q", 1)) if distribution == "q_uniform" else None
    # wandb rounds to multiples of q; Optuna steps from min, and would move max if the range is not whole q.
    if (step or 0) > 0 and abs((high - low) / step - round((high - low) / step)) > 1e-9:
        raise SweepConfigError(problem + f"q_uniform needs max - min to be a multiple of q ({step})")
    integers = all(type(v) is int for v in (low, high, 1 if step is None else step))
    if distribution == "int_uniform" and not integers:
        raise SweepConfigError(problem + f"int_uniform needs integer min and max, got {low} and {high}")
    try:  # Optuna checks the rest: min <= max, q > 0, min > 0 on a log scale
        if integers and distribution in ("int_uniform", "q_uniform"):
            return IntDistribution(low, high, step=1 if step is None else step)
        log = distribution == "log_uniform_values"
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    except ValueError as error:
        raise SweepConfigError(problem + str(error)) from None


def _hyperband(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "hyperband":
        raise SweepConfigError(f"early_terminate must be {{type: hyperband, min_iter: N}}; got {spec!r}")
    eta, min_iter, max_iter, brackets = (spec.get(k) for k in ("eta", "min_iter", "max_iter", "s"))
    eta = 3 if eta is None else eta
    for key, value in (("eta", eta), ("min_iter", min_iter), ("max_iter", max_iter), ("s", brackets)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SweepConfigError(f"early_terminate: {key} must be a positive integer, got {value!r}")
    if eta < 2:
        raise SweepConfigError(f"early_terminate: eta must be at least 2, got {eta}")
    if min_iter is None:
        if max_iter is None or brackets is None:
            raise SweepConfigError("early_terminate: hyperband needs min_iter, or max_iter with s")
        min_iter = max(1, round(max_iter / eta**brackets))  # wandb's first stop with max_iter and s
    # max_resource "auto": Optuna takes it from the first trial that finishes.
    return {"min_resource": min_iter, "max_resource": max_iter or "auto", "reduction_factor": eta}


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read ``path`` and map it; ``overrides`` (``--set key=value``) fix parameters, searched or not."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not all(key in raw for key in ("program", "method", "parameters")):
        raise SweepConfigError(f"{path} must hold a mapping with program, method and parameters (as wandb)")
    if (method := raw["method"]) not in METHODS:
        raise SweepConfigError(f"method {method!r} is not supported; use one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    if "name" not in metric:
        raise SweepConfigError(f"{path}: metric needs a name, e.g. metric: {{name: val_acc, goal: maximize}}")
    goal = metric.get("goal", "minimize")
    if goal not in GOALS:
        raise SweepConfigError(f"metric goal {goal!r} must be one of {', '.join(GOALS)}")
    if not isinstance(raw["parameters"], dict) or not raw["parameters"]:
        raise SweepConfigError(f"{path}: parameters must be a non-empty mapping")
    specs = {**raw["parameters"], **{key: {"value": value} for key, value in (overrides or {}).items()}}
    mapped = {name: parse_parameter(name, spec) for name, spec in specs.items()}
    space = {name: d for name, d in mapped.items() if isinstance(d, BaseDistribution)}
    ranges = [n for n, d in space.items() if not isinstance(d, CategoricalDistribution)]
    if method == "grid" and ranges:
        raise SweepConfigError(f"grid search needs values (a list) for every parameter; {ranges} are ranges")
    fixed = {name: v for name, v in mapped.items() if name not in space}
    program, hyperband = str(raw["program"]), _hyperband(raw.get("early_terminate"))
    return SweepSpec(program, method, str(metric["name"]), goal, space, fixed, hyperband, raw.get("name"))


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's, but it stops the study only when no retry is queued: it counts failed points as done."""

    def after_trial(self, study: optuna.Study, trial, state, values) -> None:
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            super().after_trial(study, trial, state, values)


def make_sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    if spec.method == "grid":
        return GridSampler({name: list(dist.choices) for name, dist in spec.search_space.items()}, seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar keeps parallel workers from all proposing the same point while trials run.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(**spec.hyperband) if spec.hyperband else optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Ask ``trial`` for one value of every searched parameter."""
    params = {}
    for name, dist in search_space.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        else:
            suggest_number = trial.suggest_int if isinstance(dist, IntDistribution) else trial.suggest_float
            params[name] = suggest_number(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return params
