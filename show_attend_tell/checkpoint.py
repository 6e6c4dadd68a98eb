"""Plain-data model checkpoints: a directory of model.safetensors + config.json + vocab.json. Nothing pickled.

Storage only: `load_model` reads a checkpoint into model.py's model (for training, export and averaging), and
runtime.load_model builds the model for inference on top of it (speed variants, calibrations, new words).
A frozen encoder is not stored: the checkpoint names the sha256 of the encoder weights it was trained on,
and loading checks that the local encoder weights are those. A fine-tuned encoder is stored with the decoder.

A hand-edited checkpoint is refused, not loaded into nonsense: every field of the model section is checked
for its type and range, the tensors against the sizes it names, and config.json carries the sha256 of its own
model section and of the vocabulary (also in the weights file's metadata), so an edited `grid_size` or a
reordered vocab.json of the right length is caught. Checkpoints written before the checksums still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from show_attend_tell.config import MODEL_CHOICES, ModelConfig, from_dict, save_json, to_dict, write_atomically
from show_attend_tell.errors import InputError
from show_attend_tell.model import DECODERS, CaptionModel, Encoder, decoder_class
from show_attend_tell.text import Vocabulary

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
INT8_FILE = "int8.safetensors"  # the int8 decoder's input ranges, measured once for the weights (`sat calibrate`)
INT8_KEY = "int8_calibration"  # config.json: what INT8_FILE is for and how it was measured
ENCODER_INT8_FILE = "encoder_int8.safetensors"  # the int8 encoder's activation observers (`--encoder-int8`)
ENCODER_INT8_KEY = "encoder_int8_calibration"  # config.json: the same for ENCODER_INT8_FILE
CHECKSUM_KEYS = ("model_sha256", "vocab_sha256")  # in config.json and the weights file's metadata
# Bounds a config.json is held to. Widths and the vocabulary are also bounded by the weights, which must match
# them; the image and grid sizes are not, and set the memory of every forward pass.
MAX_IMAGE_SIZE = 2048
MAX_GRID_SIZE = 64
MAX_WIDTH = 1 << 16
# ModelConfig fields added after checkpoints were shipped, with the value every earlier checkpoint means: at that
# value a field is left out of config.json's model section and of its sha256, so the sections and checksums of
# earlier checkpoints (the shipped model's among them) are what this version writes too.
ADDED_FIELDS = {"attention": "soft", "decoder": "lstm"}
MAX_LAYERS = 64


def model_tensors(model: CaptionModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the decoder, plus the fine-tuned encoder blocks when there are any (the
    frozen rest comes from the encoder weights named by sha256, as for a frozen encoder)."""
    tensors = {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    if model.encoder is not None and model.config.fine_tune_blocks:
        prefixes = tuple(model.encoder.tuned_prefixes())
        tensors.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items() if k.startswith(prefixes)})
    return tensors


def load_encoder_state(encoder: Encoder, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put a checkpoint's fine-tuned blocks into an encoder built from its weights. The tensors must be exactly
    the tuned blocks' (or, as older checkpoints stored, the whole encoder)."""
    own = encoder.state_dict()
    tuned = {k for k in own if k.startswith(tuple(encoder.tuned_prefixes()))}
    missing, unexpected = sorted(tuned - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise InputError(
            f"{path}: encoder tensors do not match config.json's fine_tune_blocks "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    _load_state(encoder, {**own, **tensors}, path, "encoder")


def save_model(
    model: CaptionModel,
    vocab: Vocabulary,
    directory: str | Path,
    *,
    encoder_sha256: str,
    half: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write the checkpoint directory atomically (each file via a temporary name and a rename).

    half=True stores floating tensors as fp16 for shipping, except BatchNorm statistics (a running variance
    reaches ~8.4e4, which overflows fp16).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model_tensors(model).items():
        tensor = tensor.detach().cpu().contiguous()
        if half and tensor.is_floating_point() and "running_" not in name:
            tensor = tensor.half()
        tensors[name] = tensor
    section = model_section(model.config)
    checksums = {"model_sha256": model_sha256(section), "vocab_sha256": vocabulary_sha256(vocab)}
    config = {
        "format_version": FORMAT_VERSION,
        "model": section,
        "encoder_sha256": encoder_sha256,
        "dtype": "float16" if half else "float32",
        **(extra or {}),
        **checksums,
    }
    metadata = {"format_version": "1", **checksums}
    write_atomically(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    write_atomically(directory / CONFIG_FILE, lambda p: save_json(config, p))
    write_atomically(directory / VOCAB_FILE, vocab.save)
    return directory


def model_section(config: ModelConfig) -> dict:
    """config.json's model section: every field but the ADDED_FIELDS at the value earlier checkpoints mean, and
    without the fields only another decoder kind reads (an LSTM's leaves out the Transformer's)."""
    section = {k: v for k, v in to_dict(config).items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}
    for kind in DECODERS.values():
        if kind is not decoder_class(config):
            for name in kind.own_fields:
                del section[name]
    return section


def model_sha256(section: dict) -> str:
    """sha256 of a config's model section as canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(section, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def vocabulary_sha256(vocab: Vocabulary) -> str:
    """sha256 of the words in id order: any reordering or substitution changes it."""
    return hashlib.sha256(json.dumps(vocab.words, ensure_ascii=True).encode()).hexdigest()


def check_model_config(data: object, where: str) -> ModelConfig:
    """A config.json model section -> ModelConfig, every field checked for its type and range (InputError
    naming the field otherwise)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: field 'model' is missing or not an object")
    try:
        config = from_dict(ModelConfig, data)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: bad 'model' section ({error})") from None
    from show_attend_tell.text import SPECIAL_TOKENS
    from show_attend_tell.weights import ENCODER_WEIGHTS

    for field in dataclasses.fields(ModelConfig):
        value = getattr(config, field.name)
        name = f"{where}: model.{field.name}"
        if field.name == "fine_tune_blocks":
            if not isinstance(value, tuple) or not all(isinstance(block, str) for block in value):
                raise InputError(f'{name} must be a list of block names (e.g. ["layer4"]), got {value!r:.60}')
        elif field.name == "encoder":
            if value not in ENCODER_WEIGHTS:
                raise InputError(f"{name} must be one of {', '.join(ENCODER_WEIGHTS)}, got {value!r:.60}")
        elif field.name in MODEL_CHOICES:
            if value not in MODEL_CHOICES[field.name]:
                raise InputError(f"{name} must be one of {', '.join(MODEL_CHOICES[field.name])}, got {value!r:.60}")
        elif field.name == "deep_output":
            if not isinstance(value, bool):
                raise InputError(f"{name} must be true or false, got {value!r:.60}")
        elif field.name == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise InputError(f"{name} must be a number in [0, 1), got {value!r:.60}")
        else:
            low, high = {
                "vocab_size": (len(SPECIAL_TOKENS) + 1, 10_000_000),
                "image_size": (32, MAX_IMAGE_SIZE),
                "grid_size": (1, MAX_GRID_SIZE),
                "feature_dim": (0, MAX_WIDTH),
                "transformer_layers": (1, MAX_LAYERS),
            }.get(field.name, (1, MAX_WIDTH))
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InputError(f"{name} must be a whole number from {low} to {high}, got {value!r:.60}")
    problem = decoder_class(config).config_problem(config)
    if problem is not None:
        raise InputError(f"{where}: {problem}")
    return config


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint, with its format version and the types of its top-level fields checked."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not a model checkpoint ({CONFIG_FILE} missing)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in ("encoder_sha256", *CHECKSUM_KEYS):
        if key in config and not isinstance(config[key], str):
            raise InputError(f"{path}: field '{key}' must be a string, got {config[key]!r:.60}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: unknown checkpoint format_version {version!r} (this version reads {FORMAT_VERSION})")
    if not isinstance(config.get("model"), dict):
        raise InputError(f"{path}: field 'model' is missing or not an object")
    return config


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    with_encoder: bool = True,
    pretrained_encoder: bool = True,
) -> tuple[CaptionModel, Vocabulary, dict]:
    """Load a checkpoint directory -> (model.py's model in eval mode, vocabulary, config dict): for training,
    export and averaging; runtime.load_model gives the model made fast for inference.

    with_encoder=False skips the encoder (enough for cached features). pretrained_encoder=False builds an
    untrained encoder (tests); otherwise the local encoder weights must match the recorded sha256.
    """
    directory = Path(directory)
    config = read_config(directory)
    model_config = check_model_config(config["model"], str(directory / CONFIG_FILE))
    vocab = Vocabulary.load(directory / VOCAB_FILE)
    if len(vocab) != model_config.vocab_size:
        raise InputError(
            f"{directory / VOCAB_FILE}: {len(vocab)} words, but the model was built for "
            f"vocab_size={model_config.vocab_size}; the vocabulary does not belong to these weights"
        )
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InputError(f"{weights_path}: missing")
    try:
        with safe_open(weights_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{weights_path}: truncated or corrupt safetensors file ({error})") from None
    check_checksums(directory, config, metadata, model_config, vocab)

    encoder_tensors = {k[len("encoder.") :]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
    encoder = None
    if with_encoder:
        try:
            encoder = Encoder(model_config, pretrained=pretrained_encoder)
        except ValueError as error:  # e.g. an unknown fine_tune_blocks name
            raise InputError(f"{directory / CONFIG_FILE}: {error}") from None
        whole = encoder_tensors.keys() == encoder.state_dict().keys()  # older fine-tuned checkpoints
        if pretrained_encoder and not whole:
            from show_attend_tell.weights import ENCODER_WEIGHTS

            local = ENCODER_WEIGHTS[model_config.encoder].sha256()
            if local != config.get("encoder_sha256"):
                raise InputError(
                    f"{directory}: trained on encoder weights sha256 {config.get('encoder_sha256')}, "
                    f"but the local {model_config.encoder} weights are {local}"
                )
    model = CaptionModel(model_config, encoder=encoder)
    decoder_tensors = {k[len("decoder.") :]: v.float() for k, v in tensors.items() if k.startswith("decoder.")}
    _load_state(model.decoder, decoder_tensors, weights_path, "decoder")
    if encoder is not None and model_config.fine_tune_blocks:
        load_encoder_state(encoder, encoder_tensors, weights_path)
    return model.eval().to(device), vocab, config


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_int8_calibration(
    directory: str | Path, input_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], about: dict
) -> None:
    """Store the int8 decoder's input ranges (inference.calibrate_int8: layer name -> (low (in,), high (in,)))
    beside the weights they were measured for: the tensors in int8.safetensors, and in config.json what they are
    for and how they were measured."""
    directory = Path(directory)
    tensors = {}
    for name, (low, high) in input_ranges.items():
        tensors[f"{name}.low"], tensors[f"{name}.high"] = (
            low.float().cpu().contiguous(),
            high.float().cpu().contiguous(),
        )
    section = {"weights_sha256": file_sha256(directory / WEIGHTS_FILE), **about}
    _save_calibration(directory, INT8_KEY, INT8_FILE, tensors, section)


def save_encoder_int8_calibration(directory: str | Path, observers: dict[str, torch.Tensor], about: dict) -> None:
    """Store the int8 encoder's activation observers (fast_encoder.calibrate_int8_encoder) with the model, for
    the encoder weights it was trained on (config.json's encoder_sha256)."""
    directory = Path(directory)
    tensors = {name: tensor.float().cpu().contiguous() for name, tensor in observers.items()}
    section = {"encoder_sha256": read_config(directory).get("encoder_sha256"), **about}
    _save_calibration(directory, ENCODER_INT8_KEY, ENCODER_INT8_FILE, tensors, section)


def _save_calibration(directory: Path, key: str, file: str, tensors: dict[str, torch.Tensor], section: dict) -> None:
    """The tensors in `file`, and config.json's `key` naming the file with its sha256 and what it is bound to."""
    write_atomically(directory / file, lambda p: save_file(tensors, p))
    config = read_config(directory)
    config[key] = {"file": file, "sha256": file_sha256(directory / file), **section}
    write_atomically(directory / CONFIG_FILE, lambda p: save_json(config, p))


def has_int8_calibration(config: dict) -> bool:
    """Whether a checkpoint's config.json names int8 input ranges (`sat calibrate`)."""
    return INT8_KEY in config


def int8_by_default(config: dict) -> bool:
    """Whether the CPU decodes this checkpoint in int8 unless told otherwise: it has int8 input ranges, and no
    check of them (`sat calibrate --check`, record_int8_check) found the int8 captions scoring worse than fp32's by
    more than its tolerance."""
    return has_int8_calibration(config) and config[INT8_KEY].get("default") is not False


def record_int8_check(directory: str | Path, check: dict, *, default: bool) -> None:
    """Record beside a checkpoint's int8 input ranges how its captions scored with them and without (`check`),
    and whether the CPU decodes in int8 by default (`default`). A new calibration replaces both."""
    directory = Path(directory)
    config = read_config(directory)
    if INT8_KEY not in config:
        raise InputError(f"{directory}: no int8 calibration to check (`sat calibrate {directory} --data DIR`)")
    config[INT8_KEY].update(check=check, default=default)
    write_atomically(directory / CONFIG_FILE, lambda p: save_json(config, p))


def int8_input_ranges(directory: Path, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The calibrated int8 input ranges, checked: present, unchanged since calibration, for these weights."""
    tensors = _calibration_tensors(
        directory,
        config,
        INT8_KEY,
        INT8_FILE,
        bound={"weights_sha256": (file_sha256(directory / WEIGHTS_FILE), f"other weights than {WEIGHTS_FILE}")},
        command=f"sat calibrate {directory} --data DIR",
        instead="decode in fp32 (--no-int8)",
    )
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {name: (tensors[f"{name}.low"], tensors[f"{name}.high"]) for name in names}


def encoder_int8_calibration(directory: Path, config: dict) -> dict[str, torch.Tensor]:
    """The int8 encoder's calibrated activation observers, checked like the decoder's ranges, for the encoder
    weights this model was trained on."""
    return _calibration_tensors(
        directory,
        config,
        ENCODER_INT8_KEY,
        ENCODER_INT8_FILE,
        bound={"encoder_sha256": (config.get("encoder_sha256"), "other encoder weights than this model's")},
        command=f"sat calibrate {directory} --data DIR --encoder-int8",
        instead="run the encoder in bf16 or fp32 (--encoder-precision)",
    )


def _calibration_tensors(
    directory: Path, config: dict, key: str, file: str, *, bound: dict[str, tuple], command: str, instead: str
) -> dict[str, torch.Tensor]:
    """config.json's `key` section and its file, checked: present, unchanged since calibration, and each `bound`
    field equal to what it must be now ({field: (value, what a mismatch means)})."""
    where = f"{directory / CONFIG_FILE}: {key}"
    section = config.get(key)
    if section is None:
        raise InputError(f"{directory}: no {key.replace('_', ' ')}; run `{command}` once, or {instead}")
    if not isinstance(section, dict) or section.get("file") != file:
        raise InputError(f"{where}: expected an object naming its file {file!r}")
    path = directory / file
    if not path.is_file():
        raise InputError(f"{path}: missing; run `{command}` again")
    if section.get("sha256") != file_sha256(path):
        raise InputError(f"{path}: changed after calibration (its sha256 differs from config.json's); recalibrate")
    for field, (value, meaning) in bound.items():
        if section.get(field) != value:
            raise InputError(f"{where}: calibrated for {meaning}; run `{command}`")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: truncated or corrupt safetensors file ({error})") from None
    for name, tensor in tensors.items():  # an infinite range quantizes every value to nan
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: {name} holds values that are not finite (nan or infinity); run `{command}`")
    return tensors


def check_checksums(
    directory: Path, config: dict, metadata: dict, model_config: ModelConfig, vocab: Vocabulary
) -> None:
    """The model section and the vocabulary are the ones the weights were saved with: config.json's checksums,
    and the weights file's copies of them when it has some, must match what is there now."""
    actual = {"model_sha256": model_sha256(model_section(model_config)), "vocab_sha256": vocabulary_sha256(vocab)}
    changed = {"model_sha256": f"{CONFIG_FILE}'s 'model' section", "vocab_sha256": VOCAB_FILE}
    for key in CHECKSUM_KEYS:
        for source, recorded in ((CONFIG_FILE, config.get(key)), (WEIGHTS_FILE, metadata.get(key))):
            if recorded is not None and recorded != actual[key]:
                raise InputError(
                    f"{directory}: {changed[key]} was changed after the weights were saved ({key} in {source} "
                    f"is {recorded[:12]}..., the file now gives {actual[key][:12]}...); it no longer matches "
                    f"{WEIGHTS_FILE}: restore it"
                )


def load_average(directories: list[str | Path]) -> tuple[CaptionModel, Vocabulary, dict]:
    """Load several checkpoints of one model (e.g. the ends of successive training cycles) -> one model whose
    weights are their mean, tensor by tensor, with the first one's vocabulary and config. The encoder is loaded
    (and its fine-tuned blocks averaged) only when the model fine-tuned some.

    They must agree on the model config, the vocabulary and the encoder weights they were trained on."""
    if not directories:
        raise InputError("no checkpoints to average")
    first, *others = directories
    with_encoder = bool(read_config(Path(first)).get("model", {}).get("fine_tune_blocks"))
    model, vocab, config = load_model(first, with_encoder=with_encoder)
    if not others:
        return model, vocab, config
    sums = {name: tensor.double() for name, tensor in model.state_dict().items()}
    for directory in others:
        other, other_vocab, other_config = load_model(directory, with_encoder=with_encoder)
        for field, mine, theirs in (
            ("model", config["model"], other_config["model"]),
            ("encoder_sha256", config.get("encoder_sha256"), other_config.get("encoder_sha256")),
        ):
            if mine != theirs:
                raise InputError(f"{directory}: its config.json '{field}' differs from {first}'s; cannot average")
        if other_vocab != vocab:
            raise InputError(f"{directory}: its vocabulary differs from {first}'s; cannot average")
        for name, tensor in other.state_dict().items():
            sums[name] += tensor.double()
    state = model.state_dict()
    model.load_state_dict(
        {name: (sums[name] / len(directories)).to(t.dtype) if t.is_floating_point() else t for name, t in state.items()}
    )
    return model, vocab, config


def _load_state(module: torch.nn.Module, tensors: dict, path: Path, part: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise InputError(f"{path}: {part} tensors do not match config.json ({' '.join(first[:3])})") from None
