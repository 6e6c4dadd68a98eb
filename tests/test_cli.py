"""`sat` as a newcomer meets it: every default in --help, grids the encoder can give, --limit, the store's settings."""

from __future__ import annotations

import argparse
import json

import pytest

from show_attend_tell.cli import build_parser, main


def sub_commands(parser: argparse.ArgumentParser, prefix: str = "sat"):
    """(name, parser) of every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{prefix} {name}", child
                yield from sub_commands(child, f"{prefix} {name}")


# Options whose values are open-ended (paths, words, addresses, block names, numbers written as text); every other
# option taking a string must list its values as argparse choices.
FREE_FORM = {
    "--data-dir", "--images", "--captions", "--split-file", "--split-fractions", "--out", "--data", "--stage",
    "--device", "--features", "--run-dir", "--resume", "--fine-tune-blocks", "--init-from", "--model",
    "--attention-dir", "--mention", "--host", "--from-list", "--allowed-host",
}  # fmt: skip


def test_help_lists_the_values_of_every_closed_flag():
    from show_attend_tell.config import MODEL_CHOICES, TRAIN_RANGES
    from show_attend_tell.weights import ENCODER_WEIGHTS

    commands = dict(sub_commands(build_parser()))
    for name, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.type not in (None, str):
                continue  # positionals, switches, numbers
            flag = action.option_strings[-1]
            assert action.choices or flag in FREE_FORM, f"{name} {flag}: a closed set of values without choices"
    train = {action.option_strings[-1]: action.choices for action in commands["sat train"]._actions}
    closed = {**MODEL_CHOICES, **{k: v for k, v in TRAIN_RANGES.items() if isinstance(v[0], str)}}
    for field, values in {**closed, "encoder": tuple(ENCODER_WEIGHTS)}.items():
        assert tuple(train["--" + field.replace("_", "-")]) == tuple(values), field
    text = " ".join(commands["sat train"].format_help().split())
    assert "--attention {soft,hard} (default soft)" in text
    assert "--decoder {lstm,transformer} (default lstm)" in text


def test_help_shows_every_default():
    commands = dict(sub_commands(build_parser()))
    assert {"sat train", "sat features", "sat weights fetch", "sat caption"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            default = action.default
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if not action.option_strings or default in (None, argparse.SUPPRESS, "", []) or default is False:
                continue  # nothing to show: an optional path, a switch that is off
            assert "default" in parser._get_formatter()._get_help_string(action), (name, action.option_strings)
    features = " ".join(commands["sat features"].format_help().split())
    assert (
        "--image-size IMAGE_SIZE photos are resized to this square side in pixels; the shipped model used 448 "
        "(default: 224)" in features
    )
    assert "(default: 16)" in features and "7 at 224 px, 14 at 448 px" in features
    assert "(default: 7)" in " ".join(commands["sat evaluate"].format_help().split())  # the beam sizes, a list


def test_features_refuses_a_grid_finer_than_the_encoder_gives(tiny_prepared, tmp_path, fixed_encoder_weights, capsys):
    out = tmp_path / "store"
    args = ["features", "--data", str(tiny_prepared), "--out", str(out)]
    assert main([*args, "--image-size", "64", "--grid-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "--grid-size 3 is finer than the 2x2 grid resnet50 gives at --image-size 64" in err
    assert "Use --image-size 96 for a 3x3 grid" in err and not out.exists()
    # without --grid-size the encoder's own grid: 2x2 at 64 px
    assert main([*args, "--image-size", "64", "--limit", "2"]) == 0
    meta = json.loads((out / "features.json").read_text())
    assert meta["grid_size"] == 2 and meta["image_size"] == 64 and meta["shape"][:2] == [6, 4]  # 2 images x 3 splits


@pytest.mark.slow  # `sat train` builds a full ResNet-50 several times
def test_train_takes_the_stores_settings_and_limit_and_logs_one_epoch_numbering(
    tiny_prepared, tmp_path, fixed_encoder_weights, capsys
):
    store = tmp_path / "store"
    assert (
        main(["features", "--data", str(tiny_prepared), "--out", str(store), "--image-size", "64", "--limit", "3"]) == 0
    )
    capsys.readouterr()
    run = tmp_path / "run"
    tiny = "--feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8 --batch-size 5 --log-every-steps 1"
    train = ["train", "--data", str(tiny_prepared), "--features", str(store), *tiny.split(), "--run-dir"]
    # the store holds the first 3 images of each split (train 3, val 2, test 2), not the whole dataset
    assert main([*train, str(run), "--epochs", "2"]) == 2
    assert "these features belong to another dataset, --limit, encoder" in capsys.readouterr().err
    assert main([*train, str(run), "--epochs", "2", "--limit", "3"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["limit"] == 3  # so --resume takes the same images
    assert (config["model"]["image_size"], config["model"]["grid_size"]) == (64, 2)  # from the store
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = 3  # 3 train images x 5 captions in batches of 5
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 6]
    for record in records:
        assert record["epoch"] == -(-record["step"] // steps_per_epoch)  # epochs count from 1
    by_step = {}
    for record in records:
        by_step.setdefault(record["step"], set()).add(record["epoch"])
    assert all(len(epochs) == 1 for epochs in by_step.values())  # a train and a val record of a step agree
    # asking for another image size than the store's is refused, naming the store
    assert main([*train, str(tmp_path / "run2"), "--limit", "3", "--image-size", "96"]) == 2
    assert "image_size is 64 but 96 was expected" in capsys.readouterr().err


def test_train_from_images_checks_the_grid_and_the_limit(tiny_prepared, tmp_path, fixed_encoder_weights, capsys):
    train = ["train", "--data", str(tiny_prepared), "--run-dir", str(tmp_path / "run"), "--image-size", "64"]
    assert main([*train, "--grid-size", "4"]) == 2
    assert "--grid-size 4 is finer than the 2x2 grid" in capsys.readouterr().err
    assert main([*train, "--limit", "-2"]) == 2  # the grid defaults to the encoder's own (2x2 here), so the limit
    assert "--limit must be 0 (everything)" in capsys.readouterr().err


def test_calibrate_stores_int8_ranges_that_caption_then_uses(
    tiny_prepared, tiny_features, tmp_path, capsys, fixed_encoder_weights
):
    """`sat calibrate` on a checkpoint without a calibration: from a feature store, the ranges land beside the
    weights, and Captioner decodes in int8 by default only once they are there."""
    import torch
    from conftest import tiny_model_config

    from show_attend_tell.captioner import Captioner
    from show_attend_tell.checkpoint import read_config, save_model
    from show_attend_tell.inference import Int8Decoder
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(tiny_prepared)
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(len(dataset.vocab)))
    checkpoint = tmp_path / "ckpt"
    save_model(model, dataset.vocab, checkpoint, encoder_sha256="untrained")
    assert not isinstance(Captioner.load(checkpoint, guidance_threshold=None).model.decoder, Int8Decoder)
    args = ["calibrate", str(checkpoint), "--data", str(tiny_prepared), "--features", str(tiny_features)]
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--split", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
    assert main([*args, "--images", "3"]) == 0
    assert "on 3 train photos" in capsys.readouterr().out
    section = read_config(checkpoint)["int8_calibration"]
    assert (section["images"], section["split"], section["beam_size"]) == (3, "train", 7)
    assert section["features_precision"] == "fp32"  # the tiny store's encoder
    assert isinstance(Captioner.load(checkpoint, guidance_threshold=None).model.decoder, Int8Decoder)
    assert main(["calibrate", str(checkpoint), "--data", str(tmp_path / "none")]) == 2
    assert "prepared dataset directory not found" in capsys.readouterr().err


def test_calibrate_check_keeps_int8_the_default_only_within_the_tolerance(
    tiny_prepared, tiny_features, tmp_path, capsys, fixed_encoder_weights, monkeypatch
):
    """`sat calibrate --check val` scores the val captions in fp32 and int8 and records them with the
    calibration; int8 stays the default within --tolerance CIDEr of fp32 and is dropped beyond it."""
    import torch
    from conftest import tiny_model_config

    from show_attend_tell.captioner import Captioner
    from show_attend_tell.checkpoint import read_config, save_model
    from show_attend_tell.evaluate import Evaluation
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.prepare import PreparedDataset

    dataset = PreparedDataset.load(tiny_prepared)
    torch.manual_seed(0)
    checkpoint = tmp_path / "ckpt"
    save_model(
        CaptionModel(tiny_model_config(len(dataset.vocab))), dataset.vocab, checkpoint, encoder_sha256="untrained"
    )
    args = ["calibrate", str(checkpoint), "--data", str(tiny_prepared), "--features", str(tiny_features)]
    assert main([*args, "--images", "3", "--check", "val", "--tolerance", "100"]) == 0
    out = capsys.readouterr().out
    section = read_config(checkpoint)["int8_calibration"]
    check = section["check"]
    assert (check["split"], check["images"], check["beam_size"], check["tolerance"]) == ("val", 2, 7, 100)
    cider = check["CIDEr"]
    assert f"val CIDEr {cider['int8']:.2f} with the int8 decoder, {cider['fp32']:.2f} in fp32" in out
    assert "int8 stays the CPU default" in out and section["default"] is True
    assert Captioner.load(checkpoint, guidance_threshold=None).decoder_precision == "int8"
    # int8 scoring 0.6 below fp32: beyond the default tolerance (0.5)
    monkeypatch.setattr(Evaluation, "score", lambda self, *a, **o: ({"CIDEr": 50.4 if self.int8 else 51.0}, {}))
    record = tmp_path / "check.json"
    assert main([*args, "--images", "3", "--check", "val", "--out", str(record)]) == 0
    assert "val CIDEr 50.40 with the int8 decoder, 51.00 in fp32" in capsys.readouterr().out
    section = read_config(checkpoint)["int8_calibration"]
    written = json.loads(record.read_text())
    assert written["int8_calibration"] == section and written["command"].startswith("sat calibrate ")
    assert {"date", "machine", "cpu"} <= set(written)
    assert section["check"]["CIDEr"] == {"fp32": 51.0, "int8": 50.4} and section["default"] is False
    assert Captioner.load(checkpoint, guidance_threshold=None).decoder_precision == "fp32"
    assert Captioner.load(checkpoint, guidance_threshold=None, int8=True).decoder_precision == "int8"
    assert main([*args[:4], "--encoder-int8", "--check", "val"]) == 2
    assert "--check and --out are for the int8 decoder's calibration" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--check", "nosplit"])
    assert "--check: invalid choice: 'nosplit'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--tolerance", "-1"])
    assert "--tolerance: must be from 0 to 100" in capsys.readouterr().err


@pytest.mark.slow  # `sat train` builds a full ResNet-50 several times
def test_train_decoder_transformer_writes_a_transformer_checkpoint(
    tiny_prepared, tiny_features, tmp_path, fixed_encoder_weights, capsys
):
    from show_attend_tell.checkpoint import load_model
    from show_attend_tell.transformer import TransformerDecoder

    run = tmp_path / "run"
    flags = "--encoder-dim 12 --decoder transformer --decoder-dim 16 --transformer-layers 1 --transformer-heads 2"
    data = ["--data", str(tiny_prepared), "--features", str(tiny_features), "--run-dir", str(run)]
    assert main(["train", *data, *flags.split(), "--batch-size", "20", "--epochs", "1", "--val-max-images", "1"]) == 0
    capsys.readouterr()
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["decoder"], model["transformer_layers"], model["transformer_heads"]) == ("transformer", 1, 2)
    loaded, _, config = load_model(run / "best", with_encoder=False)
    assert isinstance(loaded.decoder, TransformerDecoder) and config["model"]["decoder"] == "transformer"


# Outputs that cannot be written (issue 31): one line naming the path, no traceback.


@pytest.fixture
def tiny_checkpoint(tiny_prepared, tmp_path):
    from conftest import tiny_model_config

    from show_attend_tell.checkpoint import save_model
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.prepare import PreparedDataset

    vocab = PreparedDataset.load(tiny_prepared).vocab
    return save_model(CaptionModel(tiny_model_config(len(vocab))), vocab, tmp_path / "ckpt", encoder_sha256="untrained")


def _one_line_error(capsys, command: str, *parts: str) -> None:
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after any progress bar
    assert line.startswith(f"sat {command}: error: ") and "Traceback" not in err, err
    assert all(part in line for part in parts), err


TINY_MODEL_FLAGS = [
    "--encoder-dim",
    "12",
    "--feature-dim",
    "10",
    "--attention-dim",
    "16",
    "--decoder-dim",
    "16",
    "--embed-dim",
    "8",
]


def _commands(out, prepared, features, checkpoint) -> dict:
    raw = prepared.parent
    return {
        "prepare": ["prepare", "--dataset", "folder", "--data-dir", raw, "--images", raw / "images"],
        "features": ["features", "--data", prepared, "--image-size", "64", "--grid-size", "2"],
        "export": ["export", checkpoint],
        "train": ["train", "--data", prepared, "--features", features, "--max-steps", "1", *TINY_MODEL_FLAGS],
    } | {"out": out}


@pytest.mark.parametrize("command", ["prepare", "features", "export", "train"])
def test_an_output_under_a_file_is_one_line(
    command, tiny_prepared, tiny_features, tiny_checkpoint, tmp_path, capsys, fixed_encoder_weights
):
    (tmp_path / "somefile").write_text("")
    out = tmp_path / "somefile" / "x"
    args = _commands(out, tiny_prepared, tiny_features, tiny_checkpoint)[command]
    flag = "--run-dir" if command == "train" else "--out"
    assert main([str(arg) for arg in [*args, flag, out]]) == 2
    _one_line_error(capsys, command, str(out), "a part of it is a file")


@pytest.mark.parametrize("command", ["features", "export", "calibrate"])
def test_an_output_in_a_read_only_folder_is_one_line(
    command, tiny_prepared, tiny_features, tiny_checkpoint, tmp_path, capsys, read_only, fixed_encoder_weights
):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if command == "calibrate":
        folder = tiny_checkpoint  # its int8 calibration is written beside the weights
        args = ["calibrate", folder, "--data", tiny_prepared, "--features", tiny_features, "--images", "2"]
    else:
        args = [*_commands(None, tiny_prepared, tiny_features, tiny_checkpoint)[command], "--out", folder / "x"]
    read_only(folder)
    assert main([str(arg) for arg in args]) == 2
    _one_line_error(capsys, command, str(folder), "cannot write (Permission denied)")


def test_export_never_writes_onto_its_source_nor_a_full_folder_without_overwrite(tiny_checkpoint, tmp_path, capsys):
    before = {path.name: path.read_bytes() for path in tiny_checkpoint.iterdir()}
    for flags in ([], ["--overwrite"]):
        assert main(["export", str(tiny_checkpoint), "--out", str(tiny_checkpoint), *flags]) == 2
        _one_line_error(capsys, "export", "is the checkpoint being exported")
    assert {path.name: path.read_bytes() for path in tiny_checkpoint.iterdir()} == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_checkpoint), "--out", str(full)]) == 2
    _one_line_error(capsys, "export", f"--out {full}: not empty; give --overwrite")
    assert [path.name for path in full.iterdir()] == ["notes.txt"]
    assert main(["export", str(tiny_checkpoint), "--out", str(full), "--overwrite"]) == 0
    assert (full / "model.safetensors").is_file()
    assert main(["export", str(tiny_checkpoint), "--out", str(full / "notes.txt")]) == 2
    _one_line_error(capsys, "export", "notes.txt: already exists and is not a folder")
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "new")]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "x.jpg", "--guidance-threshold", "nan"], "--guidance-threshold: must be from 0 to 1, got nan"),
        (["caption", "x.jpg", "--guidance-threshold", "-1"], "--guidance-threshold: must be from 0 to 1, got -1"),
        (["caption", "x.jpg", "--guidance-threshold", "5"], "--guidance-threshold: must be from 0 to 1, got 5"),
        (["caption", "x.jpg", "--template-threshold", "inf"], "--template-threshold: must be from 0 to 1, got inf"),
        (["caption", "x.jpg", "--length-penalty", "nan"], "--length-penalty: must be from 0 to 10.0, got nan"),
        (["evaluate", "--data", "d", "--length-penalty", "-1"], "--length-penalty: must be from 0 to 10.0, got -1"),
        (["caption", "x.jpg", "--seed", "18446744073709551616"], "--seed: must be from 0 to 4294967295, got 1844"),
        (["caption", "x.jpg", "--seed", "-1"], "--seed: must be from 0 to 4294967295, got -1"),
        (["prepare", "--dataset", "folder", "--data-dir", "d", "--out", "o", "--seed", "-5"], "--seed: must be from"),
        (["calibrate", "m", "--data", "d", "--seed", "2.5"], "--seed: expected a whole number, got '2.5'"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit, match="2"):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_sat_train_refuses_a_seed_torch_cannot_take(tiny_prepared, tmp_path, capsys):
    for seed in ("18446744073709551616", "-1"):
        assert main(["train", "--data", str(tiny_prepared), "--run-dir", str(tmp_path / "run"), "--seed", seed]) == 2
        _one_line_error(capsys, "train", f"train.seed (--seed) must be from 0 to 4294967295, got {seed}")


def test_train_init_from_takes_the_checkpoints_architecture_and_names_a_misfit(
    tiny_prepared, tmp_path, fixed_encoder_weights, capsys
):
    store = tmp_path / "store"
    assert main(["features", "--data", str(tiny_prepared), "--out", str(store), "--image-size", "64"]) == 0
    tiny = "--feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8 --batch-size 10"
    train = ["train", "--data", str(tiny_prepared), "--features", str(store), "--run-dir"]
    assert main([*train, str(tmp_path / "xe"), *tiny.split(), "--epochs", "1"]) == 0
    train = ["--max-steps", "1", *train[1:]]
    start = str(tmp_path / "xe" / "best")
    # no architecture flags: the checkpoint's (decoder_dim 16, embed_dim 8, ...) rather than the defaults (512)
    assert main(["train", *train, str(tmp_path / "scst"), "--init-from", start, "--self-critical"]) == 0
    started = json.loads((tmp_path / "xe" / "best" / "config.json").read_text())["model"]
    model = json.loads((tmp_path / "scst" / "config.json").read_text())["model"]
    assert {key: model[key] for key in started} == started and started["decoder_dim"] == 16
    # a flag still wins, and a shape that does not fit is one line naming the checkpoint
    capsys.readouterr()
    assert main(["train", *train, str(tmp_path / "wide"), "--init-from", start, "--decoder-dim", "24"]) == 2
    error = capsys.readouterr().err
    assert f"{start}: its decoder does not fit this run's model" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
