"""Copy a finished dataset folder to object storage or another folder, manifest.json last."""
from __future__ import annotations

import logging
import os

from shard_tools import transport
from shard_tools.errors import Error
from shard_tools.manifest import MANIFEST_NAME, Manifest, ManifestError, dataset_root
from shard_tools.redaction import redact

log = logging.getLogger("shard_tools.upload")


class UploadError(Error):
    """The destination refused the dataset, or a copy failed part-way (no manifest was written there then)."""


def upload_dataset(local_dir: str, dest: str, *, overwrite: bool = False) -> list[str]:
    """Copy a finished dataset folder to `dest` (s3://bucket/prefix, a folder, or another writable fsspec URL):
    the shards first, then the other files (_info json, skipped.csv), manifest.json last, so a reader that finds the
    manifest finds every shard it names. With `overwrite`, the old manifest is deleted before anything is replaced.
    Returns the file names in upload order."""
    order = files_to_upload(local_dir)
    root = dataset_root(dest)
    if not transport.is_url(root) and os.path.realpath(transport.local_path(root)) == os.path.realpath(local_dir):
        # --overwrite would delete the one manifest before copying it onto itself
        raise UploadError(f"{root} is the dataset being uploaded: give another destination")
    manifest_url = transport.join(root, MANIFEST_NAME)
    try:
        if transport.exists(manifest_url):
            if not overwrite:
                raise UploadError(f"{redact(root)} already holds a dataset ({MANIFEST_NAME}); pass --overwrite")
            transport.delete(manifest_url)  # readers stop seeing the old dataset before its shards are replaced
        for name in order:
            transport.put_file(os.path.join(local_dir, name), transport.join(root, name))
            log.info("uploaded %s", name)
    except (OSError, ValueError) as e:
        raise UploadError(f"upload to {redact(root)} failed: {redact(str(e))}") from e
    return order


def files_to_upload(local_dir: str) -> list[str]:
    """The dataset's file names in upload order: shards, other files, manifest.json. A folder without a valid
    manifest, or with shards that differ from it, is an unfinished build: refused."""
    manifest = Manifest.read(local_dir)
    shards = [sh for split in manifest.splits.values() for sh in split.shards]
    for sh in shards:
        path = os.path.join(local_dir, sh.name)
        if not os.path.isfile(path) or os.path.getsize(path) != sh.bytes:
            raise ManifestError(f"{path}: missing or not the {sh.bytes} bytes the manifest records; rebuild it")
    names = [sh.name for sh in shards]
    others = sorted(  # _info json files, skipped.csv, ...
        f for f in os.listdir(local_dir)
        if os.path.isfile(os.path.join(local_dir, f)) and f not in names + [MANIFEST_NAME] and not f.startswith(".")
    )
    return names + others + [MANIFEST_NAME]
