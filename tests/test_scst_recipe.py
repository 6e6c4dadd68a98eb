"""recipes/flickr8k_scst.sh end to end on the tiny dataset: from a cross-entropy start, a main self-critical run
stopped midway and continued from its checkpoint, the study's sweep, export, evaluation, the gathered record and
its figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

TINY = "--feature-dim 10 --attention-dim 16 --decoder-dim 16 --embed-dim 8 --log-every-steps 1"
SWEEP = ["main4", "lr5e-5", "lr5e-6", "greedy", "xe0.2", "maxlen12", "dfbatch", "samples10", "combo", "lr1e-5"]


def script(path, first_line: str):
    """An executable `sat` for the recipe (one word, as $SAT is used): `first_line`, then the CLI of this Python."""
    path.write_text(f'#!/usr/bin/env bash\n{first_line}\nexec {sys.executable} -m show_attend_tell.cli "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.slow  # ResNet-50 over 12 photos, nine training runs, Java scoring
def test_the_scst_recipe_continues_a_stopped_run_and_records_the_study(tiny_prepared, tmp_path):
    from show_attend_tell.weights import fetch_resnet50

    fetch_resnet50()
    sat = [sys.executable, "-m", "show_attend_tell.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    store, start = tmp_path / "store", tmp_path / "xe"

    def call(*args: str) -> None:
        ran = subprocess.run([*sat, *args], env=env, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr[-3000:]

    call("features", "--data", str(tiny_prepared), "--out", str(store), "--image-size", "64", "--grid-size", "2")
    call(
        "train",
        "--data",
        str(tiny_prepared),
        "--features",
        str(store),
        *TINY.split(),
        "--batch-size",
        "10",
        "--run-dir",
        str(start),
        "--epochs",
        "3",
        "--decoder-lr",
        "1e-2",
    )
    work, out = tmp_path / "work", tmp_path / "record"
    recipe_env = {
        **env,
        "SAT": str(script(tmp_path / "sat", "")),
        "PYTHON": sys.executable,
        "PREPARED": str(tiny_prepared),
        "FEATURES": str(store),
        "INIT": str(start / "best"),
        "EPOCHS": "2",
        "STUDY_EPOCHS": "2",
        "BATCH": "10",
        "LOG_EVERY": "1",
        "OUT": str(out),
    }
    command = ["bash", str(REPO / "recipes" / "flickr8k_scst.sh"), "unused", str(work)]
    # a first attempt whose training stops after 3 steps (a new run's `sat train` gets --max-steps 3), as if killed
    stopping = script(
        tmp_path / "stopping-sat", 'if [ "$1" = train ] && [ "$2" != --resume ]; then set -- "$@" --max-steps 3; fi'
    )
    first = subprocess.run(command, env={**recipe_env, "SAT": str(stopping)}, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-5000:]
    state = work / "runs" / "main" / "last" / "state.json"
    assert json.loads(state.read_text())["global_step"] == 3
    (work / "stage_seconds.txt").write_text("")  # killed before the main stage ended: nothing recorded as done
    for made in ("model", "val", "val_start", "test"):
        subprocess.run(["rm", "-rf", str(work / made)], check=True)

    ran = subprocess.run(command, env={**recipe_env, "STUDY": "1"}, cwd=REPO, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-5000:]
    stages = [line.split()[0] for line in (work / "stage_seconds.txt").read_text().splitlines()]
    assert stages == ["main", *SWEEP, "export", "evaluate_val", "evaluate_val_start", "evaluate_test"]
    log = [json.loads(line) for line in (work / "runs" / "main" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 9))  # 1-3, then 4-8 resumed
    assert [r["step"] for r in log if r["kind"] == "val"] == [0]  # the start validated once, not again
    record = json.loads((out / "study.json").read_text())
    assert set(record["runs"]) == {"main", *SWEEP} and (out / "curves.png").stat().st_size > 10_000
    main = record["runs"]["main"]
    assert main["steps"] == 8 and record["start"] == main["validations"][0]  # 8 photos x 5 captions / 10, 2 epochs
    assert {"reward", "sample_length", "sample_entropy"} <= set(main["train_curve"][0])
    assert "greedy_reward" in record["runs"]["greedy"]["train_curve"][0]
    assert record["runs"]["samples10"]["settings"]["scst_samples"] == 10
    assert main["settings"]["scst_samples"] == 10 and main["settings"]["once_words"]  # the shipped run's settings
    assert (
        record["runs"]["main4"]["settings"]["scst_samples"] == 5
        and not record["runs"]["main4"]["settings"]["once_words"]
    )
    assert {"CIDEr", "distinct_captions", "vocabulary"} <= set(main["best"])
    assert json.loads((work / "test" / "metrics.json").read_text())["results"]["beam7"]["n_images"] == 2
    exported = json.loads((work / "model" / "config.json").read_text())
    assert exported["exported_from"] == [str(work / "runs" / "main" / "best")] * 3 + [str(start / "best")] * 2  # 3:2
    calibration = exported["int8_calibration"]
    assert calibration["check"]["split"] == "val" and isinstance(calibration["default"], bool)  # checked on val
    compared = record["captions"]
    assert set(compared["models"]) == {"start", "scst"} and "start -> scst" in compared["changed"]
    assert sum(count for _, count in compared["models"]["scst"]["most_common"]) <= 2  # 2 val photos
