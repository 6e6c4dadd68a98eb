"""Feature cache: run the frozen encoder once over a prepared dataset and keep the grid features on disk.

The store is a directory of memory-mapped arrays: `features.npy` (N, P, E) float16 in the order of the
prepared dataset's images, `done.npy` (N,) uint8 marking finished rows, and `features.json` describing what
produced them (encoder name and weights sha256, grid, image size, a fingerprint of the image list). Rows are
written and flushed before they are marked done, so an interrupted run resumes where it stopped; disjoint rows
let torchrun ranks fill one store at once. Training then reads these instead of running a ResNet per batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from show_attend_tell.config import ModelConfig
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import FastEncoder
from show_attend_tell.images import load_image
from show_attend_tell.inference import image_features
from show_attend_tell.model import Encoder, stage_shape

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


def store_stage(directory: str | Path) -> str:
    """The stage a store holds ("" for grid features)."""
    return read_meta(directory).get("stage", "")


def store_precision(directory: str | Path) -> str:
    """The precision of the encoder that filled a store (fp32 for stores older than the key)."""
    return read_meta(directory).get("encoder_precision", LEGACY_META["encoder_precision"])


def load_for_model(
    directory: str | Path, config: ModelConfig, paths: list[Path], encoder_sha256: str, encoder: Encoder | None
) -> tuple[torch.Tensor, str]:
    """A complete store that fits a model -> (features, stage): grid features for a frozen encoder, or the
    output of a block before every fine-tuned one (run the rest with `encoder.forward_from(features, stage)`)."""
    stage = store_stage(directory)
    if config.fine_tune_blocks and not stage:
        raise InputError(
            f"{directory}: holds grid features of the pretrained encoder, but the model fine-tuned "
            f"{' '.join(config.fine_tune_blocks)}; give a store of an earlier block's output "
            "(sat features --stage layer4.0) or images"
        )
    if stage:
        try:
            encoder.check_stage(stage)
        except ValueError as error:
            raise InputError(f"{directory}: {error}") from None
    return load_features(directory, expected_meta(config, paths, encoder_sha256, stage)), stage


def _check_meta(directory: Path, found: dict, expected: dict) -> None:
    for key, value in expected.items():
        if found.get(key, LEGACY_META.get(key)) != value:
            raise InputError(
                f"{directory / META_FILE}: {key} is {found.get(key)!r} but {value!r} was expected; "
                "these features belong to another dataset, --limit, encoder or encoder precision (use a new --out "
                "or --overwrite)"
            )


def open_store(directory: str | Path, expected: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Open a store read-only -> (features memmap (N, P, E) fp16, done (N,) uint8, meta), verified.

    `expected` (from `expected_meta`) is compared key by key; the array shapes are always checked.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if expected is not None:
        _check_meta(directory, meta, expected)
    try:
        features = np.load(directory / FEATURES_FILE, mmap_mode="r")
        done = np.load(directory / DONE_FILE, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise InputError(f"{directory}: feature arrays missing or corrupt ({error})") from None
    if list(features.shape) != meta["shape"] or done.shape != (meta["shape"][0],):
        raise InputError(
            f"{directory / FEATURES_FILE}: shape {list(features.shape)} does not match {META_FILE} {meta['shape']}"
        )
    return features, done, meta


def load_features(directory: str | Path, expected: dict | None = None) -> torch.Tensor:
    """The complete store as one (N, P, E) fp16 tensor in memory; refuses a store with missing rows."""
    features, done, _ = open_store(directory, expected)
    missing = int((done == 0).sum())
    if missing:
        raise InputError(f"{directory}: {missing} of {len(done)} images have no features yet; rerun `sat features`")
    return torch.from_numpy(np.array(features))  # a writable copy in memory


def _create(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(directory / FEATURES_FILE, mode="w+", dtype=np.float16, shape=tuple(meta["shape"]))
    np.lib.format.open_memmap(directory / DONE_FILE, mode="w+", dtype=np.uint8, shape=(meta["shape"][0],))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
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
    device: str | torch.device = "cpu",
    progress: bool = True,
    stage: str = "",
) -> dict:
    """Fill (or resume filling) the store at `directory` with encoder(image) for every path, or with the
    output of residual block `stage` (see expected_meta), in the encoder's precision (model.Encoder: fp32; a
    fast_encoder.FastEncoder: its own), which the store records.

    With world_size > 1 each rank takes every world_size-th pending image; rank 0 creates the store and
    the caller must barrier before other ranks call this. Returns a summary (done, failed files, seconds).
    """
    directory = Path(directory)
    meta = expected_meta(config, paths, encoder_sha256, stage, getattr(encoder, "precision", "fp32"))
    if rank == 0 and (overwrite or not (directory / META_FILE).is_file()):
        _create(directory, meta)
    _, _, _ = open_store(directory, meta)  # verifies before any work
    features = np.load(directory / FEATURES_FILE, mmap_mode="r+")
    done = np.load(directory / DONE_FILE, mmap_mode="r+")
    pending = [i for i in np.flatnonzero(done == 0).tolist() if i % world_size == rank]
    encoder = encoder.to(device).eval()
    failed: dict[str, str] = {}
    bar = tqdm(total=len(pending), desc="features", unit="img", disable=not progress or rank != 0)
    for start in range(0, len(pending), batch_size):
        rows, pictures = [], []
        for i in pending[start : start + batch_size]:
            try:
                pictures.append(load_image(paths[i]))
                rows.append(i)
            except InputError as error:
                failed[str(paths[i])] = str(error)
        if rows:
            grid = image_features(encoder, pictures, config, device, stage=stage)  # (B, h*w, C) or (B, P, E)
            grid = grid.half().cpu().numpy()
            order = np.argsort(rows)
            rows_sorted = np.asarray(rows)[order]
            features[rows_sorted] = grid[order]
            features.flush()  # the rows reach the disk before they are marked done
            done[rows_sorted] = 1
            done.flush()
        bar.update(len(pending[start : start + batch_size]))
    bar.close()
    return {"images": len(paths), "computed": len(pending) - len(failed), "failed": failed}
