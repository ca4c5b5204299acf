"""Read a wandb sweep file (``sweep.yaml``) and map it onto Optuna.

The same file drives ``wandb sweep`` online and ``common/sweep.py`` offline, so this module accepts
the wandb format as it is and refuses, with the replacement to write, anything Optuna cannot
reproduce faithfully:

    method: bayes | random | grid       -> TPESampler | RandomSampler | GridSampler
    metric: {name, goal}                -> the study direction (wandb's default goal is minimize)
    early_terminate: {type: hyperband}  -> HyperbandPruner (min_iter, max_iter, eta, s)
    values / value                      -> categorical / fixed
    uniform, int_uniform, q_uniform     -> float / int / stepped float (int when all are ints)
    log_uniform_values                  -> log-scaled float
    only min and max                    -> int_uniform when both are ints, else uniform (as wandb)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

METHODS = ("bayes", "random", "grid")
GOALS = ("maximize", "minimize")
RANGES = ("uniform", "int_uniform", "q_uniform", "log_uniform_values")

# What to write instead of each wandb distribution that has no faithful Optuna counterpart.
_LIST = ", or list the candidates under values"
_UNSUPPORTED = {
    "log_uniform": "its min/max are natural-log exponents; write distribution: log_uniform_values "
                   "with min: {exp_min:.6g} and max: {exp_max:.6g} (the values themselves)",
    "q_log_uniform": "write distribution: log_uniform_values with the values themselves as min/max "
                     "(Optuna cannot step a log scale)" + _LIST,
    "q_log_uniform_values": "use log_uniform_values (Optuna cannot step a log scale)" + _LIST,
    "inv_log_uniform": "use log_uniform_values on the inverse quantity" + _LIST,
    "inv_log_uniform_values": "use log_uniform_values on the inverse quantity" + _LIST,
    **{name: f"use {replacement} over the range you care about" + _LIST
       for replacement, names in (("uniform", ("normal", "beta")), ("q_uniform", ("q_normal", "q_beta")),
                                  ("log_uniform_values", ("log_normal", "q_log_normal")))
       for name in names},
}


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
        hint = (" (YAML reads a number like 1e-4 as text; write 1.0e-4 or 0.0001)"
                if isinstance(value, str) and "e" in value.lower() else "")
        raise SweepConfigError(f"parameter {name!r}: {key} must be a number, got {value!r}{hint}")
    return value


def _choice(value: Any) -> Any:
    """Optuna stores only scalars; a list choice (a kernel size per block) travels as '3,5,5,7,7'."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SweepConfigError(f"cannot use {value!r} as a sweep value; use a number, string, boolean or list")


def _distribution_name(name: str, spec: Any) -> str:
    """The spec's distribution, inferred as wandb does when the file names none."""
    if not isinstance(spec, dict):
        raise SweepConfigError(f"parameter {name!r} must be a mapping such as {{values: [...]}} or "
                               f"{{value: ...}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepConfigError(f"parameter {name!r} nests parameters; the local runner needs flat "
                               "parameters named like the program's options")
    if "probabilities" in spec:
        raise SweepConfigError(f"parameter {name!r}: values with probabilities cannot be mapped to "
                               "Optuna; drop probabilities (every value equally likely)")
    if "distribution" in spec:
        return spec["distribution"]
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if both_int else "uniform"
    raise SweepConfigError(f"parameter {name!r} needs value, values, or min and max; got {spec!r}")


def parse_parameter(name: str, spec: Any) -> BaseDistribution | Any:
    """One wandb parameter spec -> an Optuna distribution, or the plain value when it is fixed."""
    distribution = _distribution_name(name, spec)
    problem = f"parameter {name!r}: "
    if distribution == "constant":
        if "value" not in spec:
            raise SweepConfigError(problem + "distribution constant needs a value")
        return _choice(spec["value"])
    if distribution == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepConfigError(problem + f"values must be a non-empty list, got {values!r}")
        return CategoricalDistribution([_choice(v) for v in values])
    if distribution in _UNSUPPORTED:
        hint = _UNSUPPORTED[distribution]
        if distribution == "log_uniform" and "min" in spec and "max" in spec:
            hint = hint.format(exp_min=math.exp(_number(name, "min", spec["min"])),
                               exp_max=math.exp(_number(name, "max", spec["max"])))
        raise SweepConfigError(problem + f"distribution {distribution} cannot be mapped to Optuna; {hint}")
    if distribution not in RANGES:
        raise SweepConfigError(problem + f"unknown distribution {distribution!r}")
    if "min" not in spec or "max" not in spec:
        raise SweepConfigError(problem + f"distribution {distribution} needs min and max")
    low, high = _number(name, "min", spec["min"]), _number(name, "max", spec["max"])
    if low > high:
        raise SweepConfigError(problem + f"min {low} is above max {high}")
    if distribution == "uniform":
        return FloatDistribution(float(low), float(high))
    if distribution == "log_uniform_values":
        if low <= 0:
            raise SweepConfigError(problem + f"log_uniform_values needs min > 0, got {low}")
        return FloatDistribution(float(low), float(high), log=True)
    if distribution == "int_uniform":
        if not all(isinstance(v, int) for v in (low, high)):
            raise SweepConfigError(problem + f"int_uniform needs integer min and max, got {low} and {high}; "
                                   "use uniform for floats")
        return IntDistribution(low, high)
    # q_uniform: wandb rounds to multiples of q; Optuna steps from min, so both agree only when the
    # range is a whole number of steps (otherwise Optuna would silently move max).
    step = _number(name, "q", spec.get("q", 1))
    if step <= 0:
        raise SweepConfigError(problem + f"q must be positive, got {step}")
    steps = (high - low) / step
    if abs(steps - round(steps)) > 1e-9:
        raise SweepConfigError(problem + f"q_uniform needs max - min to be a multiple of q ({high} - {low} is "
                               f"{steps:.4g} steps of {step}); adjust min, max or q")
    if all(isinstance(v, int) for v in (low, high, step)):
        return IntDistribution(low, high, step=step)
    return FloatDistribution(float(low), float(high), step=float(step))


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
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path} must hold a mapping with program, method, metric and parameters")
    for key in ("program", "method", "parameters"):
        if key not in raw:
            raise SweepConfigError(f"{path} has no {key!r} key (wandb requires it)")
    if raw["method"] not in METHODS:
        raise SweepConfigError(f"method {raw['method']!r} is not supported; use one of {', '.join(METHODS)}")
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
    search_space = {name: d for name, d in mapped.items() if isinstance(d, BaseDistribution)}
    not_listed = [n for n, d in search_space.items() if not isinstance(d, CategoricalDistribution)]
    if raw["method"] == "grid" and not_listed:
        raise SweepConfigError(f"grid search needs values (a list) for every parameter; "
                               f"{', '.join(not_listed)} use a range")
    return SweepSpec(program=str(raw["program"]), method=raw["method"], metric=str(metric["name"]), goal=goal,
                     search_space=search_space,
                     fixed={name: v for name, v in mapped.items() if name not in search_space},
                     hyperband=_hyperband(raw.get("early_terminate")), name=raw.get("name"))


def make_sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    if spec.method == "grid":
        return optuna.samplers.GridSampler({name: list(d.choices) for name, d in spec.search_space.items()},
                                           seed=seed)
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


def sample_values(dist: BaseDistribution | Any) -> list[Any]:
    """Representative values to check the program parses: every choice, or a range's two ends."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high] if isinstance(dist, BaseDistribution) else [dist]
