"""The frozen encoder at the speed of the hardware: one precision per run, chosen by what the CPU supports.

model.Encoder is the readable ResNet trunk. For inference (captioning, serving, feature caching, evaluation from
images) `FastEncoder` runs the same trunk with each convolution's BatchNorm folded into it, in channels-last
memory, and in one of three precisions:

- fp32: the fallback every CPU has (folding and channels-last only reorder the arithmetic);
- bf16: weights and activations in bfloat16, on CPUs with native bf16 (avx512_bf16 or AMX) where oneDNN runs it
  at about twice fp32's speed;
- int8: the trunk statically quantized with torch's x86 backend (FX graph mode), its activation ranges
  calibrated on training photos and stored with the model (`sat calibrate --encoder-int8`, calibration.py).

`auto` picks the fastest path the CPU supports among those measured to keep the captions (results/
encoder_precision.json: int8's features differ too much and it is left to the flag). Features always leave the
encoder in fp32, so nothing downstream depends on the precision; feature stores record it (features.py).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from show_attend_tell.errors import InputError
from show_attend_tell.model import Encoder
from show_attend_tell.records import cpuinfo
from show_attend_tell.stages import run_until

ENCODER_PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"
# CPU flags (/proc/cpuinfo) that make each precision fast: native bf16 dot products, and VNNI's int8 ones.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# The precisions `auto` may choose, fastest first: int8 is not among them (results/encoder_precision.json).
AUTO_ORDER = ("bf16", "fp32")
# Training photos the int8 encoder's activation ranges are measured on (`sat calibrate --encoder-int8`).
ENCODER_CALIBRATION_IMAGES = 64


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: then only fp32 is fast)."""
    return frozenset(cpuinfo("flags").split())


def supported_precisions(device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> list[str]:
    """The precisions this device runs fast: fp32 always; bf16 and int8 on CPUs whose flags have the
    instructions (on CUDA: bf16 where the GPU has it; int8 is CPU only)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    flags = cpu_flags() if flags is None else flags
    found = ["fp32"]
    if flags & BF16_FLAGS and torch.backends.mkldnn.is_available():
        found.append("bf16")
    if flags & INT8_FLAGS and "x86" in torch.backends.quantized.supported_engines:
        found.append("int8")
    return found


def resolve_precision(requested: str, device: str | torch.device = "cpu", flags: frozenset[str] | None = None) -> str:
    """ "auto" -> the fastest of AUTO_ORDER this device supports; a named precision -> itself if supported,
    else an InputError saying what the CPU lacks."""
    supported = supported_precisions(device, flags)
    if requested == AUTO:
        return next(precision for precision in AUTO_ORDER if precision in supported)
    if requested not in ENCODER_PRECISIONS:
        raise InputError(f"--encoder-precision {requested!r}: expected auto or one of {', '.join(ENCODER_PRECISIONS)}")
    if requested not in supported:
        needs = {"bf16": BF16_FLAGS, "int8": INT8_FLAGS}[requested]
        where = "this GPU" if torch.device(device).type == "cuda" else "this CPU"
        raise InputError(
            f"--encoder-precision {requested}: {where} has no fast {requested} "
            f"(needs one of {', '.join(sorted(needs))}); supported here: {', '.join(supported)}"
        )
    return requested


def fold_batch_norms(encoder: Encoder) -> Encoder:
    """A copy of the encoder with every BatchNorm folded into the convolution before it (the stem's and each
    bottleneck's, shortcut included), the norms replaced by identities: one pass over each activation less,
    and the module structure (blocks, stages.run_until) kept."""
    encoder = copy.deepcopy(encoder).eval()
    stem_conv, stem_norm = encoder.trunk[0], encoder.trunk[1]
    encoder.trunk[0], encoder.trunk[1] = fuse_conv_bn_eval(stem_conv, stem_norm), nn.Identity()
    for block in encoder.blocks.values():
        for index in (1, 2, 3):
            conv, norm = getattr(block, f"conv{index}"), getattr(block, f"bn{index}")
            setattr(block, f"conv{index}", fuse_conv_bn_eval(conv, norm))
            setattr(block, f"bn{index}", nn.Identity())
        if block.downsample is not None:
            block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def _int8_prepared(trunk: nn.Sequential, example: torch.Tensor) -> nn.Module:
    """The trunk with observers on every activation, as torch's x86 backend quantizes it (FX graph mode; the
    BatchNorms are fused by the preparation itself). Histogram observers without reduced range: the smallest
    feature error of the observers tried (results/encoder_precision.json)."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import HistogramObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    qconfig = QConfig(
        activation=HistogramObserver.with_args(reduce_range=False),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    with warnings.catch_warnings():  # torch.ao's notice that FX quantization moves to torchao
        warnings.simplefilter("ignore")
        return prepare_fx(copy.deepcopy(trunk).eval(), QConfigMapping().set_global(qconfig), (example,))


def _observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in prepared.state_dict().items()
        if "activation_post_process" in name
    }


@torch.no_grad()
def calibrate_int8_encoder(encoder: Encoder, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run normalised training photos (B, 3, S, S) through the observed trunk -> its activation observers'
    state (histograms and ranges), what `FastEncoder(..., "int8", calibration=...)` quantizes with."""
    prepared = None
    for images in batches:
        prepared = prepared or _int8_prepared(encoder.trunk, images[:1])
        prepared(images)
    if prepared is None:
        raise ValueError("no calibration photos")
    return _observer_state(prepared)


def _int8_trunk(encoder: Encoder, calibration: dict[str, torch.Tensor], image_size: int) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _int8_prepared(encoder.trunk, torch.zeros(1, 3, image_size, image_size))
    expected = _observer_state(prepared).keys()
    if calibration.keys() != expected:
        missing = sorted(expected - calibration.keys())[:3]
        raise ValueError(f"the encoder's int8 calibration does not fit this trunk (missing e.g. {missing})")
    prepared.load_state_dict(calibration, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


class FastEncoder(nn.Module):
    """A frozen model.Encoder for inference in one precision: (B, 3, S, S) normalised images -> (B, P, E) fp32
    grid features, like Encoder.forward. fp32 and bf16 keep the residual blocks (`blocks`, `forward_until`);
    int8 is one quantized graph."""

    def __init__(
        self,
        encoder: Encoder,
        precision: str,
        *,
        calibration: dict[str, torch.Tensor] | None = None,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(f"unknown encoder precision {precision!r}")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.pool = encoder.pool
        if precision == "int8":
            if calibration is None:
                raise ValueError("the int8 encoder needs a calibration (calibrate_int8_encoder)")
            self.trunk = _int8_trunk(encoder, calibration, image_size)
            self.blocks: dict[str, nn.Module] = {}
            self.folded = None
        else:
            self.folded = fold_batch_norms(encoder).to(dtype=self.dtype, memory_format=torch.channels_last)
            self.trunk = self.folded.trunk
            self.blocks = self.folded.blocks

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(dtype=self.dtype, memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.pool(self.trunk(self._input(images)))  # (B, E, g, g)
        return grid.flatten(2).transpose(1, 2).float()  # (B, P, E)

    def forward_until(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """The output of residual block `stage` (B, h*w, C) in fp32, as stages.run_until."""
        if self.folded is None:
            raise InputError("the int8 encoder runs the whole trunk only; cache a block's output in fp32 or bf16")
        return run_until(self.folded, self._input(images), stage).float()


def until_stage(encoder: Encoder | FastEncoder, images: torch.Tensor, stage: str) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> the output of residual block `stage` (B, h*w, C): model.Encoder's in
    fp32 (stages.run_until), a FastEncoder's in its precision."""
    if isinstance(encoder, FastEncoder):
        return encoder.forward_until(images, stage)
    return run_until(encoder, images, stage)
