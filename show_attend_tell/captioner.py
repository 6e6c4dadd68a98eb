"""The Python API: load a model in one line and caption PIL images or files, with attention maps per word.

from show_attend_tell import Captioner
captioner = Captioner.load()              # the shipped Flickr8k model (or Captioner.load("runs/x/best"))
result = captioner.caption("photo.jpg")   # .text, .words, .score, .log_prob, .attention (T, g, g), .alternatives
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from show_attend_tell.checkpoint import load_model
from show_attend_tell.config import DEFAULT_BEAM_SIZE, DEFAULT_GUIDANCE_THRESHOLD, DEFAULT_LENGTH_PENALTY
from show_attend_tell.decoding import constrained_beam_search, greedy
from show_attend_tell.guidance import Guidance, GuideWord, LabelHead, positions
from show_attend_tell.images import DEFAULT_MAX_PIXELS, load_image
from show_attend_tell.model import image_transform

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "flickr8k"


class Alternative(NamedTuple):
    """Another beam: its text, the score it was ranked by and its log-probability (as in `Caption`)."""

    text: str
    score: float
    log_prob: float


@dataclasses.dataclass
class Caption:
    """One image's caption: the words, their score and log-probability, and where the model looked for each."""

    text: str
    words: list[str]
    # what beams are ranked by: log_prob / (words + <end>)**length_penalty (greedy: log_prob); a longer caption
    # has a lower log-probability, so log_prob alone would not say why it won
    score: float
    log_prob: float  # log-probability of the caption (with <end>) under the model
    attention: np.ndarray  # (len(words), g, g): alpha for each word over the grid, each map sums to 1
    alternatives: list[Alternative]  # the other beams, best first
    guidance: list[GuideWord] = dataclasses.field(default_factory=list)  # words the caption was asked to hold
    guided_positions: list[int | None] = dataclasses.field(default_factory=list)  # where each is in `words`


class Captioner:
    """A loaded model ready to caption; the encoder and decoder run once per batch of images."""

    def __init__(
        self,
        model,
        vocab,
        config: dict,
        device: str | torch.device = "cpu",
        *,
        guidance_threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
    ) -> None:
        self.model, self.vocab, self.config = model, vocab, config
        self.device = torch.device(device)
        self.transform = image_transform(model.config)
        self.guidance = Guidance(vocab, threshold=guidance_threshold)
        self.labels = LabelHead.for_encoder(model.config.encoder).to(self.device)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        int8: bool | None = None,
        guidance_threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
    ) -> Captioner:
        """Load a checkpoint directory (default: the model shipped with the package).

        int8: quantize the decoder for speed (default: on the CPU; see model.int8_decoder for what it costs).
        guidance_threshold: a photo's caption must name a concept of the encoder's ImageNet labels whose
        probability reaches this (see guidance.py); None turns label guidance off.
        """
        if int8 is None:
            int8 = torch.device(device).type == "cpu"
        model, vocab, config = load_model(path or SHIPPED_MODEL, device=device, int8=int8)
        return cls(model, vocab, config, device, guidance_threshold=guidance_threshold)

    @property
    def grid_size(self) -> int:
        return self.model.config.grid_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def encoder_inputs(self, images: Sequence[Image.Image | str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS):
        """(B, 3, S, S) encoder input, each photo decoded, shrunk and transformed before the next is read: memory
        holds one photo's decode at a time, whatever the batch's pixel counts (see images.load_image's `size`)."""
        batch = torch.empty(len(images), 3, self.image_size, self.image_size)
        for i, image in enumerate(images):
            batch[i] = self.transform(load_image(image, size=self.image_size, max_pixels=max_pixels))
        return batch

    @torch.no_grad()
    def caption_batch(
        self,
        images: Sequence[Image.Image | str | Path],
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
        max_length: int = 20,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
        mentions: Sequence[str] = (),
        guide: bool = True,
    ) -> list[Caption]:
        """Caption several images in one encoder pass and one batched beam search.

        mentions: words every caption must contain (the user's metadata); a word outside the model's
        vocabulary is an InputError naming the closest ones it knows. guide: let the encoder's ImageNet labels
        add a word when one is confident enough (see `Captioner.load`'s guidance_threshold)."""
        users = self.guidance.user_words(mentions)
        batch = self.encoder_inputs(images).to(self.device)
        features = self.model.encoder(batch)  # (B, P, E)
        encoded = self.model.decoder.encode(features)  # (B, P, *)
        labels = self.guidance.label_words(self.labels(features)) if guide else [[] for _ in images]
        guides = [self.guidance.combine(words, users) for words in labels]
        if beam_size == 1 and not any(guides):
            beams = [[h] for h in greedy(self.model.decoder, encoded, max_length=max_length)]
        else:
            beams = constrained_beam_search(
                self.model.decoder,
                encoded,
                [self.guidance.constraints(words) for words in guides],
                beam_size=beam_size,
                max_length=max_length,
                length_penalty=length_penalty,
            )
        g = self.grid_size
        results = []
        for hypotheses, guide_words in zip(beams, guides, strict=True):
            best = hypotheses[0]
            words = self.vocab.decode(best.tokens)
            results.append(
                Caption(
                    text=" ".join(words),
                    words=words,
                    score=best.score,
                    log_prob=best.log_prob,
                    attention=best.alphas.numpy().reshape(len(best.tokens), g, g),
                    alternatives=[
                        Alternative(" ".join(self.vocab.decode(h.tokens)), h.score, h.log_prob) for h in hypotheses[1:]
                    ],
                    guidance=guide_words,
                    guided_positions=positions(words, guide_words),
                )
            )
        return results

    def caption(self, image: Image.Image | str | Path, **options) -> Caption:
        """Caption one PIL image or image file; options as for `caption_batch`."""
        return self.caption_batch([image], **options)[0]
