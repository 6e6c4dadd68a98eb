"""Caption text: the PTB-style tokenizer and the word vocabulary.

`tokenize` is a pure-Python copy of what coco-caption's evaluation does to a caption (Stanford CoreNLP 3.4.1's
PTBTokenizer with -lowerCase, then dropping punctuation tokens), so captions are split the same way for the
vocabulary, at caption time and in the metrics when Java is missing. It reproduces the lexer's rules that
matter for captions: clitics ("dog's" -> dog 's, "don't" -> do n't, "cannot" -> can not), hyphenated words and
numbers kept whole, abbreviations keeping their period (mr. st. u.s. a.m.), quotes and punctuation dropped.
Deliberate differences, for a cleaner vocabulary: brackets are dropped (coco-caption keeps "-lrb-"/"-rrb-",
because it lower-cases before filtering), as are runs of ?/! and of hyphens ("!!", "-----"), and a number
with a space inside ("1 1/2") stays two tokens.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from show_attend_tell.errors import InputError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD, START, END, UNK)  # in id order

# The words a caption may repeat ("a man in a hat and a woman in a dress"): articles, prepositions, conjunctions,
# pronouns and auxiliaries. Any other word appears in a caption at most once (decoding.once_mask): self-critical
# training learns to repeat nouns and colours ("a man is riding a bike on a bike", "a boy in a green green
# shirt"), which earn CIDEr-D's n-gram matches (README, Self-critical training).
_FUNCTION_WORDS = """
a an the is are was were be been being has have and or but as that who which while
in on of with at to from by for into onto over under through across along around behind near off up down out
his her their its it he she they them this these those there
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())

# The tokens coco-caption's PTBTokenizer wrapper removes (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_LETTER = r"[^\W\d_\u00bc-\u00be\u2153-\u215e]"  # Python's \w counts vulgar fractions as letters
_ALNUM = rf"(?:{_LETTER}|\d)"
_APOS = "['\u0092\u2019]"
_APOS_ETC = "['`\u0091\u0092\u2018\u2019\u201b]"
_WORD = rf"{_LETTER}{_ALNUM}*(?:[.!?]{_LETTER}{_ALNUM}*)*"
_NUM = r"(?:\d*(?:[.,]\d+)+|\d+(?:[.:,]\d+)*)"
# One part of a hyphenated word: a number when nothing alphanumeric follows it (2.5-year-old), else a word.
_PART = rf"(?:{_NUM}(?!{_ALNUM})|{_ALNUM}+)"

# Abbreviations that keep their period, read off CoreNLP 3.4.1 (every candidate was run through the jar).
# "(?-i:X)" marks a letter the lexer matches in one case only ("Mass." is kept, "mass." is not).
_ABBREVIATIONS = (
    "jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
    "|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt"
    "|wisc?|wyo|(?-i:A)z|(?-i:A)rk|(?-i:D)el|(?-i:I)ll|(?-i:L)a|(?-i:M)ass|(?-i:M)iss|(?-i:O)re|(?-i:P)a"
    "|(?-i:T)ex|(?-i:W)ash"
    "|inc|cos?|corp|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys|pp?t(?-i:[ye])s?|tel|est|ext|sq"
    "|jr|sr|bros|blvd|rd|esq|ed\\.d|ph\\.d|etc|al|seq|bldg"
    "|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave"
    "|pres|lieut|hon|brig|c?mdr|comdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
    "|vs|alex|wm|jos|cie|cf|treas|ph|invt|elec|natl|m(?-i:[ft])g"
    "|[a-z](?:\\.[a-z])*"  # single letters and acronyms: a. u.s. a.m. e.g. s.c.u.b.a.
)

# Lexer rules, tried at each position; like JFlex, the longest match wins and ties go to the earlier rule.
# A rule's first matching "tok" group is the token; text matched after it is trailing context, scanned again.
# Rules marked drop=True produce punctuation that is removed.
_RULES: list[tuple[re.Pattern[str], bool]] = [
    (re.compile(p, re.IGNORECASE), drop)
    for p, drop in [
        (r"<\/?[a-z!?][^>\r\n]*>", False),  # SGML tags
        (rf"(?P<tok>can)not|(?P<tok2>{_APOS}t)was", False),  # assimilations: can not, 't was
        (rf"(?P<tok>{_APOS}t)is|(?P<tok2>gon|got|wan)(?:na|ta)|(?P<tok3>lem|gim)me", False),
        (rf"(?P<tok>{_WORD}){_APOS}(?:[msd]|re|ve|ll)", False),  # dog|'s, we|'re
        (rf"(?P<tok>{_LETTER}*(?-i:[a-mo-zA-MO-Z]))n{_APOS_ETC}t", False),  # do|n't, ca|n't
        (_WORD, False),
        (
            rf"{_APOS}n{_APOS}?|[ldj]{_APOS}|dunkin{_APOS}|somethin{_APOS}|ol{_APOS}|{_APOS}em"
            rf"|(?-i:[A-HJ-XZn]){_APOS_ETC}{_LETTER}{{2,}}|{_APOS}[2-9]0s|{_APOS}till?"
            rf"|{_LETTER}+(?-i:[aeiouyAEIOUY]){_APOS_ETC}(?-i:[aeiouA-Z]){_LETTER}*|{_APOS}cause"
            rf"|cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|o{_APOS_ETC}o",
            False,
        ),
        (rf"(?P<tok>y{_APOS}){_LETTER}", False),  # y'|all
        (r"https?://[^\s\"<>|(){}\[\]]*[^\s\"'<>|.!?(){},;:&\[\]-]", False),
        (
            r"(?:www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-z]{2,4}|(?:[^\s\"`'<>|.!?(){},\-_$]+\.)+(?:com|net|org|edu))"
            r"(?:/[^\s\"<>|()]*[^\s\"<>|.!?(){},-])?",
            False,
        ),
        (r"[a-z0-9._%+-]+@[a-z0-9][a-z0-9.-]*[a-z0-9]", False),
        (rf"@[a-z_]\w*|#{_LETTER}+", False),
        (rf"(?P<tok>{_APOS}(?:[msd]|re|ve|ll))(?!{_LETTER})", False),  # 's on its own
        (rf"(?P<tok>n{_APOS_ETC}t)(?!{_LETTER})", False),
        (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", False),
        (rf"[-+]?{_NUM}", False),
        (r"(?:\d{1,4}-)?\d{1,4}\\?/\d{1,4}|[\u00bc-\u00be\u2153\u2154]", False),  # fractions: 3/4, 1-1/2, ½
        (
            rf"(?:[dol]{_APOS_ETC}{_ALNUM})?(?:[-+]{_NUM}(?!{_ALNUM})|{_PART})(?:[-_](?:[dol]{_APOS_ETC}{_ALNUM})?{_PART})*",
            False,
        ),
        (r"(?-i:[A-Z]+(?:[+&][A-Z]+)+)", False),  # AT&T
        (rf"{_ALNUM}+(?:-{_LETTER}+){{0,2}}(?:\\?/{_ALNUM}+(?:-{_LETTER}+){{0,2}}){{1,2}}", False),  # and/or
        (r"(?-i:[A-Z])*\$|#+|@+|_+|\*+|[%&/\\=<>]", False),
        (rf"(?P<tok>(?:{_ABBREVIATIONS})\.)", False),
        (r"(?P<tok>(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.)\s?\d", False),  # no. 5, fig. 3
        (r"&amp;", False),
        ("\"|''|``|[`'\u0082\u0084\u0091-\u0094\u2018-\u201f\u2039\u203a\u00ab\u00bb]", True),  # quotes
        (r"\.{3,}|[\u0085\u2026]|-+|[?!]+|[.,;:(){}\[\]\u0096\u0097\u2013\u2014\u2015\u00a1\u00bf]", True),
    ]
]
_SIMPLE_WORD = re.compile(rf"{_LETTER}+(?=\s|$)")
_SPACE = re.compile(r"\s+")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "wanna", "lemme", "gimme"])
_NORMALISED = {
    "&amp;": "&",
    "\u00a3": "#",
    "\u20ac": "$",
    "\u00a2": "cents",
    "\u00bc": "1/4",
    "\u00bd": "1/2",
    "\u00be": "3/4",
    "\u2153": "1/3",
    "\u2154": "2/3",
}
_QUOTE_MARKS = str.maketrans("\u0092\u2019\u0091\u2018\u201b", "''```")


def _longest_match(text: str, pos: int) -> tuple[str, int, bool] | None:
    """The token at `pos` as (token, characters consumed, dropped?), or None when no rule matches."""
    best: tuple[str, int, bool] | None = None
    best_length = 0
    for pattern, drop in _RULES:
        match = pattern.match(text, pos)
        if match is None or match.end() - pos <= best_length:
            continue
        best_length = match.end() - pos
        groups = [g for g in match.groups() if g is not None] if pattern.groups else []
        token = groups[0] if groups else match.group()
        best = (token, len(token), drop)
    return best


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case words the way coco-caption's PTBTokenizer does, punctuation dropped.

    "A dog's ball, isn't it?" -> ["a", "dog", "'s", "ball", "is", "n't", "it"]
    """
    tokens: list[str] = []
    pos, length = 0, len(text)
    while pos < length:
        space = _SPACE.match(text, pos)
        if space:
            pos = space.end()
            continue
        simple = _SIMPLE_WORD.match(text, pos)
        if simple and simple.group().lower() not in _ASSIMILATIONS:  # fast path: a plain word
            tokens.append(simple.group().lower())
            pos = simple.end()
            continue
        found = _longest_match(text, pos)
        if found is None:
            # The lexer keeps lone symbols (currency, maths, degrees) and deletes what it cannot read.
            char = text[pos]
            if unicodedata.category(char).startswith("S") and ord(char) <= 0xFFFF:
                tokens.append(_NORMALISED.get(char, char))
            pos += 1
            continue
        token, consumed, drop = found
        if not drop:
            tokens.append(_NORMALISED.get(token, token).translate(_QUOTE_MARKS).lower())
        pos += consumed
    return tokens


class Vocabulary:
    """Words <-> ids. Ids 0-3 are PAD, START, END, UNK; the rest are words by falling count.

    Built from the training captions only, so validation and test words never leak into the model.
    """

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with {', '.join(SPECIAL_TOKENS)}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat a word")
        self.words: list[str] = list(words)
        self.min_count = min_count
        self._ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Keep words seen at least `min_count` times in `captions` (token lists); ties go alphabetically."""
        if min_count < 1:
            raise InputError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        return cls([*SPECIAL_TOKENS, *kept], min_count=min_count)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def id(self, word: str) -> int:
        return self._ids.get(word, UNK_ID)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Word ids, UNK for unknown words; no START/END added."""
        return [self._ids.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words for `ids`, stopping at END and skipping PAD and START."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i not in (PAD_ID, START_ID):
                words.append(self.words[i])
        return words

    def save(self, path: str | Path) -> None:
        data = {"format": 1, "min_count": self.min_count, "words": self.words}
        Path(path).write_text(json.dumps(data, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by `save`; a missing or malformed file raises InputError naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: vocabulary file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable vocabulary JSON file ({error})") from None
        words = data.get("words") if isinstance(data, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InputError(f"{path}: expected an object with a 'words' list of strings")
        min_count = data.get("min_count", 1)
        if not isinstance(min_count, int):
            raise InputError(f"{path}: 'min_count' must be an integer, got {min_count!r}")
        try:
            return cls(words, min_count=min_count)
        except ValueError as error:
            raise InputError(f"{path}: {error}") from None
