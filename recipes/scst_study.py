"""Gather a self-critical study's runs into a record and a figure (issue 30).

    python recipes/scst_study.py RUNS_DIR OUT_DIR --command "..." [--start-from NAME]

RUNS_DIR holds one `sat train --self-critical` run directory per setting (each with log.jsonl and config.json;
NAME.time beside it, if there, is `/usr/bin/time -f "%e %U %S"`'s wall, user and system seconds). Writes
OUT_DIR/study.json: per run its settings, every validation (the metrics at the run's validation beam and
scst.caption_stats: distinct captions, vocabulary, length, repeated and dangling words, the most common caption's
share), the training curve between validations (mean reward, sampled length, sampling entropy), the best
validation, captions/s and the CPU time; and OUT_DIR/curves.png: reward, val CIDEr, val caption length and sampling
entropy against the step, one line per run. A run without a validation at step 0 is drawn from the start
validation of the run named by --start-from (all runs start from the same weights).

--captions NAME=FILE (repeatable; `sat evaluate`'s captions_<split>_beam<k>.json) adds, per model, the caption
statistics, its most common captions with their counts and its captions with a repeated or dangling word; with
two or more, the first photos whose captions differ between the first and each other (what reward hacking looks
like, in examples).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from show_attend_tell.records import provenance, write_record

SETTINGS = (
    "decoder_lr",
    "lr_schedule",
    "epochs",
    "batch_size",
    "captions_per_image",
    "scst_samples",
    "scst_baseline",
    "scst_max_length",
    "scst_document_frequency",
    "scst_xe_weight",
    "once_words",
    "max_caption_length",
    "val_beam_size",
    "precision",
    "init_from",
)
METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
STATS = ("distinct_captions", "vocabulary", "mean_length", "repeated_words", "dangling_endings", "most_common_caption")
TRAIN = ("reward", "sample_length", "sample_entropy", "greedy_reward")


def read_run(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    settings = {**config["train"], **config["data"]}
    records = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    validations = [
        {"step": r["step"], **{k: round(r[k], 2) for k in METRICS + STATS if k in r}}
        for r in records
        if r["kind"] == "val"
    ]
    # the training curve: the logged steps' means between one validation and the next
    curve, edges = [], [v["step"] for v in validations if v["step"] > 0]
    low = 0
    for high in edges + ([train[-1]["step"]] if train and (not edges or train[-1]["step"] > edges[-1]) else []):
        window = [r for r in train if low < r["step"] <= high]
        if window:
            point = {"steps": [low + 1, high]}
            for key in TRAIN:
                values = [r[key] for r in window if key in r]
                if values:
                    point[key] = round(statistics.fmean(values), 4)
            curve.append(point)
        low = high
    run = {
        "settings": {k: settings[k] for k in SETTINGS if k in settings},
        "steps": train[-1]["step"] if train else 0,
        "validations": validations,
        "train_curve": curve,
    }
    if train:
        run["captions_per_second"] = round(train[-1]["captions_per_second"], 1)  # the last epoch's running mean
    if validations:
        best = max(validations, key=lambda v: v["CIDEr"])
        run["best"] = best
    timing = directory.parent / f"{directory.name}.time"
    times = timing.read_text().split()[-3:] if timing.is_file() else []
    if len(times) == 3:  # written when the run ended (empty while it runs)
        wall, user, system = (float(x) for x in times)
        run["wall_seconds"], run["cpu_seconds"] = round(wall), round(user + system)
    return run


def caption_examples(files: list[str]) -> dict:
    """Per NAME=FILE: caption_stats, the 5 most common captions, examples of repeated and dangling words; then the
    first 12 photos whose captions differ from the first model's."""
    from collections import Counter

    from show_attend_tell.scst import caption_stats, ends_dangling, repeats_a_word

    captions: dict[str, dict[str, str]] = {}
    for item in files:
        name, _, path = item.partition("=")
        captions[name] = {r["image_id"]: r["caption"] for r in json.loads(Path(path).read_text())}
    models = {}
    for name, by_photo in captions.items():
        texts = list(by_photo.values())
        models[name] = {
            **{k: round(v, 2) for k, v in caption_stats(texts).items()},
            "most_common": Counter(texts).most_common(5),
            "repeated_word_examples": [t for t in texts if repeats_a_word(t.split())][:5],
            "dangling_examples": [t for t in texts if ends_dangling(t.split())][:5],
        }
    names = list(captions)
    differ = {}
    for other in names[1:]:
        photos = [p for p in captions[names[0]] if captions[other].get(p) not in (None, captions[names[0]][p])]
        differ[f"{names[0]} -> {other}"] = {
            "photos_changed": len(photos),
            "examples": [{"photo": p, names[0]: captions[names[0]][p], other: captions[other][p]} for p in photos[:12]],
        }
    return {"models": models, "changed": differ}


def draw(runs: dict[str, dict], start: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = (
        (axes[0][0], "train reward (CIDEr-D of the samples)", "train", "reward"),
        (axes[0][1], "val CIDEr at the validation beam", "val", "CIDEr"),
        (axes[1][0], "val caption length (words)", "val", "mean_length"),
        (axes[1][1], "sampling entropy (nats per word)", "train", "sample_entropy"),
    )
    for axis, title, kind, key in panels:
        for name, run in runs.items():
            if kind == "val":
                points = run["validations"]
                if start is not None and (not points or points[0]["step"] > 0):
                    points = [start, *points]
                xs, ys = [p["step"] for p in points if key in p], [p[key] for p in points if key in p]
            else:
                xs = [p["steps"][1] for p in run["train_curve"] if key in p]
                ys = [p[key] for p in run["train_curve"] if key in p]
            axis.plot(xs, ys, marker="o", markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step (100 samples of 20 photos per step unless set otherwise)")
        axis.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--command", required=True, help="the command(s) that made the runs, for the record")
    parser.add_argument("--start-from", default="", help="the run whose step-0 validation the others share")
    parser.add_argument("--captions", action="append", default=[], help="NAME=captions file of `sat evaluate`")
    args = parser.parse_args()
    runs = {
        d.name: read_run(d)
        for d in sorted(args.runs_dir.iterdir())
        if (d / "log.jsonl").is_file() and (d / "config.json").is_file()
    }
    if not runs:
        raise SystemExit(f"{args.runs_dir}: no run directories (with log.jsonl and config.json) in it")
    start = None
    if args.start_from:
        first = runs[args.start_from]["validations"]
        start = first[0] if first and first[0]["step"] == 0 else None
    record = {
        "what": "self-critical training (CIDEr-D reward) from the same cross-entropy weights, one run per setting",
        **provenance(args.command),
        "start": start,
        "runs": runs,
    }
    if args.captions:
        record["captions"] = caption_examples(args.captions)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_record(record, args.out_dir / "study.json")
    draw(runs, start, args.out_dir / "curves.png")
    print(f"wrote {args.out_dir / 'study.json'} and {args.out_dir / 'curves.png'}")


if __name__ == "__main__":
    main()
