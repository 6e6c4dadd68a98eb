"""Decoders: greedy, sampling (for self-critical training) and batched beam search, all through one `step`, and
`forced`, which reads a given caption through it.

Each takes any `decoder.Decoder` (the LSTM of model.py, the int8 one of inference.py, ...) and what its `encode`
returned for a batch of B images; shapes use the letters declared in model.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from show_attend_tell.config import DEFAULT_BEAM_SIZE, DEFAULT_LENGTH_PENALTY, DEFAULT_MAX_LENGTH
from show_attend_tell.decoder import Decoder, EncodedImages, repeat_rows, select_rows
from show_attend_tell.model import sampled_locations
from show_attend_tell.text import END_ID, FUNCTION_WORDS, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary

# No caption repeats a trigram ("in the water in the water"). Self-critical training otherwise learns to pad
# captions with repeats to reach the reference length CIDEr-D's Gaussian rewards; greedy, beam search and SCST
# sampling all apply it, so training optimises the policy that decoding runs.
NO_REPEAT_NGRAM = 3
COMPACT_FRACTION = 0.25  # beam search drops finished images once they are this fraction of its batch
# Beams per image of a constrained search at most: it keeps K beams in each of 2^C states, so each constraint
# doubles its cost. Up to this, K (8 states at the server's largest beam, 10, fit); beyond, fewer beams a state.
MAX_CONSTRAINED_BEAMS = 80


@dataclasses.dataclass
class Hypothesis:
    """One caption: word ids (no <start>/<end>), its log-probability and the attention for every word."""

    tokens: list[int]
    log_prob: float  # sum of log p over the words and the final <end> (when produced)
    score: float  # log_prob after length normalisation; what hypotheses are ranked by
    alphas: torch.Tensor  # (len(tokens), P)
    finished: bool  # produced <end> within the maximum length
    # hard attention: the location whose feature was each word's context (-1: the expected context); None for a
    # decoder that always attends softly
    locations: torch.Tensor | None = None  # (len(tokens),)


def ranking_penalty(beam_size: int, length_penalty: float) -> float:
    """The length penalty a caption's score is given with: none for beam size 1, which ranks nothing (greedy's
    score is its log p, and so is a constrained search's or a template's at one beam)."""
    return length_penalty if beam_size > 1 else 0.0


def length_normalised(log_prob: float, length: int, length_penalty: float) -> float:
    """log_prob / length**length_penalty: 0 keeps raw scores, 1 is the per-word average."""
    return log_prob / max(length, 1) ** length_penalty


@torch.no_grad()
def greedy(
    decoder: Decoder,
    encoded: EncodedImages,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    once: torch.Tensor | None = None,
) -> list[Hypothesis]:
    """The most probable word at every step, for B images at once (`once` as in rollout)."""
    tokens, log_probs, alphas, locations = rollout(
        decoder, encoded, max_length=max_length, sample=False, no_repeat_ngram=no_repeat_ngram, once=once
    )
    totals = log_probs.sum(dim=1).tolist()  # zero after <end>, so each is the caption's log p with its <end>
    return [
        _hypothesis(tokens[b], totals[b], alphas[b], 0.0, None if locations is None else locations[b])
        for b in range(tokens.size(0))
    ]


class Rollout(NamedTuple):
    """N decoded rows (see rollout), each (N, T, ...)."""

    tokens: torch.Tensor  # (N, T) <end> included, <pad> after it
    log_probs: torch.Tensor  # (N, T) of the chosen words, zero after <end>
    alphas: torch.Tensor  # (N, T, P)
    locations: torch.Tensor | None  # (N, T) hard attention's sampled locations (-1: expected context), or None


def rollout(
    decoder: Decoder,
    encoded: EncodedImages,
    *,
    max_length: int,
    sample: bool,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    once: torch.Tensor | None = None,
    per_image: int = 1,
) -> Rollout:
    """Decode N = B*per_image rows (`per_image` consecutive rows for each of the B images in `encoded`) word by
    word, by argmax or by sampling from p(word)^(1/temperature), never repeating an n-gram of size
    `no_repeat_ngram` (0: no limit) nor, with `once` ((V,) bool, once_mask), a word it marks.

    Returns tokens (N, T) (<end> included, <pad> after it), per-token log-probabilities (N, T) of the chosen
    words (differentiable when grad is on; zero after <end>), alphas (N, T, P) and, for a decoder with hard
    attention, the locations of its contexts (N, T). By argmax they are the
    model's log p; when sampling they are the sampling policy's: the model's distribution renormalised over
    the words allowed at that step, at the temperature. That is the policy whose gradient self-critical
    training needs: with the model's raw log p, pushing a sampled word down also pushes up the banned words,
    which are never sampled and so never pushed back.
    """
    N = encoded.features.size(0) * per_image
    device = encoded.features.device
    state = repeat_rows(decoder.init_state(encoded), per_image)
    words = torch.full((N,), START_ID, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    tokens, chosen_log_probs, alphas, locations = [], [], [], []
    for _ in range(max_length):  # a caption still running after max_length tokens is cut there
        log_probs, state, alpha = decoder.step(words, state, encoded)  # (N, V), state, (N, P)
        location = sampled_locations(state)  # (N,) or None
        allowed = log_probs.detach().index_fill(1, _never_next(device), float("-inf"))  # (N, V)
        if tokens:
            rows, banned = repeat_bans(torch.stack(tokens, 1), no_repeat_ngram, once)
            allowed[rows, banned] = float("-inf")
        if sample:
            policy = (log_probs.masked_fill(allowed == float("-inf"), float("-inf")) / temperature).log_softmax(1)
            words = torch.multinomial(policy.detach().exp(), 1, generator=generator).squeeze(1)  # (N,)
        else:
            policy = log_probs
            words = allowed.argmax(dim=1)  # (N,)
        words = words.masked_fill(finished, PAD_ID)
        chosen = policy.gather(1, words.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)  # (N,)
        tokens.append(words)
        chosen_log_probs.append(chosen)
        alphas.append(alpha.masked_fill(finished.unsqueeze(1), 0.0))
        if location is not None:
            locations.append(location.masked_fill(finished, -1))
        finished = finished | (words == END_ID)
        if bool(finished.all()):
            break
    stacked = torch.stack(locations, 1) if locations else None
    return Rollout(torch.stack(tokens, 1), torch.stack(chosen_log_probs, 1), torch.stack(alphas, 1), stacked)


def repeated_ngram_bans(history: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, words): for each of N rows of tokens so far (N, t), the words that would complete an n-gram the row
    already holds (n >= 2). Vectorised: every earlier (n-1)-gram is compared with the row's last one."""
    if n < 2 or history.size(1) < n:
        empty = history.new_zeros(0)
        return empty, empty
    grams = history.unfold(1, n, 1)  # (N, t-n+1, n)
    last = history[:, 1 - n :]  # (N, n-1)
    match = (grams[:, :, :-1] == last.unsqueeze(1)).all(dim=2)  # (N, t-n+1)
    rows, positions = match.nonzero(as_tuple=True)
    return rows, grams[rows, positions, -1]


def once_mask(vocab: Vocabulary) -> torch.Tensor:
    """(V,) bool, True for the words a caption may hold at most once: every word of `vocab` but
    text.FUNCTION_WORDS and the special tokens. The product's searches take it as `once` (captioner.py,
    evaluate.py): a self-critical model otherwise repeats nouns ("riding a bike on a bike"). Self-critical training
    samples with it only under `sat train --once-words` (TrainConfig.once_words)."""
    mask = torch.tensor([word not in FUNCTION_WORDS for word in vocab.words], dtype=torch.bool)
    mask[: len(SPECIAL_TOKENS)] = False
    return mask


def repeat_bans(history: torch.Tensor, n: int, once: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, words) that rows of tokens so far (N, t) may not write next: those completing an n-gram the row holds
    (repeated_ngram_bans) and, with `once` (V,) bool, the words it marks that the row already holds."""
    rows, words = repeated_ngram_bans(history, n)
    if once is None or not history.size(1):
        return rows, words
    # (M,) each: the row and the position of a held word that may not come again
    held_rows, positions = once.to(history.device)[history].nonzero(as_tuple=True)
    return torch.cat([rows, held_rows]), torch.cat([words, history[held_rows, positions]])


def _never_next(device: torch.device) -> torch.Tensor:
    """Tokens a running caption may not produce next: <pad> and <start> (never targets in training) and <unk>
    (it stands for any rare word; a caption is better served by the most probable real word)."""
    return torch.tensor([PAD_ID, START_ID, UNK_ID], device=device)


def _hypothesis(
    tokens: torch.Tensor,
    log_prob: float,
    alphas: torch.Tensor,
    length_penalty: float,
    locations: torch.Tensor | None = None,
) -> Hypothesis:
    """One decoded row, tokens (T,) with its log p, alphas (T, P) and locations (T,) (hard attention): cut at
    <end>/<pad>, keep each word's alpha and location."""
    ids = tokens.tolist()
    n = len(ids)
    for i, word in enumerate(ids):
        if word in (END_ID, PAD_ID):
            n = i
            break
    finished = n < len(ids) and ids[n] == END_ID
    return Hypothesis(
        tokens=ids[:n],
        log_prob=log_prob,
        score=length_normalised(log_prob, n + finished, length_penalty),  # <end> counts as a token
        alphas=alphas[:n].detach().cpu(),
        finished=finished,
        locations=None if locations is None else locations[:n].cpu(),
    )


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    encoded: EncodedImages,
    *,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    word_penalties: torch.Tensor | None = None,
    once: torch.Tensor | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search: B images x K beams advance as one (B*K)-row tensor program; no beam repeats an
    n-gram of size `no_repeat_ngram` (0: no limit), nor a word of `once` ((V,) bool, once_mask) twice.
    `word_penalties` (B, V), added to every step's log p of image b's beams, discourage words without banning them
    (guidance.Plan); a caption that still holds such a word has them in its log_prob and score.

    A finished beam keeps its slot and its score (its only continuation is <pad> at log p 0), so with K
    at least the number of possible captions this is exhaustive search. Beams are ranked by raw
    log-probability while searching; the K survivors of each image are then sorted by the length-normalised
    score. Returns, per image, up to K hypotheses, best first.
    """
    B, P = encoded.features.shape[:2]
    K = beam_size
    device = encoded.features.device
    state = repeat_rows(decoder.init_state(encoded), K)  # (B*K, D) each
    words = torch.full((B * K,), START_ID, dtype=torch.long, device=device)  # (A*K,) each beam's last word
    scores = torch.full((B, K), float("-inf"), device=device)  # (A, K) each beam's log p so far
    scores[:, 0] = 0.0  # all beams start identical: let only the first expand at t=0
    # Row a*K + k of the tensors below is beam k of the a-th image still in the batch.
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=device)  # (A*K, t)
    alphas = torch.zeros(B * K, 0, P, device=device)  # (A*K, t, P)
    locations = None  # (A*K, t) hard attention's, once a step has returned some
    finished = None  # (A*K,) once some beam has produced <end>
    # An image whose K beams have all ended has its results taken at once; it leaves the batch (its rows stop
    # costing decoder steps) once the finished images are COMPACT_FRACTION of the batch. Dropping them copies
    # every surviving image's features and attention terms; over 32 photos on a 14x14 grid, waiting for a quarter
    # of the batch made the search 1.04-1.05x faster than dropping each at its end (median of 15 rounds; 1.08x in
    # the rounds at full speed; results/decode_speed*.json, eager_over_deferred_compaction).
    alive = torch.arange(B, device=device)  # (A,) the images still in the batch
    reported = torch.zeros(B, dtype=torch.bool, device=device)  # (A,) finished, and its results taken
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    # Loop invariants, built once: a step costs well under a millisecond, so every tensor op counts.
    never_next = _never_next(device)
    first_rows = (torch.arange(B, device=device) * K).unsqueeze(1)  # (A, 1) image a's first row is a*K
    frozen = None  # (V,) the only continuation of a finished beam: <pad> at log p 0
    row_penalties = None if word_penalties is None else word_penalties.repeat_interleave(K, dim=0)  # (A*K, V)
    for t in range(max_length):  # a caption still running after max_length tokens is cut there
        A = alive.numel()
        log_probs, state, alpha = decoder.step(words, state, encoded)  # (A*K, V), state, (A*K, P)
        locations = _grown(locations, sampled_locations(state), tokens.size(1))
        V = log_probs.size(1)
        if row_penalties is not None:
            log_probs = log_probs + row_penalties
        log_probs.index_fill_(1, never_next, float("-inf"))  # (A*K, V)
        if t:
            ban_rows, ban_words = repeat_bans(tokens, no_repeat_ngram, once)
            if ban_rows.numel():
                log_probs[ban_rows, ban_words] = float("-inf")
        if finished is not None:
            log_probs = torch.where(finished.unsqueeze(1), frozen, log_probs)  # (A*K, V)
        candidates = (log_probs.view(A, K, V) + scores.unsqueeze(2)).view(A, K * V)
        scores, flat_index = candidates.topk(K, dim=1)  # (A, K): the survivors' log p, and which they are
        words = (flat_index % V).view(-1)  # (A*K,)
        rows = (flat_index // V + first_rows).view(-1)  # (A*K,) the row each survivor extends
        state = select_rows(state, rows)
        tokens = torch.cat([tokens[rows], words.unsqueeze(1)], dim=1)
        alphas = torch.cat([alphas, alpha.unsqueeze(1)], dim=1)[rows]  # finished beams' extra rows are cut later
        locations = None if locations is None else locations[rows]
        ended = words == END_ID  # (A*K,)
        if finished is None:
            if not bool(ended.any()):
                continue  # no beam has finished, so no image is done
            finished = ended
            frozen = torch.full((V,), float("-inf"), device=device)
            frozen[PAD_ID] = 0.0
        else:
            finished = finished[rows] | ended
        done = finished.view(A, K).all(dim=1)  # (A,)
        newly_done = done & ~reported
        if bool(newly_done.any()):
            for a in newly_done.nonzero().flatten().tolist():
                beams = slice(a * K, (a + 1) * K)
                results[int(alive[a])] = _ranked(tokens, alphas, locations, beams, scores[a], length_penalty)
            reported = done
            keep = ~done
            kept = int(keep.sum())
            if kept == 0:
                return results
            if A - kept < COMPACT_FRACTION * A:
                continue  # a finished image's rows only repeat <pad> at log p 0 until it is dropped below
            reported = reported[keep]
            rows_kept = keep.repeat_interleave(K)  # (A*K,)
            alive, scores, encoded = alive[keep], scores[keep], encoded.select(keep)
            first_rows = first_rows[: alive.numel()]
            tokens, alphas, finished = tokens[rows_kept], alphas[rows_kept], finished[rows_kept]
            row_penalties = None if row_penalties is None else row_penalties[rows_kept]
            locations = None if locations is None else locations[rows_kept]
            state, words = select_rows(state, rows_kept), words[rows_kept]
    for a, image in enumerate(alive.tolist()):
        if bool(reported[a]):
            continue
        beams = slice(a * K, (a + 1) * K)
        results[image] = _ranked(tokens, alphas, locations, beams, scores[a], length_penalty)
    return results


def _grown(locations: torch.Tensor | None, location: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """Every row's locations so far (R, steps) with this step's (R,) appended: (R, steps + 1); None for a decoder
    that samples no locations."""
    if location is None:
        return None
    if locations is None:
        locations = location.new_full((location.size(0), steps), -1)
    return torch.cat([locations, location.unsqueeze(1)], dim=1)


def _ranked(
    tokens: torch.Tensor,
    alphas: torch.Tensor,
    locations: torch.Tensor | None,
    beams: slice,
    scores: torch.Tensor,
    length_penalty: float,
) -> list[Hypothesis]:
    """One image's K beams, rows `beams` of tokens (R, t), alphas (R, t, P) and locations (R, t), and their log p
    (K,) -> its hypotheses, best first by normalised score."""
    hypotheses = [
        _hypothesis(
            tokens[beams][k],
            log_prob,
            alphas[beams][k],
            length_penalty,
            None if locations is None else locations[beams][k],
        )
        for k, log_prob in enumerate(scores.tolist())
        if log_prob > float("-inf")  # fewer possible captions than beams
    ]
    return sorted(hypotheses, key=lambda h: h.score, reverse=True)


@torch.no_grad()
def constrained_beam_search(
    decoder: Decoder,
    encoded: EncodedImages,
    constraints: Sequence[Sequence[Collection[int]]],
    *,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    word_penalties: torch.Tensor | None = None,
    once: torch.Tensor | None = None,
    max_beams: int = MAX_CONSTRAINED_BEAMS,
) -> list[list[Hypothesis]]:
    """Constrained beam search (Anderson et al. 2017): image b's caption must contain, for each of its
    constraints `constraints[b]`, one word of that set (a disjunctive constraint: {cat, cats}).

    The search keeps K beams for each subset of satisfied constraints (a finite-state machine with 2^C states);
    a word moves a beam to the state with that word's constraints added, and only beams that satisfied every
    constraint may end. K is beam_size, or fewer when 2^C states of them would exceed `max_beams`; a constraint
    met whenever another is (the same set, or one holding it) is dropped first. Images are grouped by their
    number of constraints and each group is searched as one batch through the decoder's `step`; an image
    without constraints gets plain `beam_search`; `no_repeat_ngram` and `once` as there. Returns, per image, up to
    K hypotheses that meet every constraint, best first by normalised score; if none can (too short a max_length),
    plain beam search's.
    """
    results: list[list[Hypothesis]] = [[] for _ in range(encoded.features.size(0))]
    options = dict(max_length=max_length, length_penalty=length_penalty, once=once)
    needed = [_needed(sets) for sets in constraints]
    groups: dict[int, list[int]] = {}
    for image, sets in enumerate(needed):
        groups.setdefault(len(sets), []).append(image)
    for count, images in groups.items():
        index = torch.tensor(images, device=encoded.features.device)
        part = encoded.select(index)
        options["word_penalties"] = None if word_penalties is None else word_penalties[index]
        if count == 0:
            found = beam_search(decoder, part, beam_size=beam_size, no_repeat_ngram=no_repeat_ngram, **options)
        else:
            per_state = max(1, min(beam_size, max_beams >> count))
            sets = [needed[i] for i in images]
            found = _constrained(decoder, part, sets, no_repeat_ngram, beam_size=per_state, **options)
        for image, hypotheses in zip(images, found, strict=True):
            results[image] = hypotheses
    return results


def _needed(sets: Sequence[Collection[int]]) -> list[frozenset[int]]:
    """The constraints left once those met whenever another is met are dropped: a repeated set, or a set that
    holds all of another's words ({dog, dogs} is met by any caption that meets {dog})."""
    unique = list(dict.fromkeys(frozenset(words) for words in sets))
    return [words for words in unique if not any(other < words for other in unique)]


def _constrained(
    decoder: Decoder,
    encoded: EncodedImages,
    constraints: list[Sequence[Collection[int]]],
    no_repeat_ngram: int,
    *,
    beam_size: int,
    max_length: int,
    length_penalty: float,
    word_penalties: torch.Tensor | None,
    once: torch.Tensor | None,
) -> list[list[Hypothesis]]:
    """constrained_beam_search for B images with C >= 1 constraints each. Row (b*S + s)*K + k is beam k of
    image b in state s, the bit mask of the constraints its words satisfy (S = 2^C, state S-1 accepts)."""
    B, P = encoded.features.shape[:2]
    C, K = len(constraints[0]), beam_size
    S = 1 << C
    device = encoded.features.device
    rows_per_image = S * K
    state = repeat_rows(decoder.init_state(encoded), rows_per_image)
    words = torch.full((B * rows_per_image,), START_ID, dtype=torch.long, device=device)
    scores = torch.full((B, S, K), float("-inf"), device=device)
    scores[:, 0, 0] = 0.0  # every beam starts in state 0 (nothing satisfied) from one <start>
    row_state = torch.arange(S, device=device).repeat_interleave(K)  # (S*K,) the state of each row of an image
    accepting = row_state == S - 1
    tokens = torch.zeros(B * rows_per_image, 0, dtype=torch.long, device=device)
    alphas = torch.zeros(B * rows_per_image, 0, P, device=device)
    locations = None  # (B*S*K, t) hard attention's, once a step has returned some
    finished = torch.zeros(B * rows_per_image, dtype=torch.bool, device=device)
    first_rows = (torch.arange(B, device=device) * rows_per_image).unsqueeze(1)  # (B, 1)
    never_next = _never_next(device)
    bits = frozen = None  # (B, V) the constraints each word satisfies, as a bit mask; see beam_search
    row_penalties = None if word_penalties is None else word_penalties.repeat_interleave(rows_per_image, dim=0)
    for t in range(max_length):
        log_probs, state, alpha = decoder.step(words, state, encoded)  # (B*S*K, V), state, (B*S*K, P)
        locations = _grown(locations, sampled_locations(state), tokens.size(1))
        if row_penalties is not None:
            log_probs = log_probs + row_penalties
        if bits is None:
            V = log_probs.size(1)
            bits = torch.zeros(B, V, dtype=torch.long, device=device)
            for b, sets in enumerate(constraints):
                for c, words_of_set in enumerate(sets):
                    ids = torch.tensor(sorted(words_of_set), dtype=torch.long, device=device)
                    bits[b, ids] |= 1 << c
            frozen = torch.full((V,), float("-inf"), device=device)
            frozen[PAD_ID] = 0.0
        log_probs.index_fill_(1, never_next, float("-inf"))
        if t:
            ban_rows, ban_words = repeat_bans(tokens, no_repeat_ngram, once)
            if ban_rows.numel():
                log_probs[ban_rows, ban_words] = float("-inf")
        # Only a beam that satisfied every constraint may end; one that ends here must satisfy them with this word.
        ends_satisfied = (row_state.view(1, -1) | bits[:, END_ID].view(B, 1)) == S - 1  # (B, S*K)
        log_probs[:, END_ID].masked_fill_(~ends_satisfied.view(-1), float("-inf"))
        log_probs = torch.where(finished.unsqueeze(1), frozen, log_probs)  # (B*S*K, V)
        candidates = log_probs.view(B, rows_per_image, V) + scores.view(B, rows_per_image, 1)  # (B, S*K, V)
        targets = row_state.view(1, -1, 1) | bits.view(B, 1, V)  # (B, S*K, V) the state each candidate reaches
        new_scores, new_index = [], []
        for s in range(S):
            best = candidates.masked_fill(targets != s, float("-inf")).view(B, -1).topk(K, dim=1)
            new_scores.append(best.values)
            new_index.append(best.indices)
        scores = torch.stack(new_scores, dim=1)  # (B, S, K)
        flat_index = torch.stack(new_index, dim=1).view(B, rows_per_image)  # (B, S*K)
        words = (flat_index % V).view(-1)
        rows = (flat_index // V + first_rows).view(-1)  # the row each survivor extends
        state = select_rows(state, rows)
        tokens = torch.cat([tokens[rows], words.unsqueeze(1)], dim=1)
        alphas = torch.cat([alphas, alpha.unsqueeze(1)], dim=1)[rows]
        locations = None if locations is None else locations[rows]
        finished = finished[rows] | (words == END_ID)
        # An image is done once its accepting beams have all ended and no running beam scores above them:
        # log p only falls, so nothing can enter the accepting top K any more.
        flat_scores = scores.view(B, rows_per_image)
        alive = ~finished.view(B, rows_per_image) & (flat_scores > float("-inf"))
        best_running = flat_scores.masked_fill(~alive, float("-inf")).max(dim=1).values  # (B,)
        worst_accepted = flat_scores[:, accepting].min(dim=1).values  # (B,)
        accepted_done = (~alive)[:, accepting].all(dim=1)  # (B,) every accepting beam ended (or never began)
        if bool((accepted_done & (best_running <= worst_accepted)).all()):
            break
    results: list[list[Hypothesis]] = []
    for b in range(B):
        start = int(first_rows[b, 0]) + (S - 1) * K
        beams = slice(start, start + K)  # the accepting state's
        results.append(_ranked(tokens, alphas, locations, beams, scores[b, S - 1], length_penalty))
    unmet = [b for b, hypotheses in enumerate(results) if not hypotheses]
    if unmet:  # no caption could meet the constraints (too short a max_length): the plain search's
        found = beam_search(
            decoder,
            encoded.select(torch.tensor(unmet, device=device)),
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            no_repeat_ngram=no_repeat_ngram,
            word_penalties=None if word_penalties is None else word_penalties[unmet],
            once=once,
        )
        for b, hypotheses in zip(unmet, found, strict=True):
            results[b] = hypotheses
    return results


@torch.no_grad()
def forced(
    decoder: Decoder,
    encoded: EncodedImages,
    captions: Sequence[Sequence[int]],
    *,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
) -> list[Hypothesis]:
    """Given captions, one per image (word ids without <start>/<end>), read by the decoder word by word as if it
    had written them: each one's log-probability with its <end> under the model, its normalised score and the
    decoder's attention while it wrote each word (a template caption's attention maps, guidance.Template)."""
    B = len(captions)
    device = encoded.features.device
    steps = max(len(caption) for caption in captions) + 1  # the last word of each is <end>
    targets = torch.full((B, steps), PAD_ID, dtype=torch.long, device=device)
    for b, caption in enumerate(captions):
        targets[b, : len(caption)] = torch.tensor(list(caption), dtype=torch.long, device=device)
        targets[b, len(caption)] = END_ID
    state = decoder.init_state(encoded)
    words = torch.full((B,), START_ID, dtype=torch.long, device=device)
    log_probs, alphas = [], []
    for t in range(steps):
        step_log_probs, state, alpha = decoder.step(words, state, encoded)  # (B, V), state, (B, P)
        target = targets[:, t]
        log_probs.append(step_log_probs.gather(1, target.unsqueeze(1)).squeeze(1).masked_fill(target == PAD_ID, 0.0))
        alphas.append(alpha)
        words = target.masked_fill(target == PAD_ID, END_ID)  # a caption that ended reads <end> until all have
    totals = torch.stack(log_probs, dim=1).sum(dim=1).tolist()  # (B,)
    attention = torch.stack(alphas, dim=1)  # (B, steps, P)
    return [_hypothesis(targets[b], totals[b], attention[b], length_penalty) for b in range(B)]


def best_captions(
    decoder: Decoder,
    encoded: EncodedImages,
    constraints: Sequence[Sequence[Collection[int]]] | None = None,
    *,
    given: Sequence[Sequence[int] | None] | None = None,
    beam_size: int = DEFAULT_BEAM_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    word_penalties: torch.Tensor | None = None,
    once: torch.Tensor | None = None,
) -> list[list[Hypothesis]]:
    """Per image, its hypotheses best first: greedy for beam_size 1 (one hypothesis), else beam search;
    constrained beam search for the images with `constraints` (see constrained_beam_search); `word_penalties`
    (B, V) as in beam_search (at beam size 1, beam search with one beam, which is greedy with them). An image
    with a `given` caption (word ids: a template's, guidance.Template) gets it first, as the decoder reads it
    (`forced`, without penalties), and its searched hypotheses after it. At beam size 1 every score is the log p
    (ranking_penalty). `once` (V,) bool: the words each caption holds at most once (once_mask; None: any)."""
    length_penalty = ranking_penalty(beam_size, length_penalty)
    options = dict(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty, once=once)
    if word_penalties is not None and not bool(word_penalties.any()):
        word_penalties = None
    if constraints is not None and any(constraints):
        found = constrained_beam_search(decoder, encoded, constraints, word_penalties=word_penalties, **options)
    elif word_penalties is not None:
        found = beam_search(decoder, encoded, word_penalties=word_penalties, **options)
    elif beam_size == 1:
        found = [[h] for h in greedy(decoder, encoded, max_length=max_length, once=once)]
    else:
        found = beam_search(decoder, encoded, **options)
    chosen = [b for b, caption in enumerate(given or []) if caption is not None]
    if chosen:
        index = torch.tensor(chosen, device=encoded.features.device)
        read = forced(decoder, encoded.select(index), [given[b] for b in chosen], length_penalty=length_penalty)
        for b, hypothesis in zip(chosen, read, strict=True):
            found[b] = [hypothesis, *found[b]]
    return found
