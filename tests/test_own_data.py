"""Your own image folders: `prepare --source DIR` splits them like the iNaturalist archive."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import pytest
from helpers import make_folders, tiny_argv

from common import data as data_lib


def digest(tree: Path) -> dict[str, str]:
    return {
        p.relative_to(tree).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


def split_counts(split_dir: Path) -> Counter:
    with open(split_dir / "manifest.csv", newline="") as handle:
        return Counter((row["split"], row["class"]) for row in csv.DictReader(handle))


def test_a_folder_of_class_folders_is_split_three_ways_and_left_unchanged(tmp_path):
    source = make_folders(tmp_path / "photos", {"cats": 10, "dogs": 10, "owls": 20})
    before = digest(source)
    assert data_lib.main(["prepare", "--root", str(tmp_path / "data"), "--source", str(source)]) == 0
    counts = split_counts(tmp_path / "data" / "split")
    assert counts == {
        ("train", "cats"): 6,
        ("val", "cats"): 2,
        ("test", "cats"): 2,
        ("train", "dogs"): 6,
        ("val", "dogs"): 2,
        ("test", "dogs"): 2,
        ("train", "owls"): 12,
        ("val", "owls"): 4,
        ("test", "owls"): 4,
    }
    assert digest(source) == before
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (tmp_path / "data" / "split" / split).iterdir()) == [
            "cats",
            "dogs",
            "owls",
        ]
    cached = data_lib.load_cache(tmp_path / "data" / "split", "test", 16)
    assert cached.classes == ["cats", "dogs", "owls"] and len(cached.labels) == 8


@pytest.mark.parametrize("test_folder", ["test", "val"])
def test_a_train_folder_with_its_own_test_folder(tmp_path, test_folder):
    source = tmp_path / "photos"
    make_folders(source / "train", {"cats": 10, "dogs": 5})
    make_folders(source / test_folder, {"cats": 3, "dogs": 2})
    split_dir = data_lib.prepare(tmp_path / "data", source=source)
    assert split_counts(split_dir) == {
        ("train", "cats"): 8,
        ("val", "cats"): 2,
        ("train", "dogs"): 4,
        ("val", "dogs"): 1,
        ("test", "cats"): 3,
        ("test", "dogs"): 2,
    }


def test_later_prepares_without_source_reuse_it(tmp_path, capsys):
    source = make_folders(tmp_path / "photos", {"cats": 10, "dogs": 10})
    data_lib.prepare(tmp_path / "data", source=source)
    data_lib.prepare(tmp_path / "data")  # what the train scripts do: no download, the same split
    assert "data ready" in capsys.readouterr().out
    # A refresh reads the source the split was made from, with its own test_fraction.
    assert data_lib.main(["prepare", "--root", str(tmp_path / "data"), "--test_fraction", "0.4"]) == 0
    assert "no image of its source added, removed or changed" in capsys.readouterr().out
    assert split_counts(tmp_path / "data" / "split")[("test", "cats")] == 2


@pytest.mark.parametrize(
    "layout, fragment",
    [
        ({"cats": 10, "dogs": 0}, "class folders with no images"),
        ({"cats": 10}, "needs at least 2"),
        ({"cats": 10, "dogs": 2}, "class dogs has 2 readable image(s) to split: too few"),
    ],
)
def test_bad_folders_are_clear_errors(tmp_path, capsys, layout, fragment):
    source = make_folders(tmp_path / "photos", layout)
    code = data_lib.main(["prepare", "--root", str(tmp_path / "data"), "--source", str(source)])
    err = capsys.readouterr().err
    assert code == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "data" / "split").exists()


def test_train_and_test_folders_with_other_classes_are_refused(tmp_path):
    source = tmp_path / "photos"
    make_folders(source / "train", {"cats": 5, "dogs": 5})
    make_folders(source / "test", {"cats": 2, "owls": 2})
    with pytest.raises(data_lib.DataError, match=r"only in training: \['dogs'\]; only in test: \['owls'\]"):
        data_lib.prepare(tmp_path / "data", source=source)


def test_both_a_test_and_a_val_folder_are_ambiguous(tmp_path):
    source = tmp_path / "photos"
    for folder in ("train", "test", "val"):
        make_folders(source / folder, {"cats": 5, "dogs": 5})
    with pytest.raises(data_lib.DataError, match="both test/ and val/"):
        data_lib.prepare(tmp_path / "data", source=source)


@pytest.mark.parametrize("extra", [["--zip", "archive.zip"], ["--url", "http://127.0.0.1:9/x.zip"]])
def test_source_with_an_archive_option_is_a_bad_option(tmp_path, capsys, extra):
    code = data_lib.main(["prepare", "--root", str(tmp_path / "data"), "--source", str(tmp_path), *extra])
    assert code == 2 and "give one" in capsys.readouterr().err


def test_both_parts_train_and_evaluate_on_three_classes(tmp_path):
    """The output layer is sized from the data: 3 units here, not the 10 of iNaturalist."""
    import json

    import torch
    import torchvision

    from common import checkpoint as ckpt_io
    from common import evaluate
    from part_a import train as part_a_train
    from part_b import train as part_b_train

    source = make_folders(tmp_path / "photos", {"cats": 10, "dogs": 10, "owls": 10})
    data_dir = tmp_path / "data"
    assert data_lib.main(["prepare", "--root", str(data_dir), "--source", str(source)]) == 0
    runs, options = tmp_path / "runs", dict(epochs=1, batch_size=6, test=True)
    assert part_a_train.main(tiny_argv(data_dir, runs, name="a", **options)) == 0
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert part_b_train.main(tiny_argv(data_dir, runs, "b", name="b", weights=weights, **options)) == 0

    for name, head in (("a", "classifier.4.weight"), ("b", "net.fc.weight")):
        state = ckpt_io.load_checkpoint(tmp_path / "runs" / name / "best.pt")
        assert state["classes"] == ["cats", "dogs", "owls"] and state["model_config"]["num_classes"] == 3
        assert state["model"][head].shape[0] == 3
        assert json.loads((tmp_path / "runs" / name / "summary.json").read_text())["test_samples"] == 6
    result = evaluate.evaluate_checkpoint(
        tmp_path / "runs" / "a" / "best.pt", data_dir, tmp_path / "figures", batch_size=4, device="cpu"
    )
    assert list(result["test_per_class_acc"]) == ["cats", "dogs", "owls"]
    assert (tmp_path / "figures" / "confusion_matrix.png").is_file()
