"""The captioning model in one file: encoder, soft and hard attention, the decoder step, the teacher-forced forward.

Shape letters used in the comments below:
    B images, N rows being decoded (captions, beams or samples), P attention locations (grid_size**2),
    E encoder channels, F channels of the features the decoder attends over (feature_dim, or E when 0),
    A attention dim, D decoder dim, M embedding dim, T caption length, V vocabulary, K beam width,
    S input side in pixels, C channels and h x w the grid of an inner residual block's output (a cached stage).

Xu et al. 2015, section 3.1.2 and 4.2: at step t the attention reads h_{t-1}, forms the context z_t, gates
it with beta_t, and the LSTM consumes [E y_{t-1}; beta_t z_t] to give h_t, from which y_t is predicted.
`CaptionDecoder.step` is the only code that computes a word distribution; every decoder goes through it.
Section 4.1 (hard attention, `ModelConfig.attention = "hard"`): the same alpha_t, but the context is the
feature of one location s_t ~ Multinoulli(alpha_t), drawn where the caller asks for it (`LocationSampling`), and
training adds REINFORCE and entropy terms (`hard_attention_loss`). Without sampling, hard attention's context is
its expected value, soft attention's: the paper's choice at test time.
`ModelConfig.decoder = "transformer"` swaps in the Transformer decoder of transformer.py behind the same interface.
The CPU speed-ups (chunked encoder and attention, the int8 decoder) live beside this file, in inference.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from show_attend_tell.config import ModelConfig
from show_attend_tell.text import PAD_ID

State = tuple[torch.Tensor, ...]  # any decoder's state: tensors whose first dimension is the N rows
StateT = TypeVar("StateT", bound=tuple)


class EncodedImages(Protocol):
    """What a decoder computes once per image: `features` (B, P, F) and whatever else its steps read."""

    features: torch.Tensor  # (B, P, F)

    def select(self, index: torch.Tensor | slice) -> EncodedImages:
        """Rows `index` of every tensor (e.g. each caption's image, or the images still decoding)."""
        ...


class Decoder(Protocol):
    """The interface greedy, sampling, beam search and SCST are written against (decoding.py).

    `encode` runs once per image; `init_state` gives one state row per image; `step` advances N = B*K rows,
    K consecutive rows per image of `encoded` (K = 1: one row per image; beams or samples otherwise). A state
    is a tuple of tensors whose first dimension is N, so search can reorder any decoder's state with
    `select_rows`. The LSTM below satisfies it, with soft or hard attention, and so does
    transformer.TransformerDecoder. A decoder whose context can be one sampled location (hard attention) returns a
    `HardState`, whose `location` search keeps for every word beside alpha."""

    def encode(self, features: torch.Tensor) -> EncodedImages:
        """(B, P, E) encoder features -> what every step reads."""
        ...

    def init_state(self, encoded: EncodedImages) -> State:
        """-> the state before the first word, each tensor (B, ...)."""
        ...

    def step(
        self, words: torch.Tensor, state: State, encoded: EncodedImages
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """previous words (N,) -> log p(next word) (N, V), the new state, attention alpha (N, P)."""
        ...


def select_rows(state: StateT, rows: torch.Tensor | slice) -> StateT:
    """The state of rows `rows` (a beam's parents, surviving images, the captions still running): any decoder's.
    A NamedTuple state (HardState) stays one."""
    parts = [part[rows] for part in state]
    return state._make(parts) if hasattr(state, "_make") else tuple(parts)


def repeat_rows(state: StateT, times: int) -> StateT:
    """Each row's state `times` times in a row: (B, ...) -> (B*K, ...), K = times (beams or samples per image)."""
    return select_rows(state, torch.arange(state[0].size(0), device=state[0].device).repeat_interleave(times))


def image_transform(config: ModelConfig, *, augment: bool = False):
    """PIL RGB image -> (3, S, S) encoder input: the whole photo resized to S x S (a caption describes the
    whole scene, so no crop), normalised as the encoder weights expect. augment=True (encoder fine-tuning): a
    mild random crop and colour jitter instead of the plain resize; no flips, they swap 'left' and 'right'."""
    from torchvision import transforms

    from show_attend_tell.weights import ENCODER_WEIGHTS

    size = (config.image_size, config.image_size)
    if augment:
        resize = [
            transforms.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            transforms.ColorJitter(0.1, 0.1, 0.1),
        ]
    else:
        resize = [transforms.Resize(size, antialias=True)]
    return transforms.Compose([*resize, transforms.ToTensor(), ENCODER_WEIGHTS[config.encoder].normalize()])


class Encoded(NamedTuple):
    """Image features with their attention term, computed once per image, not once per step; for hard attention,
    where each image's sampled locations come from (None: every context is the expected one)."""

    features: torch.Tensor  # (B, P, F)
    projected: torch.Tensor  # (B, P, A): u_i = 2 (W_a a_i + b_a), see SoftAttention.project
    sampling: LocationSampling | None = None

    def select(self, index: torch.Tensor | slice) -> Encoded:
        """Rows `index` (e.g. each caption's image, or the images still decoding) without recomputing anything."""
        sampling = None if self.sampling is None else self.sampling.select(index)
        return Encoded(self.features[index], self.projected[index], sampling)


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
        feature store caches when the blocks after it are fine-tuned on cached inputs."""
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
        """(B, 3, S, S) normalised images -> (B, P, E) grid features (inference.encode_images runs it on CPU)."""
        grid = self.pool(self.trunk(images))  # (B, E, g, g)
        return grid.flatten(2).transpose(1, 2)  # (B, P, E)


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


class SoftAttention(nn.Module):
    """Bahdanau attention: e = w^T tanh(W_a a_i + W_h h), alpha = softmax(e), context = sum_i alpha_i a_i."""

    def __init__(self, *, feature_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_projection = nn.Linear(feature_dim, attention_dim)  # W_a
        self.decoder_projection = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, F) features -> their term of the energy, u_i = 2 (W_a a_i + b_a), once per image (doubled for
        the sigmoid form in forward)."""
        return self.encoder_projection(features).mul(2)

    def forward(self, encoded: Encoded, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoded (B rows), h (N, D) with N = B*K: K consecutive rows per image (its beams or samples; K = 1
        for one row per image) -> context (N, F), alpha (N, P). The K rows of an image read its features in
        place, so beams never copy them.

        w^T tanh(u) = 2 w^T sigmoid(2u) - sum(w), and softmax ignores a constant: the same alpha from sigmoid,
        which is much cheaper than tanh on CPU (results/cpu_ops.json, tanh_vs_sigmoid).
        tests/test_model.py checks alpha, context and gradients against the paper's formula."""
        B, P, A = encoded.projected.shape
        K = rows_per_image(h.size(0), B)
        hidden = self.decoder_projection(h).mul(2).view(B, K, 1, A)  # v = 2 (W_h h + b_h)
        energy = torch.add(encoded.projected.unsqueeze(1), hidden).sigmoid_()  # (B, K, P, A)
        # 2 (w^T sigmoid + b) in one op; b cannot move alpha, but trains. CPU autocast leaves addmv out, so under
        # bf16 training w and b are cast to the energies' dtype here (a no-op in fp32)
        w, b = self.score.weight.view(A).to(energy.dtype), self.score.bias.to(energy.dtype)
        scores = torch.addmv(b, energy.view(-1, A), w, beta=2, alpha=2)
        return attend(scores.view(B, K, P), encoded.features)


def rows_per_image(rows: int, images: int) -> int:
    """K, the decoder rows of each image, for N = B*K rows."""
    if rows % images:
        raise ValueError(f"attention: {rows} decoder rows do not split evenly over {images} images")
    return rows // images


def attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (B, K, P), features (B, P, F) -> context (N, F), alpha (N, P) with N = B*K."""
    B, K, P = scores.shape
    alpha = scores.softmax(dim=2)  # (B, K, P)
    context = torch.bmm(alpha, features)  # (B, K, F)
    return context.view(B * K, -1), alpha.view(B * K, P)


# ----- hard attention (section 4.1) ----------------------------------------------------------------------------
class LocationSampling:
    """Where hard attention's random locations come from, chosen by the caller: for each image (row of Encoded)
    its own generator, and whether its contexts are sampled locations or, as for the paper's half of the training
    images, the expected context.

    Each image draws from its own generator, so its draws do not depend on the images decoded beside it: a photo's
    sampled caption is the same alone or in a batch, and under torchrun an image gets the draws it would get in
    one process. Rows that share an image (its captions, beams or samples) take its draws in row order."""

    def __init__(self, generators: Sequence[torch.Generator], sampled: torch.Tensor) -> None:
        self.generators = tuple(generators)
        self.sampled = sampled  # (B,) bool: this image's contexts are sampled locations, else expected contexts

    @classmethod
    def seeded(cls, seeds: Sequence[int], *, expected_probability: float = 0.0) -> LocationSampling:
        """One generator per image from its seed; each image takes the expected context instead with this
        probability (training: EXPECTED_CONTEXT_PROBABILITY; 0: every image samples)."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        draws = [float(torch.rand((), generator=generator)) for generator in generators]
        return cls(generators, torch.tensor([u >= expected_probability for u in draws], dtype=torch.bool))

    def select(self, index: torch.Tensor | slice) -> LocationSampling:
        """The images `index` (as Encoded.select): a repeated image shares its generator."""
        images = torch.arange(len(self.generators))[index.cpu() if isinstance(index, torch.Tensor) else index]
        return LocationSampling([self.generators[i] for i in images.tolist()], self.sampled[images])

    def draw(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha (N, P), N = B*K rows with K consecutive rows per image -> s (N,): a location drawn from each row's
        alpha, or -1 for the rows of images that take the expected context."""
        K = rows_per_image(alpha.size(0), len(self.generators))
        uniforms = torch.cat([torch.rand(K, generator=generator) for generator in self.generators])  # (N,)
        cumulative = alpha.detach().float().cumsum(dim=1)  # (N, P)
        cumulative = cumulative / cumulative[:, -1:]  # ends at exactly 1, so every u in [0, 1) falls in a cell
        # inverse CDF: the cell whose interval [cumulative_{i-1}, cumulative_i) holds u; an empty one never does
        locations = torch.searchsorted(cumulative, uniforms.to(alpha.device).unsqueeze(1), right=True).squeeze(1)
        return locations.masked_fill(~self.sampled.to(alpha.device).repeat_interleave(K), -1)


class HardState(NamedTuple):
    """The hard-attention decoder's state: the LSTM's, and where each row's last context came from."""

    h: torch.Tensor  # (N, D)
    c: torch.Tensor  # (N, D)
    location: torch.Tensor  # (N,) s_t of the step that made h; -1: the expected context (or no step yet)


def sampled_locations(state: State) -> torch.Tensor | None:
    """(N,) the location whose feature was each row's context at the last step (-1: the expected context), or
    None for a decoder that always attends softly."""
    return state.location if isinstance(state, HardState) else None


def hard_context(expected: torch.Tensor, alpha: torch.Tensor, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 4.1: z_t = a_{s_t}, s_t ~ Multinoulli(alpha_t), for the rows whose images sample (encoded.sampling);
    the others keep the expected context sum_i alpha_ti a_i. expected (N, F), alpha (N, P) -> context (N, F),
    s (N,). No gradient reaches alpha through a sampled context: that is hard_attention_loss's REINFORCE term."""
    N = alpha.size(0)
    if encoded.sampling is None:
        return expected, torch.full((N,), -1, dtype=torch.long, device=alpha.device)
    locations = encoded.sampling.draw(alpha)  # (N,)
    image = torch.arange(N, device=alpha.device) // rows_per_image(N, encoded.features.size(0))  # (N,)
    chosen = encoded.features[image, locations.clamp_min(0)]  # (N, F): a_{s_t}
    return torch.where(locations.unsqueeze(1) >= 0, chosen, expected), locations


class CaptionDecoder(nn.Module):
    """The LSTM decoder with soft or hard attention (config.attention), the beta gate and (optionally) the deep
    output layer. Both attentions have the same layers: they differ only in the context a step reads."""

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
        self.hard_attention = config.attention == "hard"
        self.embedding = nn.Embedding(V, M, padding_idx=PAD_ID)
        # Beyond the paper: a_i -> ReLU(W_f a_i) once per image. Every per-step multiply that reads the context
        # (LSTM input, beta gate, deep output) then works on F instead of E channels.
        self.feature_projection = (
            nn.Sequential(nn.Linear(E, features_dim), nn.ReLU(), nn.Dropout(config.dropout))
            if config.feature_dim
            else nn.Identity()
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

    def encode(self, features: torch.Tensor, sampling: LocationSampling | None = None) -> Encoded:
        """(B, P, E) encoder features -> Encoded: projected to F (if configured), and the attention's term
        W_a a_i, both done once per image. `sampling` (hard attention only): where the images' locations come
        from; without it every context is the expected one."""
        if sampling is not None and not self.hard_attention:
            raise ValueError("soft attention samples no locations: LocationSampling is for hard attention")
        features = self.feature_projection(features)  # (B, P, F)
        return Encoded(features, self.attention.project(features), sampling)  # (B, P, F), (B, P, A)

    def init_state(self, encoded: Encoded) -> State:
        mean = encoded.features.mean(dim=1)  # (B, F)
        h, c = self.init_h(mean), self.init_c(mean)  # (B, D) each
        if self.hard_attention:
            return HardState(h, c, torch.full((h.size(0),), -1, dtype=torch.long, device=h.device))
        return h, c

    def step(self, words: torch.Tensor, state: State, encoded: Encoded) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step: previous words (N,) -> log p(next word) (N, V), new state (h, c) (hard attention: a
        HardState), alpha (N, P).

        `encoded` holds B images and the N = B*K rows are K consecutive rows per image (see SoftAttention)."""
        h, c = state[0], state[1]
        embedded = self.embedding(words)  # (N, M)
        context, alpha = self.attention(encoded, h)  # (N, F) the expected context, (N, P)
        if self.hard_attention:
            context, location = hard_context(context, alpha, encoded)  # (N, F), (N,)
        gated = torch.sigmoid(self.f_beta(h)) * context  # (N, F)
        h, c = self.lstm(torch.cat([embedded, gated], dim=1), (h, c))  # (N, D) each
        out = embedded + self.L_h(h) + self.L_z(gated) if self.deep_output else h  # (N, M) or (N, D)
        logits = self.L_o(self.dropout(out))  # (N, V)
        state = HardState(h, c, location) if self.hard_attention else (h, c)
        return F.log_softmax(logits, dim=1), state, alpha


class TeacherForced(NamedTuple):
    """CaptionModel's forward pass over N captions, each (N, T-1, ...) and zero (-1) past each caption's end."""

    log_probs: torch.Tensor  # (N, T-1, V) log p of each next word
    alphas: torch.Tensor  # (N, T-1, P)
    locations: torch.Tensor  # (N, T-1) s_t where the context was a sampled location (hard attention), else -1


class CaptionModel(nn.Module):
    """Encoder + decoder (the LSTM above, or transformer.py's). The encoder is optional: training on cached
    features needs only the decoder."""

    def __init__(self, config: ModelConfig, *, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        if config.decoder == "transformer":
            from show_attend_tell.transformer import TransformerDecoder  # it builds on this module

            self.decoder = TransformerDecoder(config)
        else:
            self.decoder = CaptionDecoder(config)

    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: LocationSampling | None = None,
    ) -> TeacherForced:
        """Teacher-forced pass over N captions of B images.

        features (B, P, E); captions (N, T) = <start> w_1 .. w_n <end> <pad>..; lengths (N,) counting <start>
        and <end>; image_index (N,) the row of `features` each caption describes, so five captions of one
        image share its projection; sampling (hard attention): the B images' locations. Returns
        log-probabilities (N, T-1, V) of captions[:, 1:], the attention weights (N, T-1, P) and the sampled
        locations (N, T-1).
        """
        if self.config.decoder == "transformer":  # every position at once, under the causal mask
            return self.decoder.teacher_forced(features, captions, lengths, image_index)
        encoded = self.decoder.encode(features, sampling)  # (B, P, *)
        initial = self.decoder.init_state(encoded)  # (B, D) each
        # Longest first, so the captions still running at step t are a prefix of the batch. A stable order keeps
        # an image's captions in their order, so they take its sampled locations in the same order on any rank.
        order = lengths.argsort(descending=True, stable=True)
        steps = lengths[order] - 1  # (N,) words to predict
        words = captions[order]  # (N, T)
        rows = image_index[order]
        encoded = encoded.select(rows)  # (N, P, *)
        state = select_rows(initial, rows)
        N, total = captions.size(0), int(steps.max())
        log_probs, alphas, locations = [], [], []
        for t in range(total):
            n = int((steps > t).sum())
            state = select_rows(state, slice(None, n))
            step_log_probs, state, alpha = self.decoder.step(words[:n, t], state, encoded.select(slice(None, n)))
            log_probs.append(F.pad(step_log_probs, (0, 0, 0, N - n)))  # (N, V)
            alphas.append(F.pad(alpha, (0, 0, 0, N - n)))  # (N, P)
            location = sampled_locations(state)
            location = words.new_full((n,), -1) if location is None else location
            locations.append(F.pad(location, (0, N - n), value=-1))  # (N,)
        inverse = order.argsort()
        stacked = (torch.stack(log_probs, 1), torch.stack(alphas, 1), torch.stack(locations, 1))
        return TeacherForced(*(part[inverse] for part in stacked))


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
    sums (default: this batch's counts; under torchrun, train.py passes the global counts over the world size,
    so that averaging the ranks' gradients gives exactly the single-process loss). Returns (loss, mean word
    cross-entropy).
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


# ----- hard attention's objective (section 4.1) -----------------------------------------------------------------
# With this probability a training image takes the expected context instead of sampled locations ("to further
# improve the robustness of this learning rule, with probability 0.5 for a given image, we set the sampled
# attention location to its expected value").
EXPECTED_CONTEXT_PROBABILITY = 0.5
BASELINE_DECAY = 0.9  # b_k = 0.9 b_{k-1} + 0.1 log p(y | s_k, a), the paper's moving average over mini-batches
_TINY = 1e-30  # alpha rounded to 0 would make log alpha, and the entropy's gradient, infinite


def caption_log_likelihood(log_probs: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """log p(y | s, a) of each caption: log_probs (N, T-1, V), captions (N, T) -> (N,), summed over its words."""
    targets = captions[:, 1 : log_probs.size(1) + 1]  # (N, T-1)
    chosen = log_probs.gather(2, targets.unsqueeze(2)).squeeze(2)  # (N, T-1)
    return (chosen * (targets != PAD_ID)).sum(dim=1)


def moving_average(baseline: float | None, value: float, decay: float = BASELINE_DECAY) -> float:
    """The paper's baseline after one more mini-batch whose mean log p(y | s, a) is `value` (None: the first)."""
    return value if baseline is None else decay * baseline + (1 - decay) * value


def hard_attention_loss(
    forced: TeacherForced,
    captions: torch.Tensor,
    *,
    baseline: float,
    reinforce: float,
    entropy: float,
    words: float | None = None,
) -> torch.Tensor:
    """Section 4.1, eq. 12: the terms of the lower bound L_s's gradient beyond the cross-entropy of the sampled
    captions (caption_loss of the same forward pass). A surrogate whose gradient is

        -(1/words) sum_n [ lambda_r (log p(y|s_n, a) - b) d log p(s_n|a) + lambda_e d H[s_n] ]

    over the N captions: REINFORCE on the locations s_n (only the captions whose locations were sampled) with
    the baseline b, and the entropy of alpha summed over each caption's words. `reinforce` is lambda_r,
    `entropy` lambda_e; `words` normalises the sums as in caption_loss (default: this batch's words), so
    cross-entropy plus this is the paper's estimator divided by the words per caption."""
    log_probs, alphas, locations = forced
    targets = captions[:, 1 : log_probs.size(1) + 1]  # (N, T-1)
    mask = targets != PAD_ID  # (N, T-1)
    rewards = caption_log_likelihood(log_probs, captions).detach()  # (N,) log p(y | s, a)
    sampled = (locations >= 0) & mask  # (N, T-1)
    chosen = alphas.gather(2, locations.clamp_min(0).unsqueeze(2)).squeeze(2)  # (N, T-1): alpha_t(s_t)
    log_p_locations = (chosen.clamp_min(_TINY).log() * sampled).sum(dim=1)  # (N,) log p(s | a)
    entropies = -(alphas * alphas.clamp_min(_TINY).log()).sum(dim=2)  # (N, T-1) H of each alpha_t
    words = float(mask.sum()) if words is None else words
    reinforce_term = (rewards - baseline) * log_p_locations  # (N,), zero for captions with no sampled location
    return -(reinforce * reinforce_term.sum() + entropy * (entropies * mask).sum()) / words
