"""How the product captions everyday photos: `Captioner` at its defaults over the coco-dev photos, scored with the
coco-caption metrics against their 5 COCO captions each: at the defaults (label guidance and template captions),
with guidance but no templates, and with neither.

    python benchmarks/coco_dev.py --coco-dev ../shared/data/coco-dev --out results/coco_dev.json

Any folder in the COCO caption format works (`captions_*.json` beside an `images/` folder). The record holds the
metrics (x100) of each variant and every photo's captions, so a reader can see what guidance and templates changed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from show_attend_tell.captioner import Captioner
from show_attend_tell.datasets import read_coco
from show_attend_tell.inference import Int8Decoder
from show_attend_tell.metrics import score_captions
from show_attend_tell.records import provenance, write_record


def coco_folder(directory: Path) -> tuple[list[Path], list[list[str]]]:
    """The photos of a COCO-format folder (captions_*.json beside images/), sorted by name, and their captions."""
    raw = read_coco(sorted(directory.glob("captions_*.json")), directory / "images")
    records = sorted(raw.records, key=lambda record: record.path.name)
    return [record.path for record in records], [record.captions for record in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-dev", type=Path, required=True, help="folder with captions_*.json and images/")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--encoder-precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = provenance(shlex.join(["python", *sys.argv]))
    paths, references = coco_folder(args.coco_dev)
    captioner = Captioner.load(args.model, int8=args.int8, encoder_precision=args.encoder_precision)
    record.update(
        model=args.model or "shipped",
        int8=isinstance(captioner.model.decoder, Int8Decoder),  # as loaded: the default is int8 when calibrated
        encoder_precision=captioner.encoder_precision,  # as loaded: auto picks bf16 on CPUs with native bf16
        guidance_threshold=captioner.guidance.threshold,
        template_threshold=captioner.guidance.template_threshold,
        images=len(paths),
        results={},
        captions={},
    )
    variants = (("guided", True, True), ("guided_without_templates", True, False), ("unguided", False, False))
    for variant, guide, templates in variants:
        captions, guides, written = [], [], []
        for start in tqdm(range(0, len(paths), args.batch_size), desc=variant):
            batch = paths[start : start + args.batch_size]
            for caption in captioner.caption_batch(batch, guide=guide, templates=templates):
                captions.append(caption.text)
                guides.append([word.as_dict() for word in caption.guidance])
                written.append(caption.template)
        metrics = score_captions(dict(enumerate(captions)), dict(enumerate(references)))
        record["results"][variant] = {
            "guided_photos": sum(bool(g) for g in guides),
            "template_photos": sum(written),
            **{k: round(metrics[k], 2) for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
        }
        print(variant, json.dumps(record["results"][variant]), flush=True)
        for path, caption, guide_words, template in zip(paths, captions, guides, written, strict=True):
            entry = record["captions"].setdefault(path.name, {})
            entry[variant] = caption
            if variant == "guided" and guide_words:
                entry["guidance"] = guide_words  # the defaults' (a template's concept, for a template caption)
            if variant == "guided" and template:
                entry["template"] = True
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
