"""The captioning model in one file: encoder, soft and hard attention, the decoder step, the teacher-forced forward.

Shape letters used in the comments below:
    B images, N rows being decoded (captions, beams or samples), P attention locations (grid_size**2),
    E encoder channels, F channels of the features the decoder attends over (feature_dim, or E when 0),
    A attention dim, D decoder dim, M embedding dim, T caption length, V vocabulary, K beam width,
    S input side in pixels.

Xu et al. 2015, section 3.1.2 and 4.2: at step t the attention reads h_{t-1}, forms the context z_t, gates
it with beta_t, and the LSTM consumes [E y_{t-1}; beta_t z_t] to give h_t, from which y_t is predicted.
`CaptionDecoder.step` is the one decoding step; every decoder goes through it. Soft attention's training pass
(`teacher_forced_soft`) is the same arithmetic rearranged for speed, held to `step` by tests/test_model.py.
Section 4.1 (hard attention, `ModelConfig.attention = "hard"`): the same alpha_t, but the context is the
feature of one location s_t ~ Multinoulli(alpha_t), drawn where the caller asks for it (`LocationSampling`), and
training adds REINFORCE and entropy terms (`hard_attention_loss`). Without sampling, hard attention's context is
its expected value, soft attention's: the paper's choice at test time.
The interface every decoder satisfies is decoder.py's; `build_decoder` is the one place that picks the decoder
kind (`ModelConfig.decoder = "transformer"`: transformer.py's, behind the same interface).
The CPU speed-ups (chunked encoder and attention, the int8 decoder) live beside this file, in inference.py; running
the trunk up to a residual block and on from it, for feature stores that cache a block's output, in stages.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from show_attend_tell.backward import AttentionScores, Prefixes, StepContexts, StepProducts
from show_attend_tell.config import ModelConfig
from show_attend_tell.decoder import Decoder, State, TeacherForced, rows_per_image, select_rows
from show_attend_tell.text import PAD_ID
from show_attend_tell.transformer import TransformerDecoder


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


class EncodedPrefixes:
    """The rows still running at each step of a teacher-forced pass, a prefix of `encoded`'s rows (Prefixes)."""

    def __init__(self, encoded: Encoded) -> None:
        self.encoded = encoded
        self.features, self.projected = Prefixes(encoded.features), Prefixes(encoded.projected)

    def __call__(self, n: int) -> Encoded:
        sampling = None if self.encoded.sampling is None else self.encoded.sampling.select(slice(None, n))
        return Encoded(self.features(n), self.projected(n), sampling)


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


class SoftAttention(nn.Module):
    """Bahdanau attention, alpha = softmax(e) with e = w^T tanh(W_a a_i + W_h h), context = sum_i alpha_i a_i,
    computed as e' = 2 w^T sigmoid(2 (W_a a_i + W_h h)): the same alpha (see forward) for a cheaper op."""

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
        # 2 (w^T sigmoid(u + v) + b) over the (B, K, P, A) energies, with a backward that takes the sigmoid's
        # gradient in chunks (backward.AttentionScores); b cannot move alpha, but trains. CPU autocast leaves
        # addmv out, so under bf16 training w and b are cast to the energies' dtype here (a no-op in fp32)
        dtype = torch.promote_types(encoded.projected.dtype, hidden.dtype)
        w, b = self.score.weight.view(A).to(dtype), self.score.bias.to(dtype)
        scores = AttentionScores.apply(encoded.projected, hidden, w, b)  # (B*K*P,)
        return attend(scores.view(B, K, P), encoded.features)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype products of `tensor`'s device compute in: autocast's if it is on there, else the tensor's."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


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

    # ModelConfig fields only this decoder reads: none, as the LSTM's fields came first and every checkpoint's
    # model section keeps them (the Transformer's are left out of an LSTM's: checkpoint.model_section)
    own_fields: ClassVar[tuple[str, ...]] = ()

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

    def teacher_forced(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: LocationSampling | None = None,
    ) -> TeacherForced:
        """The teacher-forced pass (see CaptionModel.forward) over the captions still running at each word
        position: `teacher_forced_steps` for hard attention, `teacher_forced_soft` (the same numbers, fewer and
        larger products) for soft attention."""
        if self.hard_attention:
            return self.teacher_forced_steps(features, captions, lengths, image_index, sampling=sampling)
        return self.teacher_forced_soft(features, captions, lengths, image_index)

    def _running_order(
        self, captions: torch.Tensor, lengths: torch.Tensor, image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Longest first, so the captions still running at step t are a prefix of the batch; a stable order keeps
        an image's captions in their order, so they take its sampled locations in the same order on any rank.
        -> order (N,), words to predict per caption (N,), the captions (N, T) and their images (N,) in that order."""
        order = lengths.argsort(descending=True, stable=True)
        return order, lengths[order] - 1, captions[order], image_index[order]

    def teacher_forced_steps(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: LocationSampling | None = None,
    ) -> TeacherForced:
        """The teacher-forced pass one word position at a time, each through `step`."""
        encoded = self.encode(features, sampling)  # (B, P, *)
        initial = self.init_state(encoded)  # (B, D) each
        order, steps, words, rows = self._running_order(captions, lengths, image_index)
        running = EncodedPrefixes(encoded.select(rows))  # running(n): the first n of (N, P, *)
        state = select_rows(initial, rows)
        N, total = captions.size(0), int(steps.max())
        log_probs, alphas, locations = [], [], []
        for t in range(total):
            n = int((steps > t).sum())
            state = select_rows(state, slice(None, n))
            step_log_probs, state, alpha = self.step(words[:n, t], state, running(n))
            log_probs.append(F.pad(step_log_probs, (0, 0, 0, N - n)))  # (N, V)
            alphas.append(F.pad(alpha, (0, 0, 0, N - n)))  # (N, P)
            location = sampled_locations(state)
            location = words.new_full((n,), -1) if location is None else location
            locations.append(F.pad(location, (0, N - n), value=-1))  # (N,)
        inverse = order.argsort()
        stacked = (torch.stack(log_probs, 1), torch.stack(alphas, 1), torch.stack(locations, 1))
        return TeacherForced(*(part[inverse] for part in stacked))

    def teacher_forced_soft(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, image_index: torch.Tensor
    ) -> TeacherForced:
        """`teacher_forced_steps` for soft attention, rearranged for speed (issue 33; the same numbers up to
        rounding, tests/test_model.py). What reads h_{t-1} (W_h, f_beta and the LSTM's W_hh) is one product per
        step; the products that do not feed the next step are done once for every word of the batch: the LSTM's
        input weights on the embedded words before the loop, the deep output and L_o after it. The backward takes
        the per-step products' weight gradients and the contexts' feature gradient once over all the steps
        (backward.StepProducts, StepContexts). results/train_speed_fused/ times it."""
        encoded = self.encode(features)  # (B, P, *)
        h, c = self.init_state(encoded)  # (B, D) each
        order, steps, words, rows = self._running_order(captions, lengths, image_index)
        encoded = encoded.select(rows)  # (N, P, *)
        projected, contexts = Prefixes(encoded.projected), StepContexts(encoded.features)  # the first n rows of each
        h, c = h[rows], c[rows]
        N, total = captions.size(0), int(steps.max())
        # the (step, row) of every word predicted, step by step: at step t the first n_t rows are running
        running_at = steps.unsqueeze(0) > torch.arange(total, device=steps.device).unsqueeze(1)  # (T, N)
        positions, counts = running_at.nonzero(), running_at.sum(1).tolist()  # (W, 2), n_t per step
        embedded = self.embedding(words[positions[:, 1], positions[:, 0]])  # (W, M) each step's previous words
        attention, lstm, M = self.attention, self.lstm, self.embedding.embedding_dim
        # one (D -> A + F + 4D) product of h_{t-1} per step; the LSTM's two biases ride on it. The joined weights
        # are cast to autocast's dtype here, once: autocast caches the casts of parameters, not of these
        dtype = autocast_dtype(h)
        reads_h = torch.cat([attention.decoder_projection.weight, self.f_beta.weight, lstm.weight_hh]).to(dtype)
        reads_h_bias = torch.cat([attention.decoder_projection.bias, self.f_beta.bias, lstm.bias_ih + lstm.bias_hh])
        reads_h_bias = reads_h_bias.to(dtype)
        word_gates = F.linear(embedded, lstm.weight_ih[:, :M]).split(counts)  # (n_t, 4D) per step
        # their weights' gradients are taken once over the steps, not once per step
        products = StepProducts(reads_h, reads_h_bias), StepProducts(lstm.weight_ih[:, M:].to(dtype))  # and (4D, F)
        hs, gateds, alphas = [], [], []
        for t, n in enumerate(counts):
            h, c, gated, alpha = self.soft_step(h[:n], c[:n], word_gates[t], projected(n), contexts, *products)
            hs.append(h)
            gateds.append(gated)
            alphas.append(alpha)
        h_all, gated_all = torch.cat(hs), torch.cat(gateds)  # (W, D), (W, F)
        out = embedded + self.L_h(h_all) + self.L_z(gated_all) if self.deep_output else h_all
        word_log_probs = F.log_softmax(self.L_o(self.dropout(out)), dim=1)  # (W, V)
        # back to the batch's own order, zero past each caption's end
        where = (order[positions[:, 1]], positions[:, 0])
        log_probs = word_log_probs.new_zeros(N, total, word_log_probs.size(1)).index_put(where, word_log_probs)
        alpha_all = torch.cat(alphas)
        alpha_grid = alpha_all.new_zeros(N, total, alpha_all.size(1)).index_put(where, alpha_all)
        return TeacherForced(log_probs, alpha_grid, words.new_full((N, total), -1))

    def soft_step(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        word_gates: torch.Tensor,
        projected: torch.Tensor,
        contexts: StepContexts,
        reads_h: StepProducts,
        reads_context: StepProducts,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of teacher_forced_soft over its first n rows: `step` without the word distribution. h, c (n, D);
        word_gates (n, 4D) the LSTM's input weights on the previous words; projected (n, P, A) the rows' attention
        terms, contexts their features; reads_h, reads_context the joined products (see teacher_forced_soft)
        -> h, c, the gated context (n, F), alpha (n, P)."""
        attention, n = self.attention, h.size(0)
        A, F_ = attention.decoder_projection.out_features, self.f_beta.out_features
        hidden, beta, recurrent = reads_h(h).split([A, F_, word_gates.size(1)], dim=1)
        # SoftAttention.forward from its decoder term v = 2 (W_h h + b_h)
        dtype = torch.promote_types(projected.dtype, hidden.dtype)
        w, b = attention.score.weight.view(A).to(dtype), attention.score.bias.to(dtype)
        scores = AttentionScores.apply(projected, hidden.mul(2).view(n, 1, 1, A), w, b)  # (n*P,)
        alpha = scores.view(n, -1).softmax(dim=1)  # (n, P)
        gated = torch.sigmoid(beta) * contexts(alpha)  # (n, F)
        gates = recurrent + word_gates + reads_context(gated)  # (n, 4D): nn.LSTMCell's
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h, c, gated, alpha

    @staticmethod
    def config_problem(config: ModelConfig) -> str | None:
        """Why `config` cannot describe this decoder (None: it can): every LSTM config can."""
        return None

    @staticmethod
    def max_positions(config: ModelConfig) -> int | None:
        """How many words (with <start>) a caption may have for this decoder: the LSTM has no limit."""
        return None


# The one place a decoder kind is chosen: ModelConfig.decoder -> its class. Everything else asks the class
# (own_fields, config_problem, max_positions) or the decoder (the Decoder interface of decoder.py).
DECODERS: dict[str, type[CaptionDecoder] | type[TransformerDecoder]] = {
    "lstm": CaptionDecoder,
    "transformer": TransformerDecoder,
}


def decoder_class(config: ModelConfig) -> type[CaptionDecoder] | type[TransformerDecoder]:
    """The class of the decoder `config` describes (config.decoder, one of DECODERS)."""
    return DECODERS[config.decoder]


def build_decoder(config: ModelConfig) -> Decoder:
    """The decoder `config` describes: the paper's LSTM above, or transformer.py's."""
    return decoder_class(config)(config)


class CaptionModel(nn.Module):
    """Encoder + decoder (build_decoder). The encoder is optional: training on cached features needs only the
    decoder."""

    def __init__(self, config: ModelConfig, *, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = build_decoder(config)

    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: LocationSampling | None = None,
    ) -> TeacherForced:
        """Teacher-forced pass over N captions of B images: the decoder's teacher_forced (decoder.Decoder).

        features (B, P, E); captions (N, T) = <start> w_1 .. w_n <end> <pad>..; lengths (N,) counting <start>
        and <end>; image_index (N,) the row of `features` each caption describes, so five captions of one
        image share its projection; sampling (hard attention): the B images' locations. Returns
        log-probabilities (N, T-1, V) of captions[:, 1:], the attention weights (N, T-1, P) and the sampled
        locations (N, T-1).
        """
        return self.decoder.teacher_forced(features, captions, lengths, image_index, sampling=sampling)


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
