"""Review each template caption against the decoder, with the COCO detector guiding it and without.

    python recipes/review_templates.py --coco-dev ../shared/data/coco-dev --flickr8k ../shared/data/flickr8k \
        --cache work/detector --out results/detector_tuning/templates.json

The issue's rule for templates (labels/imagenet_words.json, recipes/imagenet_words.py): keep a hand-written sentence
only where it still beats the detector-guided decoder. Over the same cache and decoding as recipes/tune_detector.py
(the product's defaults from config.py), each template is disabled alone and the photos it fires on are decoded
instead, with the detector on and off; the record gives each template's photos, its caption and the decoder's there,
and the CIDEr of coco-dev and Flickr8k val with it and without (a set's CIDEr moves only on those photos: CIDEr-D's
document frequencies come from the references, so a set's change times its size over the photos fired on is the
mean CIDEr the template wins or loses on its photos).

The rule: a template stays when, with the detector on, the captions of its photos on both sets together score more
CIDEr with it than the decoder's (the sum over the two sets of each set's change times its size); a template that
only wins with the detector off is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shlex
import sys
from pathlib import Path

from tune_detector import Decoder, seen

from show_attend_tell.captioner import Captioner
from show_attend_tell.datasets import coco_folder, read_flickr8k
from show_attend_tell.guidance import Guidance
from show_attend_tell.metrics import score_captions
from show_attend_tell.records import provenance, write_record


def without(guidance: Guidance, word: str) -> Guidance:
    """A copy of `guidance` whose concept `word` has no template."""
    changed = copy.copy(guidance)  # every setting as it is; only its own list of concepts is new
    changed.concepts = [dataclasses.replace(c, template=None) if c.word == word else c for c in guidance.concepts]
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-dev", type=Path, required=True)
    parser.add_argument("--flickr8k", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="recipes/tune_detector.py's cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = provenance(shlex.join(["python", *sys.argv]))
    captioner = Captioner.load(detector="centernet")
    coco_paths, coco_references = coco_folder(args.coco_dev)
    val = [r for r in read_flickr8k(args.flickr8k).records if r.split == "val"]
    sets = {
        "coco_dev": (coco_paths, coco_references),
        "flickr8k_val": ([r.path for r in val], [r.captions for r in val]),
    }
    decoders = {
        name: Decoder(captioner, seen(captioner, paths, args.cache / f"{name}.pt")) for name, (paths, _) in sets.items()
    }
    base = captioner.guidance
    settings = {
        key: getattr(base, key)
        for key in (
            "threshold",
            "template_threshold",
            "detection_threshold",
            "presence_threshold",
            "person_presence_threshold",
            "person_penalty",
            "object_penalty",
            "count_threshold",
        )
    }
    record.update(settings=settings, images={name: len(paths) for name, (paths, _) in sets.items()}, templates={})

    def cider(name: str, captions: list[str]) -> float:
        references = sets[name][1]
        return round(score_captions(dict(enumerate(captions)), dict(enumerate(references)), java=True)["CIDEr"], 3)

    everything = {}
    for detect in (True, False):
        for name, decoder in decoders.items():
            captions = decoder.captions(base, detect=detect)
            everything[detect, name] = (captions, cider(name, captions))
    record["all_templates"] = {
        ("detector_on" if detect else "detector_off") + "_" + name: value[1]
        for (detect, name), value in everything.items()
    }
    for concept in [c for c in base.concepts if c.template is not None]:
        entry = {"template": " ".join(concept.template)}
        for detect in (True, False):
            view, gain = {}, 0.0
            rule = without(base, concept.word)
            for name, decoder in decoders.items():
                captions, score = everything[detect, name]
                plans = base.plan(
                    len(decoder.detections),
                    class_probabilities=decoder.stored["probabilities"],
                    detections=decoder.detections if detect else None,
                )
                fired = [
                    i for i, plan in enumerate(plans) if plan.template and plan.template.guide.word == concept.word
                ]
                if not fired:
                    view[name] = {"photos": 0}
                    continue
                instead = decoder.captions(rule, detect=detect)
                score_without = cider(name, instead)
                change = round(score - score_without, 3)
                gain += change * len(captions)
                view[name] = {
                    "photos": len(fired),
                    "cider_with": score,
                    "cider_without": score_without,
                    "mean_cider_gain_on_its_photos": round(change * len(captions) / len(fired), 2),
                    "captions": {
                        Path(sets[name][0][i]).name: {"template": captions[i], "decoder": instead[i]} for i in fired
                    },
                }
            view["cider_gain_sum"] = round(gain, 2)  # set change x set size, summed: CIDEr points over its photos
            entry["detector_on" if detect else "detector_off"] = view
        on, off = entry["detector_on"]["cider_gain_sum"], entry["detector_off"]["cider_gain_sum"]
        fires = any(entry[v][s]["photos"] for v in ("detector_on", "detector_off") for s in sets)
        entry["decision"] = (
            "keep" if on > 0 else "keep without the detector only" if off > 0 else "remove" if fires else "never fires"
        )
        print(concept.word, entry["decision"], on, off, flush=True)
        record["templates"][concept.word] = entry
    record["rule"] = (
        "keep a template when, with the detector on, its photos' CIDEr summed over coco-dev and Flickr8k val is higher "
        "with it than with the decoder's captions; templates that win only with the detector off are marked so"
    )
    write_record(record, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
