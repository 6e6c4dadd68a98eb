"""What several test modules share: a mock decoder and the exhaustive search that beam search is checked against,
the model's teacher-forcing checks, a tiny trainer, broken image files, and the captioners the API and page tests
run on (a stand-in over mean-colour features, and the shipped model)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from conftest import REPO, ColourGrid, tiny_decoder_config, tiny_model_config
from PIL import Image

from show_attend_tell.captioner import SHIPPED_MODEL, Captioner
from show_attend_tell.config import DataConfig, TrainConfig
from show_attend_tell.decoding import length_normalised
from show_attend_tell.model import CaptionDecoder, CaptionModel, Encoded, caption_loss
from show_attend_tell.prepare import PreparedDataset
from show_attend_tell.text import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary
from show_attend_tell.train import new_run

# ----- decoding: a mock decoder and exhaustive search ---------------------------------------------------------
V = 7  # <pad> <start> <end> <unk> and three words
WORDS = [w for w in range(V) if w not in (PAD_ID, START_ID, UNK_ID)]  # what a caption may contain, <end> included


class MockDecoder:
    """log p(next | image, step, previous word) from a fixed random table; the state carries the step."""

    def __init__(self, images: int, max_length: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(images, max_length + 1, V, V, generator=generator).mul(2).log_softmax(dim=3)

    def init_state(self, encoded: Encoded):
        N = encoded.features.size(0)
        return encoded.features[:, 0, 0].long(), torch.zeros(N, dtype=torch.long)

    def step(self, words, state, encoded):
        image, t = state
        log_probs = self.table[image, t, words]  # (N, V)
        alpha = torch.full((words.size(0), 4), 0.25)
        return log_probs, (image, t + 1), alpha

    def sequence_log_prob(self, image: int, tokens: list[int]) -> float:
        previous, total = START_ID, 0.0
        for t, word in enumerate(tokens):
            total += float(self.table[image, t, previous, word])
            previous = word
        return total


def encoded_for(images: list[int]) -> Encoded:
    features = torch.tensor(images, dtype=torch.float).view(-1, 1, 1).expand(-1, 4, 3).contiguous()
    return Encoded(features, features)


def repeats_an_ngram(words: tuple[int, ...], n: int) -> bool:
    grams = [words[i : i + n] for i in range(len(words) - n + 1)]
    return n > 0 and len(grams) != len(set(grams))


def exhaustive(
    mock: MockDecoder,
    image: int,
    max_length: int,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 3,
    constraints: tuple[set[int], ...] = (),
    once: frozenset[int] = frozenset(),
):
    """The best of every caption of at most max_length tokens (ended by <end>, or cut at max_length without it)
    that repeats no n-gram of size no_repeat_ngram nor a word of `once` and holds a word of each constraint set."""
    best = None
    for n in range(max_length + 1):
        for words in itertools.product([w for w in WORDS if w != END_ID], repeat=n):
            if repeats_an_ngram(words, no_repeat_ngram) or not all(set(words) & c for c in constraints):
                continue
            if any(words.count(w) > 1 for w in once):
                continue
            tokens = list(words) + [END_ID] if n < max_length else list(words)
            log_prob = mock.sequence_log_prob(image, tokens)
            score = length_normalised(log_prob, len(tokens), length_penalty)
            if best is None or score > best[0]:
                best = (score, list(words), log_prob)
    return best


def tiny_decoder(seed: int = 0, **overrides) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(tiny_decoder_config(vocab_size=12, **overrides)).eval()


# ----- the model: teacher forcing and a tiny batch it learns ------------------------------------------------
def captions_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five captions of two images, of different lengths, padded: (N, T), lengths (N,), image_index (N,)."""
    rows = [
        [START_ID, 5, 6, END_ID],
        [START_ID, 7, END_ID],
        [START_ID, 8, 9, 10, 11, END_ID],
        [START_ID, END_ID],
        [START_ID, 4, 4, 4, END_ID],
    ]
    T = max(map(len, rows))
    tokens = torch.tensor([r + [PAD_ID] * (T - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    return tokens, lengths, torch.tensor([0, 1, 1, 0, 1])


def assert_teacher_forcing_equals_stepping(model: CaptionModel, **tolerance) -> None:
    """The teacher-forced forward over captions_batch() equals each caption stepped alone from its own image
    with the decoder's `step`, and is zero past each caption's end."""
    features = torch.randn(2, 4, 8)
    tokens, lengths, image_index = captions_batch()  # captions of two images, interleaved, different lengths
    log_probs, alphas, locations = model(features, tokens, lengths, image_index)
    assert bool((locations == -1).all())  # soft attention samples no location
    assert log_probs.shape == (5, tokens.size(1) - 1, 15) and alphas.shape == (5, tokens.size(1) - 1, 4)
    for n in range(5):
        encoded = model.decoder.encode(features[image_index[n] : image_index[n] + 1])
        state = model.decoder.init_state(encoded)
        for t in range(int(lengths[n]) - 1):
            expected, state, alpha = model.decoder.step(tokens[n, t : t + 1], state, encoded)
            torch.testing.assert_close(log_probs[n, t], expected[0], **tolerance)
            torch.testing.assert_close(alphas[n, t], alpha[0], **tolerance)
        assert not log_probs[n, int(lengths[n]) - 1 :].any() and not alphas[n, int(lengths[n]) - 1 :].any()


def learn_tiny_batch(model: CaptionModel, features: torch.Tensor, lr: float, steps: int = 60) -> list[float]:
    """Adam on captions_batch() for `steps` steps -> the word cross-entropy at each."""
    tokens, lengths, image_index = captions_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        forced = model(features, tokens, lengths, image_index)
        loss, cross_entropy = caption_loss(forced.log_probs, forced.alphas, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(cross_entropy))
    return losses


# ----- training ----------------------------------------------------------------------------------------------
def load_script(relative: str, monkeypatch=None):
    """A script of the repo (recipes/x.py, benchmarks/x.py) as a module. With monkeypatch, the script's folder goes
    first on sys.path for the test, as `python benchmarks/x.py` has it (the benchmarks import harness)."""
    path = REPO / relative
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(path.parent)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(run_dir, prepared, features, model: dict | None = None, data: dict | None = None, **train):
    vocab_size = len(PreparedDataset.load(prepared).vocab)
    # fp32 unless a test asks: `auto` would train in bf16 on CPUs that have it, and tests should not depend on the CPU.
    # Random batches unless a test asks: the tiny runs' expectations (a self-critical run's rewards) were set with
    # them, and bucketing (the default) has its own tests
    values = dict(
        epochs=3,
        batch_size=10,
        decoder_lr=1e-2,
        checkpoint_every_steps=2,
        patience=5,
        seed=1,
        log_every_steps=1,
        precision="fp32",
        bucket_by_length=False,
    )
    values.update(train)
    return new_run(
        run_dir,
        tiny_model_config(vocab_size, **(model or {})),
        TrainConfig(**values),
        DataConfig(prepared=str(prepared), features=str(features), **(data or {})),
        pretrained_encoder=False,
        java=False,
    )


# ResNet-50's layer4.2 fine-tuned on a cache of layer4.1's output (2 x 2 at 64 px)
STAGE_MODEL = {"encoder_dim": 2048, "fine_tune_blocks": ("layer4.2",)}


# ----- image files -------------------------------------------------------------------------------------------
def noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height over a few bytes of pixel data: tiny file, huge decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def corrupt_tiff() -> bytes:
    """A 48x48 TIFF whose StripOffsets tag claims the ASCII type: Pillow raises TypeError while decoding it."""
    return edited_tiff(48, 273, 2, struct.pack("<H", 2))  # StripOffsets: its type (bytes 2-3 of the entry)


def edited_tiff(side: int, tag: int, start: int, value: bytes) -> bytes:
    """A noise TIFF whose directory entry for `tag` has `value` written from byte `start` of its 12."""
    buffer = io.BytesIO()
    noise(side, side).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    directory = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[directory : directory + 2])[0]):
        entry = directory + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == tag:
            data[entry + start : entry + start + len(value)] = value
    return bytes(data)


# ----- captioners for the API and the page --------------------------------------------------------------------
EXAMPLES = REPO / "examples"
PHOTO = EXAMPLES / "flickr8k_3385593926_d3e9c21170.jpg"
CAPTION_WORDS = [
    "a",
    "dog",
    "dogs",
    "cat",
    "runs",
    "sits",
    "on",
    "in",
    "the",
    "grass",
    "snow",
    "cup",
    "of",
    "coffee",
    "man",
]


def load_captioner(directory: Path) -> Captioner:
    """The shipped model when it is there; otherwise the real ResNet-50 encoder under a small random decoder
    saved to `directory` (the API and the page behave the same; only the captions are nonsense)."""
    if (SHIPPED_MODEL / "config.json").is_file():
        return Captioner.load(detector="centernet")  # the detector is an option: the API's part of it is tested here

    from show_attend_tell.checkpoint import save_model
    from show_attend_tell.config import ModelConfig
    from show_attend_tell.model import CaptionModel
    from show_attend_tell.text import SPECIAL_TOKENS, Vocabulary
    from show_attend_tell.weights import ENCODER_WEIGHTS

    vocab = Vocabulary([*SPECIAL_TOKENS, *CAPTION_WORDS])
    config = ModelConfig(vocab_size=len(vocab), attention_dim=32, decoder_dim=32, embed_dim=16, dropout=0.0)
    torch.manual_seed(0)
    model = CaptionModel(config)
    with torch.no_grad():
        model.decoder.attention.score.weight *= 6  # peaked maps, as a trained model's, not near-uniform ones
    save_model(model, vocab, directory, encoder_sha256=ENCODER_WEIGHTS["resnet50"].sha256())
    return Captioner.load(directory, detector="centernet")


def stand_in_captioner(encoder=None) -> Captioner:
    """A real Captioner on a tiny random model whose encoder is `encoder` (default conftest.ColourGrid, the photo's
    mean colour): the API's whole path in milliseconds, with nonsense captions and no label guidance or detector."""
    vocab = Vocabulary([*SPECIAL_TOKENS, *CAPTION_WORDS])
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(len(vocab), dropout=0.0), encoder=encoder or ColourGrid()).eval()
    return Captioner(model, vocab, {})
