"""What a run learns — one object per objective, which `deepen.train.train` calls and never names: its data (the
training batches and the held-out set), its preparation, its loss, its evaluation.

- `LanguageModelling` (continual pretraining): next-token loss on packed blocks;
- `InstructionTuning`: the same loss on the response tokens only (the prompt's labels are -100);
- `DPO` (Rafailov et al., arXiv 2305.18290): with r(y) = β (log π(y|x) − log π_ref(y|x)),
      loss = −log σ(r(chosen) − r(rejected)),
  the reference log-probabilities computed once, with the model the stage starts from, before it learns (its
  preparation: so the reference model is never held beside the policy; SOLAR's sDPO: each stage's reference is the
  stage before's result).

`objective(config, tokenizer, device)` makes the one a run config names (`config.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deepen.batches import heldout_blocks, streams, training_batches
from deepen.config import RunConfig, stage_span
from deepen.instruct import ExampleBatches, collate, encoded, load_examples, pad_id, prompt_text
from deepen.loop import block_losses, evaluating, next_token_loss


@dataclass
class Heldout:
    """What a run is scored on: general text (forgetting: packed blocks) and its domain (gain: packed blocks for
    language modelling; held-out instruction examples, or the chosen responses of held-out pairs)."""

    general: torch.Tensor
    domain: torch.Tensor | list
    examples: list = field(default_factory=list)  # instruction tuning: held-out questions with an answer
    pairs: list = field(default_factory=list)  # DPO: held-out pairs, with the reference's log-probabilities


def read(key: str, data, load):
    """What load(corpus) reads from data.<key>; an error names the key (and the part, in the error itself)."""
    corpus = getattr(data, key)
    try:
        return load(corpus)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        shown = corpus if isinstance(corpus, str) else ",".join(f"{p.name}:{p.weight:g}" for p in corpus)
        kind = type(e) if type(e) in (FileNotFoundError, RuntimeError, ValueError) else ValueError  # a subclass may
        raise kind(f"data.{key}={shown!r}: {e}") from None  # need more than a message to be made again


def general_blocks(config: RunConfig, tokenizer) -> torch.Tensor:
    """The held-out general blocks every objective is scored on for forgetting (the same whatever the micro-batch)."""
    d, t = config.data, config.train
    return read("general", d, lambda corpus: heldout_blocks(corpus, tokenizer, d.seq_len,
                                                           t.eval_batches * t.global_batch,
                                                           text_column=d.text_column, streaming=streams(d, corpus)))


class Objective:
    """The interface `train` calls. data -> (batch source, Heldout); prepare -> after accelerate's prepare;
    batch -> a step's rows on the device; loss -> a micro-batch's loss; evaluate -> (per-item held-out losses
    {"general", "domain"}, other scores)."""

    def __init__(self, config: RunConfig, tokenizer, device):
        self.config, self.tokenizer, self.device, self.pad = config, tokenizer, device, pad_id(tokenizer)

    def data(self, say=print, rank: int = 0, world: int = 1):
        raise NotImplementedError

    def prepare(self, model, source, heldout: Heldout, batch_size: int) -> None:
        """Anything computed with the model as it starts, before it learns (nothing, but for DPO)."""

    def batch(self, rows):
        return rows

    def loss(self, model, micro) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, heldout: Heldout, batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {"general": block_losses(model, heldout.general, batch_size),
                "domain": response_losses(model, heldout.domain, self.pad, self.device, batch_size)}, {}


class LanguageModelling(Objective):
    """Next-token prediction on packed blocks of the domain corpus (train.loss_chunk: the loss in chunks)."""

    def data(self, say=print, rank: int = 0, world: int = 1):
        d, t = self.config.data, self.config.train
        general = general_blocks(self.config, self.tokenizer)
        source = read("domain", d, lambda corpus: training_batches(d, t, self.tokenizer, say, rank, world))
        domain = general if d.domain == d.general else read("domain", d, lambda corpus: heldout_blocks(
            corpus, self.tokenizer, d.seq_len, t.eval_batches * t.global_batch, text_column=d.text_column,
            streaming=streams(d, corpus)))
        return source, Heldout(general, domain)

    def batch(self, rows):
        return rows.to(self.device)  # (per_process, seq) token ids

    def loss(self, model, micro) -> torch.Tensor:
        return next_token_loss(self.config.train.loss_chunk)(model, micro)

    def evaluate(self, model, heldout: Heldout, batch_size: int):
        general = block_losses(model, heldout.general, batch_size)
        domain = general if heldout.domain is heldout.general else block_losses(model, heldout.domain, batch_size)
        return {"general": general, "domain": domain}, {}


ANSWERED = 64  # held-out questions answered by greedy generation for exact-match accuracy (instruction tuning)


def _examples(config: RunConfig, tokenizer, kind: str):
    """(training batches, held-out rows, held-out examples) of an instruction or preference set (a chunk of the
    pairs per sDPO stage)."""
    d, t = config.data, config.train
    examples = load_examples(d.domain, kind, "train")
    if config.dpo.stages > 1:
        if len(examples) < config.dpo.stages:
            raise ValueError(f"{len(examples)} preference pairs in {d.domain!r} cannot be split over "
                             f"{config.dpo.stages} sDPO stages")
        begin, end = stage_span(len(examples), config.dpo.stages, config.dpo.stage)
        examples = examples[begin:end]
    examples = examples[:d.max_examples or t.steps * t.global_batch]
    rows = encoded(tokenizer, examples, d.template, d.seq_len, kind)
    held = load_examples(d.domain, kind, "heldout")[:t.eval_batches * t.global_batch]
    source = ExampleBatches(rows, t.global_batch, t.steps, t.seed, pairs=kind == "pairs")
    return source, encoded(tokenizer, held, d.template, d.seq_len, kind), held


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


class InstructionTuning(Objective):
    """Cross-entropy on the response tokens of (ids, labels) rows; scored on held-out examples (their responses'
    loss) and, where they have a short answer, the exact-match accuracy of greedy answers."""

    def data(self, say=print, rank: int = 0, world: int = 1):
        general = general_blocks(self.config, self.tokenizer)
        source, rows, held = read("domain", self.config.data, lambda corpus: _examples(self.config, self.tokenizer,
                                                                                      "instructions"))
        return source, Heldout(general, rows, examples=[e for e in held if e.answer is not None][:ANSWERED])

    def loss(self, model, rows: list) -> torch.Tensor:
        return model(**to_device(collate(rows, self.pad), self.device)).loss

    def evaluate(self, model, heldout: Heldout, batch_size: int):
        losses, scores = super().evaluate(model, heldout, batch_size)
        if heldout.examples:
            scores["accuracy"] = answer_accuracy(model, self.tokenizer, heldout.examples, self.config.data.template,
                                                 self.device, batch_size=batch_size)
        return losses, scores


class DPO(Objective):
    """The loss of a micro-batch of pairs ((chosen ids, labels), (rejected ids, labels), ref chosen, ref rejected);
    prepared by computing every pair's reference log-probabilities with the model as it starts; scored on held-out
    pairs (the chosen responses' loss, preference accuracy, reward margin)."""

    def __init__(self, config: RunConfig, tokenizer, device):
        super().__init__(config, tokenizer, device)
        self.beta = config.dpo.beta

    def data(self, say=print, rank: int = 0, world: int = 1):
        general = general_blocks(self.config, self.tokenizer)
        source, rows, _ = read("domain", self.config.data, lambda corpus: _examples(self.config, self.tokenizer,
                                                                                   "pairs"))
        return source, Heldout(general, [pair[0] for pair in rows], pairs=rows)

    def prepare(self, model, source, heldout: Heldout, batch_size: int) -> None:
        """The reference: this model as it starts, before it learns (before a resume too)."""
        source.rows = reference_logps(model, source.rows, self.pad, self.device, batch_size)
        heldout.pairs = reference_logps(model, heldout.pairs, self.pad, self.device, batch_size)

    def evaluate(self, model, heldout: Heldout, batch_size: int):
        losses, scores = super().evaluate(model, heldout, batch_size)
        if heldout.pairs and len(heldout.pairs[0]) == 4:  # once the reference log-probabilities are there
            scores.update(preference_scores(model, heldout.pairs, self.beta, self.pad, self.device, batch_size))
        return losses, scores

    def loss(self, model, pairs: list) -> torch.Tensor:
        return pair_loss_and_margins(model, pairs, self.beta, self.pad, self.device)[0]


def pair_logps(model, pairs: list, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities of preference pairs, one forward over both halves."""
    batch = to_device(collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_id), device)
    logps = sequence_logps(model, batch)
    return logps[:len(pairs)], logps[len(pairs):]


def pair_loss_and_margins(model, pairs: list, beta: float, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean DPO loss, each pair's reward margin) against the pairs' reference log-probabilities."""
    chosen, rejected = pair_logps(model, pairs, pad_id, device)
    ref = torch.tensor([[p[2], p[3]] for p in pairs], device=chosen.device)
    return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)


def reference_logps(model, pairs: list, pad_id: int, device, batch_size: int = 8) -> list:
    """The pairs with the model's own (chosen, rejected) log-probabilities appended: the reference of a DPO stage."""
    out = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            chosen, rejected = pair_logps(model, part, pad_id, device)
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
    margins = []
    with evaluating(model):
        for start in range(0, len(pairs), batch_size):
            margins += pair_loss_and_margins(model, pairs[start:start + batch_size], beta, pad_id, device)[1].tolist()
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

OBJECTIVES = {"lm": LanguageModelling, "sft": InstructionTuning, "dpo": DPO}  # config.objective -> its object


def objective(config: RunConfig, tokenizer, device) -> Objective:
    """The objective a run config names (config.objective), for this tokenizer and device."""
    return OBJECTIVES[config.objective](config, tokenizer, device)
