"""Part B: heads for every family, freezing strategies, frozen batch norm, offline weights, the CLI."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import socket
import threading
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from helpers import http_server, tiny_argv, tiny_config, train_cli
from torch import nn

from part_b import weights as weights_lib
from part_b.model import ModelBConfig, build_from_config, build_model, parameter_counts
from part_b.weights import WeightsError

FAMILIES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "efficientnet_v2_s",
    "convnext_tiny",
    "vit_b_16",
    "vgg16",
    "googlenet",
    "inception_v3",
]
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def resnet18(**options) -> nn.Module:
    return build_model(ModelBConfig(model="resnet18", weights="none", input_size=64, **options))


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names_under(model: nn.Module, *prefixes: str) -> set[str]:
    return {
        name for name, _ in model.named_parameters() if name.startswith(tuple(f"net.{p}." for p in prefixes))
    }


def train_steps(model: nn.Module, steps: int = 2) -> None:
    """A few SGD steps over the model's own parameter groups, as the shared loop would take them."""
    torch.manual_seed(0)
    groups = [{"params": g["params"], "lr": 0.1 * g["lr_scale"]} for g in model.param_groups()]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    for _ in range(steps):
        model.train()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- every family: new head, layout ---------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_gets_a_new_head_with_one_output_per_class(name):
    with torch.device("meta"):  # structure only: no memory, no init time
        model = build_from_config({"model": name, "weights": "DEFAULT"})
    heads = [model.net.get_submodule(model.layout.head)] + [
        model.net.get_submodule(a) for a in model.layout.aux
    ]
    for head in heads:
        last_linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        assert last_linear.out_features == 10
    assert len(model.layout.stages) >= 3
    # No other classifier layer with ImageNet's 1000 outputs is left anywhere.
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if name == "inception_v3":
        assert model.net.AuxLogits.fc.out_features == 10


def test_mlp_head_has_hidden_layers_activation_and_dropout():
    with torch.device("meta"):
        model = build_from_config(
            {
                "model": "vgg16",
                "weights": "none",
                "strategy": "mlp_head",
                "head_layers": [64, 32],
                "head_activation": "gelu",
                "head_dropout": 0.2,
            }
        )
    head = model.net.classifier[6]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 64), (64, 32), (32, 10)]
    assert sum(isinstance(m, nn.GELU) for m in head) == 2
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.2, 0.2]


def test_input_size_and_normalisation_come_from_the_weights():
    from part_b.model import normalisation, resolve_config

    assert resolve_config({"model": "inception_v3"}).input_size == 299
    assert resolve_config({"model": "resnet50", "weights": "IMAGENET1K_V1"}).input_size == 224
    assert resolve_config({"model": "resnet50", "input_size": 32}).input_size == 32
    assert normalisation(resolve_config({"model": "resnet50"})) == (
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    )


def test_googlenet_and_inception_scale_inputs_only_for_pretrained_weights():
    with torch.device("meta"):
        for name in ("googlenet", "inception_v3"):
            assert build_from_config({"model": name, "weights": "DEFAULT"}).net.transform_input is True
            assert build_from_config({"model": name, "weights": "none"}).net.transform_input is False


@pytest.mark.parametrize(
    "options, message",
    [
        ({"strategy": "freeze_k", "freeze_stages": 5}, "more than the 4 stages"),
        ({"strategy": "mlp_head", "head_layers": []}, "head_layers must be hidden sizes for mlp_head"),
        ({"strategy": "unfreeze_all"}, "strategy must be one of head, freeze_k"),
        ({"model": "alexnet"}, "unsupported model 'alexnet'"),
        ({"model": "vit_b_16", "input_size": 40}, "multiple of 16"),
        ({"model": "inception_v3", "input_size": 64}, ">= 75"),
        ({"unfreeze_every": 0}, "unfreeze_every"),
    ],
)
def test_bad_options_fail_with_the_option_named(options, message):
    config = {"model": "resnet18", "weights": "none", **options}
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        build_from_config(config)


# ---- strategies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, trains",
    [
        ({"strategy": "head"}, ("fc",)),
        ({"strategy": "mlp_head"}, ("fc",)),
        ({"strategy": "freeze_k", "freeze_stages": 2}, ("layer3", "layer4", "fc")),
        ({"strategy": "freeze_k", "freeze_stages": 0}, ("layer1", "layer2", "layer3", "layer4", "fc")),
        ({"strategy": "full"}, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")),
        ({"strategy": "gradual"}, ("fc",)),  # epoch 1: the head only
    ],
)
def test_exactly_the_strategy_s_parameters_train_and_only_they_change(options, trains):
    model = resnet18(**options)
    expected = names_under(model, *trains)
    assert trainable_names(model) == expected
    counts = parameter_counts(model)
    assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert counts["trainable_params"] + counts["frozen_params"] == sum(p.numel() for p in model.parameters())

    before = snapshot(model)
    train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_param_groups_cover_every_parameter_once_with_the_backbone_scaled():
    model = resnet18(strategy="full", backbone_lr_scale=0.25)
    groups = {g["name"]: g for g in model.param_groups()}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["backbone"]["lr_scale"] == 0.25 and groups["head"]["lr_scale"] == 1.0
    assert {id(p) for p in groups["head"]["params"]} == {id(model.net.fc.weight), id(model.net.fc.bias)}


def test_gradual_unfreezes_one_stage_from_the_top_every_e_epochs():
    model = resnet18(strategy="gradual", unfreeze_every=2)
    schedule = {
        1: ("fc",),
        2: ("fc",),
        3: ("layer4", "fc"),
        4: ("layer4", "fc"),
        5: ("layer3", "layer4", "fc"),
        9: ("layer1", "layer2", "layer3", "layer4", "fc"),
        11: ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"),
        40: ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"),
    }
    for epoch, trains in schedule.items():
        model.set_epoch(epoch)
        assert trainable_names(model) == names_under(model, *trains), f"epoch {epoch}"
    # Resuming at a late epoch jumps straight to that epoch's state: the schedule has no memory.
    model.set_epoch(3)
    assert trainable_names(model) == names_under(model, "layer4", "fc")


# ---- frozen batch norm ---------------------------------------------------------------------------------


def bn_buffers(model: nn.Module, *prefixes: str) -> dict[str, torch.Tensor]:
    buffers = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(tuple(f"net.{p}" for p in prefixes)) and "running_" in k
    }
    assert buffers, f"no batch norm statistics under {prefixes}"  # all() over none would always pass
    return buffers


def test_frozen_batch_norm_keeps_its_running_statistics_in_train_mode():
    model = resnet18(strategy="freeze_k", freeze_stages=2)
    frozen_before, trained_before = bn_buffers(model, "bn1", "layer1", "layer2"), bn_buffers(model, "layer4")
    train_steps(model, steps=3)
    assert model.training and not model.net.layer2.training and model.net.layer3.training
    assert all(
        torch.equal(v, bn_buffers(model, "bn1", "layer1", "layer2")[k]) for k, v in frozen_before.items()
    )
    after = bn_buffers(model, "layer4")
    assert all(not torch.equal(v, after[k]) for k, v in trained_before.items())


def test_gradual_unfreezing_hands_batch_norm_back_to_training():
    model = resnet18(strategy="gradual")
    model.train()
    model.set_epoch(2)  # layer4 now trains, layer3 still frozen
    assert model.net.layer4.training and not model.net.layer3.training
    layer3, layer4 = bn_buffers(model, "layer3"), bn_buffers(model, "layer4")
    train_steps(model)
    assert all(torch.equal(v, bn_buffers(model, "layer3")[k]) for k, v in layer3.items())
    assert all(not torch.equal(v, bn_buffers(model, "layer4")[k]) for k, v in layer4.items())
    model.eval()
    assert not any(m.training for m in model.modules())


# ---- auxiliary heads ----------------------------------------------------------------------------------


def test_inception_v3_returns_plain_logits_in_train_and_eval_and_keeps_aux_frozen():
    # DEFAULT (not loaded by build_from_config) skips inception's slow random init.
    model = build_from_config(
        {"model": "inception_v3", "weights": "DEFAULT", "input_size": 75, "strategy": "head"}
    )
    x = torch.randn(2, 3, 75, 75)
    model.train()
    logits = model(x)  # the aux branch would fail on 75 px input if it ran
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    logits.sum().backward()  # one tensor is all the shared loop needs
    assert model.net.fc.weight.grad is not None and model.net.dropout.training  # the head still trains
    assert model.net.AuxLogits.fc.out_features == 10 and not model.net.AuxLogits.training
    assert not any(p.requires_grad for p in model.net.AuxLogits.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


# ---- weights files ----------------------------------------------------------------------------------


def torchvision_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.get_model(name, weights=None, **kwargs).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
    ],
)
def test_a_torchvision_weights_file_loads_into_the_backbone(tmp_path, wrap):
    state = torchvision_state("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(wrap(state), path)
    model = build_model(ModelBConfig(model="resnet18", weights=str(path), input_size=64))
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert model.net.fc.out_features == 10


def test_a_file_for_another_architecture_is_refused_naming_file_and_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision_state("resnet34"), path)
    with pytest.raises(WeightsError) as error:
        build_model(ModelBConfig(model="resnet18", weights=str(path), input_size=64))
    assert str(path) in str(error.value) and "layer1.2.conv1.weight" in str(error.value)


def test_shape_mismatch_is_refused(tmp_path):
    state = torchvision_state("resnet18")
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"different shape: layer1\.0\.conv1\.weight"):
        build_model(ModelBConfig(model="resnet18", weights=str(path), input_size=64))


def test_googlenet_file_with_untrained_aux_heads_loads(tmp_path):
    path = tmp_path / "googlenet.pth"
    state = torchvision_state("googlenet", aux_logits=True, init_weights=False)
    torch.save(state, path)
    model = build_model(ModelBConfig(model="googlenet", weights=str(path)))
    assert torch.equal(model.net.inception5b.branch1.conv.weight, state["inception5b.branch1.conv.weight"])
    assert model.net.aux1 is None and model.net.transform_input
    assert model.net.fc.out_features == 10


def test_a_missing_file_or_unknown_name_fails_before_building(tmp_path):
    with pytest.raises(WeightsError, match="neither a weights name of resnet18"):
        build_model(ModelBConfig(model="resnet18", weights=str(tmp_path / "nope.pth")))


def test_vit_position_embeddings_are_resampled_for_another_input_size(monkeypatch):
    state = torchvision_state("vit_b_32")  # trained-at-224 layout: 7x7 patches + class token
    monkeypatch.setattr(weights_lib, "load_state", lambda name, spec: (state, "in-memory vit_b_32"))
    model = build_model(ModelBConfig(model="vit_b_32", weights="DEFAULT", input_size=64, strategy="head"))
    position = model.net.encoder.pos_embedding
    assert position.shape == (1, 1 + 2 * 2, 768)
    assert torch.equal(position[:, :1], state["encoder.pos_embedding"][:, :1])  # class token kept
    block = "encoder.layers.encoder_layer_0.mlp.0.weight"
    assert torch.equal(model.net.state_dict()[block], state[block])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# ---- the hub cache and downloads ------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def no_network(url, *args, **kwargs):
    raise URLError(OSError(101, "Network is unreachable"))


def test_missing_weights_without_network_fail_fast_naming_url_and_path(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as error:
        build_model(ModelBConfig(model="resnet18", weights="DEFAULT", input_size=64))
    assert f"download failed ({RESNET18_URL}: [Errno 101] Network is unreachable)" in str(error.value)
    assert f"copy it to {torch_home / 'resnet18-f37072fd.pth'}" in str(error.value)


@pytest.mark.parametrize("listening", [False, True], ids=["closed_port", "server_that_never_answers"])
def test_a_download_that_cannot_proceed_fails_fast_without_leftovers(torch_home, listening):
    with socket.socket() as server:  # listening: the kernel accepts the connection, nobody ever replies
        server.bind(("127.0.0.1", 0))
        if listening:
            server.listen()
            threading.Timer(8, server.close).start()  # a hang without the timeout then fails the test
        url = f"http://127.0.0.1:{server.getsockname()[1]}/models/resnet18-f37072fd.pth"
        if not listening:
            server.close()
        started = time.perf_counter()
        with pytest.raises(WeightsError, match="download failed") as error:
            weights_lib.fetch(url, timeout=1)
    assert time.perf_counter() - started < 5
    assert url in str(error.value) and str(torch_home / "resnet18-f37072fd.pth") in str(error.value)
    assert not list(torch_home.iterdir())  # no partial file left behind
    assert socket.getdefaulttimeout() is None  # the process-wide default is back


def test_cached_weights_are_used_without_touching_the_network(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    state = torchvision_state("resnet18")
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / "resnet18-f37072fd.pth")
    model = build_model(ModelBConfig(model="resnet18", weights="IMAGENET1K_V1", input_size=64))
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    with http_server(handler) as base:
        yield folder, base


def test_download_lands_in_the_cache_and_checks_the_hash(torch_home, file_server):
    folder, base = file_server
    payload = folder / "payload"
    torch.save(torchvision_state("resnet18"), payload)
    good, bad = f"tiny-{hashlib.sha256(payload.read_bytes()).hexdigest()[:8]}.pth", "tiny-deadbeef.pth"
    payload.rename(folder / good)
    (folder / bad).write_bytes((folder / good).read_bytes())

    path = weights_lib.fetch(f"{base}/{good}")
    assert path == torch_home / good and path.read_bytes() == (folder / good).read_bytes()
    with pytest.raises(WeightsError, match=r"invalid hash value \(expected \"deadbeef\""):
        weights_lib.fetch(f"{base}/{bad}")
    assert sorted(p.name for p in torch_home.iterdir()) == [good]


# ---- checkpoints --------------------------------------------------------------------------------------


def test_model_config_is_enough_to_rebuild_the_model_without_weights(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state("resnet18"), path)
    model = build_model(ModelBConfig(model="resnet18", weights=str(path), strategy="mlp_head", input_size=64))
    model_config = dataclasses.asdict(model.config)
    path.unlink()  # evaluation machines need not have the pretrained file
    rebuilt = build_from_config(model_config)
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture, same keys
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


# ---- the command line -----------------------------------------------------------------------------------


def test_the_optimizer_trains_the_backbone_at_backbone_lr_scale_times_the_head_s_rate(
    prepared_data, tmp_path
):
    """A run's own optimizer, after one epoch of 10 steps into a 20-step warm-up: the backbone's group
    holds every pretrained parameter at 0.25 x the head's rate, both at 11/20 of --learning_rate."""
    from part_b import train as part_b_train

    model_config, run_config = tiny_config(
        prepared_data,
        tmp_path,
        "lr",
        "b",
        backbone_lr_scale=0.25,
        epochs=1,
        warmup_epochs=2,
        learning_rate=0.01,
    )
    part_b_train.run((model_config, run_config))
    state = torch.load(tmp_path / "lr" / "last.pt", weights_only=True)
    groups = {group["name"]: group for group in state["optimizer"]["param_groups"]}
    model = build_from_config(state["model_config"])
    assert state["scheduler"]["last_epoch"] == 10 and len(groups["head"]["params"]) == 2  # fc weight and bias
    assert len(groups["backbone"]["params"]) == len(list(model.parameters())) - 2
    assert groups["head"]["lr"] == pytest.approx(0.01 * 11 / 20)
    assert groups["backbone"]["lr"] == pytest.approx(0.25 * 0.01 * 11 / 20)


ROOT = Path(__file__).resolve().parents[1]


def test_options_parse_into_the_config():
    from part_b import train as part_b_train

    model_config, run_config = part_b_train.config_from_args(
        [
            "--model=resnet18",
            "--weights=none",
            "--strategy=mlp_head",
            "--head_layers=64,32",
            "--input_size=48",
            "--backbone_lr_scale=0.5",
        ]
    )
    assert (model_config.model, model_config.strategy, model_config.head_layers, model_config.input_size) == (
        "resnet18",
        "mlp_head",
        [64, 32],
        48,
    )
    assert model_config.backbone_lr_scale == 0.5
    # Fine-tuning defaults, not Part A's; the mlp_head default layers are resolved once, here.
    assert (run_config.epochs, run_config.optimizer, run_config.learning_rate, run_config.weight_decay) == (
        10,
        "adamw",
        1e-3,
        0.05,
    )
    assert part_b_train.config_from_args(["--strategy=mlp_head", "--weights=none"])[0].head_layers == [
        512,
        256,
    ]


def test_a_run_resolves_its_config_and_builds_its_model_once_to_check_and_once_to_train(monkeypatch):
    from part_b import model as model_lib
    from part_b import train as part_b_train

    calls = []

    def counting(function, name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(model_lib, "resolve_config", counting(model_lib.resolve_config, "resolve"))
    monkeypatch.setattr(model_lib, "get_model", counting(model_lib.get_model, "build"))
    monkeypatch.setattr(
        part_b_train.training,
        "run",
        lambda run_config, model_config, build, **kwargs: build(model_config) and {},
    )  # the real run builds once, after the data
    part_b_train.run(part_b_train.config_from_args(["--model=resnet18", "--weights=none", "--input_size=32"]))
    assert calls == ["resolve", "build", "resolve", "build"]  # the check (on the meta device), then the model


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--strategy=freeze_k", "--freeze_stages=7"], "freeze_stages 7"),
        (["--weights=/nonexistent/resnet18.pth"], "nor an existing file"),
        (["--model=squeezenet1_0"], "unsupported model"),
    ],
)
def test_bad_options_fail_before_any_data_is_read(tmp_path, capsys, argv, fragment):
    from part_b import train as part_b_train

    data_dir = tmp_path / "no_data_here"
    code = part_b_train.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--model=resnet18", *argv])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not data_dir.exists()


def test_cli_end_to_end_fine_tunes_gradually_and_writes_the_run_folder(prepared_data, tmp_path):
    from common import checkpoint as ckpt_io

    args = tiny_argv(prepared_data, tmp_path, "b", strategy="gradual", test=True, name="ft")
    run_dir = tmp_path / "ft"
    result = train_cli("part_b/train.py", args, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 2 and 0 <= summary["test_acc"] <= 1
    assert "epoch 2: stem + stages 1-3 of 4 frozen" in result.stdout  # the schedule ran inside the loop
    state = ckpt_io.load_checkpoint(run_dir / "best.pt")
    assert state["kind"] == "part_b" and state["input_size"] == 32
    assert state["mean"] == [0.485, 0.456, 0.406]
    model = ckpt_io.build_model_from_checkpoint(state)
    assert model.net.fc.out_features == 10 and model.config.strategy == "gradual"


def test_compiled_gradual_unfreezing_stays_compiled_through_every_stage(prepared_data, tmp_path, monkeypatch):
    # Each trainable set needs its own graphs; without a reset when the set changes, Dynamo's cache
    # (8 entries per function) fills after a few stages and training silently falls back to eager.
    # Dynamo with the eager backend traces like the real compile, in seconds; hitting the limit fails.
    import functools

    import torch._dynamo

    from part_b import train as part_b_train

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    limit_hit = "fail_on_recompile_limit_hit"
    if not hasattr(torch._dynamo.config, limit_hit):  # its name in torch 2.6
        limit_hit = "fail_on_cache_limit_hit"
    monkeypatch.setattr(torch._dynamo.config, limit_hit, True)
    config = tiny_config(prepared_data, tmp_path, "compiled", "b", strategy="gradual", epochs=6, compile=True)
    summary = part_b_train.run(config)
    assert summary["status"] == "finished" and summary["epochs_run"] == 6
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert state["epoch"] == 6
