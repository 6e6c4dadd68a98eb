"""The captioning model in one file: encoder, soft attention, the decoder step, the teacher-forced forward.

Shape letters used in the comments below:
    B images, N rows being decoded (captions, beams or samples), P attention locations (grid_size**2),
    E encoder channels, F channels of the features the decoder attends over (feature_dim, or E when 0),
    A attention dim, D decoder dim, M embedding dim, T caption length, V vocabulary, K beam width,
    S input side in pixels, C channels and h x w the grid of an inner residual block's output (a cached stage).

Xu et al. 2015, section 3.1.2 and 4.2: at step t the attention reads h_{t-1}, forms the context z_t, gates
it with beta_t, and the LSTM consumes [E y_{t-1}; beta_t z_t] to give h_t, from which y_t is predicted.
`CaptionDecoder.step` is the only code that computes a word distribution; every decoder goes through it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from show_attend_tell.config import ModelConfig
from show_attend_tell.text import PAD_ID

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (N, D)


def image_transform(config: ModelConfig):
    """PIL RGB image -> (3, S, S) encoder input: the whole photo resized to S x S (a caption describes the
    whole scene, so no crop), normalised with the mean/std that belong to the encoder weights."""
    from torchvision import transforms

    from show_attend_tell.weights import ENCODER_WEIGHTS

    weights = ENCODER_WEIGHTS[config.encoder]
    return transforms.Compose(
        [
            transforms.Resize((config.image_size, config.image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(weights.mean, weights.std),
        ]
    )


class Encoded(NamedTuple):
    """Image features with their attention term, computed once per image, not once per step."""

    features: torch.Tensor  # (N, P, F)
    projected: torch.Tensor  # (N, P, A): 2 (W_a a_i + b_a), see SoftAttention.project

    def select(self, index: torch.Tensor) -> Encoded:
        """Rows `index` (e.g. each caption's image, or the images still decoding) without recomputing anything."""
        return Encoded(self.features[index], self.projected[index])


CPU_CHUNK_PIXELS = 4 * 224 * 224  # input pixels per encoder forward on CPU at inference (see Encoder.forward)
ENERGY_CHUNK_BYTES = 4 << 20  # attention energies per pass at inference (see SoftAttention.forward)
EXP_CLAMP = 43.0  # |terms| bound in the product form of the energies (see SoftAttention.project)
_ONE = torch.ones(())


class Encoder(nn.Module):
    """A ResNet trunk (no pooling/classifier) pooled to a grid_size x grid_size grid of E-dim features.

    The trunk is frozen (and its BatchNorm statistics always fixed) except the blocks named in
    `config.fine_tune_blocks`, which train with their own learning rate.
    """

    def __init__(self, config: ModelConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        from show_attend_tell.weights import ENCODER_WEIGHTS

        resnet = ENCODER_WEIGHTS[config.encoder].build(pretrained=pretrained)
        self.trunk = nn.Sequential(
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        self.pool = nn.AdaptiveAvgPool2d(config.grid_size)
        self.fine_tune_blocks = tuple(config.fine_tune_blocks)
        self.blocks = trunk_blocks(self.trunk)
        names = self.module_names()
        unknown = set(self.fine_tune_blocks) - set(names)
        if unknown:
            raise ValueError(
                f"fine_tune_blocks: unknown block(s) {sorted(unknown)}; expected layers (layer1..layer4) or "
                f"residual blocks such as {list(self.blocks)[-1]}"
            )
        for parameter in self.trunk.parameters():
            parameter.requires_grad_(False)
        for block in self.fine_tune_blocks:
            for parameter in names[block].parameters():
                parameter.requires_grad_(True)

    def module_names(self) -> dict[str, nn.Module]:
        """Every name fine_tune_blocks accepts: layer1..layer4 and their residual blocks (layer4.2, ...)."""
        return {**{f"layer{i}": self.trunk[3 + i] for i in range(1, 5)}, **self.blocks}

    def tuned_prefixes(self) -> list[str]:
        """state_dict key prefixes of the fine-tuned modules (what a checkpoint must store beside the decoder)."""
        index = {id(module): name for name, module in self.named_modules()}
        return [
            index[id(module)] + "." for name, module in self.module_names().items() if name in self.fine_tune_blocks
        ]

    def check_stage(self, stage: str) -> None:
        """Refuse a cache point that is not a block, or that comes after a fine-tuned block."""
        if stage not in self.blocks:
            raise ValueError(f"unknown encoder stage {stage!r}; expected a residual block such as layer4.0")
        order = list(self.blocks)
        position = order.index(stage)
        for name in self.fine_tune_blocks:
            first = name if name in self.blocks else f"{name}.0"
            if order.index(first) <= position:
                raise ValueError(
                    f"fine-tuned block {name} runs before the cached stage {stage}; cache an earlier stage "
                    "or train from images"
                )

    def forward_until(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, h*w, C), the output of residual block `stage` (e.g. layer4.0): what a
        feature store caches when the blocks after it are fine-tuned on cached inputs. Chunked on CPU as forward."""
        chunked = _in_cpu_chunks(lambda part: self.forward_until(part, stage), images)
        if chunked is not None:
            return chunked
        x = self.trunk[:4](images)  # stem: conv, BatchNorm, ReLU, max-pool
        for name, block in self.blocks.items():
            x = block(x)
            if name == stage:
                return x.flatten(2).transpose(1, 2)
        raise ValueError(f"unknown encoder stage {stage!r}")

    def forward_from(self, cached: torch.Tensor, stage: str) -> torch.Tensor:
        """The rest of the trunk after block `stage`, then the grid pooling: (B, h*w, C) -> (B, P, E)."""
        side = math.isqrt(cached.size(1))
        x = cached.transpose(1, 2).unflatten(2, (side, side))  # (B, C, h, w)
        after = False
        for name, block in self.blocks.items():
            if after:
                x = block(x)
            after = after or name == stage
        if not after:
            raise ValueError(f"unknown encoder stage {stage!r}")
        return self.pool(x).flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> Encoder:
        # Small captioning batches would corrupt ImageNet BatchNorm statistics: keep them fixed.
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, P, E) grid features.

        On CPU, inference runs a few images at a time, CPU_CHUNK_PIXELS of input per forward: ResNet-50 on the
        2-core target machine took ~55 ms per image at 224 px in batches of 2-4 and ~87 ms in batches of 32, whose
        activations overflow the caches; at 448 px, 204 ms one at a time and 290 ms in batches of 4
        (results/cpu_ops.json). Each chunk's grid goes straight into the output, so its activations are freed for
        the next chunk to reuse; keeping every chunk's grid for one torch.cat made 32 photos in one call slower
        per photo than 32 calls (photo to caption 0.97x before, 1.03-1.08x after: results/decode_speed*.json)."""
        chunked = _in_cpu_chunks(self, images)
        if chunked is not None:
            return chunked
        grid = self.pool(self.trunk(images))  # (B, E, g, g)
        return grid.flatten(2).transpose(1, 2)  # (B, P, E)


def _in_cpu_chunks(run, images: torch.Tensor) -> torch.Tensor | None:
    """run(images) cpu_chunk images at a time, each chunk's output written straight into the result, for CPU
    inference on more images than a chunk (see Encoder.forward); None where that does not apply."""
    chunk = cpu_chunk(images.size(2) * images.size(3))
    if images.device.type != "cpu" or torch.is_grad_enabled() or images.size(0) <= chunk:
        return None
    first = run(images[:chunk])  # (chunk, ...)
    outputs = first.new_empty(images.size(0), *first.shape[1:])
    outputs[:chunk] = first
    for start in range(chunk, images.size(0), chunk):
        outputs[start : start + chunk] = run(images[start : start + chunk])
    return outputs


def trunk_blocks(trunk: nn.Sequential) -> dict[str, nn.Module]:
    """The residual blocks of a ResNet trunk in order, by name: layer1.0, ..., layer4.2 (ResNet-50)."""
    return {f"layer{i}.{j}": block for i in range(1, 5) for j, block in enumerate(trunk[3 + i])}


def stage_shape(config: ModelConfig, stage: str) -> tuple[int, int]:
    """(side, channels) of the output of residual block `stage` (e.g. layer4.0) for config.image_size inputs:
    the stem divides the side by 4, the first block of layer2..layer4 by 2 more, each rounding up."""
    layer = int(stage.removeprefix("layer").split(".")[0])
    side = config.image_size
    for _ in range(1 + layer):  # stem conv and max-pool, then one stride per layer after layer1
        side = -(-side // 2)
    return side, 256 * 2 ** (layer - 1)


def cpu_chunk(pixels: int) -> int:
    """Images of `pixels` input pixels each per encoder forward on CPU: 4 at 224 px, 1 from 317 px."""
    return max(1, CPU_CHUNK_PIXELS // pixels)


class SoftAttention(nn.Module):
    """Bahdanau attention: e = w^T tanh(W_a a_i + W_h h), alpha = softmax(e), context = sum_i alpha_i a_i."""

    def __init__(self, *, feature_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_projection = nn.Linear(feature_dim, attention_dim)  # W_a
        self.decoder_projection = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w
        self.product_form = False  # inference only: int8_decoder sets it (see project)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, F) features -> their term of the energy, u_i = 2 (W_a a_i + b_a), once per image (doubled for
        the sigmoid form in forward).

        In the product form it stores exp(-u_i) instead: with v = 2 W_h h, sigmoid(u_i + v) = 1 / (1 + e^-u_i
        e^-v), one multiply-add and a reciprocal per energy instead of an add and an exp. Both terms are clamped
        to +-43, so every product lies in [e^-86, e^86]: finite and normal in fp32 (no inf * 0, no denormals).
        A term beyond that saturates the sigmoid either way unless the other is nearly as large and of opposite
        sign: the shipped model over 500 val and test photos had |u| <= 73 but |v| <= 13, so a clamped energy
        moves by less than e^-30."""
        projected = self.encoder_projection(features).mul(2)
        if self.product_form:
            return projected.clamp_(-EXP_CLAMP, EXP_CLAMP).neg_().exp_()
        return projected

    def forward(
        self, encoded: Encoded, h: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """encoded (B rows), h (N, D) with N = B*K: K consecutive rows per image (its beams or samples; K = 1
        for one row per image) -> context (N, F), alpha (N, P). The K rows of an image read its features in
        place, so beams never copy them. `hidden` is 2 W_h h (N, A) when the caller has computed it already.

        w^T tanh(u) = 2 w^T sigmoid(2u) - sum(w), and softmax ignores a constant: the same alpha from sigmoid,
        which ran ~6x faster than tanh on the target CPU (results/cpu_ops.json); tanh was the largest cost of
        a beam step. tests/test_model.py checks alpha, context and gradients against the paper's formula."""
        B, P, A = encoded.projected.shape
        N = h.size(0)
        if N % B:
            raise ValueError(f"attention: {N} decoder rows do not split evenly over {B} images")
        K = N // B
        if hidden is None:
            hidden = self.decoder_projection(h).mul(2)  # (N, A)
        hidden = hidden.view(B, K, 1, A)
        if torch.is_grad_enabled():
            energy = torch.add(encoded.projected.unsqueeze(1), hidden).sigmoid_()  # (B, K, P, A)
            # 2 (w^T sigmoid + b) in one op; b cannot move alpha, but trains
            alpha = torch.addmv(self.score.bias, energy.view(-1, A), self.score.weight.view(A), beta=2, alpha=2)
        else:
            alpha = self._inference_scores(encoded.projected, hidden)
        alpha = alpha.view(B, K, P).softmax(dim=2)  # (B, K, P)
        context = torch.bmm(alpha, encoded.features)  # (B, K, F)
        return context.view(N, -1), alpha.view(N, P)

    def _inference_scores(self, projected: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, P, A) image terms, (B, K, 1, A) decoder terms -> 2 w^T sigmoid(u + v), (B*K*P), without grad.

        The energies are computed a few images at a time into one reused buffer that stays in the core's cache
        between the passes over it; one (B, K, P, A) tensor (38 MB for 32 photos x 3 beams on a 14x14 grid)
        made each pass a trip to memory plus fresh pages: 19.3 ms per call against 5.1 in chunks and 3.8 in chunks
        in the product form (results/cpu_ops.json, attention_step). b is left out: softmax ignores a constant."""
        B, K, _, A = hidden.shape
        P = projected.size(1)
        images = max(1, ENERGY_CHUNK_BYTES // (K * P * A * projected.element_size()))
        buffer = projected.new_empty(min(images, B), K, P, A)
        w = self.score.weight.view(A, 1)
        if self.product_form:
            hidden = hidden.clamp(-EXP_CLAMP, EXP_CLAMP).neg_().exp_()
        scores = []
        for image_terms, decoder_terms in zip(projected.split(images), hidden.split(images), strict=True):
            energy = buffer[: image_terms.size(0)]  # (b, K, P, A)
            if self.product_form:  # 1 / (1 + e^-u e^-v)
                torch.addcmul(_ONE, image_terms.unsqueeze(1), decoder_terms, out=energy).reciprocal_()
            else:
                torch.add(image_terms.unsqueeze(1), decoder_terms, out=energy).sigmoid_()
            scores.append(torch.matmul(energy.view(-1, A), w))
        return torch.cat(scores).mul_(2).view(-1)


class CaptionDecoder(nn.Module):
    """The LSTM decoder with soft attention, the beta gate and (optionally) the deep output layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, A, D, M, V = (
            config.encoder_dim,
            config.attention_dim,
            config.decoder_dim,
            config.embed_dim,
            config.vocab_size,
        )
        features_dim = config.feature_dim or E
        self.deep_output = config.deep_output
        self.embedding = nn.Embedding(V, M, padding_idx=PAD_ID)
        # Beyond the paper: a_i -> ReLU(W_f a_i) once per image. Every per-step multiply that reads the context
        # (LSTM input, beta gate, deep output) then works on F instead of E channels.
        self.feature_projection = (
            nn.Sequential(nn.Linear(E, features_dim), nn.ReLU(), nn.Dropout(config.dropout))
            if config.feature_dim
            else None
        )
        self.attention = SoftAttention(feature_dim=features_dim, decoder_dim=D, attention_dim=A)
        self.init_h = nn.Sequential(nn.Linear(features_dim, D), nn.Tanh())  # h_0 = MLP(mean_i a_i)
        self.init_c = nn.Sequential(nn.Linear(features_dim, D), nn.Tanh())  # c_0 = MLP(mean_i a_i)
        self.f_beta = nn.Linear(D, features_dim)  # beta = sigmoid(f_beta(h_{t-1})), section 4.2.1
        self.lstm = nn.LSTMCell(M + features_dim, D)
        self.dropout = nn.Dropout(config.dropout)
        if self.deep_output:  # eq. 7: p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))
            self.L_h = nn.Linear(D, M)
            self.L_z = nn.Linear(features_dim, M)
            self.L_o = nn.Linear(M, V)
        else:
            self.L_o = nn.Linear(D, V)
        # Set by int8_decoder: the layers that read the same input merged into one matmul each.
        self.h_projections: nn.Module | None = None  # h -> [2 W_h h; f_beta(h)]
        self.h_split = (A, features_dim)
        self.deep_projections: nn.Module | None = None  # [h; beta z] -> L_h h + L_z beta z

    def encode(self, features: torch.Tensor) -> Encoded:
        """(B, P, E) encoder features -> Encoded: projected to F (if configured), and the attention's term
        W_a a_i, both done once per image."""
        if self.feature_projection is not None:
            features = self.feature_projection(features)  # (B, P, F)
        return Encoded(features, self.attention.project(features))  # (B, P, F), (B, P, A)

    def init_state(self, encoded: Encoded) -> State:
        mean = encoded.features.mean(dim=1)  # (N, F)
        return self.init_h(mean), self.init_c(mean)  # (N, D) each

    def step(self, words: torch.Tensor, state: State, encoded: Encoded) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step: previous words (N,) -> log p(next word) (N, V), new state, alpha (N, P).

        `encoded` holds B images and the N = B*K rows are K consecutive rows per image (see SoftAttention)."""
        h, c = state
        embedded = self.embedding(words)  # (N, M)
        if self.h_projections is None:
            hidden, beta_logits = None, self.f_beta(h)  # the attention projects h itself; (N, F)
        else:
            hidden, beta_logits = self.h_projections(h).split(self.h_split, dim=1)  # (N, A), (N, F)
        context, alpha = self.attention(encoded, h, hidden)  # (N, F), (N, P)
        gated = torch.sigmoid(beta_logits) * context  # (N, F)
        h, c = self.lstm(torch.cat([embedded, gated], dim=1), (h, c))  # (N, D) each
        if not self.deep_output:
            out = h
        elif self.deep_projections is None:
            out = embedded + self.L_h(h) + self.L_z(gated)  # (N, M)
        else:
            out = embedded + self.deep_projections(torch.cat([h, gated], dim=1))
        logits = self.L_o(self.dropout(out) if self.training else out)  # (N, V)
        return F.log_softmax(logits, dim=1), (h, c), alpha


def int8_decoder(decoder: CaptionDecoder) -> CaptionDecoder:
    """A copy of the decoder with int8 weights in its Linear and LSTMCell layers (dynamic quantization), for
    CPU inference. A beam-search step over a few rows is bound by reading fp32 weights; int8 reads a quarter
    of the bytes and runs VNNI kernels, ~4x faster per step here. Captions can differ slightly: `sat evaluate
    --int8` measures the effect (results/ records it for the shipped model). Activations are scaled per call,
    so a photo's log-probabilities move a little (~1%) with the other photos of its batch.

    The attention score w (A -> 1) is not quantized: its weights are tiny, while quantizing its input would
    scan and round the whole (N, P, A) energy tensor every step."""
    import copy
    import warnings

    with warnings.catch_warnings():  # eager-mode quantization is deprecated in favour of torchao, which is
        warnings.simplefilter("ignore")  # not a dependency here; the pinned torch has it
        quantized = torch.ao.quantization.quantize_dynamic(decoder, {nn.Linear, nn.LSTMCell}, dtype=torch.qint8)
    quantized.attention.score = copy.deepcopy(decoder.attention.score)
    # The layers that read the same input become one matmul each: a beam step over a few rows costs a fixed
    # overhead per layer. Per-channel scales keep the merged layers' different weight ranges apart.
    attention = decoder.attention
    quantized.h_projections = _int8_linear(  # 2 W_h h as SoftAttention.forward takes it, and f_beta(h)
        torch.cat([2 * attention.decoder_projection.weight, decoder.f_beta.weight]),
        torch.cat([2 * attention.decoder_projection.bias, decoder.f_beta.bias]),
    )
    quantized.attention.decoder_projection = quantized.f_beta = None  # step reads them through h_projections
    if decoder.deep_output:
        quantized.deep_projections = _int8_linear(
            torch.cat([decoder.L_h.weight, decoder.L_z.weight], dim=1), decoder.L_h.bias + decoder.L_z.bias
        )
        quantized.L_h = quantized.L_z = None  # and these through deep_projections
    # The attention energies in the product form (SoftAttention.project): the largest cost of a batched step.
    quantized.attention.product_form = True
    quantized.lstm = Int8LSTMCell(quantized.lstm)
    quantized.L_o = Int8Linear(quantized.L_o)
    return quantized


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor) -> Int8Linear:
    """A dynamically quantized Linear with these fp32 weights (out, in) and bias, one scale per output."""
    import warnings

    linear = nn.Linear(weight.size(1), weight.size(0))
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return Int8Linear(torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear: qconfig})[0])


# A torch.ao dynamically quantized module spends ~5 us of Python around its op (input checks, dtype dispatch,
# attribute lookups; results/cpu_ops.json), ~20 us over the four such layers of a beam step. The two classes
# below call the same ops on the same packed weights directly; tests/test_model.py checks they give the very
# same outputs as the torch.ao modules.
class Int8Linear(nn.Module):
    """A torch.ao dynamic quantized Linear's op, called directly: (N, in) fp32 -> (N, out) fp32."""

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        self.packed = quantized._packed_params._packed_params
        self.op = torch.ops.quantized.linear_dynamic.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.packed, True)  # reduce_range=True, as torch.ao's module passes it


class Int8LSTMCell(nn.Module):
    """A torch.ao dynamic quantized LSTMCell's op, called directly: input (N, I), (h, c) -> (h, c)."""

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        self.weights = (quantized._packed_weight_ih, quantized._packed_weight_hh, quantized.bias_ih, quantized.bias_hh)
        self.op = torch.ops.quantized.quantized_lstm_cell_dynamic.default

    def forward(self, x: torch.Tensor, state: State) -> State:
        return self.op(x, state, *self.weights)


class CaptionModel(nn.Module):
    """Encoder + decoder. The encoder is optional: training on cached features needs only the decoder."""

    def __init__(self, config: ModelConfig, *, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = CaptionDecoder(config)

    def encode_images(self, images: torch.Tensor) -> Encoded:
        """(B, 3, S, S) normalised images -> Encoded (B rows)."""
        if self.encoder is None:
            raise RuntimeError("this CaptionModel was built without an encoder; pass features instead")
        return self.decoder.encode(self.encoder(images))

    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over N captions of B images.

        features (B, P, E); captions (N, T) = <start> w_1 .. w_n <end> <pad>..; lengths (N,) counting <start>
        and <end>; image_index (N,) the row of `features` each caption describes, so five captions of one
        image share its projection. Returns log-probabilities (N, T-1, V) of captions[:, 1:] and the
        attention weights (N, T-1, P); both are zero past each caption's end.
        """
        encoded = self.decoder.encode(features)  # (B, P, *)
        h0, c0 = self.decoder.init_state(encoded)  # (B, D) each
        # Longest first, so the captions still running at step t are a prefix of the batch.
        order = lengths.argsort(descending=True)
        steps = lengths[order] - 1  # (N,) words to predict
        words = captions[order]  # (N, T)
        rows = image_index[order]
        encoded = encoded.select(rows)  # (N, P, *)
        state = (h0[rows], c0[rows])
        N, total = captions.size(0), int(steps.max())
        log_probs, alphas = [], []
        for t in range(total):
            n = int((steps > t).sum())
            state = (state[0][:n], state[1][:n])
            step_log_probs, state, alpha = self.decoder.step(
                words[:n, t], state, Encoded(encoded.features[:n], encoded.projected[:n])
            )
            log_probs.append(F.pad(step_log_probs, (0, 0, 0, N - n)))  # (N, V)
            alphas.append(F.pad(alpha, (0, 0, 0, N - n)))  # (N, P)
        inverse = order.argsort()
        return torch.stack(log_probs, 1)[inverse], torch.stack(alphas, 1)[inverse]


def caption_loss(
    log_probs: torch.Tensor,
    alphas: torch.Tensor,
    captions: torch.Tensor,
    *,
    doubly_stochastic: float = 1.0,
    label_smoothing: float = 0.0,
    words: float | None = None,
    captions_count: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per predicted word plus lambda * mean_i (1 - sum_t alpha_ti)^2 (paper eq. 14).

    log_probs (N, T-1, V), alphas (N, T-1, P), captions (N, T). `words` and `captions_count` normalise the
    sums (default: this batch's counts; DDP passes the global counts over the world size, so that averaging
    the ranks' gradients gives exactly the single-process loss). Returns (loss, mean word cross-entropy).
    """
    targets = captions[:, 1 : log_probs.size(1) + 1]  # (N, T-1)
    mask = targets != PAD_ID  # (N, T-1)
    nll = -log_probs.gather(2, targets.unsqueeze(2)).squeeze(2)  # (N, T-1)
    per_word = nll
    if label_smoothing > 0:
        per_word = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=2)  # (N, T-1)
    words = float(mask.sum()) if words is None else words
    captions_count = float(captions.size(0)) if captions_count is None else captions_count
    loss = (per_word * mask).sum() / words
    if doubly_stochastic > 0:
        penalty = ((1.0 - alphas.sum(dim=1)) ** 2).mean(dim=1)  # (N,)
        loss = loss + doubly_stochastic * penalty.sum() / captions_count
    cross_entropy = (nll * mask).sum().detach() / mask.sum()
    return loss, cross_entropy
