"""CPU inference beside the readable model: the encoder and the attention energies in cache-sized chunks, and
the int8 decoder. Chosen explicitly when a model is loaded for inference (`for_inference`, which
runtime.load_model calls); model.py never branches on any of it. Their calibration: calibration.py.

Shapes use the letters declared in model.py. Why each trick is here, with its measurements: results/cpu_ops.json
(encoder and energy chunks, the product form, the int8 layers) and results/decode_speed*.json.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from show_attend_tell.config import DEFAULT_BEAM_SIZE, ModelConfig
from show_attend_tell.decoder import rows_per_image
from show_attend_tell.fast_encoder import FastEncoder, until_stage
from show_attend_tell.model import CaptionDecoder, CaptionModel, Encoded, Encoder, SoftAttention, attend
from show_attend_tell.weights import image_transform

# Input pixels per encoder forward on CPU: batches larger than the core's caches ran slower per image
# (results/cpu_ops.json, encoder_ms_per_image).
CPU_CHUNK_PIXELS = 4 * 224 * 224
# Attention energies per pass: one buffer reused while it stays in cache, instead of one (B, K, P, A) tensor
# (results/cpu_ops.json, attention_step).
ENERGY_CHUNK_BYTES = 4 << 20
# |terms| bound in the product form of the energies (see product_terms).
EXP_CLAMP = 43.0
_ONE = torch.ones(())


def cpu_chunk(pixels: int) -> int:
    """Images of `pixels` input pixels each per encoder forward on CPU: 4 at 224 px, 1 from 317 px."""
    return max(1, CPU_CHUNK_PIXELS // pixels)


@torch.no_grad()
def encode_images(encoder: Encoder | FastEncoder, images: torch.Tensor, stage: str = "") -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, P, E) grid features, or with `stage` the output of that residual
    block (B, h*w, C). On CPU a few images at a time, each chunk's output written straight into the result so
    its activations are freed for the next chunk (results/decode_speed*.json, photos_in_one_call)."""

    def run(part: torch.Tensor) -> torch.Tensor:
        return until_stage(encoder, part, stage) if stage else encoder(part)

    chunk = cpu_chunk(images.size(2) * images.size(3))
    if images.device.type != "cpu" or images.size(0) <= chunk:
        return run(images)
    first = run(images[:chunk])  # (chunk, ...)
    outputs = first.new_empty(images.size(0), *first.shape[1:])
    outputs[:chunk] = first
    for start in range(chunk, images.size(0), chunk):
        outputs[start : start + chunk] = run(images[start : start + chunk])
    return outputs


def image_features(
    encoder: Encoder | FastEncoder,
    pictures: Sequence[Image.Image],
    config: ModelConfig,
    device: str | torch.device = "cpu",
    *,
    stage: str = "",
) -> torch.Tensor:
    """Decoded RGB photos (images.load_image) -> their encoder features (see encode_images): the one place
    that transforms, stacks and encodes photos, for captioning, evaluation, feature caching and training."""
    transform = image_transform(config)
    batch = torch.stack([transform(picture) for picture in pictures]).to(device)  # (B, 3, S, S)
    return encode_images(encoder, batch, stage)


def energy_scores(terms: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor, *, product: bool) -> torch.Tensor:
    """(B, P, A) image terms, (B, K, 1, A) decoder terms, w (A,) -> 2 w^T sigmoid(u + v), (B, K, P), no grad.

    The energies are computed a few images at a time into one reused buffer that stays in the core's cache
    between the passes over it; one (B, K, P, A) tensor made each pass a trip to memory plus fresh pages
    (results/cpu_ops.json, attention_step). b is left out: softmax ignores a constant. product=True: the terms
    are e^-u and e^-v (see product_terms) and the energy is 1 / (1 + e^-u e^-v)."""
    B, K, _, A = hidden.shape
    P = terms.size(1)
    images = max(1, ENERGY_CHUNK_BYTES // (K * P * A * terms.element_size()))
    buffer = terms.new_empty(min(images, B), K, P, A)
    w = w.view(A, 1)
    scores = []
    for image_terms, decoder_terms in zip(terms.split(images), hidden.split(images), strict=True):
        energy = buffer[: image_terms.size(0)]  # (b, K, P, A)
        if product:
            torch.addcmul(_ONE, image_terms.unsqueeze(1), decoder_terms, out=energy).reciprocal_()
        else:
            torch.add(image_terms.unsqueeze(1), decoder_terms, out=energy).sigmoid_()
        scores.append(torch.matmul(energy.view(-1, A), w))
    return torch.cat(scores).mul_(2).view(B, K, P)


def product_terms(terms: torch.Tensor) -> torch.Tensor:
    """u -> e^-u for the product form: sigmoid(u + v) = 1 / (1 + e^-u e^-v), one multiply-add and a reciprocal
    per energy instead of an add and an exp (results/cpu_ops.json, attention_step).

    Terms are clamped to +-43, so every product lies in [e^-86, e^86]: finite and normal in fp32 (no inf * 0,
    no denormals). A term beyond that saturates the sigmoid either way unless the other is nearly as large and
    of opposite sign: the shipped model over 500 val and test photos had |u| <= 73 but |v| <= 13, so a clamped
    energy moves by less than e^-30."""
    return terms.clamp(-EXP_CLAMP, EXP_CLAMP).neg_().exp_()


class ChunkedAttention(SoftAttention):
    """SoftAttention for fp32 inference: the same alpha and context, the energies in chunks (energy_scores)."""

    @classmethod
    def of(cls, attention: SoftAttention) -> ChunkedAttention:
        chunked = cls(
            feature_dim=attention.encoder_projection.in_features,
            decoder_dim=attention.decoder_projection.in_features,
            attention_dim=attention.score.in_features,
        )
        chunked.load_state_dict(attention.state_dict())
        return chunked.to(attention.score.weight.device)

    def forward(self, encoded: Encoded, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():
            raise RuntimeError("ChunkedAttention is for inference (torch.no_grad); train the model of model.py")
        B, _, A = encoded.projected.shape
        hidden = self.decoder_projection(h).mul(2).view(B, rows_per_image(h.size(0), B), 1, A)
        return attend(energy_scores(encoded.projected, hidden, self.score.weight, product=False), encoded.features)


# ----- int8 -------------------------------------------------------------------------------------------------
# A beam-search step over a few rows is bound by reading fp32 weights; int8 reads a quarter of the bytes and
# runs VNNI kernels (results/cpu_ops.json, int8_layers_3_rows). Each layer's input is quantized over ranges
# calibrated once on training photos and stored with the model (calibrate_int8), so a photo's caption never
# depends on the photos decoded beside it and no step pays for measuring its inputs. torch.ao's dynamic
# quantization scaled each call's batch (6 of 11 variants of one photo were captioned differently alone and in a
# folder); scaling each row on its own fixed that but doubled the decoder's step (results/decode_speed*.json).
# One range per layer was too coarse for inputs whose channels differ in scale (the attended features beside
# the word embedding): each input channel is divided by its calibrated peak and the weights multiplied by it
# (SmoothQuant's migration, Xiao et al. 2023, with alpha = 1), which keeps the fp32 captions more often than one
# range per layer (results/int8_calibration.json).
_LINEAR = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
# Inputs map to [0, 127]: 7 bits, as torch.ao's reduce_range, so that the u8 x s8 pairs fbgemm sums in int16 on
# CPUs without VNNI cannot saturate.
_INPUT_LEVELS = 127
_TINY = 1e-6  # the peak of an input channel that calibration only saw at 0
INT8_LAYERS = (  # the decoder's quantized layers, by the name their input ranges are stored under
    "feature_projection",
    "encoder_projection",
    "init_h",
    "init_c",
    "h_projections",
    "input_gates",
    "hidden_gates",
    "deep_projections",
    "L_o",
)
InputRanges = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (low (in,), high (in,))
LayerFactory = Callable[[str, torch.Tensor, "torch.Tensor | None"], nn.Module]  # (name, weight, bias) -> a layer


class Int8Linear(nn.Module):
    """x W^T + b with int8 weights and static input quantization: input channel j, calibrated to lie in
    [low_j, high_j], is divided by its peak (the weights' column j multiplied by it), and the scaled input is
    quantized over one fixed range. (..., in) fp32 -> (..., out) fp32, each row the same whatever the other rows;
    inputs beyond the calibrated ranges saturate."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        peak = torch.maximum(low.abs(), high.abs()).float().clamp_min(_TINY)  # (in,)
        weight = weight.detach().float() * peak  # (out, in)
        scales = weight.abs().amax(dim=1).clamp_min(_TINY) / 127  # one per output channel
        zeros = torch.zeros(weight.size(0), dtype=torch.long)
        bias = torch.zeros(weight.size(0)) if bias is None else bias.detach().float()
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (no dependency)
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales.double(), zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, bias)
        self.out_features = weight.size(0)
        self.register_buffer("inverse_peak", 1 / peak, persistent=False)
        # the scaled inputs' range, within [-1, 1], widened to hold 0 exactly
        lowest, highest = min(float((low / peak).min()), 0.0), max(float((high / peak).max()), 0.0)
        self.input_scale = max(highest - lowest, _TINY) / _INPUT_LEVELS
        self.input_zero = round(-lowest / self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x * self.inverse_peak).view(-1, x.size(-1))  # (R, in)
        y = _LINEAR(rows, self.input_scale, self.input_zero, self.packed)  # (R, out)
        return y.view(*x.shape[:-1], self.out_features)


class RangeObserver(nn.Module):
    """An fp32 Linear that widens `ranges[name]`, per input channel (low (in,), high (in,)), to cover every input
    it sees: an Int8Decoder built with these runs in fp32 and measures the ranges (calibrate_int8)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str, ranges: dict) -> None:
        super().__init__()
        self.weight, self.bias = weight.detach().float(), None if bias is None else bias.detach().float()
        self.name, self.ranges = name, ranges

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (R, in)
        low, high = rows.amin(dim=0), rows.amax(dim=0)
        if self.name in self.ranges:
            seen_low, seen_high = self.ranges[self.name]
            low, high = torch.minimum(low, seen_low), torch.maximum(high, seen_high)
        self.ranges[self.name] = (low, high)
        return F.linear(x, self.weight, self.bias)


class Int8LSTMCell(nn.Module):
    """nn.LSTMCell with int8 gates (`layer` builds them, see Int8Decoder): input (N, I), (h, c) (N, D) each ->
    (h, c)."""

    def __init__(self, cell: nn.LSTMCell, layer: LayerFactory) -> None:
        super().__init__()
        self.input_gates = layer("input_gates", cell.weight_ih, cell.bias_ih + cell.bias_hh)
        self.hidden_gates = layer("hidden_gates", cell.weight_hh, None)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.input_gates(x).add_(self.hidden_gates(h))  # (N, 4D): input, forget, cell, output
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f).mul_(c).addcmul_(torch.sigmoid(i), torch.tanh(g))
        return torch.sigmoid(o).mul_(torch.tanh(c)), c


class ProductEncoded(NamedTuple):
    """What the int8 decoder computes once per image: features, and e^-u (not u: see product_terms)."""

    features: torch.Tensor  # (B, P, F)
    exp_neg_terms: torch.Tensor  # (B, P, A): e^-u_i, u_i = 2 (W_a a_i + b_a) clamped

    def select(self, index: torch.Tensor | slice) -> ProductEncoded:
        return ProductEncoded(self.features[index], self.exp_neg_terms[index])


class Int8Decoder(nn.Module):
    """CaptionDecoder's step with int8 weights, for CPU inference (a decoder.Decoder for search). Captions can differ
    slightly from fp32: `sat evaluate --int8` measures it (results/flickr8k_test_int8/). Built by `quantized`
    for inference, or with RangeObserver layers (fp32) to calibrate the ranges (calibrate_int8).

    Beyond the int8 weights: the layers that read the same input are one matmul each, since a beam step over a
    few rows costs a fixed overhead per layer (h -> [2 W_h h; f_beta(h)], [h; beta z] -> L_h h + L_z beta z),
    and the attention runs in the product form, in chunks. The score w (A -> 1) stays fp32: its weights are
    tiny, while quantizing its input would round the whole (N, P, A) energy tensor every step."""

    def __init__(self, decoder: CaptionDecoder, layer: LayerFactory) -> None:
        super().__init__()
        attention = decoder.attention
        self.embedding = decoder.embedding
        projection = decoder.feature_projection
        self.feature_projection = (
            nn.Sequential(layer("feature_projection", projection[0].weight, projection[0].bias), nn.ReLU())
            if isinstance(projection, nn.Sequential)
            else None
        )
        self.encoder_projection = layer(  # u = 2 (W_a a + b_a)
            "encoder_projection", 2 * attention.encoder_projection.weight, 2 * attention.encoder_projection.bias
        )
        self.init_h = layer("init_h", decoder.init_h[0].weight, decoder.init_h[0].bias)
        self.init_c = layer("init_c", decoder.init_c[0].weight, decoder.init_c[0].bias)
        self.split = (attention.score.in_features, decoder.f_beta.out_features)  # A, F
        self.h_projections = layer(  # h -> [2 (W_h h + b_h); f_beta(h)]
            "h_projections",
            torch.cat([2 * attention.decoder_projection.weight, decoder.f_beta.weight]),
            torch.cat([2 * attention.decoder_projection.bias, decoder.f_beta.bias]),
        )
        self.score = nn.Parameter(attention.score.weight.detach().view(-1).clone(), requires_grad=False)  # w (A,)
        self.lstm = Int8LSTMCell(decoder.lstm, layer)
        self.deep_projections = (
            layer(
                "deep_projections",
                torch.cat([decoder.L_h.weight, decoder.L_z.weight], dim=1),
                decoder.L_h.bias + decoder.L_z.bias,
            )
            if decoder.deep_output
            else None
        )
        self.L_o = layer("L_o", decoder.L_o.weight, decoder.L_o.bias)

    @classmethod
    def quantized(cls, decoder: CaptionDecoder, input_ranges: InputRanges) -> Int8Decoder:
        """The int8 decoder, each layer's input quantized over its calibrated ranges (calibrate_int8)."""

        def layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
            if name not in input_ranges:
                raise ValueError(f"no calibrated input ranges for the int8 layer {name!r}")
            low, high = input_ranges[name]
            if low.shape != (weight.size(1),) or high.shape != low.shape:
                raise ValueError(f"the input ranges of the int8 layer {name!r} are not for {weight.size(1)} inputs")
            return Int8Linear(weight, bias, low, high)

        return cls(decoder, layer)

    def encode(self, features: torch.Tensor) -> ProductEncoded:
        """(B, P, E) -> features projected to F (if configured) and e^-u, once per image."""
        if self.feature_projection is not None:
            features = self.feature_projection(features)  # (B, P, F)
        return ProductEncoded(features, product_terms(self.encoder_projection(features)))  # (B, P, F), (B, P, A)

    def init_state(self, encoded: ProductEncoded) -> tuple[torch.Tensor, torch.Tensor]:
        mean = encoded.features.mean(dim=1)  # (B, F)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))  # (B, D) each

    def step(
        self, words: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], encoded: ProductEncoded
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """As CaptionDecoder.step: words (N,) -> log p (N, V), (h, c), alpha (N, P)."""
        h, c = state
        B, _, A = encoded.exp_neg_terms.shape
        embedded = self.embedding(words)  # (N, M)
        hidden, beta_logits = self.h_projections(h).split(self.split, dim=1)  # (N, A), (N, F)
        hidden = product_terms(hidden).view(B, rows_per_image(h.size(0), B), 1, A)  # e^-v
        scores = energy_scores(encoded.exp_neg_terms, hidden, self.score, product=True)  # (B, K, P)
        context, alpha = attend(scores, encoded.features)  # (N, F), (N, P)
        gated = torch.sigmoid(beta_logits) * context  # (N, F)
        h, c = self.lstm(torch.cat([embedded, gated], dim=1), (h, c))  # (N, D) each
        out = embedded + self.deep_projections(torch.cat([h, gated], dim=1)) if self.deep_projections is not None else h
        return F.log_softmax(self.L_o(out), dim=1), (h, c), alpha


@torch.no_grad()
def calibrate_int8(
    decoder: CaptionDecoder, features: Iterable[torch.Tensor], *, beam_size: int = DEFAULT_BEAM_SIZE
) -> InputRanges:
    """The input ranges of each int8 layer, (low (in,), high (in,)) per input channel: the extremes of what it
    reads while beam search (the product's default beam) captions `features`, batches of (B, P, E) encoder
    features of training photos, in fp32."""
    from show_attend_tell.decoding import beam_search

    ranges: InputRanges = {}
    observed = Int8Decoder(decoder.eval(), lambda name, weight, bias: RangeObserver(weight, bias, name, ranges))
    for batch in features:
        beam_search(observed, observed.encode(batch.float()), beam_size=beam_size)
    return ranges


def int8_available(decoder: nn.Module) -> bool:
    """Whether `decoder` has an int8 version (Int8Decoder, the LSTM's): the Transformer has none yet."""
    return isinstance(decoder, CaptionDecoder)


@torch.no_grad()
def for_inference(model: CaptionModel, *, int8_ranges: InputRanges | None = None) -> CaptionModel:
    """The model in eval mode with its decoder made fast for inference: with `int8_ranges` (calibrate_int8) the
    int8 decoder (CPU only), else the fp32 decoder with chunked attention energies. Not for training: these
    decoders have no gradients."""
    model.eval()
    if not int8_available(model.decoder):  # transformer.py's decoder as it is: no speed-ups for it yet
        if int8_ranges is not None:
            raise ValueError("the Transformer decoder has no int8 version yet")
        return model
    if int8_ranges is not None:
        model.decoder = Int8Decoder.quantized(model.decoder, int8_ranges)
    else:
        model.decoder.attention = ChunkedAttention.of(model.decoder.attention)
    return model
