"""Tasks (unirobust/tasks.py): declarative task files, loaders, holdout splits, limits and errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from unirobust.tasks import TaskError, available_tasks, get_task, load_task

REPO = Path(__file__).resolve().parents[1]


def write_task(root: Path, spec: dict, name: str = "mytask") -> Path:
    """A task file at ``root/tasks/<name>.yaml`` (relative data paths resolve against ``root``)."""
    path = root / "tasks" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": name, **spec}))
    return path


def text_task(source: dict, labels=("negative", "positive"), **extra) -> dict:
    return {"modality": "text", "labels": list(labels), "text_fields": ["sentence"],
            "threat": {"norm": "l2", "eps": 0.5}, "source": source, **extra}


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


TRAIN_ROWS = [("a fine film , really", "positive"), ("boring", "negative"), ("I laughed a lot", "positive"),
              ("\"quoted\" text with a 'quote", "negative")]


# ----------------------------------------------------------------------------- local text files


def test_local_tsv_with_header(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel"] + [f"{s}\t{int(y == 'positive')}" for s, y in TRAIN_ROWS])
    write_lines(tmp_path / "data" / "dev.tsv", ["sentence\tlabel", "great\t1", "awful\t0"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "dev.tsv"}}))
    task = get_task(str(path))
    assert task.name == "mytask" and task.num_classes == 2
    data = load_task(task)
    assert len(data.train) == 4 and len(data.validation) == 2
    assert data.test["sentence"] == data.validation["sentence"]  # no test split: validation doubles as test
    assert data.train["sentence"] == [s for s, _ in TRAIN_ROWS]  # verbatim, quotes included
    assert data.train["label"] == [1, 0, 1, 0]
    assert data.validation[0] == {"sentence": "great", "label": 1, "idx": 0}


def test_local_tsv_without_header_string_labels(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", [f"{y}\t{s}" for s, y in TRAIN_ROWS])
    write_lines(tmp_path / "data" / "test.tsv", ["positive\tgood", "negative\tbad", "positive\tfine"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data", "columns": ["label", "sentence"],
                                           "splits": {"train": "train.tsv", "test": "test.tsv"}}))
    data = load_task(get_task(str(path)))
    assert data.train["label"] == [1, 0, 1, 0]
    assert data.train["sentence"][0] == "a fine film , really"
    assert data.test["label"] == [1, 0, 1] and len(data.validation) == 3


def test_local_csv_and_label_field(tmp_path):
    write_lines(tmp_path / "data" / "train.csv", ["text,sentiment", '"hello, world",positive', "meh,negative"])
    spec = text_task({"loader": "local", "path": "data", "splits": {"train": "train.csv", "validation": "train.csv"}},
                     label_field="sentiment")
    spec["text_fields"] = ["text"]
    data = load_task(get_task(str(write_task(tmp_path, spec))))
    assert data.train["text"] == ["hello, world", "meh"] and data.train["label"] == [1, 0]


def test_unknown_label_name_is_named(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["positive\tgood", "neutral\tso so"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data", "columns": ["label", "sentence"],
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}}))
    with pytest.raises(TaskError, match="neutral"):
        load_task(get_task(str(path)))


@pytest.mark.parametrize("lines,message", [
    (["text,topic", "a,0"], "label field 'label' not in data columns \\['text', 'topic'\\]"),
    (["text,label", "a,2.5"], "unknown label '2.5'.*indices 0..1"),
    (["text,label", "a,1", "b,2"], "label 2 outside 0..1 .labels are 0-based"),
])
def test_label_column_and_value_errors(tmp_path, lines, message):
    write_lines(tmp_path / "data" / "train.csv", lines)
    spec = text_task({"loader": "local", "path": "data", "splits": {"train": "train.csv", "validation": "train.csv"}})
    spec["text_fields"] = ["text"]
    with pytest.raises(TaskError, match=message):
        load_task(get_task(str(write_task(tmp_path, spec))))


def test_csv_with_a_byte_order_mark(tmp_path):
    """A spreadsheet's "UTF-8 CSV" starts with a BOM, which must not become part of the first column name."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_bytes("\ufefftext,label\nfine,1\nbad,0\n".encode("utf-8"))
    spec = text_task({"loader": "local", "path": "data", "splits": {"train": "train.csv", "validation": "train.csv"}})
    spec["text_fields"] = ["text"]
    assert load_task(get_task(str(write_task(tmp_path, spec)))).train["text"] == ["fine", "bad"]


def test_label_out_of_range(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel", "good\t1", "odd\t5"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}}))
    with pytest.raises(TaskError, match=r"0\.\.1"):
        load_task(get_task(str(path)))


def test_ragged_row_is_reported(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel", "good\t1", "no label here"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}}))
    with pytest.raises(TaskError, match="row 2"):
        load_task(get_task(str(path)))


def test_missing_text_field(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["text\tlabel", "good\t1"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}}))
    with pytest.raises(TaskError, match="sentence"):
        load_task(get_task(str(path)))


def test_integer_like_label_names_match_by_name(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["-1\tbad", "1\tgood", "-1\tworse"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data", "columns": ["label", "sentence"],
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}},
                                          labels=["-1", "1"]))
    data = load_task(get_task(str(path)))
    assert data.train["label"] == [0, 1, 0]


def test_missing_file_fails_in_check_data(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel", "good\t1"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "missing.tsv"}}))
    task = get_task(str(path))
    with pytest.raises(TaskError, match="missing.tsv"):
        task.check_data()
    with pytest.raises(TaskError, match="missing.tsv"):
        load_task(task)


def test_missing_npz_fails_in_check_data():
    task = get_task("animal-mnist", {"source": {"path": "/nonexistent/animals.npz"}})
    with pytest.raises(TaskError, match="/nonexistent/animals.npz"):
        task.check_data()


def test_relative_path_resolves_against_task_project(tmp_path, monkeypatch):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel", "good\t1", "bad\t0"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}}))
    monkeypatch.chdir(tmp_path / "tasks")  # the working directory plays no part
    assert len(load_task(get_task(str(path))).train) == 2


def test_unknown_task_lists_valid_names():
    with pytest.raises(TaskError) as err:
        get_task("no-such-task")
    msg = str(err.value)
    assert "no-such-task" in msg
    for name in ("digits", "sst2-sample", "animal-mnist"):
        assert name in msg


def test_task_validation_errors(tmp_path):
    from pydantic import ValidationError

    from unirobust.registry import UnknownName

    with pytest.raises(ValidationError, match="text_fields"):
        get_task(str(write_task(tmp_path, {**text_task({"loader": "local"}), "text_fields": []}, "a")))
    with pytest.raises(ValidationError, match="image_shape"):
        get_task(str(write_task(tmp_path, {"modality": "vision", "labels": ["a", "b"], "threat": {"eps": 0.1},
                                           "source": {"loader": "npz"}}, "b")))
    with pytest.raises(UnknownName, match="local"):  # the message lists the valid loaders
        get_task(str(write_task(tmp_path, text_task({"loader": "ftp"}), "c")))
    with pytest.raises(ValidationError, match="unknown split"):
        get_task(str(write_task(tmp_path, text_task({"loader": "local", "splits": {"dev": "x.tsv"}}), "d")))


# ----------------------------------------------------------------------------- npz images


def vision_task(source: dict, image_shape=(1, 6, 6), classes=3, **extra) -> dict:
    return {"modality": "vision", "labels": [f"c{i}" for i in range(classes)], "image_shape": list(image_shape),
            "threat": {"eps": 0.1}, "source": source, **extra}


def make_ids_npz(path: Path, n: int = 300, classes: int = 3, sorted_labels: bool = True) -> np.ndarray:
    """Float images in [0, 1] whose first pixel encodes the example's index (to track it through splits)."""
    images = np.random.default_rng(0).uniform(0, 1, size=(n, 6, 6)).astype(np.float32)
    images[:, 0, 0] = np.arange(n) / n
    labels = np.repeat(np.arange(classes), n // classes) if sorted_labels else np.arange(n) % classes
    np.savez(path, images=images, labels=labels)
    return labels


def ids_of(ds, n: int) -> np.ndarray:
    return np.rint(ds.images[:, 0, 0, 0] * n).astype(int)


def test_npz_uint8_channel_last(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    images[0] = 255
    np.savez(tmp_path / "imgs.npz", x=images, y=np.arange(20) % 2)
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "imgs.npz"), "columns": ["x", "y"],
                                             "holdout": {"validation": 0.5}}, image_shape=(3, 6, 6), classes=2))
    data = load_task(get_task(str(path)))
    assert len(data.train) == 10 and len(data.validation) == 10
    ex = data.train[0]
    assert ex["image"].shape == (3, 6, 6) and ex["image"].dtype == np.float32
    assert isinstance(ex["label"], int)
    all_images = np.concatenate([data.train.images, data.validation.images])
    assert all_images.min() >= 0 and all_images.max() == 1.0
    np.testing.assert_allclose(np.sort(all_images.ravel()), np.sort(images.transpose(0, 3, 1, 2).ravel() / 255.0),
                               rtol=0, atol=1e-6)


def test_float_images_keep_their_brightness_and_must_be_in_unit_range(tmp_path):
    """Floats are taken as [0, 1]: a dark set stays dark (it was divided by its own max, so the same
    pixels gave other inputs as float than as uint8); floats on a 0..255 scale are an error."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 128, size=(10, 6, 6), dtype=np.uint8)
    kinds = {"u8": dark, "i64": dark.astype(np.int64), "f32": dark.astype(np.float32) / 255}
    for name, images in kinds.items():  # int64 is what np.array(list of lists) gives: pixels too
        np.savez(tmp_path / f"{name}.npz", images=images, labels=np.arange(10) % 3)
    loaded = [load_task(get_task(str(write_task(tmp_path, vision_task(
        {"loader": "npz", "path": str(tmp_path / f"{name}.npz"), "holdout": {"validation": 0.3}}))))).train.images
        for name in kinds]
    for other in loaded[1:]:
        np.testing.assert_allclose(other, loaded[0], atol=1e-6)
    assert loaded[0].max() < 0.51
    np.savez(tmp_path / "scaled.npz", images=dark.astype(np.float32), labels=np.arange(10) % 3)
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "scaled.npz"),
                                             "holdout": {"validation": 0.3}}))
    with pytest.raises(TaskError, match="float32 images have values up to 127.*floats in .0, 1."):
        load_task(get_task(str(path)))


def test_npz_label_names_and_split_files(tmp_path):
    """npz labels may be names; ``splits`` reads one file per split from the ``path`` folder."""
    images = np.zeros((6, 6, 6), np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.array(["c0", "c1", "c2"] * 2))
    np.savez(tmp_path / "test.npz", images=images[:3] + 255, labels=np.array([2, 1, 0]))
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path),
                                             "splits": {"train": "train.npz", "test": "test.npz"}}))
    data = load_task(get_task(str(path)))
    assert sorted(data.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert data.test.labels.tolist() == [2, 1, 0] and data.test.images.min() == 1.0
    np.savez(tmp_path / "train.npz", images=images, labels=np.array(["c0", "c1", "cat"] * 2))
    with pytest.raises(TaskError, match="unknown label 'cat'"):
        load_task(get_task(str(path)))
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path),
                                             "splits": {"train": "train.npz", "test": "missing.npz"}}))
    with pytest.raises(TaskError, match="data file not found.*missing.npz"):
        load_task(get_task(str(path)))


def save_image(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_reads_class_folders_per_split(tmp_path):
    """``imagefolder``: split -> folder of class folders (label names or indices); pixels keep their
    values (PNG is lossless), grey becomes RGB for a 3-channel task, other sizes are resized."""
    rng = np.random.default_rng(0)
    rgb = {f"train/c{k}/{i}.png": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for k in range(3) for i in range(2)}
    for name, pixels in rgb.items():
        save_image(tmp_path / "photos" / name, pixels)
    save_image(tmp_path / "photos/test/2/big.png", np.full((12, 18), 200, np.uint8))  # grey, 12 x 18, by index
    (tmp_path / "photos/train/c0/notes.txt").write_text("not an image")
    path = write_task(tmp_path, vision_task({"loader": "imagefolder", "path": "photos",
                                             "splits": {"train": "train", "test": "test"}}, image_shape=(3, 6, 6)))
    data = load_task(get_task(str(path)))
    assert len(data.train) == 6 and sorted(data.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    for i in range(len(data.train)):
        item = data.train[i]
        expected = rgb[str(data.train.files[i].relative_to(tmp_path / "photos"))]
        assert item["image"].shape == (3, 6, 6) and item["image"].dtype == np.float32
        np.testing.assert_allclose(item["image"], expected.transpose(2, 0, 1) / 255.0, atol=1e-6)
        assert item["label"] == int(data.train.files[i].parent.name[1:])
    assert data.test.labels.tolist() == [2]
    np.testing.assert_allclose(data.test[0]["image"], 200 / 255.0, atol=1e-6)  # resized, grey on 3 channels
    assert data.validation is data.test


def test_image_folder_keeps_16_bit_depth_and_skips_hidden_files(tmp_path):
    """A 16-bit grey PNG (microscopy, medical) keeps its values: PIL's 8-bit conversion clips it white."""
    deep = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 1800)
    save_image(tmp_path / "imgs/c0/deep.png", deep)
    save_image(tmp_path / "imgs/c1/.ipynb_checkpoints/copy.png", deep)  # not an example
    save_image(tmp_path / "imgs/c1/grey.png", np.full((6, 6), 51, np.uint8))
    for channels in (1, 3):
        spec = vision_task({"loader": "imagefolder", "path": str(tmp_path / "imgs"), "holdout": {"validation": 0.5}},
                           image_shape=(channels, 6, 6), classes=2)
        data = load_task(get_task(str(write_task(tmp_path, spec))))
        assert len(data.train) + len(data.validation) == 2
        split = data.train if data.train.labels.tolist() == [0] else data.validation
        assert split[0]["image"].shape == (channels, 6, 6)
        for channel in split[0]["image"]:
            np.testing.assert_allclose(channel, deep / 65535.0, atol=1e-6)


def test_image_folder_order_spans_classes_and_is_fixed(tmp_path):
    """Class folders are read one after another; listed in that order, the first 10 test images
    (``--max-examples 10``) would all be class c0. The order is shuffled, the same on every load."""
    for k in range(3):
        for i in range(20):
            save_image(tmp_path / f"photos/test/c{k}/{i}.png", np.full((6, 6), 10 * i + k, np.uint8))
    spec = vision_task({"loader": "imagefolder", "path": "photos", "splits": {"train": "test", "test": "test"}})
    first = load_task(get_task(str(write_task(tmp_path, spec)))).test
    assert set(first.labels[:10].tolist()) == {0, 1, 2}
    assert first.files == load_task(get_task(str(write_task(tmp_path, spec)))).test.files
    assert [first[i]["label"] for i in range(len(first))] == [int(f.parent.name[1:]) for f in first.files]


def test_image_folder_refuses_two_folders_of_one_class_and_odd_values(tmp_path):
    from PIL import Image

    save_image(tmp_path / "imgs/c1/a.png", np.zeros((6, 6), np.uint8))
    save_image(tmp_path / "imgs/1/b.png", np.zeros((6, 6), np.uint8))  # index 1 is c1 too
    spec = vision_task({"loader": "imagefolder", "path": str(tmp_path / "imgs"), "holdout": {"validation": 0.5}})
    with pytest.raises(TaskError, match="folders '1' and 'c1' .* are both class 1"):
        load_task(get_task(str(write_task(tmp_path, spec))))
    (tmp_path / "tif/c0").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((6, 6), 0.25, np.float32), mode="F").save(tmp_path / f"tif/c0/{name}.tif")
    spec["source"]["path"] = str(tmp_path / "tif")
    np.testing.assert_allclose(load_task(get_task(str(write_task(tmp_path, spec)))).train[0]["image"], 0.25)
    Image.fromarray(np.full((6, 6), 7.0, np.float32), mode="F").save(tmp_path / "tif/c0/a.tif")
    with pytest.raises(TaskError, match=r"float values: they span \[7, 7\]"):
        load_task(get_task(str(write_task(tmp_path, spec))))


def test_image_folder_holdout_and_errors(tmp_path):
    """One folder without splits is train (holdout gives the others); a folder that is no class, a
    folder of splits given as classes, a file that is no image, and 4 channels are task errors."""
    for k in range(2):
        for i in range(10):
            save_image(tmp_path / f"imgs/c{k}/{i}.png", np.full((6, 6), 10 * i + k, np.uint8))
    source = {"loader": "imagefolder", "path": str(tmp_path / "imgs"), "holdout": {"validation": 0.2}}
    data = load_task(get_task(str(write_task(tmp_path, vision_task(source, classes=2)))))
    assert len(data.train) == 16 and sorted(data.validation.labels.tolist()) == [0, 0, 1, 1]
    held = {f.name + f.parent.name for f in data.validation.files}
    assert held.isdisjoint(f.name + f.parent.name for f in data.train.files)
    assert data.validation[0]["image"].shape == (1, 6, 6)
    with pytest.raises(TaskError, match="image_shape says 4 channels"):
        load_task(get_task(str(write_task(tmp_path, vision_task(source, image_shape=(4, 6, 6), classes=2)))))
    save_image(tmp_path / "imgs/cat/0.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(TaskError, match="folder .*cat is not a class.*c0"):
        load_task(get_task(str(write_task(tmp_path, vision_task(source, classes=2)))))
    save_image(tmp_path / "split/train/c0/0.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(TaskError, match=r"a folder of splits\? .*splits=\{train: train, test: train\}"):
        load_task(get_task(str(write_task(tmp_path, vision_task({**source, "path": str(tmp_path / "split")},
                                                                 classes=2)))))
    for i in range(5):
        save_image(tmp_path / f"bad/c0/{i}.png", np.zeros((6, 6), np.uint8))
    (tmp_path / "bad/c0/3.png").write_bytes(b"not a png")  # whichever file comes first, load finds it
    with pytest.raises(TaskError, match="1 file.* no readable image: .*bad/c0/3.png"):
        load_task(get_task(str(write_task(tmp_path, vision_task({**source, "path": str(tmp_path / "bad")},
                                                                 classes=2)))))
    with pytest.raises(TaskError, match="folder not found.*nowhere"):
        load_task(get_task(str(write_task(tmp_path, vision_task({**source, "path": str(tmp_path / "nowhere")},
                                                                 classes=2)))))
    split_typo = {"loader": "imagefolder", "path": "imgs", "splits": {"train": "c0", "test": "vall"}}
    with pytest.raises(TaskError, match=r"folder not found: /.*/imgs/vall .*task.source.splits.test="):
        load_task(get_task(str(write_task(tmp_path, vision_task(split_typo, classes=2)))))


def test_images_with_negative_values_are_refused(tmp_path):
    """Already-normalised images ([-1, 1]) would be clamped into [0, 1] by every attack."""
    np.savez(tmp_path / "imgs.npz", images=np.linspace(-1, 1, 4 * 36, dtype=np.float32).reshape(4, 6, 6),
             labels=np.arange(4) % 2)
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "imgs.npz"),
                                             "holdout": {"validation": 0.5}}, classes=2))
    with pytest.raises(TaskError, match="negative values"):
        load_task(get_task(str(path)))


def test_relative_threat_is_for_text_only(tmp_path):
    spec = vision_task({"loader": "sklearn", "name": "digits"})
    spec["threat"]["relative"] = True
    with pytest.raises(Exception, match="text tasks only"):
        get_task(str(write_task(tmp_path, spec)))


def test_missing_package_file_fails_in_check_data():
    task = get_task("sst2-sample", {"source": {"splits": {"train": "train_typo.tsv"}}})
    with pytest.raises(TaskError, match="data file not found.*train_typo.tsv"):
        task.check_data()
    get_task("sst2-sample").check_data()


def test_npz_wrong_shape_and_keys(tmp_path):
    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 5, 5), np.float32), labels=np.zeros(4, int))
    spec = vision_task({"loader": "npz", "path": str(tmp_path / "imgs.npz"), "holdout": {"validation": 0.5}})
    with pytest.raises(TaskError, match="image_shape"):
        load_task(get_task(str(write_task(tmp_path, spec, "a"))))
    spec["source"]["columns"] = ["pixels", "labels"]
    with pytest.raises(TaskError, match="pixels"):
        load_task(get_task(str(write_task(tmp_path, spec, "b"))))


def test_npz_label_out_of_range(tmp_path):
    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 6, 6), np.float32), labels=np.array([0, 1, 2, 3]))
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "imgs.npz"),
                                             "holdout": {"validation": 0.5}}))
    with pytest.raises(TaskError, match=r"label 3 outside 0\.\.2"):
        load_task(get_task(str(path)))


def test_stratified_holdout(tmp_path):
    n = 300
    labels = make_ids_npz(tmp_path / "ids.npz", n)
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "ids.npz"),
                                             "holdout": {"test": 0.2, "validation": 0.1}, "seed": 3}))
    data = load_task(get_task(str(path)))
    ids = {s: ids_of(data.split(s), n) for s in ("train", "validation", "test")}
    # disjoint and complete
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    assert sorted(np.concatenate(list(ids.values()))) == list(range(n))
    assert len(ids["test"]) == 60
    # labels travel with their images
    for s in ids:
        assert (data.split(s).labels == labels[ids[s]]).all()
    # class proportions preserved in every split (100 / 100 / 100 overall)
    for s in ids:
        counts = np.bincount(data.split(s).labels, minlength=3)
        assert counts.max() - counts.min() <= 1, (s, counts)
    # deterministic for a given source seed
    again = load_task(get_task(str(path)))
    assert (ids_of(again.test, n) == ids["test"]).all()


def test_holdout_fractions_are_of_the_whole_dataset(digits_data):
    total = len(digits_data.train) + len(digits_data.validation) + len(digits_data.test)
    assert len(digits_data.test) == pytest.approx(0.2 * total, abs=1)
    assert len(digits_data.validation) == pytest.approx(0.2 * total, abs=1)


def test_max_train_max_eval(tmp_path):
    n = 300
    make_ids_npz(tmp_path / "ids.npz", n)  # labels sorted by class: a plain head would hold one class
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "ids.npz"),
                                             "holdout": {"test": 0.2, "validation": 0.2}},
                                            max_train=30, max_eval=10))
    full = load_task(get_task(str(path), {"max_train": None, "max_eval": None}))
    data = load_task(get_task(str(path)))
    assert (len(data.train), len(data.validation), len(data.test)) == (30, 10, 10)
    assert len(np.unique(data.train.labels)) == 3
    # the limited splits are subsets of the full ones
    assert set(ids_of(data.train, n)) <= set(ids_of(full.train, n))
    assert set(ids_of(data.test, n)) <= set(ids_of(full.test, n))
    assert set(ids_of(data.validation, n)) <= set(ids_of(full.validation, n))
    # a limit above the split size changes nothing
    big = load_task(get_task(str(path), {"max_train": 10_000}))
    assert len(big.train) == len(full.train)


def test_limited_and_held_out_splits_are_stratified_and_mixed(tmp_path):
    """A source sorted by class (as animal-mnist is): ``max_train`` / ``max_eval`` keep each class's
    share, and every held-out split comes mixed, so the first rows of it (what the monitor, the checks
    and ``eval.max_examples`` take) hold every class."""
    n = 300
    make_ids_npz(tmp_path / "ids.npz", n)  # 100 / 100 / 100, sorted
    path = write_task(tmp_path, vision_task({"loader": "npz", "path": str(tmp_path / "ids.npz"),
                                             "holdout": {"test": 0.2, "validation": 0.2}},
                                            max_train=30, max_eval=21))
    data = load_task(get_task(str(path)))
    assert np.bincount(data.train.labels, minlength=3).tolist() == [10, 10, 10]
    assert np.bincount(data.test.labels, minlength=3).tolist() == [7, 7, 7]
    full = load_task(get_task(str(path), {"max_train": None, "max_eval": None}))
    for split in (data.validation, data.test, full.validation, full.test):
        assert len(np.unique(split.labels[:9])) == 3, split.labels[:9]
    # another run seed, another sample
    other = load_task(get_task(str(path)), seed=1)
    assert not np.array_equal(ids_of(other.train, n), ids_of(data.train, n))


def test_small_holdout_without_room_for_every_class(tmp_path):
    """20 rows of 4 classes, 10% held out: 2 rows cannot hold 4 classes, so the split is not
    stratified (sklearn would raise); a holdout that leaves nothing is a task error."""
    np.savez(tmp_path / "s.npz", images=np.zeros((20, 6, 6), np.float32), labels=np.arange(20) % 4)
    spec = vision_task({"loader": "npz", "path": str(tmp_path / "s.npz"), "holdout": {"validation": 0.1}}, classes=4)
    data = load_task(get_task(str(write_task(tmp_path, spec, "a"))))
    assert (len(data.train), len(data.validation)) == (18, 2)
    spec["source"]["holdout"] = {"validation": 0.99}
    with pytest.raises(TaskError, match="empty split"):
        load_task(get_task(str(write_task(tmp_path, spec, "b"))))


def test_max_eval_on_text(tmp_path):
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(20)])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data",
                                           "splits": {"train": "train.tsv", "validation": "train.tsv"}},
                                          max_train=7, max_eval=5))
    data = load_task(get_task(str(path)))
    assert len(data.train) == 7 and len(data.validation) == 5 and len(data.test) == 5


def test_text_examples_keep_their_source_row_through_holdout_and_limits(tmp_path):
    """``idx`` is each example's row in its source file (what advgen writes into AdvGLUE items), not
    its position after the shuffled holdout and ``max_eval`` sample; a source's own idx is kept."""
    rows = [f"sentence number {i}" for i in range(40)]
    write_lines(tmp_path / "data" / "train.tsv", ["sentence\tlabel"] + [f"{r}\t{i % 2}" for i, r in enumerate(rows)])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data", "splits": {"train": "train.tsv"},
                                           "holdout": {"validation": 0.25}}, max_eval=6))
    data = load_task(get_task(str(path)))
    for split in (data.train, data.validation):
        assert all(rows[ex["idx"]] == ex["sentence"] for ex in split)
    assert sorted(data.validation["idx"]) != list(range(6))  # sampled rows, not positions
    write_lines(tmp_path / "data" / "own.tsv", ["idx\tsentence\tlabel", "70\tgreat\t1", "71\tawful\t0"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": "data", "splits": {"train": "own.tsv",
                                                                                     "validation": "own.tsv"}}))
    assert load_task(get_task(str(path))).validation["idx"] == ["70", "71"]


def test_hub_source_that_cannot_load_is_a_task_error(monkeypatch):
    """Offline (or a wrong id), a hub task says how to read local files instead of a raw traceback."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError, match=r"cannot load 'glue' \(config 'sst2'\) from the hub: Couldn't reach.*loader: local"):
        load_task(get_task("sst2"))
    # the hint names the task's own columns (a pair task's two fields and its label), and the bundled sample
    with pytest.raises(TaskError, match=r"bundled task sst2-sample\) whose columns are sentence, label"):
        load_task(get_task("sst2"))
    with pytest.raises(TaskError, match=r"whose columns are question1, question2, label"):
        load_task(get_task("qqp"))


# ----------------------------------------------------------------------------- shipped tasks


def test_sklearn_digits(digits_data, digits_task):
    assert digits_task.modality == "vision" and digits_task.num_classes == 10
    sizes = [len(digits_data.train), len(digits_data.validation), len(digits_data.test)]
    assert sum(sizes) == 1797 and all(s > 200 for s in sizes)
    for split in (digits_data.train, digits_data.validation, digits_data.test):
        assert split.images.shape[1:] == (1, 8, 8) and split.images.dtype == np.float32
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        assert set(np.unique(split.labels)) == set(range(10))
    ex = digits_data.test[0]
    assert set(ex) == {"image", "label"}


def test_digits_overrides_limit(digits_task):
    task = get_task("digits", {"max_train": 50, "max_eval": 20})
    data = load_task(task)
    assert (len(data.train), len(data.validation), len(data.test)) == (50, 20, 20)
    assert digits_task.max_train is None  # overrides never leak into the cached task


def test_a_source_with_another_loader_replaces_the_task_files_source(tmp_path):
    """digits holds out test and validation from sklearn's data; own npz files for train and test
    must not get a merged holdout that silently replaces their test split."""
    images = np.zeros((12, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(12) % 10)
    np.savez(tmp_path / "b.npz", images=images[:5] + 255, labels=np.arange(5))
    task = get_task("digits", {"source": {"loader": "npz", "path": str(tmp_path),
                                          "splits": {"train": "a.npz", "test": "b.npz"}}})
    assert task.source.holdout == {} and task.source.splits == {"train": "a.npz", "test": "b.npz"}
    data = load_task(task)
    assert len(data.train) == 12 and data.test.labels.tolist() == [0, 1, 2, 3, 4]
    assert get_task("digits", {"source": {"path": "load_digits"}}).source.holdout == {"test": 0.2, "validation": 0.2}


def test_null_override_removes_a_task_field(tmp_path):
    """``task.source.splits.validation=null`` drops a split the task file names (a merge cannot)."""
    for name in ("train", "test"):
        write_lines(tmp_path / f"{name}.tsv", ["sentence\tlabel", "good\tpositive", "bad\tnegative"])
    path = write_task(tmp_path, text_task({"loader": "local", "path": str(tmp_path),
                                           "splits": {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}}))
    with pytest.raises(TaskError, match="dev.tsv"):
        load_task(get_task(str(path)))
    task = get_task(str(path), {"source": {"splits": {"validation": None}}, "label_field": None})
    assert task.source.splits == {"train": "train.tsv", "test": "test.tsv"} and task.label_field == "label"
    assert len(load_task(task).validation) == 2


def test_a_split_from_the_source_and_from_holdout_is_an_error(tmp_path):
    for name in ("train", "test"):
        write_lines(tmp_path / f"{name}.tsv", ["sentence\tlabel"] + ["good\tpositive", "bad\tnegative"] * 5)
    path = write_task(tmp_path, text_task({"loader": "local", "path": str(tmp_path), "holdout": {"test": 0.2},
                                           "splits": {"train": "train.tsv", "test": "test.tsv"}}))
    with pytest.raises(TaskError, match=r"\['test'\] come from the source and from source.holdout"):
        load_task(get_task(str(path)))


def test_sst2_sample_loads_offline():
    data = load_task(get_task("sst2-sample", {"max_train": 40, "max_eval": 30}))
    assert len(data.train) == 40 and len(data.test) == 30
    assert set(data.train["label"]) <= {0, 1} and all(isinstance(s, str) and s for s in data.train["sentence"])


def test_shipped_tasks_are_found():
    found = available_tasks()
    for name in ("digits", "sst2-sample", "sst2", "ag-news", "animal-mnist"):
        assert name in found and found[name].exists()
    for name, path in found.items():
        if path.parent == REPO / "tasks":
            assert get_task(name).name == name  # the file's name field matches its file name


def test_first_examples_warns_when_the_head_misses_classes(caplog):
    from datasets import Dataset

    from unirobust.runs import first_examples

    ordered = Dataset.from_dict({"x": list(range(9)), "label": [0, 0, 0, 1, 1, 1, 2, 2, 2]})
    with caplog.at_level("WARNING", logger="unirobust"):
        assert first_examples(ordered, 4)["x"] == [0, 1, 2, 3]
    assert "miss 1 of the split's classes" in caplog.text and "task.max_eval=4" in caplog.text
    caplog.clear()
    mixed = Dataset.from_dict({"x": list(range(6)), "label": [0, 1, 2, 0, 1, 2]})
    with caplog.at_level("WARNING", logger="unirobust"):
        assert len(first_examples(mixed, 3)) == 3 and len(first_examples(mixed, None)) == 6
    assert "miss" not in caplog.text


def test_first_examples_warns_on_array_splits_too(caplog):
    from unirobust.runs import first_examples
    from unirobust.tasks import ArrayDataset

    ordered = ArrayDataset(np.zeros((6, 1, 2, 2)), np.array([0, 0, 0, 1, 1, 1]))
    with caplog.at_level("WARNING", logger="unirobust"):
        assert len(first_examples(ordered, 3)) == 3
    assert "miss 1 of the split's classes" in caplog.text


def test_image_shape_given_channels_last_and_task_file_without_name(tmp_path):
    """[28, 28, 1] is read as 28 channels; the error says so instead of blaming mean/std, and a
    recipe names the field as ``task``, not ``task.``. A task file need not repeat its name."""
    from unirobust.recipe import RecipeError, validate

    source = {"loader": "sklearn", "path": "load_digits"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(vision_task(source, image_shape=(8, 8, 1), classes=10, mean=[0.5], std=[0.5])))
    with pytest.raises(RecipeError, match=r"\n  task: image_shape \[8, 8, 1\] reads as 8 channels of 8 x 1: "
                                          r"channels come first, \[1, 8, 8\]"):
        validate({"name": "x", "task": {"name": str(path)}, "model": {"spec": "timm:test_resnet"}})
    path.write_text(yaml.safe_dump(vision_task(source, image_shape=(1, 8, 8), classes=10, std=[0.5, 0.5])))
    with pytest.raises(RecipeError, match=r"task: std has 2 value\(s\), image_shape \[1, 8, 8\] has 1 channel"):
        validate({"name": "x", "task": {"name": str(path)}, "model": {"spec": "timm:test_resnet"}})
    path.write_text(yaml.safe_dump(vision_task(source, image_shape=(1, 8, 8), classes=10)))
    assert get_task(str(path)).name == "mine"


def test_coverage_warning_tells_a_sorted_split_from_a_small_sample():
    """A shuffled split's first 16 of 10 classes miss a class by chance (about 1.9 on average): the
    note no longer asks whether it is sorted by class, which it does for a split listed class by class."""
    import numpy as np
    from datasets import Dataset

    from unirobust.runs import coverage_warning

    sorted_split = Dataset.from_dict({"label": np.repeat(np.arange(3), 4).tolist()})
    assert "is it sorted by class?" in coverage_warning(sorted_split, 4)
    shuffled = Dataset.from_dict({"label": np.random.default_rng(1).permutation(np.arange(1000) % 10).tolist()})
    assert "miss 2 of the split's classes (a sample this small can miss classes by chance)" in coverage_warning(
        shuffled, 16)
    assert coverage_warning(shuffled, 500) is None
