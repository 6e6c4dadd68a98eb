"""Feature cache: run the frozen encoder once over a prepared dataset and keep the grid features on disk.

A store is a directory: `features.json` describing what produced the rows (encoder name and weights sha256,
grid, image size, a fingerprint of the image list, the dtype) and how they are laid out, and one or more shards,
each a pair of .npy files holding a contiguous slice of rows: `features.npy` (n, P, E) float16 (or float32) in
the order of the prepared dataset's images and `done.npy` (n,) uint8 marking finished rows. A store made by one
process has one shard with those names; under torchrun each rank fills shards of its own
(`features-00001-of-00004.npy`...), on one machine or several, and the shard files moved into one directory
are the whole store. Rows are written and flushed before they are marked done, so an interrupted run resumes
where it stopped. Training and evaluation then read rows from disk as they need them (`FeatureStore`), or
load a store that fits into memory, instead of running a ResNet per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from show_attend_tell.config import ModelConfig, write_atomically
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import FastEncoder
from show_attend_tell.images import load_image
from show_attend_tell.inference import image_features
from show_attend_tell.locks import hold, release, waiting_for
from show_attend_tell.model import Encoder
from show_attend_tell.stages import check_stage, run_from, stage_shape

if TYPE_CHECKING:
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.prepare import PreparedDataset

FEATURES_FILE = "features.npy"
DONE_FILE = "done.npy"
META_FILE = "features.json"
# What a features.json written before a key existed means by its absence.
LEGACY_META = {"encoder_precision": "fp32"}


def native_grid_size(config: ModelConfig) -> int:
    """Side of the grid the ResNet trunk itself gives at config.image_size (stride 32: 7 at 224 px, 14 at 448)."""
    return stage_shape(config, "layer4.0")[0]


def check_grid(config: ModelConfig) -> None:
    """Refuse a grid finer than the trunk's own: pooling 7x7 to 14x14 would copy each cell into four, not see more."""
    native = native_grid_size(config)
    if config.grid_size > native:
        raise InputError(
            f"--grid-size {config.grid_size} is finer than the {native}x{native} grid {config.encoder} gives at "
            f"--image-size {config.image_size}; it would only stretch the {native}x{native} map. Use --image-size "
            f"{32 * config.grid_size} for a {config.grid_size}x{config.grid_size} grid, or --grid-size {native} or less"
        )


def images_fingerprint(paths: list[Path]) -> str:
    """sha256 of the ordered image list: row i of a store belongs to image i of exactly this list."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\n")
    return digest.hexdigest()


def expected_meta(
    config: ModelConfig, paths: list[Path], encoder_sha256: str, stage: str = "", precision: str | None = None
) -> dict:
    """What features.json must say. stage="" is the grid features; a residual block name (e.g. layer4.0) is
    that block's output, (N, h*w, C), for fine-tuning the blocks after it without rerunning the rest.
    precision: the encoder's (fast_encoder.py), required when filling a store so that one store never mixes
    precisions; None accepts any (training reads a store of any precision)."""
    meta = {
        "format_version": 1,
        "encoder": config.encoder,
        "encoder_sha256": encoder_sha256,
        "image_size": config.image_size,
        "grid_size": config.grid_size,
        "shape": [len(paths), config.grid_size**2, config.encoder_dim],
        "images_fingerprint": images_fingerprint(paths),
    }
    if stage:
        side, channels = stage_shape(config, stage)
        meta.update(stage=stage, shape=[len(paths), side * side, channels])
    if precision is not None:
        meta["encoder_precision"] = precision
    return meta


def read_meta(directory: str | Path) -> dict:
    """A store's features.json."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise InputError(f"{directory}: no feature store here ({META_FILE} missing); run `sat features` first")
    try:
        return json.loads(meta_path.read_text())
    except ValueError as error:
        raise InputError(f"{meta_path}: not valid JSON ({error})") from None


def store_settings(directory: str | Path) -> dict:
    """The ModelConfig fields a store fixes (those its features.json records): encoder, image_size, grid_size."""
    meta = read_meta(directory)
    return {key: meta[key] for key in ("encoder", "image_size", "grid_size") if key in meta}


def store_stage(directory: str | Path) -> str:
    """The stage a store holds ("" for grid features)."""
    return read_meta(directory).get("stage", "")


def store_precision(directory: str | Path) -> str:
    """The precision of the encoder that filled a store (fp32 for stores older than the key)."""
    return read_meta(directory).get("encoder_precision", LEGACY_META["encoder_precision"])


def load_for_model(
    directory: str | Path, config: ModelConfig, paths: list[Path], encoder_sha256: str, encoder: Encoder | None
) -> tuple[FeatureStore, str]:
    """A complete store that fits a model -> (store, stage): grid features for a frozen encoder, or the
    output of a block before every fine-tuned one (run the rest with `stages.run_from(encoder, features, stage)`).
    The store reads rows from disk when indexed; `store.load()` holds it all in memory instead."""
    stage = store_stage(directory)
    if config.fine_tune_blocks and not stage:
        raise InputError(
            f"{directory}: holds grid features of the pretrained encoder, but the model fine-tuned "
            f"{' '.join(config.fine_tune_blocks)}; give a store of an earlier block's output "
            "(sat features --stage layer4.0) or images"
        )
    if stage:
        try:
            check_stage(encoder, stage)
        except ValueError as error:
            raise InputError(f"{directory}: {error}") from None
    store = open_store(directory, expected_meta(config, paths, encoder_sha256, stage))
    store.check_complete()
    return store, stage


def photo_features(
    encoder: Encoder | FastEncoder,
    config: ModelConfig,
    paths: Sequence[Path],
    device: str | torch.device = "cpu",
    *,
    stage: str = "",
) -> torch.Tensor:
    """Photo files -> (B, P, E) encoder features (or block `stage`'s output), each photo decoded as captioning
    decodes it (images.load_image) and encoded by inference.image_features."""
    return image_features(encoder, [load_image(path) for path in paths], config, device, stage=stage)


def dataset_features(
    model: CaptionModel,
    dataset: PreparedDataset,
    store: str | Path | None = None,
    encoder_sha256: str = "",
    device: str | torch.device = "cpu",
) -> Callable[[Sequence[int]], torch.Tensor]:
    """The one way from a prepared dataset's image rows to their features: a function `rows` -> (B, P, E). With
    `store` (from `sat features`, checked against the model by load_for_model) the rows are read from it, a block's
    output run through the rest of the encoder, in the store's dtype; else the model's encoder runs on the photos."""
    if not store:
        return lambda rows: photo_features(model.encoder, model.config, [dataset.images[i].path for i in rows], device)
    paths = [image.path for image in dataset.images]
    features, stage = load_for_model(store, model.config, paths, encoder_sha256, model.encoder)
    if not stage:
        return features.__getitem__

    @torch.no_grad()
    def from_stage(rows: Sequence[int]) -> torch.Tensor:
        return run_from(model.encoder, features[rows].float(), stage)

    return from_stage


def _check_meta(directory: Path, found: dict, expected: dict) -> None:
    for key, value in expected.items():
        if found.get(key, LEGACY_META.get(key)) != value:
            raise InputError(
                f"{directory / META_FILE}: {key} is {found.get(key)!r} but {value!r} was expected; "
                "these features belong to another dataset, --limit, encoder or encoder precision (use a new --out "
                "or --overwrite)"
            )


def shard_layout(rows: int, shards: int) -> list[dict]:
    """Contiguous row slices of about equal size, one per shard: [{features, done, start, stop}]. A one-shard
    store keeps the names of format 1 (features.npy, done.npy)."""
    if shards < 1 or shards > max(1, rows):
        raise InputError(f"--shards must be from 1 to the number of images ({rows}), got {shards}")
    bounds = np.linspace(0, rows, shards + 1).round().astype(int).tolist()
    if shards == 1:
        return [{"features": FEATURES_FILE, "done": DONE_FILE, "start": 0, "stop": rows}]
    return [
        {
            "features": f"features-{i:05d}-of-{shards:05d}.npy",
            "done": f"done-{i:05d}-of-{shards:05d}.npy",
            "start": bounds[i],
            "stop": bounds[i + 1],
        }
        for i in range(shards)
    ]


def _shards(meta: dict, directory: Path) -> list[dict]:
    """The shard list of a store's meta (format 1 stores have one implicit shard), each file checked to be a
    .npy file of the store itself: features.json is read before anything is opened or removed."""
    shards = meta.get("shards") or shard_layout(meta["shape"][0], 1)
    for shard in shards if isinstance(shards, list) else [shards]:
        names = [shard.get(key) for key in ("features", "done")] if isinstance(shard, dict) else [shard]
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npy") or name[0] == ".":
                raise InputError(
                    f"{directory / META_FILE}: shard file {name!r:.60} is not the name of a .npy file in the store"
                )
    return shards


class FeatureStore:
    """A feature store opened read-only: rows (N, P, E) in one or several shard files, read from disk on demand.

    Indexing reads just the rows asked for (`os.preadv` into a fresh array; runs of consecutive rows in one
    call), so memory is bounded by the batch, not by the store: COCO's 14x14 store is 99 GB in fp16. The pages
    read stay in the kernel's page cache, not in this process, which is why rows are not read through a
    memory map (mapped pages count towards the process's RSS until the kernel reclaims them). Shards are files
    that torchrun ranks (on one machine or several) filled side by side; they are read where they lie.
    """

    def __init__(self, directory: Path, meta: dict):
        self.directory = directory
        self.meta = meta
        self._files: dict[int, int] = {}  # shard -> file descriptor, opened on first read (per process)
        self.shards = _shards(meta, directory)
        rows, per_row = meta["shape"][0], tuple(meta["shape"][1:])
        self.shape = (rows, *per_row)
        if [s["start"] for s in self.shards] != [0] + [s["stop"] for s in self.shards[:-1]] or (
            self.shards[-1]["stop"] != rows
        ):
            raise InputError(f"{directory / META_FILE}: shards do not cover rows 0-{rows} in order")
        self._arrays = []  # per shard: (features file, its header's length)
        self.dtype: np.dtype | None = None
        done = []
        for shard in self.shards:
            features = self._open_array(shard["features"], (shard["stop"] - shard["start"], *per_row))
            flags = self._open_array(shard["done"], (shard["stop"] - shard["start"],))
            if flags.dtype != np.uint8:
                raise InputError(f"{directory / shard['done']}: dtype {flags.dtype}, expected uint8")
            self._arrays.append((directory / shard["features"], features.offset))
            done.append(np.array(flags))
            if self.dtype is None:
                self.dtype = features.dtype
            elif features.dtype != self.dtype:
                raise InputError(f"{directory / shard['features']}: dtype {features.dtype}, other shards {self.dtype}")
        stored = meta.get("dtype", str(self.dtype))
        if stored not in STORE_DTYPES or np.dtype(stored) != self.dtype:
            raise InputError(f"{directory / META_FILE}: dtype {stored!r:.40} but the shard files hold {self.dtype}")
        self.done = np.concatenate(done)  # (N,) 1 for finished rows
        self.starts = np.array([s["start"] for s in self.shards])
        self.row_bytes = int(np.prod(per_row)) * self.dtype.itemsize

    def _open_array(self, name: str, shape: tuple) -> np.memmap:
        path = self.directory / name
        if not path.is_file():
            hint = ""
            if len(self.shards) > 1:
                hint = (
                    "; it is written by the torchrun rank that runs this shard: copy it here from that machine, or "
                    "rerun `sat features` with the same --out to compute it"
                )
            raise InputError(f"{path}: missing{hint}")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable .npy array ({error})") from None
        if array.shape != shape:
            raise InputError(f"{path}: shape {list(array.shape)} does not match {META_FILE}, which says {list(shape)}")
        return array

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    def check_complete(self) -> None:
        """Refuse a store with rows not computed yet, naming the shard files they are in."""
        missing = int((self.done == 0).sum())
        if missing:
            incomplete = [s["features"] for s in self.shards if not self.done[s["start"] : s["stop"]].all()]
            raise InputError(
                f"{self.directory}: {missing} of {len(self.done)} images have no features yet "
                f"(in {', '.join(incomplete)}); rerun `sat features`"
            )

    def _descriptor(self, shard: int) -> int:
        if shard not in self._files:
            self._files[shard] = os.open(self._arrays[shard][0], os.O_RDONLY)
        return self._files[shard]

    def __getitem__(self, rows) -> torch.Tensor:
        """Rows (a list or 1-d tensor of row numbers, any order, repeats allowed) -> (B, P, E) in the store's
        dtype, read from disk."""
        rows = np.asarray(rows.tolist() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range for a store of {len(self)} images")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        order = np.argsort(rows, kind="stable")
        flat = out.reshape(len(rows), self.row_bytes // self.dtype.itemsize)
        position = 0
        while position < len(order):
            # a run of consecutive rows in one shard: one read into consecutive places of a sorted buffer
            first = rows[order[position]]
            shard = int(np.searchsorted(self.starts, first, side="right") - 1)
            stop = self.shards[shard]["stop"]
            end = position + 1
            while end < len(order) and rows[order[end]] == rows[order[end - 1]] + 1 and rows[order[end]] < stop:
                end += 1
            self._read(shard, first - self.shards[shard]["start"], [flat[i] for i in order[position:end]])
            position = end
            while position < len(order) and rows[order[position]] == rows[order[position - 1]]:
                flat[order[position]] = flat[order[position - 1]]  # a repeated row
                position += 1
        return torch.from_numpy(out)

    def _read(self, shard: int, local_row: int, buffers: list[np.ndarray]) -> None:
        path, offset = self._arrays[shard]
        start = offset + local_row * self.row_bytes
        wanted = self.row_bytes * len(buffers)
        got = os.preadv(self._descriptor(shard), [memoryview(b).cast("B") for b in buffers], start)
        while got < wanted:  # preadv may stop early (signals, huge requests); continue where it stopped
            row, within = divmod(got, self.row_bytes)
            views = [memoryview(buffers[row]).cast("B")[within:]] + [
                memoryview(b).cast("B") for b in buffers[row + 1 :]
            ]
            more = os.preadv(self._descriptor(shard), views, start + got)
            if more == 0:
                raise InputError(f"{path}: ends early; the file is truncated")
            got += more

    def load(self, progress: bool = False) -> torch.Tensor:
        """The whole store as one (N, P, E) tensor in memory, read shard by shard."""
        out = torch.empty(self.shape, dtype=torch.from_numpy(np.empty(0, self.dtype)).dtype)
        chunk = max(1, (64 << 20) // self.row_bytes)
        with tqdm(total=len(self), desc="loading features", unit="img", disable=not progress) as bar:
            for start in range(0, len(self), chunk):
                rows = list(range(start, min(len(self), start + chunk)))
                out[start : start + len(rows)] = self[rows]
                bar.update(len(rows))
        return out

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # a DataLoader worker opens its own descriptors

    def __del__(self):
        self.close()


def open_store(directory: str | Path, expected: dict | None = None) -> FeatureStore:
    """Open a store read-only, verified: `expected` (from `expected_meta`) is compared key by key, every shard
    file must be there with the shape features.json gives it. Rows may still be missing (see `done`)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if expected is not None:
        _check_meta(directory, meta, expected)
    return FeatureStore(directory, meta)


def load_features(directory: str | Path, expected: dict | None = None) -> torch.Tensor:
    """The complete store as one (N, P, E) tensor in memory; refuses a store with missing rows."""
    store = open_store(directory, expected)
    store.check_complete()
    return store.load()


def _write_meta(directory: Path, meta: dict) -> None:
    write_atomically(directory / META_FILE, lambda path: Path(path).write_text(json.dumps(meta, indent=2) + "\n"))


def remove_store(directory: str | Path) -> None:
    """Delete a store's features.json and the shard files it lists (`sat features --overwrite`); refused while
    another process fills one of them."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    with waiting_for(directory / SETUP_LOCK):
        try:
            shards = _shards(read_meta(directory), directory)
        except InputError:  # no store here, or another rank sharing this disk removed it first
            return
        with _lock_shards(directory, shards):
            for shard in shards:
                for key in ("features", "done"):
                    (directory / shard[key]).unlink(missing_ok=True)
            (directory / META_FILE).unlink(missing_ok=True)


# Writers of a store: each process locks the shards it fills for as long as it fills them (torchrun's ranks fill
# different shards side by side), and sets the store up (features.json, new shard files) one at a time.
SETUP_LOCK = ".features.json.lock"


def _lock_shards(directory: Path, shards: list[dict]) -> contextlib.ExitStack:
    """Locks on the shards' files, let go when the returned stack closes (or when one is refused)."""
    with contextlib.ExitStack() as held:
        for shard in shards:
            lock = hold(
                directory / f".{shard['features']}.lock",
                str(directory / shard["features"]),
                "wait for it to end, or use another --out",
            )
            held.callback(release, lock)
        return held.pop_all()


def _create_shard(directory: Path, shard: dict, per_row: tuple, dtype: str) -> None:
    rows = shard["stop"] - shard["start"]
    # each file is made under a temporary name: it is either complete (zeros, nothing done) or not there
    for key, shape, kind in (("features", (rows, *per_row), dtype), ("done", (rows,), "uint8")):
        write_atomically(
            directory / shard[key],
            lambda path, shape=shape, kind=kind: np.lib.format.open_memmap(path, mode="w+", dtype=kind, shape=shape),
        )


STORE_DTYPES = ("float16", "float32")


@torch.no_grad()
def store_encoder(config: ModelConfig, stage: str, precision: str, device: str | torch.device) -> FastEncoder:
    """The pretrained encoder that fills a store for `config` (its encoder, image size and a checked grid), in
    `precision` (fast_encoder.resolve_precision; int8 needs a model's calibration, so a store is bf16 or fp32), up
    to residual block `stage` when given (ValueError naming it when the encoder has no such block)."""
    check_grid(config)
    encoder = Encoder(config)
    if stage:
        check_stage(encoder, stage)
    return FastEncoder(encoder, precision)


def fill_store(
    paths: list[Path], directory: str | Path, *, overwrite: bool = False, rank: int = 0, world_size: int = 1, **options
) -> dict:
    """extract_features for one rank of `world_size` (torchrun: every rank calls it): with `overwrite` each rank
    removes its machine's copy of the store before a barrier, so that none finds a store another is about to
    remove. Returns the summary of every rank together (images, rows computed, failed files)."""
    if overwrite:
        remove_store(directory)  # the same files on every rank when the disk is shared
    if world_size > 1:
        torch.distributed.barrier()
    summary = extract_features(paths, directory, rank=rank, world_size=world_size, **options)
    if world_size == 1:
        return summary
    summaries: list[dict | None] = [None] * world_size
    torch.distributed.all_gather_object(summaries, summary)  # the failures of every rank, reported once
    return {
        "images": summary["images"],
        "computed": sum(part["computed"] for part in summaries),
        "failed": {k: v for part in summaries for k, v in part["failed"].items()},
    }


def extract_features(
    paths: list[Path],
    directory: str | Path,
    *,
    config: ModelConfig,
    encoder: Encoder | FastEncoder,
    encoder_sha256: str,
    batch_size: int = 16,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    shards: int = 0,
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    progress: bool = True,
    stage: str = "",
) -> dict:
    """Fill (or resume filling) the store at `directory` with encoder(image) for every path, or with the
    output of residual block `stage` (see expected_meta), in the encoder's precision (model.Encoder: fp32; a
    fast_encoder.FastEncoder: its own), which the store records.

    The store is `shards` files of contiguous rows (0: one per rank); rank r of `world_size` fills shards r,
    r + world_size, ... . Every rank writes the same features.json and creates its own shard files, so ranks
    on machines that share no disk each fill a directory of their own, and moving the shard files into one
    directory merges them (nothing is rewritten). A store that exists keeps its layout, whatever the number of
    ranks now. Rows are flushed before they are marked done, so an interrupted run resumes where it stopped.
    `overwrite` removes the store first (one process; under torchrun `sat features --overwrite` has each rank
    remove it before a barrier). Returns a summary (images, rows computed, failed files).
    """
    directory = Path(directory)
    if overwrite:
        remove_store(directory)
    if dtype not in STORE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    meta = expected_meta(config, paths, encoder_sha256, stage, getattr(encoder, "precision", "fp32"))
    directory.mkdir(parents=True, exist_ok=True)
    with waiting_for(directory / SETUP_LOCK):
        fresh = not (directory / META_FILE).is_file()
        if fresh:
            meta.update(dtype=dtype, shards=shard_layout(len(paths), shards or world_size))
        else:
            found = read_meta(directory)
            _check_meta(directory, found, meta)
            meta = found
        layout = _shards(meta, directory)
        mine = [layout[index] for index in range(rank, len(layout), world_size)]
        held = _lock_shards(directory, mine)  # before anything is written: a refused writer changes nothing
        if fresh:
            _write_meta(directory, meta)
        per_row = tuple(meta["shape"][1:])
        for shard in mine:
            if not (directory / shard["done"]).is_file():
                _create_shard(directory, shard, per_row, meta.get("dtype", "float16"))
    with held:  # until every row of this process is written
        encoder = encoder.to(device).eval()
        failed: dict[str, str] = {}
        work = []  # (shard, its pending rows as store rows)
        for shard in mine:
            done = np.load(directory / shard["done"], mmap_mode="r")
            work.append((shard, (np.flatnonzero(done == 0) + shard["start"]).tolist()))
        total = sum(len(pending) for _, pending in work)
        description = f"features (rank {rank} of {world_size})" if world_size > 1 else "features"
        bar = tqdm(total=total, desc=description, unit="img", disable=not progress or rank != 0)
        for shard, pending in work:
            features = np.load(directory / shard["features"], mmap_mode="r+")
            done = np.load(directory / shard["done"], mmap_mode="r+")
            for start in range(0, len(pending), batch_size):
                rows, pictures = [], []
                for i in pending[start : start + batch_size]:
                    try:
                        pictures.append(load_image(paths[i]))
                        rows.append(i - shard["start"])
                    except InputError as error:
                        failed[str(paths[i])] = str(error)
                if rows:
                    grid = image_features(encoder, pictures, config, device, stage=stage)  # (B, h*w, C) or (B, P, E)
                    features[rows] = grid.float().cpu().numpy().astype(features.dtype)  # bf16 has no numpy type
                    features.flush()  # the rows reach the disk before they are marked done
                    done[rows] = 1
                    done.flush()
                bar.update(len(pending[start : start + batch_size]))
            del features, done
        bar.close()
        return {"images": len(paths), "computed": total - len(failed), "failed": failed}
