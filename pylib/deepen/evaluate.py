"""Held-out perplexity: exp of the mean next-token loss over packed blocks, and the unigram baseline beside it;
per corpus for a model (`deepen eval MODEL --data general,code`): general = forgetting, domain = gain."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean cross-entropy) of predicting blocks[:, 1:] from what comes before, every token weighing the same."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)  # (batch, seq)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (batch, seq - 1, vocab)
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def unigram_perplexity(train_blocks: torch.Tensor, heldout_blocks: torch.Tensor, vocab_size: int) -> float:
    """The baseline a model must beat: token frequencies of the training blocks (add-one smoothed), no context,
    scored on the same held-out targets as `perplexity` (blocks[:, 1:])."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1
    log_p = counts.log() - counts.sum().log()
    return math.exp(-log_p[heldout_blocks[:, 1:].flatten()].mean().item())


def heldout_blocks(corpus: str, tokenizer, seq_len: int, n_blocks: int | None = None,
                   text_column: str = "text") -> torch.Tensor:
    """The first `n_blocks` packed blocks (n, seq_len) of a corpus's held-out split (all of it when None)."""
    from deepen.data import load_corpus, pack

    dataset = load_corpus(corpus, "heldout", text_column=text_column)
    return pack(dataset, tokenizer, seq_len, None if n_blocks is None else n_blocks * seq_len)


def evaluate(model, tokenizer, corpora: list[str], seq_len: int = 256, n_blocks: int | None = 64,
             batch_size: int = 8) -> dict[str, dict]:
    """Held-out perplexity of `model` on each corpus: {corpus: {"perplexity", "tokens"}}."""
    results = {}
    for corpus in corpora:
        blocks = heldout_blocks(corpus, tokenizer, seq_len, n_blocks)
        results[corpus] = {"perplexity": perplexity(model, blocks, batch_size), "tokens": blocks[:, 1:].numel()}
    return results
