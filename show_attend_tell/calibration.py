"""Calibrating the int8 variants once for a checkpoint and storing the result with it: the decoder's input ranges
(inference.Int8Decoder) and the encoder's activation observers (fast_encoder.FastEncoder's int8 trunk).

`sat calibrate` runs `calibrate_checkpoint` (and with --encoder-int8 `calibrate_encoder_checkpoint`, with --check
`check_int8`: whether int8 keeps the captions' quality, and so stays the CPU default); training
calibrates the decoder of its best checkpoint through `calibrate_decoder`, on its own features, as they do.
The measuring itself lives beside each variant (inference.calibrate_int8, fast_encoder.calibrate_int8_encoder).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from show_attend_tell.checkpoint import (
    load_model,
    record_int8_check,
    save_encoder_int8_calibration,
    save_int8_calibration,
)
from show_attend_tell.config import CALIBRATION_IMAGES, DEFAULT_BEAM_SIZE, INT8_CIDER_TOLERANCE
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import ENCODER_CALIBRATION_IMAGES, calibrate_int8_encoder
from show_attend_tell.features import dataset_features, store_precision
from show_attend_tell.images import load_image
from show_attend_tell.inference import calibrate_int8, int8_available
from show_attend_tell.weights import image_transform

if TYPE_CHECKING:
    from show_attend_tell.prepare import PreparedDataset

DECODER_BATCH = 32  # photos per beam search while the decoder's ranges are measured
ENCODER_BATCH = 4  # photos per forward of the observed trunk


def calibration_sample(rows: Sequence[int], count: int, seed: int) -> list[int]:
    """`count` of the image rows drawn at random with `seed` (all when there are fewer), in order."""
    return sorted(random.Random(seed).sample(list(rows), min(count, len(rows))))


def calibrate_decoder(
    directory: str | Path,
    decoder: nn.Module,
    rows: Sequence[int],
    features: Callable[[list[int]], torch.Tensor],
    *,
    split: str,
    seed: int,
    progress: bool = False,
    features_precision: str | None = None,
) -> int:
    """Measure the int8 input ranges of `decoder` (a model.CaptionDecoder) while beam search captions the photos
    `rows`, `features(batch of rows)` giving their (B, P, E) grid features, and store them with the checkpoint in
    `directory` (checkpoint.save_int8_calibration), with the precision of the encoder that made the features when
    given (the ranges differ a little between fp32 and bf16 features). Returns how many photos were used."""
    rows = list(rows)

    def batches() -> Iterator[torch.Tensor]:
        starts = range(0, len(rows), DECODER_BATCH)
        for start in tqdm(starts, desc="int8 calibration", unit="batch", disable=not progress):
            yield features(rows[start : start + DECODER_BATCH])

    ranges = calibrate_int8(decoder, batches())
    about = {"images": len(rows), "split": split, "seed": seed, "beam_size": DEFAULT_BEAM_SIZE}
    if features_precision is not None:
        about["features_precision"] = features_precision
    save_int8_calibration(directory, ranges, about)
    return len(rows)


def calibrate_checkpoint(
    directory: str | Path,
    dataset: PreparedDataset,
    *,
    split: str = "train",
    images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    store: str | Path | None = None,
    progress: bool = True,
) -> int:
    """Calibrate the int8 decoder of a checkpoint on `images` photos of `split`, drawn at random with `seed`, and
    store the ranges with it. `store`: a `sat features` store of the dataset's grid features, checked against the
    checkpoint, else the checkpoint's encoder runs on the photos (features.dataset_features either way). Returns
    how many photos were used."""
    rows = calibration_sample(dataset.indices(split), images, seed)
    if not rows:
        raise InputError(f"{dataset.directory}: no {split} images to calibrate the int8 decoder on")
    model, _, config = load_model(directory, with_encoder=not store)
    if not int8_available(model.decoder):
        raise InputError(f"{directory}: the Transformer decoder has no int8 version yet; it decodes in fp32")
    features = dataset_features(model, dataset, store, config.get("encoder_sha256", ""))
    precision = store_precision(store) if store else "fp32"  # checkpoint.load_model's encoder runs in fp32
    return calibrate_decoder(
        directory,
        model.decoder,
        rows,
        features,
        split=split,
        seed=seed,
        progress=progress,
        features_precision=precision,
    )


def check_int8(
    directory: str | Path,
    dataset: PreparedDataset,
    *,
    split: str = "val",
    store: str | Path | None = None,
    tolerance: float = INT8_CIDER_TOLERANCE,
    progress: bool = True,
) -> dict:
    """Score a calibrated checkpoint's captions of `split` in fp32 and with the int8 decoder, decoded as `sat
    caption` decodes them (the default beam, label guidance, no word twice; evaluate.load_evaluation), and record
    with the calibration whether int8 stays the CPU default: only when its CIDEr is within `tolerance` points of
    fp32's (checkpoint.record_int8_check). `store`: the dataset's grid features instead of the encoder. Returns
    the check as recorded, with "default"."""
    from show_attend_tell.evaluate import load_evaluation

    rows = dataset.indices(split)
    if not rows:
        raise InputError(f"{dataset.directory}: no {split} images to check the int8 decoder on")
    references = {i: dataset.images[i].captions for i in rows}
    cider = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        evaluation = load_evaluation(directory, dataset, store=store, int8=int8)
        metrics, _ = evaluation.score(rows, references, beam_size=DEFAULT_BEAM_SIZE, progress=progress)
        cider[name] = round(metrics["CIDEr"], 2)
    check = {
        "split": split,
        "images": len(rows),
        "beam_size": DEFAULT_BEAM_SIZE,
        "CIDEr": cider,
        "tolerance": tolerance,
    }
    default = cider["int8"] >= cider["fp32"] - tolerance
    record_int8_check(directory, check, default=default)
    return {**check, "default": default}


def calibrate_encoder_checkpoint(
    directory: str | Path,
    dataset: PreparedDataset,
    *,
    split: str = "train",
    images: int = ENCODER_CALIBRATION_IMAGES,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Calibrate the int8 encoder for a checkpoint on `images` photos of `split` drawn at random with `seed`, at
    the model's image size, and store the observers with it (checkpoint.save_encoder_int8_calibration). Returns
    how many photos were used."""
    rows = calibration_sample(dataset.indices(split), images, seed)
    if not rows:
        raise InputError(f"{dataset.directory}: no {split} images to calibrate the int8 encoder on")
    model, _, _ = load_model(directory)
    transform = image_transform(model.config)

    def batches() -> Iterator[torch.Tensor]:
        starts = range(0, len(rows), ENCODER_BATCH)
        for start in tqdm(starts, desc="int8 encoder calibration", unit="batch", disable=not progress):
            yield torch.stack(
                [transform(load_image(dataset.images[i].path)) for i in rows[start : start + ENCODER_BATCH]]
            )

    observers = calibrate_int8_encoder(model.encoder, batches())
    about = {"images": len(rows), "split": split, "seed": seed, "image_size": model.config.image_size}
    save_encoder_int8_calibration(directory, observers, about)
    return len(rows)
