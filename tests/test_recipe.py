"""The training recipe options: weight average (EMA), MixUp/CutMix and test-time flip, each checked
against an independent computation. Whole runs with them are in test_train.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import RepeatLoader
from torch import nn

from common import engine, training
from common.training import RunConfig

CPU = torch.device("cpu")


def _ctx(**options) -> engine.StepContext:
    return engine.StepContext(CPU, None, torch.amp.GradScaler("cpu", enabled=False), **options)


def _train(model, images, labels, steps, **options) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no state: one call per step is the same run
    return engine.train_one_epoch(
        model,
        RepeatLoader(images, labels, steps),
        optimizer,
        None,
        nn.CrossEntropyLoss(),
        _ctx(**options),
        epoch=1,
    )


def _ema_shares(steps: int, decay: float) -> list[float]:
    """The share of the weights after step j = 0..steps (0: the initial ones) in the average, by the
    closed form of the warm-up rule: C(j + 8, 8) / C(t + 9, 9) until step t, where the warmed-up decay
    (1 + t) / (10 + t) reaches ``decay``; each step after that scales them by ``decay`` and adds its
    weights with 1 - decay."""
    t = min(steps, math.ceil((10 * decay - 1) / (1 - decay)))
    warm = [math.comb(j + 8, 8) / math.comb(t + 9, 9) * decay ** (steps - t) for j in range(t + 1)]
    return warm + [(1 - decay) * decay ** (steps - j) for j in range(t + 1, steps + 1)]


@pytest.mark.parametrize("steps, decay", [(192, 0.99), (100, 0.9)])
def test_the_average_follows_the_closed_form_of_the_warm_up_and_forgets_the_initial_weights(steps, decay):
    """Step j sets the weights to the unit vector e_j, so the average is the vector of shares."""
    model = nn.Linear(1, steps + 1, bias=False).double()
    model.register_buffer("num_batches_tracked", torch.tensor(0))
    with torch.no_grad():
        model.weight.copy_(torch.eye(steps + 1)[:, :1])
        average = training.WeightAverage(model, decay)
        for j in range(1, steps + 1):
            model.weight.copy_(torch.eye(steps + 1)[:, j : j + 1])
            model.num_batches_tracked += 1
            average.update()
    shares = average.module.weight[:, 0]
    torch.testing.assert_close(
        shares, torch.tensor(_ema_shares(steps, decay), dtype=torch.float64), rtol=1e-5, atol=1e-9
    )
    assert shares[0] < 1e-6 < 0.99**steps  # the initial weights are gone (a constant decay keeps 0.99^k)
    assert shares[: steps // 2].sum() < 0.005  # the first half of training counts little, too
    assert int(average.updates) == int(average.module.num_batches_tracked) == steps


def test_the_weight_average_update_reads_no_tensor_back_to_the_host(monkeypatch):
    """On the CPU, a stand-in for CUDA's sync debug mode (below): the host reads Python code can make
    raise during the updates (torch's AveragedModel made one at every step, ``bool`` of its count)."""
    average = training.WeightAverage(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0.99)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *args, _name=name: pytest.fail(f"Tensor.{_name}")
        )
    for _ in range(20):
        average.update()
    monkeypatch.undo()
    assert int(average.updates) == 20


@pytest.mark.cuda
def test_the_weight_average_updates_without_a_host_sync():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda()
    average = training.WeightAverage(model, 0.99)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host read of a device tensor raises
    try:
        for _ in range(20):
            average.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(average.updates) == 20


def test_the_weight_average_of_a_trained_model_is_the_closed_form_ema_of_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    reference = copy.deepcopy(model)
    images, labels = torch.randn(8, 3, 6, 6), torch.arange(8) % 3
    decay, steps = 0.3, 5  # the warm-up decay reaches 0.3 at the fourth step
    average = training.WeightAverage(model, decay)
    _train(model, images, labels, steps, update_ema=average.update)

    history = [{k: v.clone() for k, v in reference.state_dict().items()}]  # initial weights, then each step's
    for _ in range(steps):
        _train(reference, images, labels, 1)
        history.append({k: v.clone() for k, v in reference.state_dict().items()})
    averaged = average.module.state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():  # weights, biases, BN running mean and variance
            expected = sum(
                share * state[key] for share, state in zip(_ema_shares(steps, decay), history, strict=True)
            )
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
            assert torch.equal(model.state_dict()[key], history[-1][key]), key  # the same trajectory
    assert not torch.allclose(averaged["4.weight"], history[-1]["4.weight"])  # an average, not the last step


def _own_share(mixed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image and pixel, how much of the mixed value comes from the image itself rather than from
    its predecessor in the batch (the one MixUp and CutMix pair it with)."""
    previous = images.roll(1, 0)
    return (mixed - previous) / (images - previous)


@pytest.mark.parametrize(
    "mixup_alpha, cutmix_alpha, kinds",
    [(0.4, 0.0, {"mixup"}), (0.0, 1.0, {"cutmix"}), (0.4, 1.0, {"mixup", "cutmix"})],
)
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
    torch.testing.assert_close(
        loss_fn(logits, targets), -(smoothed * logits.log_softmax(dim=1)).sum(dim=1).mean()
    )

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


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.4, 0.0), (0.0, 1.0)])
def test_the_loss_and_its_gradient_are_those_of_the_mixed_soft_targets(mixup_alpha, cutmix_alpha):
    """One training step against an independent replay of the same mix: the loss it reports and the
    weights it reaches are those of cross-entropy against the soft targets, not the original labels."""
    num_classes = 5
    config = RunConfig(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))
    reference = copy.deepcopy(model)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 3, 1, 4, 2, 1])
    torch.manual_seed(1)  # the mix draws from torch's global generator
    result = _train(model, images, labels, 1, mix=training._mixing(config, num_classes))

    torch.manual_seed(1)
    mixed, soft = training._mixing(config, num_classes)(images, labels)
    assert not torch.equal(mixed, images) and soft.shape == (6, num_classes)
    loss = -(soft * reference(mixed).log_softmax(dim=1)).sum(dim=1).mean()
    hard = nn.functional.cross_entropy(reference(mixed), labels)
    assert (
        result["train_loss"] == pytest.approx(loss.item(), rel=1e-5) != pytest.approx(hard.item(), rel=1e-3)
    )
    loss.backward()
    with torch.no_grad():
        for trained, start in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(trained, start - 0.1 * start.grad)  # _train's SGD, lr 0.1


def test_class_weights_weigh_each_class_by_its_inverse_frequency():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])  # class 2 is the rarest
    loss_fn = training._loss(RunConfig(class_weights=True), labels, 3, CPU)
    plain = training._loss(RunConfig(), labels, 3, CPU)
    torch.testing.assert_close(loss_fn.weight, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert plain.weight is None
    targets = torch.tensor([0, 2])
    wrong_on_common = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])  # says 2 for both: wrong on the first
    wrong_on_rare = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # says 0 for both: wrong on the second
    for logits in (wrong_on_common, wrong_on_rare):
        nll = -logits.log_softmax(dim=1)[torch.arange(2), targets]
        weight = loss_fn.weight[targets]
        torch.testing.assert_close(loss_fn(logits, targets), (nll * weight).sum() / weight.sum())
    torch.testing.assert_close(
        plain(wrong_on_common, targets), plain(wrong_on_rare, targets)
    )  # equally wrong
    assert loss_fn(wrong_on_rare, targets) > 2 * loss_fn(
        wrong_on_common, targets
    )  # the rare class's counts more


def test_tta_is_the_mean_softmax_of_two_explicit_passes():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 6, 4)
    ).eval()  # not mirror-symmetric
    images, labels = (
        torch.randn(10, 3, 6, 8),
        torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, -1, -1]),
    )  # 2 padding rows
    result = engine.evaluate_test(
        model, RepeatLoader(images, labels, 1), CPU, return_predictions=True, tta=True
    )
    with torch.no_grad():
        probabilities = (model(images).softmax(dim=1) + model(images.flip(3)).softmax(dim=1))[:8] / 2
    plain = engine.evaluate_test(model, RepeatLoader(images, labels, 1), CPU)
    assert result["test_samples"] == 8
    torch.testing.assert_close(result["probabilities"], probabilities)
    assert result["test_acc"] == (probabilities.argmax(dim=1) == labels[:8]).double().mean().item()
    assert result["test_loss"] == pytest.approx(
        -probabilities[torch.arange(8), labels[:8]].log().mean().item(), rel=1e-6
    )
    assert result["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-6)
