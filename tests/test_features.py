"""Feature cache: complete and verified on reopen, resumable, refuses a store made for something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ColourGrid, tiny_model_config

from show_attend_tell.errors import InputError
from show_attend_tell.features import (
    DONE_FILE,
    FEATURES_FILE,
    expected_meta,
    extract_features,
    load_features,
    open_store,
)
from show_attend_tell.prepare import PreparedDataset


def setup(tiny_prepared):
    dataset = PreparedDataset.load(tiny_prepared)
    config = tiny_model_config(len(dataset.vocab))
    return [image.path for image in dataset.images], config, ColourGrid()


def test_store_holds_the_encoder_output_for_every_image(tiny_prepared, tiny_features):
    paths, config, encoder = setup(tiny_prepared)
    store = load_features(tiny_features, expected_meta(config, paths, "untrained"))
    assert store.shape == (12, 4, 12) and store.dtype == torch.float16
    from show_attend_tell.images import load_image
    from show_attend_tell.model import image_transform

    transform = image_transform(config)
    direct = encoder(torch.stack([transform(load_image(p)) for p in paths[:3]]))
    torch.testing.assert_close(store[:3].float(), direct, rtol=1e-2, atol=1e-2)  # fp16 storage


def test_interrupted_extraction_resumes_only_the_missing_rows(tiny_prepared, tmp_path):
    paths, config, encoder = setup(tiny_prepared)
    out = tmp_path / "store"
    extract_features(paths, out, config=config, encoder=encoder, encoder_sha256="untrained", progress=False)
    complete = np.load(out / FEATURES_FILE).copy()
    # an interruption: rows 5.. were never written nor marked done
    features = np.load(out / FEATURES_FILE, mmap_mode="r+")
    done = np.load(out / DONE_FILE, mmap_mode="r+")
    features[5:] = 0
    done[5:] = 0
    features.flush(), done.flush()
    del features, done
    with pytest.raises(InputError, match="7 of 12 images have no features yet"):
        load_features(out)
    summary = extract_features(paths, out, config=config, encoder=encoder, encoder_sha256="untrained", progress=False)
    assert summary["computed"] == 7 and summary["failed"] == {}
    np.testing.assert_array_equal(np.load(out / FEATURES_FILE), complete)


def test_store_for_another_encoder_or_grid_is_refused(tiny_prepared, tiny_features):
    paths, config, _ = setup(tiny_prepared)
    with pytest.raises(InputError, match="encoder_sha256 is 'untrained' but 'abc' was expected"):
        open_store(tiny_features, expected_meta(config, paths, "abc"))
    other = tiny_model_config(config.vocab_size, grid_size=3)
    with pytest.raises(InputError, match="grid_size is 2 but 3 was expected"):
        open_store(tiny_features, expected_meta(other, paths, "untrained"))
    with pytest.raises(InputError, match="no feature store here"):
        open_store(tiny_features.parent / "nothing")


def test_broken_image_is_reported_and_the_rest_is_done(tiny_prepared, tmp_path):
    paths, config, encoder = setup(tiny_prepared)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"")
    summary = extract_features(
        [*paths[:2], broken], tmp_path / "s", config=config, encoder=encoder, encoder_sha256="x", progress=False
    )
    assert summary["computed"] == 2
    assert "empty file" in summary["failed"][str(broken)]
    _, done, _ = open_store(tmp_path / "s")
    assert done.tolist() == [1, 1, 0]


def test_cli_refuses_an_unknown_stage_before_any_work(tiny_prepared, tmp_path, fixed_encoder_weights, capsys):
    from show_attend_tell.cli import main

    args = ["features", "--data", str(tiny_prepared), "--out", str(tmp_path / "s"), "--image-size", "64"]
    assert main([*args, "--stage", "layer9.0"]) == 2
    assert "--stage: unknown encoder stage 'layer9.0'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
