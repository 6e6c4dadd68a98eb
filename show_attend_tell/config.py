"""The dataclasses that are the single source of truth for a run; saved as JSON beside runs and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
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
# An image's most probable label concept gives its template caption ("a cup of coffee on a table") when its
# probability reaches this (guidance.py); chosen the same way (results/guidance_tuning.json, "chosen_template").
DEFAULT_TEMPLATE_THRESHOLD = 0.4
# The COCO detector's guidance (guidance.Guidance): a detected class is named at DEFAULT_DETECTION_THRESHOLD; a
# class detected at DEFAULT_PRESENCE_THRESHOLD (a person at DEFAULT_PERSON_PRESENCE_THRESHOLD) is there, and the
# words of classes not there are discouraged by these penalties (added to their log p). Chosen on coco-dev and
# Flickr8k val together: results/detector_tuning/round4.json ("chosen"; README, "A second pair of eyes").
DEFAULT_DETECTION_THRESHOLD = 0.4
# The CenterNet's input side: its graph's is 512 (detector.CenterNetDetector; results/detector_sizes.json).
DEFAULT_DETECTOR_SIZE = 448
DEFAULT_PRESENCE_THRESHOLD = 0.15
DEFAULT_PERSON_PRESENCE_THRESHOLD = 0.2
DEFAULT_PERSON_PENALTY = 8.0
DEFAULT_OBJECT_PENALTY = 1.5
# People counted from the person detections at this score or above (guidance.Guidance.count_words): two ask the
# caption for "two", three or more for a word of a group; None: not counted. Tuned as the settings above
# (results/detector_tuning/counting.json, counting_groups.json): no threshold kept Flickr8k val within the bound.
DEFAULT_COUNT_THRESHOLD = None
# Words one request may ask for (guidance.py): each doubles the states of the constrained search, and so its beams.
# Here rather than in guidance.py so that the server's flags parse without importing torch.
MAX_MENTIONS = 4
# Training photos the int8 decoder's input ranges are measured on (`sat calibrate`, and `sat train` for its best
# checkpoint): results/int8_calibration.json.
CALIBRATION_IMAGES = 256
# `sat calibrate --check SPLIT` keeps the int8 decoder the CPU default only when its captions of SPLIT score within
# this many CIDEr points of the fp32 decoder's. Set before the shipped model was checked (its record, and how far
# two calibrations of it differ: results/flickr8k_scst/int8_check/).
INT8_CIDER_TOLERANCE = 0.5
# Words per caption at most, when decoding (a caption still running is cut there); Flickr8k's references
# are 11 words on average.
DEFAULT_MAX_LENGTH = 20
# Bounds of what a caller may ask for: beams per image (a typo such as 70000 would exhaust memory; the server
# allows fewer), words per caption, a length penalty, and seeds (torch, numpy and random take 0..2^32-1 alike;
# a negative seed would alias a large one).
MAX_BEAM = 100
MAX_CAPTION_WORDS = 200
MAX_LENGTH_PENALTY = 10.0
MAX_SEED = 2**32 - 1


def check_number(value: Any, name: str, low: float, high: float, *, whole: bool = False) -> None:
    """InputError "{name} must be ... from low to high, got value" unless `value` is a finite number (a whole
    one when `whole`) in [low, high]."""
    from show_attend_tell.errors import InputError

    kind = (int,) if whole else (int, float)
    number = isinstance(value, kind) and not isinstance(value, bool)
    if not number or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        what = "a whole number" if whole else "a number"
        raise InputError(f"{name} must be {what} from {low} to {high}, got {value!r:.40}")


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
    # soft: the context is the expected feature under alpha (section 4.2); hard: the feature of one location
    # sampled from alpha in training (section 4.1), the expected one when decoding unless sampling is asked for
    attention: str = "soft"
    # "lstm": the paper's decoder (model.py). "transformer": transformer.py, pre-norm blocks of masked
    # self-attention, cross-attention over the grid and a feed-forward layer, D = decoder_dim wide; it reads
    # the fields below and ignores feature_dim, attention_dim, embed_dim and deep_output.
    decoder: str = "lstm"
    transformer_layers: int = 3
    transformer_heads: int = 8  # decoder_dim must be a multiple
    transformer_feedforward_dim: int = 2048
    transformer_positions: str = "learned"  # learned or sinusoidal position embeddings
    transformer_max_positions: int = 64  # learned positions: <start> and the words after it, at most


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
    # Each sample's baseline: "mean", the mean reward of the image's other samples (Luo 2020); "greedy", the
    # reward of the image's greedy caption (Rennie et al. 2017; one more decode per step)
    scst_baseline: str = "mean"
    scst_max_length: int = 0  # sampled captions are cut after this many tokens (0: max_caption_length)
    # CIDEr-D's document frequencies: "train", once over every training reference; "batch", over the references
    # of the step's images only (what pycocoevalcap's scorer does per call)
    scst_document_frequency: str = "train"
    # no caption holds a word twice but text.FUNCTION_WORDS, as `sat caption` decodes (decoding.once_mask): in SCST's
    # samples and greedy baselines, so the reward cannot teach repeats, and in the validations
    once_words: bool = False
    # validate the starting weights before the first step (a fine-tuning run then keeps them as best/ unless a
    # later validation beats them)
    val_at_start: bool = False
    # Hard attention (section 4.1, eq. 12): lambda_r, the weight of the REINFORCE term on the sampled locations,
    # and lambda_e, the weight of the entropy of alpha. The paper set both by cross-validation without giving
    # them; these are the numbers in the authors' released code (arctic-captions), not tuned here. That code
    # averages alpha log alpha over the locations too, so its 0.002 weighed the entropy P times less.
    reinforce_weight: float = 0.1
    entropy_weight: float = 0.002
    # Autocast in training: auto is fp16 with loss scaling on CUDA and, on the CPU, bf16 (no loss scaling needed) where
    # the CPU has it natively, else fp32 (train.training_precision). bf16 trains 1.5-1.7x faster per step there and
    # scored within seed noise of fp32 (results/train_precision_seeds.json); self-critical training stays in fp32 on
    # the CPU. A run records the precision auto picked.
    precision: str = "auto"
    # 0: each epoch visits the training images in a random order (a permutation). N > 0: for feature stores on
    # disks that seek slowly (disks that spin, network storage), blocks of N consecutive images in a random
    # order, the images of every SHUFFLE_WINDOW_BLOCKS blocks shuffled together (training_data.epoch_order)
    shuffle_block: int = 0
    # Batches of images whose longest captions are about as long, in a random order (training_data.epoch_batches): less
    # padding to the longest caption of a batch, faster steps for both decoders (results/train_speed_bucketing.json),
    # and the scores of random batches (one LSTM run a precision against three seeds: train_bucketing_scores.json).
    # Cross-entropy training only: self-critical steps take random batches (TrainingData.batches)
    bucket_by_length: bool = True
    compile: bool = False  # torch.compile the decoder's step, which training and decoding run (worth it on GPUs)


@dataclasses.dataclass
class DataConfig:
    """Where the training data is: a prepared dataset and (for a frozen encoder) its feature store."""

    prepared: str
    # empty: read images and run the encoder; else a `sat features` store: grid features (frozen encoder), or
    # the output of a block (--stage) when fine-tuning the blocks after it
    features: str = ""
    captions_per_image: int = 5  # how many of each image's captions a batch uses (the first ones)
    limit: int = 0  # > 0: only the first `limit` images of each split (`--limit`, quick experiments)
    # memory: read the whole store into RAM; stream: read each batch's rows from disk (memory bounded by a few
    # batches, for stores larger than RAM: COCO's 14x14 store is 99 GB); auto: memory when the store takes
    # under half the memory available
    feature_loading: str = "auto"
    loader_workers: int = 2  # processes reading a streamed store's batches ahead of training (0: in the loop)


def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda value: value >= low), f"at least {low}"


def _between(low: float, high: float) -> tuple[Callable[[float], bool], str]:
    return (lambda value: low <= value <= high), f"from {low} to {high}"


_POSITIVE = ((lambda value: value > 0), "positive")
# The values TrainConfig's fields may take: a (test, description) for numbers (floats must also be finite), a
# tuple of choices for strings. A value outside them would train silently wrong (batch_size 0 runs one image
# per step, epochs -1 trains nothing and keeps a "best" of -inf).
TRAIN_RANGES: dict[str, Any] = {
    "epochs": _at_least(1),
    "batch_size": _at_least(1),
    "decoder_lr": _POSITIVE,
    "encoder_lr": _POSITIVE,
    "weight_decay": _at_least(0),
    "grad_clip": _at_least(0),  # 0: no clipping
    "doubly_stochastic": _at_least(0),
    "label_smoothing": _between(0, 0.99),
    "warmup_steps": _at_least(0),
    "seed": _between(0, MAX_SEED),
    "lr_schedule": ("cosine", "constant"),
    "val_every_steps": _at_least(0),
    "checkpoint_every_steps": _at_least(1),
    "log_every_steps": _at_least(1),
    "val_beam_size": _between(1, 100),
    "val_max_images": _at_least(0),
    "early_stop_metric": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"),
    "patience": _at_least(1),
    "max_caption_length": _between(1, 200),
    "scst_samples": _at_least(2),  # each sample's baseline is the mean of the others'
    "scst_xe_weight": _at_least(0),
    "scst_baseline": ("mean", "greedy"),
    "scst_max_length": _between(0, 200),
    "scst_document_frequency": ("train", "batch"),
    "reinforce_weight": _at_least(0),
    "entropy_weight": _at_least(0),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "shuffle_block": _at_least(0),
}
FEATURE_LOADING = ("auto", "memory", "stream")
# The values a string field of ModelConfig may take (besides `encoder`, one of the encoder weights): checked in a
# checkpoint's config.json and listed by `sat train --help`.
MODEL_CHOICES = {
    "attention": ("soft", "hard"),
    "decoder": ("lstm", "transformer"),
    "transformer_positions": ("learned", "sinusoidal"),
}


def check_train_config(config: TrainConfig, where: str) -> None:
    """Refuse a TrainConfig field of the wrong type or out of TRAIN_RANGES: an InputError naming the field (and
    its `sat train` flag)."""
    from show_attend_tell.errors import InputError

    for field in dataclasses.fields(TrainConfig):
        value, rule = getattr(config, field.name), TRAIN_RANGES.get(field.name)
        name = f"{where}: train.{field.name} (--{field.name.replace('_', '-')})"
        expected = type(field.default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise InputError(f"{name} must be of type {expected.__name__}, got {value!r:.60}")
        if rule is None:
            continue
        if isinstance(rule[0], str):
            if value not in rule:
                raise InputError(f"{name} must be one of {', '.join(rule)}, got {value!r:.60}")
            continue
        test, description = rule
        if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise InputError(f"{name} must be {description}, got {value!r:.60}")


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
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # name the file being written, not a temporary name the user never chose
        raise type(error)(error.errno, error.strerror, str(path)) from None
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would make it, not mkstemp's owner-only 0600
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
