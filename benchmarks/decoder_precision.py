"""What the int8 decoder saves, and what the rule that no caption repeats a word costs: `Captioner` photo to caption
at the defaults (label guidance and templates, the int8 decoder, no repeated words) against the fp32 decoder and
against words that may repeat (`repeat_words`), one photo at a time and in one batch, on the same photos, and how
many of their captions differ.

The machine is shared and noisy: each round runs every variant once (A B C D, then D C B A in the next round),
and each ratio is the median of the per-round ratios, whose two sides ran seconds apart.

    python benchmarks/decoder_precision.py --repeats 9 --out results/decoder_precision.json
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
    parser = benchmark_parser(__doc__, record="decoder_precision.json")
    parser.add_argument("--images", type=Path, default=REPO / "examples", help="a folder of photos")
    parser.add_argument("--model", help="checkpoint directory with an int8 calibration (default: the shipped model)")
    parser.add_argument("--batch", type=int, default=32, help="photos in the batched runs (the folder is cycled)")
    parser.add_argument("--repeats", type=int, default=9, help="measured rounds")
    add_threads(parser)
    args = parser.parse_args()
    record = begin_record(args)
    captioners = {"int8": Captioner.load(args.model, int8=True), "fp32": Captioner.load(args.model, int8=False)}
    photos = photos_in(args.images)
    batch = [photos[i % len(photos)] for i in range(args.batch)]

    def one_at_a_time(precision: str, repeat_words: bool = False) -> None:
        for photo in photos:
            captioners[precision].caption(photo, repeat_words=repeat_words)

    def batched(precision: str, repeat_words: bool = False) -> None:
        captioners[precision].caption_batch(batch, repeat_words=repeat_words)

    variants = {  # name -> (run it, photos it captions)
        "one_photo_int8": (lambda _: one_at_a_time("int8"), len(photos)),
        "one_photo_int8_repeat_words": (lambda _: one_at_a_time("int8", True), len(photos)),
        "one_photo_fp32": (lambda _: one_at_a_time("fp32"), len(photos)),
        "batch_int8": (lambda _: batched("int8"), len(batch)),
        "batch_int8_repeat_words": (lambda _: batched("int8", True), len(batch)),
        "batch_fp32": (lambda _: batched("fp32"), len(batch)),
    }
    captions = {name: [c.text for c in captioner.caption_batch(photos)] for name, captioner in captioners.items()}
    repeating = [c.text for c in captioners["int8"].caption_batch(photos, repeat_words=True)]
    times = per_photo_rounds(variants, args.repeats)

    def ratio(numerator: str, denominator: str) -> float:
        return median_ratio(times, numerator, denominator)

    record.update(
        photos=len(photos),
        encoder_precision=captioners["int8"].encoder_precision,
        batch=args.batch,
        repeats=args.repeats,
        captions_fp32_and_int8_differ=sum(a != b for a, b in zip(captions["int8"], captions["fp32"], strict=True)),
        ms_per_photo_median={name: median(t, scale=1000, digits=1) for name, t in times.items()},
        fp32_over_int8_one_photo=ratio("one_photo_fp32", "one_photo_int8"),
        fp32_over_int8_batched=ratio("batch_fp32", "batch_int8"),
        captions_changed_by_the_no_repeat_rule=sum(a != b for a, b in zip(captions["int8"], repeating, strict=True)),
        no_repeats_over_repeat_words_one_photo=ratio("one_photo_int8", "one_photo_int8_repeat_words"),
        no_repeats_over_repeat_words_batched=ratio("batch_int8", "batch_int8_repeat_words"),
    )
    return finish(record, args.out, {k: v for k, v in record.items() if k != "command"})


if __name__ == "__main__":
    sys.exit(main())
