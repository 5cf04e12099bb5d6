"""The built-in demo dataset: seed's layout, deterministic bytes, balanced classes, learnable by shape not colour."""
import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mushroom_demo.painter import CLASS_NAMES, contact_sheet, generate_demo_dataset, main, render_image

NUM_CLASSES = len(CLASS_NAMES)


def file_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    labels_csv = generate_demo_dataset(out, per_class=3, size=48, seed=0)
    return out, labels_csv


def test_labels_csv_has_the_seed_layout_with_string_ids(small_demo):
    out, labels_csv = small_demo
    assert labels_csv == out / "labels.csv"
    labels = pd.read_csv(labels_csv, dtype=str)
    assert list(labels.columns[:2]) == ["id", "label"]
    assert labels["id"].str.fullmatch(r"\d{5}").all(), "ids must be zero-padded strings such as 00042"
    assert labels["id"].iloc[0] == "00000" and labels["id"].is_unique
    # Read naively, the zero-padding would be lost: the ids really exercise string handling downstream.
    assert pd.read_csv(labels_csv)["id"].iloc[1] == 1
    assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == sorted(labels["id"])
    assert set(labels["label"]) <= set(CLASS_NAMES)


def test_every_class_gets_exactly_per_class_images(small_demo):
    labels = pd.read_csv(small_demo[1], dtype=str)
    assert labels["label"].value_counts().to_dict() == {name: 3 for name in CLASS_NAMES}
    assert 4 <= NUM_CLASSES <= 6 and len(set(CLASS_NAMES)) == NUM_CLASSES


def test_images_are_rgb_jpegs_whose_shorter_side_is_size(small_demo):
    out, _ = small_demo
    shapes = set()
    for path in sorted((out / "images").glob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB", path
            assert min(image.size) == 48, (path, image.size)
            shapes.add(image.size)
    assert len(shapes) > 1, "aspect ratios should vary, as photos do"


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(tmp_path, small_demo):
    reference = file_hashes(small_demo[0])
    generate_demo_dataset(tmp_path / "again", per_class=3, size=48, seed=0, workers=2)
    assert file_hashes(tmp_path / "again") == reference
    generate_demo_dataset(tmp_path / "seed1", per_class=3, size=48, seed=1)
    other = file_hashes(tmp_path / "seed1")
    assert other["labels.csv"] == reference["labels.csv"]
    assert all(other[name] != digest for name, digest in reference.items() if name.endswith(".jpg"))


def test_any_image_can_be_rendered_on_its_own(small_demo):
    out, labels_csv = small_demo
    labels = pd.read_csv(labels_csv, dtype=str)
    index = 7
    jpeg = render_image(index, CLASS_NAMES.index(labels["label"][index]), size=48, seed=0)
    assert jpeg == (out / "images" / f"{labels['id'][index]}.jpg").read_bytes()


def test_contact_sheet_has_one_row_per_species(small_demo, tmp_path):
    sheet = contact_sheet(small_demo[1], tmp_path / "sheet.png", per_class=2, tile=32)
    with Image.open(sheet) as image:
        assert image.size == (2 * 32, NUM_CLASSES * 32)


def test_cli_writes_the_dataset_and_rejects_bad_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--per-class", "1", "--size", "40", "--seed", "3"]) == 0
    assert len(pd.read_csv(tmp_path / "cli" / "labels.csv", dtype=str)) == NUM_CLASSES
    assert f"wrote {NUM_CLASSES} images" in capsys.readouterr().out

    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    for argv in (["--out", str(tmp_path / "x"), "--per-class", "0"], ["--out", str(tmp_path / "x"), "--size", "8"],
                 ["--out", str(a_file)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith("python -m mushroom_demo.painter: error:") and "Traceback" not in message


# --- Learnability: a cheap check that the classes are told apart by shape, not by a colour cast -------------------


def mean_colour(image):
    return np.asarray(image, np.float32).reshape(-1, 3).mean(0) / 255


def shape_features(image):
    """16x16 pixels plus a 4x4-cell, 8-orientation gradient histogram (HOG-like) of the 32x32 grey image."""
    pixels = np.asarray(image.resize((16, 16), Image.BILINEAR), np.float32).ravel() / 255
    grey = np.asarray(image.convert("L").resize((32, 32), Image.BILINEAR), np.float32) / 255
    gy, gx = np.gradient(grey)
    orientation = np.minimum((np.arctan2(gy, gx) % np.pi / np.pi * 8).astype(int), 7)
    cell = (np.arange(32) // 8)[:, None] * 4 + (np.arange(32) // 8)[None, :]
    hog = np.bincount((cell * 8 + orientation).ravel(), np.hypot(gx, gy).ravel(), minlength=128)
    return np.concatenate([pixels, hog / (np.linalg.norm(hog) + 1e-6)])


def standardise(train, test):
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def nearest_centroid_accuracy(train, y_train, test, y_test):
    train, test = standardise(train, test)
    centroids = np.stack([train[y_train == k].mean(0) for k in range(NUM_CLASSES)])
    predicted = ((test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return (predicted == y_test).mean()


def ridge_classifier_accuracy(train, y_train, test, y_test, strength=300.0):
    """Least squares onto one-hot targets with an L2 penalty: a linear classifier with a closed-form fit."""
    train, test = standardise(train, test)
    train, test = np.c_[train, np.ones(len(train))], np.c_[test, np.ones(len(test))]
    one_hot = np.eye(NUM_CLASSES)[y_train]
    weights = np.linalg.solve(train.T @ train + strength * np.eye(train.shape[1]), train.T @ one_hot)
    return ((test @ weights).argmax(1) == y_test).mean()


def test_classes_are_learnable_from_shape_but_not_from_mean_colour():
    per_class, size = 50, 64
    labels = np.arange(per_class * NUM_CLASSES) % NUM_CLASSES
    images = [Image.open(io.BytesIO(render_image(i, int(label), size, seed=0))).convert("RGB")
              for i, label in enumerate(labels)]
    train = np.arange(len(labels)) < int(0.6 * len(labels))  # classes take turns, so both parts are balanced
    test = ~train
    colour = np.stack([mean_colour(image) for image in images])
    shape = np.stack([shape_features(image) for image in images])

    colour_accuracy = nearest_centroid_accuracy(colour[train], labels[train], colour[test], labels[test])
    shape_accuracy = ridge_classifier_accuracy(shape[train], labels[train], shape[test], labels[test])
    chance = 1 / NUM_CLASSES
    print(f"held-out accuracy: mean colour {colour_accuracy:.2f}, shape features {shape_accuracy:.2f}, "
          f"chance {chance:.2f}")
    assert colour_accuracy < 0.9, "mean colour alone separates the classes: overlap their colours more"
    # Guessing scores above chance + 3 binomial standard deviations on 100 test images less than 0.1% of the time.
    # A linear model on 150 images is weak (~0.45-0.55 here; a small CNN on 480 images reaches ~0.9+).
    assert shape_accuracy >= chance + 3 * np.sqrt(chance * (1 - chance) / test.sum()), \
        "shape features barely beat chance: the classes are not learnable"
    assert shape_accuracy >= colour_accuracy + 0.1, "shape should carry more than the colour cast does"
