"""The encoder's precisions (fast_encoder.py): chosen by the CPU's flags, folded and cast without changing what
the trunk computes beyond the precision's rounding, the int8 calibration stored with a model and checked, and
feature stores that never mix precisions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from show_attend_tell.config import ModelConfig
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import (
    FastEncoder,
    calibrate_int8_encoder,
    fold_batch_norms,
    resolve_precision,
    supported_precisions,
)
from show_attend_tell.model import Encoder
from show_attend_tell.stages import run_until
from show_attend_tell.weights import image_transform

BF16_CPU = frozenset({"avx512f", "avx512_bf16", "avx512_vnni"})
PLAIN_CPU = frozenset({"sse4_2", "avx2"})
HAS_X86_ENGINE = "x86" in torch.backends.quantized.supported_engines


def photos(size: int) -> torch.Tensor:
    """Four normalised photo-like images: smooth colour gradients with a bright square, as the encoder sees them."""
    config = ModelConfig(vocab_size=4, image_size=size)
    transform = image_transform(config)
    pictures = []
    for n in range(4):
        picture = Image.linear_gradient("L").resize((size, size)).rotate(90 * n).convert("RGB")
        picture.paste((200, 40 + 50 * n, 30), (size // 4, size // 4, size // 2, size // 2))
        pictures.append(transform(picture))
    return torch.stack(pictures)  # (4, 3, S, S)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """ResNet-50 with the same random weights at every run (the real ones need a download), BatchNorm statistics
    made non-trivial so that folding them has something to fold."""
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(vocab_size=4, image_size=64, grid_size=2), pretrained=False).eval()
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return encoder


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found - expected).norm() / expected.norm())


def test_supported_precisions_follow_the_cpu_flags():
    assert supported_precisions("cpu", PLAIN_CPU) == ["fp32"]
    found = supported_precisions("cpu", BF16_CPU)
    assert "bf16" in found and ("int8" in found) == HAS_X86_ENGINE
    assert supported_precisions("cpu", frozenset({"amx_bf16", "amx_int8"}))[:2] == ["fp32", "bf16"]


def test_auto_picks_bf16_where_native_else_fp32_and_a_missing_instruction_is_named():
    assert resolve_precision("auto", "cpu", BF16_CPU) == "bf16"
    assert resolve_precision("auto", "cpu", PLAIN_CPU) == "fp32"
    assert resolve_precision("fp32", "cpu", BF16_CPU) == "fp32"
    with pytest.raises(InputError, match="bf16: this CPU has no fast bf16 .*avx512_bf16.*supported here: fp32"):
        resolve_precision("bf16", "cpu", PLAIN_CPU)
    with pytest.raises(InputError, match="expected auto or one of fp32, bf16, int8"):
        resolve_precision("fp8", "cpu", BF16_CPU)


@torch.no_grad()
def test_folding_batch_norms_keeps_the_blocks_and_the_features(encoder):
    images = photos(64)
    folded = fold_batch_norms(encoder)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert list(folded.blocks) == list(encoder.blocks)
    # the same sums in another order: fp32 rounding only
    assert relative_error(folded(images), encoder(images)) < 1e-5
    assert relative_error(run_until(folded, images, "layer3.1"), run_until(encoder, images, "layer3.1")) < 1e-5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())  # the original is untouched


@torch.no_grad()
def test_fp32_and_bf16_paths_give_fp32_features_within_their_rounding(encoder):
    images = photos(64)
    expected = encoder(images)  # (4, 4, 2048)
    fp32 = FastEncoder(encoder, "fp32")(images)
    bf16 = FastEncoder(encoder, "bf16")(images)
    assert fp32.dtype == bf16.dtype == torch.float32 and bf16.shape == expected.shape
    assert relative_error(fp32, expected) < 1e-5
    # bf16 keeps 8 bits of mantissa: a few parts in a thousand per operation, a few percent through 50 layers
    assert 1e-4 < relative_error(bf16, expected) < 0.05
    bf16_encoder = FastEncoder(encoder, "bf16")
    assert list(bf16_encoder.blocks) == list(encoder.blocks)
    until = bf16_encoder.forward_until(images, "layer4.0")
    assert until.dtype == torch.float32 and relative_error(until, run_until(encoder, images, "layer4.0")) < 0.05


@pytest.mark.skipif(not HAS_X86_ENGINE, reason="torch has no x86 quantized engine here")
@torch.no_grad()
def test_int8_encoder_quantizes_with_its_calibration_and_stays_close(encoder):
    images = photos(64)
    calibration = calibrate_int8_encoder(encoder, [images[:2], images[2:]])
    assert calibration and all("activation_post_process" in name for name in calibration)
    int8 = FastEncoder(encoder, "int8", calibration=calibration, image_size=64)
    again = FastEncoder(encoder, "int8", calibration=calibration, image_size=64)
    found = int8(images)
    assert found.dtype == torch.float32 and found.shape == (4, 4, 2048)
    torch.testing.assert_close(again(images), found, rtol=0, atol=0)  # the calibration alone fixes the result
    assert relative_error(found, encoder(images)) < 0.3
    with pytest.raises(InputError, match="int8 encoder runs the whole trunk only"):
        int8.forward_until(images, "layer4.0")
    with pytest.raises(ValueError, match="needs a calibration"):
        FastEncoder(encoder, "int8")
    with pytest.raises(ValueError, match="does not fit this trunk"):
        FastEncoder(encoder, "int8", calibration=dict(list(calibration.items())[3:]), image_size=64)


@pytest.mark.skipif(not HAS_X86_ENGINE, reason="torch has no x86 quantized engine here")
def test_the_int8_encoder_calibration_is_stored_with_a_model_and_checked(tmp_path, fixed_encoder_weights, capsys):
    from safetensors.torch import save_file

    from show_attend_tell import runtime
    from show_attend_tell.checkpoint import (
        ENCODER_INT8_FILE,
        encoder_int8_calibration,
        read_config,
        save_encoder_int8_calibration,
        save_model,
    )
    from show_attend_tell.cli import main
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary

    config = ModelConfig(vocab_size=8, image_size=64, grid_size=2)
    model = CaptionModel(config, encoder=Encoder(config)).eval()
    directory = tmp_path / "ckpt"
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(4))])
    save_model(model, vocab, directory, encoder_sha256="untrained")
    with pytest.raises(InputError, match="no encoder int8 calibration; run `sat calibrate .* --encoder-int8`"):
        runtime.load_model(directory, encoder_precision="int8")
    images = photos(64)
    calibration = calibrate_int8_encoder(model.encoder, [images])
    save_encoder_int8_calibration(directory, calibration, {"images": 4})
    section = read_config(directory)["encoder_int8_calibration"]
    assert section["encoder_sha256"] == "untrained" and section["images"] == 4
    loaded, _, _ = runtime.load_model(directory, encoder_precision="int8")
    assert loaded.encoder.precision == "int8"
    with torch.no_grad():
        expected = FastEncoder(model.encoder, "int8", calibration=calibration, image_size=64)(images)
        torch.testing.assert_close(loaded.encoder(images), expected, rtol=0, atol=0)
    tensors = encoder_int8_calibration(directory, read_config(directory))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] * 2}, directory / ENCODER_INT8_FILE)
    with pytest.raises(InputError, match="changed after calibration"):
        runtime.load_model(directory, encoder_precision="int8")
    # an export leaves the file behind, so it names no calibration rather than a missing one
    save_encoder_int8_calibration(directory, calibration, {"images": 4})
    assert main(["export", str(directory), "--out", str(tmp_path / "exported")]) == 0
    assert "encoder_int8_calibration" not in json.loads((tmp_path / "exported" / "config.json").read_text())
    capsys.readouterr()
    for precision in ("fp32", "bf16"):  # the other precisions need no calibration
        loaded, _, _ = runtime.load_model(tmp_path / "exported", encoder_precision=precision)
        assert loaded.encoder.precision == precision


def test_a_store_records_its_precision_and_is_never_filled_in_another(tmp_path, tiny_prepared):
    from show_attend_tell.features import META_FILE, extract_features, read_meta, store_precision
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(tiny_prepared)
    paths = [image.path for image in dataset.images]
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(dataset.vocab), image_size=64, grid_size=2)
    encoder = Encoder(config, pretrained=False).eval()
    store = tmp_path / "store"
    common = dict(config=config, encoder_sha256="untrained", progress=False)
    extract_features(paths[:0] + paths, store, encoder=FastEncoder(encoder, "bf16"), **common)
    assert read_meta(store)["encoder_precision"] == store_precision(store) == "bf16"
    with pytest.raises(InputError, match="encoder_precision is 'bf16' but 'fp32' was expected"):
        extract_features(paths, store, encoder=FastEncoder(encoder, "fp32"), **common)
    # a store written before the key existed was filled in fp32
    meta = read_meta(store)
    del meta["encoder_precision"]
    (store / META_FILE).write_text(json.dumps(meta))
    assert store_precision(store) == "fp32"
    extract_features(paths, store, encoder=encoder, **common)  # model.Encoder is fp32: it may resume it


def test_cli_features_takes_a_precision_and_refuses_int8(tmp_path, tiny_prepared, fixed_encoder_weights, capsys):
    from show_attend_tell.cli import main
    from show_attend_tell.features import store_precision

    store = tmp_path / "store"
    common = ["features", "--data", str(tiny_prepared), "--out", str(store), "--image-size", "64"]
    assert main([*common, "--encoder-precision", "fp32"]) == 0
    assert store_precision(store) == "fp32"
    assert main([*common, "--encoder-precision", "int8"]) == 2
    assert "a feature store is filled in bf16 or fp32" in capsys.readouterr().err
