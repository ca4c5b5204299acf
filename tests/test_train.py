"""The training engine, checkpoints, resume and the part_a/train.py entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import RepeatLoader, tiny_argv, tiny_config, train_cli

from common import checkpoint as ckpt_io
from common import device as device_lib
from common import engine, training
from common.config import UserError, to_cli
from common.data import DeviceLoader
from common.training import RESUME_MUST_MATCH, RunConfig
from part_a import train as part_a_train
from part_a.model import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
METRIC_NAMES = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_time_s",
    "images_per_s",
}


# ---------------------------------------------------------------- options


def _non_default(value, name):
    if isinstance(value, bool):
        return not value
    if name in ("kernel_size",):
        return [3, 5, 5, 3, 3]
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    choices = {
        "filter_strategy": "double",
        "padding": "valid",
        "activation": "mish",
        "optimizer": "sgd",
        "lr_schedule": "cosine",
        "precision": "fp32",
        "device": "cpu",
        "dense_activation": "relu",
        "wandb_mode": "offline",
        "compile": True,
    }
    return choices.get(name, "x" if value is None else f"{value}_changed")


def test_every_option_round_trips_through_the_command_line():
    parser = part_a_train.get_args_parser()
    fields = [
        f
        for cls in (ModelConfig, RunConfig)
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli") is not False
    ]
    changed = {f.name: _non_default(parser.get_default(f.name), f.name) for f in fields}
    parsed = parser.parse_args(to_cli(changed))
    for name, value in changed.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--batch_norm=True"], True),
        (["--batch_norm=false"], False),
        (["--batch_norm"], True),
        (["--no-batch_norm"], False),
        (["--batch_norm", "0"], False),
        (["--batch_norm=yes"], True),
    ],
)
def test_boolean_spellings(argv, expected):
    assert part_a_train.get_args_parser().parse_args(argv).batch_norm is expected


def test_defaults_are_the_best_sweep_configuration():
    m, r = part_a_train.config_from_args([])
    assert (m.activation, r.learning_rate, r.optimizer, r.epochs, m.n_filters, m.filter_strategy) == (
        "gelu",
        0.00027,
        "adam",
        40,
        64,
        "same",
    )
    assert (
        m.kernel_size,
        m.padding,
        r.batch_size,
        m.batch_norm,
        r.augment,
        m.dropout,
        m.dense_neurons,
        r.weight_decay,
        m.input_size,
    ) == (5, "same", 32, True, True, 0.31396, 128, 0.00133, 224)
    assert "(default: 0.00027)" in " ".join(part_a_train.get_args_parser().format_help().split())


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--activation=swishy"], "unknown activation"),
        (["--optimizer=lbfgs"], "invalid choice"),
        (["--learning_rate=-1"], "learning_rate"),
        (["--ema_decay=1"], "ema_decay must be in [0, 1)"),
        (["--cutmix_alpha=-0.5"], "cutmix_alpha must be >= 0"),
        (["--tta"], "--tta changes only the test: add --test"),
        (["--input_size=16", "--padding=valid"], "shrinks the feature map"),
        (
            ["--device=cuda:7"] if not torch.cuda.is_available() else ["--epochs=0"],
            "cuda" if not torch.cuda.is_available() else "epochs",
        ),
    ],
)
def test_bad_values_fail_before_any_data_is_read(tmp_path, capsys, argv, fragment):
    data_dir = tmp_path / "never_created"
    try:
        code = part_a_train.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}"] + argv)
    except SystemExit as exit_:  # argparse's own errors (bad choices) exit with 2
        code = exit_.code
    assert code == 2
    assert fragment.lower() in capsys.readouterr().err.lower()
    assert not data_dir.exists()


# ---------------------------------------------------------------- engine


def test_overfitting_one_batch_drives_the_loss_near_zero():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(input_size=32, n_filters=8, n_blocks=3, kernel_size=3, dense_neurons=32, dropout=0.0)
    )
    images, labels = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ctx = engine.StepContext(
        device=torch.device("cpu"), amp_dtype=None, scaler=torch.amp.GradScaler("cpu", enabled=False)
    )
    first = engine.train_one_epoch(
        model, RepeatLoader(images, labels, 1), optimizer, None, torch.nn.CrossEntropyLoss(), ctx, epoch=1
    )
    last = engine.train_one_epoch(
        model, RepeatLoader(images, labels, 120), optimizer, None, torch.nn.CrossEntropyLoss(), ctx, epoch=2
    )
    result = engine.evaluate(model, RepeatLoader(images, labels, 1), ctx)
    assert first["train_loss"] > 1.5 and last["train_loss"] < first["train_loss"]
    assert result["val_loss"] < 0.05 and result["val_acc"] == 1.0


def test_evaluate_ignores_padding_labels():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(6, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, -1, -1])
    ctx = engine.StepContext(
        device=torch.device("cpu"), amp_dtype=None, scaler=torch.amp.GradScaler("cpu", enabled=False)
    )
    result = engine.evaluate(model, RepeatLoader(images, labels, 1), ctx, return_predictions=True)
    logits = model(images[:4])
    assert result["val_samples"] == 4
    assert result["val_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels[:4]).item(), rel=1e-6
    )
    assert result["predictions"].shape == (4,)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_lr_schedules_warm_up_then_follow_their_shape(schedule):
    factor = engine.lr_lambda(schedule, total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    if schedule == "constant":
        assert factor(99) == 1.0
    else:
        assert factor(99) < 0.01 and factor(50) < factor(20)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_the_learning_rate_of_every_step_is_the_closed_form_across_epochs(schedule):
    """4 steps per epoch, 3 epochs, warm-up over 1.5 epochs: the rate each optimizer step used."""
    config = RunConfig(
        learning_rate=0.1, lr_schedule=schedule, warmup_epochs=1.5, epochs=3, optimizer="sgd", device="cpu"
    )
    parts = training.build_training(
        config, device_lib.resolve(config), torch.nn.Linear(4, 3), 4, torch.tensor([0, 2]), 3
    )
    used = []
    parts.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(float(opt.param_groups[0]["lr"]))
    )
    images, labels = torch.randn(2, 4), torch.tensor([0, 2])
    for epoch in (1, 2, 3):
        engine.train_one_epoch(
            parts.model,
            RepeatLoader(images, labels, 4),
            parts.optimizer,
            parts.scheduler,
            parts.loss_fn,
            parts.ctx,
            epoch,
        )

    def closed_form(step: int) -> float:  # 6 warm-up steps of 12
        if step < 6:
            return 0.1 * (step + 1) / 6
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 6) / 6))
        return 0.1 * {"constant": 1.0, "cosine": cosine, "onecycle": 1e-3 + (1 - 1e-3) * cosine}[schedule]

    assert used == pytest.approx([closed_form(step) for step in range(12)], rel=1e-12)


# ---------------------------------------------------------------- the step: graph-ready, no host reads

CPU = torch.device("cpu")
SMALL = ModelConfig(input_size=16, n_filters=2, n_blocks=2, kernel_size=3, dense_neurons=8)


@pytest.fixture
def eager_graphs(monkeypatch) -> list:
    """engine.Step's CUDA-graph path on the CPU: warm-up on the current stream, and a "capture" that
    returns the step itself, so every replay runs it eagerly from the captured inputs. Lists the captures."""
    captures = []
    monkeypatch.setattr(engine, "_side_stream", contextlib.nullcontext)
    monkeypatch.setattr(engine, "_capture", lambda fn: captures.append(fn) or fn)
    return captures


def _loaders(steps: int, batch: int = 4):
    """A training loader with augmentation (every batch new) and an evaluation loader with a padded batch."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (steps * batch, 16, 16, 3), dtype=torch.uint8, generator=generator)
    labels = torch.arange(steps * batch) % 10
    options = dict(mean=(0.5,) * 3, std=(0.25,) * 3, seed=1)
    return (
        DeviceLoader(images, labels, batch, CPU, train=True, augment=True, **options),
        DeviceLoader(images[:10], labels[:10], batch, CPU, train=False, **options),
    )


def _tiny_training(graphs: bool, **options) -> training.Training:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(input_size=16, n_filters=4, n_blocks=2, kernel_size=3, dense_neurons=8, dropout=0.3)
    )
    config = RunConfig(learning_rate=3e-3, lr_schedule="cosine", warmup_epochs=0.5, epochs=2, **options)
    policy = device_lib.Policy(CPU, None, compile=False, cuda_graphs=False)  # a float learning rate
    parts = training.build_training(config, policy, model, 6, torch.arange(10), 10)
    return parts._replace(ctx=dataclasses.replace(parts.ctx, cuda_graphs=graphs))


def _train_and_validate(parts: training.Training, epochs: int = 2, new_steps: bool = False) -> list[dict]:
    """Metrics of each epoch; ``new_steps``: each epoch in a context of its own (new steps, new sums)."""
    train_loader, val_loader = _loaders(6)
    results = []
    for epoch in range(1, epochs + 1):
        train_loader.set_epoch(epoch)
        torch.manual_seed(epoch)  # MixUp/CutMix draw from the global generator
        ctx = dataclasses.replace(parts.ctx) if new_steps else parts.ctx
        results.append(
            {
                **engine.train_one_epoch(
                    parts.model, train_loader, parts.optimizer, parts.scheduler, parts.loss_fn, ctx, epoch
                ),
                **engine.evaluate(parts.model, val_loader, ctx),
            }
        )
    return [{k: v for k, v in result.items() if "time" not in k and "per_s" not in k} for result in results]


def test_the_graph_ready_step_run_eagerly_trains_like_the_plain_step_bit_for_bit(eager_graphs):
    options = dict(grad_clip=0.5, mixup_alpha=0.4, cutmix_alpha=1.0)
    plain, graphed = _tiny_training(False, **options), _tiny_training(True, **options)
    assert _train_and_validate(plain, new_steps=True) == _train_and_validate(graphed)
    for name, value in plain.model.state_dict().items():
        assert torch.equal(graphed.model.state_dict()[name], value), name
    # One training and one validation step captured (after their warm-up), then replayed: epoch 2's
    # sums started again from zero and every replay read that step's own batch.
    assert len(eager_graphs) == 2 and graphed.ctx.steps["train"][1].calls == 12 > engine.WARMUP_STEPS


def test_a_new_trainable_set_is_captured_again(eager_graphs):
    parts = _tiny_training(True)
    _train_and_validate(parts, epochs=1)
    first_conv = parts.model.first_conv()
    first_conv.requires_grad_(False)  # as Part B's gradual unfreezing changes what trains
    frozen = first_conv.weight.detach().clone()
    _train_and_validate(parts, epochs=1)
    assert len(eager_graphs) == 3 and torch.equal(first_conv.weight, frozen)


def test_a_step_that_cannot_be_captured_is_one_clear_error(monkeypatch):
    @contextlib.contextmanager
    def capture_fails(graph):
        raise RuntimeError(
            "CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ..."
        )
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", capture_fails)
    with pytest.raises(
        engine.UserError,
        match=r"could not be captured as a CUDA graph \(CUDA error: operation "
        r"not permitted when stream is capturing\); train without",
    ):
        engine._capture(lambda: None)


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor.item, tolist, bool, int and float raise while ``engine.train_step`` runs: on the CPU, a
    stand-in for CUDA's sync debug mode, for the reads Python code makes (GradScaler's, AveragedModel's);
    tests/test_cuda.py checks every synchronisation on a GPU."""
    inside = []
    step = engine.train_step

    def watched(*args):
        inside.append(True)
        try:
            return step(*args)
        finally:
            inside.pop()

    monkeypatch.setattr(engine, "train_step", watched)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):

        def read(self, *args, _original=getattr(torch.Tensor, name), _name=name):  # noqa: B008 (bound now)
            if inside:
                raise HostRead(f"Tensor.{_name} inside the training step")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)


# nadam alone keeps its step count in host memory (torch reads it there: no device sync), which this
# stand-in cannot tell from a device read; its fp16 case shows the sync it has, tests/test_cuda.py the rest.
SYNC_FREE = [*itertools.product(("adam", "adamw", "sgd"), ("fp32", "bf16", "fp16")), ("nadam", "fp16")]


@pytest.mark.parametrize("optimizer, precision", SYNC_FREE)
def test_the_training_step_reads_nothing_back_to_the_host(no_host_reads, monkeypatch, optimizer, precision):
    # The optimizers build_optimizer makes on CUDA (fused where torch has a kernel), built on the CPU.
    monkeypatch.setattr(device_lib.Policy, "fused", property(lambda policy: True))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    policy = device_lib.Policy(CPU, amp_dtype, compile=False, cuda_graphs=False)
    for options in (dict(grad_clip=1.0, mixup_alpha=0.4, class_weights=True), dict(label_smoothing=0.1)):
        torch.manual_seed(0)
        model = build_model(SMALL)
        config = RunConfig(optimizer=optimizer, learning_rate=1e-3, lr_schedule="onecycle", **options)
        parts = training.build_training(config, policy, model, 3, torch.arange(10), 10)
        run = functools.partial(
            engine.train_one_epoch,
            parts.model,
            _loaders(3)[0],
            parts.optimizer,
            parts.scheduler,
            parts.loss_fn,
            parts.ctx,
            1,
        )
        if optimizer == "nadam":  # no fused NAdam: GradScaler reads its overflow check on the host
            with pytest.raises(HostRead, match="item") as read:
                run()
            assert any(entry.path.name == "grad_scaler.py" for entry in read.traceback)
        else:
            assert run()["train_loss"] > 0


def test_the_weight_average_update_reads_nothing_back_to_the_host(no_host_reads, monkeypatch):
    monkeypatch.setattr(device_lib.Policy, "fused", property(lambda policy: True))  # Adam as on CUDA
    torch.manual_seed(0)
    model = build_model(SMALL)
    policy = device_lib.Policy(CPU, None, compile=False, cuda_graphs=False)
    parts = training.build_training(RunConfig(ema_decay=0.9), policy, model, 3, torch.arange(10), 10)
    engine.train_one_epoch(
        parts.model, _loaders(3)[0], parts.optimizer, parts.scheduler, parts.loss_fn, parts.ctx, 1
    )


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_with_cuda_graphs_the_schedule_writes_the_learning_rate_into_one_tensor_that_resume_keeps():
    def build(graphs: bool) -> training.Training:
        torch.manual_seed(0)
        model = build_model(SMALL)
        config = RunConfig(learning_rate=0.01, lr_schedule="cosine", warmup_epochs=1, epochs=3)
        return training.build_training(
            config, device_lib.Policy(CPU, None, False, graphs), model, 4, torch.arange(10), 10
        )

    graphed, plain = build(True), build(False)
    rate = graphed.optimizer.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor) and graphed.optimizer.param_groups[0]["capturable"]
    for _ in range(9):
        graphed.scheduler.step()
        plain.scheduler.step()
        assert graphed.optimizer.param_groups[0]["lr"] is rate  # written in place, where a graph reads it
        assert rate.item() == pytest.approx(plain.optimizer.param_groups[0]["lr"], rel=1e-6)
    resumed, saved_plain = build(True), plain.optimizer.state_dict()
    kept = resumed.optimizer.param_groups[0]["lr"]
    training.load_optimizer_state(resumed.optimizer, graphed.optimizer.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] is kept and kept.item() == rate.item()
    training.load_optimizer_state(resumed.optimizer, saved_plain)  # a run saved without CUDA graphs
    assert resumed.optimizer.param_groups[0]["lr"] is kept
    assert kept.item() == pytest.approx(saved_plain["param_groups"][0]["lr"])
    training.load_optimizer_state(plain.optimizer, graphed.optimizer.state_dict())  # and the other way round
    assert type(plain.optimizer.param_groups[0]["lr"]) is float


# ---------------------------------------------------------------- checkpoints


def _full_disk(monkeypatch, prefix: str, after: int = 0) -> None:
    """Writes of files whose temporary starts with ``prefix`` fail half-way, as on a full disk, after
    ``after`` successful ones."""
    write_bytes, calls = Path.write_bytes, []

    def writing(self, data):
        if self.name.startswith(prefix):
            calls.append(self)
            if len(calls) > after:
                write_bytes(self, bytes(data)[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write names no file
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", writing)


def test_failed_checkpoint_write_keeps_the_previous_one_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint(path, {"kind": "part_a", "epoch": 1, "weights": torch.ones(3)})
    _full_disk(monkeypatch, ".last.pt.")
    with pytest.raises(OSError, match="No space left") as info:
        ckpt_io.save_checkpoint(path, {"kind": "part_a", "epoch": 2, "weights": torch.zeros(3)})
    assert info.value.filename == str(path)
    monkeypatch.undo()
    state = ckpt_io.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_written_atomically_get_the_mode_the_umask_gives_any_file(tmp_path, umask):
    from common import files

    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        files.write_json(tmp_path / "summary.json", {"a": 1})
        ckpt_io.save_checkpoint(tmp_path / "last.pt", {"kind": "part_a"})
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("plain.txt", "summary.json", "last.pt"), 0o666 & ~umask)


@pytest.mark.parametrize(
    "error, line",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/shared/runs/r"),
            "error: /shared/runs/r: Permission denied; check the path and its permissions, "
            "then run the command again",
        ),
        (
            NotADirectoryError(errno.ENOTDIR, "Not a directory", "/home/me/runs/r"),
            "error: /home/me/runs/r: Not a directory; check the path and its permissions, "
            "then run the command again",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "error: No space left on device; free some space, then run the command again",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/mnt/ro/runs"),
            "error: /mnt/ro/runs: Read-only file system; check the path and its permissions, "
            "then run the command again",
        ),
    ],
)
def test_a_file_system_error_is_one_line_naming_the_path_and_the_reason(capsys, error, line):
    from common.config import cli_main

    def work(config):
        raise error

    assert cli_main(lambda argv: None, work, []) == 1
    assert capsys.readouterr().err == line + "\n"


def test_an_error_that_is_not_about_a_file_keeps_its_traceback():
    from common.config import cli_main

    def work(config):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        cli_main(lambda argv: None, work, [])


def test_ctrl_c_is_one_line_saying_how_to_continue(capsys):
    from common.config import cli_main

    def work(config):
        raise KeyboardInterrupt

    assert cli_main(lambda argv: None, work, []) == 130
    assert (
        capsys.readouterr().err
        == "error: interrupted (Ctrl-C); run it again to continue (a run: with --resume)\n"
    )


def test_corrupt_or_foreign_checkpoints_get_errors_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, fragment in [
        (corrupt, "cannot be read"),
        (foreign, "not a checkpoint of this project"),
        (tmp_path / "missing.pt", "does not exist"),
    ]:
        with pytest.raises(ckpt_io.CheckpointError, match=fragment) as info:
            ckpt_io.load_checkpoint(path)
        assert str(path) in str(info.value)


# ---------------------------------------------------------------- whole runs


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("recipe", [{}, dict(ema_decay=0.9, mixup_alpha=0.4, cutmix_alpha=1.0)])
def test_resumed_run_reaches_the_same_weights_bit_for_bit(prepared_data, tmp_path, recipe):
    options = dict(epochs=4, augment=True, dropout=0.3, lr_schedule="cosine", warmup_epochs=1, **recipe)
    part_a_train.run(tiny_config(prepared_data, tmp_path, "straight", **options))

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        part_a_train.run(
            tiny_config(prepared_data, tmp_path, "interrupted", **options), epoch_callback=stop_after_two
        )
    interrupted = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
    assert interrupted["status"] == "stopped" and interrupted["epochs_run"] == 2
    part_a_train.run(tiny_config(prepared_data, tmp_path, "interrupted", resume=True, **options))

    straight, resumed = (
        ckpt_io.load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "interrupted")
    )
    for weights in ("model", "ema") if recipe else ("model",):  # the trained weights and their average
        assert straight[weights].keys() == resumed[weights].keys()
        for key in straight[weights]:
            assert torch.equal(straight[weights][key], resumed[weights][key]), (weights, key)
    metrics = [
        json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]


# The options a resumed run may change: where it runs, how fast, what it records and for how long
# (--epochs extends a run; with a cosine or one-cycle schedule the rate then follows the new length).
RESUME_MAY_CHANGE = {
    "data_dir",
    "out_dir",
    "name",
    "epochs",
    "eval_batch_size",
    "tta",
    "precision",
    "compile",
    "channels_last",
    "device",
    "deterministic",
    "test",
    "resume",
    "wandb_mode",
    "wandb_project",
    "wandb_entity",
    "wandb_group",
    "cuda_graphs",
}


def test_every_run_option_either_must_match_on_resume_or_may_change():
    must_match = set(RESUME_MUST_MATCH)
    assert not must_match & RESUME_MAY_CHANGE
    assert must_match | RESUME_MAY_CHANGE == {f.name for f in dataclasses.fields(RunConfig)}, (
        "a new option: add it to RESUME_MUST_MATCH if it changes the weights' trajectory, "
        "else to RESUME_MAY_CHANGE"
    )


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, prepared_data) -> Path:
    """A data root of its own (a changed split seed re-splits it) holding a 1-epoch run in runs/run."""
    import shutil

    root = tmp_path_factory.mktemp("resumable")
    shutil.copytree(prepared_data, root / "data")
    part_a_train.run(tiny_config(root / "data", root / "runs", "run", epochs=1))
    return root


@pytest.mark.parametrize("option", RESUME_MUST_MATCH)
def test_resume_refuses_each_option_that_must_match_when_it_changed(one_epoch_run, tmp_path, option):
    import shutil

    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    last = tmp_path / "runs" / "run" / "last.pt"
    saved = last.read_bytes()
    original = dataclasses.asdict(tiny_config(tmp_path / "data", tmp_path / "runs", "run")[1])[option]
    changed = {option: _non_default(original, option)}
    # Refused by the resume check, or for the split's options already by the data preparation.
    with pytest.raises((ValueError, UserError), match=option):
        part_a_train.run(
            tiny_config(tmp_path / "data", tmp_path / "runs", "run", epochs=2, resume=True, **changed)
        )
    assert last.read_bytes() == saved


def test_resume_refuses_changed_training_options(prepared_data, tmp_path):
    part_a_train.run(tiny_config(prepared_data, tmp_path, "run", epochs=1))
    with pytest.raises(ValueError, match="learning_rate"):
        part_a_train.run(
            tiny_config(prepared_data, tmp_path, "run", epochs=2, resume=True, learning_rate=0.1)
        )
    with pytest.raises(ValueError, match="already holds a run"):
        part_a_train.run(tiny_config(prepared_data, tmp_path, "run", epochs=2))
    # A last.pt saved before the recipe options existed resumes: it ran with them off.
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    for option in ("mixup_alpha", "cutmix_alpha", "ema_decay", "tta"):
        del state["run_config"][option]
    torch.save(state, last)
    assert (
        part_a_train.run(tiny_config(prepared_data, tmp_path, "run", epochs=2, resume=True))["epochs_run"]
        == 2
    )


def test_a_run_with_ema_validates_keeps_and_tests_the_average_and_tta_mirrors(prepared_data, tmp_path):
    from common.data import load_cache
    from common.evaluate import normalise

    summary = part_a_train.run(
        tiny_config(
            prepared_data,
            tmp_path,
            "ema",
            epochs=1,
            learning_rate=0.01,
            ema_decay=0.5,
            mixup_alpha=0.4,
            test=True,
            tta=True,
        )
    )
    last, best = (ckpt_io.load_checkpoint(tmp_path / "ema" / name) for name in ("last.pt", "best.pt"))
    assert "ema" not in best and last["ema"].keys() == last["model"].keys() == best["model"].keys()
    assert all(
        torch.equal(best["model"][key], last["ema"][key]) for key in last["ema"]
    )  # best.pt: the average
    assert not all(torch.equal(last["model"][key], last["ema"][key]) for key in last["ema"])
    average = ckpt_io.build_model_from_checkpoint(last).eval()  # a last.pt rebuilds with its average

    def loss(split: str, tta: bool) -> float:
        data = load_cache(prepared_data / "split", split, 32)
        images = normalise(data.images, (0.5,) * 3, (0.5,) * 3)
        with torch.no_grad():
            probabilities = average(images).softmax(dim=1)
            if tta:
                probabilities = (probabilities + average(images.flip(3)).softmax(dim=1)) / 2
        return -probabilities[torch.arange(len(data.labels)), data.labels].log().mean().item()

    metrics = json.loads((tmp_path / "ema" / "metrics.jsonl").read_text())
    assert metrics["val_loss"] == pytest.approx(loss("val", tta=False), rel=1e-5)
    assert summary["test_tta"] is True and summary["test_loss"] == pytest.approx(
        loss("test", tta=True), rel=1e-5
    )
    assert json.loads((tmp_path / "ema" / "summary.json").read_text())["test_tta"] is True


def test_resume_with_loss_scaling_after_a_run_saved_without_it(prepared_data, tmp_path):
    # precision auto may give fp16 on another GPU than the one a run started on: the fp32 run's
    # empty scaler state must not stop the resumed run, which starts its scaler afresh.
    part_a_train.run(tiny_config(prepared_data, tmp_path, "run", epochs=1, precision="fp32"))
    summary = part_a_train.run(
        tiny_config(prepared_data, tmp_path, "run", epochs=2, resume=True, precision="fp16")
    )
    assert summary["status"] == "finished" and summary["epochs_run"] == 2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["scaler"]["scale"] > 0  # the fp16 scaler ran and was saved


def test_test_results_are_dropped_once_a_resumed_run_writes_a_newer_best_checkpoint(prepared_data, tmp_path):
    part_a_train.run(tiny_config(prepared_data, tmp_path, "run", epochs=1, test=True, learning_rate=0.01))
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert first["test_checkpoint"] == "best.pt" and first["test_epoch"] == first["best_epoch"] == 1
    summary = part_a_train.run(
        tiny_config(prepared_data, tmp_path, "run", epochs=4, resume=True, learning_rate=0.01)
    )
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["best_epoch"] == summary["best_epoch"] and written["epochs_run"] == 4
    # Kept exactly when best.pt is still the tested epoch-1 checkpoint.
    assert ("test_acc" in written) == (written["best_epoch"] == 1), written


def test_summary_keeps_or_drops_test_results_by_the_epoch_they_describe(tmp_path):
    from common.training import _merge_summary

    path = tmp_path / "summary.json"
    tested = {
        "test_acc": 0.5,
        "test_loss": 1.0,
        "test_checkpoint": "best.pt",
        "test_epoch": 3,
        "note": "kept",
    }
    for best_epoch, keeps in ((3, True), (5, False)):
        path.write_text(json.dumps(tested))
        merged = _merge_summary(path, {"best_epoch": best_epoch, "epochs_run": 6})
        assert ("test_acc" in merged) is keeps and merged["note"] == "kept"
        assert json.loads(path.read_text()) == merged
    # Results of last.pt follow the last epoch; a run that tests again replaces them.
    path.write_text(json.dumps({**tested, "test_checkpoint": "last.pt", "test_epoch": 6}))
    assert "test_acc" in _merge_summary(path, {"best_epoch": 2, "epochs_run": 6})
    assert "test_acc" not in _merge_summary(path, {"best_epoch": 2, "epochs_run": 7})
    assert _merge_summary(path, {"best_epoch": 7, "epochs_run": 7, "test_acc": 0.9})["test_acc"] == 0.9


def test_injected_nan_stops_training_and_keeps_the_last_good_checkpoint(prepared_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    n_train = sum(1 for p in (prepared_data / "split" / "train").rglob("*") if p.is_file())
    steps_per_epoch = n_train // 8  # batch_size 8, last partial batch dropped

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            calls["n"] += 1
            loss = super().forward(logits, labels)
            return loss * float("nan") if calls["n"] > steps_per_epoch + 2 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", PoisonedLoss)
    config = tiny_config(prepared_data, tmp_path, "nan", epochs=3)
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 2, step 3"):
        part_a_train.run(config)
    state = ckpt_io.load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["status"] == "failed"


def test_cli_end_to_end_writes_every_file_and_an_offline_wandb_run(prepared_data, tmp_path):
    env_args = tiny_argv(prepared_data, tmp_path, test=True, name="e2e", wandb_mode="offline")
    run_dir = tmp_path / "e2e"
    result = train_cli("part_a/train.py", env_args, run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(METRIC_NAMES <= m.keys() for m in metrics)
    assert all(0.0 <= m["val_acc"] <= 1.0 for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["status"] == "finished"
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["best_epoch"] in (1, 2)
    assert summary["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run folder"
    assert "epoch   2/2" in result.stdout
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "versions",
        "git_commit",
        "model_config",
        "run_config",
        "classes",
    } <= state.keys()


def test_a_run_whose_last_pt_cannot_be_written_stops_with_one_line_and_keeps_what_it_wrote(
    prepared_data, tmp_path, monkeypatch, capsys
):
    options = tiny_argv(prepared_data, tmp_path, name="full", epochs=3)
    _full_disk(monkeypatch, ".last.pt.", after=1)  # epoch 1's last.pt is written, epoch 2's is not
    assert part_a_train.main(options) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "error" in line.lower() or "Traceback" in line] == [
        f"error: {tmp_path / 'full' / 'last.pt'}: No space left on device; "
        "free some space, then run the command again"
    ]
    assert ckpt_io.load_checkpoint(tmp_path / "full" / "last.pt")["epoch"] == 1
    assert ckpt_io.load_checkpoint(tmp_path / "full" / "best.pt")["epoch"] in (1, 2)
    assert not [p for p in (tmp_path / "full").iterdir() if p.suffix == ".tmp"]
    monkeypatch.undo()
    assert part_a_train.main([*options, "--resume"]) == 0  # space again: the run continues from epoch 1


def test_a_full_disk_while_building_the_cache_is_an_error_naming_it(prepared_data, tmp_path, monkeypatch):
    """The cache claims its space before the decoded images are written into its memory map: without
    that, a full disk killed the process with SIGBUS in the middle of the copy."""
    import shutil

    from common.data import load_cache

    split_dir = tmp_path / "split"
    shutil.copytree(prepared_data / "split", split_dir)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left") as info:
        load_cache(split_dir, "val", 24)
    assert Path(info.value.filename).parent == split_dir / "cache" and info.value.filename.endswith(".npy")
    assert not [p.name for p in (split_dir / "cache").iterdir() if "-24-" in p.name]  # no temporary left
    monkeypatch.undo()
    assert load_cache(split_dir, "val", 24).images.shape == (20, 24, 24, 3)


def test_an_output_folder_that_is_a_file_is_one_line_naming_it(prepared_data, tmp_path, capsys):
    from common import data as data_lib

    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be")
    assert part_a_train.main(tiny_argv(prepared_data, blocker, name="r")) == 1
    assert capsys.readouterr().err.startswith(f"error: {blocker / 'r'}: Not a directory;")
    assert (
        data_lib.main(
            ["prepare", "--root", str(blocker / "data"), "--source", str(prepared_data / "inaturalist_12K")]
        )
        == 1
    )
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {blocker / 'data'}") and "Not a directory" in err[-1]
    assert not [line for line in err if "Traceback" in line]
    assert blocker.read_text() == "a file where a folder should be"


def test_missing_data_without_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from common import data as data_lib

    def offline_prepare(root, **kwargs):
        raise data_lib.DataError("cannot download the archive: no network. ... pass --zip FILE")

    monkeypatch.setattr(data_lib, "prepare", offline_prepare)
    code = part_a_train.main(tiny_argv(tmp_path / "data", tmp_path))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: cannot download") and "--zip" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("recipe", [{}, dict(ema_decay=0.9, mixup_alpha=0.4, cutmix_alpha=1.0)])
def test_compiled_training_does_not_recompile_after_the_first_epoch(prepared_data, tmp_path, recipe):
    """Fixed training shapes and padded evaluation batches: epoch 2 and 3 reuse epoch 1's graphs (with
    EMA, the evaluation graph is the average's; MixUp and CutMix keep shape and memory format)."""
    from torch._dynamo.utils import counters

    counters.clear()  # process-wide: other tests compile too
    compiled_frames = []

    def count(epoch, metrics):
        compiled_frames.append(counters["frames"]["ok"])

    # eval_batch_size 7 leaves a partial last validation batch (20 images), which padding keeps fixed.
    summary = part_a_train.run(
        tiny_config(prepared_data, tmp_path, "compiled", epochs=3, compile=True, eval_batch_size=7, **recipe),
        epoch_callback=count,
    )
    assert summary["status"] == "finished"
    assert compiled_frames[0] > 0, "nothing was compiled"
    assert compiled_frames[0] == compiled_frames[1] == compiled_frames[2], compiled_frames
    # One graph for training, one for evaluation: the partial validation batch made no third one.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
