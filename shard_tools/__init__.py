"""shard_tools: images + a labels CSV -> WebDataset shards with a validated manifest and exact channel statistics.

    python -m shard_tools build --images DIR --labels CSV --out DIR     (see `python -m shard_tools -h`)

Python API: `shard_tools.build.build_dataset(...)` builds; `shard_tools.manifest.Manifest.read(location)` reads.
The heavy modules (PIL, webdataset, torch) are not imported here, so reading a manifest stays cheap.
"""
from shard_tools.manifest import Manifest, ManifestError

__all__ = ["Manifest", "ManifestError"]
