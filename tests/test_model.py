"""The model: shapes, teacher forcing equal to step-by-step decoding, one projection per image, loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_decoder_config
from helpers import assert_teacher_forcing_equals_stepping, captions_batch, learn_tiny_batch

from show_attend_tell.config import ModelConfig
from show_attend_tell.decoder import select_rows
from show_attend_tell.model import (
    CaptionModel,
    Encoded,
    EncodedPrefixes,
    Encoder,
    LocationSampling,
    caption_loss,
)
from show_attend_tell.text import PAD_ID


@pytest.mark.parametrize("feature_dim", [7, 0])
def test_teacher_forcing_equals_stepping_each_caption_alone(feature_dim):
    torch.manual_seed(0)
    assert_teacher_forcing_equals_stepping(CaptionModel(tiny_decoder_config(feature_dim=feature_dim)).eval())


def test_projection_runs_once_per_image_not_per_caption_or_step():
    model = CaptionModel(tiny_decoder_config())
    rows_seen = []
    model.decoder.attention.encoder_projection.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    tokens, lengths, image_index = captions_batch()
    model(torch.randn(2, 4, 8), tokens, lengths, image_index)
    assert rows_seen == [2]


def test_attention_equals_the_papers_tanh_formula_and_its_gradients():
    attention = CaptionModel(tiny_decoder_config(encoder_dim=8, feature_dim=0)).decoder.attention
    torch.manual_seed(0)
    features = torch.randn(3, 4, 8, requires_grad=True)
    h = torch.randn(3, attention.decoder_projection.in_features, requires_grad=True)
    encoded = Encoded(features, attention.project(features))
    context, alpha = attention(encoded, h)
    # The paper's e = w^T tanh(W_a a_i + W_h h), written out with the same weights
    W_a, W_h = attention.encoder_projection, attention.decoder_projection
    energy = attention.score(torch.tanh(W_a(features) + W_h(h).unsqueeze(1)))
    expected_alpha = energy.squeeze(2).softmax(dim=1)
    expected_context = (expected_alpha.unsqueeze(2) * features).sum(dim=1)
    torch.testing.assert_close(alpha, expected_alpha)
    torch.testing.assert_close(context, expected_context)
    grads = torch.autograd.grad(context.square().sum() + alpha[:, 0].sum(), [features, h], retain_graph=True)
    expected = torch.autograd.grad(expected_context.square().sum() + expected_alpha[:, 0].sum(), [features, h])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_rows_grouped_per_image_read_its_features_without_copies():
    decoder = CaptionModel(tiny_decoder_config()).decoder.eval()
    torch.manual_seed(1)
    encoded = decoder.encode(torch.randn(2, 4, 8))
    K = 3
    words = torch.randint(4, decoder.embedding.num_embeddings, (2 * K,))
    h, c = (torch.randn(2 * K, decoder.lstm.hidden_size) for _ in range(2))
    grouped = decoder.step(words, (h, c), encoded)  # 2 images, K consecutive rows each
    expanded = decoder.step(words, (h, c), encoded.select(torch.arange(2).repeat_interleave(K)))  # one row each
    for got, want in zip([grouped[0], *grouped[1], grouped[2]], [expanded[0], *expanded[1], expanded[2]], strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="5 decoder rows do not split evenly over 2 images"):
        decoder.step(words[:5], (h[:5], c[:5]), encoded)


def test_feature_projection_sets_the_width_of_every_per_step_multiply():
    projected = CaptionModel(tiny_decoder_config(encoder_dim=8, feature_dim=7)).decoder
    paper = CaptionModel(tiny_decoder_config(encoder_dim=8, feature_dim=0)).decoder
    assert projected.lstm.input_size == 5 + 7 and projected.f_beta.out_features == projected.L_z.in_features == 7
    assert (
        isinstance(paper.feature_projection, torch.nn.Identity)
        and paper.lstm.input_size == 5 + 8
        and paper.f_beta.out_features == 8
    )
    encoded = projected.encode(torch.randn(2, 4, 8))
    assert encoded.features.shape == (2, 4, 7) and bool((encoded.features >= 0).all())  # after the ReLU
    assert encoded.projected.shape == (2, 4, 6)


def test_paper_step_without_deep_output_and_no_nans():
    model = CaptionModel(tiny_decoder_config(deep_output=False, dropout=0.5)).train()
    tokens, lengths, image_index = captions_batch()
    log_probs, alphas, _ = model(torch.randn(2, 4, 8), tokens, lengths, image_index)
    assert torch.isfinite(log_probs).all()
    valid = (tokens[:, 1:] != PAD_ID).unsqueeze(2)
    torch.testing.assert_close(alphas.sum(2)[valid.squeeze(2)], torch.ones(int(valid.sum())))


def test_loss_learns_a_tiny_batch():
    torch.manual_seed(0)
    losses = learn_tiny_batch(CaptionModel(tiny_decoder_config()), torch.randn(2, 4, 8), lr=3e-2)
    assert losses[-1] < 0.3 * losses[0]


def test_loss_terms():
    tokens, lengths, _ = captions_batch()
    N, T1, V, P = 5, tokens.size(1) - 1, 15, 4
    log_probs = torch.full((N, T1, V), -torch.log(torch.tensor(float(V))))  # uniform
    alphas = torch.zeros(N, T1, P)
    loss, cross_entropy = caption_loss(log_probs, alphas, tokens, doubly_stochastic=0.0)
    torch.testing.assert_close(loss, torch.log(torch.tensor(15.0)))
    torch.testing.assert_close(cross_entropy, torch.log(torch.tensor(15.0)))
    # no attention at all: every location misses its total of 1, so the penalty is lambda * 1
    with_penalty, _ = caption_loss(log_probs, alphas, tokens, doubly_stochastic=0.5)
    torch.testing.assert_close(with_penalty - loss, torch.tensor(0.5))
    # label smoothing of a uniform prediction changes nothing
    smoothed, _ = caption_loss(log_probs, alphas, tokens, doubly_stochastic=0.0, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, loss)


@pytest.mark.slow  # full ResNet-50 builds and runs
def test_encoder_grid_shapes_and_frozen_batchnorm():
    config = ModelConfig(vocab_size=10, grid_size=7, fine_tune_blocks=("layer4",))
    encoder = Encoder(config, pretrained=False)
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad
    }
    assert trainable == {"trunk.7"}
    encoder.train()
    assert all(not m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 49, 2048)
        encoder.pool = torch.nn.AdaptiveAvgPool2d(14)
        assert encoder(torch.randn(1, 3, 448, 448)).shape == (1, 196, 2048)


def test_select_rows_reorders_any_decoders_state():
    state = (torch.arange(4.0).view(4, 1), torch.arange(8).view(4, 2), torch.zeros(4, 2, 3))
    picked = select_rows(state, torch.tensor([2, 2, 0]))
    assert [part.shape[0] for part in picked] == [3, 3, 3]
    assert picked[0].flatten().tolist() == [2.0, 2.0, 0.0] and picked[1][0].tolist() == [4, 5]


class _PlainSlices:
    """The teacher-forced pass's rows at each step by autograd's own slicing (what model.EncodedPrefixes replaces)."""

    def __init__(self, encoded: Encoded) -> None:
        self.encoded = encoded

    def __call__(self, n: int) -> Encoded:
        return self.encoded.select(slice(None, n))


def _teacher_forced_gradients(model: CaptionModel, features: torch.Tensor, sampling_seeds, precision: str):
    tokens, lengths, image_index = captions_batch()
    sampling = None if sampling_seeds is None else LocationSampling.seeded(sampling_seeds, expected_probability=0.5)
    model.zero_grad()
    features = features.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        forced = model(features, tokens, lengths, image_index, sampling=sampling)
        loss, _ = caption_loss(forced.log_probs.float(), forced.alphas.float(), tokens)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return forced, grads, features.grad


def _assert_same_pass(fast, plain, precision: str, parameter: str) -> None:
    """Two _teacher_forced_gradients results agree: outputs, every parameter's gradient (`parameter` among them)
    and the input features' gradient."""
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    for fast_part, plain_part in zip(fast[0], plain[0], strict=True):
        torch.testing.assert_close(fast_part, plain_part, **tolerance)
    assert fast[1].keys() == plain[1].keys() and parameter in fast[1]
    for name in plain[1]:
        torch.testing.assert_close(fast[1][name], plain[1][name], **tolerance, msg=name)
    torch.testing.assert_close(fast[2], plain[2], **tolerance)


@pytest.mark.parametrize(
    "overrides, seeds, precision",
    [
        (dict(feature_dim=7), None, "fp32"),
        (dict(feature_dim=0), None, "fp32"),
        (dict(attention="hard"), [3, 4], "fp32"),
        (dict(feature_dim=7), None, "bf16"),
    ],
)
def test_prefix_views_give_the_gradients_of_plain_slicing(monkeypatch, overrides, seeds, precision):
    """EncodedPrefixes adds each step's gradient into one buffer instead of autograd's zero-filled whole-tensor
    slice gradients: the same outputs and gradients (every parameter and the input features)."""
    import show_attend_tell.model as model_module

    torch.manual_seed(0)
    model = CaptionModel(tiny_decoder_config(**overrides))
    features = torch.randn(2, 4, 8)
    fast = _teacher_forced_gradients(model, features, seeds, precision)
    monkeypatch.setattr(model_module, "EncodedPrefixes", _PlainSlices)
    plain = _teacher_forced_gradients(model, features, seeds, precision)
    _assert_same_pass(fast, plain, precision, "decoder.attention.encoder_projection.weight")
    assert float(fast[2].abs().sum()) > 0


@pytest.mark.parametrize(
    "overrides, precision",
    [
        (dict(feature_dim=7), "fp32"),
        (dict(feature_dim=0), "fp32"),
        (dict(deep_output=False), "fp32"),
        (dict(feature_dim=7), "bf16"),
        (dict(feature_dim=0, deep_output=False), "bf16"),
    ],
)
def test_soft_attentions_teacher_forced_pass_gives_the_steps_outputs_and_gradients(monkeypatch, overrides, precision):
    """teacher_forced_soft (joined products per step, their weights' gradients once, the rest once per batch) against
    the pass through `step`: the same log-probabilities, alphas and gradients of every parameter and of the input
    features."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_decoder_config(**overrides)).eval()  # dropout's draws differ between the two
    features = torch.randn(2, 4, 8)
    fast = _teacher_forced_gradients(model, features, None, precision)
    monkeypatch.setattr(model.decoder, "teacher_forced", model.decoder.teacher_forced_steps)
    plain = _teacher_forced_gradients(model, features, None, precision)
    _assert_same_pass(fast, plain, precision, "decoder.lstm.weight_hh")


def test_prefix_views_without_gradients_are_plain_slices():
    encoded = Encoded(torch.randn(3, 4, 5), torch.randn(3, 4, 6))
    with torch.no_grad():
        running = EncodedPrefixes(encoded)(2)
    assert torch.equal(running.features, encoded.features[:2]) and torch.equal(running.projected, encoded.projected[:2])


@pytest.mark.parametrize("rows_per_image, dtype", [(1, torch.float32), (3, torch.float32), (2, torch.bfloat16)])
def test_attention_scores_backward_equals_plain_autograd(monkeypatch, rows_per_image, dtype):
    """backward.AttentionScores: the plain forward's scores, and gradients for u, v, w and b equal to autograd's
    through add, sigmoid and addmv, over several chunks (a chunk of one image here) and K rows per image."""
    import show_attend_tell.backward as backward

    monkeypatch.setattr(backward, "ENERGY_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    B, K, P, A = 5, rows_per_image, 4, 6
    inputs = [torch.randn(B, P, A), torch.randn(B, K, 1, A), torch.randn(A), torch.randn(1)]
    inputs = [tensor.to(dtype).requires_grad_() for tensor in inputs]
    weights = torch.randn(B * K * P)

    def plain(u, v, w, b):
        energy = torch.add(u.unsqueeze(1), v).sigmoid()
        return torch.addmv(b, energy.view(-1, A), w, beta=2, alpha=2)

    results = []
    for function in (plain, backward.AttentionScores.apply):
        scores = function(*inputs)
        (scores.float() * weights).sum().backward()
        results.append((scores.detach(), [tensor.grad.clone() for tensor in inputs]))
        for tensor in inputs:
            tensor.grad = None
    assert torch.equal(results[0][0], results[1][0])  # the same forward, bit for bit
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for expected, got in zip(results[0][1], results[1][1], strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("bias", [True, False])
def test_step_products_and_contexts_give_autograds_gradients(bias):
    """backward.StepProducts and StepContexts over steps of 5, 3, 3 and 1 rows (a recurrence's, each step's input
    made from the last one's output): the plain products' outputs and every gradient, taken once over the steps."""
    from show_attend_tell.backward import StepContexts, StepProducts

    torch.manual_seed(0)
    weight, features = torch.randn(4, 4, requires_grad=True), torch.randn(5, 3, 4, requires_grad=True)
    bias_ = torch.randn(4, requires_grad=True) if bias else None
    start = torch.randn(5, 4, requires_grad=True)
    leaves = [start, weight, features] + ([bias_] if bias else [])

    def run(product, context):
        x, total = start, 0
        for n in (5, 3, 3, 1):
            alpha = x[:n, :3].softmax(dim=1)  # (n, P)
            x = torch.tanh(product(x[:n]) + context(alpha, n))
            total = total + (x * torch.arange(4.0)).sum()
        total.backward()
        grads = [leaf.grad.clone() for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        return total.detach(), grads

    products, contexts = StepProducts(weight, bias_), StepContexts(features)
    fast = run(products, lambda alpha, n: contexts(alpha))
    plain = run(
        lambda x: torch.nn.functional.linear(x, weight, bias_),
        lambda alpha, n: torch.bmm(alpha.unsqueeze(1), features[:n]).squeeze(1),
    )
    torch.testing.assert_close(fast[0], plain[0])
    for got, expected in zip(fast[1], plain[1], strict=True):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():  # no graph: the plain products
        torch.testing.assert_close(StepProducts(weight, bias_)(start), torch.nn.functional.linear(start, weight, bias_))
