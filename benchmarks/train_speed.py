"""Training throughput (issue #4): captions per second from cached features vs images, and the cost split.

The headline captions/s is `train.cross_entropy_step` itself, what `sat train` runs, on batches of whole
images (5 captions each) of about --batch-captions captions. The split per step (captions, encoder with its
image loading, decoder forward, loss, backward, optimizer step) comes from the same function, run again with a
timer at the end of each phase (its `mark` argument). Target:
at least 50 captions/s from cached features with the default model (E=2048, A=D=M=512) on a 2-core CPU.

The machine is shared and noisy, so each round runs every (source, batch size) once, both plain and
with phase marks, in alternating order, and the figures are medians over rounds; the cached/images ratio is
the median of per-round ratios on the same batch.

Data: a real prepared dataset (--data, with --features for the cached runs), or by default a synthetic one
in a temporary directory: random-coloured 500x375 JPEGs, captions of normally distributed length (mean 11
words, like Flickr8k's 10.8) over a --vocab-size vocabulary, and random non-negative features.

    python benchmarks/train_speed.py --repeats 10 --out results/train_speed.json
    python benchmarks/train_speed.py --data /work/data/f8k --features /work/data/feat224 --out results/...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from harness import (
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
from PIL import Image

from show_attend_tell.config import DataConfig, ModelConfig, TrainConfig, to_dict
from show_attend_tell.datasets import read_folder
from show_attend_tell.features import extract_features
from show_attend_tell.prepare import PreparedDataset, prepare
from show_attend_tell.train import Run, cross_entropy_step, epoch_batches, new_run
from show_attend_tell.weights import ENCODER_WEIGHTS

FLICKR8K_VOCAB_SIZE = 2542
FLICKR8K_TRAIN_CAPTIONS = 30_000
PHASES = ("data", "encoder", "decoder_forward", "loss", "backward", "optimizer")


class RandomGrid:
    """Stand-in encoder for the synthetic feature store: non-negative (post-ReLU-like) random grids."""

    def __init__(self, config: ModelConfig) -> None:
        self.shape = (config.grid_size**2, config.encoder_dim)
        self.generator = torch.Generator().manual_seed(0)

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(images.size(0), *self.shape, generator=self.generator).relu()  # (B, P, E)


def synthetic_dataset(root: Path, *, images: int, vocab_size: int, mean_words: float, seed: int = 0) -> Path:
    """A prepared folder dataset (`images` train images, 2 val, 2 test, 5 captions each) in `root`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    words = ["q" + "".join(chr(ord("a") + int(d)) for d in str(i)) for i in range(vocab_size - 4)]  # letters only
    zipf = 1.0 / np.arange(1, len(words) + 1)
    total = images + 4
    lengths = np.clip(np.rint(rng.normal(mean_words, 3.5, size=(total, 5))), 3, 30).astype(int)
    stream = list(rng.permutation(words)) + list(rng.choice(words, size=int(lengths.sum()), p=zipf / zipf.sum()))
    rows, position = ["image,caption,split"], 0  # the first captions use every word once: vocabulary = all
    for n in range(total):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        picture.save(root / "images" / f"{n}.jpg", quality=90)
        split = "train" if n < images else ("val" if n < images + 2 else "test")
        for length in lengths[n]:
            rows.append(f"{n}.jpg,{' '.join(stream[position : position + length])},{split}")
            position += length
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    raw = read_folder(root / "captions.csv", root / "images")
    prepare(raw, root / "prepared", dataset="folder", min_count=1, max_length=30, progress=False)
    return root / "prepared"


def synthetic_features(prepared: Path, out: Path, config: ModelConfig) -> Path:
    dataset = PreparedDataset.load(prepared)
    extract_features(
        [image.path for image in dataset.images],
        out,
        config=config,
        encoder=RandomGrid(config),
        encoder_sha256=ENCODER_WEIGHTS[config.encoder].sha256(),
        progress=False,
    )
    return out


def timed_phases(run: Run, rows: list[int]) -> dict[str, float]:
    """`cross_entropy_step`'s phases, in s: the step itself, timed at each of its phase marks."""
    marks = [time.perf_counter()]
    cross_entropy_step(run, rows, mark=lambda phase: marks.append(time.perf_counter()))
    return {phase: end - start for phase, (start, end) in zip(PHASES, pairwise(marks), strict=True)}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    if args.data:
        prepared, features = Path(args.data), args.features or ""
    else:
        prepared = synthetic_dataset(
            workdir / "synthetic", images=args.images, vocab_size=args.vocab_size, mean_words=args.mean_words
        )
        vocab_size = len(PreparedDataset.load(prepared).vocab)
        features = str(synthetic_features(prepared, workdir / "features", ModelConfig(vocab_size=vocab_size)))
    dataset = PreparedDataset.load(prepared)
    model_config = ModelConfig(vocab_size=len(dataset.vocab))
    if not args.data and len(dataset.vocab) < args.vocab_size:
        print(f"note: {args.images} synthetic images use only {len(dataset.vocab)} of {args.vocab_size} words")
    # one run per (source, precision), named by the source alone when one precision is measured
    variants = {
        (source if len(args.precisions) == 1 else f"{source}_{precision}"): (source, precision)
        for source in args.sources
        if source != "features" or features
        for precision in args.precisions
    }
    sources = list(variants)
    trainers = {}
    for name, (source, precision) in variants.items():
        trainers[name] = new_run(
            workdir / f"run-{name}",
            model_config,
            TrainConfig(batch_size=max(args.batch_captions), seed=0, precision=precision),
            DataConfig(prepared=str(prepared), features=features if source == "features" else ""),
            java=False,
        )
    first = trainers[sources[0]]
    batches = {}
    for size in args.batch_captions:
        every = epoch_batches(first.data.train_rows, first.data.caption_rows, size, epoch=0, seed=0)
        batches[size] = [rows for rows in every if sum(len(first.data.caption_rows[i]) for i in rows) >= size]
        if not batches[size]:
            raise SystemExit(f"{len(first.data.train_rows)} training images do not make one batch of {size} captions")

    def task(source: str, size: int, kind: str):
        def run(r: int):
            rows = batches[size][r % len(batches[size])]
            if kind == "step":
                return cross_entropy_step(trainers[source], rows)["captions"]
            return timed_phases(trainers[source], rows)

        return run

    pairs = [(s, n) for s in sources for n in args.batch_captions]
    tasks = {(source, size, kind): task(source, size, kind) for source, size in pairs for kind in ("step", "phases")}

    def progress(r: int, rounds) -> None:
        last = {(s, n): rounds.results[s, n, "step"][-1] / rounds.seconds[s, n, "step"][-1] for s, n in pairs}
        print(
            f"round {r + 1}/{args.repeats}: " + ", ".join(f"{s} x{n} {v:.1f} captions/s" for (s, n), v in last.items())
        )

    rounds = interleaved(tasks, args.repeats, warmup=args.warmup, after_round=progress)
    step_seconds = {(s, n): rounds.seconds[s, n, "step"] for s, n in pairs}
    captions = {(s, n): rounds.results[s, n, "step"] for s, n in pairs}
    throughput = {key: [c / t for c, t in zip(captions[key], step_seconds[key], strict=True)] for key in pairs}
    phases = {(s, n): {p: [split[p] for split in rounds.results[s, n, "phases"]] for p in PHASES} for s, n in pairs}

    results = {}
    for (source, size), values in throughput.items():
        split = {p: median(v, scale=1e3) for p, v in phases[source, size].items()}
        cps = median(values)
        results[f"{source}_batch_{size}"] = {
            "source": "cached features" if variants[source][0] == "features" else "images through the encoder",
            "precision": variants[source][1],
            "batch_captions_requested": size,
            "batch_captions_mean": statistics.mean(captions[source, size]),
            "captions_per_second_median": round(cps, 2),
            "captions_per_second_min_max": [round(min(values), 2), round(max(values), 2)],
            "train_step_ms_median": median(step_seconds[source, size], scale=1e3, digits=1),
            "split_ms_median": {p: round(v, 1) for p, v in split.items()},
            "split_fraction": {p: round(v / sum(split.values()), 3) for p, v in split.items()},
            "split_sum_ms": round(sum(split.values()), 1),
            "flickr8k_epoch_minutes": round(FLICKR8K_TRAIN_CAPTIONS / cps / 60, 1),
        }
    ratios = {}
    if "features" in sources and "images" in sources:
        for size in args.batch_captions:
            per_round = per_round_ratio(throughput["features", size], throughput["images", size])
            ratios[f"features_over_images_batch_{size}"] = median(per_round, digits=2)
    words = (dataset.lengths[dataset.caption_indices("train")] - 2).float()
    return {
        "parameters": {
            "data": str(prepared) if args.data else "synthetic",
            "features": features if args.data else "synthetic (random)",
            "train_images": len(first.data.train_rows),
            "caption_words_mean": round(float(words.mean()), 2),
            "caption_words_max": int(words.max()),
            "batch_captions": args.batch_captions,
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "threads": torch.get_num_threads(),
            "model": to_dict(model_config),
            "train": to_dict(first.config),
        },
        "results": results,
        "ratios": ratios,
        "target_features_at_least_50_captions_per_second": {
            name: value["captions_per_second_median"] >= 50
            for name, value in results.items()
            if name.startswith("features")
        },
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="train_speed.json")
    parser.add_argument("--data", help="a `sat prepare` directory (default: a synthetic dataset)")
    parser.add_argument("--features", help="its `sat features` store (for the cached-features runs)")
    parser.add_argument("--sources", nargs="+", choices=["features", "images"], default=["features", "images"])
    parser.add_argument("--batch-captions", type=int, nargs="+", default=[64, 160])
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["auto", "fp32", "bf16"],
        default=["auto"],
        help="train.precision of the runs; several are interleaved like the sources (e.g. fp32 bf16)",
    )
    add_rounds(parser, 10, warmup=1)
    add_threads(parser)
    parser.add_argument("--images", type=int, default=200, help="synthetic: training images (5 captions each)")
    parser.add_argument("--vocab-size", type=int, default=FLICKR8K_VOCAB_SIZE, help="synthetic: vocabulary size")
    parser.add_argument("--mean-words", type=float, default=11.0, help="synthetic: mean caption length in words")
    add_note(parser)
    args = parser.parse_args()
    if args.features and not args.data:
        parser.error("--features needs --data")
    record = begin_record(args)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as workdir:
        record.update(measure(args, Path(workdir)))
    load_at_end(record, args.note)
    for name, result in record["results"].items():
        split = ", ".join(f"{phase} {ms:.0f}" for phase, ms in result["split_ms_median"].items())
        print(f"{name}: {result['captions_per_second_median']} captions/s; split (ms): {split}")
    shown = {"ratios": record["ratios"], "target": record["target_features_at_least_50_captions_per_second"]}
    return finish(record, args.out, shown, indent=None)


if __name__ == "__main__":
    sys.exit(main())
