"""Greedy and batched beam search against exhaustive search on a mock decoder, and on the real decoder."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    WORDS,
    MockDecoder,
    V,
    encoded_for,
    exhaustive,
    load_script,
    repeats_an_ngram,
    tiny_decoder,
)

from show_attend_tell import decoding
from show_attend_tell.decoding import beam_search, greedy, length_normalised, once_mask, rollout
from show_attend_tell.model import Encoded
from show_attend_tell.text import END_ID, FUNCTION_WORDS, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary


@pytest.mark.parametrize(("length_penalty", "no_repeat_ngram"), [(0.0, 0), (0.0, 3), (0.0, 2)])
def test_beam_search_with_a_wide_beam_equals_exhaustive_search(length_penalty, no_repeat_ngram):
    max_length = 5
    mock = MockDecoder(images=6, max_length=max_length)
    beams = beam_search(
        mock,
        encoded_for(list(range(6))),
        beam_size=400,
        max_length=max_length,
        length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram,
    )
    for image, hypotheses in enumerate(beams):
        assert not any(repeats_an_ngram(tuple(h.tokens), no_repeat_ngram) for h in hypotheses)
        score, words, log_prob = exhaustive(mock, image, max_length, length_penalty, no_repeat_ngram)
        assert hypotheses[0].tokens == words
        assert hypotheses[0].log_prob == pytest.approx(log_prob, abs=1e-5)
        assert hypotheses[0].score == pytest.approx(score, abs=1e-5)
        # every returned hypothesis is scored by the model's own log-probability
        for h in hypotheses:
            tokens = h.tokens + ([END_ID] if h.finished else [])
            assert h.log_prob == pytest.approx(mock.sequence_log_prob(image, tokens), abs=1e-5)


@pytest.mark.parametrize("once", [frozenset({4}), frozenset({4, 5, 6})])
def test_words_held_once_are_never_repeated_and_the_search_stays_exhaustive(once):
    max_length = 5
    mock = MockDecoder(images=6, max_length=max_length, seed=2)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(once)] = True
    encoded = encoded_for(list(range(6)))
    free = beam_search(mock, encoded, beam_size=400, max_length=max_length, length_penalty=0.0)
    found = beam_search(mock, encoded, beam_size=400, max_length=max_length, length_penalty=0.0, once=mask)
    changed = 0
    for image, hypotheses in enumerate(found):
        assert all(h.tokens.count(w) <= 1 for h in hypotheses for w in once)
        score, words, log_prob = exhaustive(mock, image, max_length, once=once)
        assert hypotheses[0].tokens == words and hypotheses[0].log_prob == pytest.approx(log_prob, abs=1e-5)
        changed += free[image][0].tokens != words
    assert changed  # the mock's best captions repeat these words without the rule
    # greedy and sampling never write such a word twice either
    for h in greedy(mock, encoded, max_length=max_length, once=mask):
        assert all(h.tokens.count(w) <= 1 for w in once)
    generator = torch.Generator().manual_seed(0)
    drawn = rollout(mock, encoded, max_length=max_length, sample=True, generator=generator, per_image=8, once=mask)
    assert all(row.count(w) <= 1 for row in drawn.tokens.tolist() for w in once)


def test_once_mask_holds_every_word_but_the_function_words_and_the_special_tokens():
    vocab = Vocabulary([*SPECIAL_TOKENS, "a", "dog", "in", "the", "bike", "and", "green"])
    mask = once_mask(vocab)
    assert [w for w, held in zip(vocab.words, mask.tolist(), strict=True) if held] == ["dog", "bike", "green"]
    assert {"a", "in", "the", "and"} <= FUNCTION_WORDS and not {"dog", "bike", "green"} & FUNCTION_WORDS


def test_narrow_beam_is_not_better_than_exhaustive_and_sorted():
    mock = MockDecoder(images=4, max_length=5, seed=3)
    beams = beam_search(mock, encoded_for([0, 1, 2, 3]), beam_size=3, max_length=5)
    for image, hypotheses in enumerate(beams):
        assert len(hypotheses) == 3
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert hypotheses[0].log_prob <= exhaustive(mock, image, 5)[2] + 1e-6


def test_beam_of_one_equals_greedy():
    mock = MockDecoder(images=5, max_length=6, seed=1)
    encoded = encoded_for([0, 1, 2, 3, 4])
    by_beam = [b[0] for b in beam_search(mock, encoded, beam_size=1, max_length=6)]
    by_greedy = greedy(mock, encoded, max_length=6)
    for b, g in zip(by_beam, by_greedy, strict=True):
        assert b.tokens == g.tokens
        assert b.log_prob == pytest.approx(g.log_prob, abs=1e-6)


@pytest.mark.parametrize("compact_fraction", [0.0, 0.25, 0.5, 2.0])
def test_batch_gives_the_same_captions_as_one_image_at_a_time(monkeypatch, compact_fraction):
    # finished images leave the batch once they are `compact_fraction` of it (0: at once, 2: never); on the
    # mock some finish long before others, and until they leave their rows must not change their results
    monkeypatch.setattr(decoding, "COMPACT_FRACTION", compact_fraction)
    mock = MockDecoder(images=8, max_length=7, seed=4)
    batched = beam_search(mock, encoded_for(list(range(8))), beam_size=3, max_length=7)
    assert len({max(len(h.tokens) + h.finished for h in hypotheses) for hypotheses in batched}) > 1
    for i in range(8):
        alone = beam_search(mock, encoded_for([i]), beam_size=3, max_length=7)[0]
        assert [(h.tokens, h.log_prob) for h in alone] == [(h.tokens, h.log_prob) for h in batched[i]]
    decoder = tiny_decoder()
    features = torch.randn(4, 4, 8)
    batched = beam_search(decoder, decoder.encode(features), beam_size=3, max_length=7)
    for i in range(4):
        alone = beam_search(decoder, decoder.encode(features[i : i + 1]), beam_size=3, max_length=7)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i], strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-5)
            torch.testing.assert_close(a.alphas, b.alphas)


def test_no_end_token_ever_still_returns_max_length_captions():
    decoder = tiny_decoder(deep_output=False)
    with torch.no_grad():
        decoder.L_o.bias[END_ID] = -1e4  # the model never ends a caption
    encoded = decoder.encode(torch.randn(2, 4, 8))
    for hypotheses in beam_search(decoder, encoded, beam_size=3, max_length=9):
        assert all(len(h.tokens) == 9 and not h.finished for h in hypotheses)
        assert all(h.alphas.shape == (9, 4) for h in hypotheses)
    assert all(len(h.tokens) == 9 for h in greedy(decoder, encoded, max_length=9))


def test_attention_maps_are_distributions_per_word_and_specials_never_appear():
    decoder = tiny_decoder(seed=2)
    encoded = decoder.encode(torch.randn(3, 4, 8))
    for hypotheses in beam_search(decoder, encoded, beam_size=4, max_length=8, length_penalty=1.0):
        for h in hypotheses:
            assert not set(h.tokens) & {PAD_ID, START_ID, END_ID, UNK_ID}
            torch.testing.assert_close(h.alphas.sum(dim=1), torch.ones(len(h.tokens)))
            assert h.score == pytest.approx(length_normalised(h.log_prob, len(h.tokens) + h.finished, 1.0))


def test_sampling_returns_the_log_probabilities_of_the_policy_it_samples_from():
    """SCST's gradient must be that of the distribution sampled from: the model's, renormalised over the words
    allowed at the step (never <pad>/<start>/<unk>, never a repeated trigram)."""
    mock = MockDecoder(images=2, max_length=8, seed=3)
    generator = torch.Generator().manual_seed(0)
    tokens, log_probs, _, _ = rollout(
        mock, encoded_for([0, 1]), max_length=8, sample=True, generator=generator, per_image=4
    )  # (8, T): 4 samples of image 0, then 4 of image 1
    checked = 0
    for n, row in enumerate(tokens.tolist()):
        image, previous = n // 4, START_ID
        for t, word in enumerate(row):
            if word == PAD_ID:
                assert float(log_probs[n, t]) == 0.0
                continue
            banned = {PAD_ID, START_ID, UNK_ID} | {
                row[i + 2] for i in range(t - 2) if (row[i], row[i + 1]) == (row[t - 2], row[t - 1])
            }
            assert word not in banned
            allowed = [w for w in range(V) if w not in banned]
            table = mock.table[image, t, previous]
            expected = table[word] - torch.logsumexp(table[allowed], dim=0)
            assert float(log_probs[n, t]) == pytest.approx(float(expected), abs=1e-5)
            previous, checked = word, checked + 1
    assert checked > 16


def penalised_exhaustive(mock: MockDecoder, image: int, max_length: int, penalties: torch.Tensor, constraints=()):
    """exhaustive() with each word's penalty added to the caption's log p (what the search ranks by)."""
    best = None
    for n in range(max_length + 1):
        for words in itertools.product([w for w in WORDS if w != END_ID], repeat=n):
            if repeats_an_ngram(words, 3) or not all(set(words) & c for c in constraints):
                continue
            tokens = list(words) + [END_ID] if n < max_length else list(words)
            total = mock.sequence_log_prob(image, tokens) + float(sum(penalties[w] for w in tokens))
            if best is None or total > best[0]:
                best = (total, list(words))
    return best


@pytest.mark.parametrize("constrained", [False, True])
def test_word_penalties_are_what_the_search_ranks_by(constrained):
    from show_attend_tell.decoding import best_captions

    max_length, images = 5, 5
    mock = MockDecoder(images=images, max_length=max_length, seed=7)
    penalties = torch.zeros(images, V)
    penalties[:, 4] = -3.0  # one word discouraged in every image
    penalties[1, 5] = -float("inf")  # and one banned in image 1
    constraints = [[{6}] for _ in range(images)] if constrained else None
    found = best_captions(
        mock,
        encoded_for(list(range(images))),
        constraints,
        beam_size=400,
        max_length=max_length,
        length_penalty=0.0,
        word_penalties=penalties,
    )
    changed = 0
    for image, hypotheses in enumerate(found):
        sets = ({6},) if constrained else ()
        total, words = penalised_exhaustive(mock, image, max_length, penalties[image], sets)
        assert hypotheses[0].tokens == words
        assert hypotheses[0].log_prob == pytest.approx(total, abs=1e-5)
        assert 5 not in hypotheses[0].tokens if image == 1 else True
        changed += words != exhaustive(mock, image, max_length, constraints=sets)[1]
    assert changed  # the penalties changed some caption, so the test tells them apart


def test_word_penalties_keep_batch_and_alone_equal():
    from show_attend_tell.decoding import best_captions

    mock = MockDecoder(images=8, max_length=7, seed=4)
    penalties = torch.zeros(8, V)
    penalties[::2, 4] = -2.0
    batched = best_captions(mock, encoded_for(list(range(8))), beam_size=3, max_length=7, word_penalties=penalties)
    for i in range(8):
        alone = best_captions(mock, encoded_for([i]), beam_size=3, max_length=7, word_penalties=penalties[i : i + 1])
        assert [(h.tokens, h.log_prob) for h in alone[0]] == [(h.tokens, h.log_prob) for h in batched[i]]


@pytest.mark.parametrize("average", ["log-probs", "probs"])
def test_an_ensemble_searches_as_one_decoder_with_its_members_averaged(average):
    """recipes/logit_ensemble.py: beam search through Ensemble equals beam search through one mock decoder whose
    table is the members' tables averaged, in log p or in p."""
    recipe = load_script("recipes/logit_ensemble.py")
    first, second = MockDecoder(images=3, max_length=6, seed=0), MockDecoder(images=3, max_length=6, seed=1)
    combined = MockDecoder(images=3, max_length=6)
    tables = torch.stack([first.table, second.table])
    combined.table = tables.mean(0) if average == "log-probs" else tables.logsumexp(0) - torch.tensor(2.0).log()
    encoded = encoded_for([0, 1, 2])
    options = dict(beam_size=3, max_length=6)
    found = beam_search(
        recipe.Ensemble([first, second], average), recipe.EnsembleEncoded([encoded, encoded]), **options
    )
    expected = beam_search(combined, encoded, **options)
    alone = beam_search(first, encoded, **options)
    assert [[h.tokens for h in image] for image in found] != [[h.tokens for h in image] for image in alone]
    for ours, theirs in zip(found, expected, strict=True):
        assert [h.tokens for h in ours] == [h.tokens for h in theirs]
        assert [h.log_prob for h in ours] == pytest.approx([h.log_prob for h in theirs], abs=1e-5)


class Encoding(MockDecoder):
    """A MockDecoder that encodes its own grids, as decoder.Decoder does (the grid names the image it reads)."""

    def encode(self, features: torch.Tensor) -> Encoded:
        return Encoded(features, features)


@pytest.mark.parametrize("average", ["log-probs", "probs"])
def test_an_ensemble_weighs_its_members_and_gives_each_its_view_of_the_photo(average):
    """recipes/logit_ensemble.py --mirror: one decoder reading two views of each photo, side by side along the grid
    (here photos 0-2 and, as their "mirror images", photos 3-5), weighted 0.75 and 0.25, searches as one decoder
    whose table is that weighted average."""
    recipe = load_script("recipes/logit_ensemble.py")
    mock = Encoding(images=6, max_length=6)
    weights = torch.tensor([0.75, 0.25]).view(2, 1, 1, 1, 1)
    tables = torch.stack([mock.table[:3], mock.table[3:]])
    combined = MockDecoder(images=3, max_length=6)
    if average == "log-probs":
        combined.table = (tables * weights).sum(0)
    else:
        combined.table = (tables + weights.log()).logsumexp(0)
    ensemble = recipe.Ensemble([mock, mock], average, weights=[0.75, 0.25], views=[0, 1])
    both = torch.cat([encoded_for([0, 1, 2]).features, encoded_for([3, 4, 5]).features], dim=1)  # (3, 2P, E)
    options = dict(beam_size=3, max_length=6)
    found = beam_search(ensemble, ensemble.encode(both), **options)
    expected = beam_search(combined, encoded_for([0, 1, 2]), **options)
    alone = beam_search(mock, encoded_for([0, 1, 2]), **options)
    assert [[h.tokens for h in image] for image in found] != [[h.tokens for h in image] for image in alone]
    for ours, theirs in zip(found, expected, strict=True):
        assert [h.tokens for h in ours] == [h.tokens for h in theirs]
        assert [h.log_prob for h in ours] == pytest.approx([h.log_prob for h in theirs], abs=1e-5)
    with pytest.raises(ValueError, match="one weight and one view for each member"):
        recipe.Ensemble([mock, mock], average, weights=[1.0])


@pytest.mark.parametrize("weight", ["0", "1", "1.5"])
def test_the_ensemble_recipe_refuses_a_mirror_weight_outside_0_to_1(weight, monkeypatch, capsys):
    recipe = load_script("recipes/logit_ensemble.py")
    argv = ["logit_ensemble.py", "MODEL", "--data", "D", "--features", "S", "--out", "o.json", "--mirror", weight]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit):
        recipe.main()
    expected = f"--mirror must be between 0 and 1 (its weight in the average), got {float(weight)}"
    assert expected in capsys.readouterr().err
