"""Decode a split once per image and score it with the coco-caption metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from show_attend_tell.config import DEFAULT_LENGTH_PENALTY
from show_attend_tell.decoding import Hypothesis, constrained_beam_search, greedy
from show_attend_tell.guidance import Guidance, LabelHead
from show_attend_tell.images import load_image
from show_attend_tell.model import CaptionModel, image_transform
from show_attend_tell.text import Vocabulary


def image_features(model: CaptionModel, paths: Sequence[Path], device: str | torch.device = "cpu") -> torch.Tensor:
    """Run the model's encoder over image files -> (B, P, E)."""
    transform = image_transform(model.config)
    batch = torch.stack([transform(load_image(path)) for path in paths]).to(device)
    with torch.no_grad():
        return model.encoder(batch)


@torch.no_grad()
def decode(
    model: CaptionModel,
    features: Callable[[list[int]], torch.Tensor],
    indices: Sequence[int],
    *,
    beam_size: int = 1,
    max_length: int = 20,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    batch_size: int = 50,
    progress: bool = True,
    guidance: tuple[Guidance, LabelHead] | None = None,
) -> dict[int, Hypothesis]:
    """Best hypothesis for each image index, decoded in batches; `features(rows)` -> (B, P, E) for them.
    With `guidance`, each caption must name the label concepts that guidance finds in the features."""
    model.eval()
    best: dict[int, Hypothesis] = {}
    indices = list(indices)
    for start in tqdm(range(0, len(indices), batch_size), desc=f"decode beam={beam_size}", disable=not progress):
        rows = indices[start : start + batch_size]
        grid = features(rows).float()  # (B, P, E)
        encoded = model.decoder.encode(grid)
        constraints = [[] for _ in rows]
        if guidance is not None:
            rule, head = guidance
            constraints = [rule.constraints(words) for words in rule.label_words(head(grid))]
        if beam_size == 1 and not any(constraints):
            hypotheses = greedy(model.decoder, encoded, max_length=max_length)
        else:
            beams = constrained_beam_search(
                model.decoder,
                encoded,
                constraints,
                beam_size=beam_size,
                max_length=max_length,
                length_penalty=length_penalty,
            )
            hypotheses = [beam[0] for beam in beams]
        best.update(zip(rows, hypotheses, strict=True))
    return best


def evaluate(
    model: CaptionModel,
    vocab: Vocabulary,
    features: Callable[[list[int]], torch.Tensor],
    indices: Sequence[int],
    references: dict[int, list[str]],
    *,
    beam_size: int = 1,
    max_length: int = 20,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    java: bool | None = None,
    progress: bool = True,
    guidance: tuple[Guidance, LabelHead] | None = None,
) -> tuple[dict, dict[int, str]]:
    """Decode each image once and score -> (metrics with timings, {image index: caption})."""
    from show_attend_tell.metrics import score_captions

    start = time.perf_counter()
    hypotheses = decode(
        model,
        features,
        indices,
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        progress=progress,
        guidance=guidance,
    )
    decode_seconds = time.perf_counter() - start
    captions = {i: " ".join(vocab.decode(h.tokens)) for i, h in hypotheses.items()}
    metrics = score_captions(captions, {i: references[i] for i in captions}, java=java)
    metrics.update(
        beam_size=beam_size,
        length_penalty=length_penalty if beam_size > 1 else None,  # greedy ranks nothing
        max_length=max_length,
        guidance_threshold=guidance[0].threshold if guidance else None,
        decode_seconds=round(decode_seconds, 2),
        score_seconds=round(time.perf_counter() - start - decode_seconds, 2),
    )
    return metrics, captions
