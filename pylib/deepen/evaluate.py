"""Held-out perplexity: exp of the mean next-token loss over packed blocks, and the unigram baseline beside it."""

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
