"""The manifest contract: versions this package does not know are refused, and validate() names every
inconsistency a hand-edited or half-written manifest can have."""
from __future__ import annotations

import copy
import json

import pytest

from shard_tools.manifest import ChannelStats, Manifest, ManifestError, ShardInfo, SplitInfo


def good() -> dict:
    return Manifest(
        classes=["a", "b"],
        splits={"train": SplitInfo(5, [3, 2], [ShardInfo("train-000000.tar", 3, 10, "0" * 64),
                                               ShardInfo("train-000001.tar", 2, 10, "1" * 64)]),
                "val": SplitInfo(1, [0, 1], [ShardInfo("val-000000.tar", 1, 10, "2" * 64)])},
        stats=ChannelStats([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 100),
        image_size=64, duplicate_groups=0,
    ).to_dict()


def test_a_good_manifest_round_trips():
    assert Manifest.from_dict(good()).to_dict() == good()


@pytest.mark.parametrize("version", [0, 3, None, "1"])
def test_unknown_versions_are_refused_with_what_to_do(version, tmp_path):
    d = good()
    d["version"] = version
    with pytest.raises(ManifestError, match=rf"manifest version {version} is not supported .* \(it reads 1 and 2\); rebuild"):
        Manifest.from_dict(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):  # read() names the file
        Manifest.read(str(tmp_path))


def test_not_a_manifest_is_refused():
    d = good()
    d["format"] = "something.else"
    with pytest.raises(ManifestError, match="not a shard_tools manifest"):
        Manifest.from_dict(d)
    with pytest.raises(ManifestError, match="malformed manifest"):
        Manifest.from_dict({k: v for k, v in good().items() if k != "stats"})


def _set(path: str, value):
    def edit(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d[int(k)] if k.isdigit() else d[k]
        d[int(last) if last.isdigit() else last] = value
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_set("classes", ["a", "a"]), "class names must be non-empty and unique"),
    (_set("classes", []), "class names must be non-empty and unique"),
    (_set("splits.val.class_counts", [1]), "split 'val': 1 class counts for 2 classes"),
    (_set("splits.train.class_counts", [3, 3]), "split 'train': class counts sum to 6, not 5"),
    (_set("splits.train.shards.1.num_samples", 1), "split 'train': shard sample counts do not add up to 5"),
    (_set("splits.train.shards.1.name", "train-000000.tar"), "split 'train': duplicate shard or index names"),
    (_set("splits.val.shards.0.name", "../val-000000.tar"), "split 'val': shard names must be plain file names"),
    (_set("splits.val.shards.0.name", ".hidden.tar"), "split 'val': shard names must be plain file names"),
    (lambda d: d["splits"].pop("train"), "there is no 'train' split"),
    (_set("stats.mean", [0.5, 0.5]), "stats need 3 channels (RGB)"),
    (_set("stats.mean", [127.0, 0.5, 0.5]), "stats out of range for 0-1 pixels"),
    (_set("stats.std", [0.2, 0.0, 0.2]), "stats out of range for 0-1 pixels"),
])
def test_validate_names_each_inconsistency(edit, expected):
    d = copy.deepcopy(good())
    edit(d)
    with pytest.raises(ManifestError, match="invalid manifest: ") as info:
        Manifest.from_dict(d, where="ds/manifest.json")
    assert str(info.value).startswith("ds/manifest.json: invalid manifest: ") and expected in str(info.value)


def test_write_refuses_an_invalid_manifest(tmp_path):
    m = Manifest.from_dict(good())
    m.splits["train"].num_samples = 4
    with pytest.raises(ManifestError, match="class counts sum to 5, not 4"):
        m.write(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()
