"""Consensus (minimum Bayes risk) re-ranking of the beam search's captions (issue 30): does choosing, among a
photo's K beams, the caption that agrees most with the model's other captions of it raise CIDEr?

    python recipes/consensus_rerank.py MODEL --data PREPARED --features STORE --split val --out FILE.json \
        [--samples 20 --samples 60] [--weights 0 0.5 1 2] [--seed 0]

Decodes the split as `sat evaluate` does (the default beam and length penalty, label guidance and templates, the
fp32 decoder, features from the store), keeping every photo's K hypotheses, and samples N captions of each photo
from the model (temperature 1, seeded). A hypothesis h is then ranked by U(h) = mean over the evidence e of
CIDEr-D(h, e) (scst.CiderD.agreement, document frequencies of the training captions) + w * its beam score; the
evidence is either the K beams, each weighted by its probability p(e) (h itself included), or the first N
samples. A photo given a template keeps it. Every variant is scored with the coco-caption metrics and recorded
beside the beam search's own choice, with how many photos' captions it changed.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys

import torch
from tqdm import tqdm

from show_attend_tell.config import DEFAULT_BEAM_SIZE, DEFAULT_LENGTH_PENALTY, DEFAULT_MAX_LENGTH
from show_attend_tell.decoding import rollout
from show_attend_tell.evaluate import load_evaluation
from show_attend_tell.guidance import search
from show_attend_tell.metrics import score_captions
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.records import provenance, write_record
from show_attend_tell.scst import CiderD
from show_attend_tell.text import tokenize

METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def decode(evaluation, rows: list[int], samples: int, seed: int, batch_size: int = 50) -> dict[int, dict]:
    """Per photo: its hypotheses (words, log p, beam score), whether a template was given, and `samples` sampled
    captions."""
    rule, head = evaluation.guidance
    decoder, vocab = evaluation.model.decoder, evaluation.vocab
    generator = torch.Generator().manual_seed(seed)
    found = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="decode", unit="batch"):
        batch = rows[start : start + batch_size]
        grid = evaluation.features(batch).float()  # (B, P, E)
        encoded = decoder.encode(grid)
        plans = rule.plan(len(batch), class_probabilities=None if head is None else head(grid))
        beams = search(
            decoder,
            encoded,
            rule,
            plans,
            beam_size=DEFAULT_BEAM_SIZE,
            max_length=DEFAULT_MAX_LENGTH,
            length_penalty=DEFAULT_LENGTH_PENALTY,
        )
        drawn = rollout(
            decoder, encoded, max_length=DEFAULT_MAX_LENGTH, sample=True, generator=generator, per_image=samples
        ).tokens.tolist()  # (B * samples, T)
        for b, (row, plan, hypotheses) in enumerate(zip(batch, plans, beams, strict=True)):
            found[row] = dict(
                template=plan.template is not None,
                hypotheses=[(vocab.decode(h.tokens), h.log_prob, h.score) for h in hypotheses],
                samples=[vocab.decode(tokens) for tokens in drawn[b * samples : (b + 1) * samples]],
            )
    return found


def rerank(found: dict[int, dict], cider: CiderD, evidence: str, samples: int, weight: float) -> dict[int, list[str]]:
    """Each photo's hypothesis of highest U (module docstring); evidence "beams" or "samples"."""
    chosen = {}
    for row, photo in found.items():
        hypotheses = photo["hypotheses"]
        if photo["template"]:
            chosen[row] = hypotheses[0][0]
            continue
        if evidence == "beams":
            top = max(log_p for _, log_p, _ in hypotheses)
            p = [math.exp(log_p - top) for _, log_p, _ in hypotheses]
            vectors = cider.vectors([words for words, _, _ in hypotheses])
            utility = [
                sum(p[e] * cider.agreement(words, [vectors[e]]) for e in range(len(p))) / sum(p)
                for words, _, _ in hypotheses
            ]
        else:
            vectors = cider.vectors(photo["samples"][:samples])
            utility = [cider.agreement(words, vectors) for words, _, _ in hypotheses]
        best = max(range(len(hypotheses)), key=lambda k: utility[k] + weight * hypotheses[k][2])
        chosen[row] = hypotheses[best][0]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="a prepared dataset (sat prepare)")
    parser.add_argument("--features", required=True, help="its feature store for the model (sat features)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", required=True, help="the record to write (JSON)")
    parser.add_argument("--samples", type=int, action="append", help="sampled captions a photo (repeatable)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0], help="w of U(h)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = args.samples or [20, 60]
    torch.set_grad_enabled(False)
    command = "python " + shlex.join(["recipes/consensus_rerank.py", *sys.argv[1:]])
    started = provenance(command)  # the date and the load when the run began

    dataset = PreparedDataset.load(args.data)
    rows = dataset.indices(args.split)
    references = {row: dataset.images[row].captions for row in rows}
    evaluation = load_evaluation(args.model, dataset, store=args.features)
    found = decode(evaluation, rows, max(counts), args.seed)
    cider = CiderD([[tokenize(c) for c in dataset.images[i].captions] for i in dataset.indices("train")])

    def scored(chosen: dict[int, list[str]]) -> dict:
        metrics = score_captions({row: " ".join(words) for row, words in chosen.items()}, references)
        changed = sum(chosen[row] != found[row]["hypotheses"][0][0] for row in rows)
        return {**{k: round(metrics[k], 2) for k in METRICS}, "photos_changed": changed}

    variants = {"beam search (unchanged)": scored({row: found[row]["hypotheses"][0][0] for row in rows})}
    settings = [("beams", DEFAULT_BEAM_SIZE)] + [("samples", n) for n in counts]
    for evidence, count in settings:
        for weight in args.weights:
            name = f"{count} {evidence}, w={weight:g}"
            variants[name] = scored(rerank(found, cider, evidence, count, weight))
            print(name, json.dumps(variants[name]), flush=True)
    record = {
        "issue": 30,
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        **started,
        "model": args.model,
        "split": args.split,
        "n_images": len(rows),
        "beam_size": DEFAULT_BEAM_SIZE,
        "seed": args.seed,
        "variants": variants,
    }
    write_record(record, args.out)


if __name__ == "__main__":
    main()
