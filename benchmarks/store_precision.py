"""What storing features in fp16 instead of fp32 does to captions (issue #19): the shipped model on Flickr8k val.

The encoder runs once over the val photos in fp32 (the shipped model's 448 px, 14x14 grid); the decoder (fp32,
unguided, the default beam) then captions the same features twice: as computed (an fp32 store) and rounded to
fp16 and back (what `sat features` stores by default, and what the shipped model was trained on). Recorded: the
coco-caption metrics of both, how many captions are identical, and the largest rounding error of a feature.
This measures storage precision at decoding only; training on an fp32 store is not measured here (a full
training run of the shipped model is over three hours on this CPU).

    python benchmarks/store_precision.py --data /work/data/f8k --out results/store_precision_flickr8k.json
"""

from __future__ import annotations

import json
import sys

import torch
from harness import begin_record, benchmark_parser, finish
from tqdm import tqdm

from show_attend_tell.captioner import SHIPPED_MODEL
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.evaluate import evaluate
from show_attend_tell.features import dataset_features
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.runtime import load_model


def main() -> int:
    parser = benchmark_parser(__doc__, record="store_precision_flickr8k.json")
    parser.add_argument("--data", required=True, help="prepared Flickr8k (sat prepare)")
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split (0: all)")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE)
    parser.add_argument("--batch-size", type=int, default=8, help="photos per encoder pass")
    args = parser.parse_args()
    record = begin_record(args)
    dataset = PreparedDataset.load(args.data)
    rows = dataset.indices(args.split)[: args.limit or None]
    model, vocab, _ = load_model(args.model, int8=False)
    grids, features = [], dataset_features(model, dataset)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), args.batch_size), desc="encoder (fp32)", unit="batch"):
            grids.append(features(rows[start : start + args.batch_size]))  # (B, P, E) fp32
    fp32 = torch.cat(grids)
    position = {row: n for n, row in enumerate(rows)}
    stores = {"float32": fp32, "float16": fp32.half().float()}
    error = (stores["float16"] - fp32).abs()
    references = {i: dataset.images[i].captions for i in rows}
    results, captions = {}, {}
    for name, store in stores.items():
        metrics, captions[name] = evaluate(
            model,
            vocab,
            lambda batch, store=store: store[[position[i] for i in batch]],
            rows,
            references,
            beam_size=args.beam,
        )
        results[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
        print(name, json.dumps(results[name]), flush=True)
    same = sum(captions["float16"][i] == captions["float32"][i] for i in rows)
    record.update(
        model=args.model,
        split=args.split,
        images=len(rows),
        beam_size=args.beam,
        decoder="fp32, unguided",
        results=results,
        identical_captions=same,
        feature_rounding={
            "max_abs_error": float(error.max()),
            "mean_abs_error": float(error.mean()),
            "max_abs_feature": float(fp32.abs().max()),
        },
        not_measured="training on an fp32 store (the shipped model was trained on fp16 stores); the 512-d "
        "projected store",
    )
    return finish(record, args.out)


if __name__ == "__main__":
    sys.exit(main())
