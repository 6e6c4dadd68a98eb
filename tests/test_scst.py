"""SCST: our CIDEr-D equals pycocoevalcap's on the same corpus; the self-critical loss has the right sign."""

from __future__ import annotations

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from show_attend_tell.scst import CiderD, self_critical_loss
from show_attend_tell.text import END_ID, PAD_ID

REFERENCES = [
    ["a dog runs on the grass", "a brown dog is running through a field", "the dog plays outside"],
    ["two children play in the water", "kids splash in a pool", "two kids are swimming in the pool"],
    ["a man rides a bike down the street", "a cyclist on a city street", "a man on a bicycle"],
    ["a woman in a red dress", "a lady wearing red stands by a wall", "a woman poses for a picture"],
]
HYPOTHESES = ["a dog running in the grass", "two kids swim in a pool", "a man on a bike", "a man in a red shirt"]


def test_cider_d_equals_pycocoevalcap_per_image():
    gts = {i: refs for i, refs in enumerate(REFERENCES)}
    res = {i: [h] for i, h in enumerate(HYPOTHESES)}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD([[r.split() for r in refs] for refs in REFERENCES])
    scores = [ours.score(h.split(), i) for i, h in enumerate(HYPOTHESES)]
    assert scores == pytest.approx(list(per_image), abs=1e-9)
    assert sum(scores) / len(scores) == pytest.approx(mean, abs=1e-9)


def test_self_critical_loss_pushes_up_better_than_average_samples():
    log_probs = torch.zeros(4, 3, requires_grad=True)  # two images x two samples, three tokens
    tokens = torch.tensor([[5, END_ID, PAD_ID], [6, 7, END_ID], [5, END_ID, PAD_ID], [8, END_ID, PAD_ID]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    self_critical_loss(log_probs, tokens, rewards, samples=2).backward()
    grad = log_probs.grad
    assert (grad[0, :2] < 0).all() and (grad[1] > 0).all()  # descent raises sample 0, lowers sample 1
    assert not grad[2:].any()  # equal rewards: no signal
    assert grad[0, 2] == 0  # padding carries no gradient
