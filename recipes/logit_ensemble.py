"""Several checkpoints as one decoder (issue 30): does averaging their next-word log-probabilities at every step
beat averaging their weights (`sat export A B`, how the shipped model is made)?

    python recipes/logit_ensemble.py MODEL [MODEL ...] --data PREPARED --features STORE --split val --out FILE.json \
        [--average log-probs|probs] [--mirror WEIGHT]

The models must share the vocabulary and the encoder (one store feeds them all). Each caption is decoded as
`sat evaluate` decodes it (the default beam and length penalty, the label guidance and templates of the first
model, the fp32 decoder, features from the store) through `Ensemble`, whose step is the members' steps with their
log p averaged (or log of their mean p) and their attention on the photo averaged. One model alone is the model
itself. The record holds the coco-caption metrics with the members.

--mirror WEIGHT adds a member that reads each photo's mirror image (flipped left to right, through the first model's
encoder in the store's precision): the first model once more, its log p weighted WEIGHT and the models' 1 - WEIGHT.
The label guidance then reads the photo and its mirror image together (the mean over both grids).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from PIL import Image

from show_attend_tell.checkpoint import read_config
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.decoder import Decoder, EncodedImages, State
from show_attend_tell.evaluate import load_evaluation
from show_attend_tell.features import store_precision
from show_attend_tell.images import load_image
from show_attend_tell.inference import image_features
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
    tensor's first dimension is the N rows, so search reorders it as any state).

    weights: each member's share of the average (default equal). views: the grid each member reads when the
    features hold several views of each photo side by side along the grid (B, views x P, E): member k reads view
    views[k] (default: all read the one grid); the attention returned is the mean of view 0's readers'."""

    def __init__(
        self,
        members: list[Decoder],
        average: str = "log-probs",
        weights: list[float] | None = None,
        views: list[int] | None = None,
    ) -> None:
        self.members = members
        self.average = average
        self.weights = torch.tensor(weights if weights else [1.0 / len(members)] * len(members))
        self.views = views if views else [0] * len(members)
        if len(self.weights) != len(members) or len(self.views) != len(members):
            raise ValueError("one weight and one view for each member")
        self.sizes: list[int] = []

    def encode(self, features: torch.Tensor) -> EnsembleEncoded:
        cells = features.size(1) // (max(self.views) + 1)  # P of one view
        return EnsembleEncoded(
            [
                member.encode(features[:, view * cells : (view + 1) * cells])
                for member, view in zip(self.members, self.views, strict=True)
            ]
        )

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
        weights = self.weights.to(stacked.dtype).view(-1, 1, 1)
        if self.average == "probs":
            averaged = (stacked + weights.log()).logsumexp(dim=0)
        else:
            averaged = (stacked * weights).sum(dim=0)
        seen = [alpha for alpha, view in zip(alphas, self.views, strict=True) if view == 0]
        return averaged, tuple(states), torch.stack(seen).mean(dim=0)


class EnsembleModel:
    """What evaluate.decode asks of a model: its decoder and eval()."""

    def __init__(self, decoder: Ensemble) -> None:
        self.decoder = decoder

    def eval(self) -> EnsembleModel:
        return self


def with_mirror_images(features, model_dir: str, dataset: PreparedDataset, store: str):
    """rows -> (B, 2P, E): the store's grids, then those of the photos flipped left to right (encoded as the store
    was: the model's encoder in the store's precision)."""
    model, _, _ = load_model(model_dir, encoder_precision=store_precision(store))

    def both(rows: list[int]) -> torch.Tensor:
        grids = []
        for start in range(0, len(rows), 16):  # 448 px photos: 16 at a time bound the encoder's memory
            chunk = rows[start : start + 16]
            pictures = [load_image(dataset.images[i].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT) for i in chunk]
            grids.append(image_features(model.encoder, pictures, model.config))
        return torch.cat([features(rows).float(), torch.cat(grids).float()], dim=1)

    return both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True, help="a prepared dataset (sat prepare)")
    parser.add_argument("--features", required=True, help="its feature store for the models (sat features)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--average", choices=("log-probs", "probs"), default="log-probs")
    parser.add_argument("--mirror", type=float, help="the weight (0 to 1) of the first model reading mirror images")
    parser.add_argument("--out", required=True, help="the record to write (JSON)")
    args = parser.parse_args()
    if args.mirror is not None and not 0 < args.mirror < 1:
        parser.error(f"--mirror must be between 0 and 1 (its weight in the average), got {args.mirror}")
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
    weights, views = None, None
    if args.mirror is not None:
        weights = [(1 - args.mirror) / len(members)] * len(members) + [args.mirror]
        views = [0] * len(members) + [1]
        members.append(evaluation.model.decoder)
        evaluation.features = with_mirror_images(evaluation.features, args.models[0], dataset, args.features)
    evaluation.model = EnsembleModel(Ensemble(members, args.average, weights, views))
    metrics, _ = evaluation.score(
        rows, {row: dataset.images[row].captions for row in rows}, beam_size=DEFAULT_BEAM_SIZE, progress=False
    )
    record = {
        "issue": 30,
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        **started,
        "models": args.models,
        "average": args.average if len(members) > 1 else None,
        "mirror": args.mirror,
        "split": args.split,
        "n_images": len(rows),
        "beam_size": DEFAULT_BEAM_SIZE,
        **{k: round(metrics[k], 2) for k in METRICS},
    }
    print({k: record[k] for k in METRICS})
    write_record(record, args.out)


if __name__ == "__main__":
    main()
