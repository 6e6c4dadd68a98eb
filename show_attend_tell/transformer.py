"""A Transformer decoder over the encoder's attention grid (`ModelConfig.decoder = "transformer"`), beside the
paper's LSTM of model.py and behind the same `decoder.Decoder` interface (model.build_decoder picks it), so
greedy, sampling, beam search, constrained beam search, self-critical training, checkpoints, the CLI, the API
and the page all use it unchanged.

Vaswani et al. 2017 in the pre-norm arrangement: the vector x of each word (its embedding plus its position's)
goes through `transformer_layers` blocks, each adding
    x += SelfAttention(LN(x))    over the words so far (masked: a word never sees the words after it)
    x += CrossAttention(LN(x))   over the P grid features, projected to D once per image
    x += FeedForward(LN(x))
and log p(next word) = log_softmax(L_o LN(x)). The attention itself is torch's F.scaled_dot_product_attention.

Decoding is incremental: the state holds every block's self-attention keys and values of the words so far (a
key/value cache whose first dimension is the rows, so `decoder.select_rows` reorders beams), and a step computes
the new word's position only, whatever its index. The cross-attention keys and values are computed in `encode`,
once per image; the K rows of an image (its beams or samples) read them in place. `forward_words` is the one
computation: teacher forcing runs it on whole captions (all positions at once, under the causal mask) and
`step` on one word after the cache, so the two agree (tests/test_transformer.py checks it).

Attention maps (alpha, what `sat caption --attention-dir`, the page and the API show): the cross-attention
weights over the grid of the last block, averaged over its heads; `show_attention` picks another block or one
head. The doubly stochastic penalty of training (TrainConfig.doubly_stochastic) reads these same maps: the
last block's head-averaged weights during training (`--doubly-stochastic 0` turns it off).

Shape letters as in model.py, plus L blocks, H heads, Dh = D / H per head, t words already in the cache.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from show_attend_tell.config import ModelConfig
from show_attend_tell.decoder import State, TeacherForced, rows_per_image
from show_attend_tell.errors import InputError
from show_attend_tell.text import PAD_ID


class TransformerEncoded(NamedTuple):
    """What the Transformer computes once per image: the grid projected to D and every block's cross-attention
    keys and values."""

    features: torch.Tensor  # (B, P, D)
    keys: torch.Tensor  # (B, L, H, P, Dh)
    values: torch.Tensor  # (B, L, H, P, Dh)

    def select(self, index: torch.Tensor | slice) -> TransformerEncoded:
        return TransformerEncoded(self.features[index], self.keys[index], self.values[index])


class Attention(nn.Module):
    """Multi-head attention's projections around F.scaled_dot_product_attention: queries, keys and values in,
    heads merged and projected out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T, D) -> (R, H, T, Dh)."""
        R, T, D = x.shape
        return x.view(R, T, self.heads, D // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, S, D) -> keys and values (R, H, S, Dh) each."""
        keys, values = self.key_value(source).chunk(2, dim=2)
        return self.split(keys), self.split(values)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(R, H, T, Dh) heads -> (R, T, D), projected."""
        R, H, T, Dh = x.shape
        return self.out(x.transpose(1, 2).reshape(R, T, H * Dh))


class Block(nn.Module):
    """One pre-norm block: masked self-attention, cross-attention over the grid, feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, H = config.decoder_dim, config.transformer_heads
        self.self_norm = nn.LayerNorm(D)
        self.self_attention = Attention(D, H)
        self.cross_norm = nn.LayerNorm(D)
        self.cross_attention = Attention(D, H)
        self.feed_forward_norm = nn.LayerNorm(D)
        self.feed_forward = nn.Sequential(
            nn.Linear(D, config.transformer_feedforward_dim),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.transformer_feedforward_dim, D),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[torch.Tensor, torch.Tensor],
        map_heads: slice | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """x (N, T, D) for T new positions; past: this block's keys and values of the t words before them,
        (N, H, t, Dh) each (t = 0 when T > 1); grid: this block's cross-attention keys and values, (B, H, P, Dh)
        each, with N = B*K rows, K consecutive rows per image. -> x (N, T, D), the keys and values with the new
        positions (N, H, t+T, Dh), and with `map_heads` the cross-attention weights averaged over those heads
        (N, T, P)."""
        h = self.self_norm(x)
        new_keys, new_values = self.self_attention.keys_values(h)  # (N, H, T, Dh) each
        keys = torch.cat([past[0], new_keys], dim=2)  # (N, H, t+T, Dh)
        values = torch.cat([past[1], new_values], dim=2)
        queries = self.self_attention.split(self.self_attention.query(h))  # (N, H, T, Dh)
        # T > 1 only from an empty cache (teacher forcing): the causal mask is then the usual square one
        attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=x.size(1) > 1)
        x = x + self.dropout(self.self_attention.merge(attended))
        context, alpha = self.attend_grid(self.cross_norm(x), grid, map_heads)
        x = x + self.dropout(context)
        x = x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))
        return x, (keys, values), alpha

    def attend_grid(
        self, h: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], map_heads: slice | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention: h (N, T, D), grid keys and values (B, H, P, Dh) -> (N, T, D) and, with `map_heads`,
        alpha (N, T, P). The K*T queries of an image's K rows attend as one sequence over its keys, read in
        place: beams never copy an image's keys or values."""
        keys, values = grid
        B, H, P, Dh = keys.shape
        N, T, D = h.shape
        K = rows_per_image(N, B)
        queries = self.cross_attention.query(h).view(B, K * T, H, Dh).transpose(1, 2)  # (B, H, K*T, Dh)
        attended = F.scaled_dot_product_attention(queries, keys, values)  # (B, H, K*T, Dh)
        context = self.cross_attention.out(attended.transpose(1, 2).reshape(N, T, D))  # heads merged, (N, T, D)
        if map_heads is None:
            return context, None
        # The weights themselves: the same attention over the identity as values, (B, H, K*T, P), so the maps
        # are exactly the weights that made `context`, without a second hand-written softmax.
        identity = torch.eye(P, dtype=queries.dtype, device=queries.device).expand(B, H, P, P)
        weights = F.scaled_dot_product_attention(queries, keys, identity)
        return context, weights[:, map_heads].mean(dim=1).reshape(N, T, P)


class LearnedPositions(nn.Module):
    """One learned D-vector per position, for `size` positions."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(size, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, D)."""
        if int(positions[-1]) >= self.table.num_embeddings:  # e.g. `sat caption --max-length` past them
            raise InputError(
                f"this Transformer decoder learned positions for {self.table.num_embeddings} tokens (<start> and "
                f"{self.table.num_embeddings - 1} words); ask for captions of at most that many words"
            )
        return self.table(positions)


class SinusoidalPositions(nn.Module):
    """Vaswani et al.'s fixed positions: sin and cos of the position at D/2 geometric frequencies; no weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, D)."""
        frequencies = torch.exp(
            torch.arange(0, self.dim, 2, device=positions.device) * (-math.log(10000.0) / self.dim)
        )  # (D/2,)
        angles = positions.float().unsqueeze(1) * frequencies  # (T, D/2)
        return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)[:, : self.dim]  # (T, D)


class TransformerDecoder(nn.Module):
    """The Transformer decoder (a decoder.Decoder): see the module's docstring."""

    # ModelConfig fields only this decoder reads: a checkpoint of the LSTM leaves them out of its model section
    own_fields: ClassVar[tuple[str, ...]] = (
        "transformer_layers",
        "transformer_heads",
        "transformer_feedforward_dim",
        "transformer_positions",
        "transformer_max_positions",
    )

    @staticmethod
    def config_problem(config: ModelConfig) -> str | None:
        """Why `config` cannot describe this decoder (None: it can), to be named in a one-line error."""
        if config.decoder_dim % config.transformer_heads:
            return (
                f"model.decoder_dim ({config.decoder_dim}) must be a multiple of model.transformer_heads "
                f"({config.transformer_heads}): each head reads an equal share"
            )
        if config.attention != "soft":
            return "model.attention hard is the LSTM's (paper section 4.1), not the Transformer's"
        return None

    @staticmethod
    def max_positions(config: ModelConfig) -> int | None:
        """How many words (with <start>) a caption may have: the learned positions' count (None: sinusoidal
        positions have no limit)."""
        return config.transformer_max_positions if config.transformer_positions == "learned" else None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, V, L = config.encoder_dim, config.decoder_dim, config.vocab_size, config.transformer_layers
        self.heads = config.transformer_heads
        # a_i -> D once per image; the LayerNorm puts the grid on the scale of the words' vectors
        self.feature_projection = nn.Sequential(nn.Linear(E, D), nn.ReLU(), nn.LayerNorm(D), nn.Dropout(config.dropout))
        self.embedding = nn.Embedding(V, D, padding_idx=PAD_ID)
        self.positions = (
            LearnedPositions(config.transformer_max_positions, D)
            if config.transformer_positions == "learned"
            else SinusoidalPositions(D)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(L))
        self.norm = nn.LayerNorm(D)
        self.L_o = nn.Linear(D, V)
        self.map_layer, self.map_heads = L - 1, slice(None)

    def show_attention(self, layer: int = -1, head: int | None = None) -> None:
        """Which cross-attention weights are the attention maps (alpha): block `layer` (default the last),
        averaged over its heads, or only head `head`."""
        L = len(self.blocks)
        if not -L <= layer < L or (head is not None and not 0 <= head < self.heads):
            raise ValueError(f"attention maps: layer must be in [-{L}, {L}) and head in [0, {self.heads}) or None")
        self.map_layer = layer % L
        self.map_heads = slice(None) if head is None else slice(head, head + 1)

    def encode(self, features: torch.Tensor) -> TransformerEncoded:
        """(B, P, E) encoder features -> the grid projected to D and every block's cross-attention keys and
        values, once per image."""
        grid = self.feature_projection(features)  # (B, P, D)
        pairs = [block.cross_attention.keys_values(grid) for block in self.blocks]  # L x (B, H, P, Dh) each
        return TransformerEncoded(grid, torch.stack([k for k, _ in pairs], 1), torch.stack([v for _, v in pairs], 1))

    def init_state(self, encoded: TransformerEncoded) -> State:
        """An empty cache: keys and values of no words yet for each block, (B, H, 0, Dh) each, in the order
        keys of block 0, values of block 0, keys of block 1..."""
        B, _, H, _, Dh = encoded.keys.shape
        empty = encoded.keys.new_zeros(B, H, 0, Dh)
        return (empty,) * (2 * len(self.blocks))

    def forward_words(
        self, words: torch.Tensor, state: State, encoded: TransformerEncoded
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """words (N, T) at the positions after the t words cached in `state` (T > 1 only when t = 0)
        -> log p of the word after each (N, T, V), the state with the T words added, alpha (N, T, P).
        `encoded` holds B images and the N = B*K rows are K consecutive rows per image."""
        t, T = state[0].size(2), words.size(1)
        if t and T > 1:
            raise ValueError("forward_words: several words at once only from an empty cache")
        positions = torch.arange(t, t + T, device=words.device)
        x = self.dropout(self.embedding(words) + self.positions(positions))  # (N, T, D)
        new_state: list[torch.Tensor] = []
        alpha = None
        for layer, block in enumerate(self.blocks):
            past = (state[2 * layer], state[2 * layer + 1])
            grid = (encoded.keys[:, layer], encoded.values[:, layer])  # (B, H, P, Dh) each
            heads = self.map_heads if layer == self.map_layer else None
            x, cache, block_alpha = block(x, past, grid, heads)
            new_state += cache
            alpha = block_alpha if block_alpha is not None else alpha
        return F.log_softmax(self.L_o(self.norm(x)), dim=2), tuple(new_state), alpha

    def step(
        self, words: torch.Tensor, state: State, encoded: TransformerEncoded
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step: previous words (N,) -> log p(next word) (N, V), the state with the word cached,
        alpha (N, P)."""
        log_probs, state, alpha = self.forward_words(words.unsqueeze(1), state, encoded)
        return log_probs[:, 0], state, alpha[:, 0]

    def teacher_forced(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: Any = None,
    ) -> TeacherForced:
        """As model.CaptionModel.forward, every position of every caption at once: features (B, P, E),
        captions (N, T), lengths (N,), image_index (N,) -> log p (N, T-1, V), alpha (N, T-1, P), zero past each
        caption's end, and no sampled locations (all -1: its attention is soft).

        The captions are laid out K per image (K the most any image has; unused slots are <pad> rows), so each
        image's keys and values are read in place, as in beam search, instead of copied for each caption. Its
        attention is soft: it samples no locations (`sampling` must be None)."""
        if sampling is not None:
            raise ValueError("the Transformer's attention is soft: it samples no locations (LocationSampling)")
        encoded = self.encode(features)  # B images
        B, N = features.size(0), captions.size(0)
        T = int(lengths.max()) - 1  # positions predicted
        counts = torch.bincount(image_index, minlength=B)  # (B,)
        K = int(counts.max())
        order = image_index.argsort(stable=True)  # captions grouped by image
        first = torch.cumsum(counts, 0) - counts  # (B,) where each image's captions start in `order`
        slots = image_index[order] * K + torch.arange(N, device=captions.device) - first[image_index[order]]  # (N,)
        words = captions.new_full((B * K, T), PAD_ID)
        words[slots] = captions[order, :T]
        state = tuple(part.repeat_interleave(K, dim=0) for part in self.init_state(encoded))
        log_probs, _, alphas = self.forward_words(words, state, encoded)  # (B*K, T, V), _, (B*K, T, P)
        rows = torch.empty_like(slots)
        rows[order] = slots  # caption n's slot
        running = (torch.arange(T, device=captions.device) < (lengths - 1).unsqueeze(1)).unsqueeze(2)  # (N, T, 1)
        log_probs, alphas = log_probs[rows].masked_fill(~running, 0.0), alphas[rows].masked_fill(~running, 0.0)
        return TeacherForced(log_probs, alphas, captions.new_full((N, T), -1))
