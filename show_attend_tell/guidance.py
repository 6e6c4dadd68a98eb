"""Guided captions: words a caption must contain, from the encoder's own ImageNet labels or from the user.

A model trained on Flickr8k's people and dogs calls a cat "a small child", although the frozen ResNet's ImageNet
head, run on the same features, says "Egyptian cat 0.78". `LabelHead` is that head; `labels/imagenet_words.json`
(built and documented by recipes/imagenet_words.py) maps its classes to caption words; `Guidance` turns an
image's class probabilities and the user's words into disjunctive constraints for
`decoding.constrained_beam_search`. A concept guides the caption when the sum of its classes' probabilities
reaches `threshold`, chosen on coco-dev and Flickr8k val together (results/guidance_tuning.json).

Still-life and room concepts also have a template caption ("a cup of coffee on a table"): a Flickr8k decoder,
even guided to name the cup, has no words around it ("a small child is sitting on a red plastic cup"). When such
a concept is an image's most probable one and reaches `template_threshold` (chosen on the same two sets, with
Flickr8k val's CIDEr kept within 0.5), the template is the caption; the decoder reads it word by word for its
attention maps and score, and its own beams become the alternatives.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from show_attend_tell.config import DEFAULT_GUIDANCE_THRESHOLD, DEFAULT_TEMPLATE_THRESHOLD, check_number
from show_attend_tell.errors import InputError, shown
from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary, tokenize

LABEL_WORDS = Path(__file__).resolve().parent / "labels" / "imagenet_words.json"
DEFAULT_MAX_LABEL_WORDS = 1
# Words one request may ask for: each doubles the states of the constrained search, and so its beams.
MAX_MENTIONS = 4


@dataclasses.dataclass(frozen=True)
class GuideWord:
    """One word a caption must contain: any of `forms` satisfies it."""

    word: str
    forms: tuple[str, ...]
    source: str  # "label": from the encoder's ImageNet head; "user": asked for
    label: str | None = None  # the concept's most probable ImageNet class (source "label")
    probability: float | None = None  # the concept's probability: the sum over its classes (source "label")

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None} | {"forms": list(self.forms)}


class LabelHead(torch.nn.Module):
    """The encoder's ImageNet classifier on its grid features: the mean over the grid is the global average
    pool of the last residual block whenever the grid divides it evenly (the native 14x14 at 448 px, 7x7 at
    224 px), so the labels cost one (E -> 1000) matmul per image, not another forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, categories: Sequence[str]) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(weight.size(1), weight.size(0))
        with torch.no_grad():
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
        self.categories = list(categories)

    @classmethod
    def for_encoder(cls, encoder: str) -> LabelHead:
        from torchvision.models import ResNet50_Weights

        from show_attend_tell.weights import ENCODER_WEIGHTS

        weight, bias = ENCODER_WEIGHTS[encoder].classifier()
        return cls(weight, bias, ResNet50_Weights.IMAGENET1K_V1.meta["categories"])

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, E) grid features -> (B, 1000) class probabilities."""
        return self.classifier(features.float().mean(dim=1)).softmax(dim=1)


def label_head(config) -> LabelHead | None:
    """The classifier of a model's encoder (a ModelConfig), or None when it cannot read the model's features
    (a model whose encoder_dim is not the classifier's input, as in small test configurations)."""
    head = LabelHead.for_encoder(config.encoder)
    return head if head.classifier.in_features == config.encoder_dim else None


@dataclasses.dataclass(frozen=True)
class Concept:
    word: str
    forms: tuple[str, ...]  # those in the vocabulary
    classes: torch.Tensor  # (n,) ImageNet class indices
    template: tuple[str, ...] | None = None  # its template caption's words, when the vocabulary has them all


@dataclasses.dataclass(frozen=True)
class Template:
    """A caption written for an image's most probable concept, and that concept as a guide word."""

    words: tuple[str, ...]
    tokens: tuple[int, ...]
    guide: GuideWord  # its probability rounded for display
    probability: float  # the concept's, as compared with template_threshold


@cache
def _label_words() -> dict:
    return json.loads(LABEL_WORDS.read_text())


class Guidance:
    """Turns class probabilities and the user's words into constraints over one model's vocabulary.

    threshold: a concept guides the caption when its probability reaches it (None: labels never guide, nor give
    templates);
    max_label_words: at most this many label concepts per image, the most probable first;
    template_threshold: an image's most probable concept that has a template gives the caption when its
    probability reaches this (None: never).
    """

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
        max_label_words: int = DEFAULT_MAX_LABEL_WORDS,
        template_threshold: float | None = DEFAULT_TEMPLATE_THRESHOLD,
    ) -> None:
        for name, value in (("guidance_threshold", threshold), ("template_threshold", template_threshold)):
            if value is not None:  # a probability: nan would let any label guide, 5 none
                check_number(value, name, 0, 1)
        self.vocab, self.threshold, self.max_label_words = vocab, threshold, max_label_words
        self.template_threshold = template_threshold
        self.concepts = []
        for entry in _label_words()["concepts"]:
            forms = tuple(form for form in entry["forms"] if form in vocab)
            if forms:
                classes = torch.tensor([int(index) for index in entry["classes"]])
                template = tuple(entry.get("template", "").split())
                writable = template and all(word in vocab and word not in SPECIAL_TOKENS for word in template)
                self.concepts.append(Concept(entry["word"], forms, classes, template if writable else None))
        self._names = {int(i): name for entry in _label_words()["concepts"] for i, name in entry["classes"].items()}

    def concept_probabilities(self, class_probabilities: torch.Tensor) -> torch.Tensor:
        """(B, 1000) -> (B, concepts): each concept's probability, the sum over its classes."""
        return torch.stack([class_probabilities[:, c.classes].sum(dim=1) for c in self.concepts], dim=1)

    def label_words(self, class_probabilities: torch.Tensor) -> list[list[GuideWord]]:
        """For each image, the concepts whose probability reaches the threshold, most probable first."""
        if self.threshold is None or not self.concepts:
            return [[] for _ in range(class_probabilities.size(0))]
        probabilities = self.concept_probabilities(class_probabilities)  # (B, concepts)
        words = []
        for b in range(class_probabilities.size(0)):
            ranked = probabilities[b].argsort(descending=True)[: self.max_label_words].tolist()
            chosen = []
            for index in ranked:
                probability = float(probabilities[b, index])
                if probability < self.threshold:
                    break
                chosen.append(self._label_word(self.concepts[index], probability, class_probabilities[b]))
            words.append(chosen)
        return words

    def _label_word(self, concept: Concept, probability: float, class_probabilities: torch.Tensor) -> GuideWord:
        """A label concept as a guide word, named after its most probable class (class_probabilities: (1000,))."""
        top_class = int(concept.classes[class_probabilities[concept.classes].argmax()])
        return GuideWord(concept.word, concept.forms, "label", self._names[top_class], round(probability, 4))

    def templates(self, class_probabilities: torch.Tensor) -> list[Template | None]:
        """For each image, the template of its most probable concept when it has one that reaches
        template_threshold, else None."""
        if self.threshold is None or self.template_threshold is None or not self.concepts:
            return [None] * class_probabilities.size(0)
        probabilities = self.concept_probabilities(class_probabilities)  # (B, concepts)
        found: list[Template | None] = []
        for b, index in enumerate(probabilities.argmax(dim=1).tolist()):
            concept, probability = self.concepts[index], float(probabilities[b, index])
            if concept.template is None or probability < self.template_threshold:
                found.append(None)
                continue
            tokens = tuple(self.vocab.id(word) for word in concept.template)
            guide = self._label_word(concept, probability, class_probabilities[b])
            found.append(Template(concept.template, tokens, guide, probability))
        return found

    def user_words(self, mentions: Sequence[str] | None) -> list[GuideWord]:
        """The user's words (None: none), each with its plural or singular when the vocabulary has it, once each
        (a word repeated, or given as singular and plural, is one constraint); a word the model cannot write is
        an InputError naming the closest words it knows."""
        if isinstance(mentions, str):  # iterating it would ask for each of its letters
            raise InputError(f"mentions must be a list of words, not one string: give [{shown(mentions)}]")
        words: list[GuideWord] = []
        for mention in mentions or ():
            if not isinstance(mention, str):
                raise InputError(f"mentions must be words (strings), got {mention!r:.40}")
            tokens = tokenize(mention)
            if len(tokens) != 1:
                raise InputError(f"mention {shown(mention)}: give one word per mention (got {len(tokens)} words)")
            word = tokens[0]
            if word not in self.vocab or word in SPECIAL_TOKENS:
                known = [w for w in self.vocab.words if w not in SPECIAL_TOKENS]
                close = difflib.get_close_matches(word, known, n=5, cutoff=0.6)
                hint = f"; closest words it knows: {', '.join(close)}" if close else ""
                what = f"no word {word!r}" if len(word) <= 40 else "no such word"
                raise InputError(f"mention {shown(mention)}: the model's vocabulary has {what}{hint}")
            variants = [word, word + "s", word + "es", word[:-1] if word.endswith("s") else ""]
            forms = tuple(dict.fromkeys(v for v in variants if v and v in self.vocab))
            if all(set(forms) != set(known.forms) for known in words):
                words.append(GuideWord(word, forms, "user"))
            if len(words) > MAX_MENTIONS:
                raise InputError(f"mention: at most {MAX_MENTIONS} different words, got more")
        return words

    def combine(self, labels: list[GuideWord], users: list[GuideWord]) -> list[GuideWord]:
        """The user's words, then the label words that none of them already covers."""
        covered = {form for word in users for form in word.forms}
        return users + [word for word in labels if not covered & set(word.forms)]

    def constraints(self, words: Sequence[GuideWord]) -> list[set[int]]:
        """Word-id sets for constrained_beam_search, one per guide word."""
        return [{self.vocab.id(form) for form in word.forms} for word in words]


def positions(words: Sequence[str], guide: Sequence[GuideWord]) -> list[int | None]:
    """For each guide word, the index in the caption's words of the first form that meets it (None if absent)."""
    found = []
    for word in guide:
        found.append(next((i for i, w in enumerate(words) if w in word.forms), None))
    return found
