"""The COCO detector on a COCO-format folder with object annotations (coco-dev): what it finds and how fast.

    python benchmarks/detector.py --coco-dev ../shared/data/coco-dev --out results/detector.json
    python benchmarks/detector.py --coco-dev ../shared/data/coco-dev --sizes 512 448 384 320 \
        --out results/detector_sizes.json

Photos are read as the captioner reads them (images.load_image at the model's input size, boxes mapped back to the
photo's pixels). Recorded: image-level precision and recall over the COCO classes at several score thresholds (a
class counts as found in a photo when one of its detections reaches the threshold; the truth is the photo's
instances annotations), per class at the guidance's presence threshold, how often a person is found in photos with
and without people, COCO box AP (pycocotools), and the latency of one photo in each precision the CPU runs
(median of --rounds interleaved rounds, the CPU model beside it). With --sizes, the same for each network input
side (the first is the record's headline), the latencies interleaved across sizes.
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
from show_attend_tell.detector import COCO_CLASSES, CenterNetDetector, fetch_centernet, load_centernet
from show_attend_tell.fast_encoder import resolve_precision
from show_attend_tell.images import load_image

THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5)
IMAGE_SIZE = 448  # the shipped model's input: photos are decoded as the captioner decodes them


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


def quality(
    detector: CenterNetDetector, pictures: list, paths: list[Path], truth: list[set[str]], instances: Path
) -> dict:
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[DEFAULT_DETECTOR_SIZE], help="network input sides")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    record = begin_record(args)
    paths, _ = coco_folder(args.coco_dev)
    instances = sorted(args.coco_dev.glob("instances_*.json"))[0]
    truth = coco_objects(instances, [p.name for p in paths])
    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", "cpu") == "bf16" else [])
    detectors = {  # a network each: a detector casts the one it is given
        (size, precision): CenterNetDetector(load_centernet(fetch_centernet()), precision=precision, size=size)
        for size in args.sizes
        for precision in precisions
    }
    default = precisions[-1]  # what the captioner runs here (auto)
    pictures = [load_image(path, size=IMAGE_SIZE) for path in paths]
    found = {size: quality(detectors[size, default], pictures, paths, truth, instances) for size in args.sizes}
    for detector in detectors.values():
        detector.detect(pictures[:2], min_score=0.3)  # warm-up
    variants = {
        key: lambda r, d=detector: d.detect([pictures[r % len(pictures)]], min_score=0.3)
        for key, detector in detectors.items()
    }
    times = interleaved(variants, args.rounds, reverse=False).seconds

    def latency(size: int) -> dict:
        return {
            precision: {
                "median": median(times[size, precision], scale=1000, digits=1),
                "rounds": [round(1000 * v, 1) for v in times[size, precision]],
            }
            for precision in precisions
        }

    headline = args.sizes[0]
    record.update(
        detector=f"centernet ({default}): npm @vladmandic/human@3.3.6 models/centernet, rebuilt",
        images=len(paths),
        size=headline,
        **found[headline],
        latency_ms=latency(headline),
        latency_note="one photo (already decoded) through letterbox, the network and the box decoding; "
        f"{torch.get_num_threads()} torch threads",
    )
    if len(args.sizes) > 1:
        record["sizes"] = {
            str(size): {
                "image_level": found[size]["image_level"],
                "person": found[size]["person"],
                "box": found[size]["box"],
                "latency_ms": {precision: value["median"] for precision, value in latency(size).items()},
            }
            for size in args.sizes
        }
    shown = record.get("sizes") or {k: record[k] for k in ("image_level", "person", "box", "latency_ms")}
    return finish(record, args.out, shown, indent=1)


if __name__ == "__main__":
    sys.exit(main())
