"""The encoder's precisions side by side (issue #20): speed of each path against today's fp32 encoder, and how far
its features move.

Variants: `today` is model.Encoder as it ran before fast_encoder.py (fp32, BatchNorm unfolded, contiguous
memory); `fp32`, `bf16` and `int8` are fast_encoder.FastEncoder (int8 with the model's calibration, `sat calibrate
--encoder-int8`, when it has one). Three measurements, each in interleaved rounds (every variant once per round,
the order reversed every other round) so that a busy spell of the shared machine hits them all; figures are
medians over rounds and each ratio is the median of the per-round ratios to `today`:

- encoder: one photo's forward at the model's image size;
- caption: one photo's caption latency through Captioner.caption_batch at the product's defaults;
- features: `sat features`' work (features.extract_features, photo decoding included) on --feature-images
  photos of a prepared dataset, as photos per second (int8 is left out: stores are filled in bf16 or fp32).

Also recorded: the CPU's flags that matter, which precision `auto` picks here, and each variant's feature
difference from `today` (relative L2 and largest difference over the largest value) on the photos.

    python benchmarks/encoder_precision.py --model DIR --data /work/data/f8k --out results/encoder_precision.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from harness import REPO, add_threads, begin_record, benchmark_parser, finish, interleaved, median, per_round_ratio

from show_attend_tell.captioner import SHIPPED_MODEL, Captioner
from show_attend_tell.checkpoint import ENCODER_INT8_KEY, read_config
from show_attend_tell.config import to_dict
from show_attend_tell.fast_encoder import BF16_FLAGS, INT8_FLAGS, cpu_flags, resolve_precision, supported_precisions
from show_attend_tell.features import extract_features
from show_attend_tell.images import load_image
from show_attend_tell.inference import image_features
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.runtime import load_model
from show_attend_tell.weights import image_transform


def timed(variants: dict, repeats: int, *, per: float = 1.0) -> dict:
    """Median ms (per `per` items) of each variant over interleaved rounds (one warm-up round first: first-call
    allocations and oneDNN kernel selection) and the median per-round speed-up over `today`."""
    seconds = interleaved({name: lambda _, run=run: run() for name, run in variants.items()}, repeats, warmup=1).seconds
    return {
        "median_ms": {name: median(values, scale=1e3 / per, digits=1) for name, values in seconds.items()},
        "speedup_over_today": {
            name: median(per_round_ratio(seconds["today"], values), digits=2)
            for name, values in seconds.items()
            if name != "today"
        },
    }


def main() -> int:
    parser = benchmark_parser(__doc__, record="encoder_precision.json")
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--data", required=True, help="prepared dataset whose photos `sat features` runs over")
    parser.add_argument("--photo", default=str(REPO / "examples" / "chelsea.jpg"), help="the one-photo measurements'")
    parser.add_argument("--feature-images", type=int, default=48, help="photos per `sat features` round")
    parser.add_argument("--repeats", type=int, default=9, help="measured rounds of each measurement")
    add_threads(parser)
    args = parser.parse_args()
    record = begin_record(args)
    flags = cpu_flags()
    calibrated = ENCODER_INT8_KEY in read_config(args.model)
    precisions = [p for p in supported_precisions("cpu", flags) if p != "int8" or calibrated]

    # model.Encoder and the int8 decoder, as `sat caption` ran before fast_encoder.py
    captioners = {"today": Captioner(*load_model(args.model, int8=True))}
    for precision in precisions:
        captioners[precision] = Captioner.load(args.model, encoder_precision=precision)
    config = captioners["today"].model.config
    photo = load_image(args.photo)

    with torch.inference_mode():
        images = image_transform(config)(photo).unsqueeze(0)  # (1, 3, S, S)
        encoders = {name: captioner.model.encoder for name, captioner in captioners.items()}
        encoder = timed({n: (lambda e=e: e(images)) for n, e in encoders.items()}, args.repeats)
        caption = timed({n: (lambda c=c: c.caption_batch([photo])) for n, c in captioners.items()}, args.repeats)
        captions = {name: captioner.caption_batch([photo])[0].text for name, captioner in captioners.items()}

        dataset = PreparedDataset.load(args.data)
        paths = [image.path for image in dataset.images][: args.feature_images]
        pictures = [load_image(path) for path in paths[:8]]
        reference = image_features(encoders["today"], pictures, config)
        differences = {}
        for name, fast in encoders.items():
            found = image_features(fast, pictures, config)
            differences[name] = {
                "relative_l2": float((found - reference).norm() / reference.norm()),
                "max_over_max": float((found - reference).abs().max() / reference.abs().max()),
            }
        with tempfile.TemporaryDirectory(prefix="sat-bench-") as work:
            sha = read_config(args.model)["encoder_sha256"]

            def fill(name: str) -> None:
                extract_features(
                    paths,
                    Path(work) / name,
                    config=config,
                    encoder=encoders[name],
                    encoder_sha256=sha,
                    overwrite=True,
                    progress=False,
                )

            store_variants = {name: (lambda n=name: fill(n)) for name in encoders if name != "int8"}
            features = timed(store_variants, max(3, args.repeats // 3), per=len(paths))
            features["photos_per_second"] = {n: round(1e3 / ms, 2) for n, ms in features["median_ms"].items()}

    record.update(
        parameters={
            "model": args.model,
            "model_config": to_dict(config),
            "photo": args.photo,
            "feature_images": len(paths),
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_flags": sorted(flags & (BF16_FLAGS | INT8_FLAGS)),
            "supported_precisions": supported_precisions("cpu", flags),
            "auto_picks": resolve_precision("auto", "cpu", flags),
        },
        encoder_forward=encoder,
        caption_latency=caption,
        features=features,
        feature_difference_from_today=differences,
        captions=captions,
    )
    return finish(record, args.out, {k: record[k] for k in ("encoder_forward", "caption_latency", "features")})


if __name__ == "__main__":
    sys.exit(main())
