"""Forgetting measured against the base's own behaviour: drift that repair cannot fake.

A ratio of general perplexities (deepen.runs) can fall below 1 when training *repairs* the base (SmolLM2 dequantised
from 4 bits improves on general text whatever it is trained on), so it cannot tell what was forgotten. These
measures start from what the base itself does:

- **KL on the base's own samples** (`kl_text`, `kl_chat`): the base writes continuations of held-out general prompts
  (and, for a chat model, answers to general questions through its chat template), sampled once at temperature 1
  with no truncation, each ending where the base ends it (its end-of-text token, scored too) or after a fixed
  number of tokens, and cached. A model's score is its cross-entropy on them minus the base's, per token:

      E_{y ~ base} [log p_base(y) - log p_model(y)] / |y|  =  KL(base || model) per token on the base's text

  which is >= 0 for every model in expectation (Gibbs' inequality) and 0 only for the base's own function; no repair
  and no improvement can lower it. Estimated on the samples, with a bootstrap interval over them.
- **Exact KL on held-out general blocks** (`kl_heldout`): sum_v p_base(v | prefix) log(p_base(v | prefix) /
  p_model(v | prefix)) at every position of the blocks the run's perplexity is measured on, averaged: no sampling
  noise at a position, but text the base did not write.
- **What the base can do** (`answer_drift`): the base's greedy answers to the same general questions; a model's
  score is the base's per-token log-probability of them minus its own (0: kept; > 0: the model finds the base's
  answers less likely — what it lost). (SmolLM2-135M-Instruct answers none of the built-in math questions exactly
  through its chat template, so exact match cannot show forgetting at that size; its own answers can.)

Each measure is per item (a sample, an answer, a block), so runs scored on the same probes compare paired.
`measure(folder)` scores a finished run folder's model against its base and writes `drift.json` there.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deepen.data import load_corpus
from deepen.loop import evaluating
from deepen.manifest import atomic_folder
from deepen.models import cache_dir

DRIFT = "drift.json"  # in a run folder: per-item values of every measure, and what they were measured on
PROBES = ("text", "chat", "answers")
# measure -> (the probe it is scored on, what it means)
MEASURES = {
    "kl_text": ("text", "KL(base || model) per token on the base's own continuations of held-out general prompts"),
    "kl_chat": ("chat", "KL(base || model) per token on the base's own answers to general questions (chat template)"),
    "kl_heldout": (None, "exact KL(base || model) per token on the held-out general blocks"),
    "answer_drift": ("answers", "the base's log-probability per token of its own greedy answers minus the model's"),
}
PROMPT_TOKENS = 32  # the first tokens of each held-out general document: the prompt the base continues


@dataclass
class Probe:
    """What the base did on one kind of prompt: rows of token ids (prompt then the base's continuation, right-padded
    with `pad`), where each row's scored part starts and ends, and the base's own per-token log-probability there."""

    kind: str  # one of PROBES
    ids: torch.Tensor  # (n, width) long
    start: torch.Tensor  # (n,) the first scored position (the continuation's first token)
    end: torch.Tensor  # (n,) one past the last scored position
    base_logp: torch.Tensor  # (n,) float64: the base's mean log-probability per scored token

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.kind}/{k}": getattr(self, k) for k in ("ids", "start", "end", "base_logp")}

    @classmethod
    def from_tensors(cls, kind: str, tensors: dict[str, torch.Tensor]) -> Probe:
        return cls(kind, *(tensors[f"{kind}/{k}"] for k in ("ids", "start", "end", "base_logp")))


def prompts(general, tokenizer, n: int) -> list[list[int]]:
    """The first PROMPT_TOKENS tokens of each of the first `n` held-out documents of the general corpus."""
    out = []
    for text in load_corpus(general, "heldout")["text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        if len(ids) >= 8:
            out.append(ids)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"the held-out split of {general!r} has no document of 8 tokens or more to prompt with")
    return out


def questions(general, tokenizer, n: int) -> list[list[int]]:
    """General questions through the tokenizer's chat template, "Tell me about <title>." for the first `n` held-out
    documents with a title (Wikipedia's); [] for a tokenizer without a chat template or a corpus without titles."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    titles = [i.split("/", 1)[1] for i in load_corpus(general, "heldout")["id"] if i.startswith("wiki/")][:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for t in titles]


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return ids, mask


def continue_rows(model, rows: list[list[int]], new_tokens: int, *, sample: bool, eos: int | None, pad: int,
                  seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Each prompt row followed by the model's continuation: sampled at temperature 1 with no truncation (top-k,
    top-p and every other warper off: the model's own distribution, its end-of-text included), or greedy; up to
    `new_tokens` tokens, ending at `eos` (kept). (eos None: a model without one; transformers would otherwise take
    the model's own and might forbid it, which samples another distribution.)"""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    warpers = dict(temperature=1.0, top_k=0, top_p=1.0) if sample else {}  # sampling: none of them truncates
    config = GenerationConfig(do_sample=sample, **warpers, max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=eos,
                              bos_token_id=None)
    out = []
    with evaluating(model):
        generator_state = torch.random.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda"
                                                         else None)
        torch.manual_seed(seed)
        try:
            for begin in range(0, len(rows), batch_size):
                part = rows[begin:begin + batch_size]
                ids, mask = _left_padded(part, pad)
                made = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config)[:, ids.shape[1]:].cpu()
                for row, new in zip(part, made.tolist()):
                    if eos is not None and eos in new:
                        new = new[:new.index(eos) + 1]
                    out.append(row + new)
        finally:
            torch.random.set_rng_state(generator_state[0])
            if generator_state[1] is not None:
                torch.cuda.set_rng_state_all(generator_state[1])
    return out


def scored_logps(model, ids: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                 batch_size: int = 16) -> torch.Tensor:
    """(n,) float64: each row's mean log-probability per token over positions start..end-1, each predicted from
    what comes before it (right-padded rows: nothing after end is read by a causal model)."""
    device = next(model.parameters()).device
    out = []
    with evaluating(model):
        for begin in range(0, len(ids), batch_size):
            x = ids[begin:begin + batch_size].to(device)  # (batch, width)
            logits = model(input_ids=x).logits[:, :-1].float()  # (batch, width - 1, vocab): predicts x[:, 1:]
            logp = -F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double().cpu()
            positions = torch.arange(1, x.shape[1])  # the position each prediction is of
            s, e = start[begin:begin + batch_size, None], end[begin:begin + batch_size, None]
            scored = (positions >= s) & (positions < e)  # (batch, width - 1)
            out.append((logp * scored).sum(1) / scored.sum(1))
    return torch.cat(out)


def exact_kl(base, model, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """(n_blocks,) float64: KL(base || model) per token, exactly over the vocabulary at every position of each
    block, averaged over the block's positions."""
    device = next(model.parameters()).device
    out = []
    with evaluating(base), evaluating(model):
        for begin in range(0, len(blocks), batch_size):
            x = blocks[begin:begin + batch_size].to(device)  # (batch, seq)
            p = F.log_softmax(base(input_ids=x.to(next(base.parameters()).device)).logits.float().to(device), -1)
            q = F.log_softmax(model(input_ids=x).logits.float(), -1)  # (batch, seq, vocab)
            kl = (p.exp() * (p - q)).sum(-1)  # (batch, seq)
            out.append(kl.double().mean(1).cpu())
    return torch.cat(out)


SAMPLING = "v2: each sample ends at the base's end-of-text"  # how probes are drawn; a change draws them anew


def probes_key(base_path, general, samples: int, new_tokens: int, seed: int, device: str) -> str:
    """The probes' name (their cache folder, and what a drift.json was scored on): the base's weights (by their
    files' size and time) and every setting of the draw."""
    path = Path(base_path)
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))
    spec = json.dumps([str(path.resolve()), weights, repr(general), samples, new_tokens, seed, device, PROMPT_TOKENS,
                       SAMPLING])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def base_probes(base, tokenizer, base_path, general, samples: int = 64, new_tokens: int = 128, seed: int = 0,
                progress=print) -> dict[str, Probe]:
    """The base's behaviour on general prompts — {"text": sampled continuations, "chat": sampled answers, "answers":
    greedy answers} (the last two only for a chat tokenizer with a titled general corpus) — drawn once per base,
    corpus and settings, and cached (safetensors; no pickle) under the deepen cache."""
    from filelock import FileLock
    from safetensors.torch import load_file

    device = next(base.parameters()).device.type
    folder = cache_dir() / "probes" / probes_key(base_path, general, samples, new_tokens, seed, device)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".sampling.lock"):  # processes that want the same probes wait for the first
        if not (folder / "probes.safetensors").is_file():
            _sample_probes(base, tokenizer, general, samples, new_tokens, seed, folder, progress)
    tensors = load_file(folder / "probes.safetensors")
    return {kind: Probe.from_tensors(kind, tensors) for kind in PROBES if f"{kind}/ids" in tensors}


def _sample_probes(base, tokenizer, general, samples: int, new_tokens: int, seed: int, folder: Path, progress) -> None:
    from safetensors.torch import save_file

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress(f"sampling the base's behaviour on {samples} general prompts (once; cached in {folder})")
    made = {"text": (prompts(general, tokenizer, samples), True, tokenizer.eos_token_id)}
    asked = questions(general, tokenizer, samples)
    if asked:
        made["chat"] = (asked, True, tokenizer.eos_token_id)
        made["answers"] = (asked, False, tokenizer.eos_token_id)
    probes = {}
    for kind, (rows, sample, eos) in made.items():
        full = continue_rows(base, rows, new_tokens, sample=sample, eos=eos, pad=pad, seed=seed)
        width = max(map(len, full))
        ids = torch.full((len(full), width), pad, dtype=torch.long)
        for i, row in enumerate(full):
            ids[i, :len(row)] = torch.tensor(row)
        start = torch.tensor([len(r) for r in rows])
        end = torch.tensor([len(r) for r in full])
        keep = end > start  # an answer that is nothing (EOS not even generated) cannot be scored
        ids, start, end = ids[keep], start[keep], end[keep]
        probes[kind] = Probe(kind, ids, start, end, scored_logps(base, ids, start, end))
    with atomic_folder(folder, overwrite=True) as tmp:
        save_file({k: v.contiguous() for p in probes.values() for k, v in p.tensors().items()},
                  tmp / "probes.safetensors")


def drift(base, model, probes: dict[str, Probe], heldout: torch.Tensor | None, batch_size: int = 16) -> dict:
    """{measure: per-item values} of `model` against `base` (see MEASURES): the probes' sample-based ones and, when
    `heldout` general blocks are given, the exact KL on them."""
    out = {}
    for name, (kind, _) in MEASURES.items():
        if kind is None:
            if heldout is not None:
                out[name] = exact_kl(base, model, heldout, max(1, batch_size // 4)).tolist()
        elif kind in probes:
            p = probes[kind]
            out[name] = (p.base_logp - scored_logps(model, p.ids, p.start, p.end, batch_size)).tolist()
    return out


def mean_of(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def load_drift(folder: str | Path) -> dict | None:
    """A run folder's drift.json ({"measures": {name: per-item values}, ...}), or None where it was not measured."""
    path = Path(folder) / DRIFT
    return json.loads(path.read_text()) if path.is_file() else None


def measure(folder: str | Path, base, base_path, tokenizer, general, heldout: torch.Tensor | None, *,
            samples: int = 64, new_tokens: int = 128, batch_size: int = 16, progress=print) -> dict:
    """Score the finished run in `folder` (its model/) against `base` (already loaded, on its device) and write
    folder/drift.json (atomically); a folder whose drift.json was scored on these probes is read, not scored again
    (one scored on other probes — another draw, device or way of sampling — is scored anew, so that runs compared
    item by item were scored on the same items). Returns its content."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    device = next(base.parameters()).device
    key = probes_key(base_path, general, samples, new_tokens, 0, device.type)
    done = load_drift(folder)
    if done is not None and done.get("probes") == key:
        return done
    probes = base_probes(base, tokenizer, base_path, general, samples, new_tokens, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).to(device)
    record = {"base": Path(base_path).name, "general": repr(general), "samples": samples, "new_tokens": new_tokens,
              "probes": key, "measures": drift(base, model, probes, heldout, batch_size)}
    del model
    tmp = folder / (DRIFT + ".partial")
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / DRIFT)
    return record
