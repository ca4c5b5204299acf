"""Report figures, guided backprop and evaluation (common/evaluate.py, as part_a/evaluate.py) end to end."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
import torchvision
from helpers import CLASSES, tiny_config
from PIL import Image
from torch import nn

from common import checkpoint as ckpt_io
from common import evaluate, figures
from part_a import train as part_a_train
from part_a.model import build_model


def tiny_model(**overrides) -> nn.Module:
    config = dict(
        input_size=32,
        n_filters=6,
        n_blocks=3,
        kernel_size=3,
        dense_neurons=16,
        activation="relu",
        batch_norm=True,
        dropout=0.2,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return build_model(config)


def image_axes(fig):
    """Axes that show a picture (colorbars and deleted cells excluded)."""
    return [ax for ax in fig.axes if ax.images]


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_counts_rows_as_true_and_columns_as_predicted():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(figures.confusion_matrix(labels, predictions, 3), expected)


def test_confusion_matrix_figure_has_two_labelled_panels():
    matrix = figures.confusion_matrix(torch.arange(10).repeat(3), torch.arange(10).roll(1).repeat(3), 10)
    fig = figures.plot_confusion_matrix(matrix, CLASSES)
    panels = image_axes(fig)
    assert len(panels) == 2
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
        assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    normalised = panels[1].images[0].get_array()
    assert normalised.sum(axis=1).tolist() == pytest.approx([1.0] * 10)
    assert fig.get_layout_engine() is not None  # constrained layout: no overlapping labels


# ---------------------------------------------------------------- prediction grid


def test_prediction_grid_shows_every_image_captioned_and_marks_mistakes():
    images = torch.randint(0, 256, (30, 32, 32, 3), dtype=torch.uint8)
    true = [i // 3 for i in range(30)]
    predicted = [t if i % 3 else (t + 1) % 10 for i, t in enumerate(true)]  # first of each row wrong
    fig = figures.plot_prediction_grid(images, true, predicted, [0.75] * 30, CLASSES)
    axes = image_axes(fig)
    assert len(axes) == 30
    for index, ax in enumerate(axes):
        title = ax.get_title()
        assert f"true: {CLASSES[true[index]]}" in title and f"pred: {CLASSES[predicted[index]]}" in title
        assert "75%" in title
        expected = figures.CORRECT_COLOR if true[index] == predicted[index] else figures.WRONG_COLOR
        assert mcolors.same_color(ax.title.get_color(), expected)
        assert mcolors.same_color(ax.spines["left"].get_edgecolor(), expected)
    assert fig.get_size_inches()[1] > fig.get_size_inches()[0]  # 10 rows x 3 columns


# ---------------------------------------------------------------- filters


def test_first_layer_filters_are_drawn_one_per_filter_and_min_max_normalised():
    model = tiny_model(n_filters=7, kernel_size=5)
    fig = figures.plot_filters(model.first_conv().weight)
    axes = image_axes(fig)
    assert len(axes) == 7
    for ax in axes:
        pixels = ax.images[0].get_array()
        assert pixels.shape == (5, 5, 3)
        assert float(pixels.min()) == pytest.approx(0.0) and float(pixels.max()) == pytest.approx(1.0)


def test_filter_grid_is_capped_for_very_wide_first_layers():
    fig = figures.plot_filters(torch.randn(figures.MAX_FILTERS + 5, 3, 2, 2))
    assert len(image_axes(fig)) == figures.MAX_FILTERS
    assert f"first {figures.MAX_FILTERS} of {figures.MAX_FILTERS + 5}" in fig.get_suptitle()


def test_save_figure_writes_a_png(tmp_path):
    path = figures.save_figure(figures.plot_filters(tiny_model().first_conv().weight), tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- guided backprop


class _ReferenceGuidedReLU(torch.autograd.Function):
    """Textbook guided ReLU, written independently of common.figures."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


class _ReferenceReLU(nn.Module):
    def forward(self, x):
        return _ReferenceGuidedReLU.apply(x)


def _with_reference_relus(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, _ReferenceReLU())
    return reference


def _hook_state(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    ]


def test_guided_backprop_matches_an_independent_guided_relu():
    model = tiny_model().eval()
    images = torch.randn(4, 3, 32, 32)
    channels = [0, 3, 5, 1]
    layer = model.last_conv_block()[2]  # conv, batch norm, ReLU
    assert isinstance(layer, nn.ReLU)
    assert figures.feature_activation(model, images) is layer

    gradients = figures.guided_backprop(model, images, channels)

    reference = _with_reference_relus(model)
    inputs = images.clone().requires_grad_(True)
    captured = {}
    reference.last_conv_block()[2].register_forward_hook(lambda m, i, o: captured.update(out=o))
    reference(inputs)
    captured["out"][torch.arange(4), torch.tensor(channels)].sum().backward()
    assert gradients.shape == images.shape
    assert gradients.abs().sum() > 0
    torch.testing.assert_close(gradients, inputs.grad)
    plain = torch.func.grad(lambda x: _channel_sum(model, layer, x, channels))(images)
    assert not torch.allclose(plain, gradients)  # the guided rule really changed something


def _channel_sum(model, layer, x, channels):
    outputs = []
    with figures.forward_hooks([layer], lambda module, inputs, output: outputs.append(output)):
        model(x)
    return outputs[-1][torch.arange(len(x)), torch.tensor(channels)].sum()


def test_guided_rule_passes_only_positive_gradients_into_positive_activation_inputs():
    model = tiny_model().eval()
    seen = []

    def keep_input(module, inputs):
        inputs[0].retain_grad()
        seen.append(inputs[0])

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_pre_hook(keep_input) for m in relus]
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    with figures.guided_backward(model):
        # a mixed-sign objective, so a rule that let negative gradients through would show them
        (model(images) * torch.randn(3, 10)).sum().backward()
    for handle in handles:
        handle.remove()
    assert len(seen) == len(relus)
    for activation_input in seen:
        assert (activation_input.grad >= 0).all()
        assert (activation_input.grad[activation_input <= 0] == 0).all()
    assert any(x.grad.abs().sum() > 0 for x in seen)


@pytest.mark.parametrize("activation", ["gelu", "silu", "mish", "elu"])
def test_guided_backprop_leaves_the_model_exactly_as_it_was(activation):
    model = tiny_model(activation=activation).train()
    images = torch.randn(3, 3, 32, 32)
    hooks_before = _hook_state(model)
    state_before = copy.deepcopy(model.state_dict())
    model.eval()
    with torch.no_grad():
        logits_before = model(images)
    model.train()

    gradients = figures.guided_backprop(model, images, [0, 1, 2])

    assert gradients.shape == images.shape and torch.isfinite(gradients).all()
    assert model.training
    assert _hook_state(model) == hooks_before
    assert all(p.grad is None for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state_before[name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), logits_before)


def test_guided_backprop_handles_a_torchvision_resnet_with_shared_inplace_relus():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    layer = figures.feature_activation(model, images)
    assert layer is model.layer4[-1].relu  # called twice per block; its last call is the block output
    gradients = figures.guided_backprop(model, images, [5, 100], layer)
    assert gradients.shape == images.shape and gradients.abs().sum() > 0
    assert _hook_state(model) == [0] * len(list(model.modules()))


def test_guided_backprop_rejects_bad_channels():
    model = tiny_model()
    with pytest.raises(ValueError, match="one channel per image"):
        figures.guided_backprop(model, torch.randn(2, 3, 32, 32), [0])
    with pytest.raises(ValueError, match=r"channels must be in \[0, 6\)"):
        figures.guided_backprop(model, torch.randn(1, 3, 32, 32), [6])
    assert _hook_state(model) == [0] * len(list(model.modules()))


def test_guided_backprop_figure_pairs_each_image_with_its_gradient():
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    gradients = torch.randn(10, 3, 32, 32)
    fig = figures.plot_guided_backprop(images, gradients, [f"channel {i}" for i in range(10)])
    axes = image_axes(fig)
    assert len(axes) == 20
    for i, (image_ax, gradient_ax) in enumerate(zip(axes[::2], axes[1::2], strict=True)):
        assert image_ax.get_title() == f"channel {i}"  # each image beside its own gradient, in order
        assert np.array_equal(image_ax.images[0].get_array(), images[i].numpy())
        np.testing.assert_allclose(gradient_ax.images[0].get_array(), figures.gradient_to_image(gradients[i]))
    shown = figures.gradient_to_image(gradients[0])
    assert shown.shape == (32, 32, 3) and shown.min() >= 0 and shown.max() <= 1


# ---------------------------------------------------------------- evaluate.py end to end

FIGURES = ("confusion_matrix.png", "prediction_grid.png", "first_layer_filters.png", "guided_backprop.png")


@pytest.fixture(scope="module")
def trained_run(prepared_data, tmp_path_factory) -> Path:
    """best.pt of a 1-epoch Part A run on the tiny dataset (read-only: copy before changing)."""
    out_dir = tmp_path_factory.mktemp("runs")
    part_a_train.run(tiny_config(prepared_data, out_dir, "tiny", n_filters=12, activation="gelu", epochs=1))
    return out_dir / "tiny" / "best.pt"


def eval_argv(checkpoint: Path, data_dir: Path) -> list[str]:
    """On the CPU, in batches of 7: the last of the 30 test images' batches is padded."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--data_dir",
        str(data_dir),
        *"--device cpu --batch_size 7".split(),
    ]


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def evaluated(trained_run, prepared_data, tmp_path_factory) -> tuple[Path, int, str, str]:
    """One full evaluation (the slow part: four figures) shared by the tests that inspect it:
    a copy of the run folder with a summary to merge into, wandb offline, and a batch size that
    leaves a padded last batch (30 test images, batches of 7)."""
    run_dir = tmp_path_factory.mktemp("evaluated")
    checkpoint = run_dir / "best.pt"
    checkpoint.write_bytes(trained_run.read_bytes())
    (run_dir / "summary.json").write_text(json.dumps({"best_val_acc": 0.5, "best_epoch": 1}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main([*eval_argv(checkpoint, prepared_data), "--wandb_mode", "offline"])
    return run_dir, code, out.getvalue(), err.getvalue()


def test_evaluate_merges_test_metrics_into_the_summary_and_prints_a_table(evaluated):
    run_dir, code, out, err = evaluated
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] == 0.5  # merged, not replaced
    assert 0 <= summary["test_acc"] <= 1 and summary["test_loss"] > 0
    per_class = summary["test_per_class_acc"]
    assert list(per_class) == CLASSES
    # 3 test images per class: the overall accuracy is the mean of the per-class ones
    assert summary["test_acc"] == pytest.approx(sum(per_class.values()) / 10)
    for name in CLASSES:
        assert re.search(rf"^{name}\s+{per_class[name]:.4f}\s+3$", out, re.MULTILINE), out


def test_evaluate_writes_all_four_figures_next_to_the_checkpoint(evaluated):
    run_dir, code, _, err = evaluated
    assert code == 0, err
    for name in FIGURES:
        with Image.open(run_dir / name) as image:
            assert image.width > 300 and image.height > 300, name
    with Image.open(run_dir / "prediction_grid.png") as grid:
        assert grid.height > 2 * grid.width  # 10 rows of 3


def test_wandb_offline_gets_the_figures_and_a_predictions_table(evaluated):
    run_dir, code, _, err = evaluated
    assert code == 0, err
    media = [p for p in run_dir.glob("wandb/offline-run-*/files/media/**/*") if p.is_file()]
    names = {p.name.split("_")[0] for p in media}
    assert {"confusion", "prediction", "first", "guided"} <= names, names
    assert any(p.name.endswith(".table.json") for p in media)


def test_test_metrics_agree_with_a_direct_forward_pass(evaluated, trained_run, prepared_data):
    run_dir, code, _, err = evaluated
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    model = ckpt_io.build_model_from_checkpoint(ckpt_io.load_checkpoint(trained_run)).eval()
    test_set = evaluate.data_lib.load_cache(prepared_data / "split", "test", 32)
    with torch.no_grad():
        logits = model(evaluate.normalise(test_set.images, (0.5,) * 3, (0.5,) * 3))
    assert summary["test_acc"] == pytest.approx((logits.argmax(1) == test_set.labels).double().mean().item())
    assert summary["test_loss"] == pytest.approx(
        nn.functional.cross_entropy(logits, test_set.labels).item(), rel=1e-5
    )


def test_tta_evaluation_averages_each_image_with_its_mirror_image(
    trained_run, prepared_data, tmp_path, capsys
):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(trained_run.read_bytes())
    code, out, err = run_main([*eval_argv(checkpoint, prepared_data), "--tta"], capsys)
    assert code == 0, err
    assert "mirror image" in out.splitlines()[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    model, state, device = evaluate.load_model(checkpoint, "cpu")
    test_set = evaluate.data_lib.load_cache(prepared_data / "split", "test", 32)
    images = evaluate.normalise(test_set.images, state["mean"], state["std"])
    with torch.no_grad():
        probabilities = (model(images).softmax(dim=1) + model(images.flip(3)).softmax(dim=1)) / 2
    assert summary["test_tta"] is True
    assert summary["test_loss"] == pytest.approx(
        -probabilities[torch.arange(len(test_set.labels)), test_set.labels].log().mean().item(), rel=1e-5
    )

    # Guided backprop picks its images by their own feature maps, not by their mirror images'.
    loader = evaluate.data_lib.DeviceLoader(
        test_set.images, test_set.labels, 7, device, train=False, mean=state["mean"], std=state["std"]
    )
    layer = figures.feature_activation(model, images[:1])
    strengths = [evaluate.predict_test_set(model, loader, device, layer, tta)[1] for tta in (False, True)]
    torch.testing.assert_close(strengths[1], strengths[0])


def test_the_grid_shows_three_images_of_every_class_chosen_deterministically():
    labels = torch.arange(10).repeat_interleave(7)
    first = evaluate.sample_per_class(labels, 3, 10)
    assert first == evaluate.sample_per_class(labels, 3, 10)
    assert [len(set(indices)) for indices in first] == [3] * 10  # three different images
    assert all(labels[i] == label for label, indices in enumerate(first) for i in indices)


def test_images_option_prints_the_top_three_classes(trained_run, tmp_path, capsys):
    paths = []
    for index, size in enumerate([(50, 30), (20, 64)]):
        path = tmp_path / f"photo{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    code, out, err = run_main(
        ["--checkpoint", str(trained_run), "--device", "cpu", "--data_dir", "nowhere", "--images", *paths],
        capsys,
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for path, line in zip(paths, lines, strict=True):
        assert line.startswith(f"{path}: ")
        top = re.findall(r"(\w+) (\d\.\d{3})", line[len(path) + 2 :])
        assert len({name for name, _ in top}) == 3 and all(name in CLASSES for name, _ in top)
        probabilities = [float(p) for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0005


def _assert_user_error(code: int, err: str, fragment: str) -> None:
    assert code == 1  # the options were fine; the work failed for a reason the user can fix
    assert fragment in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path, prepared_data, capsys):
    missing = tmp_path / "missing.pt"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path in (missing, corrupt, foreign):
        code, _, err = run_main(
            ["--checkpoint", str(path), "--data_dir", str(prepared_data), "--device", "cpu"], capsys
        )
        _assert_user_error(code, err, str(path))


def test_a_checkpoint_from_other_classes_is_a_clear_error(trained_run, prepared_data, tmp_path, capsys):
    state = ckpt_io.load_checkpoint(trained_run)
    state["classes"] = [name.lower() for name in state["classes"]]
    other = ckpt_io.save_checkpoint(tmp_path / "other.pt", state)
    code, _, err = run_main(
        ["--checkpoint", str(other), "--data_dir", str(prepared_data), "--device", "cpu"], capsys
    )
    _assert_user_error(code, err, str(other))
    assert "classes" in err


def test_weights_that_do_not_fit_the_config_are_a_clear_error(trained_run, tmp_path, capsys):
    state = ckpt_io.load_checkpoint(trained_run)
    state["model_config"] = {**state["model_config"], "n_filters": 5}
    broken = ckpt_io.save_checkpoint(tmp_path / "broken.pt", state)
    code, _, err = run_main(["--checkpoint", str(broken), "--images", "x.png", "--device", "cpu"], capsys)
    _assert_user_error(code, err, str(broken))


def test_unreadable_image_and_missing_dataset_are_clear_errors(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    code, _, err = run_main(
        ["--checkpoint", str(trained_run), "--images", str(bad), "--device", "cpu"], capsys
    )
    _assert_user_error(code, err, str(bad))
    code, _, err = run_main(
        ["--checkpoint", str(trained_run), "--data_dir", str(tmp_path / "none"), "--device", "cpu"], capsys
    )
    _assert_user_error(code, err, "prepare")


def test_the_documented_script_runs_part_a_evaluate_with_the_exit_code_rule(tmp_path):
    script = Path(__file__).resolve().parents[1] / "part_a" / "evaluate.py"
    missing = subprocess.run(
        [sys.executable, str(script), "--checkpoint", str(tmp_path / "none.pt"), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _assert_user_error(missing.returncode, missing.stderr, str(tmp_path / "none.pt"))
    assert (
        subprocess.run(
            [sys.executable, str(script)], capture_output=True, cwd=tmp_path, timeout=120
        ).returncode
        == 2
    )
