"""SCST: our CIDEr-D equals pycocoevalcap's on the same corpus; the self-critical loss has the right sign."""

from __future__ import annotations

import pytest
import torch
from helpers import load_script
from pycocoevalcap.cider.cider import Cider

from show_attend_tell.scst import CiderD, caption_stats, self_critical_loss
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


def test_agreement_is_cider_d_against_any_captions():
    cider = CiderD([[r.split() for r in refs] for refs in REFERENCES])
    caption = HYPOTHESES[2].split()
    assert cider.agreement(caption, cider.vectors([r.split() for r in REFERENCES[2]])) == cider.score(caption, 2)
    itself = cider.agreement(caption, cider.vectors([caption]))
    assert itself == pytest.approx(10.0)  # cosine 1 at every n, no length penalty, x10
    assert cider.agreement(caption, cider.vectors([HYPOTHESES[1].split()])) < itself
    assert cider.agreement(caption, []) == 0.0


def test_self_critical_loss_pushes_up_better_than_average_samples():
    log_probs = torch.zeros(4, 3, requires_grad=True)  # two images x two samples, three tokens
    tokens = torch.tensor([[5, END_ID, PAD_ID], [6, 7, END_ID], [5, END_ID, PAD_ID], [8, END_ID, PAD_ID]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    self_critical_loss(log_probs, tokens, rewards, samples=2).backward()
    grad = log_probs.grad
    assert (grad[0, :2] < 0).all() and (grad[1] > 0).all()  # descent raises sample 0, lowers sample 1
    assert not grad[2:].any()  # equal rewards: no signal
    assert grad[0, 2] == 0  # padding carries no gradient


def test_a_greedy_baseline_is_the_images_greedy_reward_for_each_of_its_samples():
    log_probs = torch.zeros(4, 2, requires_grad=True)  # two images x two samples
    tokens = torch.tensor([[5, END_ID], [6, END_ID], [5, END_ID], [8, END_ID]])
    rewards = torch.tensor([1.0, 0.2, 0.5, 0.5])
    self_critical_loss(log_probs, tokens, rewards, samples=2, baseline=torch.tensor([0.6, 0.5])).backward()
    grad = log_probs.grad
    # advantages 0.4, -0.4, 0, 0 over 8 tokens: d(loss)/d(log p) = -advantage / 8 at every token of the sample
    expected = torch.tensor([-0.05, 0.05, 0.0, 0.0]).view(4, 1).expand(4, 2)
    assert torch.allclose(grad, expected)
    leave_one_out = torch.zeros(4, 2, requires_grad=True)
    self_critical_loss(leave_one_out, tokens, rewards, samples=2).backward()
    assert not torch.allclose(leave_one_out.grad, grad)  # the two baselines differ on image 0 (0.2 / 1.0 vs 0.6)


def test_caption_stats_measure_what_reward_hacking_shows_as():
    captions = [
        "a dog runs on the grass",
        "a man in a a red shirt",
        "a dog runs on the grass",
        "two children play in the",
    ]
    stats = caption_stats(captions)
    assert stats["distinct_captions"] == 75.0
    assert stats["vocabulary"] == len(set(" ".join(captions).split()))
    assert stats["mean_length"] == (6 + 7 + 6 + 5) / 4
    assert stats["repeated_words"] == 25.0  # "a a"
    assert stats["dangling_endings"] == 25.0  # "... in the"
    assert stats["most_common_caption"] == 50.0
    assert caption_stats([]) == {}


def test_consensus_reranking_picks_the_hypothesis_the_models_other_captions_agree_with():
    recipe = load_script("recipes/consensus_rerank.py")
    cider = CiderD([[r.split() for r in refs] for refs in REFERENCES])
    dog, bike, red_bike = "a dog running in the grass", "a man rides a bike", "a man rides a red bike"
    hypotheses = [(dog.split(), -1.0, -0.5), (bike.split(), -1.2, -0.6), (red_bike.split(), -1.3, -0.65)]
    samples = [dog.split(), bike.split(), ["a", "man", "on", "a", "bike"]]
    found = {
        0: dict(template=False, hypotheses=hypotheses, samples=samples),
        1: dict(template=True, hypotheses=hypotheses, samples=samples),  # a template stays whatever agrees
    }
    # the two bike captions agree with each other, so together they outweigh the more probable dog caption
    assert recipe.rerank(found, cider, "beams", 3, weight=0.0) == {0: bike.split(), 1: dog.split()}
    assert recipe.rerank(found, cider, "samples", 3, weight=0.0)[0] == bike.split()
    assert recipe.rerank(found, cider, "samples", 1, weight=0.0)[0] == dog.split()  # only the first sample counts
    assert recipe.rerank(found, cider, "samples", 3, weight=100.0)[0] == dog.split()  # the beam score decides
