"""The shards are readable by timm as they are: its WebDataset reader (`create_dataset("wds/...")`) finds the
splits and shard lengths in the `_info.json` that `shard_tools build` writes, and takes the labels from `cls`."""
from __future__ import annotations

import io

import numpy as np
import timm.data
from PIL import Image

from shard_fixtures import read_dataset, textured_dataset
from shard_tools.build import build_dataset


def test_timm_reads_a_built_dataset_as_it_is(tmp_path):
    images, labels = textured_dataset(tmp_path / "photos", 23, labels=("chanterelle", "morel", "porcini"))
    out = tmp_path / "shards"
    manifest = build_dataset(str(images), str(labels), str(out), val_fraction=0.3, shard_size=4, workers=1,
                             progress=False)
    ours = read_dataset(out, manifest)
    assert all(len(manifest.split(s).shards) >= 2 for s in ("train", "val")), "several shards per split"
    for split in ("train", "val"):
        dataset = timm.data.create_dataset("wds/mushrooms", root=str(out), split=split)
        samples = list(dataset)  # in shard order when not training
        assert len(samples) == manifest.split(split).num_samples == len(ours[split])
        assert [target for _, target in samples] == [s["cls"] for s in ours[split]]
        for (image, _), sample in zip(samples, ours[split]):
            with Image.open(io.BytesIO(sample["jpg"])) as stored:
                assert np.array_equal(np.asarray(image), np.asarray(stored.convert("RGB")))
        # training mode takes its epoch length from _info.json
        assert len(timm.data.create_dataset("wds/mushrooms", root=str(out), split=split, is_training=True)) == \
            manifest.split(split).num_samples
