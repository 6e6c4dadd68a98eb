"""Prefix views with one gradient buffer: what a teacher-forced pass reads at each step, without autograd's
zero-filled whole-tensor gradient per step (model.EncodedPrefixes uses them; tests/test_model.py holds their
gradients to plain slicing). Speed beside the model, as inference.py is for decoding."""

from __future__ import annotations

import torch


class _PrefixGradients(torch.autograd.Function):
    """The link from a tensor to the prefix views of it that a teacher-forced pass reads (Prefixes): an empty
    output whose backward runs after every view's (they all read it) and hands the tensor their summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, prefixes: Prefixes) -> torch.Tensor:
        ctx.prefixes = prefixes
        return tensor.new_empty(0)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return ctx.prefixes.take_gradient(), None


class _PrefixView(torch.autograd.Function):
    """tensor[:n] whose backward adds its gradient into the shared buffer in place and passes nothing on."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, tensor: torch.Tensor, n: int, prefixes: Prefixes) -> torch.Tensor:
        ctx.n, ctx.prefixes = n, prefixes
        return tensor[:n]

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[None, None, None, None]:
        ctx.prefixes.add_gradient(ctx.n, gradient)
        return None, None, None, None


class Prefixes:
    """The views tensor[:n] a teacher-forced pass reads at its steps (the captions still running), with one
    gradient buffer for all of them. Autograd's own slice gives each step's gradient the whole tensor's shape,
    zero-filled, and adds them up (SliceBackward0, the largest part of a profiled 14x14 step:
    results/train_profile_14x14.json; timed, results/train_speed_prefix/); here each step adds its n rows into
    one buffer in place, and the tensor receives the sum once."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.data = tensor.detach()
        self.buffer: torch.Tensor | None = None
        self.link = _PrefixGradients.apply(tensor, self)  # without gradients, an empty tensor and nothing more

    def __call__(self, n: int) -> torch.Tensor:
        """tensor[:n]; its gradient goes to the shared buffer."""
        return _PrefixView.apply(self.link, self.data, n, self)

    def add_gradient(self, n: int, gradient: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = gradient.new_zeros(self.data.shape)
        self.buffer[:n] += gradient

    def take_gradient(self) -> torch.Tensor | None:
        gradient, self.buffer = self.buffer, None
        return gradient
