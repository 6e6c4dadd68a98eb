"""Hand-written backward passes for training, beside the model as inference.py is for decoding; each has the
forward of the plain code it replaces, and tests/test_model.py holds its gradients to plain autograd's.

- Prefix views with one gradient buffer: what a teacher-forced pass reads at each step, without autograd's
  zero-filled whole-tensor gradient per step (model.EncodedPrefixes).
- Attention scores whose backward goes through the sigmoid a few images at a time in the core's cache
  (model.SoftAttention)."""

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


# Energies per pass of the backward: one chunk's energies and gradients stay in the core's cache.
ENERGY_CHUNK_BYTES = 4 << 20


class AttentionScores(torch.autograd.Function):
    """scores = 2 (w^T sigmoid(u_i + v) + b) for every location i of every row: u (B, P, A) the images' terms,
    v (B, K, 1, A) the rows' terms (K rows per image), w (A,), b (1,) -> (B*K*P,). The forward is the plain
    code's (the same numbers); the backward takes the gradient through the sigmoid a few images at a time, so
    each chunk of the (B, K, P, A) energies is read from memory once for all of its products, where autograd
    writes the outer product of the scores' gradient and w, then reads it back with the energies
    (results/train_speed_energies/: faster in fp32, the same in bf16)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        A = u.size(-1)
        energy = torch.add(u.unsqueeze(1), v).sigmoid_()  # (B, K, P, A)
        ctx.save_for_backward(energy, w)
        return torch.addmv(b, energy.view(-1, A), w, beta=2, alpha=2)

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
        energy, w = ctx.saved_tensors
        B, K, P, A = energy.shape
        grad_scores = grad_scores.reshape(B, K, P, 1).to(energy.dtype)
        grad_w = torch.mv(energy.view(-1, A).t(), grad_scores.reshape(-1)).mul_(2)  # (A,)
        grad_b = grad_scores.sum(dtype=torch.float32).mul(2).reshape(1)
        # d scores / d (u + v) = 2 w sigmoid' = -2 w e (e - 1)
        grad_energy = torch.empty_like(energy)  # (B, K, P, A)
        minus_two_w = w.to(energy.dtype).mul(-2)
        images = max(1, ENERGY_CHUNK_BYTES // (K * P * A * energy.element_size()))
        for start in range(0, B, images):
            rows = slice(start, start + images)
            chunk = torch.mul(energy[rows], energy[rows].sub(1), out=grad_energy[rows])
            chunk.mul_(grad_scores[rows]).mul_(minus_two_w)
        grad_u = grad_energy.squeeze(1) if K == 1 else grad_energy.sum(dim=1)  # (B, P, A)
        grad_v = grad_energy.sum(dim=2, keepdim=True)  # (B, K, 1, A)
        return grad_u, grad_v, grad_w.to(w.dtype), grad_b.to(w.dtype)
