"""Decode a split once per image and score it with the coco-caption metrics; `load_evaluation` sets up what
`sat evaluate` scores (the model, where its features come from, its guidance and detector)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from show_attend_tell.config import (
    DEFAULT_GUIDANCE_THRESHOLD,
    DEFAULT_LENGTH_PENALTY,
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPLATE_THRESHOLD,
)
from show_attend_tell.decoding import Hypothesis, best_captions, once_mask
from show_attend_tell.detector import Detection
from show_attend_tell.guidance import Guidance, LabelHead, search
from show_attend_tell.model import CaptionModel
from show_attend_tell.prepare import PreparedDataset
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
    once: torch.Tensor | None = None,
) -> dict[int, Hypothesis]:
    """Best hypothesis for each image index, decoded in batches; `features(rows)` -> (B, P, E) for them.
    With `guidance` (the rule and the label head), each image is decoded through its guidance.Plan, as `sat caption`
    does: the label concepts found in its features, a confident template, and with `detections(rows)` the COCO
    detector's words to name and to discourage. `once`: the words a caption holds at most once (decoding.once_mask,
    as `sat caption` decodes; None: any word may repeat)."""
    model.eval()
    best: dict[int, Hypothesis] = {}
    indices = list(indices)
    for start in tqdm(
        range(0, len(indices), batch_size), desc=f"{description} beam={beam_size}", unit="batch", disable=not progress
    ):
        rows = indices[start : start + batch_size]
        grid = features(rows).float()  # (B, P, E)
        encoded = model.decoder.encode(grid)
        options = dict(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty, once=once)
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
    repeat_words: bool = False,
) -> tuple[dict, dict[int, str]]:
    """Decode each image once and score -> (metrics with timings, {image index: caption}). As `sat caption`, no
    caption repeats a word outside text.FUNCTION_WORDS unless `repeat_words` (decoding.once_mask)."""
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
        once=None if repeat_words else once_mask(vocab),
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
        repeat_words=repeat_words,
        decode_seconds=round(decode_seconds, 2),
        score_seconds=round(time.perf_counter() - start - decode_seconds, 2),
    )
    return metrics, captions


@dataclasses.dataclass
class Evaluation:
    """A model loaded for scoring, with where its features come from and how its captions are guided."""

    model: CaptionModel
    vocab: Vocabulary
    features: Callable[[list[int]], torch.Tensor]  # image rows -> (B, P, E)
    encoder_precision: str | None  # the store's when features come from one, else the encoder's
    guidance: tuple[Guidance, LabelHead | None] | None = None
    detections: Callable[[list[int]], list[list[Detection]]] | None = None
    detector: str | None = None
    int8: bool = False

    @property
    def settings(self) -> dict:
        """What the metrics record beside the model: the int8 decoder, the encoder's precision, the detector."""
        return dict(int8=self.int8, encoder_precision=self.encoder_precision, detector=self.detector)

    def score(self, rows: Sequence[int], references: dict[int, list[str]], **options) -> tuple[dict, dict[int, str]]:
        """evaluate() on these image rows; options: beam_size, max_length, length_penalty, java, progress,
        repeat_words."""
        return evaluate(
            self.model,
            self.vocab,
            self.features,
            rows,
            references,
            guidance=self.guidance,
            detections=self.detections,
            **options,
        )


def load_evaluation(
    model_dir: str | Path,
    dataset: PreparedDataset,
    *,
    store: str | Path | None = None,
    int8: bool = False,
    encoder_precision: str = "auto",
    guidance: bool = True,
    guidance_threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
    template_threshold: float | None = DEFAULT_TEMPLATE_THRESHOLD,
    detector: str | None = None,
) -> Evaluation:
    """Load a checkpoint to score it on `dataset` as `sat caption` would caption its photos.

    store: a feature store from `sat features` matching the model's encoder, read instead of running the encoder
    (one of a block's output runs the blocks after it); else the encoder runs on the photos in `encoder_precision`
    (fast_encoder.resolve_precision). guidance: the label guidance (guidance_threshold: None, no label guidance;
    template_threshold: None, no templates) and, with it, the COCO `detector` (detectors.DETECTORS), which looks at
    the photos as the captioner reads them whatever the features came from."""
    from show_attend_tell.fast_encoder import resolve_precision
    from show_attend_tell.features import dataset_features, store_precision, store_stage
    from show_attend_tell.guidance import label_head, new_word_pairs
    from show_attend_tell.runtime import load_model

    detector = detector if guidance else None
    # a store of grid features replaces the encoder; one of a block's output (stage) replaces the part before
    with_encoder = not store or bool(store_stage(store))
    # a store's precision is its own (features.json); the encoder's is resolved only when it runs on photos
    precision = resolve_precision(encoder_precision) if not store else None
    model, vocab, config = load_model(
        model_dir,
        with_encoder=with_encoder,
        int8=int8,
        encoder_precision=precision,
        new_words=new_word_pairs() if detector else None,
    )
    found = Evaluation(
        model,
        vocab,
        dataset_features(model, dataset, store, config["encoder_sha256"]),
        store_precision(store) if store else precision,
        detector=detector,
        int8=int8,
    )
    if not guidance:
        return found
    head = label_head(model.config)
    rule = Guidance(
        vocab,
        threshold=guidance_threshold if head is not None else None,
        template_threshold=template_threshold,
        new_words=new_word_pairs() if detector else (),
    )
    found.guidance = (rule, head)
    if detector:
        from show_attend_tell.detectors import load_detector
        from show_attend_tell.images import load_image

        loaded = load_detector(detector, precision=resolve_precision(encoder_precision))

        def detections(rows: list[int]) -> list[list[Detection]]:
            pictures = [load_image(dataset.images[i].path, size=model.config.image_size) for i in rows]
            return loaded.detect(pictures, min_score=rule.lowest_presence)

        found.detections = detections
    return found
