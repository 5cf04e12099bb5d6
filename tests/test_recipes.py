"""--config FILE.yaml: recipe files whose keys are the trainer's flags, parsed exactly like the command line, which
overrides them; the shipped recipes match the demo's and scripts/real_photos.py's settings."""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess

import pytest

from conftest import PYTHON, REPO, python_env
from distributed_train.config import Config, RecipeError, parse_args
from mushroom_demo.__main__ import TRAIN_FLAGS

PLACES = ["--data", "shards", "--run-dir", "run"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_recipe_is_the_demos_settings():
    from_file = parse_args(["--config", str(REPO / "recipes" / "demo.yaml"), *PLACES])
    # the demo's own defaults for the flags it passes separately: --epochs 40, --wandb offline
    assert from_file == parse_args([*TRAIN_FLAGS, "--epochs", "40", "--wandb", "offline", *PLACES])
    assert from_file != parse_args(PLACES), "the recipe changed nothing"


def test_the_real_photo_recipe_is_the_scripts_settings():
    cfg = parse_args(["--config", str(REPO / "recipes" / "real_photos.yaml"), *PLACES])
    recipe = load_script("real_photos").RECIPE
    assert {name: getattr(cfg, name) for name in recipe} == recipe
    defaults = Config(data="shards", run_dir="run")
    assert {f.name for f in dataclasses.fields(Config) if getattr(cfg, f.name) != getattr(defaults, f.name)} \
        <= set(recipe) | {"epochs"}, "the file sets something the script does not"


def test_command_line_flags_win_wherever_they_stand(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.5\nimage-size: 96\nbatch_size: 16\n")
    before = parse_args(["--lr", "0.1", "--config", str(recipe), *PLACES])
    after = parse_args(["--config", str(recipe), "--lr", "0.1", *PLACES])
    assert before == after
    assert (after.lr, after.image_size, after.batch_size) == (0.1, 96, 16)


def test_values_are_read_as_typed_on_a_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    # YAML 1.1 would read `on` as a boolean and 1e-3 as a string; here they are what --help says
    recipe.write_text("channels_last: on\nlr: 1e-3\nworkers: -1\ncompile: true\nsync-bn: no\ninit_from:\n"
                      "wandb: disabled  # a comment\n")
    cfg = parse_args(["--config", str(recipe), *PLACES])
    assert (cfg.channels_last, cfg.lr, cfg.workers, cfg.compile, cfg.sync_bn, cfg.init_from, cfg.wandb) == \
        ("on", 1e-3, -1, True, False, "", "disabled")
    assert parse_args(["--config", str(recipe), "--no-compile", *PLACES]).compile is False


def test_a_recipe_may_name_the_data_and_run_dir(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: shards\nrun_dir: runs/a\n")
    cfg = parse_args(["--config", str(recipe)])
    assert (cfg.data, cfg.run_dir) == ("shards", "runs/a")


@pytest.mark.parametrize("text, expected", [
    ("lr: 0.1\nlearning_rate: 0.2\n", "unknown key 'learning_rate': the keys are the trainer's flags"),
    ("batch_size: 0.5\n", "batch_size: '0.5' is not an int"),
    ("lr: fast\n", "lr: 'fast' is not a float"),
    ("compile: maybe\n", "compile: 'maybe' is not true or false"),
    ("epochs: [1, 2]\n", "epochs: expected one value, found a list"),
    ("- lr\n- 0.1\n", "expected `flag: value` lines, found a list"),
    ("lr: 0.1\n  bad indent: 2\n", "not valid YAML"),
    ("config: other.yaml\n", "unknown key 'config'"),
], ids=["unknown", "int", "float", "bool", "list", "not-a-mapping", "syntax", "nested-config"])
def test_a_bad_recipe_is_one_line_naming_file_and_key(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as e:
        parse_args(["--config", str(recipe), *PLACES])
    assert str(e.value).startswith(f"--config {recipe}: ") and expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_a_missing_recipe_through_the_command_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "distributed_train", "--config", str(tmp_path / "nope.yaml"), *PLACES],
                            env=python_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"distributed_train: error: --config {tmp_path / 'nope.yaml'}: No such file or directory"]


def test_the_imagenet_recipe_is_torchvisions_new_recipe_in_our_flags():
    import torch

    from distributed_train.config import resolve

    cfg = parse_args(["--config", str(REPO / "recipes" / "imagenet_resnet50.yaml"), *PLACES])
    cfg = resolve(cfg, device=torch.device("cpu"), world_size=8, local_ranks=8, train_samples=1_281_167)
    assert cfg.batch_size * 8 == 1024 and cfg.lr == 0.5 and cfg.max_steps == 600 * (1_281_167 // 1024)
    assert cfg.warmup_steps == 5 * (1_281_167 // 1024)  # --lr-warmup-epochs 5
    assert (cfg.image_size, cfg.eval_image_size, round(cfg.eval_image_size / cfg.eval_crop_pct)) == (176, 224, 232)
    assert (cfg.auto_augment, cfg.random_erase, cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.weight_decay) == \
        ("trivialaugment", 0.1, 0.2, 1.0, 0.1, 2e-5)
    # torchvision's EMA: decay 0.99998 adjusted to 1 - 2e-5 * 1024 * 32 / 600 per 32 steps
    per_32_steps = 1 - 2e-5 * 1024 * 32 / 600
    assert abs(cfg.ema_decay ** 32 - per_32_steps) < 1e-5  # 0.5% of 1 - decay
