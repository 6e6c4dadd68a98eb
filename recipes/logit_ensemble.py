"""Several checkpoints as one decoder (issue 30): does averaging their next-word log-probabilities at every step
beat averaging their weights (`sat export A B`, how the shipped model is made)?

    python recipes/logit_ensemble.py MODEL [MODEL ...] --data PREPARED --features STORE --split val --out FILE.json \
        [--average log-probs|probs]

The models must share the vocabulary and the encoder (one store feeds them all). Each caption is decoded as
`sat evaluate` decodes it (the default beam and length penalty, the label guidance and templates of the first
model, the fp32 decoder, features from the store) through `Ensemble`, whose step is the members' steps with their
log p averaged (or log of their mean p) and their attention averaged. One model alone is the model itself. The
record holds the coco-caption metrics with the members.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys

import torch

from show_attend_tell.checkpoint import read_config
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.decoder import Decoder, EncodedImages, State
from show_attend_tell.evaluate import load_evaluation
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.records import provenance, write_record
from show_attend_tell.runtime import load_model

METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class EnsembleEncoded:
    """Each member's encoded images; `features` are the first member's (search reads only their shape)."""

    def __init__(self, parts: list[EncodedImages]) -> None:
        self.parts = parts
        self.features = parts[0].features  # (B, P, E)

    def select(self, index: torch.Tensor | slice) -> EnsembleEncoded:
        return EnsembleEncoded([part.select(index) for part in self.parts])


class Ensemble:
    """decoder.Decoder's search methods over members: the state is the members' state tensors in one tuple (every
    tensor's first dimension is the N rows, so search reorders it as any state)."""

    def __init__(self, members: list[Decoder], average: str = "log-probs") -> None:
        self.members = members
        self.average = average
        self.sizes: list[int] = []

    def encode(self, features: torch.Tensor) -> EnsembleEncoded:
        return EnsembleEncoded([member.encode(features) for member in self.members])

    def init_state(self, encoded: EnsembleEncoded) -> State:
        states = [member.init_state(part) for member, part in zip(self.members, encoded.parts, strict=True)]
        self.sizes = [len(state) for state in states]
        return tuple(tensor for state in states for tensor in state)

    def step(
        self, words: torch.Tensor, state: State, encoded: EnsembleEncoded
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        log_probs, states, alphas, start = [], [], [], 0
        for member, part, size in zip(self.members, encoded.parts, self.sizes, strict=True):
            member_log_probs, member_state, alpha = member.step(words, tuple(state[start : start + size]), part)
            start += size
            log_probs.append(member_log_probs)  # (N, V)
            states.extend(member_state)
            alphas.append(alpha)  # (N, P)
        stacked = torch.stack(log_probs)  # (members, N, V)
        if self.average == "probs":
            averaged = stacked.logsumexp(dim=0) - math.log(len(self.members))
        else:
            averaged = stacked.mean(dim=0)
        return averaged, tuple(states), torch.stack(alphas).mean(dim=0)


class EnsembleModel:
    """What evaluate.decode asks of a model: its decoder and eval()."""

    def __init__(self, decoder: Ensemble) -> None:
        self.decoder = decoder

    def eval(self) -> EnsembleModel:
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True, help="a prepared dataset (sat prepare)")
    parser.add_argument("--features", required=True, help="its feature store for the models (sat features)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--average", choices=("log-probs", "probs"), default="log-probs")
    parser.add_argument("--out", required=True, help="the record to write (JSON)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = provenance("python " + shlex.join(["recipes/logit_ensemble.py", *sys.argv[1:]]))

    dataset = PreparedDataset.load(args.data)
    rows = dataset.indices(args.split)
    evaluation = load_evaluation(args.models[0], dataset, store=args.features)
    members = [evaluation.model.decoder]
    first = (evaluation.vocab.words, read_config(args.models[0])["encoder_sha256"])
    for directory in args.models[1:]:
        model, vocab, config = load_model(directory, with_encoder=False)
        if (vocab.words, config["encoder_sha256"]) != first:
            raise SystemExit(f"{directory}: its vocabulary or encoder differs from {args.models[0]}'s")
        members.append(model.decoder)
    evaluation.model = EnsembleModel(Ensemble(members, args.average))
    metrics, _ = evaluation.score(
        rows, {row: dataset.images[row].captions for row in rows}, beam_size=DEFAULT_BEAM_SIZE, progress=False
    )
    record = {
        "issue": 30,
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        **started,
        "models": args.models,
        "average": args.average if len(args.models) > 1 else None,
        "split": args.split,
        "n_images": len(rows),
        "beam_size": DEFAULT_BEAM_SIZE,
        **{k: round(metrics[k], 2) for k in METRICS},
    }
    print({k: record[k] for k in METRICS})
    write_record(record, args.out)


if __name__ == "__main__":
    main()
