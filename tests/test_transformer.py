"""The Transformer decoder: the cached step equals the teacher-forced forward, every decoding algorithm through
the same interface (beam search equal to exhaustive search scored by the uncached forward), attention maps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_decoder_config, tiny_transformer
from helpers import assert_teacher_forcing_equals_stepping, exhaustive, learn_tiny_batch

from show_attend_tell.decoder import select_rows
from show_attend_tell.decoding import beam_search, constrained_beam_search, forced, greedy, rollout
from show_attend_tell.errors import InputError
from show_attend_tell.model import CaptionModel
from show_attend_tell.text import END_ID, START_ID
from show_attend_tell.transformer import TransformerDecoder


def transformer_config(**overrides):
    """Two blocks of two heads, D=8 over E=8 features on a 2x2 grid, V=15 (see conftest)."""
    return tiny_decoder_config(**tiny_transformer(**overrides))


def transformer(seed: int = 0, **overrides) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(transformer_config(**overrides)).eval()


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_cached_steps_equal_the_teacher_forced_forward(positions):
    model = transformer(transformer_positions=positions)
    assert isinstance(model.decoder, TransformerDecoder)
    assert_teacher_forcing_equals_stepping(model, rtol=1e-5, atol=1e-5)


def test_a_step_computes_one_position_and_the_grid_keys_once_per_image():
    decoder = transformer().decoder
    rows_per_call = {"feed_forward": [], "grid_keys": []}
    decoder.blocks[0].feed_forward[0].register_forward_hook(
        lambda m, i, o: rows_per_call["feed_forward"].append(tuple(i[0].shape[:2]))
    )
    decoder.blocks[1].cross_attention.key_value.register_forward_hook(
        lambda m, i, o: rows_per_call["grid_keys"].append(i[0].shape[0])
    )
    with torch.no_grad():
        encoded = decoder.encode(torch.randn(2, 4, 8))
        state = tuple(part.repeat_interleave(3, dim=0) for part in decoder.init_state(encoded))  # 3 beams each
        words = torch.full((6,), START_ID)
        for _ in range(8):
            log_probs, state, _ = decoder.step(words, state, encoded)
            words = log_probs.argmax(dim=1)
    # word 8 runs the layers over 6 rows x 1 position, as word 1 did: nothing recomputes the words before it
    assert rows_per_call["feed_forward"] == [(6, 1)] * 8
    assert rows_per_call["grid_keys"] == [2]  # in encode, for the 2 images, never per step or per beam
    assert [tuple(part.shape) for part in state[:2]] == [(6, 2, 8, 4)] * 2


def test_rows_grouped_per_image_read_its_grid_in_place_and_select_rows_reorders_the_cache():
    decoder = transformer(seed=1).decoder
    with torch.no_grad():
        encoded = decoder.encode(torch.randn(2, 4, 8))
        K = 3
        state = tuple(part.repeat_interleave(K, dim=0) for part in decoder.init_state(encoded))
        _, state, _ = decoder.step(torch.randint(4, 15, (2 * K,)), state, encoded)
        words = torch.randint(4, 15, (2 * K,))
        grouped = decoder.step(words, state, encoded)  # 2 images, K consecutive rows each
        expanded = decoder.step(words, state, encoded.select(torch.arange(2).repeat_interleave(K)))  # one row each
        torch.testing.assert_close(grouped[0], expanded[0])
        torch.testing.assert_close(grouped[2], expanded[2])
        # a beam's parents: the reordered cache gives each row its parent's next step
        parents = torch.tensor([2, 0, 0, 4, 5, 3])
        moved = decoder.step(words[parents], select_rows(state, parents), encoded)
        torch.testing.assert_close(moved[0], expanded[0][parents])
        with pytest.raises(ValueError, match="5 decoder rows do not split evenly over 2 images"):
            decoder.step(words[:5], select_rows(state, slice(0, 5)), encoded)


class ForwardScored:
    """Scores a caption for test_decoding's exhaustive search with the uncached, teacher-forced forward."""

    def __init__(self, model: CaptionModel, features: torch.Tensor) -> None:
        self.model, self.features = model, features

    def sequence_log_prob(self, image: int, tokens: list[int]) -> float:
        captions = torch.tensor([[START_ID, *tokens]])
        with torch.no_grad():
            log_probs, _, _ = self.model(
                self.features[image : image + 1], captions, torch.tensor([len(tokens) + 1]), torch.tensor([0])
            )
        return float(log_probs[0].gather(1, captions[0, 1:].unsqueeze(1)).sum())


CONSTRAINTS = [[{4}], [{5, 6}], [], [{4}, {6}]]


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_wide_beam_search_through_the_cache_equals_exhaustive_search_by_the_forward(positions):
    # V = 7 as in test_decoding: <pad> <start> <end> <unk> and the words 4, 5, 6
    model = transformer(seed=2, vocab_size=7, transformer_positions=positions)
    with torch.no_grad():
        model.decoder.L_o.weight.mul_(8)  # peaked distributions: the search has a clear best
    features = torch.randn(4, 4, 8)
    scored = ForwardScored(model, features)
    encoded = model.decoder.encode(features)
    plain = beam_search(model.decoder, encoded, beam_size=200, max_length=4, length_penalty=0.5)
    constrained = constrained_beam_search(
        model.decoder, encoded, CONSTRAINTS, beam_size=200, max_length=4, length_penalty=0.5
    )
    for image in range(4):
        for found, constraints in ((plain, ()), (constrained, CONSTRAINTS[image])):
            score, words, log_prob = exhaustive(scored, image, 4, 0.5, 3, tuple(map(set, constraints)))
            assert found[image][0].tokens == words
            assert found[image][0].log_prob == pytest.approx(log_prob, abs=1e-4)
            assert found[image][0].score == pytest.approx(score, abs=1e-4)
    # a given caption (a template's) read through the cache: the log p the search found for it
    ended = [image for image in range(4) if plain[image][0].finished]
    assert ended
    read = forced(model.decoder, encoded.select(torch.tensor(ended)), [plain[i][0].tokens for i in ended])
    for image, again in zip(ended, read, strict=True):
        assert again.log_prob == pytest.approx(plain[image][0].log_prob, abs=1e-4)
        torch.testing.assert_close(again.alphas, plain[image][0].alphas, atol=1e-5, rtol=1e-4)


def test_batch_gives_the_same_captions_as_one_image_at_a_time():
    decoder = transformer(seed=3).decoder
    features = torch.randn(4, 4, 8)
    batched = beam_search(decoder, decoder.encode(features), beam_size=3, max_length=7)
    batched_greedy = greedy(decoder, decoder.encode(features), max_length=7)
    for i in range(4):
        encoded = decoder.encode(features[i : i + 1])
        alone = beam_search(decoder, encoded, beam_size=3, max_length=7)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i], strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-5)
            torch.testing.assert_close(a.alphas, b.alphas, rtol=1e-5, atol=1e-5)
            assert a.alphas.shape == (len(a.tokens), 4)
        one = greedy(decoder, encoded, max_length=7)[0]
        assert one.tokens == batched_greedy[i].tokens and one.log_prob == pytest.approx(batched_greedy[i].log_prob)
        assert beam_search(decoder, encoded, beam_size=1, max_length=7)[0][0].tokens == one.tokens


def test_sampling_gives_the_policys_log_probabilities_with_gradients():
    model = transformer(seed=4)
    features = torch.randn(2, 4, 8)
    encoded = model.decoder.encode(features)
    generator = torch.Generator().manual_seed(0)
    tokens, log_probs, alphas, locations = rollout(
        model.decoder, encoded, max_length=6, sample=True, generator=generator, per_image=3, no_repeat_ngram=0
    )
    assert tokens.size(0) == 6 and alphas.shape[::2] == (6, 4) and locations is None  # soft: no locations
    log_probs.sum().backward()  # what self-critical training differentiates
    assert model.decoder.blocks[0].self_attention.query.weight.grad.abs().sum() > 0
    # with nothing banned but <pad>, <start> and <unk>, the policy is the model renormalised over the rest
    with torch.no_grad():
        for row in range(6):
            words = tokens[row][tokens[row] != 0].tolist()
            captions = torch.tensor([[START_ID, *words]])
            forward, _, _ = model(
                features[row // 3 : row // 3 + 1], captions, torch.tensor([len(words) + 1]), torch.tensor([0])
            )
            allowed = forward[0].clone()
            allowed[:, [0, START_ID, 3]] = float("-inf")
            expected = allowed.log_softmax(dim=1).gather(1, captions[0, 1:].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(log_probs[row, : len(words)].detach(), expected, rtol=1e-4, atol=1e-4)


def test_attention_maps_are_a_chosen_blocks_weights_averaged_over_its_heads():
    decoder = transformer(seed=5).decoder
    encoded = decoder.encode(torch.randn(2, 4, 8))
    words = torch.tensor([[START_ID, 5, 6, 7], [START_ID, 8, 8, 9]])

    def maps() -> torch.Tensor:
        with torch.no_grad():
            return decoder.forward_words(words, decoder.init_state(encoded), encoded)[2]  # (2, 4, P)

    default = maps()
    torch.testing.assert_close(default.sum(dim=2), torch.ones(2, 4))
    heads = []
    for head in range(2):
        decoder.show_attention(layer=-1, head=head)
        heads.append(maps())
    torch.testing.assert_close(default, (heads[0] + heads[1]) / 2)
    assert not torch.allclose(heads[0], heads[1])
    decoder.show_attention(layer=0)
    assert not torch.allclose(maps(), default)
    with pytest.raises(ValueError, match="layer must be in"):
        decoder.show_attention(layer=2)


def test_learned_positions_refuse_captions_longer_than_they_cover():
    decoder = transformer(transformer_max_positions=4).decoder
    encoded = decoder.encode(torch.randn(1, 4, 8))
    with pytest.raises(InputError, match="learned positions for 4 tokens"):
        greedy(decoder, encoded, max_length=6, no_repeat_ngram=0)
    sinusoidal = transformer(transformer_positions="sinusoidal", transformer_max_positions=4).decoder
    assert not any("positions" in name for name in sinusoidal.state_dict())
    assert len(greedy(sinusoidal, sinusoidal.encode(torch.randn(1, 4, 8)), max_length=6)) == 1


def test_loss_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = CaptionModel(transformer_config(dropout=0.1)).train()
    features = torch.randn(2, 4, 8)
    losses = learn_tiny_batch(model, features, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    hypothesis = greedy(model.decoder, model.decoder.encode(features[1:]), max_length=6, no_repeat_ngram=0)[0]
    assert hypothesis.tokens in ([7], [8, 9, 10, 11], [4, 4, 4]) and hypothesis.finished  # one of image 1's captions
    assert END_ID not in hypothesis.tokens


def test_a_transformer_checkpoint_captions_draws_maps_and_is_served_saying_its_decoder(tmp_path):
    from conftest import ColourGrid
    from fastapi.testclient import TestClient
    from PIL import Image

    from show_attend_tell import runtime
    from show_attend_tell.captioner import Captioner
    from show_attend_tell.checkpoint import save_model
    from show_attend_tell.server import create_app
    from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary
    from show_attend_tell.visualize import attention_figure

    vocab = Vocabulary([*SPECIAL_TOKENS, "a", "red", "green", "square", "box", "sky"])
    config = transformer_config(vocab_size=len(vocab), encoder_dim=12, image_size=64)
    torch.manual_seed(7)
    save_model(CaptionModel(config), vocab, tmp_path / "t", encoder_sha256="untrained")
    with pytest.raises(InputError, match="the Transformer decoder has no int8 version yet"):
        runtime.load_model(tmp_path / "t", with_encoder=False, int8=True)
    model, vocab, saved = runtime.load_model(tmp_path / "t", with_encoder=False)  # fp32
    model.encoder = ColourGrid()  # the checkpoint's features: 2x2 grids of 12 channels
    captioner = Captioner(model, vocab, saved)
    assert captioner.decoder == "transformer"
    photos = [Image.new("RGB", (40, 30), colour) for colour in ((200, 30, 30), (30, 200, 30))]
    for photo, caption in zip(photos, captioner.caption_batch(photos, beam_size=3, max_length=6), strict=True):
        assert caption.attention.shape == (len(caption.words), 2, 2)
        if caption.words:  # what `sat caption --attention-dir` writes
            assert attention_figure(photo, caption.words, caption.attention, tmp_path / "map.png").is_file()
    upload = tmp_path / "red.jpg"
    photos[0].save(upload)
    with TestClient(create_app(captioner), base_url="http://localhost") as client:
        assert client.get("/api/health").json()["decoder"] == "transformer"
        response = client.post(
            "/api/caption?beam_size=3", files={"image": ("red.jpg", upload.read_bytes(), "image/jpeg")}
        )
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["decoder"] == "transformer" and body["words"] == captioner.caption(upload, beam_size=3).words
    assert len(body["attention"]) == len(body["words"])


def test_hard_attention_is_the_lstms_only():
    from show_attend_tell.checkpoint import check_model_config
    from show_attend_tell.config import to_dict

    check_model_config(to_dict(transformer_config()), "flags")
    with pytest.raises(InputError, match="model.attention hard is the LSTM's"):
        check_model_config(to_dict(transformer_config(attention="hard")), "flags")
