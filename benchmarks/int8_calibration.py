"""How often the int8 decoder writes the fp32 decoder's caption, by how its input ranges are calibrated.

The shipped model's captions at the default beam over photos of one split, in fp32 and in int8 with ranges
calibrated on training photos (inference.calibrate_int8): per input channel (what the product uses: each channel
divided by its calibrated peak) and, as the ablation, one range per layer (every channel on the widest range),
each from a few calibration sizes. Features are computed once by the model's encoder and shared by every variant.

    python benchmarks/int8_calibration.py --data prepared/f8k --out results/int8_calibration.json
"""

from __future__ import annotations

import sys

import torch
from harness import begin_record, benchmark_parser
from tqdm import tqdm

from show_attend_tell import runtime
from show_attend_tell.calibration import calibration_sample
from show_attend_tell.captioner import SHIPPED_MODEL
from show_attend_tell.checkpoint import load_model
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.decoding import beam_search
from show_attend_tell.features import dataset_features
from show_attend_tell.inference import Int8Decoder, Int8Linear, calibrate_int8
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.records import write_record


def features_of(model, dataset: PreparedDataset, rows: list[int], description: str) -> torch.Tensor:
    batches, features = [], dataset_features(model, dataset)
    for start in tqdm(range(0, len(rows), 8), desc=description):
        with torch.no_grad():
            batches.append(features(rows[start : start + 8]).half())
    return torch.cat(batches)


def one_range_per_layer(decoder, ranges) -> Int8Decoder:
    """The ablation: every input channel of a layer quantized over the layer's widest range."""

    def layer(name, weight, bias):
        low, high = ranges[name]
        return Int8Linear(weight, bias, low.min().expand_as(low), high.max().expand_as(high))

    return Int8Decoder(decoder, layer)


def captions(decoder, features: torch.Tensor, beam_size: int) -> list[list[int]]:
    found = []
    with torch.no_grad():
        for batch in features.split(50):
            found += [
                beams[0].tokens for beams in beam_search(decoder, decoder.encode(batch.float()), beam_size=beam_size)
            ]
    return found


def main() -> int:
    parser = benchmark_parser(__doc__, record="int8_calibration.json", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset directory (`sat prepare`)")
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--split", default="test", help="the photos whose captions are compared")
    parser.add_argument("--images", type=int, default=300, help="photos of --split compared")
    parser.add_argument("--calibration-images", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE)
    args = parser.parse_args()
    record = begin_record(args)
    torch.manual_seed(0)
    dataset = PreparedDataset.load(args.data)
    model, _, _ = load_model(args.model)
    fp32, _, _ = runtime.load_model(args.model, with_encoder=False)
    compared = dataset.indices(args.split)[: args.images]
    calibration = calibration_sample(dataset.indices("train"), max(args.calibration_images), 0)
    train_features = features_of(model, dataset, calibration, "train photos")
    test_features = features_of(model, dataset, compared, f"{args.split} photos")
    reference = captions(fp32.decoder, test_features, args.beam)
    results = {}
    for count in args.calibration_images:
        ranges = calibrate_int8(model.decoder, train_features[:count].float().split(32), beam_size=args.beam)
        for scheme, decoder in (
            ("per_channel", Int8Decoder.quantized(model.decoder, ranges)),
            ("one_range_per_layer", one_range_per_layer(model.decoder, ranges)),
        ):
            found = captions(decoder, test_features, args.beam)
            same = sum(a == b for a, b in zip(found, reference, strict=True))
            results[f"{scheme}_{count}_photos"] = {"same_caption_as_fp32": same, "of": len(reference)}
            print(scheme, count, same, "of", len(reference), flush=True)
    record.update(
        model=args.model,
        split=args.split,
        beam_size=args.beam,
        calibration="the first N of 256 training photos drawn with seed 0 (calibration_sample), as `sat calibrate`",
        results=results,
    )
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
