"""What a training step minimises, and how a run is scored on held-out data, per stage:

- language modelling (continual pretraining): next-token loss on packed blocks;
- instruction tuning: the same loss on the response tokens only (the prompt's labels are -100);
- DPO (Rafailov et al., arXiv 2305.18290): with r(y) = β (log π(y|x) − log π_ref(y|x)),
      loss = −log σ(r(chosen) − r(rejected)),
  the reference log-probabilities computed once, with the model the stage starts from, before it learns (so the
  reference model is never held beside the policy; SOLAR's sDPO: each stage's reference is the stage before's
  result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepen.instruct import collate, pad_id, prompt_text
from deepen.loop import evaluating


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """(rows,) the summed log-probability of each row's labelled tokens (its response) given what comes before."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair reward margin r(chosen) − r(rejected)) from sequence log-probabilities (pairs,)."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


class InstructionTuning:
    """The loss of a micro-batch of (ids, labels) rows: cross-entropy on the response tokens."""

    def __init__(self, pad_id: int, device):
        self.pad_id, self.device = pad_id, device

    def loss(self, model, rows: list) -> torch.Tensor:
        return model(**to_device(collate(rows, self.pad_id), self.device)).loss


class DPO:
    """The loss of a micro-batch of pairs ((chosen ids, labels), (rejected ids, labels), ref chosen, ref rejected)."""

    def __init__(self, beta: float, pad_id: int, device):
        self.beta, self.pad_id, self.device = beta, pad_id, device

    def logps(self, model, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) sequence log-probabilities, one forward over both halves of the pairs."""
        batch = to_device(collate([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_id), self.device)
        logps = sequence_logps(model, batch)
        return logps[:len(pairs)], logps[len(pairs):]

    def loss_and_margins(self, model, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(the mean DPO loss, each pair's reward margin) against the pairs' reference log-probabilities."""
        chosen, rejected = self.logps(model, pairs)
        ref = torch.tensor([[p[2], p[3]] for p in pairs], device=chosen.device)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta)

    def loss(self, model, pairs: list) -> torch.Tensor:
        return self.loss_and_margins(model, pairs)[0]


def reference_logps(model, pairs: list, pad_id: int, device, batch_size: int = 8) -> list:
    """The pairs with the model's own (chosen, rejected) log-probabilities appended: the reference of a DPO stage."""
    out = []
    scorer = DPO(0.0, pad_id, device)
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            chosen, rejected = scorer.logps(model, part)
            out += [(p[0], p[1], c, r) for p, c, r in zip(part, chosen.tolist(), rejected.tolist())]
    return out


def response_losses(model, rows: list, pad_id: int, device, batch_size: int = 8) -> torch.Tensor:
    """(examples,) float64: each example's mean cross-entropy over its response tokens."""
    out = []
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(rows[start:start + batch_size], pad_id), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            out.append((loss.double().sum(1) / (labels != -100).sum(1)).cpu())
    return torch.cat(out)


def preference_scores(model, pairs: list, beta: float, pad_id: int, device, batch_size: int = 8) -> dict:
    """On held-out pairs (with reference log-probs): preference accuracy (the share with r(chosen) > r(rejected))
    and the mean reward margin."""
    scorer, margins = DPO(beta, pad_id, device), []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            margins += scorer.loss_and_margins(model, pairs[start:start + batch_size])[1].tolist()
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins)}


ANSWER_TOKENS = 96  # greedy tokens a held-out answer may take (the built-in worked solutions fit)


def answer_accuracy(model, tokenizer, examples: list, template: str, device, max_new_tokens: int = ANSWER_TOKENS,
                    batch_size: int = 8) -> float:
    """Exact-match accuracy of greedy answers on held-out questions: the text after the last "Answer:" of the
    generated response, compared with the example's answer."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues the prompt: pad on the left
    pad = pad_id(tokenizer)
    right = 0
    try:
        with evaluating(model):
            for start in range(0, len(examples), batch_size):
                part = examples[start:start + batch_size]
                enc = tokenizer([prompt_text(tokenizer, e.prompt, template) for e in part], return_tensors="pt",
                                padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
                for e, ids in zip(part, out[:, enc["input_ids"].shape[1]:]):
                    right += final_answer(tokenizer.decode(ids, skip_special_tokens=True)) == e.answer
    finally:
        tokenizer.padding_side = side
    return right / len(examples)


def final_answer(text: str) -> str | None:
    """What a response answers: the first line after its last "Answer:" (None without one)."""
    if "Answer:" not in text:
        return None
    return (text.rsplit("Answer:", 1)[1].strip().splitlines() or [""])[0].strip()
