"""The model for inference, built on top of storage: a checkpoint's model (checkpoint.load_model) with the speed
variants chosen explicitly (the fast or int8 decoder of inference.py, the encoder in a precision of
fast_encoder.py, with the calibrations stored beside the weights) and any new words added. Captioning, the
server, evaluation and the benchmarks load through `load_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from show_attend_tell import checkpoint
from show_attend_tell.checkpoint import CONFIG_FILE, ENCODER_INT8_KEY, INT8_KEY
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import FastEncoder
from show_attend_tell.inference import for_inference, int8_available
from show_attend_tell.model import CaptionModel
from show_attend_tell.new_words import add_words, missing_words
from show_attend_tell.text import Vocabulary


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    with_encoder: bool = True,
    pretrained_encoder: bool = True,
    int8: bool = False,
    encoder_precision: str | None = None,
    new_words: Mapping[str, str] | None = None,
) -> tuple[CaptionModel, Vocabulary, dict]:
    """Load a checkpoint directory for inference -> (model in eval mode, vocabulary, config dict).

    The decoder is made fast for inference (inference.for_inference; no gradients); int8=True gives the int8 one
    (CPU only), quantized with the input ranges calibrated for these weights (`sat calibrate`; InputError when
    there are none). with_encoder=False skips the encoder (enough for cached features); pretrained_encoder=False
    builds an untrained one (tests). encoder_precision: run the encoder as fast_encoder.FastEncoder in "fp32",
    "bf16" or "int8" (calibrated by `sat calibrate --encoder-int8`); None keeps model.Encoder.
    fast_encoder.resolve_precision turns "auto" into one. new_words: {new word: known word} added to the decoder
    before any speed variant is built (new_words.py); the returned vocabulary has them (the config dict stays
    the checkpoint's). model.py's model itself, for training or export: checkpoint.load_model.
    """
    if int8 and torch.device(device).type != "cpu":
        raise InputError(f"int8 decoding runs on the CPU only, not on {device}")
    directory = Path(directory)
    model, vocab, config = checkpoint.load_model(
        directory, with_encoder=with_encoder, pretrained_encoder=pretrained_encoder
    )
    if int8 and not int8_available(model.decoder):
        raise InputError(f"{directory}: the Transformer decoder has no int8 version yet; decode it in fp32 (--no-int8)")
    int8_ranges = checkpoint.int8_input_ranges(directory, config) if int8 else None
    if new_words:
        vocab = add_words(model.decoder, vocab, missing_words(vocab, new_words))
        model.config = dataclasses.replace(model.config, vocab_size=len(vocab))
    if model.encoder is not None and encoder_precision is not None:
        calibration = checkpoint.encoder_int8_calibration(directory, config) if encoder_precision == "int8" else None
        try:
            model.encoder = FastEncoder(
                model.encoder, encoder_precision, calibration=calibration, image_size=model.config.image_size
            )
        except ValueError as error:  # a calibration of another trunk
            raise InputError(f"{directory / CONFIG_FILE}: {ENCODER_INT8_KEY}: {error}; recalibrate") from None
    try:
        model = for_inference(model, int8_ranges=int8_ranges)
    except ValueError as error:  # a calibration without one of this decoder's layers
        raise InputError(f"{directory / CONFIG_FILE}: {INT8_KEY}: {error}; run `sat calibrate` again") from None
    return model.to(device), vocab, config
