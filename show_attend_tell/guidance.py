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

from show_attend_tell.config import (
    DEFAULT_COUNT_THRESHOLD,
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_GUIDANCE_THRESHOLD,
    DEFAULT_OBJECT_PENALTY,
    DEFAULT_PERSON_PENALTY,
    DEFAULT_PERSON_PRESENCE_THRESHOLD,
    DEFAULT_PRESENCE_THRESHOLD,
    DEFAULT_TEMPLATE_THRESHOLD,
    MAX_MENTIONS,
    check_number,
)
from show_attend_tell.decoding import Hypothesis, best_captions
from show_attend_tell.detector import Detection
from show_attend_tell.errors import InputError, shown
from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary, tokenize

LABEL_WORDS = Path(__file__).resolve().parent / "labels" / "imagenet_words.json"
COCO_WORDS = Path(__file__).resolve().parent / "labels" / "coco_words.json"
DEFAULT_MAX_LABEL_WORDS = 1
# COCO's animals: ImageNet tells them apart far better than the detector, which calls a cat a dog and a dog in the
# snow a horse; when a label already names one, the detector's other animals are not taken as seen.
ANIMALS = frozenset({"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"})
# What counted people ask of a caption (Guidance.count_words): two, or three and more. The words are those Flickr8k's
# captions count people with ("two" 5560 times, "people" 2866, "three" 1381, "group" 1208, "crowd" 531 ...).
COUNT_WORDS = {
    2: ("two", "couple"),
    3: ("people", "group", "crowd", "three", "four", "five", "several", "many", "team"),
}


@dataclasses.dataclass(frozen=True)
class GuideWord:
    """One word a caption must contain: any of `forms` satisfies it."""

    word: str
    forms: tuple[str, ...]
    source: str  # "label": from the encoder's ImageNet head; "detector": a COCO detection; "user": asked for
    label: str | None = None  # the concept's most probable ImageNet class (source "label"), the COCO class (detector)
    probability: float | None = None  # the concept's probability (the sum over its classes), a detection's score

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


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one photo's caption is guided: the words it must name, a template caption or none, the words the search
    discourages (word id -> a negative number added to their log p), and the detections that decided it."""

    guides: list[GuideWord]
    template: Template | None = None
    penalties: dict[int, float] = dataclasses.field(default_factory=dict)
    detections: list[Detection] = dataclasses.field(default_factory=list)  # those at presence_threshold or above
    discouraged: tuple[str, ...] = ()  # the COCO classes whose words were discouraged ("person": no people seen)


@cache
def _label_words() -> dict:
    return json.loads(LABEL_WORDS.read_text())


@cache
def coco_words() -> dict[str, dict]:
    """labels/coco_words.json by COCO class: its mention forms, the words that name it, phrases, new words."""
    return {entry["class"]: entry for entry in json.loads(COCO_WORDS.read_text())["classes"]}


def new_word_pairs() -> dict[str, str]:
    """Every reviewed new word and the known word it starts from (new_words.py)."""
    return {new: known for entry in coco_words().values() for new, known in entry.get("new_words", {}).items()}


class Guidance:
    """Turns class probabilities and the user's words into constraints over one model's vocabulary.

    threshold: a concept guides the caption when its probability reaches it (None: labels never guide, nor give
    templates);
    max_label_words: at most this many label concepts per image, the most probable first;
    template_threshold: an image's most probable concept that has a template gives the caption when its
    probability reaches this (None: never).

    With a detector's detections (`plan`): a COCO class detected at detection_threshold or above must be named
    (at most max_detection_words of them, the best first; person words never are: the decoder names people
    unasked); a class detected at presence_threshold or above is there (a person at person_presence_threshold:
    the person penalty is the strongest, so a faint person is enough to lift it), and the words of every other
    COCO class that no guide word names are discouraged by person_penalty (person words) or object_penalty (the
    rest).
    count_threshold: the person detections at this score or above are counted, and least_count or more people (2:
    two and groups; 3: groups only) ask the caption for a word that counts them (COUNT_WORDS; None: not counted).
    new_words: words the decoder was given (new_words.py); banned unless a guide word asks for them.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        threshold: float | None = DEFAULT_GUIDANCE_THRESHOLD,
        max_label_words: int = DEFAULT_MAX_LABEL_WORDS,
        template_threshold: float | None = DEFAULT_TEMPLATE_THRESHOLD,
        detection_threshold: float | None = DEFAULT_DETECTION_THRESHOLD,
        presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD,
        person_presence_threshold: float | None = DEFAULT_PERSON_PRESENCE_THRESHOLD,
        person_penalty: float = DEFAULT_PERSON_PENALTY,
        object_penalty: float = DEFAULT_OBJECT_PENALTY,
        max_detection_words: int = 1,
        count_threshold: float | None = DEFAULT_COUNT_THRESHOLD,
        least_count: int = 2,
        new_words: Sequence[str] = (),
    ) -> None:
        thresholds = (
            ("guidance_threshold", threshold),
            ("template_threshold", template_threshold),
            ("count_threshold", count_threshold),
        )
        for name, value in thresholds:
            if value is not None:  # a probability: nan would let any label guide, 5 none
                check_number(value, name, 0, 1)
        self.vocab, self.threshold, self.max_label_words = vocab, threshold, max_label_words
        self.template_threshold = template_threshold
        self.detection_threshold, self.presence_threshold = detection_threshold, presence_threshold
        self.person_presence_threshold = (
            presence_threshold if person_presence_threshold is None else person_presence_threshold
        )
        self.person_penalty, self.object_penalty = person_penalty, object_penalty
        self.max_detection_words = max_detection_words
        self.count_threshold, self.least_count = count_threshold, least_count
        self.counts = {n: tuple(w for w in words if w in vocab) for n, words in COUNT_WORDS.items()}
        self.new_words = tuple(word for word in new_words if word in vocab)
        # each COCO class: the forms that can name it in a caption, and the word ids of every word that names it
        self.coco = {}
        for name, entry in coco_words().items():
            forms = tuple(form for form in entry["mention"] if form in vocab)
            ids = tuple(sorted({vocab.id(word) for word in entry["words"] if word in vocab}))
            self.coco[name] = (forms, ids)
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

    def combine(self, labels: list[GuideWord], users: list[GuideWord], detected: Sequence[GuideWord] = ()) -> list:
        """The user's words, then the label words and then the detected ones that none before already covers: one
        constraint per concept, whichever sources saw it."""
        combined = list(users)
        for word in [*labels, *detected]:
            if not {form for chosen in combined for form in chosen.forms} & set(word.forms):
                combined.append(word)
        return combined

    def detected_words(self, detections: Sequence[Detection]) -> list[GuideWord]:
        """The COCO classes (not person) detected at detection_threshold or above that the vocabulary can name,
        best first, at most max_detection_words."""
        if self.detection_threshold is None:
            return []
        words, seen = [], set()
        for detection in detections:  # best first
            forms = self.coco[detection.name][0]
            if detection.score < self.detection_threshold or len(words) == self.max_detection_words:
                break
            if detection.name == "person" or detection.name in seen or not forms:
                continue
            seen.add(detection.name)
            words.append(GuideWord(forms[0], forms, "detector", detection.name, round(detection.score, 4)))
        return words

    def count_words(self, detections: Sequence[Detection]) -> list[GuideWord]:
        """The people counted, as a guide word: the person detections at count_threshold or above; two ask for
        "two", three or more for a word of a group (COUNT_WORDS), fewer than least_count for nothing. Its
        probability is the score of the last person counted. CenterNet finds each object once, at its heat map's
        peak, so a person is rarely counted twice: suppressing boxes that overlap a better one put no more coco-dev
        photos in their right count bucket at any threshold tried (results/detector_tuning/counting.json, "counts")."""
        if self.count_threshold is None:
            return []
        people = [d for d in detections if d.name == "person" and d.score >= self.count_threshold]
        forms = self.counts[min(len(people), 3)] if len(people) >= max(self.least_count, 2) else ()
        if not forms:
            return []
        return [GuideWord(forms[0], forms, "detector", "person", round(min(d.score for d in people), 4))]

    def plan(
        self,
        count: int,
        *,
        class_probabilities: torch.Tensor | None = None,
        detections: Sequence[Sequence[Detection]] | None = None,
        users: Sequence[GuideWord] = (),
        templates: bool = True,
    ) -> list[Plan]:
        """The plan of each of `count` photos from what was seen of them: the encoder's ImageNet class
        probabilities (B, 1000) (None: labels do not guide), the detector's detections, best first (None: no
        detector ran) and the user's words. templates: a confident label concept may give the caption (never
        with user words)."""
        users = list(users)
        labels = self.label_words(class_probabilities) if class_probabilities is not None else [[]] * count
        chosen = (
            self.templates(class_probabilities)
            if class_probabilities is not None and templates and not users
            else [None] * count
        )
        animal_ids = {i for name in ANIMALS for i in self.coco[name][1]}
        plans = []
        for b in range(count):
            seen = [d for d in detections[b] if d.score >= self._presence(d.name)] if detections is not None else []
            labelled_animal = any(self.vocab.id(form) in animal_ids for word in labels[b] for form in word.forms)
            if labelled_animal:
                named_by_labels = {form for word in labels[b] for form in word.forms}
                seen = [d for d in seen if d.name not in ANIMALS or set(self.coco[d.name][0]) & named_by_labels]
            counted = self.count_words(detections[b]) if detections is not None else []
            guides = self.combine(labels[b], users, [*self.detected_words(seen), *counted])
            named = {form for word in guides for form in word.forms}
            if chosen[b] is not None:
                named |= set(chosen[b].guide.forms) | set(chosen[b].words)
            penalties = {self.vocab.id(word): float("-inf") for word in self.new_words if word not in named}
            discouraged = []
            if detections is not None:
                present = {d.name for d in seen}
                for name, (_, ids) in self.coco.items():
                    if name in present:
                        continue
                    penalty = -(self.person_penalty if name == "person" else self.object_penalty)
                    free = [i for i in ids if self.vocab.words[i] not in named and i not in penalties]
                    if penalty < 0 and free:
                        discouraged.append(name)
                        penalties.update(dict.fromkeys(free, penalty))
            plans.append(Plan(guides, chosen[b], penalties, seen, tuple(discouraged)))
        return plans

    def _presence(self, name: str) -> float:
        """The score from which a detection of class `name` counts as there."""
        return self.person_presence_threshold if name == "person" else self.presence_threshold

    @property
    def lowest_presence(self) -> float:
        """The lowest score a detection needs to count: what to ask the detector for."""
        counting = () if self.count_threshold is None else (self.count_threshold,)
        return min(self.presence_threshold, self.person_presence_threshold, *counting)

    def penalty_matrix(self, plans: Sequence[Plan], device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The plans' penalties as word_penalties for decoding.best_captions: (B, V), or None when none has any."""
        if not any(plan.penalties for plan in plans):
            return None
        matrix = torch.zeros(len(plans), len(self.vocab), device=device)
        for b, plan in enumerate(plans):
            if plan.penalties:
                ids = torch.tensor(list(plan.penalties), dtype=torch.long)
                matrix[b, ids.to(device)] = torch.tensor(list(plan.penalties.values()), device=device)
        return matrix

    def constraints(self, words: Sequence[GuideWord]) -> list[set[int]]:
        """Word-id sets for constrained_beam_search, one per guide word."""
        return [{self.vocab.id(form) for form in word.forms} for word in words]


def search(decoder, encoded, guidance: Guidance, plans: Sequence[Plan], **options) -> list[list[Hypothesis]]:
    """decoding.best_captions for a batch of photos with their plans (constraints, templates, penalties); options
    as for best_captions (beam_size, max_length, length_penalty). The one place a plan meets the search, for
    captioning, evaluation and the tuning recipes."""
    return best_captions(
        decoder,
        encoded,
        [guidance.constraints(plan.guides) for plan in plans],
        given=[None if plan.template is None else plan.template.tokens for plan in plans],
        word_penalties=guidance.penalty_matrix(plans, encoded.features.device),
        **options,
    )


def positions(words: Sequence[str], guide: Sequence[GuideWord]) -> list[int | None]:
    """For each guide word, the index in the caption's words of the first form that meets it (None if absent)."""
    found = []
    for word in guide:
        found.append(next((i for i, w in enumerate(words) if w in word.forms), None))
    return found
