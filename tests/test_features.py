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
    dataset_features,
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
    from show_attend_tell.weights import image_transform

    transform = image_transform(config)
    direct = encoder(torch.stack([transform(load_image(p)) for p in paths[:3]]))
    torch.testing.assert_close(store[:3].float(), direct, rtol=1e-2, atol=1e-2)  # fp16 storage


def test_dataset_features_reads_the_store_or_encodes_the_photos_alike(tiny_prepared, tiny_features):
    from types import SimpleNamespace

    paths, config, encoder = setup(tiny_prepared)
    dataset = PreparedDataset.load(tiny_prepared)
    model = SimpleNamespace(encoder=encoder, config=config)
    rows = [5, 0, 11]
    from_store = dataset_features(model, dataset, tiny_features, "untrained")(rows)
    from_photos = dataset_features(model, dataset)(rows)
    assert from_store.shape == from_photos.shape == (3, 4, 12) and from_store.dtype == torch.float16
    torch.testing.assert_close(from_store.float(), from_photos, rtol=1e-2, atol=1e-2)  # fp16 storage
    with pytest.raises(InputError, match="encoder_sha256 is 'untrained' but 'other weights' was expected"):
        dataset_features(model, dataset, tiny_features, "other weights")


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
    assert open_store(tmp_path / "s").done.tolist() == [1, 1, 0]


def test_cli_refuses_an_unknown_stage_before_any_work(tiny_prepared, tmp_path, fixed_encoder_weights, capsys):
    from show_attend_tell.cli import main

    args = ["features", "--data", str(tiny_prepared), "--out", str(tmp_path / "s"), "--image-size", "64"]
    assert main([*args, "--stage", "layer9.0"]) == 2
    assert "--stage: unknown encoder stage 'layer9.0'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_store_reads_the_rows_asked_for_from_disk_in_any_order(tiny_features):
    store = open_store(tiny_features)
    whole = np.load(tiny_features / FEATURES_FILE)
    rows = [7, 2, 3, 4, 11, 0, 3, 3]  # runs, repeats, any order
    np.testing.assert_array_equal(store[rows].numpy(), whole[rows])
    np.testing.assert_array_equal(store[torch.tensor([5])].numpy(), whole[[5]])
    assert store[[]].shape == (0, 4, 12)
    with pytest.raises(IndexError):
        store[[12]]
    np.testing.assert_array_equal(store.load().numpy(), whole)


def test_shards_filled_by_separate_ranks_merge_by_moving_their_files(tiny_prepared, tiny_features, tmp_path):
    """Two ranks on machines that share no disk each fill their own directory; the shard files moved into one
    directory are the store, equal to one process's; a store with a shard file missing names it."""
    paths, config, encoder = setup(tiny_prepared)
    options = dict(config=config, encoder=encoder, encoder_sha256="untrained", progress=False, batch_size=5)
    for rank in (0, 1):
        extract_features(paths, tmp_path / f"machine{rank}", rank=rank, world_size=2, **options)
    names = sorted(p.name for p in (tmp_path / "machine1").iterdir())
    assert names == ["done-00001-of-00002.npy", "features-00001-of-00002.npy", "features.json"]
    single = load_features(tiny_features)
    with pytest.raises(InputError, match="features-00001-of-00002.npy: missing; it is written by the torchrun rank"):
        open_store(tmp_path / "machine0")
    for name in names[:2]:
        (tmp_path / "machine1" / name).rename(tmp_path / "machine0" / name)
    merged = open_store(tmp_path / "machine0", expected_meta(config, paths, "untrained"))
    assert [(s["start"], s["stop"]) for s in merged.shards] == [(0, 6), (6, 12)]
    assert torch.equal(merged.load(), single)
    assert torch.equal(merged[[5, 6, 7, 0]], single[[5, 6, 7, 0]])  # a run across the shards' border


def test_a_sharded_store_resumes_with_any_number_of_processes(tiny_prepared, tiny_features, tmp_path):
    paths, config, encoder = setup(tiny_prepared)
    options = dict(config=config, encoder=encoder, encoder_sha256="untrained", progress=False)
    extract_features(paths, tmp_path / "s", rank=1, world_size=3, **options)  # rank 1 of 3 only
    with pytest.raises(InputError, match="features-00000-of-00003.npy: missing"):
        open_store(tmp_path / "s")
    summary = extract_features(paths, tmp_path / "s", shards=5, **options)  # one process does 0 and 2; 3 shards stay
    assert summary["computed"] == 8
    store = open_store(tmp_path / "s")
    assert len(store.shards) == 3
    assert torch.equal(store.load(), load_features(tiny_features))


def test_a_float32_store_keeps_the_encoder_output_exactly(tiny_prepared, tiny_features, tmp_path):
    paths, config, encoder = setup(tiny_prepared)
    extract_features(
        paths, tmp_path / "s", config=config, encoder=encoder, encoder_sha256="x", dtype="float32", progress=False
    )
    store = load_features(tmp_path / "s")
    assert store.dtype == torch.float32
    assert torch.equal(store.half(), load_features(tiny_features))
    with pytest.raises(InputError, match="--dtype must be one of float16, float32"):
        extract_features(paths, tmp_path / "t", config=config, encoder=encoder, encoder_sha256="x", dtype="int8")


def test_a_truncated_shard_is_refused_naming_it(tiny_features, tmp_path):
    import shutil

    shutil.copytree(tiny_features, tmp_path / "s")
    path = tmp_path / "s" / FEATURES_FILE
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match=f"{path}: not a readable .npy array"):
        open_store(tmp_path / "s")


SHARD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import ColourGrid, tiny_model_config
from show_attend_tell.features import extract_features
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.distributed import distributed, exit_worker
rank, world_size = distributed()
dataset = PreparedDataset.load(sys.argv[1])
config = tiny_model_config(len(dataset.vocab))
paths = [image.path for image in dataset.images]
extract_features(paths, sys.argv[2], config=config, encoder=ColourGrid(), encoder_sha256="untrained", rank=rank,
                 world_size=world_size, batch_size=4, progress=False)
if world_size > 1:
    exit_worker()
"""


@pytest.mark.slow  # torchrun
def test_two_gloo_processes_fill_a_store_equal_to_one_process(tiny_prepared, tiny_features, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT.format(tests=str(REPO / "tests")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([*torchrun, str(script), tiny_prepared, tmp_path / "s"], env=env, capture_output=True)
    assert ran.returncode == 0, ran.stderr.decode()[-5000:]
    store = open_store(tmp_path / "s")
    assert [s["features"] for s in store.shards] == ["features-00000-of-00002.npy", "features-00001-of-00002.npy"]
    assert torch.equal(store.load(), load_features(tiny_features))


def test_a_store_another_process_fills_is_neither_filled_nor_removed(tiny_prepared, tmp_path):
    import os

    from show_attend_tell.locks import hold

    paths, config, encoder = setup(tiny_prepared)
    out = tmp_path / "store"
    options = dict(config=config, encoder=encoder, encoder_sha256="untrained", progress=False)
    extract_features(paths, out, **options, shards=2)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with hold(out / ".features-00001-of-00002.npy.lock", "a writer", ""):  # as a process filling shard 1 holds it
        refusal = f"features-00001-of-00002.npy is being written by another process \\(pid {os.getpid()}\\)"
        with pytest.raises(InputError, match=refusal):
            extract_features(paths, out, **options)
        with pytest.raises(InputError, match=refusal):
            extract_features(paths, out, **options, overwrite=True)
        assert {path.name: path.read_bytes() for path in out.iterdir() if path.suffix != ".lock"} == before
        assert extract_features(paths, out, **options, rank=0, world_size=2)["computed"] == 0  # shard 0 is free
    assert extract_features(paths, out, **options, overwrite=True)["computed"] == 12


@pytest.mark.parametrize("name", ["../victim.npy", "{victim}", "sub/features.npy", ".lock.npy", 7])
def test_shard_files_named_outside_the_store_are_refused_and_never_removed(tiny_features, tmp_path, name):
    import json
    import shutil

    from show_attend_tell.features import META_FILE, remove_store

    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"keep me")
    store = tmp_path / "s"
    shutil.copytree(tiny_features, store)
    meta = json.loads((store / META_FILE).read_text())
    name = name.format(victim=victim) if isinstance(name, str) else name
    meta["shards"] = [{"features": name, "done": DONE_FILE, "start": 0, "stop": meta["shape"][0]}]
    (store / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match=f"{META_FILE}: shard file .* is not the name of a .npy file in the store"):
        open_store(store)
    remove_store(store)
    assert victim.read_bytes() == b"keep me" and (store / META_FILE).is_file()


def test_an_edited_dtype_is_refused(tiny_features, tmp_path):
    import json
    import shutil

    from show_attend_tell.features import META_FILE

    shutil.copytree(tiny_features, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / META_FILE).read_text())
    for dtype in ("float32", "int8"):
        (tmp_path / "s" / META_FILE).write_text(json.dumps({**meta, "dtype": dtype}))
        with pytest.raises(InputError, match=f"dtype '{dtype}' but the shard files hold float16"):
            open_store(tmp_path / "s")
