"""Is the grown model the same function? Logits on real text and greedy generation with a KV cache; for plans
that change the function (DUS, stacking), how far it moved: KL divergence, top-1 agreement, perplexity.

Exactness is the goal, not a tolerance: a zeroed block adds 0.0 and x + 0.0 == x, so a LLaMA-Pro expansion
must give a max abs logit difference of 0.0 — in fp32 and in bf16.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from deepen.models import require_model

# Real English text to compare on: the opening of the Universal Declaration of Human Rights (public domain).
SAMPLE_TEXT = (
    "Whereas recognition of the inherent dignity and of the equal and inalienable rights of all members of "
    "the human family is the foundation of freedom, justice and peace in the world, whereas disregard and "
    "contempt for human rights have resulted in barbarous acts which have outraged the conscience of mankind, "
    "and the advent of a world in which human beings shall enjoy freedom of speech and belief and freedom from "
    "fear and want has been proclaimed as the highest aspiration of the common people."
)
PROMPT = "The capital of France is"


@dataclass
class Report:
    max_abs_logit_diff: float  # over every position and vocabulary entry
    same_generation: bool  # greedy decoding with a KV cache gives the same tokens
    kl: float  # mean per token KL(base || grown), nats
    top1_agreement: float  # share of positions where both predict the same next token
    ppl_base: float
    ppl_grown: float
    n_tokens: int
    dtype: str

    @property
    def exact(self) -> bool:
        return self.max_abs_logit_diff == 0.0 and self.same_generation

    def __str__(self) -> str:
        verdict = "EXACT: the same function" if self.exact else "differs"
        return (f"{verdict} ({self.dtype}, {self.n_tokens} tokens)\n"
                f"  max |logit diff|   {self.max_abs_logit_diff:.3g}\n"
                f"  greedy generation  {'same tokens' if self.same_generation else 'different tokens'}\n"
                f"  KL(base || grown)  {self.kl:.4g} nats/token\n"
                f"  top-1 agreement    {self.top1_agreement:.1%}\n"
                f"  perplexity         base {self.ppl_base:.3f}  grown {self.ppl_grown:.3f}")

    def to_dict(self) -> dict:
        return {**asdict(self), "exact": self.exact}


@torch.no_grad()
def compare(base, grown, input_ids: torch.Tensor, prompt_ids: torch.Tensor | None = None, max_new_tokens: int = 20) -> Report:
    """Compare two causal LMs on `input_ids` (batch, seq): logits, next-token distributions, and greedy
    generation with a KV cache from `prompt_ids` (default: the first 8 tokens of the first row)."""
    base.eval(), grown.eval()
    logits_b = base(input_ids).logits.float()  # (batch, seq, vocab)
    logits_g = grown(input_ids).logits.float()
    logp_b, logp_g = F.log_softmax(logits_b.double(), -1), F.log_softmax(logits_g.double(), -1)
    kl = (logp_b.exp() * (logp_b - logp_g)).sum(-1).mean().item()
    targets = input_ids[:, 1:]
    nll = lambda logp: -logp[:, :-1].gather(-1, targets.unsqueeze(-1)).mean().item()  # noqa: E731
    prompt_ids = input_ids[:1, :8] if prompt_ids is None else prompt_ids
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    same = torch.equal(base.generate(prompt_ids, **gen), grown.generate(prompt_ids, **gen))
    return Report(
        max_abs_logit_diff=(logits_b - logits_g).abs().max().item(),
        same_generation=same,
        kl=max(kl, 0.0),
        top1_agreement=(logits_b.argmax(-1) == logits_g.argmax(-1)).float().mean().item(),
        ppl_base=math.exp(nll(logp_b)),
        ppl_grown=math.exp(nll(logp_g)),
        n_tokens=input_ids.numel(),
        dtype=str(next(grown.parameters()).dtype).removeprefix("torch."),
    )


def sample_inputs(folders: list, vocab_size: int, text: str = SAMPLE_TEXT, prompt: str = PROMPT):
    """(input_ids, prompt_ids): the first folder's tokenizer on real text, or seeded random ids when no folder
    has a tokenizer that gives at least 2 tokens of each (tiny random models; a folder without tokenizer files)."""
    from transformers import AutoTokenizer

    for folder in folders:
        try:
            tok = AutoTokenizer.from_pretrained(folder)
            ids, prompt_ids = tok(text, return_tensors="pt").input_ids, tok(prompt, return_tensors="pt").input_ids
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if ids.shape[-1] >= 2 and prompt_ids.shape[-1] >= 2 and int(ids.max()) < vocab_size:
            return ids, prompt_ids
    ids = torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    return ids, ids[:1, :8]


def _hf_config(path: str | os.PathLike, role: str):
    """The transformers config of a model folder or hub id; a clear error for a folder that is not there."""
    from transformers import AutoConfig

    require_model(path, role)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{role} {path}: not a model folder and not reachable as a hub id ({e})") from None


def comparable(base_config, grown_config) -> None:
    """Refuse two models that cannot be compared token for token: another vocabulary or another family."""
    if base_config.vocab_size != grown_config.vocab_size:
        raise ValueError(f"the models have different vocabularies ({base_config.vocab_size:,} and "
                         f"{grown_config.vocab_size:,} tokens): a grown model keeps its base's; compare a model with "
                         "the base it was grown from")
    if base_config.model_type != grown_config.model_type:
        raise ValueError(f"the models are of different families ({base_config.model_type} and "
                         f"{grown_config.model_type}): a grown model keeps its base's architecture")


def verify(base_path: str | os.PathLike, grown_path: str | os.PathLike, dtype: str = "float32",
           text: str = SAMPLE_TEXT, max_new_tokens: int = 20) -> Report:
    """Load two model folders (or hub ids) and compare them; refuses models that cannot be compared."""
    from transformers import AutoModelForCausalLM

    comparable(_hf_config(base_path, "BASE"), _hf_config(grown_path, "GROWN"))
    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
    grown = AutoModelForCausalLM.from_pretrained(grown_path, dtype=torch_dtype)
    input_ids, prompt_ids = sample_inputs([grown_path, base_path], base.config.vocab_size, text)
    return compare(base, grown, input_ids, prompt_ids, max_new_tokens)


@torch.no_grad()
def hidden_drift(base, model, input_ids: torch.Tensor, positions: list[int] | None = None) -> list[float]:
    """How far the residual stream moved, layer by layer: for each layer j of `base`, ||h' - h|| / ||h|| over every
    token, where h is the base's hidden state after layer j and h' the other model's after its layer positions[j]
    (default j: the same depth; for a grown model, where base layer j sits: the plan's layers that are not new).

    Why a model whose original blocks are frozen still forgets: its new blocks write into this stream, and every
    frozen block above them reads a changed input."""
    def outputs(m) -> list[torch.Tensor]:
        seen = []
        hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                 else out))
                 for layer in m.model.layers]
        try:
            m.eval()(input_ids=input_ids)
        finally:
            for hook in hooks:
                hook.remove()
        return [h.double() for h in seen]

    h, h2 = outputs(base), outputs(model)
    positions = list(range(len(h))) if positions is None else positions
    if len(positions) != len(h):
        raise ValueError(f"positions names {len(positions)} layers; the base has {len(h)}")
    return [((h2[p] - h[j]).norm() / h[j].norm()).item() for j, p in enumerate(positions)]
