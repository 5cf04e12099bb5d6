"""Shipping a trained classifier: ONNX and TorchScript exports checked against the trainer's own model on real
photos, the README's onnxruntime snippet, and checkpoints and the dataset as artifacts of an offline W&B run.

One short training run (from a recipe file, with a flag overriding it) makes the checkpoint every test exports."""
from __future__ import annotations

import base64
import glob
import hashlib
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image

from conftest import CLASSES, PYTHON, REPO, SHARED_DATA, python_env, write_dataset
from distributed_train import export
from distributed_train.data import EVAL_RESIZE_RATIO, Preprocess, normalize, stats_tensors
from distributed_train.model import build_model
from wandb_records import records

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

IMAGE_SIZE = 48
# Two of each species (labels.csv lists the photos class by class).
PHOTOS = [SHARED_DATA / "images" / f"{i:05d}.jpg" for i in (3, 450, 600, 800, 900, 1300, 1400, 1650)]


def needs_photos(test):
    skip = pytest.mark.skipif(not all(p.exists() for p in PHOTOS),
                              reason=f"real photos not found in {SHARED_DATA} (CI clones ../shared beside the repo)")
    return pytest.mark.realdata(skip(test))


TOLERANCE = 1e-4

RECIPE = f"""\
arch: resnet26
width: 0.25
image-size: {IMAGE_SIZE}        # dashes or underscores
batch_size: 8
max_steps: 3
checkpoint_every: 1
lr: 0.01                # overridden on the command line
ema_decay: 0.9
workers: 0
wandb: offline
wandb_log_model: best
"""


@pytest.fixture(scope="module")
def run(uneven_shards, tmp_path_factory) -> Path:
    """3 steps with an EMA, checkpoints at every step, W&B offline logging the best checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(RECIPE)
    # W&B stages artifact files in its data folder until `wandb sync`: a temporary one, not the user's
    env = {**python_env(), "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_CACHE_DIR": str(tmp / "wandb-data/cache")}
    result = subprocess.run([PYTHON, "-m", "distributed_train", "--data", str(uneven_shards), "--run-dir",
                             str(tmp / "run"), "--config", str(recipe), "--lr", "0.2"],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def state(run) -> dict:
    return torch.load(run / "checkpoints" / "best.pt", weights_only=True)


def exported(run: Path, folder: Path, fmt: str, name: str) -> Path:
    out = folder / name
    assert export.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", fmt, "--out",
                        str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory) -> Path:
    return exported(run, tmp_path_factory.mktemp("onnx"), "onnx", "model.onnx")


@pytest.fixture(scope="module")
def torchscript_file(run, tmp_path_factory) -> Path:
    return exported(run, tmp_path_factory.mktemp("torchscript"), "torchscript", "model.pt")


@pytest.fixture(scope="module")
def scripted(torchscript_file):
    return torch.jit.load(str(torchscript_file))  # once: TorchScript's first calls profile and optimise the graph


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The real photos as evaluation sees them: decoded, resized, centre-cropped, uint8 [N, 3, S, S]."""
    preprocess = Preprocess(train=False, image_size=IMAGE_SIZE)
    return torch.stack([preprocess.transform(decode_image(str(p), mode=ImageReadMode.RGB)) for p in PHOTOS])


def trainer_logits(state: dict, weights: str, images: torch.Tensor) -> np.ndarray:
    """What the trainer's validation computes: the EMA model (or the trained one) on normalised uint8 images."""
    meta = state["meta"]
    model = build_model(meta["arch"], len(meta["classes"]), width=meta["width"])
    if weights == "ema":
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"})
    else:
        model.load_state_dict(state["model"])
    mean, std = stats_tensors(meta["mean"], meta["std"], "cpu")
    with torch.no_grad():
        return model.eval()(normalize(images, mean, std)).numpy()


def as_input(images: torch.Tensor) -> np.ndarray:
    return (images.float() / 255).numpy()


@needs_photos
def test_onnxruntime_gives_the_trainers_logits_on_real_photos(onnx_file, state, photos):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    expected = trainer_logits(state, "ema", photos)
    assert np.ptp(expected, axis=0).max() > 0.1, "the photos give near-identical logits: the test would prove little"
    batch = session.run(["logits"], {"images": as_input(photos)})[0]
    np.testing.assert_allclose(batch, expected, atol=TOLERANCE, rtol=0)
    single = session.run(["logits"], {"images": as_input(photos[2:3])})[0]  # the batch axis is dynamic
    np.testing.assert_allclose(single, expected[2:3], atol=TOLERANCE, rtol=0)


@needs_photos
def test_torchscript_gives_the_trainers_logits_on_real_photos(scripted, state, photos):
    expected = trainer_logits(state, "ema", photos)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(as_input(photos))).numpy(), expected, atol=TOLERANCE,
                                   rtol=0)
        np.testing.assert_allclose(scripted(torch.from_numpy(as_input(photos[:1]))).numpy(), expected[:1],
                                   atol=TOLERANCE, rtol=0)


@needs_photos
def test_the_exports_hold_the_ema_weights_not_the_trained_ones(onnx_file, scripted, state, photos):
    ema, trained = trainer_logits(state, "ema", photos), trainer_logits(state, "model", photos)
    assert np.abs(ema - trained).max() > 100 * TOLERANCE, "the EMA is too close to the weights to tell them apart"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        from_script = scripted(torch.from_numpy(as_input(photos))).numpy()
    for logits in (session.run(["logits"], {"images": as_input(photos)})[0], from_script):
        assert np.abs(logits - ema).max() < TOLERANCE
        assert np.abs(logits - trained).max() > 100 * TOLERANCE


def test_metadata_round_trips_through_both_formats(onnx_file, torchscript_file):
    expected = {"classes": json.dumps(CLASSES), "image_size": str(IMAGE_SIZE),
                "resize": str(round(IMAGE_SIZE / EVAL_RESIZE_RATIO)), "arch": "resnet26 x0.25", "ema": "true"}
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert {k: props.get(k) for k in expected} == expected
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == CLASSES
    extra = {k: "" for k in expected}
    torch.jit.load(str(torchscript_file), _extra_files=extra)
    assert {k: v.decode() for k, v in extra.items()} == expected


@needs_photos
def test_the_readme_snippet_classifies_a_photo_with_onnxruntime_alone(onnx_file, state, capsys):
    readme = (REPO / "README.md").read_text()
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "InferenceSession" in block]
    assert "distributed_train" not in snippet and "torch" not in snippet
    photo = PHOTOS[1]
    code = snippet.replace('"mushrooms.onnx"', repr(str(onnx_file))).replace('"photo.jpg"', repr(str(photo)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # Pillow's resize is not torchvision's to the last bit: close to the trainer's logits, not equal; a resize to
    # another size or a crop elsewhere lands well outside this margin.
    preprocess = Preprocess(train=False, image_size=IMAGE_SIZE)
    expected = trainer_logits(state, "ema", preprocess.transform(decode_image(str(photo), mode=ImageReadMode.RGB))[None])
    assert namespace["x"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(namespace["logits"] - expected[0]).max() < 0.01 * np.abs(expected).max()
    assert capsys.readouterr().out.split()[0] in {name.split()[0] for name in CLASSES}


def test_bad_input_is_one_line_and_exit_code_2(run, tmp_path, capsys):
    best = str(run / "checkpoints" / "best.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save(build_model("resnet26", 3, width=0.25).state_dict(), tmp_path / "plain.pth")
    (tmp_path / "folder.onnx").mkdir()
    cases = {
        "no checkpoint at": ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")],
        "cannot load checkpoint": ["--checkpoint", str(tmp_path / "notes.pt"), "--out", str(tmp_path / "m.onnx")],
        "is not a checkpoint of this trainer": ["--checkpoint", str(tmp_path / "plain.pth"), "--out",
                                                str(tmp_path / "m.onnx")],
        "argument --format: invalid choice: 'tflite'": ["--checkpoint", best, "--format", "tflite", "--out",
                                                        str(tmp_path / "m.tflite")],
        "cannot write --out": ["--checkpoint", best, "--out", str(tmp_path / "no" / "such" / "dir" / "m.onnx")],
        "it is a folder": ["--checkpoint", best, "--out", str(tmp_path / "folder.onnx")],
    }
    for expected, argv in cases.items():
        try:
            code = export.main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, f"{expected}: exit code {code}"
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx", "notes.pt", "plain.pth"], "no file left"


# ---- W&B artifacts ---------------------------------------------------------------------------------------------
def artifacts(run_dir: Path) -> list:
    [run_file] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    return [r.artifact for r in records(run_file) if r.WhichOneof("record_type") == "artifact"]


def md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def model_versions(run_dir: Path) -> list[tuple[int, list[str], str]]:
    """(step, aliases, md5 of the file) of each logged model version, in order."""
    out = []
    for a in artifacts(run_dir):
        if a.type == "model":
            [entry] = a.manifest.contents
            assert entry.path == "checkpoint.pt"
            out.append((json.loads(a.metadata)["step"], sorted(a.aliases), entry.digest))
    return out


def test_the_dataset_manifest_is_an_artifact_the_run_uses(run, uneven_shards):
    [dataset] = [a for a in artifacts(run) if a.type == "dataset"]
    assert dataset.name == uneven_shards.name and dataset.use_after_commit, "used by the run, not produced by it"
    [entry] = dataset.manifest.contents
    assert entry.path == "manifest.json"
    logged = json.loads(Path(entry.local_path).read_text())  # W&B's staged copy, uploaded by `wandb sync`
    assert logged == json.loads((uneven_shards / "manifest.json").read_text())
    assert json.loads(dataset.metadata)["location"] == str(uneven_shards)


def test_best_logs_the_checkpoint_that_became_best_pt(run, state):
    # checkpoints at steps 1, 2 and 3; validation only at the end (step 3): one version, the best one
    [(step, aliases, digest)] = model_versions(run)
    assert step == 3 == state["step"] and "best" in aliases and "step-3" in aliases
    assert digest == md5(run / "checkpoints" / "step-00000003.pt")
    [model] = [a for a in artifacts(run) if a.type == "model"]
    assert model.name == f"model-{state['meta']['wandb_id']}"
    assert json.loads(model.metadata)["best_val_top1"] == pytest.approx(state["best_top1"])


def test_recipe_settings_and_the_overriding_flag_are_saved_in_config_json(run):
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 0.2, "the command line wins over the recipe"
    assert (config["image_size"], config["ema_decay"], config["max_steps"]) == (IMAGE_SIZE, 0.9, 3)
    assert config["wandb_log_model"] == "best"


TINY = ["--arch", "resnet26", "--width", "0.125", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--max-steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "5", "--wandb", "offline"]


@pytest.fixture(scope="module")
def train_only_runs(tmp_path_factory) -> dict[str, Path]:
    """--wandb-log-model all and best on a dataset without a validation split (no checkpoint ever becomes best.pt):
    two single-threaded runs side by side."""
    tmp = tmp_path_factory.mktemp("train-only")
    write_dataset(tmp / "data", {"train": [16]})
    env = {**python_env(), "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_CACHE_DIR": str(tmp / "wandb-data/cache")}
    procs = {mode: subprocess.Popen([PYTHON, "-m", "distributed_train", "--data", str(tmp / "data"), "--run-dir",
                                     str(tmp / mode), *TINY, "--wandb-log-model", mode], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode in ("all", "best")}
    for proc in procs.values():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
    return {mode: tmp / mode for mode in procs}


def test_all_logs_every_checkpoint(train_only_runs):
    run_dir = train_only_runs["all"]
    versions = model_versions(run_dir)
    assert sorted({step for step, _, _ in versions}) == [1, 2]
    assert all(f"step-{step}" in aliases and "best" not in aliases for step, aliases, _ in versions)
    # the last step is saved twice (its step, then the end of the epoch): the later save is the file kept
    last_digest = {step: digest for step, _, digest in versions}
    assert last_digest == {step: md5(run_dir / "checkpoints" / f"step-{step:08d}.pt") for step in (1, 2)}


def test_best_without_validation_logs_the_last_checkpoint(train_only_runs):
    run_dir = train_only_runs["best"]
    [(step, aliases, digest)] = model_versions(run_dir)
    assert step == 2 and "best" not in aliases
    assert digest == md5(run_dir / "checkpoints" / "latest.pt")
