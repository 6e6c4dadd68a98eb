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

from show_attend_tell.checkpoint import int8_by_default, read_config
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
from show_attend_tell.decoding import once_mask
from show_attend_tell.detector import Detection, Detector
from show_attend_tell.detectors import load_detector
from show_attend_tell.errors import Cancelled, InputError
from show_attend_tell.fast_encoder import AUTO, resolve_precision
from show_attend_tell.guidance import Guidance, GuideWord, label_head, new_word_pairs, positions, search
from show_attend_tell.images import DEFAULT_MAX_PIXELS, load_image
from show_attend_tell.inference import Int8Decoder, image_features
from show_attend_tell.model import CaptionDecoder, LocationSampling
from show_attend_tell.runtime import load_model

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "flickr8k"


def _never() -> bool:
    return False


def _checker(cancelled: Callable[[], bool]) -> Callable[[], None]:
    def check() -> None:
        if cancelled():
            raise Cancelled()

    return check


@dataclasses.dataclass
class Seen:
    """What Captioner.encode saw of B photos: the encoder's features (B, P, E) and the detector's detections of
    each (None: no detector ran)."""

    features: torch.Tensor
    detections: list[list[Detection]] | None = None

    def __len__(self) -> int:
        return self.features.size(0)

    @classmethod
    def join(cls, parts: Sequence[Seen | torch.Tensor]) -> Seen:
        """Several encode results as one batch (the detections of all, or None if any part ran no detector); a
        bare feature tensor counts as a part without detections."""
        parts = [part if isinstance(part, Seen) else cls(part) for part in parts]
        detections = None
        if all(part.detections is not None for part in parts):
            detections = [photo for part in parts for photo in part.detections]
        return cls(torch.cat([part.features for part in parts]), detections)


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
    # the COCO detector's detections at the guidance's presence threshold, best first (boxes in the photo's pixels)
    detections: list[Detection] = dataclasses.field(default_factory=list)
    # COCO classes nothing saw, whose words the search discouraged ("person": people)
    discouraged: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The caption as JSON-ready data, as `sat caption --json`, the API and bulk captioning give it (without
        the attention maps, which only the API sends)."""
        record = {
            "caption": self.text,
            "words": self.words,
            "score": float(self.score),
            "log_prob": float(self.log_prob),
            "alternatives": [
                {"caption": a.text, "score": float(a.score), "log_prob": float(a.log_prob)} for a in self.alternatives
            ],
            "guidance": [
                {**word.as_dict(), "position": position}
                for word, position in zip(self.guidance, self.guided_positions, strict=True)
            ],
            "template": self.template,
            "detections": [detection.as_dict() for detection in self.detections],
            "discouraged": list(self.discouraged),
        }
        if self.locations is not None:
            record["locations"] = [list(cell) for cell in self.locations]  # (row, column) per word
        return record


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
        detector: Detector | None = None,
        new_words: Sequence[str] = (),
        **guidance_options,
    ) -> None:
        self.model, self.vocab, self.config = model, vocab, config
        self.device = torch.device(device)
        self.guidance = Guidance(
            vocab,
            threshold=guidance_threshold,
            template_threshold=template_threshold,
            new_words=new_words,
            **guidance_options,
        )
        self.labels = label_head(model.config)  # None: this model's features are not the classifier's
        if self.labels is not None:
            self.labels.to(self.device)
        self.detector = detector
        self.once = once_mask(vocab).to(self.device)  # the words a caption holds at most once (decoding.once_mask)

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
        detector: str | None = None,
        **guidance_options,
    ) -> Captioner:
        """Load a checkpoint directory (default: the model shipped with the package).

        int8: quantize the decoder for speed (default: on the CPU when the model has an int8 calibration and no
        check of it found its captions worse than fp32's, checkpoint.int8_by_default, as for the shipped model;
        see inference.Int8Decoder for what int8 costs).
        encoder_precision: "fp32", "bf16" or "int8" (fast_encoder.py), or "auto": the fastest this device
        supports among those that keep the captions.
        guidance_threshold: a photo's caption must name a concept of the encoder's ImageNet labels whose
        probability reaches this (see guidance.py); None turns label guidance off, templates too.
        template_threshold: a photo whose most probable label concept has a template caption ("a cup of coffee
        on a table") and reaches this gets that caption (see guidance.py); None: never.
        detector: a COCO detector to guide captions beside the labels ("centernet", offline, or another
        detectors.DETECTORS name); None (the default: it misses two of its targets, README "A second pair of eyes"):
        none. The COCO words the vocabulary lacks are added with it (new_words.py).
        guidance_options: the detector's thresholds and penalties (guidance.Guidance).
        """
        path = path or SHIPPED_MODEL
        if int8 is None:
            int8 = torch.device(device).type == "cpu" and int8_by_default(read_config(path))
        precision = resolve_precision(encoder_precision, device)
        pairs = new_word_pairs() if detector is not None else {}
        model, vocab, config = load_model(path, device=device, int8=int8, encoder_precision=precision, new_words=pairs)
        return cls(
            model,
            vocab,
            config,
            device,
            guidance_threshold=guidance_threshold,
            template_threshold=template_threshold,
            detector=None if detector is None else load_detector(detector, device),
            new_words=[word for word in pairs if word in vocab],
            **guidance_options,
        )

    @property
    def decoder(self) -> str:
        """Which decoder writes the captions: "lstm" (the paper's) or "transformer"."""
        return self.model.config.decoder

    @property
    def detector_name(self) -> str | None:
        """The COCO detector that guides captions (detectors.DETECTORS), or None."""
        return None if self.detector is None else self.detector.name

    @property
    def encoder_precision(self) -> str:
        """The precision the encoder runs in: "fp32", "bf16" or "int8" (fast_encoder.py)."""
        return getattr(self.model.encoder, "precision", "fp32")

    @property
    def decoder_precision(self) -> str:
        """The precision the decoder runs in: "int8" (inference.Int8Decoder) or "fp32"."""
        return "int8" if isinstance(self.model.decoder, Int8Decoder) else "fp32"

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
        detect: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        sample_seed: int | None = None,
        repeat_words: bool = False,
        cancelled: Callable[[], bool] = _never,
    ) -> list[Caption]:
        """Caption several images in one encoder pass and one batched beam search.

        mentions: words every caption must contain (the user's metadata); a word outside the model's
        vocabulary is an InputError naming the closest ones it knows. guide: let the encoder's ImageNet labels
        add a word when one is confident enough (see `Captioner.load`'s guidance_threshold). templates (with
        guide, and no mentions or sample_seed): a photo whose most probable label concept has a template caption
        and is confident enough gets it (`Captioner.load`'s template_threshold). detect (with guide): the COCO
        detector's detections guide the caption too, when a detector is loaded. max_pixels: a photo
        with more pixels is refused from its header (images.TooManyPixelsError). sample_seed (a hard-attention
        model): each word's context is the feature of one cell drawn from alpha, each photo's draws from this
        seed (the same caption alone or in a batch), instead of the expected context (the paper's test time).
        repeat_words: let a caption hold a word twice; by default only text.FUNCTION_WORDS ("a", "in", "and"...)
        may come again, so no "a man is riding a bike on a bike" (decoding.once_mask).
        cancelled: asked before each stage (each photo's decode, the encoder and each of its residual blocks, the
        detector, the decoder's setup and the labels, the beam search); once it answers True the call raises
        Cancelled instead of starting the next one (a server whose client hung up).
        """
        check_number(beam_size, "beam_size", 1, MAX_BEAM, whole=True)
        check_number(max_length, "max_length", 1, MAX_CAPTION_WORDS, whole=True)
        check_number(length_penalty, "length_penalty", 0, MAX_LENGTH_PENALTY)
        if sample_seed is not None:
            check_number(sample_seed, "sample_seed", 0, MAX_SEED, whole=True)
            self.check_sampling()  # before the encoder's work, as a bad mention below
        self.guidance.user_words(mentions)
        seen = self.encode(images, max_pixels=max_pixels, detect=guide and detect, cancelled=cancelled)
        return self.caption_features(
            seen,
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            mentions=mentions,
            guide=guide,
            templates=templates,
            sample_seed=sample_seed,
            repeat_words=repeat_words,
            cancelled=cancelled,
        )

    @torch.no_grad()
    def encode(
        self,
        images: Sequence[Image.Image | str | Path],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        detect: bool = True,
        cancelled: Callable[[], bool] = _never,
    ) -> Seen:
        """The first half of caption_batch: the encoder's features of `images` (B, P, E) and, with `detect` and a
        detector loaded, its detections, each image decoded only as large as the model needs before the next is
        read. A server encodes each photo with its own client's `cancelled`, so that one who hangs up stops
        costing at once, and captions the rest together (Seen.join, caption_features)."""
        check = _checker(cancelled)
        pictures = []
        for image in images:
            check()
            pictures.append(load_image(image, size=self.image_size, max_pixels=max_pixels, cancelled=cancelled))
        check()
        with _checked_between_blocks(self.model.encoder, check):
            features = image_features(self.model.encoder, pictures, self.model.config, self.device)  # (B, P, E)
        detections = None
        if detect and self.detector is not None:
            check()
            detections = self.detector.detect(pictures, min_score=self.guidance.lowest_presence)
        return Seen(features, detections)

    @torch.no_grad()
    def caption_features(
        self,
        seen: Seen | torch.Tensor,
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
        mentions: Sequence[str] = (),
        guide: bool = True,
        templates: bool = True,
        sample_seed: int | None = None,
        repeat_words: bool = False,
        cancelled: Callable[[], bool] = _never,
    ) -> list[Caption]:
        """The second half of caption_batch: captions of what `encode` saw (or of bare encoder features (B, P, E),
        as with no detector), one batched beam search for them all; options as for caption_batch."""
        if isinstance(seen, torch.Tensor):
            seen = Seen(seen, None)
        features = seen.features
        sampling_decoder = self.check_sampling() if sample_seed is not None else None
        check = _checker(cancelled)
        users = self.guidance.user_words(mentions)
        check()
        count = features.size(0)
        if sampling_decoder is None:
            encoded = self.model.decoder.encode(features)  # (B, P, *)
        else:
            encoded = sampling_decoder.encode(features, LocationSampling.seeded([sample_seed] * count))
        plans = self.guidance.plan(
            count,
            class_probabilities=self.labels(features) if guide and self.labels is not None else None,
            detections=seen.detections if guide else None,
            users=users,
            templates=templates and sample_seed is None,
        )
        check()
        beams = search(
            self.model.decoder,
            encoded,
            self.guidance,
            plans,
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            once=None if repeat_words else self.once,
        )
        g = self.grid_size
        results = []
        for hypotheses, plan in zip(beams, plans, strict=True):
            best, template = hypotheses[0], plan.template
            guide_words = [template.guide] if template is not None else plan.guides
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
                    detections=plan.detections,
                    discouraged=plan.discouraged,
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
