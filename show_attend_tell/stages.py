"""An encoder's residual blocks as cache points: a feature store can hold the output of one block (e.g. layer4.0)
instead of the grid features, so that training fine-tunes the blocks after it on cached inputs
(`sat features --stage`, features.load_for_model). These run model.Encoder's trunk up to a block and on from it.

Shape letters as in model.py: B images, S input side, h x w and C the grid and channels of a block's output.
"""

from __future__ import annotations

import math

import torch

from show_attend_tell.config import ModelConfig
from show_attend_tell.model import Encoder


def stage_shape(config: ModelConfig, stage: str) -> tuple[int, int]:
    """(side, channels) of the output of residual block `stage` (e.g. layer4.0) for config.image_size inputs:
    the stem divides the side by 4, the first block of layer2..layer4 by 2 more, each rounding up."""
    layer = int(stage.removeprefix("layer").split(".")[0])
    side = config.image_size
    for _ in range(1 + layer):  # stem conv and max-pool, then one stride per layer after layer1
        side = -(-side // 2)
    return side, 256 * 2 ** (layer - 1)


def check_stage(encoder: Encoder, stage: str) -> None:
    """Refuse a cache point that is not a block, or that comes after a fine-tuned block."""
    if stage not in encoder.blocks:
        raise ValueError(f"unknown encoder stage {stage!r}; expected a residual block such as layer4.0")
    order = list(encoder.blocks)
    position = order.index(stage)
    for name in encoder.fine_tune_blocks:
        first = name if name in encoder.blocks else f"{name}.0"
        if order.index(first) <= position:
            raise ValueError(
                f"fine-tuned block {name} runs before the cached stage {stage}; cache an earlier stage "
                "or train from images"
            )


def run_until(encoder: Encoder, images: torch.Tensor, stage: str) -> torch.Tensor:
    """(B, 3, S, S) images -> (B, h*w, C), the output of residual block `stage` (e.g. layer4.0): what a
    feature store caches when the blocks after it are fine-tuned on cached inputs."""
    x = encoder.trunk[:4](images)  # stem: conv, BatchNorm, ReLU, max-pool
    for name, block in encoder.blocks.items():
        x = block(x)
        if name == stage:
            return x.flatten(2).transpose(1, 2)
    raise ValueError(f"unknown encoder stage {stage!r}")


def run_from(encoder: Encoder, cached: torch.Tensor, stage: str) -> torch.Tensor:
    """The rest of the trunk after block `stage`, then the grid pooling: (B, h*w, C) -> (B, P, E)."""
    side = math.isqrt(cached.size(1))
    x = cached.transpose(1, 2).unflatten(2, (side, side))  # (B, C, h, w)
    after = False
    for name, block in encoder.blocks.items():
        if after:
            x = block(x)
        after = after or name == stage
    if not after:
        raise ValueError(f"unknown encoder stage {stage!r}")
    return encoder.pool(x).flatten(2).transpose(1, 2)
