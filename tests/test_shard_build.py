"""shard_tools end to end on generated images: build, determinism, slices + merge, bad input, CLI, verify."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from shard_fixtures import (COLOURS, decode, pil_size, read_dataset, solid, solid_dataset, textured, textured_dataset,
                            write_csv)
from shard_tools import build as build_module
from shard_tools.__main__ import main
from shard_tools.build import build_dataset
from shard_tools.manifest import Manifest
from shard_tools.plan import BuildError, BuildSettings

QUIET = dict(progress=False)


def skipped_rows(out) -> dict[int, str]:
    with open(out / "skipped.csv", newline="") as f:
        return {int(r["row"]): r["reason"] for r in csv.DictReader(f)}


# --- the output ---------------------------------------------------------------------------------------------------
def test_stats_are_exact_over_the_stored_training_pixels(tmp_path):
    images, labels = textured_dataset(tmp_path, 20, labels=("a", "b"), size=(80, 60))
    m = build_dataset(images, labels, tmp_path / "out", val_fraction=0.3, shard_size=3, workers=2, **QUIET)
    samples = read_dataset(tmp_path / "out", m)
    assert m.splits["val"].num_samples == 6
    # Independent answer: decode every stored training image with torchvision and reduce in float64.
    train = np.concatenate([decode(s["jpg"]).reshape(-1, 3) for s in samples["train"]]).astype(np.float64) / 255
    assert m.stats.pixels == len(train) == 14 * 80 * 60
    np.testing.assert_allclose(m.stats.mean, train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.stats.std, train.std(0), rtol=1e-12)


def test_stats_of_solid_colours_match_the_known_colours(tmp_path):
    images, labels = solid_dataset(tmp_path, per_class=(6, 5, 4))
    m = build_dataset(images, labels, tmp_path / "out", val_fraction=0, **QUIET)
    # Known pixels: 6, 5 and 4 images of 48x32 in three colours; JPEG keeps a flat colour within a level or two.
    nominal = np.repeat(np.array(COLOURS[:3], dtype=np.float64), [6 * 48 * 32, 5 * 48 * 32, 4 * 48 * 32], axis=0)
    assert m.stats.pixels == 15 * 48 * 32
    np.testing.assert_allclose(m.stats.mean, nominal.mean(0) / 255, atol=2 / 255)
    np.testing.assert_allclose(m.stats.std, nominal.std(0) / 255, atol=2 / 255)
    # Flat images all have the same perceptual hash (no gradients): one group, which a split could not cut.
    assert m.duplicate_groups == 1


def test_samples_carry_key_class_and_original_id(tmp_path):
    images, labels = textured_dataset(tmp_path, 9, labels=("c", "a", "b"))
    m = build_dataset(images, labels, tmp_path / "out", val_fraction=0.34, **QUIET)
    assert m.classes == ["a", "b", "c"]
    samples = [s for split in read_dataset(tmp_path / "out", m).values() for s in split]
    assert sorted(s["json"]["id"] for s in samples) == [f"{i:04d}" for i in range(9)]  # leading zeros kept
    for s in samples:
        assert s["key"] == f"{s['json']['row']:09d}"
        assert m.classes[s["cls"]] == s["json"]["label"] == "cab"[int(s["json"]["id"]) % 3]
    assert m.splits["val"].class_counts == [1, 1, 1]  # stratified
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [sh.num_samples for sh in m.splits["train"].shards]
    assert info["splits"]["val"]["num_samples"] == 3


def test_integer_labels_keep_their_numeric_order(tmp_path):
    images = tmp_path / "images"
    rows = [(f"{i}", str(label)) for i, label in enumerate([10, 2, 9, 0, 1, 10, 2, 9, 0, 1])]
    for i, _ in rows:
        solid(images / f"{i}.jpg", COLOURS[int(i) % 4])
    m = build_dataset(images, write_csv(tmp_path / "l.csv", rows), tmp_path / "out", val_fraction=0, **QUIET)
    assert m.classes == ["0", "1", "2", "9", "10"]
    assert all(m.classes[s["cls"]] == s["json"]["label"] for s in read_dataset(tmp_path / "out", m)["train"])


def test_near_duplicates_land_in_the_same_split(tmp_path):
    images, rows = tmp_path / "images", []
    images.mkdir()
    for i in range(24):
        photo = textured(i, (200, 150))
        photo.save(images / f"{i}.jpg", quality=92)
        rows.append((str(i), "ab"[i % 2]))
        if i % 3 == 0:  # a copy at another size and quality, as a re-upload would be
            photo.resize((120, 90)).save(images / f"{i}-copy.jpg", quality=55)
            rows.append((f"{i}-copy", "ab"[i % 2]))
    labels = write_csv(tmp_path / "l.csv", rows)
    for seed in range(3):
        m = build_dataset(images, labels, tmp_path / f"out{seed}", val_fraction=0.5, seed=seed, **QUIET)
        assert m.duplicate_groups == 8 and m.source["duplicate_images"] == 16
        split_of = {s["json"]["id"]: split for split, ss in read_dataset(tmp_path / f"out{seed}", m).items() for s in ss}
        assert all(split_of[str(i)] == split_of[f"{i}-copy"] for i in range(0, 24, 3))
        assert {split_of[str(i)] for i in range(0, 24, 3)} == {"train", "val"}  # the check is not vacuous


def test_large_images_are_shrunk_small_ones_passed_through(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    textured(1, (400, 100)).save(images / "wide.jpg")
    textured(2, (50, 40)).save(images / "small.jpg", quality=80)
    solid(images / "tiny.png", (1, 2, 3), size=(20, 10), fmt="PNG")
    labels = write_csv(tmp_path / "l.csv", [("wide", "x"), ("small", "x"), ("tiny.png", "x")])
    m = build_dataset(images, labels, tmp_path / "out", val_fraction=0, size=64, **QUIET)
    by_id = {s["json"]["id"]: s for s in read_dataset(tmp_path / "out", m)["train"]}
    assert pil_size(by_id["wide"]["jpg"]) == (256, 64)
    assert by_id["small"]["jpg"] == (images / "small.jpg").read_bytes()
    assert pil_size(by_id["tiny.png"]["jpg"]) == (20, 10)  # never upscaled
    assert m.source["passthrough"] == 1


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_rows_are_skipped_with_reasons_and_everything_else_is_written(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good = [(f"{i:03d}", "ab"[i % 2]) for i in range(6)]
    for i, _ in good:
        textured(int(i), (64, 48)).save(images / f"{i}.jpg")
    textured(50, (64, 48)).save(images / "trunc.jpg")
    (images / "trunc.jpg").write_bytes((images / "trunc.jpg").read_bytes()[:300])
    (images / "text.jpg").write_text("hello")
    textured(53, (64, 48)).save(images / "nolabel.jpg")
    textured(51, (64, 48)).save(tmp_path / "outside.jpg")
    textured(52, (200, 200)).save(images / "bomb.jpg")
    Image.new("RGB", (40, 30), (0, 128, 255)).convert("CMYK").save(images / "cmyk.jpg")
    Image.new("RGB", (40, 30), (9, 9, 9)).convert("P").save(images / "palette.jpg", format="PNG")
    Image.new("RGB", (40, 30), (9, 99, 9)).save(images / "webp.jpg", format="WEBP")
    Image.new("L", (40, 30), 77).save(images / "gray.jpg")
    bad = [("missing", "a"), ("trunc", "a"), ("text", "b"), ("../outside", "a"), ("000", "b"), ("nolabel", ""),
           ("bomb", "a")]
    converted = [("cmyk", "a"), ("palette", "b"), ("webp", "a"), ("gray", "b")]
    labels = write_csv(tmp_path / "l.csv", good + bad + converted)
    code = main(["build", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out"),
                 "--max-pixels", "20000", "--val-fraction", "0", "--workers", "2", "--no-progress"])
    assert code == 0
    reasons = skipped_rows(tmp_path / "out")
    assert sorted(reasons) == list(range(6, 13))  # exactly the bad rows
    for row, needle in zip(range(6, 13), ["not found", "truncated", "not an image", "outside", "duplicate",
                                          "empty label", "pixel limit"]):
        assert needle in reasons[row], (row, reasons[row])
    m = Manifest.read(str(tmp_path / "out"))
    assert m.source["written"] == 10 and m.source["skipped"] == 7 and m.source["rows"] == 17
    assert "written 10 + skipped 7 = 17 rows" in capsys.readouterr().out
    for s in read_dataset(tmp_path / "out", m)["train"]:
        assert decode(s["jpg"]).shape[2] == 3


def test_strict_exits_nonzero_after_writing_everything(tmp_path):
    images, labels = solid_dataset(tmp_path, per_class=(3, 3))
    with open(labels, "a") as f:
        f.write("nope,class_0\n")
    args = ["build", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args + ["--strict"]) == 1
    assert Manifest.read(str(tmp_path / "out")).source["written"] == 6  # the good rows are still there
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("case, needle", [
    ("empty_csv", "is empty"),
    ("header_only", "no rows"),
    ("wrong_column", "no column 'species'"),
    ("missing_folder", "images folder not found"),
    ("missing_csv", "labels CSV not found"),
])
def test_unusable_input_is_a_one_line_error_with_exit_2(tmp_path, capsys, case, needle):
    images, labels = solid_dataset(tmp_path, per_class=(2, 2))
    args = ["build", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out"), "--no-progress"]
    if case == "empty_csv":
        labels.write_text("")
    elif case == "header_only":
        labels.write_text("id,label\n")
    elif case == "wrong_column":
        args += ["--label-column", "species"]
    elif case == "missing_folder":
        args[2] = str(tmp_path / "nope")
    elif case == "missing_csv":
        args[4] = str(tmp_path / "nope.csv")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shard_tools: error: ") and needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- determinism, slices ------------------------------------------------------------------------------------------
def test_output_is_identical_for_any_number_of_workers(tmp_path):
    images, labels = textured_dataset(tmp_path, 30, labels=("a", "b", "c"))
    kw = dict(val_fraction=0.2, shard_size=4, size=48, seed=3, **QUIET)
    one = build_dataset(images, labels, tmp_path / "w1", workers=1, **kw)
    two = build_dataset(images, labels, tmp_path / "w2", workers=2, **kw)
    assert len(one.splits["train"].shards) > 2
    assert one.to_dict() == two.to_dict()  # same shards, sha256s, counts and stats
    other_seed = build_dataset(images, labels, tmp_path / "s4", workers=2, **kw | {"seed": 4})
    assert other_seed.to_dict() != one.to_dict()


def test_slices_then_merge_equal_a_one_process_build(tmp_path, capsys):
    images, labels = textured_dataset(tmp_path, 26, labels=("a", "b"))
    flags = ["--images", str(images), "--labels", str(labels), "--val-fraction", "0.2", "--shard-size", "3",
             "--size", "48", "--no-progress"]
    assert main(["build", "--out", str(tmp_path / "whole"), "--workers", "2"] + flags) == 0
    assert main(["plan", "--out", str(tmp_path / "sliced")] + flags[:-1]) == 0
    plan = str(tmp_path / "sliced" / "_plan")
    assert main(["build", "--plan", plan, "--slice", "2/3", "--workers", "1", "--no-progress"]) == 0
    assert main(["build", "--plan", plan, "--slice", "0/3", "--workers", "2", "--no-progress"]) == 0
    assert main(["merge", str(tmp_path / "sliced"), "--no-progress"]) == 2  # slice 1 has not run
    assert "not encoded yet" in capsys.readouterr().err
    assert not (tmp_path / "sliced" / "manifest.json").exists()
    assert main(["build", "--plan", plan, "--slice", "1/3", "--workers", "1", "--no-progress"]) == 0
    assert main(["build", "--plan", plan, "--slice", "1/3", "--workers", "1", "--no-progress"]) == 0  # no-op rerun
    assert main(["merge", str(tmp_path / "sliced"), "--workers", "2", "--no-progress"]) == 0
    whole, sliced = Manifest.read(str(tmp_path / "whole")), Manifest.read(str(tmp_path / "sliced"))
    assert sliced.to_dict() == whole.to_dict()
    assert (tmp_path / "whole" / "skipped.csv").read_text() == (tmp_path / "sliced" / "skipped.csv").read_text()
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "sliced"), "--no-progress"]) == 2  # again: says so, and keeps the dataset
    assert "is already merged" in capsys.readouterr().err
    assert Manifest.read(str(tmp_path / "sliced")).to_dict() == whole.to_dict()


def test_worker_pools_start_before_any_row_is_read(tmp_path, monkeypatch):
    # forked workers hold what the parent held at the fork: started after the rows were read, each worker's memory
    # grew with the dataset (630 MB against 433 MB at 1M rows against 100k, benchmarks/bench_scale.py)
    from contextlib import contextmanager

    from shard_tools import plan as plan_module

    events = []
    real_pool, real_load_rows, real_load = build_module.worker_pool, build_module.load_rows, plan_module.WorkList.load

    @contextmanager
    def pool(workers):
        events.append("pool")
        with real_pool(workers) as p:
            yield p

    monkeypatch.setattr(build_module, "worker_pool", pool)
    monkeypatch.setattr(build_module, "load_rows", lambda *a: events.append("rows") or real_load_rows(*a))
    monkeypatch.setattr(plan_module.WorkList, "load", classmethod(lambda cls, f: events.append("rows") or real_load(f)))
    images, labels = textured_dataset(tmp_path, 8, labels=("a", "b"))
    build_dataset(images, labels, tmp_path / "built", workers=2, size=48, **QUIET)
    settings = BuildSettings(str(images), str(labels), size=48)
    build_module.plan_dataset(settings, tmp_path / "sliced")
    build_module.write_slice(str(tmp_path / "sliced" / "_plan"), 0, 1, workers=2, progress=False)
    build_module.merge(tmp_path / "sliced", workers=2, progress=False)
    assert events == ["pool", "rows", "rows", "pool", "rows", "pool", "rows"]  # build; plan (no pool); slice; merge


# --- safety of the output folder ----------------------------------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(tmp_path):
    images, labels = solid_dataset(tmp_path, per_class=(4, 4))
    build_dataset(images, labels, tmp_path / "out", shard_size=1, **QUIET)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(images, labels, tmp_path / "out", **QUIET)
    m = build_dataset(images, labels, tmp_path / "out", overwrite=True, **QUIET)
    tars = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert tars == sorted(sh.name for s in m.splits.values() for sh in s.shards)  # old extra shards are gone
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # files that are not ours are kept


def test_interrupted_rebuild_leaves_no_manifest(tmp_path, monkeypatch):
    images, labels = solid_dataset(tmp_path, per_class=(4, 4))
    build_dataset(images, labels, tmp_path / "out", **QUIET)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "write_shard_job", crash)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(images, labels, tmp_path / "out", overwrite=True, **QUIET)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_settings_are_checked():
    with pytest.raises(BuildError, match="val-fraction"):
        BuildSettings("i", "l", val_fraction=1.0).check()


# --- verify and info ----------------------------------------------------------------------------------------------
def test_verify_passes_a_good_dataset_and_names_a_corrupted_shard(tmp_path, capsys):
    images, labels = solid_dataset(tmp_path, per_class=(4, 4))
    m = build_dataset(images, labels, tmp_path / "out", shard_size=3, **QUIET)
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert "OK" in capsys.readouterr().out
    shard = tmp_path / "out" / m.splits["train"].shards[1].name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a JPEG
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"{shard.name}: sha256 differs" in out
    shard.write_bytes(bytes(data[:1024]))  # cut short
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "bytes, manifest says" in capsys.readouterr().out


def test_info_prints_classes_counts_and_stats(tmp_path, capsys):
    images, labels = solid_dataset(tmp_path, per_class=(4, 4))
    m = build_dataset(images, labels, tmp_path / "out", **QUIET)
    assert main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "class_0" in out and "class_1" in out and f"{m.stats.mean[0]:.4f}" in out
    assert main(["info", str(tmp_path / "nothing")]) == 2


def test_upload_copies_a_dataset_that_then_verifies(tmp_path, capsys):
    images, labels = textured_dataset(tmp_path, 8)
    m = build_dataset(images, labels, tmp_path / "out", val_fraction=0.25, **QUIET)
    assert main(["upload", str(tmp_path / "out"), str(tmp_path / "copy")]) == 0
    assert Manifest.read(str(tmp_path / "copy")).to_dict() == m.to_dict()
    assert main(["verify", str(tmp_path / "copy")]) == 0
    assert main(["upload", str(tmp_path / "out"), str(tmp_path / "copy")]) != 0  # refuses to replace silently
