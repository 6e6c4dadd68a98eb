"""How the product captions everyday photos: `Captioner` at its defaults over the coco-dev photos, scored with the
coco-caption metrics against their 5 COCO captions each, and for object hallucination against their COCO object
annotations (CHAIR-i, CHAIR-s, and photos without people captioned with people): at the defaults (label guidance,
templates and the COCO detector), with each guidance source alone, and unguided.

    python benchmarks/coco_dev.py --coco-dev ../shared/data/coco-dev --out results/coco_dev.json

Any folder in the COCO caption format works (`captions_*.json` beside an `images/` folder; CHAIR where an
`instances_*.json` is there too). The record holds the metrics (x100) of each variant and every photo's captions,
so a reader can see what each source of guidance changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import begin_record, benchmark_parser
from tqdm import tqdm

from show_attend_tell.captioner import Captioner
from show_attend_tell.chair import chair, coco_objects, people_without_people
from show_attend_tell.datasets import coco_folder
from show_attend_tell.guidance import Guidance
from show_attend_tell.inference import Int8Decoder
from show_attend_tell.metrics import score_captions
from show_attend_tell.records import write_record


def main() -> int:
    parser = benchmark_parser(__doc__, record="coco_dev.json", required=True)
    parser.add_argument("--coco-dev", type=Path, required=True, help="folder with captions_*.json and images/")
    parser.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--encoder-precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    parser.add_argument("--detector", default="centernet", help="the COCO detector of the defaults ('none': none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat-words", action="store_true", help="let captions repeat words (`sat caption` flag)")
    args = parser.parse_args()
    record = begin_record(args)
    paths, references = coco_folder(args.coco_dev)
    instances = sorted(args.coco_dev.glob("instances_*.json"))
    objects = coco_objects(instances[0], [p.name for p in paths]) if instances else None
    detector = None if args.detector == "none" else args.detector
    captioner = Captioner.load(args.model, int8=args.int8, encoder_precision=args.encoder_precision, detector=detector)
    record.update(
        model=args.model or "shipped",
        int8=isinstance(captioner.model.decoder, Int8Decoder),  # as loaded: the default is int8 when calibrated
        encoder_precision=captioner.encoder_precision,  # as loaded: auto picks bf16 on CPUs with native bf16
        guidance_threshold=captioner.guidance.threshold,
        template_threshold=captioner.guidance.template_threshold,
        repeat_words=args.repeat_words,
        detector=captioner.detector_name,
        detector_settings={
            key: getattr(captioner.guidance, key)
            for key in (
                "detection_threshold",
                "presence_threshold",
                "person_presence_threshold",
                "person_penalty",
                "object_penalty",
                "count_threshold",
                "least_count",
            )
        },
        images=len(paths),
        results={},
        captions={},
    )
    defaults = captioner.guidance
    detector_alone = Guidance(
        defaults.vocab,
        threshold=None,
        new_words=defaults.new_words,
        **record["detector_settings"],
    )
    # name: (the guidance, guide, templates, detect)
    variants = {
        "guided": (defaults, True, True, True),
        "labels_and_templates": (defaults, True, True, False),
        "guided_without_templates": (defaults, True, False, True),
        "labels_alone": (defaults, True, False, False),
        "detector_alone": (detector_alone, True, False, True),
        "unguided": (defaults, False, False, False),
    }
    for variant, (guidance, guide, templates, detect) in variants.items():
        if detect and captioner.detector is None:
            continue
        captioner.guidance = guidance
        captions, guides, written = [], [], []
        for start in tqdm(range(0, len(paths), args.batch_size), desc=variant):
            batch = paths[start : start + args.batch_size]
            for caption in captioner.caption_batch(
                batch, guide=guide, templates=templates, detect=detect, repeat_words=args.repeat_words
            ):
                captions.append(caption.text)
                guides.append([word.as_dict() for word in caption.guidance])
                written.append(caption.template)
        metrics = score_captions(dict(enumerate(captions)), dict(enumerate(references)))
        record["results"][variant] = {
            "guided_photos": sum(bool(g) for g in guides),
            "template_photos": sum(written),
            **{k: round(metrics[k], 2) for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
        }
        if objects is not None:
            hallucination = chair(captions, objects)
            record["results"][variant].update(
                {key: hallucination[key] for key in ("CHAIR-i", "CHAIR-s")},
                people_without_people=people_without_people(captions, objects),
            )
        print(variant, json.dumps(record["results"][variant]), flush=True)
        for path, caption, guide_words, template in zip(paths, captions, guides, written, strict=True):
            entry = record["captions"].setdefault(path.name, {})
            entry[variant] = caption
            if variant == "guided" and guide_words:
                entry["guidance"] = guide_words  # the defaults' (a template's concept, for a template caption)
            if variant == "guided" and template:
                entry["template"] = True
            if variant == "guided" and objects is not None:
                entry["hallucinated"] = chair([caption], [objects[paths.index(path)]])["hallucinated"][0]
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
