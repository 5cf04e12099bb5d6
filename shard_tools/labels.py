"""The labels CSV -> rows to write (id, label, image path) or rows skipped with a reason, and the class order.

Layout (the seed's): a header line (optional: a first line whose id names an image is read as data), then one row
per image; the first column is the image id, the second its label, unless `id_column` / `label_column` name others.
Ids are read as strings (so `00042` stays `00042`), and resolve to `IMAGES/<id>` when the id already has an
extension, else `IMAGES/<id>.jpg` (or .jpeg/.png/.webp/.JPG/...). Ids may contain a sub-path inside IMAGES, but
never leave it.

Class order: the distinct labels sorted by name -- or by numeric value when every label is an integer, so a dataset
labelled 0..K-1 keeps its own meaning for each index (class "10" comes after "9", not after "1").
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shard_tools.errors import UsageError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".JPG", ".JPEG", ".PNG", ".WEBP")


class LabelsError(UsageError, ValueError):
    """The CSV or images folder cannot be used at all; the message is one line saying what to do."""


@dataclass(frozen=True)
class Skipped:
    row: int
    id: str
    reason: str


def read_labels(csv_path: str, id_column: str | None = None, label_column: str | None = None,
                images: "ImageFinder | None" = None) -> pd.DataFrame:
    """Two string columns `id`, `label`, indexed by CSV data row. With `images`, a CSV whose first line is already
    data (its first cell names an image there: `pandas.to_csv(header=False)` writes such files) is read without a
    header, so that row is not lost, and a note says so."""
    if not os.path.isfile(csv_path):
        raise LabelsError(f"labels CSV not found: {csv_path}")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
        first = str(df.columns[0]).strip() if len(df.columns) else ""
        if images is not None and id_column is None and label_column is None and images.find(first)[0]:
            print(f"note: {csv_path} has no header line (its first cell, '{first}', is an image in "
                  f"{images.images_dir}): every line is read as a row", file=sys.stderr)
            df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True, header=None)
    except pd.errors.EmptyDataError:
        raise LabelsError(f"{csv_path} is empty: expected a header line (e.g. 'id,label') "
                          "and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LabelsError(f"{csv_path} is not a readable CSV: {str(e).strip().splitlines()[0]}") from None
    columns = list(df.columns)
    if id_column is None and label_column is None and len(columns) < 2:
        raise LabelsError(
            f"{csv_path} needs two columns (image id, label) but has {len(columns)} ({', '.join(columns) or 'none'}); "
            "or name them with --id-column/--label-column"
        )
    id_col = id_column if id_column is not None else columns[0]
    label_col = label_column if label_column is not None else columns[1]
    missing = [c for c in (id_col, label_col) if c not in columns]
    if missing:
        wanted = ", ".join(repr(c) for c in missing)
        raise LabelsError(f"{csv_path} has no column {wanted} (it has: {', '.join(columns)})")
    if len(df) == 0:
        raise LabelsError(f"{csv_path} has a header but no rows: nothing to shard")
    return pd.DataFrame({"id": df[id_col].str.strip(), "label": df[label_col].str.strip()})


class ImageFinder:
    """Finds the file of an id. Each folder is listed once, so a CSV of millions of rows costs one directory scan,
    not a stat per candidate extension per row (this runs before any worker starts, so it bounds the speed-up)."""

    def __init__(self, images_dir: str):
        self.images_dir = images_dir
        self.root = os.path.abspath(images_dir)
        self._listings: dict[str, set[str]] = {}

    def _files(self, folder: str) -> set[str]:
        if folder not in self._listings:
            try:
                with os.scandir(folder) as entries:
                    self._listings[folder] = {e.name for e in entries if e.is_file()}
            except OSError:  # missing sub-folder: the ids in it are reported as not found
                self._listings[folder] = set()
        return self._listings[folder]

    def find(self, image_id: str) -> tuple[str | None, str | None]:
        """(path, None) for the file of `image_id`, or (None, reason)."""
        if not image_id:
            return None, "empty id"
        if os.path.isabs(image_id) or image_id.startswith(("/", "\\")):
            return None, "id is an absolute path; ids must be relative to the images folder"
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            base = os.path.normpath(os.path.join(self.root, image_id))
            # Checked on the id's text, not with symlinks resolved: a folder of links into a photo store is legitimate.
            if os.path.commonpath([self.root, base]) != self.root:
                return None, "id points outside the images folder"
            folder, name = os.path.split(base)
        else:
            folder, name = self.root, image_id
        candidates = ([name] if os.path.splitext(name)[1] else []) + [name + ext for ext in EXTENSIONS]
        files = self._files(folder)
        for candidate in candidates:
            if candidate in files:
                return os.path.join(folder, candidate), None
        for candidate in candidates:  # what a listing misses, e.g. another letter case on a case-insensitive disk
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate), None
        tried = image_id if os.path.splitext(image_id)[1] else f"{image_id}.jpg/.jpeg/.png/.webp"
        return None, f"image file not found: {tried} in {self.images_dir}"

    def find_all(self, ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """find() for a column of ids: (path or None, reason or None) arrays. Plain names (no sub-path) are looked up
        in the folder's listing column-wise, one candidate extension at a time; the rest go through find()."""
        paths = np.full(len(ids), None, dtype=object)
        plain = (~ids.str.contains(r"[/\\]") & (ids != "") & ~ids.isin([".", ".."])).to_numpy()
        has_ext = ids.str.lstrip(".").str.contains(".", regex=False).to_numpy()  # as os.path.splitext sees it
        listing = pd.Index(list(self._files(self.root)))  # its hash table is built once, for every candidate
        for suffix in ("",) + EXTENSIONS:
            todo = plain & (paths == None) & (has_ext if suffix == "" else True)  # noqa: E711 (elementwise)
            candidates = ids[todo] + suffix
            hit = listing.get_indexer(candidates) >= 0
            paths[np.flatnonzero(todo)[hit]] = (self.root + os.sep + candidates[hit]).to_numpy()
        reasons = np.full(len(ids), None, dtype=object)
        for i in np.flatnonzero(paths == None):  # noqa: E711 -- sub-paths, bad ids, files the listing misses
            paths[i], reasons[i] = self.find(ids.iat[i])
        return paths, reasons


def class_order(labels) -> list[str]:
    """Distinct labels in class-index order (see the module docstring)."""
    names = set(labels)
    try:
        return sorted(names, key=lambda name: (int(name), name))  # "1" and "01" both parse: keep them apart
    except ValueError:
        return sorted(names)


def load_rows(images_dir: str, csv_path: str, id_column: str | None = None, label_column: str | None = None):
    """-> (rows, skipped, total_rows): `rows` is a DataFrame (row, id, label, path) of the rows to encode, `skipped`
    the others with a reason; every CSV row is in exactly one of them. Column-wise, so millions of rows take seconds."""
    if not os.path.isdir(images_dir):
        raise LabelsError(f"images folder not found: {images_dir}")
    finder = ImageFinder(images_dir)
    df = read_labels(csv_path, id_column, label_column, images=finder)
    ids, labels = df["id"].reset_index(drop=True), df["label"].reset_index(drop=True)
    reasons = np.full(len(df), None, dtype=object)
    repeated = ids.duplicated(keep="first").to_numpy()
    if repeated.any():
        first_row = pd.Series(np.flatnonzero(~repeated), index=ids[~repeated].to_numpy())
        reasons[repeated] = [f"duplicate id (first seen in row {r})" for r in ids[repeated].map(first_row)]
    reasons[~repeated & (labels == "").to_numpy()] = "empty label"
    todo = np.flatnonzero(reasons == None)  # noqa: E711 (elementwise)
    paths, missing = finder.find_all(ids.iloc[todo].reset_index(drop=True))
    reasons[todo] = missing
    keep = np.flatnonzero(reasons == None)  # noqa: E711
    found = np.full(len(df), None, dtype=object)
    found[todo] = paths
    rows = pd.DataFrame({"row": keep, "id": ids.iloc[keep].to_numpy(), "label": labels.iloc[keep].to_numpy(),
                         "path": found[keep]})
    bad = np.flatnonzero(reasons != None)  # noqa: E711
    skipped = [Skipped(int(i), image_id, reason) for i, image_id, reason in zip(bad, ids.iloc[bad], reasons[bad])]
    if rows.empty:
        first = skipped[0]
        raise LabelsError(
            f"none of the {len(df)} rows of {csv_path} has a usable image in {images_dir} "
            f"(row {first.row}, id '{first.id}': {first.reason})"
        )
    return rows, skipped, len(df)
