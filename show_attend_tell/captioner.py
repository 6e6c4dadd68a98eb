"""The Python API: load a model in one line and caption PIL images or files, with attention maps per word.

from show_attend_tell import Captioner
captioner = Captioner.load()              # the shipped Flickr8k model (or Captioner.load("runs/x/best"))
result = captioner.caption("photo.jpg")   # .text, .words, .score, .log_prob, .attention (T, g, g), .alternatives
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from show_attend_tell.checkpoint import has_int8_calibration, load_model, read_config
from show_attend_tell.config import (
    DEFAULT_BEAM_SIZE,
    DEFAULT_GUIDANCE_THRESHOLD,
    DEFAULT_LENGTH_PENALTY,
    DEFAULT_MAX_LENGTH,
    DEFAULT_TEMPLATE_THRESHOLD,
    MAX_BEAM,
    MAX_CAPTION_WORDS,
    MAX_LENGTH_PENALTY,
    MAX_SEED,
    check_number,
)
from show_attend_tell.decoding import best_captions
from show_attend_tell.errors import InputError
from show_attend_tell.fast_encoder import AUTO, resolve_precision
from show_attend_tell.guidance import Guidance, GuideWord, label_head, positions
from show_attend_tell.images import DEFAULT_MAX_PIXELS, load_image
from show_attend_tell.inference import image_features
from show_attend_tell.model import CaptionDecoder, LocationSampling

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "flickr8k"


class Cancelled(Exception):
    """A caption call stopped early because its caller's `cancelled` said so; nothing is returned."""


def _never() -> bool:
    return False


@contextmanager
def _checked_between_blocks(encoder, check: Callable[[], None]) -> Iterator[None]:
    """Run `check` before each residual block of the encoder (model.Encoder.blocks; none for a stand-in without
    them), so a cancelled call leaves the encoder within one block instead of finishing the photo. Only in this
    thread: a call running in another thread on the same model is not this call's to stop."""
    thread = threading.get_ident()

    def hook(module, inputs) -> None:
        if threading.get_ident() == thread:
            check()

    handles = [block.register_forward_pre_hook(hook) for block in getattr(encoder, "blocks", {}).values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    alternatives: list[Alternative]  # the other beams, best first (all of them when the caption is a template)
    guidance: list[GuideWord] = dataclasses.field(default_factory=list)  # words the caption was asked to hold
    guided_positions: list[int | None] = dataclasses.field(default_factory=list)  # where each is in `words`
    # the words are the template of the label concept in `guidance` (guidance.Template), not the decoder's own:
    # the decoder read them for `attention`, score and log_prob, and its own best caption is alternatives[0]
    template: bool = False
    # hard attention sampled (sample_seed): the grid cell (row, column) whose feature was each word's context
    locations: list[tuple[int, int]] | None = None


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
        template_threshold: float | None = DEFAULT_TEMPLATE_THRESHOLD,
    ) -> None:
        self.model, self.vocab, self.config = model, vocab, config
        self.device = torch.device(device)
        self.guidance = Guidance(vocab, threshold=guidance_threshold, template_threshold=template_threshold)
        self.labels = label_head(model.config)  # None: this model's features are not the classifier's
        if self.labels is not None:
            self.labels.to(self.device)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        int8: bool | None = None,
        encoder_precision: str = AUTO,
        guidance_threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
        template_threshold: float | None = DEFAULT_TEMPLATE_THRESHOLD,
    ) -> Captioner:
        """Load a checkpoint directory (default: the model shipped with the package).

        int8: quantize the decoder for speed (default: on the CPU when the model has an int8 calibration, as the
        shipped one does; see inference.Int8Decoder for what it costs).
        encoder_precision: "fp32", "bf16" or "int8" (fast_encoder.py), or "auto": the fastest this device
        supports among those that keep the captions.
        guidance_threshold: a photo's caption must name a concept of the encoder's ImageNet labels whose
        probability reaches this (see guidance.py); None turns label guidance off, templates too.
        template_threshold: a photo whose most probable label concept has a template caption ("a cup of coffee
        on a table") and reaches this gets that caption (see guidance.py); None: never.
        """
        path = path or SHIPPED_MODEL
        if int8 is None:
            int8 = torch.device(device).type == "cpu" and has_int8_calibration(read_config(path))
        precision = resolve_precision(encoder_precision, device)
        model, vocab, config = load_model(path, device=device, inference=True, int8=int8, encoder_precision=precision)
        return cls(
            model,
            vocab,
            config,
            device,
            guidance_threshold=guidance_threshold,
            template_threshold=template_threshold,
        )

    @property
    def decoder(self) -> str:
        """Which decoder writes the captions: "lstm" (the paper's) or "transformer"."""
        return self.model.config.decoder

    @property
    def encoder_precision(self) -> str:
        """The precision the encoder runs in: "fp32", "bf16" or "int8" (fast_encoder.py)."""
        return getattr(self.model.encoder, "precision", "fp32")

    @property
    def grid_size(self) -> int:
        return self.model.config.grid_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @torch.no_grad()
    def caption_batch(
        self,
        images: Sequence[Image.Image | str | Path],
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
        mentions: Sequence[str] | None = (),
        guide: bool = True,
        templates: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sample_seed: int | None = None,
        cancelled: Callable[[], bool] = _never,
    ) -> list[Caption]:
        """Caption several images in one encoder pass and one batched beam search.

        mentions: words every caption must contain (the user's metadata); a word outside the model's
        vocabulary is an InputError naming the closest ones it knows. guide: let the encoder's ImageNet labels
        add a word when one is confident enough (see `Captioner.load`'s guidance_threshold). templates (with
        guide, and no mentions or sample_seed): a photo whose most probable label concept has a template caption
        and is confident enough gets it (`Captioner.load`'s template_threshold). max_pixels: a photo
        with more pixels is refused from its header (images.TooManyPixelsError). sample_seed (a hard-attention
        model): each word's context is the feature of one cell drawn from alpha, each photo's draws from this
        seed (the same caption alone or in a batch), instead of the expected context (the paper's test time).
        cancelled: asked before each stage (each photo's decode, the encoder and each of its residual blocks, the
        decoder's setup and the labels, the beam search); once it answers True the call raises Cancelled
        instead of starting the next one (a server whose client hung up).
        """
        check_number(beam_size, "beam_size", 1, MAX_BEAM, whole=True)
        check_number(max_length, "max_length", 1, MAX_CAPTION_WORDS, whole=True)
        check_number(length_penalty, "length_penalty", 0, MAX_LENGTH_PENALTY)
        if sample_seed is not None:
            check_number(sample_seed, "sample_seed", 0, MAX_SEED, whole=True)
        sampling_decoder = self.check_sampling() if sample_seed is not None else None

        def check() -> None:
            if cancelled():
                raise Cancelled()

        users = self.guidance.user_words(mentions)
        pictures = []
        for image in images:  # each decoded only as large as the model needs before the next is read
            check()
            pictures.append(load_image(image, size=self.image_size, max_pixels=max_pixels))
        check()
        with _checked_between_blocks(self.model.encoder, check):
            features = image_features(self.model.encoder, pictures, self.model.config, self.device)  # (B, P, E)
        check()
        if sampling_decoder is None:
            encoded = self.model.decoder.encode(features)  # (B, P, *)
        else:
            encoded = sampling_decoder.encode(features, LocationSampling.seeded([sample_seed] * len(pictures)))
        chosen_templates = [None] * len(pictures)
        if guide and self.labels is not None:
            class_probabilities = self.labels(features)
            labels = self.guidance.label_words(class_probabilities)
            if templates and not users and sample_seed is None:
                chosen_templates = self.guidance.templates(class_probabilities)
        else:
            labels = [[] for _ in pictures]
        guides = [self.guidance.combine(words, users) for words in labels]
        check()
        beams = best_captions(
            self.model.decoder,
            encoded,
            [self.guidance.constraints(words) for words in guides],
            given=[None if template is None else template.tokens for template in chosen_templates],
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
        )
        g = self.grid_size
        results = []
        for hypotheses, guide_words, template in zip(beams, guides, chosen_templates, strict=True):
            best = hypotheses[0]
            guide_words = [template.guide] if template is not None else guide_words
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
                    locations=None if sample_seed is None else [divmod(int(i), g) for i in best.locations],
                    template=template is not None,
                )
            )
        return results

    def check_sampling(self) -> CaptionDecoder:
        """The decoder that can sample locations: a hard-attention model's, in fp32. The int8 decoder
        (inference.py) computes the expected context only, which is the test-time default of hard attention too;
        sampling refuses it rather than silently decoding without samples."""
        if self.model.config.attention != "hard":
            raise InputError(
                "this model attends softly: it has no locations to sample (a model trained with --attention hard has)"
            )
        if not isinstance(self.model.decoder, CaptionDecoder):
            raise InputError("sampling hard attention's locations needs the fp32 decoder: load it with int8=False")
        return self.model.decoder

    def caption(self, image: Image.Image | str | Path, **options) -> Caption:
        """Caption one PIL image or image file; options as for `caption_batch`."""
        return self.caption_batch([image], **options)[0]
