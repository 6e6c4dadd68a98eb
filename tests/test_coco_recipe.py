"""recipes/coco2014.sh end to end on a COCO-format miniature: the official caption files, the train2014/ and
val2014/ folders and Karpathy's split lists, through two torchrun processes, to the test split's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
TEMPLATES = ["a {} square", "a big {} box", "{} color everywhere", "a {} picture", "the {} square on a table"]


def coco_miniature(root: Path) -> dict[str, list[str]]:
    """COCO 2014 in miniature, laid out as the COCO site's zips unpack: 12 train2014 and 11 val2014 photos with
    5 captions each in annotations/captions_{train,val}2014.json, and Karpathy-style split lists (train holds
    train2014 and 2 "restval" val2014 photos; val and test 4 val2014 photos each). One val2014 photo is in no
    list, as COCO photos outside Karpathy's split are. Returns the file names by split."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": [], "none": []}
    (root / "annotations").mkdir(parents=True)
    image_id = 0
    for subset, count in (("train2014", 12), ("val2014", 11)):
        (root / subset).mkdir()
        images, annotations = [], []
        for n in range(count):
            image_id += 1
            name = f"COCO_{subset}_{image_id:012d}.jpg"
            colour = list(COLOURS)[image_id % len(COLOURS)]
            shade = tuple(max(0, c - 8 * n) for c in COLOURS[colour])
            Image.new("RGB", (48, 40), shade).save(root / subset / name)
            images.append({"id": image_id, "file_name": name, "width": 48, "height": 40})
            for template in TEMPLATES:
                annotations.append({"id": len(annotations), "image_id": image_id, "caption": template.format(colour)})
            split = "train" if subset == "train2014" or n < 2 else ("val" if n < 6 else "test" if n < 10 else "none")
            splits[split].append(f"{subset}/{name} {image_id}")
        document = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
        (root / "annotations" / f"captions_{subset}.json").write_text(json.dumps(document))
    for split in ("train", "val", "test"):
        (root / f"karpathy_{split}_images.txt").write_text("\n".join(splits[split]) + "\n")
    return splits


@pytest.mark.slow  # ResNet-50 over 22 photos, two torchrun launches of training, Java scoring
def test_the_coco_recipe_runs_every_stage_on_a_miniature_through_torchrun(tmp_path):
    from show_attend_tell.features import open_store
    from show_attend_tell.weights import fetch_resnet50

    fetch_resnet50()  # the encoder here: ResNet-101's published file cannot be on this machine (no model hub)
    splits = coco_miniature(tmp_path / "coco")
    sat = f"{sys.executable} -m show_attend_tell.cli"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "SAT": sat,
        "LAUNCH": f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 -m show_attend_tell.cli",
        "ENCODER": "resnet50",
        "IMAGE_SIZE": "64",
        "XE_EPOCHS": "2",
        "SCST_EPOCHS": "1",
        "BATCH_SIZE": "20",
        "SCST_BATCH_SIZE": "20",
        "FEATURE_BATCH": "4",
    }
    work = tmp_path / "work"
    command = ["bash", str(REPO / "recipes" / "coco2014.sh"), str(tmp_path / "coco"), str(work)]
    ran = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-5000:]
    stages = [line.split()[0] for line in (work / "stage_seconds.txt").read_text().splitlines()]
    assert stages == ["prepare", "features", "train_xe", "train_scst", "evaluate", "evaluate_xe"]
    report = json.loads((work / "prepared" / "report.json").read_text())
    assert report["images"] == {split: len(splits[split]) for split in ("train", "val", "test")}
    assert report["skipped"]["image in no split list"]["count"] == 1
    store = open_store(work / "features")
    assert len(store.shards) == 2 and store.done.all()  # one shard per rank
    assert json.loads((work / "scst" / "config.json").read_text())["world_size"] == 2
    metrics = json.loads((work / "test" / "metrics.json").read_text())["results"]
    assert set(metrics) == {"beam3", "beam7"} and metrics["beam3"]["n_images"] == len(splits["test"])
    assert "CIDEr" in metrics["beam7"] and (work / "test_xe" / "metrics.json").is_file()

    # run again: every stage finds its work done (the store complete, both runs at their end) and resumes
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-5000:]
    assert '"computed": 0' in again.stdout
    for run in ("xe", "scst"):
        state = json.loads((work / run / "last" / "state.json").read_text())
        assert state["epoch"] == (2 if run == "xe" else 1)


def test_the_coco_recipe_names_a_missing_file(tmp_path):
    (tmp_path / "coco").mkdir()
    ran = subprocess.run(
        ["bash", str(REPO / "recipes" / "coco2014.sh"), str(tmp_path / "coco"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 2
    assert f"{tmp_path / 'coco'}/annotations/captions_train2014.json is missing" in ran.stderr
