"""Training: learns, validates by real decoding, resumes bit-identically after SIGKILL, stops on NaN, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_model_config, tiny_transformer
from helpers import STAGE_MODEL, load_script, make_trainer
from safetensors.torch import load_file

from show_attend_tell import fast_encoder, runtime
from show_attend_tell.checkpoint import load_model
from show_attend_tell.config import DataConfig, ModelConfig, TrainConfig
from show_attend_tell.features import FeatureStore
from show_attend_tell.inference import calibrate_int8
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.train import (
    NonFiniteLossError,
    _optimise,
    batch_captions,
    batch_features,
    batches_of_epoch,
    cross_entropy_step,
    fit,
    new_run,
    resume_run,
    save_state,
    self_critical_step,
    training_precision,
    validate,
)
from show_attend_tell.training_data import SHUFFLE_WINDOW_BLOCKS, TrainingData, epoch_batches, epoch_order


def test_training_learns_and_validates_by_decoding(tiny_prepared, tiny_features, tmp_path):
    trainer = make_trainer(tmp_path / "run", tiny_prepared, tiny_features, epochs=20, patience=20)
    summary = fit(trainer, progress=False)
    assert summary["stopped"] == "epochs" and summary["global_step"] == 20 * trainer.steps_per_epoch
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) == 20 and all("CIDEr" in r and "BLEU-4" in r for r in val)
    assert max(r["CIDEr"] for r in val) > val[0]["CIDEr"] + 50  # x100, as metrics are reported
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 20
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    model, vocab, config = load_model(tmp_path / "run" / "best", with_encoder=False)
    assert config["val"]["CIDEr"] == max(r["CIDEr"] for r in val)
    # the best checkpoint comes calibrated for int8 decoding, on the training photos' features, for its weights
    assert config["int8_calibration"]["images"] == len(trainer.data.train_rows)  # fewer than CALIBRATION_IMAGES
    int8, _, _ = runtime.load_model(tmp_path / "run" / "best", with_encoder=False, int8=True)
    features = torch.as_tensor(trainer.data.features[trainer.data.train_rows]).float()
    low, high = calibrate_int8(model.decoder, [features])["feature_projection"]
    stored = load_file(tmp_path / "run" / "best" / "int8.safetensors")
    assert torch.equal(stored["feature_projection.low"], low) and torch.equal(stored["feature_projection.high"], high)


def test_hard_attention_trains_on_sampled_locations_with_the_moving_average_baseline(
    tiny_prepared, tiny_features, tmp_path
):
    from show_attend_tell.model import moving_average

    run = make_trainer(tmp_path / "run", tiny_prepared, tiny_features, {"attention": "hard"}, epochs=8, patience=8)
    summary = fit(run, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert summary["global_step"] == len(train)
    # two images a batch, each sampling with probability 0.5: some batches sample none, most some
    assert len(train) / 2 < sum(r["sampled_captions"] > 0 for r in train) < len(train)
    assert sum(r["cross_entropy"] for r in train[-4:]) < 0.75 * sum(r["cross_entropy"] for r in train[:4])
    assert max(r["CIDEr"] for r in val) > val[0]["CIDEr"] + 50
    # the baseline each step used: the first sampled batch's own mean, then the paper's moving average of the
    # means of the batches that sampled
    first = next(r for r in train if r["sampled_captions"])
    assert first["baseline"] == first["reward"]
    since = train[train.index(first) :]
    for before, after in zip(since[:-1], since[1:], strict=True):
        moved = (
            moving_average(before["baseline"], before["reward"]) if before["sampled_captions"] else before["baseline"]
        )
        assert after["baseline"] == pytest.approx(moved)
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert state["reward_baseline"] == pytest.approx(moving_average(train[-1]["baseline"], train[-1]["reward"]))
    resumed = resume_run(tmp_path / "run", pretrained_encoder=False, java=False)
    assert resumed.progress.reward_baseline == state["reward_baseline"]  # exact resume keeps it
    model, _, config = load_model(tmp_path / "run" / "best", with_encoder=False)
    assert model.config.attention == "hard" and config["model"]["attention"] == "hard"


def test_self_critical_training_of_a_hard_attention_model_samples_words_with_the_expected_context(
    tiny_prepared, tiny_features, tmp_path, monkeypatch
):
    from show_attend_tell import decoding

    run = make_trainer(tmp_path / "run", tiny_prepared, tiny_features, {"attention": "hard"}, self_critical=True)
    rollouts = []
    original = decoding.rollout

    def recorded(*args, **kwargs):
        rollouts.append(original(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(decoding, "rollout", recorded)
    stats = self_critical_step(run, run.data.train_rows[:3])
    assert math.isfinite(stats["loss"]) and stats["captions"] == 3 * run.config.scst_samples
    assert bool((rollouts[0].locations == -1).all())  # the policy decoding runs: no sampled location


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_once_words_training_samples_and_validates_without_repeated_words(
    tiny_prepared, tiny_features, tmp_path, monkeypatch, baseline
):
    from show_attend_tell import decoding, evaluate
    from show_attend_tell.text import FUNCTION_WORDS

    run = make_trainer(
        tmp_path / "run", tiny_prepared, tiny_features, self_critical=True, once_words=True, scst_baseline=baseline
    )
    onces = []
    rollout, decode = decoding.rollout, evaluate.decode

    def recorded(*args, once=None, **kwargs):
        onces.append(once)
        return rollout(*args, once=once, **kwargs)

    def decoded(*args, once=None, **kwargs):
        onces.append(once)
        return decode(*args, once=once, **kwargs)

    monkeypatch.setattr(decoding, "rollout", recorded)
    monkeypatch.setattr(evaluate, "decode", decoded)
    assert math.isfinite(self_critical_step(run, run.data.train_rows[:3])["loss"])
    validate(run)
    # the samples, the greedy baseline, the validation and its greedy decode (val_beam_size 1)
    assert len(onces) == (4 if baseline == "greedy" else 3)
    vocab = run.data.dataset.vocab
    for once in onces:
        assert [w for w, held in zip(vocab.words, once.tolist(), strict=True) if not held][4:] == [
            w for w in vocab.words[4:] if w in FUNCTION_WORDS
        ]
    # and without the setting, words may repeat as before
    onces.clear()
    plain = make_trainer(tmp_path / "plain", tiny_prepared, tiny_features, self_critical=True)
    self_critical_step(plain, plain.data.train_rows[:3])
    validate(plain)
    assert onces == [None, None, None]


RUN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from helpers import make_trainer
    from show_attend_tell import train
    from show_attend_tell.train import fit, resume_run
    run, prepared, features, mode = sys.argv[1:5]
    if mode == "resume":
        fit(resume_run(run, pretrained_encoder=False, java=False), progress=False)
    elif mode == "crash":
        step, steps = train.cross_entropy_step, []
        def dies_after(run, rows, **options):
            if len(steps) == int(sys.argv[5]):
                os.kill(os.getpid(), signal.SIGKILL)  # dies mid-epoch, after the last checkpoint
            steps.append(rows)
            return step(run, rows, **options)
        train.cross_entropy_step = dies_after
        fit(make_trainer(run, prepared, features), progress=False)
    else:
        fit(make_trainer(run, prepared, features), progress=False)
    """
)


def run_script(tmp_path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True)


@pytest.mark.slow  # three training processes
def test_killed_run_resumes_bit_identical(tiny_prepared, tiny_features, tmp_path):
    straight = run_script(tmp_path, tmp_path / "straight", tiny_prepared, tiny_features, "full")
    assert straight.returncode == 0, straight.stderr
    steps_per_epoch = json.loads((tmp_path / "straight" / "last" / "state.json").read_text())["global_step"] // 3
    crash_at = steps_per_epoch + 1 + 2  # mid-epoch 2, one step after a checkpoint (every 2 steps)
    crashed = run_script(tmp_path, tmp_path / "crashed", tiny_prepared, tiny_features, "crash", crash_at)
    assert crashed.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "crashed" / "last" / "state.json").read_text())
    assert state["global_step"] < crash_at and state["step_in_epoch"] > 0
    resumed = run_script(tmp_path, tmp_path / "crashed", tiny_prepared, tiny_features, "resume")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "straight" / "last" / "state.safetensors")
    b = load_file(tmp_path / "crashed" / "last" / "state.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the log holds no lines from the lost steps twice


@pytest.mark.parametrize("model", [{}, {"attention": "hard"}, tiny_transformer()], ids=["soft", "hard", "transformer"])
def test_bf16_autocast_trains_on_the_cpu_and_a_stopped_run_resumes_exactly(
    tiny_prepared, tiny_features, tmp_path, model
):
    """--precision bf16 runs the forward passes under CPU autocast, without loss scaling, through every decoder;
    a run stopped mid-way and resumed ends bit-identical to one that was not stopped."""
    straight = make_trainer(tmp_path / "straight", tiny_prepared, tiny_features, model, epochs=2, precision="bf16")
    assert straight.autocast_dtype == torch.bfloat16 and not straight.scaler.is_enabled()
    fit(straight, progress=False)
    records = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    stopped = make_trainer(tmp_path / "stopped", tiny_prepared, tiny_features, model, epochs=2, precision="bf16")
    fit(stopped, max_steps=3, progress=False)
    fit(resume_run(tmp_path / "stopped", pretrained_encoder=False, java=False), progress=False)
    a = load_file(tmp_path / "straight" / "last" / "state.safetensors")
    b = load_file(tmp_path / "stopped" / "last" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_fp16_training_is_refused_on_the_cpu(tiny_prepared, tiny_features, tmp_path):
    from show_attend_tell.errors import InputError

    with pytest.raises(InputError, match="--precision fp16 trains on CUDA only; on the CPU use bf16 or fp32"):
        make_trainer(tmp_path / "run", tiny_prepared, tiny_features, precision="fp16")


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), (set(), "fp32")])
def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16_and_recorded_in_the_run(
    tiny_prepared, tiny_features, tmp_path, monkeypatch, flags, expected
):
    """auto trains in bf16 where the CPU has it natively (the encoder's flag test) and in fp32 elsewhere, and the
    run's config.json says which, so that resuming it on another CPU keeps it."""
    monkeypatch.setattr(fast_encoder, "cpu_flags", lambda: frozenset(flags))
    if expected == "bf16" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: no CPU counts as having bf16")
    auto = make_trainer(tmp_path / "auto", tiny_prepared, tiny_features, precision="auto")
    assert auto.config.precision == expected and not auto.scaler.is_enabled()
    assert auto.autocast_dtype == {"bf16": torch.bfloat16, "fp32": None}[expected]
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["precision"] == expected
    assert training_precision("auto", "cuda", frozenset(flags)) == "fp16"  # with loss scaling, as before
    assert training_precision("fp32", "cpu", frozenset({"avx512_bf16"})) == "fp32"
    # self-critical training stays in fp32 on the CPU (the bf16 evidence is cross-entropy's), fp16 on CUDA
    scst = make_trainer(tmp_path / "scst", tiny_prepared, tiny_features, precision="auto", self_critical=True)
    assert scst.config.precision == "fp32" and scst.autocast_dtype is None
    assert training_precision("auto", "cpu", frozenset(flags), self_critical=True) == "fp32"
    assert training_precision("auto", "cuda", frozenset(flags), self_critical=True) == "fp16"
    assert training_precision("bf16", "cpu", frozenset(flags), self_critical=True) == "bf16"


def _saved_with_auto(train: dict) -> None:
    train["precision"] = "auto"  # runs used to save `auto` itself, which trained in fp32 on every CPU


def _saved_before_bucketing(train: dict) -> None:
    del train["bucket_by_length"]  # saved before the field existed, when every batch was random


@pytest.mark.parametrize(
    "edit, resumes_as",
    [(_saved_with_auto, {"precision": "fp32"}), (_saved_before_bucketing, {"bucket_by_length": False})],
    ids=["auto-precision", "no-bucketing-field"],
)
def test_a_run_saved_under_older_defaults_resumes_as_it_trained(
    tiny_prepared, tiny_features, tmp_path, monkeypatch, edit, resumes_as
):
    """A config saved before a default changed (`auto` then trained in fp32 on every CPU; batches were random)
    resumes as it trained, on a CPU with bf16 where auto now picks bf16, and ends bit-identical to a run that was
    not stopped."""
    straight = make_trainer(tmp_path / "straight", tiny_prepared, tiny_features, epochs=2)
    fit(straight, progress=False)
    stopped = make_trainer(tmp_path / "stopped", tiny_prepared, tiny_features, epochs=2)
    fit(stopped, max_steps=3, progress=False)
    config_path = tmp_path / "stopped" / "config.json"
    config = json.loads(config_path.read_text())
    edit(config["train"])
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(fast_encoder, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    resumed = resume_run(tmp_path / "stopped", pretrained_encoder=False, java=False)
    assert {key: getattr(resumed.config, key) for key in resumes_as} == resumes_as and resumed.autocast_dtype is None
    fit(resumed, progress=False)
    a = load_file(tmp_path / "straight" / "last" / "state.safetensors")
    b = load_file(tmp_path / "stopped" / "last" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_training_from_a_streamed_store_equals_training_from_memory(tiny_prepared, tiny_features, tmp_path):
    """Rows read from disk batch by batch (by loader processes, or in the loop) train exactly what the store
    held in memory trains, validation and the int8 calibration included."""
    states = {}
    for name, data in [
        ("memory", dict(feature_loading="memory")),
        ("stream", dict(feature_loading="stream", loader_workers=2)),
        ("stream_in_loop", dict(feature_loading="stream", loader_workers=0)),
    ]:
        trainer = make_trainer(tmp_path / name, tiny_prepared, tiny_features, data=data, epochs=2, self_critical=False)
        assert isinstance(trainer.data.features, FeatureStore) == (name != "memory")
        fit(trainer, progress=False)
        states[name] = load_file(tmp_path / name / "last" / "state.safetensors")
        assert (tmp_path / name / "best" / "int8.safetensors").is_file()
    for name in ("stream", "stream_in_loop"):
        assert states[name].keys() == states["memory"].keys()
        for key, value in states["memory"].items():
            assert torch.equal(states[name][key], value), (name, key)


def test_a_streamed_run_stopped_by_max_steps_resumes_exactly(tiny_prepared, tiny_features, tmp_path):
    stream = dict(feature_loading="stream", loader_workers=1)
    straight = make_trainer(tmp_path / "straight", tiny_prepared, tiny_features, data=stream, epochs=2)
    fit(straight, progress=False)
    stopped = make_trainer(tmp_path / "stopped", tiny_prepared, tiny_features, data=stream, epochs=2)
    assert fit(stopped, max_steps=straight.steps_per_epoch + 1, progress=False)["stopped"] == "max_steps"
    fit(resume_run(tmp_path / "stopped", pretrained_encoder=False, java=False), progress=False)
    a = load_file(tmp_path / "straight" / "last" / "state.safetensors")
    b = load_file(tmp_path / "stopped" / "last" / "state.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("block", [0, 1, 3, 7])
def test_every_training_image_is_seen_once_per_epoch(block):
    rows = [row for row in range(200) if row % 7]  # train rows with val/test rows between them
    orders = [epoch_order(rows, epoch, seed=4, block=block) for epoch in range(3)]
    for order in orders:
        assert sorted(order) == rows
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] == epoch_order(rows, 0, seed=4, block=block)  # seeded: a resumed run sees the same
    if block:  # the epoch is windows one after another, each the whole of a few blocks of consecutive rows
        seen, blocks = set(), set()
        for row in orders[1]:
            seen.add(row)
            blocks.add(rows.index(row) // block)
            assert len(blocks) <= SHUFFLE_WINDOW_BLOCKS
            if seen == {r for b in blocks for r in rows[b * block : (b + 1) * block]}:
                seen, blocks = set(), set()  # a window ends
        assert not seen
    caption_rows = {row: [row, row] for row in rows}
    batches = epoch_batches(rows, caption_rows, batch_size=10, epoch=2, seed=4, block=block)
    assert sorted(row for batch in batches for row in batch) == rows


@pytest.mark.parametrize("block", [0, 3])
def test_length_bucketed_batches_take_every_caption_once_with_captions_of_one_length_together(block):
    rows = [row for row in range(300) if row % 7]
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 6, (len(rows),), generator=generator).tolist()  # captions per image
    caption_rows, start = {}, 0
    for row, count in zip(rows, counts, strict=True):
        caption_rows[row], start = list(range(start, start + count)), start + count
    longest = dict(zip(rows, torch.randint(5, 25, (len(rows),), generator=generator).tolist(), strict=True))
    epochs = [epoch_batches(rows, caption_rows, 12, epoch, seed=4, block=block, longest=longest) for epoch in (0, 1)]
    pool = SHUFFLE_WINDOW_BLOCKS * block if block else len(rows)
    for batches in epochs:
        assert sorted(c for batch in batches for image in batch for c in caption_rows[image]) == list(range(start))
        short = [batch for batch in batches if sum(len(caption_rows[image]) for image in batch) < 12]
        assert len(short) <= -(-len(rows) // pool)  # what is left of each pool
    assert epochs[0] == epoch_batches(rows, caption_rows, 12, 0, seed=4, block=block, longest=longest)  # resumable
    assert epochs[0] != epochs[1]
    images_seen, spans = 0, []
    for batch in epochs[1]:  # within a pool, the batches' length ranges do not overlap: one sorted run, cut
        if images_seen % pool == 0 and images_seen:
            spans = []
        spans.append((min(longest[i] for i in batch), max(longest[i] for i in batch)))
        images_seen += len(batch)
        assert all(high <= low_ or high_ <= low for low, high in spans[:-1] for low_, high_ in spans[-1:])
    assert [low for low, _ in spans] != sorted(low for low, _ in spans)  # in a random order, not shortest first
    shuffled = epoch_batches(rows, caption_rows, 12, 1, seed=4, block=block)
    padded = {
        name: sum(max(longest[i] for i in b) * len(b) for b in bs)
        for name, bs in [("bucketed", epochs[1]), ("random", shuffled)]
    }
    assert padded["bucketed"] < 0.8 * padded["random"]


def test_cross_entropy_batches_are_bucketed_by_default_and_self_critical_ones_are_not():
    """Bucketing is the default for cross-entropy training (the scores held: results/train_bucketing_scores.json);
    self-critical steps take the random batches whatever the flag says."""
    rows = list(range(60))
    caption_rows = {row: [2 * row, 2 * row + 1] for row in rows}
    longest = {row: 5 + (row * 7) % 13 for row in rows}
    data = TrainingData(None, None, "", rows, caption_rows, longest)
    bucketed = epoch_batches(rows, caption_rows, 8, 3, seed=2, longest=longest)
    shuffled = epoch_batches(rows, caption_rows, 8, 3, seed=2)
    assert bucketed != shuffled
    assert data.batches(TrainConfig(batch_size=8, seed=2), 3) == bucketed
    assert data.batches(TrainConfig(batch_size=8, seed=2, bucket_by_length=False), 3) == shuffled
    assert data.batches(TrainConfig(batch_size=8, seed=2, self_critical=True), 3) == shuffled


@pytest.mark.parametrize("model", [{}, tiny_transformer()], ids=["lstm", "transformer"])
def test_a_length_bucketed_run_stopped_mid_epoch_resumes_exactly(tiny_prepared, tiny_features, tmp_path, model):
    """Bucketed batches (each padded to its own longest caption) train both decoders; a run stopped mid-way
    through its second epoch and resumed ends bit-identical to one that was not stopped."""
    straight = make_trainer(tmp_path / "straight", tiny_prepared, tiny_features, model, epochs=2, bucket_by_length=True)
    batches = batches_of_epoch(straight, 1)
    data = straight.data
    assert batches == epoch_batches(data.train_rows, data.caption_rows, 10, 1, seed=1, longest=data.longest)
    assert batches != epoch_batches(data.train_rows, data.caption_rows, 10, 1, seed=1)
    for batch in batches:
        tokens, lengths, _ = batch_captions(straight, batch)
        assert tokens.size(1) == max(data.longest[i] for i in batch) == int(lengths.max())
    fit(straight, progress=False)
    stopped = make_trainer(tmp_path / "stopped", tiny_prepared, tiny_features, model, epochs=2, bucket_by_length=True)
    assert fit(stopped, max_steps=straight.steps_per_epoch + 2, progress=False)["stopped"] == "max_steps"
    resumed = resume_run(tmp_path / "stopped", pretrained_encoder=False, java=False)
    assert resumed.config.bucket_by_length and resumed.progress.step_in_epoch == 2
    fit(resumed, progress=False)
    a = load_file(tmp_path / "straight" / "last" / "state.safetensors")
    b = load_file(tmp_path / "stopped" / "last" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("self_critical", [False, True])
def test_autocast_on_the_cpu_runs_both_objectives_in_low_precision(
    tiny_prepared, tiny_features, tmp_path, self_critical
):
    """The GPU path's autocast, with CPU standing in (bf16: CPU training refuses fp16): in cross-entropy and in
    self-critical steps the decoder's layers compute in bf16 and the loss stays finite and near fp32's."""
    precision = "bf16"
    losses = {}
    for name in ("fp32", precision):
        trainer = make_trainer(
            tmp_path / name, tiny_prepared, tiny_features, precision=name, self_critical=self_critical, decoder_lr=0.0
        )
        seen = []
        trainer.model.decoder.init_h[0].register_forward_hook(lambda m, i, output, seen=seen: seen.append(output.dtype))
        step = self_critical_step if self_critical else cross_entropy_step
        torch.manual_seed(0)
        losses[name] = step(trainer, trainer.data.train_rows[:4])["loss"]
        assert seen and set(seen) == {torch.float32 if name == "fp32" else torch.bfloat16}
    assert math.isfinite(losses[precision])
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.05, abs=0.05)


@pytest.mark.slow  # inductor compiles the step with the C++ compiler (about a minute on 2 cores)
def test_a_compiled_decoder_step_trains_as_the_plain_one(tiny_prepared, tiny_features, tmp_path):
    losses = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), tiny_prepared, tiny_features, compile=compiled)
        torch.manual_seed(0)
        losses[compiled] = [cross_entropy_step(trainer, trainer.data.train_rows[i : i + 4])["loss"] for i in (0, 4)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_prepared, tiny_features, tmp_path):
    trainer = make_trainer(tmp_path / "run", tiny_prepared, tiny_features)
    fit(trainer, max_steps=2, progress=False)
    save_state(trainer)
    good = load_file(tmp_path / "run" / "last" / "state.safetensors")
    with torch.no_grad():
        trainer.model.decoder.L_o.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        fit(trainer, progress=False)
    kept = load_file(tmp_path / "run" / "last" / "state.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_self_critical_training_raises_the_reward(tiny_prepared, tiny_features, tmp_path):
    warm = make_trainer(tmp_path / "xe", tiny_prepared, tiny_features, epochs=30, patience=30)
    fit(warm, progress=False)
    rewards = self_critical_rewards(tmp_path, tiny_prepared, tiny_features, epochs=6, decoder_lr=1e-3)
    assert rewards, "no training records logged"
    assert rewards[-1] >= rewards[0]


def logged(run_dir, kind: str) -> list[dict]:
    """The run's log.jsonl records of this kind ("train" or "val")."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


def self_critical_rewards(tmp_path, prepared, features, model: dict | None = None, **train) -> list[float]:
    """SCST in tmp_path/scst from tmp_path/xe/best (4 samples per image) -> the mean reward of each step."""
    options = dict(self_critical=True, init_from=str(tmp_path / "xe" / "best"), scst_samples=4, **train)
    fit(make_trainer(tmp_path / "scst", prepared, features, model=model, **options), progress=False)
    return [record["reward"] for record in logged(tmp_path / "scst", "train")]


def test_a_transformer_decoder_learns_and_trains_self_critically_through_the_same_code(
    tiny_prepared, tiny_features, tmp_path
):
    transformer = tiny_transformer(decoder_dim=16, transformer_feedforward_dim=32, dropout=0.1)
    warm = make_trainer(
        tmp_path / "xe", tiny_prepared, tiny_features, model=transformer, epochs=12, patience=12, decoder_lr=3e-3
    )
    fit(warm, progress=False)
    losses = [record["cross_entropy"] for record in logged(tmp_path / "xe", "train")]
    val = [record["CIDEr"] for record in logged(tmp_path / "xe", "val")]
    # five different captions per photo keep the cross-entropy well above 0 (about 1.7 here from 3.1)
    assert losses[-1] < 0.65 * losses[0] and max(val) > val[0] + 50
    model, _, config = load_model(tmp_path / "xe" / "best", with_encoder=False)
    assert config["model"]["decoder"] == "transformer" and type(model.decoder).__name__ == "TransformerDecoder"
    rewards = self_critical_rewards(
        tmp_path, tiny_prepared, tiny_features, model=transformer, epochs=2, decoder_lr=1e-4
    )
    assert len(rewards) == 2 * warm.steps_per_epoch and all(reward > 0 for reward in rewards)


def test_mixed_objective_adds_the_weighted_cross_entropy_of_the_references(tiny_prepared, tiny_features, tmp_path):
    from show_attend_tell.model import caption_loss

    losses = {}
    for weight in (0.0, 0.5):
        trainer = make_trainer(
            tmp_path / f"w{weight}", tiny_prepared, tiny_features, self_critical=True, scst_xe_weight=weight
        )
        rows = trainer.data.train_rows[:2]
        trainer.model.eval()
        with torch.no_grad():
            references, lengths, owners = batch_captions(trainer, rows)
            features = batch_features(trainer, rows, train=True)
            forced = trainer.model(features, references, lengths, owners)
            expected, _ = caption_loss(forced.log_probs, forced.alphas, references)
        torch.manual_seed(7)  # the same samples for both weights
        losses[weight] = self_critical_step(trainer, rows)["loss"]
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * float(expected), rel=1e-4)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import make_trainer
    from show_attend_tell.distributed import exit_worker
    from show_attend_tell.train import fit
    run, prepared, features = sys.argv[1:4]
    trainer = make_trainer(run, prepared, features, epochs=2, decoder_lr=3e-3)
    fit(trainer, progress=False)
    if trainer.world_size > 1:
        exit_worker()  # as `sat train` ends a torchrun worker
    """
)


@pytest.mark.slow  # torchrun
def test_ddp_on_two_gloo_processes_matches_one_process(tiny_prepared, tiny_features, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), tmp_path / "single", tiny_prepared, tiny_features], env=env, capture_output=True
    )
    assert single.returncode == 0, single.stderr.decode()[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.run(
        [*torchrun, str(script), tmp_path / "ddp", tiny_prepared, tiny_features], env=env, capture_output=True
    )
    assert ddp.returncode == 0, ddp.stderr.decode()[-20000:]
    a = load_file(tmp_path / "single" / "last" / "state.safetensors")
    b = load_file(tmp_path / "ddp" / "last" / "state.safetensors")
    for name in (k for k in a if k.startswith("model.")):
        # same global batch and loss normalisation: only the order of floating-point sums differs
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    log = {
        name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        for name in ("single", "ddp")
    }
    assert [r["step"] for r in log["single"]] == [r["step"] for r in log["ddp"]]  # only rank 0 logs
    for x, y in zip(log["single"], log["ddp"], strict=True):
        key = "CIDEr" if x["kind"] == "val" else "loss"
        assert x[key] == pytest.approx(y[key], abs=1e-4)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


GRADIENT_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, {tests!r})
    from helpers import STAGE_MODEL, load_script, make_trainer
    from show_attend_tell.distributed import exit_worker
    from show_attend_tell.train import cross_entropy_step, self_critical_step
    run, prepared, features, kind = sys.argv[1:5]
    model = {{**STAGE_MODEL, "attention": "hard"}} if kind.startswith("hard") else STAGE_MODEL
    trainer = make_trainer(run, prepared, features, model, self_critical=kind.endswith("scst"), decoder_lr=0.0,
                           encoder_lr=0.0)
    # hard attention: images 2-5, of which (seed 1, step 0) 4 and 5 sample their locations, 2 and 3 take the
    # expected context, so each rank holds one of each
    rows = trainer.data.train_rows[2:6] if kind.startswith("hard") else trainer.data.train_rows[:4]
    step = self_critical_step if kind.endswith("scst") else cross_entropy_step
    stats = step(trainer, rows)
    assert kind != "hard" or stats["sampled_captions"] == 10, stats
    grads = {{n: p.grad.contiguous() for n, p in trainer.model.named_parameters() if p.grad is not None}}
    if trainer.world_size > 1:
        for name, grad in grads.items():  # every rank must step with the same (averaged) gradient
            other = [torch.empty_like(grad) for _ in range(trainer.world_size)]
            dist.all_gather(other, grad)
            assert all(torch.equal(o, grad) for o in other), name
    if trainer.rank == 0:
        save_file(grads, run + ".grads.safetensors")
    if trainer.world_size > 1:
        exit_worker()
    """
)


@pytest.mark.slow  # torchrun
def test_ddp_averages_the_gradients_of_fine_tuned_blocks(tiny_prepared, tmp_path):
    """The tuned block runs on the cache beside the decoder; its gradients must be averaged over ranks too, in
    cross-entropy and in SCST steps (one mechanism for both: distributed.average_gradients). Hard attention too: each
    image's locations are drawn from its own seed, so two ranks draw what one process draws."""
    from show_attend_tell.features import extract_features
    from show_attend_tell.model import Encoder

    dataset = PreparedDataset.load(tiny_prepared)
    config = tiny_model_config(len(dataset.vocab), **STAGE_MODEL)
    stage = tmp_path / "stage"
    encoder = Encoder(config, pretrained=False)
    paths = [image.path for image in dataset.images]
    extract_features(paths, stage, config=config, encoder=encoder, encoder_sha256="untrained", stage="layer4.1")
    script = tmp_path / "grads.py"
    script.write_text(GRADIENT_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for kind in ("xe", "scst", "hard", "hard_scst"):
        ddp = subprocess.run(
            [*torchrun, str(script), f"{tmp_path}/ddp_{kind}", tiny_prepared, stage, kind], env=env, capture_output=True
        )
        assert ddp.returncode == 0, ddp.stderr.decode()[-5000:]
    for kind in ("xe", "hard"):
        single = subprocess.run(
            [sys.executable, str(script), f"{tmp_path}/single_{kind}", tiny_prepared, stage, kind],
            env=env,
            capture_output=True,
        )
        assert single.returncode == 0, single.stderr.decode()[-2000:]
        a = load_file(tmp_path / f"single_{kind}.grads.safetensors")
        b = load_file(tmp_path / f"ddp_{kind}.grads.safetensors")
        assert a.keys() == b.keys() and any(name.startswith("encoder.trunk.7.2.") for name in a)
        for name in a:  # the mean of the ranks' halves is the whole batch's gradient
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=f"{kind}: {name}")
    for kind in ("scst", "hard_scst"):
        assert any(k.startswith("encoder.") for k in load_file(tmp_path / f"ddp_{kind}.grads.safetensors"))


@pytest.mark.slow  # full ResNet-50 runs
def test_fine_tuning_the_last_block_on_a_cached_stage(tiny_prepared, tmp_path, fixed_encoder_weights, capsys):
    """`sat features --stage layer4.1` caches the input of layer4.2, which then trains on it; the checkpoint
    holds that block only, and scoring it from the cache or from the images gives the same captions."""
    from show_attend_tell.cli import main
    from show_attend_tell.errors import InputError
    from show_attend_tell.features import extract_features
    from show_attend_tell.model import Encoder

    dataset = PreparedDataset.load(tiny_prepared)
    config = tiny_model_config(len(dataset.vocab), encoder_dim=2048, grid_size=2, fine_tune_blocks=("layer4.2",))
    paths = [image.path for image in dataset.images]
    stage = tmp_path / "stage"
    frozen = Encoder(config)
    extract_features(paths, stage, config=config, encoder=frozen, encoder_sha256="untrained", stage="layer4.1")
    train = TrainConfig(epochs=2, batch_size=10, decoder_lr=1e-2, encoder_lr=1e-3, checkpoint_every_steps=2, seed=1)
    data = DataConfig(prepared=str(tiny_prepared), features=str(stage))
    trainer = new_run(tmp_path / "run", config, train, data, java=False)
    fit(trainer, progress=False)
    tuned, before = trainer.model.encoder.state_dict(), frozen.state_dict()
    changed = [k for k in tuned if not torch.equal(tuned[k], before[k])]
    assert changed and all(k.startswith("trunk.7.2.") for k in changed)  # only layer4.2 learned
    stored = [k for k in load_file(tmp_path / "run" / "best" / "model.safetensors") if k.startswith("encoder.")]
    assert stored and all(k.startswith("encoder.trunk.7.2.") for k in stored)
    model, _, _ = load_model(tmp_path / "run" / "best")
    best = {k: v for k, v in model.encoder.state_dict().items() if k.startswith("trunk.7.")}
    assert any(not torch.equal(v, before[k]) for k, v in best.items() if k.startswith("trunk.7.2."))
    assert all(torch.equal(v, before[k]) for k, v in best.items() if not k.startswith("trunk.7.2."))

    args = ["evaluate", str(tmp_path / "run" / "best"), "--data", str(tiny_prepared), "--split", "val", "--no-java"]
    assert main([*args, "--features", str(stage), "--beam", "2", "--out", str(tmp_path / "cache")]) == 0
    assert main([*args, "--beam", "2", "--out", str(tmp_path / "images")]) == 0
    captions = sorted(p.name for p in (tmp_path / "cache").glob("captions_*.json"))
    assert captions == sorted(p.name for p in (tmp_path / "images").glob("captions_*.json")) != []
    for name in captions:
        from_cache = json.loads((tmp_path / "cache" / name).read_text())
        assert from_cache and from_cache == json.loads((tmp_path / "images" / name).read_text())

    grid = tmp_path / "grid"
    extract_features(paths, grid, config=config, encoder=frozen, encoder_sha256="untrained")
    with pytest.raises(InputError, match="holds grid features"):  # nothing of the encoder left to tune
        new_run(tmp_path / "run2", config, train, DataConfig(str(tiny_prepared), str(grid)), java=False)
    assert main([*args, "--features", str(grid)]) == 2  # the pretrained grid is not this model's
    assert "fine-tuned layer4.2; give a store of an earlier block's output" in capsys.readouterr().err
    # a further run from this one starts from its tuned block, and must go on tuning it
    untuned = tiny_model_config(len(dataset.vocab), encoder_dim=2048, grid_size=2)
    again = TrainConfig(epochs=1, batch_size=10, init_from=str(tmp_path / "run" / "best"))
    with pytest.raises(InputError, match="fine-tune them here too"):
        new_run(tmp_path / "run4", untuned, again, DataConfig(str(tiny_prepared), str(grid)), java=False)
    follow = new_run(tmp_path / "run5", config, again, data, java=False)
    assert all(torch.equal(v, best[k]) for k, v in follow.model.encoder.state_dict().items() if k in best)
    late = tmp_path / "late"
    extract_features(paths, late, config=config, encoder=frozen, encoder_sha256="untrained", stage="layer4.2")
    with pytest.raises(InputError, match="fine-tuned block layer4.2 runs before the cached stage layer4.2"):
        new_run(tmp_path / "run3", config, train, DataConfig(str(tiny_prepared), str(late)), java=False)


@pytest.mark.slow  # `sat train` builds a full ResNet-50 several times
def test_cli_run_stopped_by_max_steps_saves_and_resumes_to_the_end(
    tiny_prepared, tiny_features, tmp_path, fixed_encoder_weights
):
    from show_attend_tell.cli import main

    run = tmp_path / "run"
    tiny = "--image-size 64 --encoder-dim 12 --feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8"
    flags = [
        *tiny.split(),
        "--grid-size",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--checkpoint-every-steps",
        "100",
    ]
    data = ["--data", str(tiny_prepared), "--features", str(tiny_features)]
    assert main(["train", *data, "--run-dir", str(run), *flags, "--max-steps", "3"]) == 0
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["global_step"] == 3  # saved at the stop, though the periodic checkpoint is every 100 steps
    assert main(["train", "--resume", str(run), "--max-steps", "3"]) == 0  # a total: already there
    assert json.loads((run / "last" / "state.json").read_text())["global_step"] == 3
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0
    assert json.loads((run / "last" / "state.json").read_text())["global_step"] == 4
    assert main(["train", "--resume", str(run)]) == 0
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] > 4


@pytest.mark.slow  # `sat train` builds a full ResNet-50 several times
def test_cli_shows_each_validation_and_says_how_to_resume_after_ctrl_c(
    tiny_prepared, tiny_features, tmp_path, fixed_encoder_weights, monkeypatch, capsys
):
    from show_attend_tell import train
    from show_attend_tell.cli import main

    run = tmp_path / "run"
    tiny = "--image-size 64 --encoder-dim 12 --feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8"
    flags = [*tiny.split(), "--grid-size", "2", "--batch-size", "10", "--checkpoint-every-steps", "2"]
    data = ["--data", str(tiny_prepared), "--features", str(tiny_features)]
    assert main(["train", *data, "--run-dir", str(run), *flags, "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if " val: " in line]
    assert len(lines) == 1 and "CIDEr" in lines[0] and "(best CIDEr" in lines[0], out
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = next(record for record in logged if record["kind"] == "val")
    assert f"CIDEr {val['CIDEr']:.1f} " in lines[0] and f"METEOR {val['METEOR']:.1f} " in lines[0]  # x100 once
    assert "validation beam=1" in err  # the validation's progress bar

    real_step, calls = train.cross_entropy_step, []

    def interrupted_at_the_fourth_step(run_, rows, **kwargs):
        calls.append(rows)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(run_, rows, **kwargs)

    monkeypatch.setattr(train, "cross_entropy_step", interrupted_at_the_fourth_step)
    assert main(["train", *data, "--run-dir", str(tmp_path / "stopped"), *flags, "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and f"{tmp_path / 'stopped' / 'last'} holds step 2" in err
    assert f"sat train --resume {tmp_path / 'stopped'}" in err
    assert json.loads((tmp_path / "stopped" / "last" / "state.json").read_text())["global_step"] == 2


# A run directory that cannot be written (issue 14): one line, at the start or when saving; the state is intact.


def test_a_read_only_run_directory_is_one_line_at_the_start(tiny_prepared, tiny_features, tmp_path, read_only):
    from show_attend_tell.errors import InputError

    run = tmp_path / "run"
    run.mkdir()
    read_only(run)
    with pytest.raises(InputError, match="cannot write .*Permission denied.*must be writable"):
        make_trainer(run, tiny_prepared, tiny_features)
    assert list(run.iterdir()) == []


def test_a_run_directory_that_turns_read_only_keeps_its_last_state(tiny_prepared, tiny_features, tmp_path, read_only):
    from show_attend_tell.errors import InputError

    run = tmp_path / "run"
    trainer = make_trainer(run, tiny_prepared, tiny_features, checkpoint_every_steps=100)
    fit(trainer, max_steps=2, progress=False)  # saves its state where it stops
    saved = {path.name: path.read_bytes() for path in (run / "last").iterdir()}
    read_only(run)
    with pytest.raises(InputError, match="cannot write .*the run directory .* must be writable. Its last saved state"):
        fit(trainer, progress=False)  # mid-run: the first checkpoint or validation it writes fails
    assert {path.name: path.read_bytes() for path in (run / "last").iterdir()} == saved
    with pytest.raises(InputError, match="must be writable"):
        resume_run(run, pretrained_encoder=False, java=False)


def test_sat_train_on_a_read_only_run_directory_prints_one_line(
    tiny_prepared, tiny_features, tmp_path, read_only, capsys, fixed_encoder_weights
):
    from show_attend_tell.cli import main

    run = tmp_path / "run"
    run.mkdir()
    read_only(run)
    tiny = "--image-size 64 --encoder-dim 12 --feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8"
    data = ["--data", str(tiny_prepared), "--features", str(tiny_features), "--run-dir", str(run)]
    assert main(["train", *data, *tiny.split(), "--grid-size", "2", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sat train: error: ") and err.count("\n") == 1 and "must be writable" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "train.batch_size (--batch-size) must be at least 1, got 0"),
        (["--epochs", "-1"], "train.epochs (--epochs) must be at least 1, got -1"),
        (["--decoder-lr", "nan"], "train.decoder_lr (--decoder-lr) must be positive, got nan"),
        (["--scst-samples", "1"], "train.scst_samples (--scst-samples) must be at least 2"),
        (["--grid-size", "0"], "model.grid_size must be a whole number from 1 to 64, got 0"),
        (["--decoder", "transformer", "--transformer-heads", "3"], "decoder_dim (512) must be a multiple of"),
        (
            ["--decoder", "transformer", "--transformer-max-positions", "12"],
            "--transformer-max-positions 12 is too few: the training captions and --max-caption-length 20 need 20",
        ),
    ],
)
def test_sat_train_refuses_flags_that_would_train_silently_wrong(tiny_prepared, tmp_path, capsys, flags, message):
    from show_attend_tell.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_prepared), "--run-dir", str(run), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


def test_resume_refuses_a_hand_edited_run_config(tiny_prepared, tiny_features, tmp_path):
    from show_attend_tell.errors import InputError

    run = tmp_path / "run"
    trainer = make_trainer(run, tiny_prepared, tiny_features)
    save_state(trainer)
    config = json.loads((run / "config.json").read_text())
    config["train"]["batch_size"] = "10"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"train.batch_size \(--batch-size\) must be of type int, got '10'"):
        resume_run(run, pretrained_encoder=False, java=False)
    config["train"]["batch_size"], config["model"]["grid_size"] = 10, [2]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="model.grid_size must be a whole number"):
        resume_run(run, pretrained_encoder=False, java=False)


def test_a_second_run_in_a_run_directory_being_written_is_refused(tiny_prepared, tiny_features, tmp_path):
    import os

    from show_attend_tell.errors import InputError

    first = make_trainer(tmp_path / "run", tiny_prepared, tiny_features)  # holds the directory until fit ends
    config = (tmp_path / "run" / "config.json").read_bytes()
    refusal = f"run is being written by another process \\(pid {os.getpid()}\\); wait for it to end"
    with pytest.raises(InputError, match=refusal):
        make_trainer(tmp_path / "run", tiny_prepared, tiny_features, epochs=1)
    save_state(first)  # a resumable state, as the first checkpoint leaves
    with pytest.raises(InputError, match=refusal):
        resume_run(tmp_path / "run", pretrained_encoder=False, java=False)
    assert (tmp_path / "run" / "config.json").read_bytes() == config
    fit(first, max_steps=2, progress=False)
    fit(resume_run(tmp_path / "run", pretrained_encoder=False, java=False), max_steps=3, progress=False)


def test_sat_train_refuses_a_run_directory_another_process_writes(tiny_prepared, tmp_path, capsys):
    import subprocess
    import sys

    from show_attend_tell.cli import main

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time; f = open({str(run / '.lock')!r}, 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["train", "--data", str(tiny_prepared), "--run-dir", str(run), "--max-steps", "1"]) == 2
    finally:
        holder.communicate("")
    err = capsys.readouterr().err
    assert err == f"sat train: error: {run} is being written by another process (pid {holder.pid}); wait for it to " \
        "end, or use another --run-dir\n"  # fmt: skip
    assert sorted(path.name for path in run.iterdir()) == [".lock"]


def test_a_store_holding_nan_is_named_as_the_cause_not_the_learning_rate(tiny_prepared, tiny_features, tmp_path):
    import shutil

    import numpy as np

    from show_attend_tell.errors import InputError

    store = tmp_path / "store"
    shutil.copytree(tiny_features, store)
    features = np.load(store / "features.npy", mmap_mode="r+")
    features[:] = np.nan
    features.flush()
    del features
    trainer = make_trainer(tmp_path / "run", tiny_prepared, store)
    with pytest.raises(InputError, match=f"{store}: the features of 2 image\\(s\\) of step 0 are not finite") as error:
        fit(trainer, progress=False)
    assert "last" not in str(error.value) and "--overwrite" in str(error.value)
    with pytest.raises(NonFiniteLossError, match="at step 0 \\(epoch 0\\); nothing was saved yet. Lower --decoder-lr"):
        _optimise(trainer, torch.tensor(float("nan")))


def test_the_train_speed_benchmark_takes_a_448_px_stores_settings(tmp_path, monkeypatch):
    """benchmarks/train_speed.py on a `sat features --image-size 448` store trains the 14x14 model the store fits
    (as `sat train --features` does), each batching on its own epoch, and reports the padding it measured."""
    import argparse

    bench = load_script("benchmarks/train_speed.py", monkeypatch)
    prepared = bench.synthetic_dataset(tmp_path / "data", images=6, vocab_size=40, mean_words=6)
    config = ModelConfig(vocab_size=len(PreparedDataset.load(prepared).vocab), image_size=448, grid_size=14)
    store = bench.synthetic_features(prepared, tmp_path / "store", config)
    args = argparse.Namespace(
        data=str(prepared),
        features=str(store),
        random_features=False,
        image_size=None,
        limit=0,
        sources=["features"],
        batch_captions=[10],
        precisions=["auto"],
        decoders=["lstm"],
        batching=["random", "length"],
        phases=False,
        profile=0,
        repeats=0,
        warmup=0,
    )
    record = bench.measure(args, tmp_path / "work")
    model = record["parameters"]["model"]
    assert (model["image_size"], model["grid_size"]) == (448, 14)
    results = record["results"]
    assert set(results) == {"features_random_batch_10", "features_length_batch_10"}
    assert all(result["batches"] == 3 and 0 < result["words_over_slots"] <= 1 for result in results.values())
    assert "features_length_batch_10: length_over_random" in record["ratios"]
    args.image_size = 224
    with pytest.raises(SystemExit, match="--image-size is the --features store's"):
        bench.measure(args, tmp_path / "again")
    args.image_size, args.profile, args.batching = None, 2, ["random"]
    profile = bench.measure(args, tmp_path / "profiled")["profile"]["features_batch_10"]
    assert profile["steps"] == 2 and sum(profile["phases"].values()) == pytest.approx(1, abs=1e-3)
    assert profile["phases"]["backward"] > 0 and {"soft_step", "L_o"} <= set(profile["forward_modules"])
    args.limit = 2  # the store holds every image: refused in one line naming it, not a traceback
    with pytest.raises(SystemExit, match=r"train_speed.py: error: .*features.json: shape is .* --limit"):
        bench.measure(args, tmp_path / "limited")


def test_self_critical_options_cut_samples_choose_the_baseline_and_the_cider_corpus(
    tiny_prepared, tiny_features, tmp_path, monkeypatch
):
    import show_attend_tell.scst as scst
    from show_attend_tell.text import tokenize

    def step(name: str, **options) -> dict:
        trainer = make_trainer(tmp_path / name, tiny_prepared, tiny_features, self_critical=True, **options)
        torch.manual_seed(3)  # the same samples for every option
        return self_critical_step(trainer, trainer.data.train_rows[:3])

    plain = step("plain", decoder_lr=1e-9)
    assert plain["sample_length"] > 2 and plain["sample_entropy"] > 0 and "greedy_reward" not in plain
    assert step("short", scst_max_length=2)["sample_length"] <= 2  # at most 2 tokens, <end> included
    greedy = step("greedy", scst_baseline="greedy", decoder_lr=1e-9)
    assert greedy["reward"] == pytest.approx(plain["reward"]) and greedy["greedy_reward"] >= 0
    assert greedy["loss"] != pytest.approx(plain["loss"])  # another baseline, another advantage
    corpora = []

    class Recording(scst.CiderD):
        def __init__(self, references):
            corpora.append(references)
            super().__init__(references)

    monkeypatch.setattr(scst, "CiderD", Recording)
    trainer = make_trainer(
        tmp_path / "batch", tiny_prepared, tiny_features, self_critical=True, scst_document_frequency="batch"
    )
    rows = trainer.data.train_rows[:3]
    self_critical_step(trainer, rows)
    images = trainer.data.dataset.images
    assert corpora == [[[tokenize(c) for c in images[row].captions] for row in rows]]


def test_val_at_start_scores_the_starting_weights_once_and_keeps_them_as_best(tiny_prepared, tiny_features, tmp_path):
    trainer = make_trainer(tmp_path / "run", tiny_prepared, tiny_features, val_at_start=True, decoder_lr=1e-9)
    fit(trainer, max_steps=1, progress=False)
    first = logged(tmp_path / "run", "val")
    assert [record["step"] for record in first] == [0]
    assert {"CIDEr", "distinct_captions", "vocabulary", "mean_length"} <= set(first[0])
    assert json.loads((tmp_path / "run" / "best" / "config.json").read_text())["step"] == 0
    fit(
        resume_run(tmp_path / "run", pretrained_encoder=False, java=False), max_steps=2, progress=False
    )  # resumed: not validated again
    assert [record["step"] for record in logged(tmp_path / "run", "val")] == [0]
