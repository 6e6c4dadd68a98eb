"""Hand-written backward passes for training, beside the model as inference.py is for decoding; each has the
forward of the plain code it replaces, and tests/test_model.py holds its gradients to plain autograd's.

- Prefix views with one gradient buffer: what a teacher-forced pass reads at each step, without autograd's
  zero-filled whole-tensor gradient per step (model.EncodedPrefixes).
- Attention scores whose backward goes through the sigmoid a few images at a time in the core's cache
  (model.SoftAttention).
- Products of one weight with every step's input whose weight gradient is one product over all the steps
  (model.CaptionDecoder.teacher_forced_soft), as cuDNN's recurrent layers take it; the same for the attention's
  contexts, whose features' gradient is one batched product over all the steps."""

from __future__ import annotations

import torch


class _GradientLink(torch.autograd.Function):
    """The link from tensors to the steps that read them through `owner` (Prefixes, StepProducts, StepContexts): an
    empty output whose backward runs after every step's (they all read it) and hands the tensors the gradients
    the steps left with `owner`, summed (owner.take_gradients(): one per tensor)."""

    @staticmethod
    def forward(ctx, owner: Prefixes | StepProducts | StepContexts, *tensors: torch.Tensor | None) -> torch.Tensor:
        ctx.owner = owner
        return tensors[0].new_empty(0)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, *ctx.owner.take_gradients()


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
        self.link = _GradientLink.apply(self, tensor)  # without gradients, an empty tensor and nothing more

    def __call__(self, n: int) -> torch.Tensor:
        """tensor[:n]; its gradient goes to the shared buffer."""
        return _PrefixView.apply(self.link, self.data, n, self)

    def add_gradient(self, n: int, gradient: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = gradient.new_zeros(self.data.shape)
        self.buffer[:n] += gradient

    def take_gradients(self) -> tuple[torch.Tensor | None]:
        gradient, self.buffer = self.buffer, None
        return (gradient,)


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


class _StepProduct(torch.autograd.Function):
    """x W^T + b whose backward gives x its gradient and keeps the output's for the weight's (StepProducts)."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, x: torch.Tensor, products: StepProducts) -> torch.Tensor:
        ctx.products, ctx.step = products, len(products.inputs)
        products.inputs.append(x.detach())
        return products.plain(x)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        ctx.products.gradients[ctx.step] = gradient
        return None, gradient.mm(ctx.products.weight), None


class StepProducts:
    """x_t W^T + b for the inputs x_t of a recurrence's steps (the rows of h_{t-1} still running). Autograd takes
    W's gradient at every step, a product over the step's few rows, and adds it into the weight's; here each step
    keeps its output's gradient, and W's and b's gradients are one product over all the steps' rows when the
    backward has passed the first step (results/train_speed_fused/). Without gradients, a plain product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.inputs: list[torch.Tensor] = []
        self.gradients: dict[int, torch.Tensor] = {}
        self.link = _GradientLink.apply(self, weight, bias)  # without gradients, an empty tensor and nothing more

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in) -> x W^T + b (n, out); W's gradient is taken once, over every call's rows."""
        if not torch.is_grad_enabled():
            return self.plain(x)
        return _StepProduct.apply(self.link, x, self)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return x.mm(self.weight.t()) if self.bias is None else torch.addmm(self.bias, x, self.weight.t())

    def take_gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        steps = sorted(self.gradients)
        if not steps:
            return None, None
        gradient = torch.cat([self.gradients[step] for step in steps])  # (rows, out)
        inputs = torch.cat([self.inputs[step] for step in steps]).to(gradient.dtype)  # (rows, in)
        self.inputs, self.gradients = [], {}
        return gradient.t().mm(inputs), None if self.bias is None else gradient.sum(dim=0)


class _StepContext(torch.autograd.Function):
    """sum_i alpha_i a_i over the first n rows; the backward gives alpha its gradient and keeps the context's."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, alpha: torch.Tensor, contexts: StepContexts) -> torch.Tensor:
        ctx.contexts, ctx.step = contexts, len(contexts.alphas)
        contexts.alphas.append(alpha.detach())
        return contexts.plain(alpha)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        ctx.contexts.gradients[ctx.step] = gradient
        features = ctx.contexts.features[: gradient.size(0)].to(gradient.dtype)
        return None, torch.bmm(gradient.unsqueeze(1), features.transpose(1, 2)).squeeze(1), None


class StepContexts:
    """The attention's context sum_i alpha_i a_i at every step of a teacher-forced pass, over the first n rows of
    features (N, P, F) (the captions still running). Autograd writes each step's (n, P, F) gradient of the features
    and adds it up; here each step keeps its context's gradient, and the features' is one batched product over all
    the steps: sum_t alpha_t^T g_t for each row (results/train_speed_fused/). Without gradients, a plain product."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features.detach()
        self.alphas: list[torch.Tensor] = []
        self.gradients: dict[int, torch.Tensor] = {}
        self.link = _GradientLink.apply(self, features)  # without gradients, an empty tensor and nothing more

    def __call__(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha (n, P) -> the context of each of the first n rows (n, F)."""
        if not torch.is_grad_enabled():
            return self.plain(alpha)
        return _StepContext.apply(self.link, alpha, self)

    def plain(self, alpha: torch.Tensor) -> torch.Tensor:
        n = alpha.size(0)
        return torch.bmm(alpha.unsqueeze(1).to(self.features.dtype), self.features[:n]).squeeze(1)

    def take_gradients(self) -> tuple[torch.Tensor | None]:
        steps = sorted(self.gradients)
        if not steps:
            return (None,)
        N, P, F = self.features.shape
        dtype = self.gradients[steps[0]].dtype
        alphas = self.features.new_zeros(N, len(steps), P, dtype=dtype)  # (N, T, P), zero where a row has ended
        gradients = self.features.new_zeros(N, len(steps), F, dtype=dtype)  # (N, T, F)
        for column, step in enumerate(steps):
            n = self.gradients[step].size(0)
            alphas[:n, column] = self.alphas[step]
            gradients[:n, column] = self.gradients[step]
        self.alphas, self.gradients = [], {}
        return (torch.bmm(alphas.transpose(1, 2), gradients).to(self.features.dtype),)  # (N, P, F)
