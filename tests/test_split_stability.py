"""A split never moves: a refresh adds and removes images without moving any other, a run records the
split it trained on, and a resume or an evaluation on another split is refused."""

from __future__ import annotations

import csv
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import torch
from helpers import class_image, make_folders, tiny_argv

from common import checkpoint as ckpt_io
from common import data as data_lib
from common import evaluate
from part_a import train as part_a_train


def splits(split_dir: Path) -> dict[str, str]:
    """class/file -> split, from the manifest."""
    with open(split_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return {row["path"].split("/", 1)[1]: row["split"] for row in csv.DictReader(handle)}


def add_images(folder: Path, names: list[str], seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        class_image(1, rng, (40, 32)).save(folder / name)


def error_line(err: str) -> str:
    """The one error line of a failed command (a progress bar on stderr may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def refresh(root: Path) -> int:
    return data_lib.main(["prepare", "--root", str(root)])


def train(data_dir: Path, out_dir: Path, *options: str) -> int:
    return part_a_train.main([*tiny_argv(data_dir, out_dir), *options])


def test_added_images_take_the_quotas_of_the_new_total_and_move_no_other(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 30, "dogs": 10})
    split_dir = data_lib.prepare(tmp_path / "data", source=source)
    before = splits(split_dir)
    add_images(source / "cats", ["new.png"])
    capsys.readouterr()
    assert refresh(tmp_path / "data") == 0
    assert "added 1 image (cats: 1 train), removed 0" in capsys.readouterr().out
    after = splits(split_dir)
    assert {k: v for k, v in after.items() if k in before} == before and after["cats/new.png"] == "train"

    # Ten more cats (41): the fractions give 8 val and 8 test, so 2 of the new go to each, 6 to train.
    add_images(source / "cats", [f"more{i}.png" for i in range(10)])
    assert refresh(tmp_path / "data") == 0
    assert "added 10 images (cats: 6 train, 2 val, 2 test), removed 0" in capsys.readouterr().out
    again = splits(split_dir)
    assert {k: v for k, v in again.items() if k in after} == after
    cats = [split for name, split in again.items() if name.startswith("cats/")]
    assert (cats.count("train"), cats.count("val"), cats.count("test")) == (25, 8, 8)


def test_removed_images_leave_and_the_rest_stay(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 20, "dogs": 10})
    split_dir = data_lib.prepare(tmp_path / "data", source=source)
    before = splits(split_dir)
    gone = [
        next(name for name, split in before.items() if name.startswith("cats/") and split == wanted)
        for wanted in ("train", "val")
    ]
    for name in gone:
        (source / name).unlink()
    capsys.readouterr()
    assert refresh(tmp_path / "data") == 0
    assert "added 0, removed 2 images (cats: 1 train, 1 val)" in capsys.readouterr().out
    assert splits(split_dir) == {k: v for k, v in before.items() if k not in gone}
    assert not any((split_dir / before[name] / name).exists() for name in gone)


def test_other_split_options_for_an_existing_split_are_refused(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 10, "dogs": 10})
    split_dir = data_lib.prepare(tmp_path / "data", source=source)
    before = splits(split_dir)
    prepare = ["prepare", "--root", str(tmp_path / "data")]
    for command in (
        lambda: data_lib.main([*prepare, "--seed", "7"]),
        lambda: data_lib.main([*prepare, "--source", str(source), "--test_fraction", "0.4"]),
        lambda: train(tmp_path / "data", tmp_path / "runs", "--val_fraction", "0.3"),
    ):
        capsys.readouterr()
        assert command() == 1
        assert "never move" in error_line(capsys.readouterr().err)
    assert splits(split_dir) == before


def test_resume_on_a_changed_split_is_refused_and_an_old_checkpoint_resumes(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 20, "dogs": 20})
    data_lib.prepare(tmp_path / "data", source=source)
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "1") == 0
    add_images(source / "cats", ["new.png"])
    assert refresh(tmp_path / "data") == 0
    capsys.readouterr()
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "2", "--resume") == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: --resume:") and "1 image added to train" in err and "new run" in err

    # A checkpoint from before splits were recorded resumes as it always did.
    last = tmp_path / "runs" / "r" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["split"]
    torch.save(state, last)
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "2", "--resume") == 0
    assert set(ckpt_io.load_checkpoint(last)["split"]) == {"train", "val", "test"}


def test_evaluating_on_a_changed_test_split_is_refused(tmp_path, capsys):
    source = tmp_path / "photos"
    make_folders(source / "train", {"cats": 10, "dogs": 10})
    make_folders(source / "test", {"cats": 3, "dogs": 3})
    data_lib.prepare(tmp_path / "data", source=source)
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "1") == 0
    best = tmp_path / "runs" / "r" / "best.pt"
    (source / "test" / "dogs" / "000.png").unlink()
    assert refresh(tmp_path / "data") == 0
    capsys.readouterr()
    arguments = ["--data_dir", str(tmp_path / "data"), "--device", "cpu"]
    assert evaluate.main(["--checkpoint", str(best), *arguments]) == 1
    assert "1 image removed from test" in error_line(capsys.readouterr().err)

    state = ckpt_io.load_checkpoint(best)
    del state["split"]  # from before splits were recorded: evaluated as it always was
    old = ckpt_io.save_checkpoint(tmp_path / "old" / "best.pt", state)
    assert evaluate.main(["--checkpoint", str(old), *arguments]) == 0


def test_the_split_works_without_its_source_which_only_a_refresh_needs(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 10, "dogs": 10})
    data_lib.prepare(tmp_path / "data", source=source)
    shutil.rmtree(source)
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "1", "--test") == 0
    capsys.readouterr()
    assert refresh(tmp_path / "data") == 1
    err = error_line(capsys.readouterr().err)
    assert str(source) in err and "no longer there" in err and "--source" in err


def test_class_order_is_one_rule_for_cased_spaced_and_decomposed_names(tmp_path):
    """A train/ folder from a macOS zip (decomposed names) and a test/ folder typed on Linux: one class."""
    names = ["ant", "Bee", "cat", "sea lion", "élan"]
    source = tmp_path / "photos"
    make_folders(source / "train", {unicodedata.normalize("NFD", name): 8 for name in names})
    make_folders(source / "test", {unicodedata.normalize("NFC", name): 2 for name in names})
    split_dir = data_lib.prepare(tmp_path / "data", source=source)
    order = ["Bee", "ant", "cat", "sea lion", "élan"]  # sorted(): code points, as torchvision's ImageFolder
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (split_dir / split).iterdir()) == order
        assert data_lib.load_cache(split_dir, split, 16).classes == order
    assert train(tmp_path / "data", tmp_path / "runs", "--name", "r", "--epochs", "1") == 0
    assert ckpt_io.load_checkpoint(tmp_path / "runs" / "r" / "best.pt")["classes"] == order
    best = tmp_path / "runs" / "r" / "best.pt"
    result = evaluate.evaluate_checkpoint(best, tmp_path / "data", device="cpu")
    assert list(result["test_per_class_acc"]) == order
