"""Plain-data model checkpoints: a directory of model.safetensors + config.json + vocab.json. Nothing pickled.

One loader (`load_model`) is used by evaluation, captioning, the server and training's resume.
A frozen encoder is not stored: the checkpoint names the sha256 of the encoder weights it was trained on,
and loading checks that the local encoder weights are those. A fine-tuned encoder is stored with the decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from show_attend_tell.config import ModelConfig, from_dict, save_json, to_dict, write_atomically
from show_attend_tell.errors import InputError
from show_attend_tell.model import CaptionModel, Encoder
from show_attend_tell.text import Vocabulary

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


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
    config = {
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.config),
        "encoder_sha256": encoder_sha256,
        "dtype": "float16" if half else "float32",
        **(extra or {}),
    }
    write_atomically(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format_version": "1"}))
    write_atomically(directory / CONFIG_FILE, lambda p: save_json(config, p))
    write_atomically(directory / VOCAB_FILE, vocab.save)
    return directory


def read_config(directory: str | Path) -> dict:
    """config.json of a checkpoint, with its format version checked."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not a model checkpoint ({CONFIG_FILE} missing)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
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
    inference: bool = False,
    int8: bool = False,
) -> tuple[CaptionModel, Vocabulary, dict]:
    """Load a checkpoint directory -> (model in eval mode, vocabulary, config dict).

    with_encoder=False skips the encoder (enough for cached features). pretrained_encoder=False builds an
    untrained encoder (tests); otherwise the local encoder weights must match the recorded sha256.
    inference=True gives the decoder made fast for inference (inference.for_inference; no gradients), int8=True
    the int8 one (CPU only). Without either it is model.py's, for training or export.
    """
    if int8 and torch.device(device).type != "cpu":
        raise InputError(f"int8 decoding runs on the CPU only, not on {device}")
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_config = from_dict(ModelConfig, config["model"])
    except (TypeError, ValueError) as error:
        raise InputError(f"{directory / CONFIG_FILE}: bad 'model' section ({error})") from None
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
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{weights_path}: truncated or corrupt safetensors file ({error})") from None

    encoder_tensors = {k[len("encoder.") :]: v.float() for k, v in tensors.items() if k.startswith("encoder.")}
    encoder = None
    if with_encoder:
        encoder = Encoder(model_config, pretrained=pretrained_encoder)
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
    model.eval()
    if inference or int8:
        from show_attend_tell.inference import for_inference

        model = for_inference(model, int8=int8)
    return model.to(device), vocab, config


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
