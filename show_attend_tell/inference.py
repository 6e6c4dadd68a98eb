"""CPU inference beside the readable model: the encoder and the attention energies in cache-sized chunks, and
the int8 decoder. Chosen explicitly when a model is loaded for inference (`for_inference`, which
`checkpoint.load_model(..., inference=True)` calls); model.py never branches on any of it.

Shapes use the letters declared in model.py. Why each trick is here, with its measurements: results/cpu_ops.json
(encoder and energy chunks, the product form, the int8 layers) and results/decode_speed*.json.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from show_attend_tell.config import ModelConfig
from show_attend_tell.model import (
    CaptionDecoder,
    CaptionModel,
    Encoded,
    Encoder,
    SoftAttention,
    attend,
    image_transform,
    rows_per_image,
)

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
def encode_images(encoder: Encoder, images: torch.Tensor, stage: str = "") -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, P, E) grid features, or with `stage` the output of that residual
    block (B, h*w, C). On CPU a few images at a time, each chunk's output written straight into the result so
    its activations are freed for the next chunk (results/decode_speed*.json, photos_in_one_call)."""

    def run(part: torch.Tensor) -> torch.Tensor:
        return encoder.forward_until(part, stage) if stage else encoder(part)

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
    encoder: Encoder,
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
# runs VNNI kernels (results/cpu_ops.json, int8_layers_3_rows). Every row's input is quantized with its own
# scale (its largest magnitude maps to the edge of the int8 grid), so a photo's caption never depends on the
# photos decoded beside it; torch.ao's dynamic quantization scaled the whole batch at once, and 6 of 11
# variants of one photo were captioned differently alone and in a folder (tests/test_inference.py).
_LINEAR = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
# Inputs divided by their row's peak lie in [-1, 1] -> [1, 127]: 7 bits, as torch.ao's reduce_range, so that
# the u8 x s8 pairs fbgemm sums in int16 on CPUs without VNNI cannot saturate.
_INPUT_SCALE, _INPUT_ZERO = 1 / 63, 64
_TINY = 1e-12  # the peak of an all-zero row


class RowInt8Linear(nn.Module):
    """x W^T + b with int8 weights (one scale per output channel) and each input row quantized on its own:
    (..., in) fp32 -> (..., out) fp32, row by row the same whatever the other rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp_min(_TINY) / 127
        zeros = torch.zeros(weight.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (no dependency)
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales.double(), zeros, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.out_features = weight.size(0)
        bias = torch.zeros(weight.size(0)) if bias is None else bias.detach().float()
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def of(cls, linear: nn.Linear, scale: float = 1.0) -> RowInt8Linear:
        """From an fp32 Linear, its outputs times `scale` (a power of two keeps the rounding)."""
        return cls(linear.weight * scale, linear.bias * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (R, in)
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_min_(_TINY)  # (R, 1)
        y = _LINEAR(rows / peak, _INPUT_SCALE, _INPUT_ZERO, self.packed)  # (R, out)
        return torch.addcmul(self.bias, y, peak).view(*x.shape[:-1], self.out_features)


class Int8LSTMCell(nn.Module):
    """nn.LSTMCell with RowInt8Linear gates: input (N, I), (h, c) (N, D) each -> (h, c)."""

    def __init__(self, cell: nn.LSTMCell) -> None:
        super().__init__()
        self.input_gates = RowInt8Linear(cell.weight_ih, cell.bias_ih + cell.bias_hh)
        self.hidden_gates = RowInt8Linear(cell.weight_hh, None)

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
    """CaptionDecoder's step with int8 weights, for CPU inference (a model.Decoder). Captions can differ
    slightly from fp32: `sat evaluate --int8` measures it (results/flickr8k_test_int8/).

    Beyond the int8 weights: the layers that read the same input are one matmul each, since a beam step over a
    few rows costs a fixed overhead per layer (h -> [2 W_h h; f_beta(h)], [h; beta z] -> L_h h + L_z beta z),
    and the attention runs in the product form, in chunks. The score w (A -> 1) stays fp32: its weights are
    tiny, while quantizing its input would round the whole (N, P, A) energy tensor every step."""

    def __init__(self, decoder: CaptionDecoder) -> None:
        super().__init__()
        attention = decoder.attention
        self.embedding = decoder.embedding
        projection = decoder.feature_projection
        self.feature_projection = (
            nn.Sequential(RowInt8Linear.of(projection[0]), nn.ReLU()) if isinstance(projection, nn.Sequential) else None
        )
        self.encoder_projection = RowInt8Linear.of(attention.encoder_projection, scale=2)  # u = 2 (W_a a + b_a)
        self.init_h = RowInt8Linear.of(decoder.init_h[0])
        self.init_c = RowInt8Linear.of(decoder.init_c[0])
        self.split = (attention.score.in_features, decoder.f_beta.out_features)  # A, F
        self.h_projections = RowInt8Linear(  # h -> [2 (W_h h + b_h); f_beta(h)]
            torch.cat([2 * attention.decoder_projection.weight, decoder.f_beta.weight]),
            torch.cat([2 * attention.decoder_projection.bias, decoder.f_beta.bias]),
        )
        self.score = nn.Parameter(attention.score.weight.detach().view(-1).clone(), requires_grad=False)  # w (A,)
        self.lstm = Int8LSTMCell(decoder.lstm)
        self.deep_projections = (
            RowInt8Linear(
                torch.cat([decoder.L_h.weight, decoder.L_z.weight], dim=1), decoder.L_h.bias + decoder.L_z.bias
            )
            if decoder.deep_output
            else None
        )
        self.L_o = RowInt8Linear.of(decoder.L_o)

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
def for_inference(model: CaptionModel, *, int8: bool = False) -> CaptionModel:
    """The model in eval mode with its decoder made fast for inference: the int8 decoder (CPU only), or the
    fp32 decoder with chunked attention energies. Not for training: these decoders have no gradients."""
    model.eval()
    if int8:
        model.decoder = Int8Decoder(model.decoder)
    else:
        model.decoder.attention = ChunkedAttention.of(model.decoder.attention)
    return model
