"""What every decoder provides, below the decoders themselves: the `Decoder` interface (encode, the first state,
one step, teacher forcing), the state helpers search reorders beams with, and `TeacherForced`.

model.py's LSTM (soft or hard attention) and transformer.py's Transformer both satisfy it; model.build_decoder
is the one place that picks between them. Greedy, sampling, beam search and SCST (decoding.py) are written
against encode, init_state and step, which inference.py's int8 decoder also provides. Shapes use the letters
declared in model.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, TypeVar

import torch

State = tuple[torch.Tensor, ...]  # any decoder's state: tensors whose first dimension is the N rows
StateT = TypeVar("StateT", bound=tuple)


class EncodedImages(Protocol):
    """What a decoder computes once per image: `features` (B, P, F) and whatever else its steps read."""

    features: torch.Tensor  # (B, P, F)

    def select(self, index: torch.Tensor | slice) -> EncodedImages:
        """Rows `index` of every tensor (e.g. each caption's image, or the images still decoding)."""
        ...


class TeacherForced(NamedTuple):
    """A decoder's teacher-forced pass over N captions, each (N, T-1, ...) and zero (-1) past each caption's end."""

    log_probs: torch.Tensor  # (N, T-1, V) log p of each next word
    alphas: torch.Tensor  # (N, T-1, P)
    locations: torch.Tensor  # (N, T-1) s_t where the context was a sampled location (hard attention), else -1


class Decoder(Protocol):
    """The interface training (teacher_forced) and greedy, sampling, beam search and SCST (decoding.py) use.

    `encode` runs once per image; `init_state` gives one state row per image; `step` advances N = B*K rows,
    K consecutive rows per image of `encoded` (K = 1: one row per image; beams or samples otherwise). A state
    is a tuple of tensors whose first dimension is N, so search can reorder any decoder's state with
    `select_rows`. A decoder whose context can be one sampled location (hard attention) returns a
    model.HardState, whose `location` search keeps for every word beside alpha. Speed variants for inference
    (inference.Int8Decoder) provide the three search methods only: they are not trained."""

    def encode(self, features: torch.Tensor) -> EncodedImages:
        """(B, P, E) encoder features -> what every step reads."""
        ...

    def init_state(self, encoded: EncodedImages) -> State:
        """-> the state before the first word, each tensor (B, ...)."""
        ...

    def step(
        self, words: torch.Tensor, state: State, encoded: EncodedImages
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """previous words (N,) -> log p(next word) (N, V), the new state, attention alpha (N, P)."""
        ...

    def teacher_forced(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor,
        *,
        sampling: Any = None,
    ) -> TeacherForced:
        """Training's pass over N captions of B images: features (B, P, E); captions (N, T) = <start> w_1 .. w_n
        <end> <pad>..; lengths (N,) counting <start> and <end>; image_index (N,) the row of `features` each
        caption describes; sampling: where hard attention's locations come from (model.LocationSampling; a
        decoder that samples none refuses one). -> log p (N, T-1, V) of captions[:, 1:], alpha (N, T-1, P) and
        the sampled locations (N, T-1)."""
        ...


def select_rows(state: StateT, rows: torch.Tensor | slice) -> StateT:
    """The state of rows `rows` (a beam's parents, surviving images, the captions still running): any decoder's.
    A NamedTuple state (model.HardState) stays one."""
    parts = [part[rows] for part in state]
    return state._make(parts) if hasattr(state, "_make") else tuple(parts)


def repeat_rows(state: StateT, times: int) -> StateT:
    """Each row's state `times` times in a row: (B, ...) -> (B*K, ...), K = times (beams or samples per image)."""
    return select_rows(state, torch.arange(state[0].size(0), device=state[0].device).repeat_interleave(times))


def rows_per_image(rows: int, images: int) -> int:
    """K, the decoder rows of each image, for N = B*K rows."""
    if rows % images:
        raise ValueError(f"attention: {rows} decoder rows do not split evenly over {images} images")
    return rows // images
