"""Choose when the encoder's labels guide a caption, on coco-dev and Flickr8k val together.

    python recipes/tune_guidance.py --coco-dev ../shared/data/coco-dev --data prepared/f8k --cache work/guidance \
        --out results/guidance_tuning.json

Each photo is encoded once (grid features and ImageNet class probabilities, cached in --cache), then decoded
at the default beam without guidance and, when its most probable label concept reaches the lowest threshold,
with that concept as a constraint (--max-label-words 2: its two most probable). A threshold only selects which
of these captions a photo gets, so every threshold is scored without decoding again. The record lists
BLEU-4, METEOR, ROUGE-L and CIDEr on both sets for each threshold; its "chosen" is the threshold with the
largest coco-dev CIDEr (ties: the higher, which changes fewer Flickr8k captions).

Then the template threshold, at the default guidance threshold: a photo whose most probable concept has a
template caption (labels/imagenet_words.json) gets it when the concept reaches the threshold, else its guided
caption. The record's "chosen_template" is the threshold with the largest coco-dev CIDEr among those that keep
Flickr8k val CIDEr within VAL_TOLERANCE of no templates (ties: the higher threshold, which changes fewer
captions).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from show_attend_tell.captioner import SHIPPED_MODEL
from show_attend_tell.checkpoint import load_model
from show_attend_tell.config import DEFAULT_BEAM_SIZE, DEFAULT_GUIDANCE_THRESHOLD, DEFAULT_LENGTH_PENALTY
from show_attend_tell.datasets import coco_folder
from show_attend_tell.features import photo_features
from show_attend_tell.guidance import Guidance, LabelHead, Plan, search
from show_attend_tell.metrics import score_captions
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.records import provenance, write_record

THRESHOLDS = [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 1.01]  # 1.01: never guide
TEMPLATE_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]  # 1.01: no templates
VAL_TOLERANCE = 0.5  # CIDEr points a template threshold may cost Flickr8k val (the tolerance on test)
METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def encoded_set(model, head: LabelHead, paths: list[Path], cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P, E) fp16 grid features and (N, 1000) class probabilities of `paths`, computed once into `cache`."""
    if cache.is_file():
        stored = torch.load(cache)
        if stored["paths"] == [str(p) for p in paths]:
            return stored["features"], stored["probabilities"]
    features, probabilities = [], []
    for path in tqdm(paths, desc=f"encode {cache.stem}"):
        with torch.no_grad():
            grid = photo_features(model.encoder, model.config, [path])  # (1, P, E)
        features.append(grid[0].half())
        probabilities.append(head(grid)[0])
    stored = {
        "paths": [str(p) for p in paths],
        "features": torch.stack(features),
        "probabilities": torch.stack(probabilities),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stored, cache)
    return stored["features"], stored["probabilities"]


def decode_all(model, guidance: Guidance, features, guides, beam_size, batch_size=40) -> list[str]:
    """Each photo's caption with its guide words, through the product's one plan-to-search path (guidance.search)."""
    captions = []
    for start in tqdm(range(0, len(features), batch_size), desc="decode"):
        encoded = model.decoder.encode(features[start : start + batch_size].float())
        plans = [Plan(guides=list(words)) for words in guides[start : start + batch_size]]
        found = search(
            model.decoder, encoded, guidance, plans, beam_size=beam_size, length_penalty=DEFAULT_LENGTH_PENALTY
        )
        captions += [" ".join(guidance.vocab.decode(h[0].tokens)) for h in found]
    return captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-dev", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared Flickr8k (sat prepare)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE)
    parser.add_argument("--max-label-words", type=int, default=1, choices=[1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record = provenance(shlex.join(["python", *sys.argv]))

    model, vocab, _ = load_model(args.model)
    head = LabelHead.for_encoder(model.config.encoder)
    guidance = Guidance(vocab, threshold=min(THRESHOLDS), max_label_words=args.max_label_words)
    dataset = PreparedDataset.load(args.data)
    rows = dataset.indices(args.split)
    sets = {
        "coco_dev": coco_folder(args.coco_dev),
        f"flickr8k_{args.split}": ([dataset.images[i].path for i in rows], [dataset.images[i].captions for i in rows]),
    }
    record.update(
        model=str(args.model),
        beam_size=args.beam,
        thresholds=THRESHOLDS,
        template_thresholds=TEMPLATE_THRESHOLDS,
        template_guidance_threshold=DEFAULT_GUIDANCE_THRESHOLD,
        sets={},
    )
    for name, (paths, references) in sets.items():
        features, probabilities = encoded_set(model, head, paths, args.cache / f"{name}.pt")
        labels = guidance.label_words(probabilities)  # each photo's most probable concepts above the lowest
        variants = {"none": [[] for _ in labels], "top1": [words[:1] for words in labels]}
        if args.max_label_words == 2:
            variants["top2"] = [words[:2] for words in labels]
        captions = {"none": decode_all(model, guidance, features, variants["none"], args.beam)}
        for key in variants.keys() - {"none"}:
            needed = [i for i, words in enumerate(variants[key]) if words]  # the others are "none"'s captions
            decoded = decode_all(model, guidance, features[needed], [variants[key][i] for i in needed], args.beam)
            captions[key] = list(captions["none"])
            for i, caption in zip(needed, decoded, strict=True):
                captions[key][i] = caption
        refs = dict(enumerate(references))
        results = {}
        for max_words in range(1, args.max_label_words + 1):
            for threshold in THRESHOLDS:
                chosen = []
                for i, words in enumerate(labels):
                    guided = [w for w in words[:max_words] if w.probability >= threshold]
                    chosen.append(captions[("none", "top1", "top2")[len(guided)]][i])
                metrics = score_captions(dict(enumerate(chosen)), refs)
                guided_count = sum(c != n for c, n in zip(chosen, captions["none"], strict=True))
                results[f"max{max_words}_t{threshold}"] = {
                    "max_label_words": max_words,
                    "threshold": threshold,
                    "changed_captions": guided_count,
                    **{k: round(metrics[k], 2) for k in METRICS},
                }
                print(name, json.dumps(results[f"max{max_words}_t{threshold}"]), flush=True)
        record["sets"][name] = {
            "images": len(paths),
            "results": results,
            "examples": _examples(paths, labels, captions),
            "templates": _templates(guidance, probabilities, labels, captions, refs, paths, name),
        }
    record["chosen"] = _chosen(record["sets"], f"flickr8k_{args.split}")
    record["chosen_template"] = _chosen_template(record["sets"], f"flickr8k_{args.split}")
    write_record(record, args.out)
    return 0


def _templates(guidance, probabilities, labels, captions, refs, paths, name) -> dict:
    """Each template threshold's scores, over the captions guided at the default guidance threshold."""
    templates = Guidance(guidance.vocab, template_threshold=min(TEMPLATE_THRESHOLDS)).templates(probabilities)
    guided = [
        captions["top1" if words and words[0].probability >= DEFAULT_GUIDANCE_THRESHOLD else "none"][i]
        for i, words in enumerate(labels)
    ]
    results, examples = {}, []
    for threshold in TEMPLATE_THRESHOLDS:
        chosen = list(guided)
        for i, template in enumerate(templates):
            if template is not None and template.probability >= threshold:
                chosen[i] = " ".join(template.words)
        metrics = score_captions(dict(enumerate(chosen)), refs)
        changed = sum(c != g for c, g in zip(chosen, guided, strict=True))
        results[f"t{threshold}"] = {
            "threshold": threshold,
            "changed_captions": changed,
            **{k: round(metrics[k], 2) for k in METRICS},
        }
        print(name, "template", json.dumps(results[f"t{threshold}"]), flush=True)
    for i, template in enumerate(templates):
        if template is not None:
            examples.append(
                {
                    "image": Path(paths[i]).name,
                    "label": template.guide.as_dict(),
                    "guided": guided[i],
                    "template": " ".join(template.words),
                }
            )
    return {"results": results, "examples": examples}


def _best(coco: dict, flickr: dict, never: str, tolerance: float = float("inf")) -> str:
    """The key with the largest coco-dev CIDEr among those whose val CIDEr is within `tolerance` of `never`'s;
    of equals, the higher threshold, which changes fewer captions."""
    allowed = [key for key in coco if flickr[key]["CIDEr"] >= flickr[never]["CIDEr"] - tolerance]
    return max(allowed, key=lambda key: (coco[key]["CIDEr"], coco[key]["threshold"]))


def _chosen(sets: dict, val: str) -> dict:
    """The guidance threshold (one label word) with the largest coco-dev CIDEr (no bound on val)."""
    never = f"max1_t{max(THRESHOLDS)}"
    coco, flickr = (
        {k: v for k, v in sets[name]["results"].items() if k.startswith("max1_")} for name in ("coco_dev", val)
    )
    best = _best(coco, flickr, never)
    return {
        "threshold": coco[best]["threshold"],
        "max_label_words": 1,
        "rule": "the largest coco-dev CIDEr; of equals, the higher threshold, which changes fewer val captions",
        "coco_dev": {"chosen": coco[best], "unguided": coco[never]},
        val: {"chosen": flickr[best], "unguided": flickr[never]},
    }


def _chosen_template(sets: dict, val: str) -> dict:
    """The template threshold with the largest coco-dev CIDEr that keeps val CIDEr within VAL_TOLERANCE of no
    templates."""
    coco, flickr = sets["coco_dev"]["templates"]["results"], sets[val]["templates"]["results"]
    never = f"t{max(TEMPLATE_THRESHOLDS)}"
    best = _best(coco, flickr, never, VAL_TOLERANCE)
    return {
        "template_threshold": coco[best]["threshold"],
        "rule": f"the largest coco-dev CIDEr among thresholds that keep {val} CIDEr within {VAL_TOLERANCE} of no "
        "templates; of equals, the higher threshold",
        "coco_dev": {"chosen": coco[best], "no_templates": coco[never]},
        val: {"chosen": flickr[best], "no_templates": flickr[never]},
    }


def _examples(paths, labels, captions, count: int = 12) -> list[dict]:
    """A few photos whose caption guidance changes, for reading."""
    out = []
    for i, words in enumerate(labels):
        if words and captions["top1"][i] != captions["none"][i]:
            out.append(
                {
                    "image": Path(paths[i]).name,
                    "labels": [w.as_dict() for w in words],
                    "unguided": captions["none"][i],
                    "guided_top1": captions["top1"][i],
                    **({"guided_top2": captions["top2"][i]} if "top2" in captions else {}),
                }
            )
    return out[:count]


if __name__ == "__main__":
    sys.exit(main())
