"""Self-critical sequence training (Rennie et al. 2017) with a CIDEr-D reward.

pycocoevalcap's CiderScorer recomputes document frequencies from the references of every call, which costs
seconds per batch and makes the reward depend on the batch. `CiderD` computes them once over the training
references and then scores any caption against any training image; with the same reference corpus its
numbers equal pycocoevalcap's (tests/test_scst.py). The baseline of each sample is by default the mean reward of
the other samples of the same image (Luo 2020, "a better variant of SCST"), so no greedy decode is needed; the
greedy caption's reward (Rennie et al. 2017) is the other choice. `caption_stats` measures what reward hacking
shows as: few distinct captions, a small vocabulary, repeated or dangling words, captions cut short.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise

import torch

NGRAMS = 4
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty


def _counts(words: Sequence[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, NGRAMS + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


class CiderD:
    """CIDEr-D of tokenised captions against a fixed reference corpus (one list of captions per image)."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]) -> None:
        document_frequency: Counter = Counter()
        for captions in references:
            document_frequency.update({g for caption in captions for g in _counts(caption)})
        self.document_frequency = document_frequency
        self.log_corpus = math.log(float(len(references)))
        self.references = [self.vectors(captions) for captions in references]

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vector: list[dict] = [defaultdict(float) for _ in range(NGRAMS)]
        norm = [0.0] * NGRAMS
        length = 0
        for gram, frequency in counts.items():
            n = len(gram) - 1
            weight = frequency * (self.log_corpus - math.log(max(1.0, self.document_frequency[gram])))
            vector[n][gram] = weight
            norm[n] += weight**2
            if n == 1:  # coco-caption measures length in bigrams; kept for identical numbers
                length += frequency
        return vector, [math.sqrt(x) for x in norm], length

    def vectors(self, captions: Sequence[Sequence[str]]) -> list[tuple[list[dict], list[float], int]]:
        """Captions (word lists) as the references `agreement` compares a caption with."""
        return [self._vector(_counts(caption)) for caption in captions]

    def score(self, words: Sequence[str], image: int) -> float:
        """CIDEr-D (x10, as coco-caption reports it) of one caption against the references of `image`."""
        return self.agreement(words, self.references[image])

    def agreement(self, words: Sequence[str], references: Sequence[tuple[list[dict], list[float], int]]) -> float:
        """CIDEr-D of one caption against any captions (`vectors`), with the training document frequencies: how
        much a caption agrees with others, e.g. the model's other captions of the same photo (0 with none)."""
        if not references:
            return 0.0
        hypothesis, hypothesis_norm, hypothesis_length = self._vector(_counts(words))
        total = 0.0
        for reference, reference_norm, reference_length in references:
            penalty = math.exp(-((hypothesis_length - reference_length) ** 2) / (2 * SIGMA**2))
            for n in range(NGRAMS):
                value = sum(
                    min(weight, reference[n].get(gram, 0.0)) * reference[n].get(gram, 0.0)
                    for gram, weight in hypothesis[n].items()
                )
                if hypothesis_norm[n] and reference_norm[n]:
                    value /= hypothesis_norm[n] * reference_norm[n]
                total += value * penalty
        return total / NGRAMS / len(references) * 10.0


def self_critical_loss(
    log_probs: torch.Tensor,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    samples: int,
    *,
    words: float | None = None,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline, or with `baseline` (B,), one reward per image (the greedy
    caption's).

    log_probs (N, T) of the sampled tokens, tokens (N, T) (<pad> after <end>), rewards (N,) with the
    `samples` samples of each image adjacent. `words` normalises the sum (default: this batch's tokens).
    """
    from show_attend_tell.text import PAD_ID

    grouped = rewards.view(-1, samples)  # (B, samples)
    if baseline is None:
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (samples - 1)  # (B, samples)
    else:
        baseline = baseline.view(-1, 1).to(grouped.dtype)  # (B, 1)
    advantage = (grouped - baseline).view(-1, 1)  # (N, 1)
    mask = tokens != PAD_ID  # (N, T)
    words = float(mask.sum()) if words is None else words
    return -(advantage * log_probs * mask).sum() / words


# a caption ending in one of these stops mid-phrase ("a dog runs through the")
DANGLING = frozenset({"a", "an", "the", "of", "in", "on", "at", "with", "and", "to", "its", "his", "her", "their"})


def repeats_a_word(words: Sequence[str]) -> bool:
    """A word said twice back to back ("a man in a a red shirt")."""
    return any(a == b for a, b in pairwise(words))


def ends_dangling(words: Sequence[str]) -> bool:
    """The caption stops mid-phrase, on an article, preposition or possessive."""
    return bool(words) and words[-1] in DANGLING


def caption_stats(captions: Sequence[str]) -> dict[str, float]:
    """What reward hacking shows as, over decoded captions: how many are distinct, the vocabulary they use, their
    mean length in words, the share with a word repeated back to back ("a a") or ending on a dangling word, and
    the share taken by the most frequent caption (one generic sentence for many photos)."""
    split = [caption.split() for caption in captions]
    if not split:
        return {}
    count = len(split)
    most_common = Counter(captions).most_common(1)[0][1]
    return {
        "distinct_captions": len(set(captions)) / count * 100,
        "vocabulary": len({word for words in split for word in words}),
        "mean_length": sum(map(len, split)) / count,
        "repeated_words": sum(map(repeats_a_word, split)) / count * 100,
        "dangling_endings": sum(map(ends_dangling, split)) / count * 100,
        "most_common_caption": most_common / count * 100,
    }
