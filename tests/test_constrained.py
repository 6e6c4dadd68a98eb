"""Constrained beam search against exhaustive search over the captions that meet the constraints (mock decoder),
and reading a given caption (a template's) as the search would have scored it."""

from __future__ import annotations

import pytest
import torch
from helpers import MockDecoder, encoded_for, exhaustive, tiny_decoder

from show_attend_tell.decoding import (
    MAX_CONSTRAINED_BEAMS,
    beam_search,
    constrained_beam_search,
    forced,
    length_normalised,
)
from show_attend_tell.text import END_ID

# WORDS without <end> are 4, 5 and 6 (see test_decoding)
CONSTRAINTS = [[{4}], [{5, 6}], [{4}, {6}], [{6}, {5}], [], [{4}, {5}, {6}]]


@pytest.mark.parametrize(("length_penalty", "no_repeat_ngram"), [(0.0, 0), (0.0, 3), (0.5, 2)])
def test_wide_constrained_beam_equals_exhaustive_search(length_penalty, no_repeat_ngram):
    max_length = 5
    mock = MockDecoder(images=len(CONSTRAINTS), max_length=max_length, seed=3)
    found = constrained_beam_search(
        mock,
        encoded_for(list(range(len(CONSTRAINTS)))),
        CONSTRAINTS,
        beam_size=400,
        max_length=max_length,
        length_penalty=length_penalty,
        no_repeat_ngram=no_repeat_ngram,
        max_beams=400 * 8,
    )
    for image, constraints in enumerate(CONSTRAINTS):
        score, words, log_prob = exhaustive(
            mock, image, max_length, length_penalty, no_repeat_ngram, tuple(map(set, constraints))
        )
        best = found[image][0]
        assert best.tokens == words
        assert best.log_prob == pytest.approx(log_prob, abs=1e-5)
        assert best.score == pytest.approx(score, abs=1e-5)
        assert all(all(set(h.tokens) & c for c in constraints) for h in found[image])


def test_wide_constrained_beam_with_words_held_once_equals_exhaustive_search():
    max_length, once = 5, frozenset({4, 6})
    mask = torch.zeros(7, dtype=torch.bool)
    mask[list(once)] = True
    mock = MockDecoder(images=len(CONSTRAINTS), max_length=max_length, seed=4)
    encoded = encoded_for(list(range(len(CONSTRAINTS))))
    found = constrained_beam_search(mock, encoded, CONSTRAINTS, beam_size=400, max_length=max_length, once=mask)
    free = constrained_beam_search(mock, encoded, CONSTRAINTS, beam_size=400, max_length=max_length)
    changed = 0
    for image, constraints in enumerate(CONSTRAINTS):
        sets = tuple(map(set, constraints))
        score, words, _ = exhaustive(mock, image, max_length, 0.5, 3, sets, once)
        assert found[image][0].tokens == words and found[image][0].score == pytest.approx(score, abs=1e-5)
        assert all(h.tokens.count(w) <= 1 for h in found[image] for w in once)
        changed += free[image][0].tokens != words
    assert changed


def test_constraints_no_caption_can_meet_fall_back_to_plain_beam_search():
    mock = MockDecoder(images=2, max_length=4, seed=2)
    encoded = encoded_for([0, 1])
    # three words cannot fit in a caption of at most 2 tokens
    found = constrained_beam_search(mock, encoded, [[{4}, {5}, {6}], [{4}]], beam_size=3, max_length=2)
    plain = beam_search(mock, encoded, beam_size=3, max_length=2)
    assert [h.tokens for h in found[0]] == [h.tokens for h in plain[0]]
    assert 4 in found[1][0].tokens


def test_constraints_change_the_caption_only_where_it_lacks_the_word():
    max_length = 6
    mock = MockDecoder(images=4, max_length=max_length, seed=5)
    encoded = encoded_for([0, 1, 2, 3])
    plain = beam_search(mock, encoded, beam_size=5, max_length=max_length)
    # constrain each image to a word its unconstrained caption already holds: nothing changes
    held = [[{plain[b][0].tokens[0]}] if plain[b][0].tokens else [] for b in range(4)]
    guided = constrained_beam_search(mock, encoded, held, beam_size=5, max_length=max_length)
    assert [g[0].tokens for g in guided] == [p[0].tokens for p in plain]


def test_real_decoder_batch_equals_one_image_at_a_time_and_maps_each_word():
    decoder = tiny_decoder(seed=1).eval()
    torch.manual_seed(0)
    features = torch.randn(3, 4, 8)  # E=8 on a 2x2 grid (conftest)
    encoded = decoder.encode(features)
    constraints = [[{8}], [], [{9, 10}, {11}]]
    together = constrained_beam_search(decoder, encoded, constraints, beam_size=3, max_length=8)
    for b in range(3):
        alone = constrained_beam_search(
            decoder, decoder.encode(features[b : b + 1]), [constraints[b]], beam_size=3, max_length=8
        )
        assert [h.tokens for h in alone[0]] == [h.tokens for h in together[b]]
        best = together[b][0]
        assert all(set(best.tokens) & c for c in constraints[b])
        assert best.alphas.shape == (len(best.tokens), 4)
        assert torch.allclose(best.alphas.sum(1), torch.ones(len(best.tokens)), atol=1e-5)


def test_reading_a_given_caption_scores_it_as_the_search_that_wrote_it():
    # mock: log p of each caption (with <end>) from its table; a batch of different lengths reads each alone
    mock = MockDecoder(images=3, max_length=6, seed=7)
    captions = [[4, 5, 6], [6], [5, 4, 5, 6, 4]]
    read = forced(mock, encoded_for([0, 1, 2]), captions, length_penalty=0.5)
    for image, caption in enumerate(captions):
        expected = mock.sequence_log_prob(image, [*caption, END_ID])
        assert read[image].tokens == caption and read[image].finished
        assert read[image].log_prob == pytest.approx(expected, abs=1e-5)
        assert read[image].score == pytest.approx(length_normalised(expected, len(caption) + 1, 0.5), abs=1e-5)
        assert read[image].alphas.shape == (len(caption), 4)
    # the real decoder reading the captions beam search wrote: the same log p and the same attention maps
    decoder = tiny_decoder(seed=3).eval()
    with torch.no_grad():
        decoder.L_o.bias[END_ID] += 1.0  # captions that end within max_length, so their log p holds <end>
    torch.manual_seed(0)
    encoded = decoder.encode(torch.randn(3, 4, 8))
    beams = beam_search(decoder, encoded, beam_size=5, max_length=8)
    found = [max((h for h in hypotheses if h.finished), key=lambda h: len(h.tokens)) for hypotheses in beams]
    assert len({len(h.tokens) for h in found}) > 1 and min(len(h.tokens) for h in found) > 0
    read = forced(decoder, encoded, [h.tokens for h in found])
    for written, again in zip(found, read, strict=True):
        assert again.tokens == written.tokens
        assert again.log_prob == pytest.approx(written.log_prob, abs=1e-5)
        torch.testing.assert_close(again.alphas, written.alphas, atol=1e-5, rtol=1e-4)


def test_repeated_constraints_cost_one_and_many_cost_at_most_the_budget():
    mock = MockDecoder(images=2, max_length=5, seed=4)
    rows = []
    step = mock.step
    mock.step = lambda words, state, encoded: rows.append(words.size(0)) or step(words, state, encoded)
    encoded = encoded_for([0, 1])
    once = constrained_beam_search(mock, encoded, [[{4}], [{5, 6}]], beam_size=10, max_length=5)
    most = max(rows)
    rows.clear()
    # repeated, and a set holding another's word ({5, 6} is met by any caption that meets {5})
    again = constrained_beam_search(mock, encoded, [[{4}] * 4, [{5, 6}, {6, 5}]], beam_size=10, max_length=5)
    assert max(rows) == most == 2 * 2 * 10
    assert [[h.tokens for h in image] for image in again] == [[h.tokens for h in image] for image in once]
    rows.clear()
    wide = constrained_beam_search(mock, encoded, [[{4}, {5}, {6}]] * 2, beam_size=20, max_length=5)
    assert max(rows) == 2 * MAX_CONSTRAINED_BEAMS  # not 2 images x 8 states x 20 beams
    assert all(all(set(h.tokens) >= {4, 5, 6} for h in image) for image in wide)
