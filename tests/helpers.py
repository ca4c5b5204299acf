"""What several test files share: generated images, the tiny training run, a fake training program for
sweeps, a stand-in for a loader and an HTTP server.

Images of one class share a colour (plus noise and a class-dependent stripe), so a tiny model can
learn the classes in a few steps; train and test images come from different random streams, so no
two files are byte-identical across splits.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from common.config import to_cli
from common.sweep_space import load_sweep
from part_a import train as part_a_train
from part_b import train as part_b_train

CLASSES = [
    "Amphibia",
    "Animalia",
    "Arachnida",
    "Aves",
    "Fungi",
    "Insecta",
    "Mammalia",
    "Mollusca",
    "Plantae",
    "Reptilia",
]


def class_image(label_index: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An RGB image of ``size`` (width, height) whose colour and stripe position identify the class."""
    width, height = size
    hue = np.array([(label_index * 73) % 256, (label_index * 151 + 40) % 256, (label_index * 29 + 90) % 256])
    pixels = hue + rng.normal(0, 20, (height, width, 3))
    stripe = (label_index * width) // 10
    pixels[:, stripe : stripe + max(1, width // 10)] = 255 - hue
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_image_tree(
    root: str | Path, classes: list[str], n_train: int, n_test: int, size: tuple[int, int] = (48, 40)
) -> Path:
    """Write ``root/inaturalist_12K/{train,val}/<Class>/NNNN.jpg`` and return ``root/inaturalist_12K``.

    A count of 0 writes no class folders for that side (for tests of mismatched class sets).
    """
    dataset = Path(root) / "inaturalist_12K"
    for origin, count in (("train", n_train), ("val", n_test)):
        for index, label in enumerate(classes if count else []):
            folder = dataset / origin / label
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([index, zlib.crc32(origin.encode())])
            for i in range(count):
                class_image(index, rng, size).save(folder / f"{i:04d}.jpg", quality=90)
    return dataset


def make_folders(root: Path, classes: dict[str, int], size=(40, 32)) -> Path:
    """A folder of one's own images: ``root/<Class>/NNN.png``, ``classes[name]`` each; returns ``root``."""
    for index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([index, len(str(root))])
        for i in range(count):
            class_image(index, rng, size).save(folder / f"{i:03d}.png")
    return root


# A run small enough for a 2-core CPU: Part A's CNN, or Part B's ResNet-18 with random weights.
TINY = dict(input_size=32, epochs=2, batch_size=8, device="cpu", compile=False)
TINY_MODEL = {
    "a": dict(
        n_filters=4, n_blocks=3, kernel_size=3, dense_neurons=16, eval_batch_size=16, learning_rate=3e-3
    ),
    "b": dict(model="resnet18", weights="none"),
}


def tiny_argv(data_dir: str | Path, out_dir: str | Path, part: str = "a", **overrides) -> list[str]:
    """The command line of a tiny run of ``part`` ("a" or "b"); ``overrides`` change or add options."""
    return to_cli({"data_dir": data_dir, "out_dir": out_dir, **TINY, **TINY_MODEL[part], **overrides})


def tiny_config(data_dir: str | Path, out_dir: str | Path, name: str, part: str = "a", **overrides) -> tuple:
    """(model config, run config) of a tiny run, parsed as the command line parses them."""
    script = part_a_train if part == "a" else part_b_train
    return script.config_from_args(tiny_argv(data_dir, out_dir, part, name=name, **overrides))


# A training program with the three functions of part_a/train.py that reports val_acc per epoch
# in milliseconds: sweep tests run it through the real runner.
FAKE_PROGRAM = """
import argparse
import json
import os
import time
from pathlib import Path


def get_args_parser():
    parser = argparse.ArgumentParser()
    for name in ("out_dir", "name", "wandb_group", "data_dir"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--quality", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crash", choices=["no", "yes"], default="no")
    parser.add_argument("--sleep", type=float, default=0.0)
    return parser


def config_from_args(argv):
    return get_args_parser().parse_args(argv)


def run(config, epoch_callback=None):
    Path(config.out_dir, config.name).mkdir(parents=True)
    env = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "CUDA_VISIBLE_DEVICES")}
    Path(config.out_dir, config.name, "env.json").write_text(json.dumps(env))
    if config.crash == "yes":
        raise RuntimeError("CUDA out of memory (simulated)")
    time.sleep(config.sleep)
    for epoch in range(1, config.epochs + 1):
        epoch_callback(epoch, {"val_acc": config.quality * epoch / config.epochs, "epoch": epoch})
    return {"best_val_acc": config.quality}
"""


def fake_sweep(tmp_path, parameters: dict, *, method="random", early_terminate=None):
    """A sweep of ``parameters`` over FAKE_PROGRAM, both written to tmp_path; returns its spec."""
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_PROGRAM)
    config = {
        "program": str(program),
        "method": method,
        "metric": {"name": "val_acc", "goal": "maximize"},
        "parameters": parameters,
    }
    if early_terminate:
        config["early_terminate"] = early_terminate
    path = tmp_path / "fake_sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_sweep(path)


def fake_sweep_argv(tmp_path, data_dir, out_dir, *options: str) -> list[str]:
    """``sweep.py``'s command line for the sweep ``fake_sweep`` wrote to tmp_path."""
    return [
        str(tmp_path / "fake_sweep.yaml"),
        "--data_dir",
        str(data_dir),
        "--out_dir",
        str(out_dir),
        *options,
    ]


class RepeatLoader:
    """The same batch, ``steps`` times: an epoch of a loader for engine tests."""

    def __init__(self, images, labels, steps):
        self.images, self.labels, self.steps, self.batch_size = images, labels, steps, len(labels)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)


@contextmanager
def http_server(handler):
    """A server on 127.0.0.1 answering with ``handler`` from a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def train_cli(script: str, args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """``script`` run as a user runs it: it must succeed and write every file of its run folder."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, script, *args]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    return result
