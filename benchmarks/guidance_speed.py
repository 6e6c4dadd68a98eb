"""What guided captions cost: `Captioner` photo to caption at the defaults (labels, templates and the COCO
detector), with label guidance alone (the defaults before the detector) and unguided, one photo at a time and in one
batch, on the same photos.

The machine is shared and noisy: each round runs every variant once (A B C D, then D C B A in the next round),
and each ratio is the median of the per-round ratios, whose two sides ran seconds apart.

    python benchmarks/guidance_speed.py --repeats 9 --out results/guidance_speed.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from show_attend_tell.captioner import Captioner
from show_attend_tell.images import load_image
from show_attend_tell.records import provenance, write_record

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO / "examples", help="a folder of photos")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=32, help="photos in the batched runs (the folder is cycled)")
    parser.add_argument("--repeats", type=int, default=9, help="measured rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector", default="centernet", help="the COCO detector measured beside the labels")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = provenance(shlex.join(["python", *sys.argv]))
    captioner = Captioner.load(args.model, detector=args.detector)
    photos = [load_image(p) for p in sorted(args.images.iterdir()) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    batch = [photos[i % len(photos)] for i in range(args.batch)]

    def one_at_a_time(guide: bool, detect: bool) -> float:
        start = time.perf_counter()
        for photo in photos:
            captioner.caption(photo, guide=guide, detect=detect)
        return (time.perf_counter() - start) / len(photos)

    def batched(guide: bool, detect: bool) -> float:
        start = time.perf_counter()
        captioner.caption_batch(batch, guide=guide, detect=detect)
        return (time.perf_counter() - start) / len(batch)

    variants = {
        "one_photo_unguided": lambda: one_at_a_time(False, False),
        "one_photo_guided": lambda: one_at_a_time(True, False),
        "one_photo_defaults": lambda: one_at_a_time(True, True),
        "batch_unguided": lambda: batched(False, False),
        "batch_guided": lambda: batched(True, False),
        "batch_defaults": lambda: batched(True, True),
    }
    if captioner.detector is None:
        variants = {name: run for name, run in variants.items() if not name.endswith("defaults")}
    captions = captioner.caption_batch(photos)
    guided, templates = sum(bool(c.guidance) for c in captions), sum(c.template for c in captions)
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name]())

    def ratio(numerator: str, denominator: str) -> float:
        return round(statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True)), 3)

    record.update(
        photos=len(photos),
        guided_photos=guided,
        template_photos=templates,  # of the guided photos, those whose caption is a template (guidance.py)
        encoder_precision=captioner.encoder_precision,
        batch=args.batch,
        repeats=args.repeats,
        int8=captioner.model.decoder is not None and "Int8" in type(captioner.model.decoder.lstm).__name__,
        ms_per_photo_median={name: round(1000 * statistics.median(t), 1) for name, t in times.items()},
        guided_over_unguided_one_photo=ratio("one_photo_guided", "one_photo_unguided"),
        guided_over_unguided_batched=ratio("batch_guided", "batch_unguided"),
        one_at_a_time_over_batched_guided=ratio("one_photo_guided", "batch_guided"),
        one_at_a_time_over_batched_unguided=ratio("one_photo_unguided", "batch_unguided"),
    )
    if captioner.detector is not None:
        record.update(
            detector=f"{captioner.detector_name} ({captioner.detector.precision})",
            detector_size=getattr(captioner.detector, "size", None),
            defaults_over_labels_one_photo=ratio("one_photo_defaults", "one_photo_guided"),
            defaults_over_labels_batched=ratio("batch_defaults", "batch_guided"),
            one_at_a_time_over_batched_defaults=ratio("one_photo_defaults", "batch_defaults"),
        )
    print(json.dumps({k: v for k, v in record.items() if k != "command"}, indent=2))
    if args.out:
        write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
