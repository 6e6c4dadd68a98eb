"""What guided captions cost: `Captioner` photo to caption at the defaults (labels, templates and the COCO
detector), with label guidance alone (the defaults before the detector) and unguided, one photo at a time and in one
batch, on the same photos.

The machine is shared and noisy: each round runs every variant once (A B C D, then D C B A in the next round),
and each ratio is the median of the per-round ratios, whose two sides ran seconds apart.

    python benchmarks/guidance_speed.py --repeats 9 --out results/guidance_speed.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness import (
    REPO,
    add_threads,
    begin_record,
    benchmark_parser,
    finish,
    median,
    median_ratio,
    per_photo_rounds,
    photos_in,
)

from show_attend_tell.captioner import Captioner


def main() -> int:
    parser = benchmark_parser(__doc__, record="guidance_speed.json")
    parser.add_argument("--images", type=Path, default=REPO / "examples", help="a folder of photos")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=32, help="photos in the batched runs (the folder is cycled)")
    parser.add_argument("--repeats", type=int, default=9, help="measured rounds")
    add_threads(parser)
    parser.add_argument("--detector", default="centernet", help="the COCO detector measured beside the labels")
    args = parser.parse_args()
    record = begin_record(args)
    captioner = Captioner.load(args.model, detector=args.detector)
    photos = photos_in(args.images)
    batch = [photos[i % len(photos)] for i in range(args.batch)]

    def one_at_a_time(guide: bool, detect: bool) -> None:
        for photo in photos:
            captioner.caption(photo, guide=guide, detect=detect)

    def batched(guide: bool, detect: bool) -> None:
        captioner.caption_batch(batch, guide=guide, detect=detect)

    variants = {  # name -> (run it, photos it captions)
        "one_photo_unguided": (lambda _: one_at_a_time(False, False), len(photos)),
        "one_photo_guided": (lambda _: one_at_a_time(True, False), len(photos)),
        "one_photo_defaults": (lambda _: one_at_a_time(True, True), len(photos)),
        "batch_unguided": (lambda _: batched(False, False), len(batch)),
        "batch_guided": (lambda _: batched(True, False), len(batch)),
        "batch_defaults": (lambda _: batched(True, True), len(batch)),
    }
    if captioner.detector is None:
        variants = {name: run for name, run in variants.items() if not name.endswith("defaults")}
    captions = captioner.caption_batch(photos)
    guided, templates = sum(bool(c.guidance) for c in captions), sum(c.template for c in captions)
    times = per_photo_rounds(variants, args.repeats)

    def ratio(numerator: str, denominator: str) -> float:
        return median_ratio(times, numerator, denominator)

    record.update(
        photos=len(photos),
        guided_photos=guided,
        template_photos=templates,  # of the guided photos, those whose caption is a template (guidance.py)
        encoder_precision=captioner.encoder_precision,
        batch=args.batch,
        repeats=args.repeats,
        int8=captioner.model.decoder is not None and "Int8" in type(captioner.model.decoder.lstm).__name__,
        ms_per_photo_median={name: median(t, scale=1000, digits=1) for name, t in times.items()},
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
    return finish(record, args.out, {k: v for k, v in record.items() if k != "command"})


if __name__ == "__main__":
    sys.exit(main())
