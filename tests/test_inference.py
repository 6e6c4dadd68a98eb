"""CPU inference (inference.py): the same features and attention as the readable model, in chunks; the int8
decoder close to fp32, and a photo's caption independent of the photos decoded beside it."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_decoder_config
from PIL import Image, ImageOps

import show_attend_tell.inference as inference
from show_attend_tell.config import ModelConfig
from show_attend_tell.decoding import beam_search
from show_attend_tell.inference import (
    ChunkedAttention,
    Int8Decoder,
    RowInt8Linear,
    cpu_chunk,
    encode_images,
    energy_scores,
    product_terms,
)
from show_attend_tell.model import CaptionModel, Encoded, Encoder


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
    torch.testing.assert_close(stage, encoder.forward_until(images, "layer4.0").detach(), atol=1e-4, rtol=1e-4)


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


def test_int8_linear_quantizes_each_row_on_its_own():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    int8 = RowInt8Linear.of(linear)
    x = torch.randn(6, 32) * torch.tensor([0.01, 1, 100, 1, 1, 1]).view(6, 1)  # rows of very different scales
    x[3] = 0
    y = int8(x)
    for rows in ([0], [1, 2], [2, 0, 5], [3]):  # any companions: bit for bit the same rows
        assert torch.equal(int8(x[rows]), y[rows])
    with torch.no_grad():
        expected, bias = linear(x), linear.bias.clone()
    # each row keeps ~1% of its own scale, the tiny row included (a scale shared with the large row would not)
    error = (y - expected).abs().amax(dim=1) / (expected - bias).abs().amax(dim=1).clamp_min(1e-9)
    assert float(error[[0, 1, 2, 4, 5]].max()) < 0.03 and torch.equal(y[3], bias)
    assert int8(x.view(2, 3, 32)).shape == (2, 3, 24)


def test_int8_beam_search_gives_each_image_the_same_result_whatever_its_batch():
    torch.manual_seed(1)
    decoder = Int8Decoder(CaptionModel(tiny_decoder_config()).decoder.eval())
    features = torch.randn(5, 4, 8) * torch.tensor([1, 30, 0.1, 3, 1]).view(5, 1, 1)
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
def test_shipped_int8_model_captions_a_photo_alike_alone_and_in_a_batch():
    from show_attend_tell.captioner import Captioner

    captioner = Captioner.load(int8=True)
    pictures = photo_variants()
    together = captioner.caption_batch(pictures)
    for picture, caption in zip(pictures, together, strict=True):
        alone = captioner.caption(picture)
        assert (alone.words, alone.score) == (caption.words, caption.score)
