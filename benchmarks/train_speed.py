"""Training throughput (issue #4): captions per second from cached features vs images, and the cost split.

The headline captions/s is `train.cross_entropy_step` itself, what `sat train` runs, on batches of whole
images (5 captions each) of about --batch-captions captions. The split per step (captions, encoder with its
image loading, decoder forward, loss, backward, optimizer step) comes from the same function, run again with a
timer at the end of each phase (its `mark` argument). Target:
at least 50 captions/s from cached features with the default model (E=2048, A=D=M=512) on a 2-core CPU.

The machine is shared and noisy, so each round runs every (source, batch size) once, both plain and
with phase marks, in alternating order, and the figures are medians over rounds; the cached/images ratio is
the median of per-round ratios on the same batch.

Data: a real prepared dataset (--data, with --features for the cached runs: the model takes the store's encoder,
photo size and grid, as `sat train --features` does), or by default a synthetic one in a temporary directory:
random-coloured 500x375 JPEGs, captions of normally distributed length (mean 11 words, like Flickr8k's 10.8) over a
--vocab-size vocabulary, and random non-negative features. --random-features times a real dataset's captions on
random grids (at --image-size: 448 gives the 14x14 grid), for a grid no store of which exists yet: a step's time
does not depend on the features' values.

Batching (--batching random length) and decoders (--decoders lstm transformer) are interleaved like the sources.
Each run takes batch r of its own epoch in round r (--repeats 0: every batch of one epoch once), and the rate to
compare is captions_per_second_overall, all captions over all seconds: bucketed batches differ in length, so the
median batch says little. words_over_slots is the share of the (N, T) token grids that is not padding.

    python benchmarks/train_speed.py --repeats 10 --out results/train_speed.json
    python benchmarks/train_speed.py --data /work/data/f8k --features /work/data/feat224 --out results/...
    python benchmarks/train_speed.py --data /work/data/f8k --random-features --image-size 448 --limit 600 \
        --sources features --decoders lstm transformer --batching random length --repeats 0 --no-phases
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from harness import add_note, add_rounds, add_threads, begin_record, benchmark_parser, finish, load_at_end
from PIL import Image

from show_attend_tell.config import DataConfig, ModelConfig, TrainConfig, to_dict
from show_attend_tell.datasets import read_folder
from show_attend_tell.errors import InputError
from show_attend_tell.features import extract_features, native_grid_size, store_settings
from show_attend_tell.prepare import PreparedDataset, prepare
from show_attend_tell.train import Run, cross_entropy_step, new_run
from show_attend_tell.training_data import epoch_batches
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


def synthetic_features(prepared: Path, out: Path, config: ModelConfig, limit: int = 0) -> Path:
    dataset = PreparedDataset.load(prepared, limit=limit)
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


def padding(run: Run, batches: list[list[int]]) -> dict:
    """How much of the batches' (N, T) token grids are captions: T is each batch's longest caption."""
    lengths, caption_rows = run.data.dataset.lengths, run.data.caption_rows
    words = slots = 0
    widths = []
    for rows in batches:
        predicted = lengths[[c for image in rows for c in caption_rows[image]]] - 1  # (N,) positions predicted
        words += int(predicted.sum())
        slots += int(predicted.max()) * len(predicted)
        widths.append(int(predicted.max()))
    return {"positions_per_batch_mean": round(statistics.mean(widths), 2), "words_over_slots": round(words / slots, 3)}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    settings = {"image_size": args.image_size or 224}
    if args.features:  # the store fixes the encoder, photo size and grid, as for `sat train --features`
        if args.image_size:
            raise SystemExit("--image-size is the --features store's; give one or the other")
        settings = store_settings(args.features)
    settings.setdefault("grid_size", native_grid_size(ModelConfig(vocab_size=1, **settings)))
    if args.data:
        prepared, features = Path(args.data), args.features or ""
    else:
        prepared = synthetic_dataset(
            workdir / "synthetic", images=args.images, vocab_size=args.vocab_size, mean_words=args.mean_words
        )
    dataset = PreparedDataset.load(prepared, limit=args.limit)
    if not args.data or args.random_features:
        config = ModelConfig(vocab_size=len(dataset.vocab), **settings)
        features = str(synthetic_features(prepared, workdir / "features", config, args.limit))
    if not args.data and len(dataset.vocab) < args.vocab_size:
        print(f"note: {args.images} synthetic images use only {len(dataset.vocab)} of {args.vocab_size} words")
    # one run per (source, precision, decoder, batching), named by the parts that take more than one value
    axes = {"precision": args.precisions, "decoder": args.decoders, "batching": args.batching}
    variants = {}
    for source in args.sources:
        if source == "features" and not features:
            continue
        for combination in itertools.product(*axes.values()):
            parts = [value for value, values in zip(combination, axes.values(), strict=True) if len(values) > 1]
            variants["_".join([source, *parts])] = (source, *combination)
    sources = list(variants)
    trainers, shared = {}, None
    for name, (source, precision, decoder, _) in variants.items():
        from_store = source == "features"
        try:
            trainers[name] = new_run(
                workdir / f"run-{name}",
                ModelConfig(vocab_size=len(dataset.vocab), decoder=decoder, **settings),
                TrainConfig(batch_size=max(args.batch_captions), seed=0, precision=precision),
                DataConfig(
                    prepared=str(prepared),
                    features=features if from_store else "",
                    limit=args.limit,
                    # the first run holds the store (in memory when it fits); the others read that one copy
                    feature_loading="stream" if from_store and shared is not None else "auto",
                ),
                java=False,
            )
        except InputError as error:  # e.g. --limit against a store of the whole dataset: one line, as sat train says it
            raise SystemExit(f"train_speed.py: error: {error}") from None
        if from_store:
            shared = trainers[name].data.features if shared is None else shared
            trainers[name].data.features = shared
    first = trainers[sources[0]]
    batches = {}
    for name, (*_, batching) in variants.items():
        data = trainers[name].data
        for size in args.batch_captions:
            longest = data.longest if batching == "length" else None
            every = epoch_batches(data.train_rows, data.caption_rows, size, epoch=0, seed=0, longest=longest)
            batches[name, size] = [rows for rows in every if sum(len(data.caption_rows[i]) for i in rows) >= size]
            if not batches[name, size]:
                raise SystemExit(f"{len(data.train_rows)} training images do not make one batch of {size} captions")
    words = (dataset.lengths[dataset.caption_indices("train")] - 2).float()
    parameters = {
        "data": str(prepared) if args.data else "synthetic",
        "features": features if args.features else "random grids (synthetic) in place of the encoder's",
        "limit": args.limit,
        "train_images": len(first.data.train_rows),
        "caption_words_mean": round(float(words.mean()), 2),
        "caption_words_max": int(words.max()),
        "batch_captions": args.batch_captions,
        "warmup_rounds": args.warmup,
        "threads": torch.get_num_threads(),
        "model": to_dict(first.model_config),
        "train": to_dict(first.config),
    }
    if args.profile:
        parameters.update(profiled_steps=args.profile, rounds=None)
        runs = {(name, size) for name in sources for size in args.batch_captions}
        profiles = {f"{n}_batch_{size}": profile_steps(trainers[n], batches[n, size], args.profile) for n, size in runs}
        return {"parameters": parameters, "profile": dict(sorted(profiles.items()))}
    kinds = ("step", "phases") if args.phases else ("step",)
    tasks = [(source, size, kind) for source in sources for size in args.batch_captions for kind in kinds]
    rounds = args.repeats or max(len(b) for b in batches.values())
    throughput = {(s, n): [] for s in sources for n in args.batch_captions}
    step_seconds = {(s, n): [] for s in sources for n in args.batch_captions}
    captions = {(s, n): [] for s in sources for n in args.batch_captions}
    ran = {(s, n): [] for s in sources for n in args.batch_captions}
    phases = {(s, n): {p: [] for p in PHASES} for s in sources for n in args.batch_captions}
    for r in range(-args.warmup, rounds):
        for source, size, kind in tasks if r % 2 == 0 else tasks[::-1]:
            own = batches[source, size]
            if not args.repeats and r >= len(own):
                continue  # a whole epoch each: this run's epoch has fewer batches
            rows = own[r % len(own)]
            trainer = trainers[source]
            if kind == "step":
                start = time.perf_counter()
                stats = cross_entropy_step(trainer, rows)
                seconds = time.perf_counter() - start
                if r >= 0:
                    throughput[source, size].append(stats["captions"] / seconds)
                    step_seconds[source, size].append(seconds)
                    captions[source, size].append(stats["captions"])
                    ran[source, size].append(rows)
            else:
                split = timed_phases(trainer, rows)
                if r >= 0:
                    for phase, seconds in split.items():
                        phases[source, size][phase].append(seconds)
        if r >= 0:
            print(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{s} x{n} {v[-1]:.1f} captions/s" for (s, n), v in throughput.items() if v)
            )

    results = {}
    for (source, size), values in throughput.items():
        cps = statistics.median(values)
        total = sum(captions[source, size]) / sum(step_seconds[source, size])
        _, precision, decoder, batching = variants[source]
        results[f"{source}_batch_{size}"] = {
            "source": "cached features" if variants[source][0] == "features" else "images through the encoder",
            "precision": precision,
            "decoder": decoder,
            "batching": batching,
            "batch_captions_requested": size,
            "batch_captions_mean": statistics.mean(captions[source, size]),
            "batches": len(values),
            "captions_per_second_median": round(cps, 2),
            "captions_per_second_min_max": [round(min(values), 2), round(max(values), 2)],
            "captions_per_second_overall": round(total, 2),
            "train_step_ms_median": round(1e3 * statistics.median(step_seconds[source, size]), 1),
            **padding(trainers[source], ran[source, size]),
            "flickr8k_epoch_minutes": round(FLICKR8K_TRAIN_CAPTIONS / total / 60, 1),
        }
        if args.phases:
            split = {p: 1e3 * statistics.median(v) for p, v in phases[source, size].items()}
            results[f"{source}_batch_{size}"].update(
                split_ms_median={p: round(v, 1) for p, v in split.items()},
                split_fraction={p: round(v / sum(split.values()), 3) for p, v in split.items()},
                split_sum_ms=round(sum(split.values()), 1),
            )
    ratios = {}
    if "features" in sources and "images" in sources:
        for size in args.batch_captions:
            per_round = [a / b for a, b in zip(throughput["features", size], throughput["images", size], strict=True)]
            ratios[f"features_over_images_batch_{size}"] = round(statistics.median(per_round), 2)
    # whole-run rates (captions over seconds): batches of different lengths take different times
    overall = {name: result["captions_per_second_overall"] for name, result in results.items()}
    for name, result in results.items():
        for axis, numerator, denominator in (("batching", "length", "random"), ("decoder", "transformer", "lstm")):
            if result[axis] != numerator:
                continue
            twin = [other for other, r in results.items() if r[axis] == denominator and _same_but(r, result, axis)]
            if twin:
                ratios[f"{name}: {numerator}_over_{denominator}"] = round(overall[name] / overall[twin[0]], 3)
    parameters["rounds"] = rounds if args.repeats else "one epoch of each run (every batch once)"
    return {
        "parameters": parameters,
        "results": results,
        "ratios": ratios,
        "target_features_at_least_50_captions_per_second": {
            name: value["captions_per_second_median"] >= 50
            for name, value in results.items()
            if name.startswith("features")
        },
    }


def profile_steps(run: Run, batches: list[list[int]], steps: int, top: int = 15) -> dict:
    """Where a step goes, from torch.profiler over `steps` steps (after one that is not profiled), as shares
    of the steps' CPU time: by phase (cross_entropy_step's marks), by the decoder's modules in the forward pass (a
    module's own and its children's time; soft_step: soft attention's teacher-forced steps), by autograd function in
    the backward pass, and the ops with the most self time (an op's time outside the ops it calls)."""
    from torch.autograd.profiler import record_function

    cross_entropy_step(run, batches[-1])
    open_scopes = []

    def enter(name: str) -> None:
        open_scopes.append(record_function(name))
        open_scopes[-1].__enter__()

    def leave(*_) -> None:
        open_scopes.pop().__exit__(None, None, None)

    def mark(phase: str) -> None:
        leave()
        if phase != PHASES[-1]:
            enter(f"phase::{PHASES[PHASES.index(phase) + 1]}")

    hooks = []
    decoder = run.model.decoder
    for name, module in decoder.named_children():
        hooks.append(module.register_forward_pre_hook(lambda *_, name=name: enter(f"module::{name}")))
        hooks.append(module.register_forward_hook(leave))
    if hasattr(decoder, "soft_step"):  # soft attention's teacher-forced step reads its weights, not its modules

        def soft_step(*args, plain=decoder.soft_step):
            with record_function("module::soft_step"):
                return plain(*args)

        decoder.soft_step = soft_step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for rows in batches[:steps]:
            enter(f"phase::{PHASES[0]}")
            cross_entropy_step(run, rows, mark=mark)
    for hook in hooks:
        hook.remove()
    vars(decoder).pop("soft_step", None)
    events = profiler.key_averages()
    inclusive = {event.key: event.cpu_time_total for event in events}
    total = sum(inclusive.get(f"phase::{phase}", 0.0) for phase in PHASES)

    def share(microseconds: float) -> float:
        return round(microseconds / total, 4)

    backward_prefix = "autograd::engine::evaluate_function: "
    backward = sorted((e for e in events if e.key.startswith(backward_prefix)), key=lambda e: -e.cpu_time_total)
    ops = sorted(events, key=lambda event: -event.self_cpu_time_total)
    return {
        "steps": min(steps, len(batches)),
        "step_ms": round(total / 1e3 / min(steps, len(batches)), 1),
        "phases": {phase: share(inclusive.get(f"phase::{phase}", 0.0)) for phase in PHASES},
        "forward_modules": {
            key.removeprefix("module::"): share(value) for key, value in inclusive.items() if key.startswith("module::")
        },
        "backward_functions": {e.key.removeprefix(backward_prefix): share(e.cpu_time_total) for e in backward[:top]},
        "top_ops_self_time": {e.key: share(e.self_cpu_time_total) for e in ops[:top]},
        "note": "shares of the profiled steps' CPU time (the phases sum to 1); phase::* and module::* rows among the "
        "ops are Python time outside any op",
    }


def _same_but(a: dict, b: dict, axis: str) -> bool:
    keys = ("source", "precision", "decoder", "batching", "batch_captions_requested")
    return all(a[key] == b[key] for key in keys if key != axis)


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
    parser.add_argument("--decoders", nargs="+", choices=["lstm", "transformer"], default=["lstm"])
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=["random", "length"],
        default=["random"],
        help="each run's batches: random (a shuffled epoch) or length (train.bucket_by_length); each run takes "
        "batch r of its own epoch in round r",
    )
    parser.add_argument(
        "--random-features",
        action="store_true",
        help="with --data: time the dataset's captions on random grids at --image-size in place of the encoder's",
    )
    parser.add_argument("--image-size", type=int, help="photo side of the random grids (default 224: 7x7; 448: 14x14)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of each split (DataConfig)")
    parser.add_argument(
        "--phases",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each phase of the step (one more step per round)",
    )
    add_rounds(parser, 10, warmup=1, help="measured rounds (0: one epoch of each run)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of timing, profile this many steps of each run (torch.profiler): where a step's time goes",
    )
    add_threads(parser)
    parser.add_argument("--images", type=int, default=200, help="synthetic: training images (5 captions each)")
    parser.add_argument("--vocab-size", type=int, default=FLICKR8K_VOCAB_SIZE, help="synthetic: vocabulary size")
    parser.add_argument("--mean-words", type=float, default=11.0, help="synthetic: mean caption length in words")
    add_note(parser)
    args = parser.parse_args()
    if args.features and not args.data:
        parser.error("--features needs --data")
    if args.random_features and (args.features or not args.data):
        parser.error("--random-features needs --data and no --features")
    record = begin_record(args)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as workdir:
        record.update(measure(args, Path(workdir)))
    load_at_end(record, args.note)
    if args.profile:
        for name, profile in record["profile"].items():
            print(name, "top ops (share of self time):", json.dumps(profile["top_ops_self_time"]))
        shown = {
            name: {key: profile[key] for key in ("step_ms", "phases", "forward_modules")}
            for name, profile in record["profile"].items()
        }
        return finish(record, args.out, shown, indent=None)
    for name, result in record["results"].items():
        split = ", ".join(f"{phase} {ms:.0f}" for phase, ms in result.get("split_ms_median", {}).items())
        print(
            f"{name}: {result['captions_per_second_median']} captions/s (median batch), "
            f"{result['captions_per_second_overall']} overall; split (ms): {split or 'not timed'}"
        )
    shown = {"ratios": record["ratios"], "target": record["target_features_at_least_50_captions_per_second"]}
    return finish(record, args.out, shown, indent=None)


if __name__ == "__main__":
    sys.exit(main())
