"""Decode a split once per image and score it with the coco-caption metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from show_attend_tell.config import DEFAULT_LENGTH_PENALTY, DEFAULT_MAX_LENGTH
from show_attend_tell.decoding import Hypothesis, best_captions
from show_attend_tell.detector import Detection
from show_attend_tell.guidance import Guidance, LabelHead, search
from show_attend_tell.model import CaptionModel
from show_attend_tell.text import Vocabulary


@torch.no_grad()
def decode(
    model: CaptionModel,
    features: Callable[[list[int]], torch.Tensor],
    indices: Sequence[int],
    *,
    beam_size: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    batch_size: int = 50,
    progress: bool = True,
    guidance: tuple[Guidance, LabelHead | None] | None = None,
    detections: Callable[[list[int]], list[list[Detection]]] | None = None,
    description: str = "decode",
) -> dict[int, Hypothesis]:
    """Best hypothesis for each image index, decoded in batches; `features(rows)` -> (B, P, E) for them.
    With `guidance` (the rule and the label head), each image is decoded through its guidance.Plan, as `sat caption`
    does: the label concepts found in its features, a confident template, and with `detections(rows)` the COCO
    detector's words to name and to discourage."""
    model.eval()
    best: dict[int, Hypothesis] = {}
    indices = list(indices)
    for start in tqdm(
        range(0, len(indices), batch_size), desc=f"{description} beam={beam_size}", unit="batch", disable=not progress
    ):
        rows = indices[start : start + batch_size]
        grid = features(rows).float()  # (B, P, E)
        encoded = model.decoder.encode(grid)
        options = dict(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
        if guidance is not None:
            rule, head = guidance
            plans = rule.plan(
                len(rows),
                class_probabilities=None if head is None else head(grid),
                detections=None if detections is None else detections(rows),
            )
            beams = search(model.decoder, encoded, rule, plans, **options)
        else:
            beams = best_captions(model.decoder, encoded, **options)
        best.update(zip(rows, [beam[0] for beam in beams], strict=True))
    return best


def evaluate(
    model: CaptionModel,
    vocab: Vocabulary,
    features: Callable[[list[int]], torch.Tensor],
    indices: Sequence[int],
    references: dict[int, list[str]],
    *,
    beam_size: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    java: bool | None = None,
    progress: bool = True,
    guidance: tuple[Guidance, LabelHead | None] | None = None,
    detections: Callable[[list[int]], list[list[Detection]]] | None = None,
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
        detections=detections,
    )
    decode_seconds = time.perf_counter() - start
    captions = {i: " ".join(vocab.decode(h.tokens)) for i, h in hypotheses.items()}
    metrics = score_captions(captions, {i: references[i] for i in captions}, java=java)
    metrics.update(
        beam_size=beam_size,
        length_penalty=length_penalty if beam_size > 1 else None,  # greedy ranks nothing
        max_length=max_length,
        guidance_threshold=guidance[0].threshold if guidance else None,
        template_threshold=guidance[0].template_threshold if guidance else None,
        decode_seconds=round(decode_seconds, 2),
        score_seconds=round(time.perf_counter() - start - decode_seconds, 2),
    )
    return metrics, captions
