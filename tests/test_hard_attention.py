"""Hard attention (section 4.1): sampled contexts, the estimator's gradient against the exact one, the baseline,
the entropy term, reproducible draws, decoding through the same step and search, and learning."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_decoder_config

from show_attend_tell.decoding import beam_search, best_captions, greedy
from show_attend_tell.model import (
    CaptionModel,
    HardState,
    LocationSampling,
    caption_log_likelihood,
    caption_loss,
    hard_attention_loss,
    hard_context,
    moving_average,
)
from show_attend_tell.text import END_ID, PAD_ID, START_ID


def hard_model(seed: int = 0, **overrides) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(tiny_decoder_config(attention="hard", **overrides)).eval()


def captions_of(images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two captions per image, of different lengths: tokens (N, T), lengths (N,), image_index (N,)."""
    rows = [[START_ID, 4 + i % 5, 6, END_ID] for i in range(images)] + [[START_ID, 7, END_ID]] * images
    T = max(map(len, rows))
    tokens = torch.tensor([r + [PAD_ID] * (T - len(r)) for r in rows])
    return tokens, torch.tensor([len(r) for r in rows]), torch.arange(images).repeat(2)


def test_without_sampling_hard_attention_decodes_exactly_as_soft_attention_with_the_same_weights():
    hard = hard_model()
    soft = CaptionModel(tiny_decoder_config()).eval()
    soft.decoder.load_state_dict(hard.decoder.state_dict())  # the same layers: only the context differs
    features = torch.randn(2, 4, 8)
    tokens, lengths, image_index = captions_of(2)
    with torch.no_grad():
        hard_forced = hard(features, tokens, lengths, image_index)
        soft_forced = soft.decoder.teacher_forced_steps(features, tokens, lengths, image_index)  # the same steps
        for got, want in zip(hard_forced[:2], soft_forced[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for got, want in zip(hard_forced[:2], soft(features, tokens, lengths, image_index)[:2], strict=True):
            torch.testing.assert_close(got, want)  # soft attention's own pass: the same up to rounding
        assert bool((hard_forced.locations == -1).all())
        hard_beams, soft_beams = (beam_search(m.decoder, m.decoder.encode(features), beam_size=3) for m in (hard, soft))
    for a, b in zip(hard_beams, soft_beams, strict=True):
        assert [(h.tokens, h.log_prob) for h in a] == [(h.tokens, h.log_prob) for h in b]
        assert all(bool((h.locations == -1).all()) for h in a) and all(h.locations is None for h in b)
    with pytest.raises(ValueError, match="soft attention samples no locations"):
        soft.decoder.encode(features, LocationSampling.seeded([0, 1]))


def test_a_sampled_context_is_the_feature_of_a_location_drawn_from_alpha():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 3)
    encoded = CaptionModel(tiny_decoder_config(attention="hard")).decoder.encode(torch.randn(2, 4, 8))
    encoded = encoded._replace(features=features)
    alpha = torch.tensor([[0.1, 0.2, 0.0, 0.7], [0.25, 0.25, 0.25, 0.25]]).repeat_interleave(2, dim=0)  # K = 2
    expected = torch.zeros(4, 3)
    sampling = LocationSampling.seeded([1, 2])
    counts = torch.zeros(4, 4)
    for _ in range(4000):
        context, locations = hard_context(expected, alpha, encoded._replace(sampling=sampling))
        image = torch.arange(4) // 2
        torch.testing.assert_close(context, features[image, locations], rtol=0, atol=0)
        counts[torch.arange(4), locations] += 1
    assert counts[:2, 2].sum() == 0  # a cell of probability 0 is never drawn
    torch.testing.assert_close(counts / 4000, alpha, rtol=0, atol=0.03)
    # images that take the expected context keep it, and say so with -1
    none = LocationSampling.seeded([1, 2], expected_probability=1.0)
    context, locations = hard_context(expected + 5, alpha, encoded._replace(sampling=none))
    assert bool((locations == -1).all()) and bool((context == 5).all())


def test_each_training_image_takes_the_expected_context_with_the_given_probability():
    half = LocationSampling.seeded(range(2000), expected_probability=0.5)
    assert 0.45 < float(half.sampled.float().mean()) < 0.55
    assert bool(LocationSampling.seeded(range(50)).sampled.all())
    again = LocationSampling.seeded(range(2000), expected_probability=0.5)
    assert torch.equal(half.sampled, again.sampled)  # from the seeds alone


def test_draws_are_reproducible_from_the_seeds_and_each_images_own_whatever_its_batch():
    """What torchrun needs: an image's draws, and so its captions' locations and log p, are the same whether
    the batch holds all four images or a rank holds two of them."""
    model = hard_model()
    features = torch.randn(4, 4, 8)
    tokens, lengths, image_index = captions_of(4)
    seeds = [11, 12, 13, 14]
    with torch.no_grad():
        whole = model(features, tokens, lengths, image_index, sampling=LocationSampling.seeded(seeds))
        again = model(features, tokens, lengths, image_index, sampling=LocationSampling.seeded(seeds))
        other = model(features, tokens, lengths, image_index, sampling=LocationSampling.seeded([1, 2, 3, 4]))
        assert torch.equal(whole.locations, again.locations) and torch.equal(whole.log_probs, again.log_probs)
        running = (lengths - 1).unsqueeze(1) > torch.arange(3)  # (N, 3) the steps of each caption
        assert bool((whole.locations[running] >= 0).all()) and bool((whole.locations[~running] == -1).all())
        assert not torch.equal(whole.locations, other.locations)
        for rank in (0, 1):
            images = [rank, rank + 2]  # every second image, as train.py shares a batch
            rows = torch.cat([torch.nonzero(image_index == i).flatten() for i in images])
            part = model(
                features[images],
                tokens[rows],
                lengths[rows],
                torch.tensor([images.index(int(image_index[r])) for r in rows]),
                sampling=LocationSampling.seeded([seeds[i] for i in images]),
            )
            assert torch.equal(part.locations, whole.locations[rows])
            torch.testing.assert_close(part.log_probs, whole.log_probs[rows])


def test_sampled_decoding_goes_through_the_same_searches_and_records_the_chosen_cells():
    model = hard_model()
    features = torch.randn(3, 4, 8)
    decoder = model.decoder
    with torch.no_grad():
        runs = [
            beam_search(decoder, decoder.encode(features, LocationSampling.seeded([5, 5, 5])), beam_size=3)
            for _ in range(2)
        ]
        alone = beam_search(decoder, decoder.encode(features[1:2], LocationSampling.seeded([5])), beam_size=3)
        greedy_run = greedy(decoder, decoder.encode(features, LocationSampling.seeded([5, 5, 5])))
        constrained = best_captions(
            decoder, decoder.encode(features, LocationSampling.seeded([5, 5, 5])), [[{8}], [], [{9}]], beam_size=3
        )
    for a, b in zip(*runs, strict=True):
        assert [(h.tokens, h.locations.tolist()) for h in a] == [(h.tokens, h.locations.tolist()) for h in b]
    assert [(h.tokens, h.locations.tolist()) for h in alone[0]] == [
        (h.tokens, h.locations.tolist()) for h in runs[0][1]
    ]
    for hypothesis in [*runs[0][0], *greedy_run, *(h for beams in constrained for h in beams)]:
        assert hypothesis.locations.shape == (len(hypothesis.tokens),)
        assert bool(((hypothesis.locations >= 0) & (hypothesis.locations < 4)).all())
    assert 8 in constrained[0][0].tokens and 9 in constrained[2][0].tokens


class ForcedLocations(LocationSampling):
    """A stand-in for the random draws: row r of every step takes location paths[r, t] (one image per row)."""

    def __init__(self, paths: torch.Tensor) -> None:
        super().__init__([torch.Generator()] * paths.size(0), torch.ones(paths.size(0), dtype=torch.bool))
        self.paths, self.t = paths, 0

    def select(self, index):
        return self  # every row is its own image and all run for every step: nothing to select

    def draw(self, alpha: torch.Tensor) -> torch.Tensor:
        self.t += 1
        return self.paths[:, self.t - 1]


def tiny_problem():
    """A hard-attention decoder in float64 over one image of P = 4 locations and one caption of two predicted
    tokens: 4^2 = 16 location paths, few enough to enumerate."""
    model = hard_model(3).double()
    # features large enough that the location changes the caption's log p by about 1
    features = 4 * torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    caption = torch.tensor([[START_ID, 5, END_ID]])
    return model, features, caption


def expanded(features: torch.Tensor, caption: torch.Tensor, rows: int):
    return features.expand(rows, -1, -1), caption.expand(rows, -1), torch.full((rows,), 3), torch.arange(rows)


def exact_lower_bound_gradient(model, features, caption) -> list[torch.Tensor]:
    """d/dW of L_s = sum_s p(s | a) log p(y | s, a), every path s enumerated (eq. 10)."""
    paths = torch.tensor(list(itertools.product(range(4), repeat=2)))  # (16, 2)
    forced = model(*expanded(features, caption, len(paths)), sampling=ForcedLocations(paths))
    assert torch.equal(forced.locations, paths)
    log_p_paths = forced.alphas.gather(2, paths.unsqueeze(2)).squeeze(2).log().sum(dim=1)  # (16,)
    torch.testing.assert_close(log_p_paths.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    lower_bound = (log_p_paths.exp() * caption_log_likelihood(forced.log_probs, caption.expand(16, -1))).sum()
    return torch.autograd.grad(lower_bound, list(model.decoder.parameters()), allow_unused=True)


def estimated_gradient(model, features, caption, seeds, *, baseline: float, reinforce: float = 1.0):
    """The paper's estimator over len(seeds) sampled paths, as training computes it: d of -(cross-entropy +
    hard_attention_loss), rescaled from per word to per caption."""
    M = len(seeds)
    forced = model(*expanded(features, caption, M), sampling=LocationSampling.seeded(seeds))
    captions = caption.expand(M, -1)
    cross_entropy, _ = caption_loss(forced.log_probs, forced.alphas, captions, doubly_stochastic=0.0)
    extra = hard_attention_loss(forced, captions, baseline=baseline, reinforce=reinforce, entropy=0.0)
    words_per_caption = 2
    grads = torch.autograd.grad(cross_entropy + extra, list(model.decoder.parameters()), allow_unused=True)
    return [None if g is None else -g * words_per_caption for g in grads]


def flat(grads, model: CaptionModel | None = None) -> torch.Tensor:
    """The gradients as one vector; with `model`, only those of its attention layers (W_a, W_h, w), which a
    sampled context does not reach: only the REINFORCE term moves them."""
    names = [name for name, _ in model.decoder.named_parameters()] if model is not None else None
    return torch.cat(
        [g.flatten() for i, g in enumerate(grads) if g is not None and (names is None or "attention." in names[i])]
    )


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


def test_the_estimators_gradient_matches_the_exact_gradient_of_the_lower_bound():
    model, features, caption = tiny_problem()
    exact = exact_lower_bound_gradient(model, features, caption)
    seeds = range(5000)
    estimate = estimated_gradient(model, features, caption, seeds, baseline=-5.0)
    assert relative_error(flat(estimate), flat(exact)) < 0.03
    assert relative_error(flat(estimate, model), flat(exact, model)) < 0.05
    # without the REINFORCE term (lambda_r = 0) the attention layers get no gradient at all
    biased = estimated_gradient(model, features, caption, seeds, baseline=-5.0, reinforce=0.0)
    assert relative_error(flat(biased), flat(exact)) > 0.08
    assert relative_error(flat(biased, model), flat(exact, model)) == pytest.approx(1.0)


def test_the_moving_average_baseline_follows_the_papers_rule_and_lowers_the_variance():
    values = [-5.0, -4.0, -6.0]
    baseline = None
    for value in values:
        baseline = moving_average(baseline, value)
    assert baseline == pytest.approx(0.9 * (0.9 * -5.0 + 0.1 * -4.0) + 0.1 * -6.0)  # the first batch: its mean

    model, features, caption = tiny_problem()
    exact = flat(exact_lower_bound_gradient(model, features, caption))
    estimates = {"none": [], "moving average": []}
    baseline = None
    for batch in range(20):
        seeds = range(batch * 8, batch * 8 + 8)
        with torch.no_grad():
            forced = model(*expanded(features, caption, 8), sampling=LocationSampling.seeded(seeds))
            mean_reward = float(caption_log_likelihood(forced.log_probs, caption.expand(8, -1)).mean())
        b = mean_reward if baseline is None else baseline
        estimates["moving average"].append(flat(estimated_gradient(model, features, caption, seeds, baseline=b)))
        estimates["none"].append(flat(estimated_gradient(model, features, caption, seeds, baseline=0.0)))
        baseline = moving_average(baseline, mean_reward)
    variance = {name: float(torch.stack(g).var(dim=0).sum()) for name, g in estimates.items()}
    assert variance["moving average"] < 0.2 * variance["none"], variance
    # both stay unbiased: their means over the 160 paths land near the exact gradient
    for name, grads in estimates.items():
        mean = torch.stack(grads).mean(dim=0)
        assert float((mean - exact).norm() / exact.norm()) < (0.2 if name == "moving average" else 1.0), name


def test_the_entropy_terms_gradient_raises_the_entropy_of_alpha():
    model = hard_model(1)
    features = torch.randn(2, 4, 8)
    tokens, lengths, image_index = captions_of(2)

    def entropy_term(weight: float):
        forced = model(features, tokens, lengths, image_index)
        mask = (tokens[:, 1:] != PAD_ID).unsqueeze(2)
        alphas = forced.alphas
        entropy = float((-(alphas * alphas.clamp_min(1e-30).log()) * mask).sum().detach())
        return hard_attention_loss(forced, tokens, baseline=0.0, reinforce=0.0, entropy=weight), entropy

    nothing, _ = entropy_term(0.0)
    assert float(nothing.detach()) == 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    entropies = []
    for _ in range(5):
        loss, entropy = entropy_term(1.0)
        entropies.append(entropy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert entropies == sorted(entropies) and entropies[-1] > entropies[0] + 1e-3, entropies


def test_a_tiny_hard_attention_model_learns_a_batch_from_sampled_contexts():
    torch.manual_seed(0)
    model = CaptionModel(tiny_decoder_config(attention="hard"))
    features = torch.randn(2, 4, 8)
    tokens, lengths, image_index = captions_of(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses, baseline = [], None
    for step in range(40):
        sampling = LocationSampling.seeded([2 * step, 2 * step + 1], expected_probability=0.5)
        forced = model(features, tokens, lengths, image_index, sampling=sampling)
        loss, cross_entropy = caption_loss(forced.log_probs, forced.alphas, tokens)
        mean_reward = float(caption_log_likelihood(forced.log_probs.detach(), tokens).mean())
        b = mean_reward if baseline is None else baseline
        loss = loss + hard_attention_loss(forced, tokens, baseline=b, reinforce=0.1, entropy=0.002)
        baseline = moving_average(baseline, mean_reward)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(cross_entropy))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    assert isinstance(model.decoder.init_state(model.decoder.encode(features)), HardState)


# ----- the product: Captioner, `sat caption`, the int8 rule --------------------------------------------------
def small_checkpoint(directory, attention: str):
    """A checkpoint of a small model on the (stand-in) ResNet-50: 64 px photos, a 2 x 2 grid, calibrated for int8
    on random features."""
    from show_attend_tell.checkpoint import save_int8_calibration, save_model
    from show_attend_tell.config import ModelConfig
    from show_attend_tell.inference import calibrate_int8
    from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary

    vocab = Vocabulary([*SPECIAL_TOKENS, "a", "dog", "runs", "on", "the", "grass"])
    config = ModelConfig(
        vocab_size=len(vocab),
        image_size=64,
        grid_size=2,
        feature_dim=16,
        attention_dim=16,
        decoder_dim=16,
        embed_dim=8,
        dropout=0.0,
        attention=attention,
    )
    torch.manual_seed(0)
    model = CaptionModel(config)
    save_model(model, vocab, directory, encoder_sha256="untrained")
    save_int8_calibration(directory, calibrate_int8(model.decoder, [torch.rand(4, 4, 2048)], beam_size=3), {})
    return directory


@pytest.fixture
def photos(tmp_path):
    from PIL import Image

    paths = []
    for n, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        image = Image.new("RGB", (80, 60), colour)
        image.paste((250, 250, 250), (0, 0, 30 + 10 * n, 20))
        paths.append(tmp_path / f"photo{n}.png")
        image.save(paths[-1])
    return paths


def test_captioner_samples_a_hard_models_locations_from_a_seed_in_fp32_and_never_in_int8(
    tmp_path, photos, fixed_encoder_weights
):
    from show_attend_tell.captioner import Captioner
    from show_attend_tell.errors import InputError
    from show_attend_tell.inference import Int8Decoder

    hard = small_checkpoint(tmp_path / "hard", "hard")
    fp32 = Captioner.load(hard, int8=False)
    first = fp32.caption_batch(photos, beam_size=3, sample_seed=3)
    again = fp32.caption_batch(photos, beam_size=3, sample_seed=3)
    alone = fp32.caption(photos[2], beam_size=3, sample_seed=3)
    for caption, other in zip(first, again, strict=True):
        assert (caption.words, caption.locations) == (other.words, other.locations)
        assert len(caption.locations) == len(caption.words)
        assert all(0 <= row < 2 and 0 <= column < 2 for row, column in caption.locations)
    assert (alone.words, alone.locations) == (first[2].words, first[2].locations)  # the same alone as in a batch
    assert fp32.caption(photos[0], beam_size=3).locations is None  # the expected context: nothing sampled
    # The int8 decoder decodes a hard model's expected context (its test-time default) but refuses to sample.
    int8 = Captioner.load(hard, int8=True)
    assert isinstance(int8.model.decoder, Int8Decoder) and int8.caption(photos[0], beam_size=3).words
    with pytest.raises(InputError, match="needs the fp32 decoder: load it with int8=False"):
        int8.caption(photos[0], sample_seed=3)
    soft = Captioner.load(small_checkpoint(tmp_path / "soft", "soft"), int8=False)
    with pytest.raises(InputError, match="attends softly"):
        soft.caption(photos[0], sample_seed=3)


def test_sat_caption_hard_attention_sample_writes_the_chosen_cells(tmp_path, photos, fixed_encoder_weights, capsys):
    import json

    from show_attend_tell.cli import main

    hard = str(small_checkpoint(tmp_path / "hard", "hard"))
    args = ["caption", str(photos[0]), "--model", hard, "--json", "--beam", "2", "--hard-attention-sample"]
    assert main([*args, "--seed", "4", "--attention-dir", str(tmp_path / "maps")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["locations"]) == len(record["words"]) and (tmp_path / "maps" / "photo0.png").is_file()
    assert main([*args, "--seed", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["locations"] == record["locations"]
    assert main(args[:-1]) == 0
    assert "locations" not in json.loads(capsys.readouterr().out)  # the expected context by default
    assert main([*args, "--int8"]) == 2
    assert "needs the fp32 decoder" in capsys.readouterr().err
