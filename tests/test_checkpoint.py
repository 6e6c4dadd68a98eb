"""Checkpoints: save -> load gives identical outputs; fp16 export; clear errors for broken checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from show_attend_tell import runtime
from show_attend_tell.checkpoint import (
    CONFIG_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    load_model,
    model_section,
    save_int8_calibration,
    save_model,
)
from show_attend_tell.config import ModelConfig
from show_attend_tell.decoding import beam_search
from show_attend_tell.errors import InputError
from show_attend_tell.inference import encode_images
from show_attend_tell.model import CaptionDecoder, CaptionModel, Encoder
from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary
from show_attend_tell.transformer import TransformerDecoder

WORDS = [*SPECIAL_TOKENS, "a", "dog", "runs", "on", "the", "grass", "cat", "sits"]


def small_model(fine_tune: tuple[str, ...] = ()) -> tuple[CaptionModel, Vocabulary]:
    vocab = Vocabulary(WORDS)
    config = ModelConfig(
        vocab_size=len(vocab), attention_dim=16, decoder_dim=16, embed_dim=8, dropout=0.0, fine_tune_blocks=fine_tune
    )
    torch.manual_seed(0)
    encoder = Encoder(config, pretrained=False)
    return CaptionModel(config, encoder=encoder).eval(), vocab


def outputs(model: CaptionModel, images: torch.Tensor):
    with torch.no_grad():
        encoded = model.decoder.encode(encode_images(model.encoder, images))
        return encoded.features, beam_search(model.decoder, encoded, beam_size=3, max_length=6)


def test_round_trip_gives_identical_outputs(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "ckpt", encoder_sha256="abc")
    loaded, loaded_vocab, config = load_model(tmp_path / "ckpt", pretrained_encoder=False)
    assert loaded_vocab == vocab and config["encoder_sha256"] == "abc"
    # a frozen encoder is not stored: copy the same (random) encoder weights in, as the real weights would be
    loaded.encoder.load_state_dict(model.encoder.state_dict())
    images = torch.randn(2, 3, 64, 64)
    features, beams = outputs(model, images)
    loaded_features, loaded_beams = outputs(loaded, images)
    torch.testing.assert_close(features, loaded_features, rtol=0, atol=0)
    for a, b in zip(beams, loaded_beams, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == [h.log_prob for h in b]
    assert not any(name.startswith("encoder.") for name in load_file(tmp_path / "ckpt" / WEIGHTS_FILE))


def test_fine_tuned_encoder_is_stored_and_fp16_keeps_batchnorm_statistics_fp32(tmp_path):
    model, vocab = small_model(fine_tune=("layer4",))
    with torch.no_grad():
        model.encoder.trunk[7][0].bn1.running_var.fill_(8.4e4)  # overflows fp16 (max 65504)
    save_model(model, vocab, tmp_path / "half", encoder_sha256="abc", half=True)
    tensors = load_file(tmp_path / "half" / WEIGHTS_FILE)
    assert tensors["encoder.trunk.7.0.bn1.running_var"].dtype == torch.float32
    assert tensors["decoder.L_o.weight"].dtype == torch.float16
    # only the tuned layer is stored; the frozen rest comes from the encoder weights, as for a frozen encoder
    assert {k.split(".")[2] for k in tensors if k.startswith("encoder.")} == {"7"}
    loaded, _, _ = load_model(tmp_path / "half", pretrained_encoder=False)
    frozen = {k: v for k, v in model.encoder.state_dict().items() if not k.startswith("trunk.7.")}
    loaded.encoder.load_state_dict(frozen, strict=False)  # stands in for the real weights
    assert torch.isfinite(loaded.encoder.trunk[7][0].bn1.running_var).all()
    torch.testing.assert_close(loaded.encoder.trunk[7][0].bn1.running_var, torch.full((512,), 8.4e4))
    images = torch.randn(1, 3, 64, 64)
    (features, _), (loaded_features, _) = outputs(model, images), outputs(loaded, images)
    # fp16 weights: rounding error of a few parts in a thousand of the activations' scale, not more
    assert float((features - loaded_features).abs().max() / features.abs().max()) < 1e-2
    assert json.loads((tmp_path / "half" / CONFIG_FILE).read_text())["dtype"] == "float16"


def test_truncated_weights_give_a_clear_error(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    path = tmp_path / "c" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="model.safetensors: truncated or corrupt"):
        load_model(tmp_path / "c", pretrained_encoder=False)


def test_vocabulary_that_does_not_match_the_embedding(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    Vocabulary(WORDS + ["extra"]).save(tmp_path / "c" / VOCAB_FILE)
    with pytest.raises(InputError, match="vocab.json: 13 words, but the model was built for vocab_size=12"):
        load_model(tmp_path / "c", pretrained_encoder=False)


def test_unknown_format_version_and_missing_checkpoint(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(InputError, match="unknown checkpoint format_version 99"):
        load_model(tmp_path / "c", pretrained_encoder=False)
    with pytest.raises(InputError, match="not a model checkpoint"):
        load_model(tmp_path / "nothing", pretrained_encoder=False)


def test_encoder_weights_must_match_the_recorded_sha256(tmp_path, monkeypatch):
    from show_attend_tell import weights

    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="0" * 64)
    monkeypatch.setattr(weights.EncoderWeights, "sha256", lambda self: "f" * 64)
    monkeypatch.setattr(weights.EncoderWeights, "build", lambda self, pretrained=True: weights.resnet50_v1())
    with pytest.raises(InputError, match="trained on encoder weights sha256 0000"):
        load_model(tmp_path / "c")


def test_cli_export_writes_fp16_that_decodes_like_the_original(tmp_path, capsys):
    from show_attend_tell.cli import main

    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "run", encoder_sha256="abc", extra={"step": 7})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "shipped")]) == 0
    assert "shipped" in capsys.readouterr().out
    config = json.loads((tmp_path / "shipped" / CONFIG_FILE).read_text())
    assert config["dtype"] == "float16" and config["encoder_sha256"] == "abc" and config["step"] == 7
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "shipped" / WEIGHTS_FILE).values())
    shipped, _, _ = load_model(tmp_path / "shipped", with_encoder=False)
    torch.manual_seed(1)
    features = torch.randn(2, 49, 2048)
    with torch.no_grad():
        original = beam_search(model.decoder, model.decoder.encode(features), beam_size=3, max_length=6)
        half = beam_search(shipped.decoder, shipped.decoder.encode(features), beam_size=3, max_length=6)
    assert [[h.tokens for h in b] for b in half] == [[h.tokens for h in b] for b in original]
    for b_half, b_orig in zip(half, original, strict=True):
        assert [h.log_prob for h in b_half] == pytest.approx([h.log_prob for h in b_orig], abs=1e-2)
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


def test_cli_export_of_several_checkpoints_writes_the_mean_of_their_weights(tmp_path, capsys):
    from show_attend_tell.cli import main

    model, vocab = small_model()
    runs = []
    for seed in (1, 2, 3):  # three "cycle ends": the same model with different decoder weights
        torch.manual_seed(seed)
        for parameter in model.decoder.parameters():
            parameter.data.normal_()
        save_model(model, vocab, tmp_path / f"run{seed}", encoder_sha256="abc")
        runs.append({k: v.clone() for k, v in model.decoder.state_dict().items()})
    dirs = [str(tmp_path / f"run{seed}") for seed in (1, 2, 3)]
    assert main(["export", *dirs, "--out", str(tmp_path / "mean"), "--float32"]) == 0
    averaged, _, config = load_model(tmp_path / "mean", with_encoder=False)
    assert config["exported_from"] == dirs
    for name, tensor in averaged.decoder.state_dict().items():
        torch.testing.assert_close(tensor, sum(run[name] for run in runs) / 3)
    # checkpoints of different models or vocabularies cannot be averaged: one line names the odd one out
    other, other_vocab = small_model()
    save_model(other, other_vocab, tmp_path / "sha", encoder_sha256="def")
    save_model(other, Vocabulary([*WORDS[:-1], "bird"]), tmp_path / "words", encoder_sha256="abc")
    for odd, field in (("sha", "'encoder_sha256' differs"), ("words", "vocabulary differs")):
        assert main(["export", dirs[0], str(tmp_path / odd), "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err
        assert str(tmp_path / odd) in error and field in error
    assert not (tmp_path / "x").exists()


def test_inference_decoders_are_chosen_when_loading_and_close_to_fp32(tmp_path):
    from show_attend_tell.inference import (
        ChunkedAttention,
        Int8Decoder,
        Int8Linear,
        Int8LSTMCell,
        ProductEncoded,
        calibrate_int8,
    )
    from show_attend_tell.model import CaptionDecoder, Encoded, SoftAttention

    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "ckpt", encoder_sha256="abc")
    plain, _, _ = load_model(tmp_path / "ckpt", with_encoder=False)
    torch.manual_seed(1)
    ranges = calibrate_int8(plain.decoder, [torch.randn(4, 49, 2048)], beam_size=3)
    save_int8_calibration(tmp_path / "ckpt", ranges, {"images": 4})
    fp32, _, _ = runtime.load_model(tmp_path / "ckpt", with_encoder=False)
    int8, _, _ = runtime.load_model(tmp_path / "ckpt", with_encoder=False, int8=True)
    assert type(plain.decoder.attention) is SoftAttention and type(fp32.decoder.attention) is ChunkedAttention
    assert type(int8.decoder) is Int8Decoder and isinstance(int8.decoder.lstm, Int8LSTMCell)
    assert isinstance(int8.decoder.h_projections, Int8Linear) and isinstance(int8.decoder.L_o, Int8Linear)
    torch.testing.assert_close(int8.decoder.score, fp32.decoder.attention.score.weight.view(-1))  # w stays fp32
    torch.manual_seed(2)
    features, words = torch.randn(3, 49, 2048), torch.tensor([1, 5, 6])
    with torch.no_grad():
        outputs = []
        for decoder in (plain.decoder, fp32.decoder, int8.decoder):
            encoded = decoder.encode(features)
            outputs.append(decoder.step(words, decoder.init_state(encoded), encoded))
    assert type(plain.decoder) is CaptionDecoder and isinstance(encoded, ProductEncoded)  # e^-u, not an Encoded
    assert not isinstance(encoded, Encoded)
    (log_probs, _, alpha), (log_probs32, _, alpha32), (log_probs8, _, alpha8) = outputs
    torch.testing.assert_close(log_probs32, log_probs)
    torch.testing.assert_close(alpha32, alpha)
    torch.testing.assert_close(log_probs8, log_probs, atol=0.05, rtol=0)
    torch.testing.assert_close(alpha8, alpha, atol=0.01, rtol=0)
    with pytest.raises(RuntimeError, match="inference"):  # no silent training of a decoder without gradients
        fp32.decoder.attention(Encoded(features[:, :, :16], torch.zeros(3, 49, 16)), torch.zeros(3, 16))
    with pytest.raises(InputError, match="CPU only"):
        runtime.load_model(tmp_path / "ckpt", with_encoder=False, int8=True, device="cuda")


def test_int8_loads_only_with_a_calibration_of_these_weights(tmp_path, capsys):
    """The int8 decoder's input ranges belong to one weights file: a checkpoint without them, with them changed,
    or with other weights is refused with a line saying what to run; fp32 still loads."""
    from safetensors.torch import save_file

    from show_attend_tell.checkpoint import INT8_FILE, has_int8_calibration, read_config
    from show_attend_tell.cli import main
    from show_attend_tell.inference import calibrate_int8

    model, vocab = small_model()
    directory = tmp_path / "ckpt"
    save_model(model, vocab, directory, encoder_sha256="abc")
    with pytest.raises(InputError, match="no int8 calibration.*sat calibrate"):
        runtime.load_model(directory, with_encoder=False, int8=True)
    assert not has_int8_calibration(read_config(directory))
    torch.manual_seed(1)
    ranges = calibrate_int8(model.decoder, [torch.randn(4, 49, 2048)], beam_size=3)
    save_int8_calibration(directory, ranges, {"images": 4})
    config = read_config(directory)
    assert has_int8_calibration(config) and config["int8_calibration"]["images"] == 4
    umask = os.umask(0)
    os.umask(umask)
    for name in (INT8_FILE, "config.json", "model.safetensors"):  # readable as files open() makes, not 0600
        assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~umask
    runtime.load_model(directory, with_encoder=False, int8=True)
    # the ranges file edited after calibration
    tensors = {
        f"{name}.{end}": value for name, (low, high) in ranges.items() for end, value in (("low", low), ("high", high))
    }
    save_file({**tensors, "L_o.high": tensors["L_o.high"] * 2}, directory / INT8_FILE)
    with pytest.raises(InputError, match="changed after calibration"):
        runtime.load_model(directory, with_encoder=False, int8=True)
    save_int8_calibration(directory, ranges, {"images": 4})
    # new weights under the old calibration (a checkpoint overwritten by hand)
    other, _ = small_model()
    with torch.no_grad():
        other.decoder.L_o.weight.mul_(2)
    save_model(other, vocab, tmp_path / "other", encoder_sha256="abc")
    (directory / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match="calibrated for other weights"):
        runtime.load_model(directory, with_encoder=False, int8=True)
    runtime.load_model(directory, with_encoder=False)  # fp32 does not need it
    # an export writes new (fp16) weights: the calibration is not carried over, and the command says so
    save_model(model, vocab, directory, encoder_sha256="abc")
    save_int8_calibration(directory, ranges, {"images": 4})
    assert main(["export", str(directory), "--out", str(tmp_path / "shipped")]) == 0
    assert "sat calibrate" in capsys.readouterr().out
    assert not has_int8_calibration(read_config(tmp_path / "shipped"))


def test_int8_is_the_default_until_a_check_of_its_calibration_finds_it_worse(tmp_path):
    """checkpoint.int8_by_default: no calibration, no int8; a calibration makes it the default, a check that
    recorded default false takes it back, and a new calibration replaces the check. A check needs a calibration."""
    from show_attend_tell.checkpoint import int8_by_default, read_config, record_int8_check
    from show_attend_tell.inference import calibrate_int8

    model, vocab = small_model()
    directory = tmp_path / "ckpt"
    save_model(model, vocab, directory, encoder_sha256="abc")
    assert not int8_by_default(read_config(directory))
    check = {"split": "val", "CIDEr": {"fp32": 63.0, "int8": 61.9}}
    with pytest.raises(InputError, match=r"ckpt: no int8 calibration to check \(`sat calibrate"):
        record_int8_check(directory, check, default=False)
    ranges = calibrate_int8(model.decoder, [torch.randn(2, 49, 2048)], beam_size=2)
    save_int8_calibration(directory, ranges, {"images": 2})
    assert int8_by_default(read_config(directory))
    record_int8_check(directory, check, default=False)
    section = read_config(directory)["int8_calibration"]
    assert (section["check"], section["default"], section["images"]) == (check, False, 2)
    assert not int8_by_default(read_config(directory))
    record_int8_check(directory, check, default=True)
    assert int8_by_default(read_config(directory))
    record_int8_check(directory, check, default=False)
    save_int8_calibration(directory, ranges, {"images": 2})  # new ranges: the old check is gone with them
    assert "check" not in read_config(directory)["int8_calibration"] and int8_by_default(read_config(directory))


def test_fine_tuned_blocks_missing_from_the_weights_give_a_clear_error(tmp_path):
    model, vocab = small_model(fine_tune=("layer4.2",))
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    tensors = load_file(tmp_path / "c" / WEIGHTS_FILE)
    assert {k for k in tensors if k.startswith("encoder.")} == {
        f"encoder.{k}" for k in model.encoder.state_dict() if k.startswith("trunk.7.2.")
    }
    save_file({k: v for k, v in tensors.items() if "conv3" not in k}, tmp_path / "c" / WEIGHTS_FILE)
    with pytest.raises(InputError, match=r"encoder tensors do not match .*missing \['trunk.7.2.conv3.weight'\]"):
        load_model(tmp_path / "c", pretrained_encoder=False)


def test_export_averages_the_fine_tuned_blocks_with_the_decoders(tmp_path, fixed_encoder_weights):
    from show_attend_tell.cli import main

    first, vocab = small_model(fine_tune=("layer4.2",))
    second, _ = small_model(fine_tune=("layer4.2",))
    with torch.no_grad():
        second.encoder.trunk[7][2].conv1.weight.add_(1.0)
        second.decoder.L_o.weight.add_(1.0)
    save_model(first, vocab, tmp_path / "a", encoder_sha256="untrained")
    save_model(second, vocab, tmp_path / "b", encoder_sha256="untrained")
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "mean")]) == 0
    tensors = load_file(tmp_path / "mean" / WEIGHTS_FILE)
    for name, module in (
        ("encoder.trunk.7.2.conv1.weight", first.encoder.trunk[7][2].conv1),
        ("decoder.L_o.weight", first.decoder.L_o),
    ):
        torch.testing.assert_close(tensors[name].float(), (module.weight + 0.5).half().float(), rtol=0, atol=1e-3)
    assert not any(k.startswith("encoder.trunk.7.1.") for k in tensors)


# Hand-edited checkpoints (issue 14): refused with the field named, never loaded into nonsense.


def edit_config(directory, change) -> None:
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("grid_size", "14", "model.grid_size must be a whole number from 1 to 64, got '14'"),
        ("grid_size", 0, "model.grid_size must be a whole number from 1 to 64, got 0"),
        ("image_size", 10**6, "model.image_size must be a whole number from 32 to 2048"),
        ("encoder", "vgg16", "model.encoder must be one of resnet50, resnet101, got 'vgg16'"),
        ("dropout", 1.5, "model.dropout must be a number in [0, 1)"),
        ("deep_output", "yes", "model.deep_output must be true or false"),
        ("fine_tune_blocks", "layer4", "model.fine_tune_blocks must be a list of block names"),
        ("attention_dim", True, "model.attention_dim must be a whole number"),
        ("colour", 3, "unknown field(s) colour"),
        ("decoder", "gru", "model.decoder must be one of lstm, transformer, got 'gru'"),
        ("transformer_positions", "rotary", "model.transformer_positions must be one of learned, sinusoidal"),
        ("transformer_layers", 0, "model.transformer_layers must be a whole number from 1 to 64"),
    ],
)
def test_every_model_field_is_type_and_range_checked(tmp_path, field, value, message):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    edit_config(tmp_path / "c", lambda config: config["model"].update({field: value}))
    with pytest.raises(InputError) as caught:
        load_model(tmp_path / "c", pretrained_encoder=False)
    assert message in str(caught.value) and CONFIG_FILE in str(caught.value)


def test_a_config_that_is_not_an_object_or_has_bad_checksum_types(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    (tmp_path / "c" / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(InputError, match="config.json: expected a JSON object, got list"):
        load_model(tmp_path / "c", pretrained_encoder=False)
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    edit_config(tmp_path / "c", lambda config: config.update(vocab_sha256=7))
    with pytest.raises(InputError, match="field 'vocab_sha256' must be a string"):
        load_model(tmp_path / "c", pretrained_encoder=False)


def test_an_edited_grid_size_or_a_reordered_vocabulary_is_caught_by_the_checksums(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    load_model(tmp_path / "c", pretrained_encoder=False)  # as saved: loads
    edit_config(tmp_path / "c", lambda config: config["model"].update(grid_size=14))
    with pytest.raises(InputError, match="config.json's 'model' section was changed after the weights were saved"):
        load_model(tmp_path / "c", pretrained_encoder=False)
    # removing config.json's checksum does not help: the weights file holds a copy
    edit_config(tmp_path / "c", lambda config: config.pop("model_sha256"))
    with pytest.raises(InputError, match="model_sha256 in model.safetensors"):
        load_model(tmp_path / "c", pretrained_encoder=False)

    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    words = list(vocab.words)
    words[4], words[5] = words[5], words[4]  # same length, two words swapped
    Vocabulary(words).save(tmp_path / "c" / VOCAB_FILE)
    with pytest.raises(InputError, match="vocab.json was changed after the weights were saved"):
        load_model(tmp_path / "c", pretrained_encoder=False)


def test_checkpoints_saved_before_the_checksums_still_load(tmp_path):
    model, vocab = small_model()
    save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    edit_config(tmp_path / "c", lambda config: [config.pop(key) for key in ("model_sha256", "vocab_sha256")])
    weights = tmp_path / "c" / WEIGHTS_FILE
    save_file(load_file(weights), weights, metadata={"format_version": "1"})  # as save_model used to write it
    loaded, loaded_vocab, _ = load_model(tmp_path / "c", pretrained_encoder=False)
    assert loaded_vocab == vocab


def test_the_shipped_model_carries_checksums_that_match_it():
    from show_attend_tell.captioner import SHIPPED_MODEL
    from show_attend_tell.checkpoint import check_model_config, model_sha256, vocabulary_sha256

    config = json.loads((SHIPPED_MODEL / CONFIG_FILE).read_text())
    model_config = check_model_config(config["model"], "shipped")
    assert model_config.attention == "soft"  # written before the field existed: it means soft attention
    assert model_config.decoder == "lstm"  # the same for the decoder
    assert json.loads(json.dumps(model_section(model_config))) == config["model"]  # the section written today
    assert config["model_sha256"] == model_sha256(model_section(model_config))
    assert config["vocab_sha256"] == vocabulary_sha256(Vocabulary.load(SHIPPED_MODEL / VOCAB_FILE))


def test_the_shipped_model_loads_with_its_checksums_verified():
    """ModelConfig gained `attention` after the shipped model was saved: its section, without the field, still
    verifies against the checksums in config.json and in the weights file, and means soft attention."""
    from show_attend_tell.captioner import SHIPPED_MODEL

    model, vocab, config = load_model(SHIPPED_MODEL, with_encoder=False)
    assert model.config.attention == "soft" and not model.decoder.hard_attention
    assert isinstance(model.decoder, CaptionDecoder) and model.config.decoder == "lstm"
    assert not {"attention", "decoder"} & set(config["model"]) and len(vocab) == model.config.vocab_size


def test_a_hard_attention_checkpoint_names_its_attention_and_its_checksum_covers_it(tmp_path):
    from show_attend_tell.checkpoint import model_sha256

    vocab = Vocabulary(WORDS)
    config = ModelConfig(vocab_size=len(vocab), attention_dim=16, decoder_dim=16, embed_dim=8, attention="hard")
    model = CaptionModel(config).eval()
    save_model(model, vocab, tmp_path / "hard", encoder_sha256="abc")
    saved = json.loads((tmp_path / "hard" / CONFIG_FILE).read_text())
    assert saved["model"]["attention"] == "hard"
    assert (
        saved["model_sha256"]
        == model_sha256(model_section(config))
        != model_sha256(model_section(dataclasses.replace(config, attention="soft")))
    )
    loaded, _, _ = load_model(tmp_path / "hard", with_encoder=False)
    assert loaded.config.attention == "hard" and loaded.decoder.hard_attention
    edit_config(tmp_path / "hard", lambda c: c["model"].update(attention="soft"))  # same tensors, other model
    with pytest.raises(InputError, match="'model' section was changed after the weights were saved"):
        load_model(tmp_path / "hard", with_encoder=False)
    edit_config(tmp_path / "hard", lambda c: c["model"].update(attention="stochastic"))
    with pytest.raises(InputError, match="model.attention must be one of soft, hard, got 'stochastic'"):
        load_model(tmp_path / "hard", with_encoder=False)


def test_an_lstm_saves_the_model_section_it_saved_before_the_transformer_existed(tmp_path):
    model = CaptionModel(ModelConfig(vocab_size=len(WORDS), attention_dim=16, decoder_dim=16, embed_dim=8))
    save_model(model, Vocabulary(WORDS), tmp_path / "c", encoder_sha256="abc")
    section = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())["model"]
    everything = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(section) == everything - set(TransformerDecoder.own_fields) - {"attention", "decoder"}
    assert load_model(tmp_path / "c", with_encoder=False)[0].config == model.config


def test_a_transformer_round_trip_gives_identical_captions_and_names_its_decoder(tmp_path):
    config = ModelConfig(
        vocab_size=len(WORDS),
        encoder_dim=8,
        grid_size=2,
        decoder="transformer",
        decoder_dim=16,
        transformer_layers=2,
        transformer_heads=4,
        transformer_feedforward_dim=24,
        transformer_positions="sinusoidal",
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = CaptionModel(config).eval()
    save_model(model, Vocabulary(WORDS), tmp_path / "t", encoder_sha256="abc")
    section = json.loads((tmp_path / "t" / CONFIG_FILE).read_text())["model"]
    assert section["decoder"] == "transformer" and section["transformer_heads"] == 4
    loaded, _, _ = load_model(tmp_path / "t", with_encoder=False)
    assert loaded.config == config
    features = torch.randn(3, 4, 8)
    with torch.no_grad():
        beams = beam_search(model.decoder, model.decoder.encode(features), beam_size=3, max_length=6)
        again = beam_search(loaded.decoder, loaded.decoder.encode(features), beam_size=3, max_length=6)
    assert [[(h.tokens, h.log_prob) for h in b] for b in beams] == [[(h.tokens, h.log_prob) for h in b] for b in again]
    edit_config(tmp_path / "t", lambda c: c["model"].update(transformer_heads=3))
    with pytest.raises(InputError, match=r"model.decoder_dim \(16\) must be a multiple of model.transformer_heads"):
        load_model(tmp_path / "t", with_encoder=False)
    edit_config(tmp_path / "t", lambda c: c["model"].update(transformer_heads=2))
    with pytest.raises(InputError, match="'model' section was changed after the weights were saved"):
        load_model(tmp_path / "t", with_encoder=False)


def test_an_int8_calibration_with_infinite_ranges_is_refused_even_with_its_checksum(tmp_path):
    from show_attend_tell.checkpoint import INT8_FILE, int8_input_ranges, read_config, save_int8_calibration

    model, vocab = small_model()
    directory = save_model(model, vocab, tmp_path / "c", encoder_sha256="abc")
    low, high = torch.zeros(3), torch.tensor([1.0, float("inf"), 2.0])
    save_int8_calibration(directory, {"attention.decoder_projection": (low, high)}, {"images": 1})  # new sha256
    with pytest.raises(InputError, match=f"{INT8_FILE}: attention.decoder_projection.high holds values that are not"):
        int8_input_ranges(directory, read_config(directory))
