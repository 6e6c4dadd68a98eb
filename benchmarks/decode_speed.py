"""Decoding speed (issue #3): encoder vs beam search for one image, batched vs one-at-a-time beam search.

Targets on a 2-core CPU, beam 3:
- one image end to end (image tensor -> encoder -> beam search -> words) within 1.2x the encoder forward alone;
- batched beam search over 32 images at least 3x faster per image than one image at a time (decoder only,
  from cached encodings; end to end is reported too).

The machine is shared and noisy, so every quantity is measured once per round, the rounds interleave all of
them (A, B, C, ... then the reverse order), and the figures are medians over rounds; each ratio is the median
of the per-round ratios, whose two sides ran seconds apart. Everything runs under torch.inference_mode.

A random decoder rarely emits <end> and runs every caption to --max-length, so its step counts (reported)
are not a trained model's: use the shipped model or --model DIR for the recorded figures.

    python benchmarks/decode_speed.py --repeats 15 --out results/decode_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from harness import (
    REPO,
    add_note,
    add_rounds,
    add_threads,
    begin_record,
    benchmark_parser,
    finish,
    interleaved,
    load_at_end,
    median,
    per_round_ratio,
)

from show_attend_tell import decoding
from show_attend_tell.captioner import SHIPPED_MODEL
from show_attend_tell.config import DEFAULT_MAX_LENGTH, ModelConfig, to_dict
from show_attend_tell.decoding import Hypothesis, beam_search
from show_attend_tell.images import load_image
from show_attend_tell.inference import calibrate_int8, encode_images, for_inference
from show_attend_tell.model import CaptionModel, Encoder
from show_attend_tell.runtime import load_model
from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary
from show_attend_tell.weights import image_transform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
FLICKR8K_VOCAB_SIZE = 2542


def image_paths(sources: list[str]) -> list[Path]:
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            paths += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(source)
    if not paths:
        raise SystemExit(f"no images in {sources}")
    return paths


def build_model(args: argparse.Namespace) -> tuple[CaptionModel, Vocabulary, str]:
    """The trained checkpoint when there is one (a real caption length), else a random decoder."""
    model_dir = Path(args.model) if args.model else SHIPPED_MODEL
    if not args.random_decoder and (model_dir / "config.json").is_file():
        model, vocab, _ = load_model(model_dir, int8=args.int8)
        return model, vocab, str(model_dir) + (" (int8 decoder)" if args.int8 else "")
    if args.model:
        raise SystemExit(f"{args.model}: no checkpoint here (config.json missing)")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab_size)
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))])
    model = CaptionModel(config, encoder=Encoder(config))
    ranges = (
        calibrate_int8(model.decoder, [torch.randn(8, config.grid_size**2, config.encoder_dim)]) if args.int8 else None
    )
    model = for_inference(model, int8_ranges=ranges)
    return model, vocab, "random (untrained)" + (" (int8 decoder)" if args.int8 else "")


def steps_taken(beams: list[list[Hypothesis]]) -> int:
    """Iterations of the beam search loop: it stops at the step where its last surviving beam finished."""
    return max(len(h.tokens) + h.finished for hypotheses in beams for h in hypotheses)


def caption_images(model: CaptionModel, vocab: Vocabulary, images: torch.Tensor, args) -> tuple[list, int]:
    """What a user waits for: (B, 3, S, S) image tensors -> the best caption's words for each, and the steps."""
    encoded = model.decoder.encode(encode_images(model.encoder, images))  # (B, P, *)
    beams = beam_search(model.decoder, encoded, beam_size=args.beam, max_length=args.max_length)
    return [vocab.decode(hypotheses[0].tokens) for hypotheses in beams], steps_taken(beams)


def measure(args: argparse.Namespace) -> dict:
    model, vocab, decoder_name = build_model(args)
    paths = image_paths(args.images)[: args.batch]  # a folder may hold thousands
    transform = image_transform(model.config)
    tensors = [transform(load_image(path)) for path in paths]
    images = torch.stack([tensors[i % len(tensors)] for i in range(args.batch)])  # (B, 3, S, S)
    B = args.batch
    encoded = model.decoder.encode(encode_images(model.encoder, images))  # cached for the decoder-only runs
    singles = [encoded.select(slice(i, i + 1)) for i in range(B)]

    def decode(rows) -> int:
        return steps_taken(beam_search(model.decoder, rows, beam_size=args.beam, max_length=args.max_length))

    # name -> f(round) -> the decoding steps it took
    def encoder_alone(r: int) -> int:
        encode_images(model.encoder, images[r % B : r % B + 1])
        return 0

    def end_to_end(r: int) -> int:
        return caption_images(model, vocab, images[r % B : r % B + 1], args)[1]

    def decoder_one_at_a_time(r: int) -> int:
        return sum(decode(rows) for rows in singles)

    def decoder_batched(r: int) -> int:
        return decode(encoded)

    def decoder_batched_eager_compaction(r: int) -> int:
        """The batched search dropping each image as soon as it finishes (COMPACT_FRACTION 0, before 2026-11-26)."""
        default = decoding.COMPACT_FRACTION
        decoding.COMPACT_FRACTION = 0.0
        try:
            return decoder_batched(r)
        finally:
            decoding.COMPACT_FRACTION = default

    def end_to_end_one_at_a_time(r: int) -> int:
        return sum(caption_images(model, vocab, images[i : i + 1], args)[1] for i in range(B))

    def end_to_end_batched(r: int) -> int:
        return caption_images(model, vocab, images, args)[1]

    tasks = [encoder_alone, end_to_end, decoder_one_at_a_time, decoder_batched, decoder_batched_eager_compaction]
    if not args.skip_batched_end_to_end:
        tasks += [end_to_end_one_at_a_time, end_to_end_batched]
    one_image = {"encoder_alone", "end_to_end"}  # the others caption all B images in a call

    def per_image(name: str, values: list[float]) -> list[float]:
        return values if name in one_image else [s / B for s in values]

    def progress(r: int, rounds) -> None:
        last = {k: 1e3 * per_image(k, v[-1:])[0] for k, v in rounds.seconds.items()}
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.1f}" for k, v in last.items()))

    rounds = interleaved(
        {task.__name__: task for task in tasks}, args.repeats, warmup=args.warmup, after_round=progress
    )
    seconds = {name: per_image(name, values) for name, values in rounds.seconds.items()}
    steps = rounds.results

    def ratio(numerator: str, denominator: str) -> dict:
        per_round = per_round_ratio(seconds[numerator], seconds[denominator])
        return {"median": median(per_round, digits=3), "per_round": [round(x, 3) for x in per_round]}

    ratios = {
        "end_to_end_over_encoder": ratio("end_to_end", "encoder_alone"),
        "decoder_one_at_a_time_over_batched": ratio("decoder_one_at_a_time", "decoder_batched"),
        "eager_over_deferred_compaction": ratio("decoder_batched_eager_compaction", "decoder_batched"),
    }
    if not args.skip_batched_end_to_end:
        ratios["end_to_end_one_at_a_time_over_batched"] = ratio("end_to_end_one_at_a_time", "end_to_end_batched")

    # ms per step: one image's step runs K rows, the batched step B*K rows.
    def ms_per_step(name: str) -> float:
        return statistics.median(1e3 * s * B / n for s, n in zip(seconds[name], steps[name], strict=True))

    per_step = {"one_image": ms_per_step("decoder_one_at_a_time"), f"batch_of_{B}": ms_per_step("decoder_batched")}
    e2e, batched = ratios["end_to_end_over_encoder"]["median"], ratios["decoder_one_at_a_time_over_batched"]["median"]
    captions, _ = caption_images(model, vocab, images[: min(B, len(tensors))], args)
    return {
        "parameters": {
            "beam_size": args.beam,
            "max_length": args.max_length,
            "batch_images": B,
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "threads": torch.get_num_threads(),
            "decoder": decoder_name,
            "model": to_dict(model.config),
            "images": [str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in paths],
            "inference_mode": True,
            "int8_decoder": args.int8,
        },
        "median_ms_per_image": {k: median(v, scale=1e3, digits=2) for k, v in seconds.items()},
        "median_ms_per_step": {k: round(v, 3) for k, v in per_step.items()},
        "steps": {
            "one_image_mean": statistics.mean(steps["decoder_one_at_a_time"]) / B,
            f"batch_of_{B}": statistics.median(steps["decoder_batched"]),
            "max_length": args.max_length,
            "note": "a random decoder rarely emits <end>: captions run to max_length"
            if decoder_name.startswith("random")
            else "steps until every beam of every image in the call produced <end>",
        },
        "ratios": ratios,
        "targets": {
            "end_to_end_over_encoder_at_most_1.2": e2e <= 1.2,
            "batched_decoder_speedup_at_least_3": batched >= 3.0,
        },
        "example_captions": {
            str(paths[i % len(paths)].name): " ".join(words) for i, words in enumerate(captions[: len(paths)])
        },
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="decode_speed.json")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model, if present)")
    parser.add_argument("--random-decoder", action="store_true", help="random decoder even if a model exists")
    parser.add_argument("--vocab-size", type=int, default=FLICKR8K_VOCAB_SIZE, help="random decoder's vocabulary")
    parser.add_argument("--images", nargs="+", default=[str(REPO / "examples")], help="files or folders")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--batch", type=int, default=32, help="images in the batched runs (photos are cycled)")
    add_rounds(parser, 15, warmup=1)
    add_threads(parser)
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8 decoder, as `sat caption` and `sat serve` use on CPU (default on; --no-int8 for fp32)",
    )
    parser.add_argument("--skip-batched-end-to-end", action="store_true", help="only the decoder-only batch runs")
    add_note(parser)
    args = parser.parse_args()
    record = begin_record(args)
    with torch.inference_mode():
        figures = measure(args)
    record.update(figures)
    load_at_end(record, args.note)
    summary = {key: record[key] for key in ("median_ms_per_image", "median_ms_per_step", "steps", "targets", "machine")}
    summary["decoder"] = record["parameters"]["decoder"]
    summary["ratios"] = {k: v["median"] for k, v in record["ratios"].items()}
    return finish(record, args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
