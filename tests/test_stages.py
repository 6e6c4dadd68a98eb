"""Stages: the trunk split at a residual block for feature stores, exactly; where a store may cache."""

from __future__ import annotations

import pytest
import torch

from show_attend_tell.config import ModelConfig
from show_attend_tell.model import Encoder
from show_attend_tell.stages import check_stage, run_from, run_until, stage_shape


@pytest.mark.slow  # full ResNet-50 builds and runs
def test_encoder_stages_split_the_trunk_exactly():
    config = ModelConfig(vocab_size=10, image_size=100, grid_size=2, fine_tune_blocks=("layer4.1", "layer4.2"))
    encoder = Encoder(config, pretrained=False).eval()
    assert list(encoder.blocks)[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"] and len(encoder.blocks) == 16
    assert encoder.tuned_prefixes() == ["trunk.7.1.", "trunk.7.2."]
    images = torch.randn(2, 3, 100, 100)
    with torch.no_grad():
        whole = encoder(images)  # (2, 4, 2048)
        for stage, shape in (("layer2.3", (13, 512)), ("layer3.0", (7, 1024)), ("layer4.0", (4, 2048))):
            cached = run_until(encoder, images, stage)
            assert stage_shape(config, stage) == shape  # sides round up: 100 -> 50 -> 25 -> 13 -> 7 -> 4
            assert cached.shape == (2, shape[0] ** 2, shape[1])
            torch.testing.assert_close(run_from(encoder, cached, stage), whole, rtol=0, atol=0)
    check_stage(encoder, "layer4.0")
    with pytest.raises(ValueError, match="fine-tuned block layer4.1 runs before the cached stage layer4.1"):
        check_stage(encoder, "layer4.1")
    with pytest.raises(ValueError, match="unknown encoder stage 'layer5.0'"):
        check_stage(encoder, "layer5.0")
    with pytest.raises(ValueError, match="unknown block"):
        Encoder(ModelConfig(vocab_size=10, fine_tune_blocks=("layer4.9",)), pretrained=False)
