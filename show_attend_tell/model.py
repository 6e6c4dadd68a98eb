"""The captioning model in one file: encoder, soft attention, the decoder step, the teacher-forced forward.

Shape letters used in the comments below:
    B images, N rows being decoded (captions, beams or samples), P attention locations (grid_size**2),
    E encoder channels, F channels of the features the decoder attends over (feature_dim, or E when 0),
    A attention dim, D decoder dim, M embedding dim, T caption length, V vocabulary, K beam width,
    S input side in pixels, C channels and h x w the grid of an inner residual block's output (a cached stage).

Xu et al. 2015, section 3.1.2 and 4.2: at step t the attention reads h_{t-1}, forms the context z_t, gates
it with beta_t, and the LSTM consumes [E y_{t-1}; beta_t z_t] to give h_t, from which y_t is predicted.
`CaptionDecoder.step` is the only code that computes a word distribution; every decoder goes through it.
The CPU speed-ups (chunked encoder and attention, the int8 decoder) live beside this file, in inference.py.
"""

from __future__ import annotations

import math
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
    `select_rows`. The LSTM below satisfies it; hard attention or a Transformer decoder can too."""

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
    """The state of rows `rows` (a beam's parents, surviving images, the captions still running): any decoder's."""
    return tuple(part[rows] for part in state)


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
    """Image features with their attention term, computed once per image, not once per step."""

    features: torch.Tensor  # (B, P, F)
    projected: torch.Tensor  # (B, P, A): u_i = 2 (W_a a_i + b_a), see SoftAttention.project

    def select(self, index: torch.Tensor | slice) -> Encoded:
        """Rows `index` (e.g. each caption's image, or the images still decoding) without recomputing anything."""
        return Encoded(self.features[index], self.projected[index])


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
        # 2 (w^T sigmoid + b) in one op; b cannot move alpha, but trains
        scores = torch.addmv(self.score.bias, energy.view(-1, A), self.score.weight.view(A), beta=2, alpha=2)
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

    def encode(self, features: torch.Tensor) -> Encoded:
        """(B, P, E) encoder features -> Encoded: projected to F (if configured), and the attention's term
        W_a a_i, both done once per image."""
        features = self.feature_projection(features)  # (B, P, F)
        return Encoded(features, self.attention.project(features))  # (B, P, F), (B, P, A)

    def init_state(self, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        mean = encoded.features.mean(dim=1)  # (B, F)
        return self.init_h(mean), self.init_c(mean)  # (h, c), (B, D) each

    def step(
        self, words: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], encoded: Encoded
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One decoding step: previous words (N,) -> log p(next word) (N, V), new state (h, c), alpha (N, P).

        `encoded` holds B images and the N = B*K rows are K consecutive rows per image (see SoftAttention)."""
        h, c = state
        embedded = self.embedding(words)  # (N, M)
        context, alpha = self.attention(encoded, h)  # (N, F), (N, P)
        gated = torch.sigmoid(self.f_beta(h)) * context  # (N, F)
        h, c = self.lstm(torch.cat([embedded, gated], dim=1), (h, c))  # (N, D) each
        out = embedded + self.L_h(h) + self.L_z(gated) if self.deep_output else h  # (N, M) or (N, D)
        logits = self.L_o(self.dropout(out))  # (N, V)
        return F.log_softmax(logits, dim=1), (h, c), alpha


class CaptionModel(nn.Module):
    """Encoder + decoder. The encoder is optional: training on cached features needs only the decoder."""

    def __init__(self, config: ModelConfig, *, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = CaptionDecoder(config)

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
        state = select_rows((h0, c0), rows)
        N, total = captions.size(0), int(steps.max())
        log_probs, alphas = [], []
        for t in range(total):
            n = int((steps > t).sum())
            state = select_rows(state, slice(None, n))
            step_log_probs, state, alpha = self.decoder.step(words[:n, t], state, encoded.select(slice(None, n)))
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
