"""What several test files share: generated images and a stand-in for a loader.

Images of one class share a colour (plus noise and a class-dependent stripe), so a tiny model can
learn the classes in a few steps; train and test images come from different random streams, so no
two files are byte-identical across splits.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["Amphibia", "Animalia", "Arachnida", "Aves", "Fungi", "Insecta", "Mammalia", "Mollusca",
           "Plantae", "Reptilia"]


def class_image(label_index: int, rng: np.random.Generator, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An RGB image of ``size`` (width, height) whose colour and stripe position identify the class."""
    width, height = size
    hue = np.array([(label_index * 73) % 256, (label_index * 151 + 40) % 256, (label_index * 29 + 90) % 256])
    pixels = hue + rng.normal(0, 20, (height, width, 3))
    stripe = (label_index * width) // 10
    pixels[:, stripe:stripe + max(1, width // 10)] = 255 - hue
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_image_tree(root: str | Path, classes: list[str], n_train: int, n_test: int,
                    size: tuple[int, int] = (48, 40)) -> Path:
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
