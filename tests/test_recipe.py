"""The training recipe options: weight average (EMA), MixUp/CutMix and test-time flip, each checked
against an independent computation. Whole runs with them are in test_train.py."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from common import engine, training
from common.training import RunConfig
from conftest import RepeatLoader

CPU = torch.device("cpu")


def _ctx(**options) -> engine.StepContext:
    return engine.StepContext(CPU, None, torch.amp.GradScaler("cpu", enabled=False), **options)


def _train(model, images, labels, steps, **options) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no state: one call per step is the same run
    return engine.train_one_epoch(model, RepeatLoader(images, labels, steps), optimizer, None, nn.CrossEntropyLoss(),
                                  _ctx(**options), epoch=1)


def test_the_weight_average_after_k_steps_is_the_closed_form_ema_of_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    reference = copy.deepcopy(model)
    images, labels = torch.randn(8, 3, 6, 6), torch.arange(8) % 3
    decay, steps = 0.7, 5
    average = training.weight_average(model, decay)
    _train(model, images, labels, steps, update_ema=functools.partial(average.update_parameters, model))

    history = []  # the weights after each step, from a second run of the same steps
    for _ in range(steps):
        _train(reference, images, labels, 1)
        history.append({k: v.clone() for k, v in reference.state_dict().items()})
    # The first update copies w_1; then e_t = decay * e_(t-1) + (1 - decay) * w_t.
    weights = [decay ** (steps - 1)] + [(1 - decay) * decay ** (steps - 1 - t) for t in range(1, steps)]
    averaged = average.module.state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():  # weights, biases, BN running mean and variance
            expected = sum(w * state[key] for w, state in zip(weights, history))
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
            assert torch.equal(model.state_dict()[key], history[-1][key]), key  # the same trajectory
    assert not torch.allclose(averaged["4.weight"], history[-1]["4.weight"])  # an average, not the last step


def _own_share(mixed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image and pixel, how much of the mixed value comes from the image itself rather than from
    its predecessor in the batch (the one MixUp and CutMix pair it with)."""
    previous = images.roll(1, 0)
    return (mixed - previous) / (images - previous)


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha, kinds", [
    (0.4, 0.0, {"mixup"}), (0.0, 1.0, {"cutmix"}), (0.4, 1.0, {"mixup", "cutmix"})])
def test_mixed_targets_sum_to_one_and_match_each_image_s_share(mixup_alpha, cutmix_alpha, kinds):
    num_classes, batch = 7, 6
    mix = training._mixing(RunConfig(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha), num_classes)
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 8, 8).contiguous()
    labels = torch.tensor([0, 3, 1, 6, 2, 5])  # neighbours differ, so each target has two entries
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        mixed, targets = mix(images, labels)
        share = _own_share(mixed, images)
        is_cutmix = bool(((share == 0) | (share == 1)).all())  # whole pixels pasted, not blended
        seen.add("cutmix" if is_cutmix else "mixup")
        own = share.mean(dim=(1, 2, 3))
        rows = torch.arange(batch)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch))
        torch.testing.assert_close(targets[rows, labels], own)
        torch.testing.assert_close(targets[rows, labels.roll(1)], 1 - own)
    assert seen == kinds
    assert training._mixing(RunConfig(), num_classes) is None


def test_soft_targets_keep_label_smoothing_and_train_acc_counts_the_dominant_label():
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    loss_fn = training._loss(RunConfig(label_smoothing=0.1), torch.tensor([0, 2]), 3, CPU)
    smoothed = 0.9 * targets + 0.1 / 3
    torch.testing.assert_close(loss_fn(logits, targets), -(smoothed * logits.log_softmax(dim=1)).sum(dim=1).mean())

    # A model that predicts each batch's own labels, trained on mixes in which the label of the next
    # image dominates: train_acc counts the dominant label, so it is 0 here (1 against the original).
    model = nn.Linear(3, 3, bias=False)
    nn.init.eye_(model.weight)
    labels = torch.tensor([0, 1, 2, 0])
    shifted = nn.functional.one_hot((labels + 1) % 3, 3).float()

    def mix(images, labels):
        return images, 0.6 * shifted + 0.4 * nn.functional.one_hot(labels, 3).float()
    one_hot = nn.functional.one_hot(labels, 3).float() * 10
    assert _train(model, one_hot, labels, 1)["train_acc"] == 1.0
    assert _train(model, one_hot, labels, 1, mix=mix)["train_acc"] == 0.0


def test_tta_is_the_mean_softmax_of_two_explicit_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 6, 4)).eval()  # not mirror-symmetric
    images, labels = torch.randn(10, 3, 6, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -1, -1])  # 2 padding rows
    result = engine.evaluate_test(model, RepeatLoader(images, labels, 1), CPU, return_predictions=True, tta=True)
    with torch.no_grad():
        probabilities = (model(images).softmax(dim=1) + model(images.flip(3)).softmax(dim=1))[:8] / 2
    plain = engine.evaluate_test(model, RepeatLoader(images, labels, 1), CPU)
    assert result["test_samples"] == 8
    torch.testing.assert_close(result["probabilities"], probabilities)
    assert result["test_acc"] == (probabilities.argmax(dim=1) == labels[:8]).double().mean().item()
    assert result["test_loss"] == pytest.approx(-probabilities[torch.arange(8), labels[:8]].log().mean().item(),
                                                rel=1e-6)
    assert result["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-6)
