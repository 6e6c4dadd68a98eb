"""The dataclasses that are the single source of truth for a run; saved as JSON beside runs and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Beam hypotheses are ranked by log p / length**0.5. Chosen on the Flickr8k val split for the shipped model
# (results/flickr8k_val_selection.json): against raw log p (0) it wrote slightly longer captions and raised
# BLEU-4, METEOR and CIDEr at beam 3; 1.0 raised METEOR more but cost BLEU.
DEFAULT_LENGTH_PENALTY = 0.5
# Beams per image when the caller does not say. Chosen on Flickr8k val for the shipped model by CIDEr: 56.0 at
# beam 3, 57.4 at 5, 57.8 at 7, 56.7 at 10 (results/flickr8k_val_selection.json, beam_size). On CPU the
# encoder dominates a photo's time either way (results/decode_speed_beam7.json).
DEFAULT_BEAM_SIZE = 7
# A photo's caption must name a concept of the encoder's ImageNet labels whose probability reaches this (guidance.py);
# chosen on coco-dev and Flickr8k val together (results/guidance_tuning.json, "chosen").
DEFAULT_GUIDANCE_THRESHOLD = 0.3
# Words per caption at most, when decoding (a caption still running is cut there); Flickr8k's references
# are 11 words on average.
DEFAULT_MAX_LENGTH = 20


@dataclasses.dataclass
class ModelConfig:
    """Dimensions of the captioning model (letters as in model.py)."""

    vocab_size: int
    encoder: str = "resnet50"  # resnet50 (offline MSRA weights) or resnet101 (torchvision weights)
    image_size: int = 224  # square input side in pixels
    grid_size: int = 7  # attention grid side: P = grid_size**2 locations
    encoder_dim: int = 2048  # E
    # F: the decoder attends over features projected to this size by a learned linear layer + ReLU + dropout
    # (shrinks every per-step multiply by E/F, ~2x faster training and decoding); 0 = the raw E-dim features
    feature_dim: int = 512
    attention_dim: int = 512  # A
    decoder_dim: int = 512  # D
    embed_dim: int = 512  # M
    dropout: float = 0.5
    deep_output: bool = True  # paper eq. 7: logits from embedding, hidden state and context
    fine_tune_blocks: tuple[str, ...] = ()  # e.g. ("layer3", "layer4"); empty = frozen encoder


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings for `sat train`."""

    epochs: int = 10
    batch_size: int = 64  # captions per batch
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    doubly_stochastic: float = 1.0  # lambda of the paper's attention regulariser
    label_smoothing: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine or constant
    seed: int = 0
    val_every_steps: int = 0  # 0 = validate at each epoch end only
    checkpoint_every_steps: int = 500
    log_every_steps: int = 50
    val_beam_size: int = 1
    val_max_images: int = 0  # 0 = the whole val split
    early_stop_metric: str = "CIDEr"
    patience: int = 3  # validations without improvement before stopping
    max_caption_length: int = DEFAULT_MAX_LENGTH
    init_from: str = ""  # start from this checkpoint's weights (e.g. cross-entropy training before SCST)
    self_critical: bool = False  # optimise CIDEr-D by self-critical sequence training instead of cross-entropy
    scst_samples: int = 5  # sampled captions per image; each one's baseline is the mean of the others
    # SCST + this x cross-entropy on the images' reference captions (a mixed objective): the reference
    # captions keep the language model from padding captions towards CIDEr-D's preferred length
    scst_xe_weight: float = 0.0


@dataclasses.dataclass
class DataConfig:
    """Where the training data is: a prepared dataset and (for a frozen encoder) its feature store."""

    prepared: str
    # empty: read images and run the encoder; else a `sat features` store: grid features (frozen encoder), or
    # the output of a block (--stage) when fine-tuning the blocks after it
    features: str = ""
    captions_per_image: int = 5  # how many of each image's captions a batch uses (the first ones)
    limit: int = 0  # > 0: only the first `limit` images of each split (`--limit`, quick experiments)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, refusing unknown fields and restoring tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        if isinstance(value, list) and "tuple" in str(fields[name].type):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def save_json(data: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_atomically(path: str | Path, write: Callable[[str], Any]) -> None:
    """write(temporary path) in `path`'s folder, then one rename: readers never see a partial file, and a
    failed write (an exception) leaves `path` as it was."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
