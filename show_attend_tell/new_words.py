"""Words the training captions never had, added to a trained decoder the way DCC (Hendricks et al. 2016) and
constrained beam search (Anderson et al. 2017) add them: each new word starts as a copy of a reviewed close known
word ("giraffe" from "horse"), its embedding row and its output row both. The decoder then writes the new word
wherever it would have written the known one, and guided search (guidance.py) asks for it only when the detector
saw the object: "a horse standing in a field" becomes "a giraffe standing in a field".

Every other search bans the new words: a copied output row ties the known word's logit, so left free the decoder
would write "giraffe" for any horse (guidance.Plan's penalties). The pairs live in labels/coco_words.json
("new_words"); a model whose vocabulary already has a word keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from show_attend_tell.text import Vocabulary


def missing_words(vocab: Vocabulary, pairs: Mapping[str, str]) -> dict[str, str]:
    """The pairs (new word -> known word) whose new word `vocab` lacks and whose known word it has."""
    return {new: known for new, known in pairs.items() if new not in vocab and known in vocab}


@torch.no_grad()
def add_words(decoder: nn.Module, vocab: Vocabulary, pairs: Mapping[str, str]) -> Vocabulary:
    """Grow `decoder`'s embedding and output layer (`embedding`, `L_o`: the LSTM's and the Transformer's) in place
    by one row per new word, a copy of its known word's rows; returns the vocabulary with the new words at the end
    (ids len(vocab), len(vocab) + 1, ...). `pairs` as from missing_words."""
    if not pairs:
        return vocab
    sources = torch.tensor([vocab.id(known) for known in pairs.values()])
    embedding, output = decoder.embedding, decoder.L_o
    grown_embedding = nn.Embedding(
        embedding.num_embeddings + len(pairs), embedding.embedding_dim, padding_idx=embedding.padding_idx
    ).to(embedding.weight.device, embedding.weight.dtype)
    grown_embedding.weight.copy_(torch.cat([embedding.weight, embedding.weight[sources]]))
    grown_output = nn.Linear(output.in_features, output.out_features + len(pairs)).to(
        output.weight.device, output.weight.dtype
    )
    grown_output.weight.copy_(torch.cat([output.weight, output.weight[sources]]))
    grown_output.bias.copy_(torch.cat([output.bias, output.bias[sources]]))
    decoder.embedding, decoder.L_o = grown_embedding, grown_output
    return Vocabulary([*vocab.words, *pairs], min_count=vocab.min_count)
