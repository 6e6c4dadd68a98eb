"""Choose how the COCO detector guides captions, on coco-dev and Flickr8k val together.

    python recipes/tune_detector.py --coco-dev ../shared/data/coco-dev --flickr8k ../shared/data/flickr8k \
        --cache work/detector --out results/detector_tuning/round4.json

The product as it runs with the detector (`Captioner.load(detector="centernet")`: its default encoder precision
and decoder, the CenterNet detector, label guidance and templates) sees each photo once: grid features, ImageNet
class probabilities and detections down to the lowest presence threshold are cached in --cache. Then
guidance.Guidance's detector settings are tuned one at a time (coordinate descent, --passes times over SETTINGS or
--only, starting from the defaults in config.py), each setting decoded at the default beam through the same plan
and search as `sat caption` (guidance.search), a photo decoded again only when its plan changed. Every setting
tried is scored: BLEU-4, METEOR, ROUGE-L, CIDEr on both sets, and on coco-dev (whose COCO object annotations say
what is there) CHAIR-i, CHAIR-s, the share of photos without people captioned with people, and how many captions of
photos with two or more people count them right (chair.count_agreement). The record's "counts" says how often the
detector's people, counted at each count_threshold, fall in the annotations' bucket (none, one, two, three or more),
with and without suppressing boxes that overlap a better one.

The rule: among settings that keep Flickr8k val CIDEr and METEOR within VAL_TOLERANCE of the detector off, those
that meet the hallucination targets (CHAIR-s <= 25, people in at most 15% of empty photos) if any, and of those the
largest coco-dev CIDEr. coco-dev figures at the chosen setting are then in-sample; other COCO photos judge it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from show_attend_tell.captioner import Captioner
from show_attend_tell.chair import chair, coco_objects, count_agreement, people_counts, people_without_people
from show_attend_tell.config import DEFAULT_BEAM_SIZE, DEFAULT_LENGTH_PENALTY
from show_attend_tell.datasets import coco_folder, read_flickr8k
from show_attend_tell.detector import Detection
from show_attend_tell.guidance import Guidance, search
from show_attend_tell.images import load_image
from show_attend_tell.inference import image_features
from show_attend_tell.metrics import score_captions
from show_attend_tell.records import provenance, write_record

# Each setting's candidates, tried in this order; None: the detector names nothing (it still discourages).
SETTINGS = {
    "person_penalty": [0.0, 1.0, 2.0, 4.0, 8.0, 12.0],
    "object_penalty": [0.0, 0.5, 1.0, 2.0, 4.0],
    "person_presence_threshold": [0.15, 0.2, 0.3],
    "presence_threshold": [0.15, 0.2, 0.3],
    "detection_threshold": [0.3, 0.4, 0.5, 0.6, None],
    "count_threshold": [0.25, 0.3, 0.35, 0.4, None],
    "least_count": [2, 3],
}
LOWEST_SCORE = min(SETTINGS["presence_threshold"] + SETTINGS["person_presence_threshold"])
VAL_TOLERANCE = 0.3  # CIDEr and METEOR points val may lose (the issue's bound on Flickr8k test)
CHAIR_S_TARGET, PEOPLE_TARGET = 25.0, 15.0
METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def seen(captioner: Captioner, paths: list[Path], cache: Path, batch_size: int = 8) -> dict:
    """Features (fp16), class probabilities and detections of `paths` at the product's defaults, cached. A cache
    whose detections another detector setting made (name, precision, input size) keeps its features and has its
    detections made again."""
    detector = captioner.detector
    made_by = f"{detector.name} {detector.precision} {getattr(detector, 'size', '')}".strip()
    stored = torch.load(cache, weights_only=False) if cache.is_file() else {}
    if stored.get("paths") == [str(p) for p in paths]:
        if stored.get("detector") == made_by:
            return stored
    else:
        stored = {}
    features, probabilities, detections = [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=f"see {cache.stem}"):
        pictures = [load_image(path, size=captioner.image_size) for path in paths[start : start + batch_size]]
        if not stored:
            with torch.no_grad():
                grid = image_features(captioner.model.encoder, pictures, captioner.model.config)
                probabilities.append(captioner.labels(grid))
            features.append(grid.half())
        found = detector.detect(pictures, min_score=LOWEST_SCORE)
        detections += [[dataclasses.astuple(d) for d in photo] for photo in found]
    stored = {
        "paths": [str(p) for p in paths],
        "features": stored.get("features", torch.cat(features) if features else None),
        "probabilities": stored.get("probabilities", torch.cat(probabilities) if probabilities else None),
        "detections": detections,
        "detector": made_by,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stored, cache)
    return stored


class Decoder:
    """Decodes a set's photos under a guidance, each photo's caption remembered by its plan."""

    def __init__(self, captioner: Captioner, stored: dict) -> None:
        self.captioner, self.stored = captioner, stored
        self.detections = [[Detection(name, score, tuple(box)) for name, score, box in p] for p in stored["detections"]]
        self.memo: list[dict] = [{} for _ in self.detections]

    @staticmethod
    def key(plan) -> tuple:
        return (
            tuple(tuple(word.forms) for word in plan.guides),
            None if plan.template is None else plan.template.tokens,
            tuple(sorted(plan.penalties.items())),
        )

    def captions(self, guidance: Guidance, detect: bool = True, batch_size: int = 40) -> list[str]:
        """Every photo's caption under `guidance`; detect=False: as with no detector (labels and templates)."""
        plans = guidance.plan(
            len(self.detections),
            class_probabilities=self.stored["probabilities"],
            detections=self.detections if detect else None,
        )
        keys = [self.key(plan) for plan in plans]
        todo = [i for i, key in enumerate(keys) if key not in self.memo[i]]
        decoder = self.captioner.model.decoder
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            with torch.no_grad():
                encoded = decoder.encode(self.stored["features"][rows].float())
                found = search(
                    decoder,
                    encoded,
                    guidance,
                    [plans[i] for i in rows],
                    beam_size=DEFAULT_BEAM_SIZE,
                    length_penalty=DEFAULT_LENGTH_PENALTY,
                )
            for i, hypotheses in zip(rows, found, strict=True):
                self.memo[i][keys[i]] = " ".join(guidance.vocab.decode(hypotheses[0].tokens))
        return [self.memo[i][key] for i, key in enumerate(keys)]


def scored(captions: list[str], references: list[list[str]], annotated: tuple | None) -> dict:
    """Caption metrics; with `annotated` (each photo's COCO classes and person count) hallucination and counting."""
    metrics = score_captions(dict(enumerate(captions)), dict(enumerate(references)))
    result = {k: round(metrics[k], 2) for k in METRICS}
    if annotated is not None:
        objects, counts = annotated
        hallucination = chair(captions, objects)
        agreement = count_agreement(captions, counts)
        result.update(
            {"CHAIR-i": hallucination["CHAIR-i"], "CHAIR-s": hallucination["CHAIR-s"]},
            people_in_empty_photos=people_without_people(captions, objects)["share"],
            people_counted_right=agreement["share"],
            people_counted=agreement,
        )
    return result


def overlap(a: tuple, b: tuple) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def count_buckets(detections: list[list[Detection]], counts: list[int], thresholds: list[float]) -> list[dict]:
    """For each threshold, with and without suppressing a person box that overlaps a better one by IoU 0.5 or more:
    how many photos' detected people fall in the annotated bucket (0, 1, 2, 3+), and the confusion (annotated,
    detected) -> photos."""
    rows = []
    for threshold in thresholds:
        for suppress in (False, True):
            confusion: dict[str, int] = {}
            for photo, count in zip(detections, counts, strict=True):
                kept: list[tuple] = []
                for d in photo:
                    counted = d.name == "person" and d.score >= threshold
                    if counted and (not suppress or all(overlap(d.box, box) < 0.5 for box in kept)):
                        kept.append(d.box)
                key = f"{min(count, 3)}->{min(len(kept), 3)}"
                confusion[key] = confusion.get(key, 0) + 1
            right = sum(n for key, n in confusion.items() if key[0] == key[-1])
            rows.append(
                {
                    "threshold": threshold,
                    "suppress_overlaps": suppress,
                    "right": right,
                    "photos": len(counts),
                    "right_of_two_or_more": sum(n for key, n in confusion.items() if key[0] == key[-1] in "23"),
                    "confusion": dict(sorted(confusion.items())),
                }
            )
    return rows


def choose(tried: list[dict], baseline: dict) -> dict | None:
    """The rule of the module's docstring over the settings tried; None when none keeps val within the bound."""
    val = [
        t
        for t in tried
        if t["flickr8k_val"]["CIDEr"] >= baseline["flickr8k_val"]["CIDEr"] - VAL_TOLERANCE
        and t["flickr8k_val"]["METEOR"] >= baseline["flickr8k_val"]["METEOR"] - VAL_TOLERANCE
    ]
    meeting = [
        t
        for t in val
        if t["coco_dev"]["CHAIR-s"] <= CHAIR_S_TARGET and t["coco_dev"]["people_in_empty_photos"] <= PEOPLE_TARGET
    ]
    return max(meeting or val, key=lambda t: t["coco_dev"]["CIDEr"]) if val else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-dev", type=Path, required=True, help="folder with captions_*.json, instances_*.json")
    parser.add_argument("--flickr8k", type=Path, required=True, help="the Flickr8k folder (Flickr8k.token.txt ...)")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument(
        "--only",
        type=json.loads,
        help="a JSON object of settings to try instead of SETTINGS' lists, e.g. '{\"person_penalty\": [8, 12]}'",
    )
    parser.add_argument(
        "--start",
        type=json.loads,
        default={},
        help="a JSON object of settings to start from instead of config.py's, e.g. '{\"least_count\": 3}'",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = provenance(shlex.join(["python", *sys.argv]))
    captioner = Captioner.load(detector="centernet")
    coco_paths, coco_references = coco_folder(args.coco_dev)
    instances = sorted(args.coco_dev.glob("instances_*.json"))[0]
    objects = coco_objects(instances, [p.name for p in coco_paths])
    counts = people_counts(instances, [p.name for p in coco_paths])
    val = [r for r in read_flickr8k(args.flickr8k).records if r.split == "val"]
    sets = {
        "coco_dev": (coco_paths, coco_references, (objects, counts)),
        "flickr8k_val": ([r.path for r in val], [r.captions for r in val], None),
    }
    decoders = {}
    for name, (paths, *_) in sets.items():
        decoders[name] = Decoder(captioner, seen(captioner, paths, args.cache / f"{name}.pt"))
    record.update(
        encoder_precision=captioner.encoder_precision,
        decoder=type(captioner.model.decoder).__name__,
        detector=f"{captioner.detector.name} ({captioner.detector.precision})",
        beam_size=DEFAULT_BEAM_SIZE,
        settings=SETTINGS,
        images={name: len(paths) for name, (paths, *_) in sets.items()},
    )
    thresholds = [value for value in SETTINGS["count_threshold"] if value is not None]
    record["counts"] = count_buckets(decoders["coco_dev"].detections, counts, thresholds)
    base = captioner.guidance

    def guidance(**settings) -> Guidance:
        return Guidance(
            base.vocab,
            threshold=base.threshold,
            template_threshold=base.template_threshold,
            new_words=base.new_words,
            **settings,
        )

    def run(settings: dict, detector: bool = True) -> dict:
        result = {"settings": settings if detector else "detector off"}
        for name, (_, references, annotated) in sets.items():
            captions = decoders[name].captions(guidance(**settings), detect=detector)
            result[name] = scored(captions, references, annotated)
            result[name + "_captions"] = captions if name == "coco_dev" else None
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_captions")}), flush=True)
        return result

    baseline = run({}, detector=False)
    current = {setting: getattr(base, setting) for setting in SETTINGS} | args.start
    tried: dict[str, dict] = {}
    search_space = args.only or SETTINGS
    record["searched"], record["started_from"] = search_space, current
    for _ in range(args.passes):
        for setting, values in search_space.items():
            for value in values:
                candidate = {**current, setting: None if value is None else float(value)}
                key = json.dumps(candidate, sort_keys=True)
                if key not in tried:
                    tried[key] = run(candidate)
            best = choose(list(tried.values()), baseline)
            current = best["settings"] if best else current  # nothing within the bound: the search stays put
    chosen = choose(list(tried.values()), baseline)
    record["detector_off"] = {k: v for k, v in baseline.items() if not k.endswith("_captions")}
    record["tried"] = [{k: v for k, v in t.items() if not k.endswith("_captions")} for t in tried.values()]
    record["chosen"] = {
        "rule": f"among settings within {VAL_TOLERANCE} of the detector off on val CIDEr and METEOR: those meeting "
        f"CHAIR-s <= {CHAIR_S_TARGET} and people in <= {PEOPLE_TARGET}% of empty photos if any, then the largest "
        "coco-dev CIDEr (coco-dev is in-sample at the chosen setting)",
        **{k: v for k, v in (chosen or {"settings": None}).items() if not k.endswith("_captions")},
    }
    if chosen is None:
        record["chosen"]["note"] = f"no setting tried kept Flickr8k val CIDEr and METEOR within {VAL_TOLERANCE}"
    else:
        record["captions"] = {
            path.name: {"detector_off": off, "chosen": on}
            for path, off, on in zip(
                coco_paths, baseline["coco_dev_captions"], chosen["coco_dev_captions"], strict=True
            )
        }
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
