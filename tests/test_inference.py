"""CPU inference (inference.py): the same features and attention as the readable model, in chunks; the int8
decoder close to fp32, and a photo's caption independent of the photos decoded beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_decoder_config
from PIL import Image, ImageOps

import show_attend_tell.inference as inference
from show_attend_tell.config import ModelConfig
from show_attend_tell.decoding import beam_search
from show_attend_tell.inference import (
    INT8_LAYERS,
    ChunkedAttention,
    Int8Decoder,
    Int8Linear,
    RangeObserver,
    calibrate_int8,
    cpu_chunk,
    encode_images,
    energy_scores,
    product_terms,
)
from show_attend_tell.model import CaptionModel, Encoded, Encoder
from show_attend_tell.stages import run_until


@pytest.mark.slow  # a full ResNet-50 runs
def test_cpu_inference_runs_the_encoder_in_chunks_with_the_same_features(monkeypatch):
    assert [cpu_chunk(side * side) for side in (224, 320, 448)] == [4, 1, 1]
    monkeypatch.setattr(inference, "CPU_CHUNK_PIXELS", 4 * 64 * 64)  # 4 images per chunk at 64 px
    encoder = Encoder(ModelConfig(vocab_size=10), pretrained=False).eval()
    batches = []
    encoder.trunk.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    images = torch.randn(4 + 3, 3, 64, 64)
    chunked = encode_images(encoder, images)
    assert batches == [4, 3]
    whole = encoder(images)  # model.py's encoder: one batch
    assert batches[-1] == 4 + 3
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-4, rtol=1e-4)
    stage = encode_images(encoder, images, "layer4.0")
    torch.testing.assert_close(stage, run_until(encoder, images, "layer4.0").detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("product", [False, True])
def test_attention_energies_in_chunks_match_the_readable_attention(monkeypatch, product):
    """The energies a few images at a time (and, for the int8 decoder, in the product form 1 / (1 + e^-u e^-v))
    give the alpha and context of model.SoftAttention, large terms included."""
    attention = CaptionModel(tiny_decoder_config(encoder_dim=8, feature_dim=0)).decoder.attention.eval()
    torch.manual_seed(4)
    B, K, P = 5, 3, 4
    features, h = torch.randn(B, P, 8), torch.randn(B * K, attention.decoder_projection.in_features)
    with torch.no_grad():  # terms up to ~+-100: past the product form's clamp
        attention.encoder_projection.weight.mul_(30)
    context, alpha = attention(Encoded(features, attention.project(features)), h)
    A = attention.score.in_features
    monkeypatch.setattr(inference, "ENERGY_CHUNK_BYTES", 2 * K * P * A * 4)  # 2 images per chunk: 3 chunks
    with torch.no_grad():
        terms = attention.project(features)
        hidden = attention.decoder_projection(h).mul(2).view(B, K, 1, A)
        if product:
            terms, hidden = product_terms(terms), product_terms(hidden)
        scores = energy_scores(terms, hidden, attention.score.weight, product=product)
        fast_alpha = scores.softmax(dim=2).view(B * K, P)
        chunked = ChunkedAttention.of(attention)
        chunked_context, chunked_alpha = chunked(Encoded(features, attention.project(features)), h)
    assert attention.project(features).abs().max() > inference.EXP_CLAMP and terms.isfinite().all()  # clamp needed
    torch.testing.assert_close(fast_alpha, alpha.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked_alpha, alpha.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked_context, context.detach(), atol=1e-5, rtol=1e-5)


def test_int8_linear_is_close_to_fp32_within_its_calibrated_ranges_and_the_same_row_by_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    channel_scale = torch.logspace(-1, 1, 32)  # input channels of very different ranges
    x = torch.randn(64, 32) * channel_scale
    ranges: dict = {}
    observer = RangeObserver(linear.weight, linear.bias, "layer", ranges)
    torch.testing.assert_close(observer(x), linear(x).detach())  # observing computes in fp32
    low, high = ranges["layer"]
    assert torch.equal(low, x.amin(0)) and torch.equal(high, x.amax(0))
    int8 = Int8Linear(linear.weight, linear.bias, low, high)
    y = int8(x)
    for rows in ([0], [1, 2], [2, 0, 5], [63]):  # any companions: bit for bit the same rows
        assert torch.equal(int8(x[rows]), y[rows])
    with torch.no_grad():
        expected = linear(x)
    assert float((y - expected).abs().max() / expected.abs().max()) < 0.03
    # the small channels are not rounded away beside the large ones, as they are with one range for all inputs
    only_small = x.clone()  # channels 0-15 (scale <= 1), which one range over all channels rounds to few levels
    only_small[:, 16:] = 0
    with torch.no_grad():
        expected_small = linear(only_small) - linear.bias
        error_small = (int8(only_small) - linear.bias - expected_small).abs().max() / expected_small.abs().max()
        shared = Int8Linear(linear.weight, linear.bias, low.min().expand(32), high.max().expand(32))
        error_shared = (shared(only_small) - linear.bias - expected_small).abs().max() / expected_small.abs().max()
    assert float(error_small) < 0.12 < float(error_shared)
    beyond = x[:1] * 10  # outside the calibrated ranges: saturates, stays finite
    assert int8(beyond).isfinite().all()
    assert int8(x.view(8, 8, 32)).shape == (8, 8, 24)


def test_calibration_covers_what_each_int8_layer_reads_and_keeps_the_decoder_close_to_fp32():
    torch.manual_seed(1)
    decoder = CaptionModel(tiny_decoder_config()).decoder.eval()
    features = torch.randn(6, 4, 8)
    ranges = calibrate_int8(decoder, features.split(3), beam_size=3)
    assert set(ranges) == set(INT8_LAYERS)
    for name, (low, high) in ranges.items():
        assert low.shape == high.shape and bool((low <= high).all()), name
    low, high = ranges["feature_projection"]  # reads the encoder features themselves
    assert torch.equal(low, features.amin((0, 1))) and torch.equal(high, features.amax((0, 1)))
    int8 = Int8Decoder.quantized(decoder, ranges)
    with torch.no_grad():
        encoded, encoded8 = decoder.encode(features), int8.encode(features)
        words = torch.tensor([1, 5, 6, 7, 1, 2])
        log_probs, _, alpha = decoder.step(words, decoder.init_state(encoded), encoded)
        log_probs8, _, alpha8 = int8.step(words, int8.init_state(encoded8), encoded8)
    torch.testing.assert_close(log_probs8, log_probs, atol=0.05, rtol=0)
    torch.testing.assert_close(alpha8, alpha, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="L_o"):
        Int8Decoder.quantized(decoder, {k: v for k, v in ranges.items() if k != "L_o"})
    with pytest.raises(ValueError, match="inputs"):
        Int8Decoder.quantized(decoder, {**ranges, "L_o": (torch.zeros(3), torch.ones(3))})


def test_int8_beam_search_gives_each_image_the_same_result_whatever_its_batch():
    torch.manual_seed(1)
    fp32 = CaptionModel(tiny_decoder_config()).decoder.eval()
    features = torch.randn(5, 4, 8) * torch.tensor([1, 30, 0.1, 3, 1]).view(5, 1, 1)
    decoder = Int8Decoder.quantized(fp32, calibrate_int8(fp32, [torch.randn(8, 4, 8) * 3]))
    together = beam_search(decoder, decoder.encode(features), beam_size=3, max_length=6)
    for i in range(5):
        alone = beam_search(decoder, decoder.encode(features[i : i + 1]), beam_size=3, max_length=6)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.log_prob for h in alone] == [h.log_prob for h in together[i]]  # exactly


def photo_variants() -> list[Image.Image]:
    """A Flickr8k photo as users send it: greyscale, WebP, a thumbnail, a wide crop, EXIF-rotated, mirrored;
    with the previous int8 decoder (activations scaled per batch) some of these were captioned differently in
    one call and one at a time."""
    import io

    photo = Image.open(REPO / "examples" / "flickr8k_3385593926_d3e9c21170.jpg").convert("RGB")
    webp = io.BytesIO()
    photo.save(webp, "WEBP", quality=60)
    w, h = photo.size
    return [
        photo,
        ImageOps.grayscale(photo).convert("RGB"),
        Image.open(webp).convert("RGB"),
        photo.resize((w // 4, h // 4)),
        photo.crop((0, h // 4, w, 3 * h // 4)),
        photo.rotate(90, expand=True),
        ImageOps.mirror(photo),
        *(Image.open(path).convert("RGB") for path in sorted((REPO / "examples").glob("*.jpg"))),
    ]


@pytest.mark.slow  # the shipped model at 448 px: two encoder passes per photo
@pytest.mark.parametrize(("precision", "tolerance"), [("int8", 0.0), ("fp32", 1e-5)])
def test_shipped_model_captions_a_photo_alike_alone_and_in_a_batch(precision, tolerance):
    """int8: bit for bit. fp32 (--no-int8): a batch's sums run over other rows than one photo's and differ in the
    last bits, so the same words and the numbers within 1e-5."""
    from show_attend_tell.captioner import Captioner

    captioner = Captioner.load(int8=precision == "int8")
    assert captioner.decoder_precision == precision
    pictures = photo_variants()
    together = captioner.caption_batch(pictures)
    for picture, caption in zip(pictures, together, strict=True):
        alone = captioner.caption(picture)
        assert alone.words == caption.words and alone.score == pytest.approx(caption.score, rel=0, abs=tolerance)
        np.testing.assert_allclose(alone.attention, caption.attention, rtol=0, atol=tolerance)
