"""Checks for the lab notebooks (notebooks/labs/): each `check_*` runs a student's function on small inputs,
compares the result with deepen's own implementation, and says what is wrong, where, and what it looks like.

- A pass prints one line of confirmation.
- A wrong answer names the mistake when it is a common one: the check also computes the known wrong versions
  (LayerNorm for RMSNorm, interleaved RoPE pairs, k/v heads not repeated, a causal mask off by one, ...) and
  says which one the answer matches. Otherwise: wrong shape (expected vs got) or numerically off (max error,
  where, expected vs got).
- A function that still raises NotImplementedError is "not done"; any other error is reported in one line
  (the error and the line of the student's code), never as a traceback.

Every result lands in `RESULTS` (this kernel's registry); `summary()` prints the table, and `deepen grade`
reads it after running a notebook.

    >>> from deepen import checks
    >>> checks.check_rmsnorm(rms_norm)
    ✓ rmsnorm: pass — equals deepen.llama.RMSNorm on 3 inputs (max error 0)
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import re
import textwrap
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from deepen import llama
from deepen.budget import Stage, state_bytes, training_flops
from deepen.budget import lora_params as budget_lora_params
from deepen.grow import OUTPUT_PROJECTIONS, grow, layer_of, zero_output_projections
from deepen.loop import train_step as reference_step
from deepen.manifest import Manifest
from deepen.merge import lerp
from deepen.merge import slerp as deepen_slerp
from deepen.objectives import dpo_loss as deepen_dpo_loss
from deepen.plan import Plan, custom, dus, llama_pro
from deepen.trainable import select_trainable

MARKS = {"pass": "✓", "fail": "✗", "not done": "…"}
RESULTS_MARKER = "DEEPEN-CHECK-RESULTS "  # the line `deepen grade` reads from the kernel's output
ATOL = RTOL = 1e-4  # a correct answer computed in another order differs by ~1e-7


@dataclass
class Result:
    name: str  # the exercise, e.g. "rmsnorm"
    status: str  # "pass", "fail" or "not done" (still raises NotImplementedError)
    feedback: str

    def __str__(self) -> str:
        return f"{MARKS[self.status]} {self.name}: {self.status} — {self.feedback}"

    def _ipython_display_(self):
        """The check printed the feedback already: a check as a cell's last line shows it once."""


RESULTS: dict[str, Result] = {}


class Wrong(Exception):
    """The answer is wrong; the message says how."""


class StudentError(Exception):
    """The student's function raised; the message gives the error and the student's line."""

    def __init__(self, error: BaseException):
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}{_where(error)}")


_LIBRARY_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, llama)) + (__file__,)


def _where(error: BaseException) -> str:
    """' (in f, line 3: `code`)' for the last traceback frame outside torch and deepen: the student's line."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS) and "site-packages" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or "").strip()
    return f" (in {f.name}, line {f.lineno}" + (f": `{code}`)" if code else ")")


def _call(fn, *args):
    """Call the student's function: NotImplementedError passes (not done); any other error becomes a StudentError."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 — whatever the student's code raises is feedback, not a crash
        raise StudentError(e) from e


def _check(name: str, body, *args) -> Result:
    try:
        with torch.random.fork_rng(devices=[]):  # the checks seed their inputs; the student's random state stays
            status, feedback = "pass", body(*args)
    except NotImplementedError:
        status, feedback = "not done", "still raises NotImplementedError — fill in the cell marked # TODO above"
    except (Wrong, StudentError) as e:
        status, feedback = "fail", (f"your function raised {e}" if isinstance(e, StudentError) else str(e))
    except Exception as e:  # noqa: BLE001 — e.g. an answer of a type the check cannot use
        status, feedback = "fail", f"the check could not use your answer: {type(e).__name__}: {e}"
    result = Result(name, status, feedback)
    RESULTS[name] = result
    print(result)
    return result


# ---------------------------------------------------------------- comparing tensors


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.detach().float(), want.detach().float(), rtol=RTOL, atol=ATOL, equal_nan=True))


def _difference(got, want: torch.Tensor, dims: tuple[str, ...]) -> str | None:
    """None when `got` equals `want` (to float tolerance); else what is wrong: type, shape, NaN, or the largest error
    and where it is, naming each dimension."""
    names = f" ({', '.join(dims)})" if dims else ""
    if got is None:
        return "returned None — did you forget `return`?"
    if isinstance(got, tuple):
        return f"returned a tuple of {len(got)}; return only the output tensor"
    if not isinstance(got, torch.Tensor):
        return f"returned a {type(got).__name__}; expected a tensor of shape {tuple(want.shape)}{names}"
    if got.shape != want.shape:
        return f"wrong shape: expected {tuple(want.shape)}{names}, got {tuple(got.shape)}"
    got, want = got.detach().float(), want.detach().float()
    if _close(got, want):
        return None
    nan = torch.isnan(got) & ~torch.isnan(want)
    if nan.any():
        at = tuple(nan.nonzero()[0].tolist())
        return f"NaN in the output at {list(at)}{names}, {int(nan.sum())} of {got.numel()} values"
    err = (got - want).abs().nan_to_num(nan=math.inf)
    off = err > ATOL + RTOL * want.abs()
    at = tuple(torch.unravel_index(err.argmax(), err.shape))
    at = tuple(int(i) for i in at)
    return (f"numerically off: max error {err[at].item():.3g} at {list(at)}{names}: expected {want[at].item():.4g}, "
            f"got {got[at].item():.4g}; {int(off.sum())} of {got.numel()} values off")


def _compare(got, want: torch.Tensor, dims: tuple[str, ...], mistakes: dict, case: str = "") -> float:
    """Raise Wrong unless got == want, naming the mistake whose output `got` matches; return the max error.
    `mistakes`: message -> the output that mistake gives (or (output, index) to compare only got[index])."""
    problem = _difference(got, want, dims)
    if problem is None:
        return (got.detach().float() - want.float()).abs().max().item()
    _wrong(got, problem, mistakes, case)


def _wrong(got, problem: str, mistakes: dict, case: str = "") -> NoReturn:
    """Raise Wrong: the message of the mistake whose output `got` matches, else `problem` (what is off, where)."""
    for message, wrong in mistakes.items():
        wrong, index = wrong if isinstance(wrong, tuple) else (wrong, ...)
        if isinstance(got, torch.Tensor) and got.shape == wrong.shape and _close(got[index], wrong[index]):
            raise Wrong(message + (f" [{problem}{case}]" if problem.startswith("NaN") else ""))
    raise Wrong(problem + case)


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _randomise(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Weights large enough that attention is peaked and norms' gains differ from 1: mistakes show clearly."""
    for name, p in module.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.normal_(1.0, 0.5)
        else:
            p.normal_(0.0, std)
    return module


def _small_config(**changes) -> llama.Config:
    # small for checking efficiency: every mistake below still shows
    return llama.Config(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=172,
                        max_seq_len=64, tie_embeddings=True).replace(**changes)


# ---------------------------------------------------------------- lab 01: the Llama block


def check_rmsnorm(rms_norm) -> Result:
    """rms_norm(x, weight, eps) -> x / sqrt(mean(x², last dim) + eps) · weight, against deepen.llama.RMSNorm."""
    return _check("rmsnorm", _rmsnorm, rms_norm)


def _rmsnorm(rms_norm) -> str:
    _seeded()
    dim, eps = 64, 1e-5
    norm = _randomise(llama.RMSNorm(dim, eps))
    weight = norm.weight.detach()
    cases = {"a vector with a common offset": torch.randn(2, 5, dim) + 3.0,
             "small inputs (mean square near eps)": torch.randn(2, 5, dim) * 3e-3,
             "one token vector": torch.randn(dim)}
    worst = 0.0
    for case, x in cases.items():
        with torch.no_grad():
            want = norm(x)
            ms = x.pow(2).mean(-1, keepdim=True)
            mistakes = {
                "this is LayerNorm: it subtracts the mean first. RMSNorm does not — it only divides x by "
                "sqrt(mean(x²) + eps), so a common offset survives": weight * F.layer_norm(x, (dim,), eps=eps),
                "the gain is missing: multiply the normalised x by weight": x * torch.rsqrt(ms + eps),
                "eps is missing or outside the square root: divide by sqrt(mean(x²) + eps)": weight * x / ms.sqrt(),
                "divided by the vector's length (square root of the *sum* of squares), not its root mean square: "
                "use x.pow(2).mean(-1, keepdim=True)": weight * x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt(),
                "the square root is missing: divide by sqrt(mean(x²) + eps), not mean(x²) + eps":
                    weight * x / (ms + eps),
            }
        try:
            got = _call(rms_norm, x.clone(), weight.clone(), eps)
        except StudentError as e:
            if "must match the size" in str(e):
                raise Wrong(f"your function raised {e} — a mean over the last dimension needs keepdim=True to "
                            "divide x by it") from None
            raise
        dims = ("batch", "seq", "dim") if x.dim() == 3 else ("dim",)
        worst = max(worst, _compare(got, want, dims, mistakes, f" (input: {case})"))
    return f"equals deepen.llama.RMSNorm on {len(cases)} inputs (max error {worst:.2g})"


def _interleaved_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, sign: float = 1.0) -> torch.Tensor:
    """Meta's layout — pair (x[2i], x[2i+1]) turns by m·θ_i — as deepen.llama's halves layout on permuted
    coordinates."""
    d = x.shape[-1]
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # pairs (2i, 2i+1) -> (i, i + d/2)
    cos, sin = llama.rope(positions, d, theta)
    out = torch.empty_like(x)
    out[..., order] = llama.apply_rope(x[..., order], cos, sign * sin)
    return out


LAYOUTS = ("halves", "interleaved")


def check_rope(apply_rope, layout: str = "halves") -> Result:
    """apply_rope(x, positions, theta) -> x rotated, x: (batch, heads, seq, head_dim), positions: (seq,).
    layout="halves" pairs x[i] with x[i + d/2] (transformers, deepen.llama); "interleaved" pairs x[2i], x[2i+1]
    (Meta's original code)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    return _check("rope", _rope, apply_rope, layout)


def _rope(apply_rope, layout: str) -> str:
    errors = [_rope_case(apply_rope, layout, start, case) for start, case in
              ((0, ""), (5, "positions 5..12, as a KV cache passes them after 5 tokens: "))]
    reference = ("deepen.llama.apply_rope" if layout == "halves" else
                 "Meta's layout (deepen.llama.apply_rope on pairs 2i, 2i+1)")
    return f"equals {reference} (head_dim 16, positions from 0 and from 5; max error {max(errors):.2g})"


def _rope_case(apply_rope, layout: str, start: int, case: str) -> float:
    _seeded(start)
    batch, heads, seq, d, theta = 2, 3, 8, 16, 10000.0
    x, positions = torch.randn(batch, heads, seq, d), torch.arange(start, start + seq)
    cos, sin = llama.rope(positions, d, theta)
    halves, interleaved = llama.apply_rope(x, cos, sin), _interleaved_rope(x, positions, theta)
    if layout == "halves":
        want = halves
        mistakes = {"pairs interleaved instead of halves: you rotate (x[2i], x[2i+1]) — Meta's original layout — "
                    "but transformers and deepen.llama pair x[i] with x[i + d/2] (the two halves, rotate_half)":
                        interleaved,
                    "rotated the wrong way: the sign of sin is flipped (x·cos + rotate_half(x)·sin, with "
                    "rotate_half(x) = [-x2, x1])": llama.apply_rope(x, cos, -sin),
                    "positions start at 1: the first token is position 0 (it is not rotated)":
                        llama.apply_rope(x, *llama.rope(positions + 1, d, theta))}
        i = torch.arange(0, d, 2).float()
        for message, inv_freq in {
            "the frequencies are off: θ_i = theta ** (-2i / d) with i = 0 .. d/2 - 1 — here the exponent is "
            "-i / d (the 2 is missing)": theta ** (-i / 2 / d),
            "the frequencies are upside down: θ_i = theta ** (-2i / d), a negative exponent (the first pair turns "
            "fastest)": theta ** (i / d),
        }.items():
            angles = positions[:, None].float() * inv_freq  # (seq, d/2)
            angles = torch.cat((angles, angles), dim=-1)  # (seq, d): the halves layout of deepen.llama.rope
            mistakes[message] = llama.apply_rope(x, angles.cos(), angles.sin())
        counted = torch.arange(seq)  # what an answer that ignores `positions` uses
        ignored = llama.apply_rope(x, *llama.rope(counted, d, theta))
    else:
        want = interleaved
        mistakes = {"pairs taken as halves instead of interleaved: you rotate (x[i], x[i + d/2]) — transformers' "
                    "layout — but this layout pairs neighbours (x[2i], x[2i+1])": halves,
                    "rotated the wrong way: the sign of sin is flipped":
                        _interleaved_rope(x, positions, theta, sign=-1.0),
                    "positions start at 1: the first token is position 0 (it is not rotated)":
                        _interleaved_rope(x, positions + 1, theta)}
        ignored = _interleaved_rope(x, torch.arange(seq), theta)
    if start:
        mistakes["`positions` ignored: you rotate by 0, 1, 2, ... whatever positions you are given; with a KV cache "
                 "the new tokens' positions start where the cache ends"] = ignored
    mistakes["x comes back unrotated: each position m must turn pair i by the angle m·θ_i"] = x
    got = _call(apply_rope, x.clone(), positions, theta)
    return _compare(got, want, ("batch", "heads", "seq", "head_dim"), mistakes, case)


def _attention_by_hand(attn: llama.Attention, x, cos, sin, n_heads: int, n_kv_heads: int, *, repeat: str = "interleave",
                       mask: str = "causal", scale: float | None = None, rope: str = "qk", softmax_dim: int = -1,
                       split: str = "transpose", merge: str = "transpose"):
    """Attention written out, with knobs for the common mistakes; the defaults equal deepen.llama.Attention
    (a test holds them equal)."""
    batch, seq, _ = x.shape

    def heads(t, n):  # (batch, seq, n * head_dim) -> (batch, n, seq, head_dim); "view": the wrong split
        return t.view(batch, seq, n, -1).transpose(1, 2) if split == "transpose" else t.view(batch, n, seq, -1)

    q = heads(attn.q_proj(x), n_heads)  # (batch, heads, seq, head_dim)
    k = heads(attn.k_proj(x), n_kv_heads)  # (batch, kv_heads, seq, head_dim)
    v = heads(attn.v_proj(x), n_kv_heads)
    if "q" in rope:
        q = llama.apply_rope(q, cos, sin)
    if "k" in rope:
        k = llama.apply_rope(k, cos, sin)
    if "v" in rope:
        v = llama.apply_rope(v, cos, sin)
    group = n_heads // n_kv_heads
    if repeat == "interleave":  # query head h reads k/v head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    else:  # "tile": query head h reads k/v head h % n_kv_heads
        k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (batch, heads, seq, seq)
    ones = torch.ones(seq, seq, dtype=torch.bool)
    allowed = {"causal": llama.causal_mask(seq, seq, None), "none": ones, "sees next": ones.tril(1),
               "hides self": ones.tril(-1), "past hidden": ones.triu(0)}[mask]  # (seq, seq), True = may attend
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(softmax_dim)
    out = weights @ v  # (batch, heads, seq, head_dim)
    return attn.o_proj((out.transpose(1, 2) if merge == "transpose" else out).reshape(batch, seq, -1))


def _attention_case(seq: int = 6, **changes):
    _seeded()
    c = _small_config(**changes)
    attn = _randomise(llama.Attention(c))
    x = torch.randn(2, seq, c.dim)
    cos, sin = llama.rope(torch.arange(seq), c.head_dim, c.rope_theta)
    with torch.no_grad():
        want = attn(x, cos, sin)
    return c, attn, x, cos, sin, want


def check_attention(attention) -> Result:
    """attention(x, attn, cos, sin, n_heads, n_kv_heads) -> (batch, seq, dim): causal grouped-query attention with
    the projections of `attn` (a deepen.llama.Attention), against attn(x, cos, sin)."""
    return _check("attention", _attention, attention)


def _attention(attention) -> str:
    c, attn, x, cos, sin, want = _attention_case()
    dims = ("batch", "seq", "dim")
    group = c.n_heads // c.n_kv_heads
    try:
        got = _call(attention, x.clone(), attn, cos, sin, c.n_heads, c.n_kv_heads)
        problem = _difference(got, want, dims)
    except StudentError as e:
        got, problem = None, f"your function raised {e}"
    if problem is None:
        error = (got.float() - want).abs().max().item()
        # another shape: a group size or head_dim written in as a number shows here
        oc, oattn, ox, ocos, osin, owant = _attention_case(dim=48, n_heads=6, n_kv_heads=2)
        try:
            other = _difference(_call(attention, ox, oattn, ocos, osin, oc.n_heads, oc.n_kv_heads), owant, dims)
        except StudentError as e:
            other = f"your function raised {e}"
        if other is not None:
            raise Wrong(f"right for {c.n_heads} query heads sharing {c.n_kv_heads} k/v heads (head_dim {c.head_dim}) "
                        f"but not for {oc.n_heads} sharing {oc.n_kv_heads} (head_dim {oc.head_dim}): is a size written "
                        f"in as a number? Use n_heads, n_kv_heads and q.shape[-1] [{other}]")
        return (f"equals deepen.llama.Attention: {c.n_heads} query heads sharing {c.n_kv_heads} k/v heads, and "
                f"{oc.n_heads} sharing {oc.n_kv_heads}; causal (max error {error:.2g})")
    # Right for multi-head attention but not for groups: the k/v heads are not repeated (or in the wrong order).
    mc, mattn, mx, mcos, msin, mwant = _attention_case(n_kv_heads=c.n_heads)
    try:
        mha_right = _difference(_call(attention, mx, mattn, mcos, msin, mc.n_heads, mc.n_kv_heads), mwant, dims) is None
    except StudentError:
        mha_right = False
    with torch.no_grad():
        def by_hand(**mistake):
            return _attention_by_hand(attn, x, cos, sin, c.n_heads, c.n_kv_heads, **mistake)

        tiled = by_hand(repeat="tile")
        if mha_right and _close(got, tiled):
            raise Wrong(f"k/v heads repeated in the wrong order: query head h must read k/v head h // {group} "
                        f"(repeat_interleave({group}, dim=1)); .repeat() gives it head h % {c.n_kv_heads}")
        if mha_right:
            raise Wrong(f"k/v heads not repeated for grouped-query attention: right with {c.n_heads} k/v heads, but "
                        f"here q has {c.n_heads} heads and k, v have {c.n_kv_heads}; each k/v head serves {group} "
                        f"query heads: k = k.repeat_interleave({group}, dim=1), the same for v [{problem}]")
        if got is None:
            raise Wrong(problem)
        head_dim = c.head_dim
        mistakes = {
            "causal mask off by one: each token also sees the next token. Hide only the future, key j > query i: "
            "torch.ones(seq, seq, dtype=torch.bool).triu(1)": by_hand(mask="sees next"),
            "causal mask off by one: it hides each token from itself too (j >= i), so the first token sees nothing "
            "(its row is all -inf, softmax gives NaN). Hide only j > i: .triu(1), not .triu(0)":
                (by_hand(mask="hides self"), (slice(None), slice(1, None))),
            "no causal mask: every token sees the future. Fill the scores where key j > query i with -inf "
            "before the softmax": by_hand(mask="none"),
            "the mask hides the past instead of the future: mask where j > i (.triu(1)), not j < i (.tril(-1))":
                by_hand(mask="past hidden"),
            f"scores not scaled: divide q·kᵀ by sqrt(head_dim) = {math.sqrt(head_dim):g}": by_hand(scale=1.0),
            f"scores divided by head_dim = {head_dim}; divide by its square root": by_hand(scale=1 / head_dim),
            "softmax over the wrong axis: normalise each query's scores over the keys (dim=-1)":
                by_hand(softmax_dim=-2),
            "RoPE not applied: rotate q and k (apply_rope) before the scores": by_hand(rope=""),
            "RoPE applied to q only: rotate k too": by_hand(rope="q"),
            "RoPE applied to v as well: rotate only q and k (the values carry content, not position)":
                by_hand(rope="qkv"),
            "heads split the wrong way: view the projection as (batch, seq, heads, head_dim), then transpose(1, 2) "
            "— viewing it directly as (batch, heads, seq, head_dim) mixes positions": by_hand(split="view"),
            "heads merged the wrong way: transpose(1, 2) to (batch, seq, heads, head_dim) before the reshape to "
            "(batch, seq, heads · head_dim)": by_hand(merge="reshape"),
        }
    _wrong(got, problem, mistakes)


def check_swiglu(swiglu) -> Result:
    """swiglu(x, mlp) -> down_proj(silu(gate_proj(x)) · up_proj(x)) with the projections of `mlp` (a
    deepen.llama.MLP), against mlp(x)."""
    return _check("swiglu", _swiglu, swiglu)


def _swiglu(swiglu) -> str:
    _seeded()
    c = _small_config()
    mlp = _randomise(llama.MLP(c))
    x = torch.randn(2, 5, c.dim)
    with torch.no_grad():
        want, gate, up, down = mlp(x), mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj
        mistakes = {
            "SiLU on the wrong projection: silu(gate_proj(x)) * up_proj(x), not silu(up_proj(x)) * gate_proj(x)":
                down(F.silu(up) * gate),
            "sigmoid instead of SiLU: silu(z) = z · sigmoid(z)": down(torch.sigmoid(gate) * up),
            "ReLU instead of SiLU": down(F.relu(gate) * up),
            "GELU instead of SiLU (that is GeGLU)": down(F.gelu(gate) * up),
            "the gate's partner is missing: multiply silu(gate_proj(x)) by up_proj(x)": down(F.silu(gate)),
            "SiLU applied after the product: silu(gate_proj(x)) * up_proj(x), not silu(gate_proj(x) * up_proj(x))":
                down(F.silu(gate * up)),
        }
    got = _call(swiglu, x.clone(), mlp)
    if isinstance(got, torch.Tensor) and got.shape[-1] == c.intermediate_size:
        raise Wrong(f"wrong shape: expected {tuple(want.shape)} (batch, seq, dim), got {tuple(got.shape)} — "
                    f"{c.intermediate_size} is the hidden width: down_proj not applied")
    error = _compare(got, want, ("batch", "seq", "dim"), mistakes)
    return f"equals deepen.llama.MLP: {c.dim} -> {c.intermediate_size} -> {c.dim} (max error {error:.2g})"


def check_block(block) -> Result:
    """block(x, b, cos, sin) -> the output of decoder block `b` (a deepen.llama.Block): h = x + Attn(RMSNorm(x)),
    out = h + SwiGLU(RMSNorm(h)), against b(x, cos, sin)."""
    return _check("block", _block, block)


def _block(block) -> str:
    _seeded()
    c = _small_config()
    b = _randomise(llama.Block(c))
    seq = 6
    x = torch.randn(2, seq, c.dim)
    cos, sin = llama.rope(torch.arange(seq), c.head_dim, c.rope_theta)
    with torch.no_grad():
        want = b(x, cos, sin)

        def attn(h):
            return b.attn(b.attn_norm(h), cos, sin)

        def mlp(h):
            return b.mlp(b.mlp_norm(h))

        h = x + attn(x)
        normed = b.attn_norm(x)
        post = b.attn_norm(x + b.attn(x, cos, sin))
        mistakes = {
            "post-norm (the original Transformer's order): normalise each sub-layer's input, not the sum — "
            "h = x + attn(attn_norm(x)), out = h + mlp(mlp_norm(h))": b.mlp_norm(post + b.mlp(post)),
            "no residual connections: add each sub-layer's output to its input": mlp(attn(x)),
            "the MLP's residual is missing: out = h + mlp(mlp_norm(h))": mlp(h),
            "the attention residual is missing: h = x + attn(attn_norm(x))": attn(x) + mlp(attn(x)),
            "the MLP reads x instead of h (parallel attention and MLP): its input is h = x + attention output":
                h + mlp(x),
            "the MLP is normalised with attn_norm: each sub-layer has its own norm, mlp_norm for the MLP":
                h + b.mlp(b.attn_norm(h)),
            "the residual adds to the normalised x: add to x itself — the stream is never normalised inside "
            "the block": (normed + b.attn(normed, cos, sin)) + mlp(normed + b.attn(normed, cos, sin)),
        }
    got = _call(block, x.clone(), b, cos, sin)
    error = _compare(got, want, ("batch", "seq", "dim"), mistakes)
    return f"equals deepen.llama.Block: pre-norm, two residual adds (max error {error:.2g})"


# ---------------------------------------------------------------- lab 02 and 03: layer plans, zero-initialised copies


def _sources(answer, what: str) -> tuple[list[int], list[int] | None]:
    """(base-layer index of each layer, indices zeroed or None) from a list of ints, a list of Layer, or a Plan."""
    if isinstance(answer, Plan):
        return answer.sources, answer.zeroed_layers
    if answer is None:
        raise Wrong(f"returned None — did you forget `return`? Return {what}")
    try:
        items = list(answer)
    except TypeError:
        raise Wrong(f"returned a {type(answer).__name__}; return {what}") from None
    if items and all(hasattr(i, "source") for i in items):
        return [int(i.source) for i in items], [n for n, i in enumerate(items) if i.zero]
    if not all(isinstance(i, numbers.Integral) or hasattr(i, "dtype") and getattr(i, "ndim", 1) == 0 and
               str(i.dtype).removeprefix("torch.").startswith(("int", "uint")) for i in items):
        raise Wrong(f"returned {answer!r:.80}; return {what}")
    return [int(i) for i in items], None  # a list, a tuple, a NumPy array or a tensor of integers


def _first_difference(got: list, want: list) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if len(got) != len(want):
        return f"expected {len(want)} layers, got {len(got)}"
    return f"they first differ at position {i}: expected layer {want[i]}, got {got[i]}"


def _wrong_layers(got: list, want: list, mistakes: dict, case: str) -> NoReturn:
    """Raise Wrong for a plan's layers `got` that are not `want`: the message of the mistake whose layers they are
    (mistakes: message -> layers), else where they first differ; `case` names the shape, e.g. "n_layers=8"."""
    for message, wrong in mistakes.items():
        if got == wrong:
            raise Wrong(f"{message} (for {case}: expected {want}, got {got})")
    raise Wrong(f"for {case}: expected {want}, got {got} — {_first_difference(got, want)}")


def check_llama_pro_plan(layers) -> Result:
    """layers(n_layers, groups) -> the grown model's layers as base-layer indices (a copy after each group),
    against deepen.plan.llama_pro; a list of deepen.plan.Layer or a Plan is checked for its zeroed copies too."""
    return _check("llama_pro_plan", _llama_pro_plan, layers)


def _llama_pro_plan(layers) -> str:
    what = "the grown model's layers as a list of base-layer indices, e.g. [0, 1, 1, 2, 3, 3]"
    cases = [(8, 2), (32, 8), (6, 3), (4, 1), (12, 4)]
    for n, groups in cases:
        plan = llama_pro(n, groups)
        got, zeroed = _sources(_call(layers, n, groups), what)
        case = f"n_layers={n}, groups={groups}"
        if got == plan.sources:
            if zeroed is not None and zeroed != plan.zeroed_layers:
                raise Wrong(f"{case}: the right layers, but zeroed {zeroed}; the new copies {plan.zeroed_layers} "
                            "have o_proj and down_proj zeroed (zero=True), the originals not")
            continue
        size = n // groups
        by_group = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
        mistakes = {
            "all new blocks at the top: LLaMA Pro interleaves them — a copy after each group":
                llama_pro(n, groups, placement="top").sources,
            "all new blocks at the bottom: LLaMA Pro puts a copy after each group":
                llama_pro(n, groups, placement="bottom").sources,
            "copied each group's first block: LLaMA Pro copies the group's top (last) block":
                [s for g in by_group for s in g + [g[0]]],
            "the copy comes before its group: it goes after the group's top block":
                [s for g in by_group for s in [g[-1]] + g],
        }
        if n % size == 0 and size != groups:
            mistakes[f"groups and group size swapped: groups={groups} means {groups} groups of {size} layers, a copy "
                     f"after every {size} layers"] = llama_pro(n, size).sources
        _wrong_layers(got, plan.sources, mistakes, case)
    return f"equals deepen.plan.llama_pro on {len(cases)} shapes, e.g. 8 layers, 2 groups: {llama_pro(8, 2).sources}"


def check_dus_plan(layers) -> Result:
    """layers(n_layers, drop) -> SOLAR's depth up-scaling as base-layer indices, [0, L-m) + [m, L), against
    deepen.plan.dus."""
    return _check("dus_plan", _dus_plan, layers)


def _dus_plan(layers) -> str:
    what = "the grown model's layers as a list of base-layer indices"
    cases = [(32, 8), (8, 2), (10, 3), (6, 0)]
    for n, m in cases:
        want = dus(n, m).sources
        got, _ = _sources(_call(layers, n, m), what)
        if got == want:
            continue
        mistakes = {
            "the two copies are in the wrong order: the bottom copy [0, L-m) comes first, then the top copy [m, L)":
                list(range(m, n)) + list(range(n - m)),
            "both copies lost their top m layers: the second copy loses its bottom m instead, [m, L)":
                list(range(n - m)) * 2,
            "both copies lost their bottom m layers: the first copy loses its top m instead, [0, L-m)":
                list(range(m, n)) * 2,
            "dropped m from only one copy: each copy loses m layers": list(range(n)) + list(range(m, n)),
            "off by one: each copy keeps L - m layers, [0, L-m) and [m, L) — range(L - m), range(m, L)":
                list(range(n - m + 1)) + list(range(m - 1, n)),
            "dropped m/2 from each copy: SOLAR drops m layers from each, 2(L - m) in all":
                list(range(n - m // 2)) + list(range(m // 2, n)),
        }
        _wrong_layers(got, want, mistakes, f"n_layers={n}, drop={m}")
    return f"equals deepen.plan.dus on {len(cases)} shapes, e.g. 32 layers, drop 8 -> {len(dus(32, 8).sources)} layers"


def check_new_layers(new_layers) -> Result:
    """new_layers(sources) -> positions in the grown model of the new layers: every use of a base layer after its
    first, against deepen.plan (Plan.new_layers)."""
    return _check("new_layers", _new_layers, new_layers)


def _new_layers(new_layers) -> str:
    cases = [dus(8, 2).sources, llama_pro(8, 2).sources, [0, 1, 2, 0, 1, 2], [0, 0, 1, 1], [2, 1, 0, 1]]
    for sources in cases:
        plan = custom(sources, n_base=max(sources) + 1)
        want = plan.new_layers
        got = _call(new_layers, list(sources))
        if got is None:
            raise Wrong("returned None — did you forget `return`? Return a list of positions in the grown model")
        got = [int(i) for i in got]
        if got == want:
            continue
        firsts = sorted({s: i for i, s in reversed(list(enumerate(sources)))}.values())
        if got == [sources[i] for i in want]:
            raise Wrong(f"for {sources}: those are base-layer indices (where the copies come from); return their "
                        f"positions in the grown model: expected {want}, got {got}")
        if sorted(got) == sorted(want):
            raise Wrong(f"for {sources}: the right positions in the wrong order; return them ascending: {want}")
        if got == firsts:
            raise Wrong(f"for {sources}: those are the first uses, the originals; the new layers are every later use "
                        f"of a base layer: expected {want}, got {got}")
        raise Wrong(f"for {sources}: expected {want}, got {got}")
    return f"equals deepen.plan's new layers on {len(cases)} plans, e.g. DUS 8 layers, drop 2: {dus(8, 2).new_layers}"


def _hf_model(n_layers: int, seed: int = 0):
    """A small random transformers Llama (tied embeddings) with distinct norm gains."""
    from transformers import LlamaForCausalLM

    _seeded(seed)
    model = LlamaForCausalLM(_small_config(n_layers=n_layers).to_hf())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model.eval()


def _block_forward(model, block, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    with torch.no_grad():
        out = block(x, position_embeddings=model.model.rotary_emb(x, positions))
    return out[0] if isinstance(out, tuple) else out


def check_zero_init(zeroed_copy) -> Result:
    """zeroed_copy(block) -> a copy of a transformers decoder layer with o_proj and down_proj zeroed, the original
    untouched, against deepen.grow.zero_output_projections."""
    return _check("zero_init", _zero_init, zeroed_copy)


def _zero_init(zeroed_copy) -> str:
    model = _hf_model(n_layers=1)
    block = model.model.layers[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    want = copy.deepcopy(block)
    zero_output_projections(want)
    got = _call(zeroed_copy, block)
    if got is None:
        raise Wrong("returned None — return the copy: new = copy.deepcopy(block), zero its o_proj and down_proj, "
                    "return new")
    if got is block or any(not torch.equal(v, block.state_dict()[k]) for k, v in before.items()):
        raise Wrong("changed the original block in place: the original stays in the model as it was — make a copy "
                    "first (copy.deepcopy(block)) and zero the copy")
    if not isinstance(got, nn.Module) or set(got.state_dict()) != set(want.state_dict()):
        raise Wrong(f"returned a {type(got).__name__}; return a copy of the block (the same kind of module)")
    got_state, want_state = got.state_dict(), want.state_dict()
    differ = [k for k in want_state if not torch.equal(got_state[k], want_state[k])]
    x = torch.randn(2, 8, model.config.hidden_size)
    moved = (_block_forward(model, got, x) - x).abs().max().item()
    if not differ:
        if moved != 0.0:
            raise Wrong(f"the weights are right but block(x) differs from x by {moved:.3g}")
        return ("o_proj and down_proj zeroed, everything else copied, the original untouched: block(x) == x exactly")
    zero = {k for k, v in got_state.items() if not v.any()}
    unzeroed = [p for p in OUTPUT_PROJECTIONS if any(k.startswith(p) and k not in zero for k in want_state)]
    wrongly_zeroed = sorted(k for k in zero if not k.startswith(OUTPUT_PROJECTIONS))
    problems = []
    if len(zero) == len(got_state):
        problems.append("every weight zeroed: the block is the identity but never learns — with all of it zero, "
                        "every gradient into it is zero too. Zero only o_proj and down_proj")
    else:
        for p in unzeroed:
            branch = "MLP" if "mlp" in p else "attention"
            name = p.split(".")[-1]
            problems.append(f"{name} left unzeroed: the {branch} branch still adds to the residual stream, so the copy "
                            f"is not the identity (block(x) moves x by up to {moved:.3g})" if moved else
                            f"{name} left unzeroed: zero it — the copy adds 0 here only because of the other "
                            "weights zeroed")
        norms = [k for k in wrongly_zeroed if "norm" in k]
        if norms:
            problems.append(f"norm weights zeroed ({', '.join(norms)}): the block is the identity that way too, but "
                            "the zeroed branch's weights get no gradient (notebook 02) — leave the norms as they are")
        others = [k for k in wrongly_zeroed if "norm" not in k]
        if others:
            problems.append(f"also zeroed {', '.join(others)}: only o_proj and down_proj are zeroed; the rest stays a "
                            "copy of the original block")
    changed = [k for k in differ if k not in zero and not k.startswith(OUTPUT_PROJECTIONS)]
    if changed:
        problems.append(f"changed {', '.join(changed)}: those stay copies of the original block")
    raise Wrong("; ".join(problems) or f"these weights differ from the expected copy: {', '.join(differ)}")


# ---------------------------------------------------------------- lab 04: continual pretraining


def _grown_model(seed: int = 0, n_layers: int = 4, groups: int = 2):
    """(grown model, plan, manifest): a small random Llama grown by LLaMA Pro (default: 4 blocks to 6, new 2 and 5),
    with the manifest `deepen expand` writes."""
    plan = llama_pro(n_layers, groups=groups)
    model = grow(_hf_model(n_layers=n_layers, seed=seed), plan)
    return model, plan, Manifest(base="a small random Llama", plan=plan).to_dict()


def _listing(items) -> str:
    return ", ".join(map(str, items))


def check_freeze(freeze) -> Result:
    """freeze(model, manifest): only the blocks in manifest["new_layers"] learn (requires_grad), against
    deepen.trainable.select_trainable(model, "llama-pro", new_layers); checked by a backward pass."""
    return _check("freeze", _freeze, freeze)


def _freeze(freeze) -> str:
    first = _freeze_case(freeze, _grown_model())
    _freeze_case(freeze, _grown_model(n_layers=10, groups=10))  # 20 blocks: new block 1 is a prefix of 10..19
    return first + "; and on 10 blocks grown to 20, where new block 1's name is a prefix of blocks 10-19's"


def _freeze_case(freeze, grown) -> str:
    model, plan, manifest = grown
    want_model = copy.deepcopy(model)
    select_trainable(want_model, "llama-pro", plan.new_layers)
    want = {name for name, p in want_model.named_parameters() if p.requires_grad}
    model.train()  # as in training: model.eval() would switch this off, not freeze anything
    returned = _call(freeze, model, json.loads(json.dumps(manifest)))
    if isinstance(returned, nn.Module):
        model = returned
    batch = torch.randint(0, model.config.vocab_size, (2, 12), generator=_seeded())
    loss = model(input_ids=batch, labels=batch).loss
    if loss.requires_grad:
        loss.backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    if got == want:
        n = sum(p.numel() for name, p in model.named_parameters() if name in want)
        total = sum(p.numel() for p in model.parameters())
        return (f"on a {plan.n_base}-block model grown to {plan.n_layers}, only the manifest's new blocks "
                f"({_listing(plan.new_layers)}) receive gradients: {n:,} of {total:,} parameters train")
    n_blocks = len(model.model.layers)
    frozen_blocks = [i for i in range(n_blocks) if i not in plan.new_layers]
    learning = sorted({layer_of(n) for n in got if layer_of(n) is not None})
    all_params = {name for name, _ in model.named_parameters()}
    if not got:
        raise Wrong(f"nothing receives a gradient: every parameter is frozen. The new blocks "
                    f"{_listing(plan.new_layers)} (manifest['new_layers']) must learn: requires_grad_(True)")
    if got == all_params and not model.training:
        raise Wrong("model.eval() does not freeze anything — it only switches dropout and the like to inference: "
                    "every block still receives gradients. Set requires_grad_(False) on the frozen parameters")
    problems = []
    still = [i for i in frozen_blocks if i in learning]
    prefixed = [i for i in still if any(str(i).startswith(str(j)) for j in plan.new_layers)]
    if still and prefixed == still:
        problems.append(f"frozen blocks {_listing(still)} learn because their names start with a new block's: "
                        f"matching f'layers.{{i}}' as a substring also catches layers.{still[0]}; match the whole "
                        "index (name.split('.')[2] == str(i), or 'layers.{i}.' with the dot)")
    elif learning == [i - 1 for i in plan.new_layers] or learning == [i + 1 for i in plan.new_layers]:
        problems.append(f"off by one: blocks {_listing(learning)} learn; the new blocks are "
                        f"{_listing(plan.new_layers)} (manifest['new_layers'], positions in the grown model)")
    elif learning == sorted({plan.sources[i] for i in plan.new_layers}):
        problems.append(f"blocks {_listing(learning)} learn: those are the base layers the copies came from "
                        f"(plan sources); the new blocks sit at {_listing(plan.new_layers)} in the grown model "
                        "(manifest['new_layers'])")
    elif still:
        problems.append(f"frozen blocks {_listing(still)} still receive gradients; only the manifest's new blocks "
                        f"{_listing(plan.new_layers)} should: first requires_grad_(False) on every parameter, then "
                        "requires_grad_(True) on each new block")
    missing = sorted({layer_of(n) for n in want - got})
    if missing and not problems:
        problems.append(f"new blocks {_listing(missing)} get no gradient (or only part of them): every parameter of "
                        "a new block learns")
    outside = sorted(n for n in got - want if layer_of(n) is None)
    if outside:
        problems.append(f"{', '.join(outside)} still receive gradients: outside the new blocks everything is frozen "
                        "(embeddings, the final norm and the head too)")
    raise Wrong("; ".join(problems) or f"expected gradients on {len(want)} parameters, got {len(got)}")


def _step_without_zero_grad(model, batch, optimizer) -> None:
    """A known mistake, simulated: the gradients of every step add up."""
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


def check_train_step(train_step) -> Result:
    """train_step(model, batch, optimizer) -> the loss as a float: forward with next-token labels, backward,
    optimizer step, gradients cleared. Two steps on a frozen-by-manifest model against the same steps done here."""
    return _check("train_step", _train_step, train_step)


def _train_step(train_step) -> str:
    model, plan, _ = _grown_model()
    select_trainable(model, "llama-pro", plan.new_layers)
    models = {k: copy.deepcopy(model) for k in ("student", "reference", "no zero_grad")}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for k, m in models.items()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = _seeded(1)
    batches = [torch.randint(0, model.config.vocab_size, (2, 12), generator=gen) for _ in range(2)]

    def params(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    student, losses = models["student"], []
    for step, batch in enumerate(batches):
        want = reference_step(models["reference"], batch, opts["reference"], clip=None)  # deepen's own step
        _step_without_zero_grad(models["no zero_grad"], batch, opts["no zero_grad"])
        loss = _call(train_step, student, batch.clone(), opts["student"])
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            raise Wrong("returned the loss tensor; return loss.item(), a float (the tensor keeps the whole graph "
                        "alive)")
        if not isinstance(loss, (int, float, torch.Tensor)):
            raise Wrong(f"returned {type(loss).__name__}; return the loss as a float: loss.item()")
        loss = float(loss)
        losses.append(loss)
        if step == 0 and not math.isclose(loss, want, rel_tol=1e-5, abs_tol=1e-6):
            with torch.no_grad():
                ref = copy.deepcopy(model)
                shifted = ref(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss.item()
                logits = ref(input_ids=batch).logits
                unshifted = F.cross_entropy(logits.flatten(0, 1), batch.flatten()).item()
            for message, wrong in {
                "labels shifted twice: transformers shifts the labels inside the model — pass labels=input_ids "
                "(the same tensor), not the next tokens": shifted,
                "the loss compares each position with its own token: the target at position t is token t + 1 — "
                "pass labels=input_ids and let the model shift": unshifted,
            }.items():
                if math.isclose(loss, wrong, rel_tol=1e-5, abs_tol=1e-6):
                    raise Wrong(f"{message} (loss {loss:.4f}, expected {want:.4f})")
            raise Wrong(f"the loss at step 1 is {loss:.4f}, expected {want:.4f} — the next-token loss of "
                        "model(input_ids=batch, labels=batch)")
        if step == 0 and all(torch.equal(p, start[n]) for n, p in student.named_parameters()):
            raise Wrong("the weights did not change: call loss.backward(), then optimizer.step() (before "
                        "optimizer.zero_grad())")
    ref, acc = params(models["reference"]), params(models["no zero_grad"])
    got = params(student)
    if torch.allclose(got, ref, rtol=1e-5, atol=1e-7):
        changed = [n for n, p in student.named_parameters() if not p.requires_grad and not torch.equal(p, start[n])]
        if changed:
            raise Wrong(f"frozen weights changed: {', '.join(changed[:3])}; only the optimizer updates weights")
        return (f"two steps on a small grown model match the reference (losses {losses[0]:.4f}, {losses[1]:.4f}); "
                "gradients cleared between steps; frozen weights unchanged")
    if torch.allclose(got, acc, rtol=1e-5, atol=1e-7):
        raise Wrong("gradients accumulate across steps: the second step used the sum of both steps' gradients — call "
                    "optimizer.zero_grad() every step (after optimizer.step(), or before loss.backward())")
    reference = dict(models["reference"].named_parameters())
    diffs = {n: (p.detach() - reference[n].detach()).abs().max().item() for n, p in student.named_parameters()}
    where = max(diffs, key=diffs.get)
    raise Wrong(f"the loss is right but the weights after two steps differ from the reference (max difference "
                f"{diffs[where]:.3g}, in {where}): one forward, loss.backward(), optimizer.step(), "
                "optimizer.zero_grad() — no extra scaling or clipping here")


# ---------------------------------------------------------------- lab 05: after growth (DPO, SLERP)


def _as_tensor(got):
    """A student's answer as a tensor when it is array-like (a NumPy array, a list, a float); else as it is."""
    if isinstance(got, torch.Tensor) or got is None:
        return got
    try:
        return torch.as_tensor(got)
    except (TypeError, ValueError, RuntimeError):
        return got


def check_dpo_loss(dpo_loss) -> Result:
    """dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta) -> the mean DPO loss over the pairs, from
    sequence log-probabilities (pairs,): −log σ(β[(chosen − ref_chosen) − (rejected − ref_rejected)])."""
    return _check("dpo_loss", _dpo_loss, dpo_loss)


def _dpo_loss(dpo_loss) -> str:
    reference = deepen_dpo_loss
    g = _seeded(0)
    cases = [(4, 0.1), (7, 0.5), (1, 2.0)]  # pairs, beta: several sizes and strengths
    for n, beta in cases:
        chosen, rejected = -20 * torch.rand(n, generator=g) - 5, -20 * torch.rand(n, generator=g) - 5
        ref_c, ref_r = -20 * torch.rand(n, generator=g) - 5, -20 * torch.rand(n, generator=g) - 5
        want = reference(chosen, rejected, ref_c, ref_r, beta)[0]
        got = _as_tensor(_call(dpo_loss, chosen.clone(), rejected.clone(), ref_c.clone(), ref_r.clone(), beta))
        if isinstance(got, torch.Tensor) and got.numel() == n and got.shape != want.shape:
            raise Wrong(f"returned one loss per pair, shape {tuple(got.shape)}; return their mean, a scalar")
        logits = beta * ((chosen - ref_c) - (rejected - ref_r))
        mistakes = {
            "the reference is not subtracted: the reward is β (log π(y|x) − log π_ref(y|x))":
                -F.logsigmoid(beta * (chosen - rejected)).mean(),
            "chosen and rejected swapped: the loss then pushes the model towards the rejected answers":
                -F.logsigmoid(-logits).mean(),
            "β not applied to the margin (it scales the reward before the sigmoid)":
                -F.logsigmoid(logits / beta).mean(),
            "summed over the pairs: take the mean": -F.logsigmoid(logits).sum(),
            "the sign: the loss is −log σ(margin), which falls as the margin grows": F.logsigmoid(logits).mean(),
        }
        if n == 1:
            mistakes.pop("summed over the pairs: take the mean")
        _compare(got, want, (), mistakes, f" (for {n} pairs, beta={beta})")
    far = torch.tensor([-500.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0])  # margin −50·β
    got = _as_tensor(_call(dpo_loss, *far, 1.0))
    if not isinstance(got, torch.Tensor) or not torch.isfinite(got).all():
        raise Wrong("not finite for a large margin (chosen far below rejected): −log(sigmoid(x)) overflows; use "
                    "torch.nn.functional.logsigmoid")
    return f"equals deepen.objectives.dpo_loss on {len(cases)} sets of pairs (beta 0.1, 0.5, 2), and stays finite " \
           "for a margin of −500"


def check_slerp(slerp) -> Result:
    """slerp(a, b, t) -> the spherical interpolation of two tensors of one shape (as deepen.merge.slerp)."""
    return _check("slerp", _slerp, slerp)


def _slerp(slerp) -> str:
    reference = deepen_slerp
    g = _seeded(0)
    a, b = torch.randn(4, 6, generator=g, dtype=torch.float64), 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    for t in (0.0, 0.3, 0.75, 1.0):
        want = reference(a, b, t)
        got = _as_tensor(_call(slerp, a.clone(), b.clone(), t))
        unit = want / want.norm()
        mistakes = {"that is linear interpolation (1 − t)·a + t·b: SLERP follows the arc between the directions":
                    lerp(a, b, t),
                    "t runs the wrong way: t = 0 must give a, t = 1 b": reference(a, b, 1 - t),
                    "the result lies on the unit sphere: interpolate a and b themselves, not their directions": unit,
                    "the angle comes from the dot product of a and b unnormalised: divide by both norms":
                    _slerp_with_raw_angle(a, b, t)}
        if t in (0.0, 1.0):
            mistakes.pop("that is linear interpolation (1 − t)·a + t·b: SLERP follows the arc between the directions")
            mistakes.pop("the angle comes from the dot product of a and b unnormalised: divide by both norms")
        _compare(got, want, ("rows", "columns"), mistakes, f" (t={t})")
    near = a + 1e-9 * b  # nearly parallel: sin θ ≈ 0
    got = _as_tensor(_call(slerp, a.clone(), near.clone(), 0.5))
    if not isinstance(got, torch.Tensor) or not torch.isfinite(got).all():
        raise Wrong("nearly parallel tensors give sin θ ≈ 0 and a division by zero: fall back to linear "
                    "interpolation when |cos θ| is close to 1 (deepen uses 0.9995)")
    _compare(got, reference(a, near, 0.5), ("rows", "columns"), {}, " (nearly parallel tensors)")
    return "equals deepen.merge.slerp at t = 0, 0.3, 0.75 and 1 on tensors of different norms, and falls back to a " \
           "line for nearly parallel ones"


def _slerp_with_raw_angle(a, b, t):
    cos = torch.clamp(a.flatten() @ b.flatten(), -1, 1).item()
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


# ---------------------------------------------------------------- lab 06: the budget by hand


def _number(got, what: str) -> float:
    """A student's count as a float: any real number, or a one-element tensor or array."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    elif hasattr(got, "item") and getattr(got, "size", None) == 1:  # a NumPy scalar or one-element array
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        raise Wrong(f"returned {type(got).__name__} {got!r}; expected {what}, a number")
    return float(got)


def _same_number(got: float, want: float, mistakes: dict, case: str, unit: str = "", *, rel_tol: float = 1e-9,
                 abs_tol: float = 0.0) -> None:
    """Raise Wrong unless got == want (to the tolerances: a count exactly, a float computed another way, e.g. in
    float32, to what it can hold), naming the mistake whose value got matches."""
    def same(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)

    if same(got, want):
        return
    named = [why for why, wrong in mistakes.items() if not same(wrong, want) and same(got, wrong)]
    hint = f" — {named[0]}" if named else ""

    def shown(x: float) -> str:
        return f"{int(x):,}" if float(x).is_integer() else f"{x:,.6g}"  # counts exactly, never rounded

    raise Wrong(f"{case}: expected {shown(want)}{unit}, got {shown(got)}{unit}{hint}")


# (vocab, hidden, layers, intermediate, heads, kv_heads, tied): shapes of real models and an odd one
PARAM_SHAPES = {"Llama-2-7B": (32000, 4096, 32, 11008, 32, 32, False),
                "Mistral-7B": (32000, 4096, 32, 14336, 32, 8, False),
                "SmolLM2-135M": (49152, 576, 30, 1536, 9, 3, True),
                "an odd shape": (97, 48, 3, 80, 6, 2, False)}


def _hf_param_count(vocab, hidden, layers, intermediate, heads, kv_heads, tied) -> int:
    """The parameters of transformers' LlamaForCausalLM of that shape, built on the meta device (no memory)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # a tied head is the embedding's tensor: counted once


def _count(vocab, hidden, layers, intermediate, heads, kv_heads, tied, *, gqa=True, norms=True, final=True,
           head=None, mlp=3) -> int:
    """The count written out, with the switches the common mistakes flip."""
    kv = hidden // heads * (kv_heads if gqa else heads)
    block = 2 * hidden * hidden + 2 * hidden * kv + mlp * hidden * intermediate + (2 * hidden if norms else 0)
    head = (not tied) if head is None else head
    return vocab * hidden + layers * block + (hidden if final and norms else 0) + (vocab * hidden if head else 0)


def check_param_count(param_count) -> Result:
    """param_count(vocab, hidden, layers, intermediate, heads, kv_heads, tied) -> the parameters of a Llama of that
    shape, against transformers' LlamaForCausalLM built on the meta device."""
    return _check("param_count", _param_count, param_count)


def _param_count(param_count) -> str:
    for name, shape in PARAM_SHAPES.items():
        want = _hf_param_count(*shape)
        got = _number(_call(param_count, *shape), "a parameter count")
        tied = shape[-1]
        head = ("the output head counted though it is tied to the embeddings (one tensor, counted once)" if tied
                else "the output head is missing: untied, it is a vocab × hidden matrix of its own")
        mistakes = {
            "k_proj and v_proj at full width: with grouped-query attention each is hidden × kv_heads·head_dim":
                _count(*shape, gqa=False),
            "the RMSNorm weights are missing: two of size hidden per block, and the final norm":
                _count(*shape, norms=False),
            "the final RMSNorm (hidden weights, after the last block) is missing": _count(*shape, final=False),
            head: _count(*shape, head=tied),  # tied: a head counted; untied: the head left out
            "the MLP has three matrices (gate_proj, up_proj, down_proj), each hidden × intermediate":
                _count(*shape, mlp=2),
        }
        _same_number(got, want, mistakes, f"{name} {shape}")
    return f"equals transformers' LlamaForCausalLM on {len(PARAM_SHAPES)} shapes, e.g. Llama-2-7B " \
           f"{_hf_param_count(*PARAM_SHAPES['Llama-2-7B']):,}"


def _flops_reference(matmul: list[int], trainable: list[bool]) -> float:
    stages = [Stage(f"stage {k}", p, p if t else 0, p, p if t else 0)
              for k, (p, t) in enumerate(zip(matmul, trainable))]
    return training_flops(stages).model


def check_train_flops(train_flops) -> Result:
    """train_flops(matmul, trainable) -> training FLOPs per token of a model whose stages (bottom to top) hold
    matmul[k] parameters that multiply activations and learn when trainable[k], attention scores left out;
    against deepen.budget.training_flops."""
    return _check("train_flops", _train_flops, train_flops)


def _train_flops(train_flops) -> str:
    g = _seeded(6)
    cases = [([100] * 8, [True] * 8, "everything trainable"), ([100] * 8, [False] * 8, "nothing trainable"),
             ([100, 100, 150, 100, 100, 150, 300], [False, False, True, False, False, True, False],
              "two new blocks among frozen ones, a frozen head"),
             ([int(v) for v in torch.randint(10, 1000, (12,), generator=g)],
              [bool(v) for v in torch.randint(0, 2, (12,), generator=g)], "12 stages at random")]
    for matmul, trainable, case in cases:
        want = _flops_reference(matmul, trainable)
        got = _number(_call(train_flops, list(matmul), list(trainable)), "FLOPs per token")
        first = next((k for k, t in enumerate(trainable) if t), len(matmul))
        above = sum(matmul[first:])
        mine = sum(p for p, t in zip(matmul, trainable) if t)
        mistakes = {
            "6 FLOPs per parameter everywhere: only stages at or above the first trainable one run a backward, and "
            "only trainable ones compute weight gradients": 6 * sum(matmul),
            "no backward through the frozen stages above the first trainable one: the gradient must pass through "
            "them (2 FLOPs per parameter) to reach the trainable stages below": 2 * sum(matmul) + 4 * mine,
            "weight gradients for frozen stages: only trainable weights get their 2 FLOPs per parameter":
                2 * sum(matmul) + 4 * above,
            "one FLOP per multiply-add: a multiply and an add are 2 FLOPs (forward 2 per parameter)":
                want / 2,
        }
        _same_number(got, want, mistakes, case, " FLOPs")
    return f"equals deepen.budget.training_flops on {len(cases)} models (frozen, trainable, mixed)"


def check_state_memory(state_memory) -> Result:
    """state_memory(trainable, gpus) -> GB (1e9 bytes) per GPU that AdamW training in mixed precision keeps for
    the trainable parameters under FSDP (fp32 weight, gradient, two moments; sharded over the GPUs), against
    deepen.budget.state_bytes."""
    return _check("state_memory", _state_memory, state_memory)


def _state_memory(state_memory) -> str:
    per = sum(state_bytes("fsdp", "bf16").values())
    cases = [(1_619_066_880, 8), (8_357_482_496, 8), (6_738_415_616, 1), (134_515_008, 4)]
    for trainable, gpus in cases:
        want = per * trainable / gpus / 1e9
        got = _number(_call(state_memory, trainable, gpus), "GB per GPU")
        mistakes = {
            "not divided over the GPUs: FSDP shards every state across them": per * trainable / 1e9,
            "12 bytes per parameter: the fp32 gradient (4 bytes) is missing": 12 * trainable / gpus / 1e9,
            "8 bytes per parameter: only AdamW's two moments; the fp32 weight and gradient are kept too":
                8 * trainable / gpus / 1e9,
            "2 bytes per parameter (bf16 weights only): training keeps 16 bytes per trainable parameter":
                2 * trainable / gpus / 1e9,
            "GiB (2**30 bytes) instead of GB (1e9 bytes, as GPUs are sold)": per * trainable / gpus / 2 ** 30,
        }
        _same_number(got, want, mistakes, f"{trainable:,} trainable on {gpus} GPUs", " GB")
    return f"equals deepen.budget's {per} bytes per trainable parameter, sharded, on {len(cases)} cases"


# ---------------------------------------------------------------- lab 07: choosing DUS's m from the seam


def _streams(n_layers: int, seed: int, batch: int = 2, seq: int = 7, dim: int = 16) -> list[torch.Tensor]:
    """Made-up hidden states h[0..L] of a residual stream: each layer adds an update to every token; token 0 is an
    attention sink, one large direction that every layer keeps (as in real models)."""
    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(batch, seq, dim, generator=g, dtype=torch.float64)]
    for _ in range(n_layers):
        h.append(h[-1] + 0.5 * torch.randn(batch, seq, dim, generator=g, dtype=torch.float64))
    sink = 30 * torch.randn(dim, generator=g, dtype=torch.float64)
    for j, x in enumerate(h):
        x[:, 0] = sink * (1 + j) + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return h


def _cosine(a: torch.Tensor, b: torch.Tensor, first: bool = False, per_token: bool = True) -> float:
    """Mean over tokens (position 0 left out unless `first`) of the cosine between two (batch, seq, dim) streams."""
    if not first:
        a, b = a[:, 1:], b[:, 1:]
    if not per_token:
        return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def _seam(hidden: list[torch.Tensor], m: int) -> float:
    return _cosine(hidden[len(hidden) - 1 - m], hidden[m])


def check_seam_cosine(seam_cosine) -> Result:
    """seam_cosine(hidden, m) -> how alike the stream at DUS's seam is to what the copied layer saw in the base:
    the mean over tokens 1.. of cos(hidden[L - m], hidden[m]), from the base's hidden states hidden[0..L]."""
    return _check("seam_cosine", _seam_cosine, seam_cosine)


def _seam_cosine(seam_cosine) -> str:
    cases = [(8, 2, 0), (12, 5, 1), (6, 1, 2), (30, 6, 3)]
    for n, m, seed in cases:
        hidden = _streams(n, seed)
        want = _seam(hidden, m)
        got = _number(_call(seam_cosine, [h.clone() for h in hidden], m), "a cosine")
        mistakes = {
            "hidden[L - m - 1] is the input of the last kept layer: the seam layer reads its output, hidden[L - m]":
                _cosine(hidden[n - m - 1], hidden[m]),
            "in the base, layer m read hidden[m] (its input), not hidden[m - 1]": _cosine(hidden[n - m], hidden[m - 1]),
            "hidden[-m] is hidden[L + 1 - m]: the list holds L + 1 states, so the seam is hidden[L - m] = "
            "hidden[-m - 1]": _cosine(hidden[n + 1 - m], hidden[m]),
            "token 0 included: it is an attention sink whose stream barely changes, so it inflates every cosine — "
            "average over tokens 1..": _cosine(hidden[n - m], hidden[m], first=True),
            "one cosine of the flattened tensors: take the cosine per token (over the hidden dimension), then the "
            "mean": _cosine(hidden[n - m], hidden[m], per_token=False),
        }
        _same_number(got, want, mistakes, f"L={n}, m={m}", abs_tol=1e-5)
    return f"equals the reference on {len(cases)} made-up streams (L = 6 to 30, an attention sink at token 0)"


def check_choose_m(choose_m) -> Result:
    """choose_m(hidden, threshold) -> the smallest m (1 <= m < L/2: the grown model deeper than the base) whose
    seam cosine reaches `threshold` — the deepest DUS model with a seam that alike; None when no m does."""
    return _check("choose_m", _choose_m, choose_m)


def _spiked(n_layers: int, seed: int, layer: int) -> list[torch.Tensor]:
    """Made-up hidden states whose stream at one layer is unusual (a large update that the next layer undoes): the
    seam cosine then falls and rises again with m."""
    hidden = _streams(n_layers, seed)
    g = torch.Generator().manual_seed(seed)
    hidden[layer] = hidden[layer] + 3 * torch.randn(hidden[layer].shape, generator=g, dtype=torch.float64)
    return hidden


def _choose_m(choose_m) -> str:
    cases = []
    for n, hidden in ((12, _streams(12, 4)), (9, _streams(9, 5)), (30, _streams(30, 6)), (12, _spiked(12, 7, 5))):
        seams = {m: _seam(hidden, m) for m in range(1, (n + 1) // 2)}
        ordered = sorted(seams.values())
        lowest = min(ordered[0], _seam(hidden, 0)) - 1e-3  # every m reaches it, m = 0 (stacking) too
        for threshold in (ordered[len(ordered) // 3] - 1e-3, ordered[-1] - 1e-3, ordered[-1] + 1e-3, lowest):
            cases.append((n, hidden, seams, threshold))
    for n, hidden, seams, threshold in cases:
        reaching = [m for m, c in seams.items() if c >= threshold]
        want = min(reaching) if reaching else None
        got = _call(choose_m, [h.clone() for h in hidden], threshold)
        if got is not None:
            got = _number(got, "an m (a number) or None")
        if got == want:
            continue
        case = f"L={n}, threshold {threshold:.3f}"
        if want is None:
            if got == n / 2:
                raise Wrong(f"{case}: m = L/2 gives 2(L - m) = L layers, the base itself: nothing is grown. Return "
                            "None when no m < L/2 reaches the threshold")
            raise Wrong(f"{case}: no m < L/2 reaches the threshold: return None, got {got!r}")
        if got == 0:
            raise Wrong(f"{case}: m = 0 is plain stacking (2L blocks), not depth up-scaling: m counts from 1")
        if isinstance(got, numbers.Real) and not isinstance(got, bool) and math.isclose(got, seams[want]):
            raise Wrong(f"{case}: returned the cosine; return m, the number of layers dropped")
        if reaching and got == max(reaching) and len(reaching) > 1:
            raise Wrong(f"{case}: the largest m that reaches the threshold: every extra layer dropped makes the "
                        "grown model shallower — return the smallest one")
        if got == max(seams, key=seams.get) and len(reaching) > 1:
            raise Wrong(f"{case}: the m of the most alike seam, whatever the threshold: return the smallest m whose "
                        "seam reaches the threshold")
        if got in (want - 1, want + 1):
            raise Wrong(f"{case}: off by one: m counts the layers each copy drops, from 1")
        raise Wrong(f"{case}: expected m = {want}, got {got!r}")
    return f"the smallest m whose seam reaches the threshold, or None, on {len(cases)} thresholds over 4 made-up " \
           "models (one whose seam does not grow with m)"


# ---------------------------------------------------------------- lab 08: LoRA of matching size


# (in, out) of the linear layers LoRA adapts in one block, and the block count, of real models and an odd one
LORA_SHAPES = {
    "SmolLM2-135M": ([(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)], 30),
    "Llama-2-7B": ([(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)], 32),
    "an odd model": ([(48, 48), (48, 16), (80, 48)], 3),
}


def _lora_count(shapes, r, *, a=True, b=True) -> int:
    return sum(r * ((i if a else 0) + (o if b else 0)) for i, o in shapes)


def check_lora_params(lora_params) -> Result:
    """lora_params(shapes, r) -> the parameters LoRA of rank r adds on linear layers of (in, out) `shapes`: A (r × in)
    and B (out × r) each, against deepen.budget.lora_params."""
    return _check("lora_params", _lora_params, lora_params)


def _lora_params(lora_params) -> str:
    for name, (block, n_blocks) in LORA_SHAPES.items():
        shapes = block * n_blocks
        for r in (1, 8, 70):
            per = {s: budget_lora_params(nn.Linear(*s, bias=False, device="meta"), r) for s in set(shapes)}
            want = sum(per[s] for s in shapes)
            got = _number(_call(lora_params, list(shapes), r), "a parameter count")
            mistakes = {
                "r × in × out: that is a full matrix; LoRA's update B·A is built from two thin ones, r × in and "
                "out × r":
                    sum(r * i * o for i, o in shapes),
                "only A (r × in): B (out × r) counts too": _lora_count(shapes, r, b=False),
                "only B (out × r): A (r × in) counts too": _lora_count(shapes, r, a=False),
                "r² per layer: A is r × in and B out × r": r * r * len(shapes),
            }
            _same_number(got, want, mistakes, f"{name}, r={r}")
    return f"equals deepen.budget.lora_params on {len(LORA_SHAPES)} models at r = 1, 8, 70"


def check_matching_rank(matching_rank) -> Result:
    """matching_rank(shapes, target) -> the LoRA rank (at least 1) whose adapters on `shapes` have the count closest
    to `target`, as `deepen reproduce` matches LoRA to an expansion's trainable count."""
    return _check("matching_rank", _matching_rank, matching_rank)


def _matching_rank(matching_rank) -> str:
    block = LORA_SHAPES["SmolLM2-135M"][0]
    cases = [(block * 30, 21_240_576, "SmolLM2-135M, LLaMA Pro's 6 new blocks"),
             (LORA_SHAPES["Llama-2-7B"][0] * 32, 1_619_066_880, "Llama-2-7B, LLaMA Pro's 8 new blocks"),
             (block * 30, 4 * 3_540_096, "SmolLM2-135M, 4 new blocks"),
             (block * 30, 1_000, "SmolLM2-135M, a tiny target"),
             (LORA_SHAPES["an odd model"][0] * 3, 5_000, "an odd model")]
    for shapes, target, case in cases:
        per = sum(i + o for i, o in shapes)
        want = max(1, min((math.floor(target / per), math.ceil(target / per)), key=lambda r: abs(r * per - target)))
        got = _number(_call(matching_rank, list(shapes), target), "a rank")
        mistakes = {
            "rounded down: the closest count can be one rank up": max(1, math.floor(target / per)),
            "rounded up: the closest count can be one rank down": math.ceil(target / per),
            "a rank of 0 adds no adapter: the rank is at least 1": 0,
            "matched one block's adapters to the whole target: the adapters of every block add up":
                max(1, round(target / sum(i + o for i, o in shapes[:7]))),
        }
        _same_number(got, want, mistakes, f"{case} ({target:,} parameters)")
    return f"the closest rank on {len(cases)} targets, e.g. SmolLM2-135M against 6 new blocks: r = " \
           f"{round(21_240_576 / sum(i + o for i, o in block * 30))}"


def check_forgetting_and_gain(forgetting_and_gain) -> Result:
    """forgetting_and_gain(base, end) -> (forgetting, gain) from held-out perplexities {"general": ..., "domain":
    ...} of the base and of the trained model, as deepen.runs defines them: end/base on general text, base/end on
    the domain."""
    return _check("forgetting_and_gain", _forgetting_and_gain, forgetting_and_gain)


def _forgetting_and_gain(forgetting_and_gain) -> str:
    cases = [({"general": 17.01, "domain": 12.88}, {"general": 16.17, "domain": 11.00}),
             ({"general": 130.6, "domain": 30012.0}, {"general": 212.6, "domain": 2161.0}),
             ({"general": 20.0, "domain": 10.0}, {"general": 25.0, "domain": 10.0})]
    for base, end in cases:
        forgetting, gain = end["general"] / base["general"], base["domain"] / end["domain"]
        got = _as_tensor(_call(forgetting_and_gain, dict(base), dict(end)))
        if not isinstance(got, torch.Tensor) or got.numel() != 2:
            raise Wrong(f"returned {got!r}; return two numbers, (forgetting, gain)")
        got = [v.item() for v in got.flatten().double()]
        case = f"base {base}, end {end}"
        swapped = math.isclose(got[0], gain, rel_tol=1e-6) and math.isclose(got[1], forgetting, rel_tol=1e-6)
        if swapped and forgetting != gain:
            raise Wrong(f"{case}: (gain, forgetting) — return forgetting first")
        mistakes = {
            "forgetting upside down: it is the general perplexity at the end over the base's (above 1: worse)":
                base["general"] / end["general"],
            "differences, not ratios: perplexities are compared by their ratio": end["general"] - base["general"],
        }
        _same_number(got[0], forgetting, mistakes, f"{case}, forgetting", rel_tol=1e-6)
        mistakes = {
            "gain upside down: it is the base's domain perplexity over the end's (above 1: learnt)":
                end["domain"] / base["domain"],
            "differences, not ratios: perplexities are compared by their ratio": base["domain"] - end["domain"],
        }
        _same_number(got[1], gain, mistakes, f"{case}, gain", rel_tol=1e-6)
    return f"deepen.runs' forgetting and gain on {len(cases)} runs"


# ---------------------------------------------------------------- lab 09: which parameters learn at step 0


BLOCK_PARAMETERS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                    "input_layernorm.weight", "post_attention_layernorm.weight")
NEW_BLOCK_INITS = ("llama-pro", "copy", "zeros", "zero-norms")


def _new_block_gradients(init: str, step: int, seed: int = 0) -> set[str]:
    """Measured: the new block's parameters with a nonzero gradient at `step` (0: the first backward; 1: after one
    SGD step on the new block), in a small random Llama of 4 blocks grown by LLaMA Pro to 6."""
    plan = llama_pro(4, groups=2)
    deepen_init = {"llama-pro": "plan", "zero-norms": "copy"}.get(init, init)
    model = grow(_hf_model(n_layers=4, seed=seed), plan, init=deepen_init)
    block = model.model.layers[plan.new_layers[0]]
    if init == "zero-norms":
        with torch.no_grad():
            block.input_layernorm.weight.zero_()
            block.post_attention_layernorm.weight.zero_()
    model.train()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    batch = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    for _ in range(step + 1):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    return {name for name, p in block.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}


def check_gets_gradient(gets_gradient) -> Result:
    """gets_gradient(init, step) -> the names (as in BLOCK_PARAMETERS) of a new block's parameters with a nonzero
    gradient at step 0 or 1, for each init of NEW_BLOCK_INITS — measured by a backward pass on a grown model."""
    return _check("gets_gradient", _gets_gradient, gets_gradient)


def _gets_gradient(gets_gradient) -> str:
    o, down = "self_attn.o_proj.weight", "mlp.down_proj.weight"
    everything = set(BLOCK_PARAMETERS)
    for init in NEW_BLOCK_INITS:
        for step in (0, 1):
            want = _new_block_gradients(init, step)
            got = _call(gets_gradient, init, step)
            if isinstance(got, str) or not hasattr(got, "__iter__"):
                raise Wrong(f"returned {got!r}; return a list of parameter names, e.g. ['mlp.down_proj.weight']")
            got = {re.sub(r"^model\.layers\.\d+\.", "", str(name)) for name in got}
            unknown = sorted(got - everything)
            if unknown:
                raise Wrong(f"{', '.join(unknown)}: not a parameter of a block; the names are "
                            f"{', '.join(BLOCK_PARAMETERS)}")
            if got == want:
                continue
            case = f"init={init!r}, step {step}"
            if init == "llama-pro" and step == 0 and not got:
                raise Wrong(f"{case}: a zero matrix still gets a weight gradient — (the gradient at its output) × (its "
                            "input): is either of them zero?")
            if init == "llama-pro" and step == 0 and got == everything - {o, down}:
                raise Wrong(f"{case}: the other way round — a zeroed matrix's weight gradient is (the gradient at its "
                            "output) × (its input); what does a zero matrix pass back to the parameters before it?")
            if init == "llama-pro" and step == 1 and got == {o, down}:
                raise Wrong(f"{case}: after one step, are o_proj and down_proj still zero?")
            if init == "zeros" and got:
                raise Wrong(f"{case}: with every weight zero, look at each matrix's input and at the gradient arriving "
                            "at its output")
            if init == "copy":
                raise Wrong(f"{case}: a plain copy — is anything in it zero?")
            raise Wrong(f"{case}: not the parameters that get a gradient — trace where a zero input, a zero matrix "
                        "or a zero gain stops it (SiLU(0) = 0; a softmax of equal scores is uniform)")
    return "matches the gradients measured on a grown model for 4 inits at steps 0 and 1"


# ---------------------------------------------------------------- lab 10: capstone, a real model in your functions


CAPSTONE_CONFIGS = {
    "SmolLM2's shape, small (GQA 3:1, tied, theta 100000)":
        dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, intermediate_size=128, num_attention_heads=6,
             num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "Llama-2's shape, small (no GQA, untied, eps 0.01)":
        dict(vocab_size=80, hidden_size=32, num_hidden_layers=3, intermediate_size=88, num_attention_heads=4,
             num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-2, tie_word_embeddings=False),
    "an odd one (GQA 2:1, theta 500000)":
        dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def _capstone_model(config: dict, seed: int):
    _seeded(seed)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=64, **config))
    return _randomise(model, std=0.15).eval()


def _capstone_mistake(model, ids, *, theta=None, eps=None, final_norm=True) -> torch.Tensor:
    """deepen.llama's forward of `model` with one thing done wrong."""
    ours = llama.Llama.from_hf(model)
    if theta is not None:
        ours.config = ours.config.replace(rope_theta=theta)
    for module in ours.modules():
        if eps is not None and isinstance(module, llama.RMSNorm):
            module.eps = eps
    if not final_norm:
        ours.norm = nn.Identity()
    with torch.no_grad():
        return ours.eval()(ids)


def check_capstone(logits) -> Result:
    """logits(state, config, input_ids) -> the logits (batch, seq, vocab) of the transformers Llama whose state_dict
    is `state` and whose LlamaConfig is `config`, computed by your own functions; against the model itself."""
    return _check("capstone", _capstone, logits)


def _capstone(logits) -> str:
    worst = 0.0
    for k, (name, config) in enumerate(CAPSTONE_CONFIGS.items()):
        model = _capstone_model(config, seed=k)
        ids = torch.randint(0, config["vocab_size"], (2, 9), generator=_seeded(k))
        with torch.no_grad():
            want = model(ids).logits
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        got = _as_tensor(_call(logits, state, copy.deepcopy(model.config), ids.clone()))
        theta = "RoPE theta written in as 10000: read config.rope_parameters['rope_theta']"
        mistakes = {theta: _capstone_mistake(model, ids, theta=1e4),
                    "RMSNorm eps written in: read config.rms_norm_eps": _capstone_mistake(model, ids, eps=1e-6),
                    "the final norm (model.norm) before the head is missing": _capstone_mistake(model, ids,
                                                                                               final_norm=False)}
        if config["rope_theta"] == 1e4:
            mistakes.pop(theta)
        if config["rms_norm_eps"] == 1e-6:
            mistakes.pop("RMSNorm eps written in: read config.rms_norm_eps")
        worst = max(worst, _compare(got, want, ("batch", "seq", "vocab"), mistakes, f" ({name})"))
    return f"equals transformers' LlamaForCausalLM on {len(CAPSTONE_CONFIGS)} shapes (max error {worst:.2g})"


# ---------------------------------------------------------------- what each exercise must not just call

# deepen's own implementation of each exercise: an answer that calls one of these does not pass (deepen grade
# watches the calls the answer makes while its check runs). Modules deepen's exercises hand in (an attention
# block's projections, a block's norms) stay usable.
IMPLEMENTS = {
    "rmsnorm": ("deepen.llama:RMSNorm.forward",),
    "rope": ("deepen.llama:apply_rope", "deepen.llama:rope", "deepen.llama:rotate_half"),
    "attention": ("deepen.llama:Attention.forward",),
    "swiglu": ("deepen.llama:MLP.forward",),
    "block": ("deepen.llama:Block.forward",),
    "llama_pro_plan": ("deepen.plan:llama_pro", "deepen.plan:build"),
    "zero_init": ("deepen.grow:zero_output_projections", "deepen.grow:grow"),
    "dus_plan": ("deepen.plan:dus", "deepen.plan:idus", "deepen.plan:build"),
    "new_layers": ("deepen.plan:_mark_new", "deepen.plan:Plan.new_layers"),
    "freeze": ("deepen.trainable:select_trainable",),
    "train_step": ("deepen.loop:train_step", "deepen.loop:train_steps"),
    "dpo_loss": ("deepen.objectives:dpo_loss",),
    "slerp": ("deepen.merge:slerp", "deepen.merge:merge_tensor", "deepen.merge:lerp"),
    "param_count": ("deepen.budget:shape_of", "deepen.budget:meta_model", "deepen.budget:budget"),
    "train_flops": ("deepen.budget:training_flops",),
    "state_memory": ("deepen.budget:state_bytes", "deepen.budget:memory"),
    "seam_cosine": ("deepen.checks:_seam", "deepen.checks:_cosine"),
    "choose_m": ("deepen.checks:_seam", "deepen.checks:_cosine"),
    "lora_params": ("deepen.budget:lora_params", "deepen.budget:shape_of", "deepen.checks:_lora_count"),
    "matching_rank": ("deepen.reproduce:lora_rank", "deepen.budget:lora_params", "deepen.budget:shape_of"),
    "forgetting_and_gain": ("deepen.runs:RunResult.forgetting", "deepen.runs:RunResult.gain",
                            "deepen.runs:RunResult.summary"),
    "gets_gradient": ("deepen.checks:_new_block_gradients", "deepen.grow:grow", "deepen.grow:zero_output_projections"),
    "capstone": ("deepen.llama:Llama.forward", "deepen.llama:Block.forward", "deepen.llama:Attention.forward",
                 "deepen.llama:MLP.forward", "deepen.llama:RMSNorm.forward", "deepen.llama:apply_rope",
                 "deepen.llama:rope", "deepen.checks:_capstone_mistake",
                 *(f"transformers.models.llama.modeling_llama:{name}" for name in (
                     "LlamaForCausalLM.forward", "LlamaModel.forward", "LlamaDecoderLayer.forward",
                     "LlamaAttention.forward", "LlamaMLP.forward", "LlamaRMSNorm.forward",
                     "LlamaRotaryEmbedding.forward", "apply_rotary_pos_emb"))),
}


# ---------------------------------------------------------------- the registry


def results() -> list[dict]:
    """Every check run in this kernel, in order, as dicts (name, status, feedback)."""
    return [asdict(r) for r in RESULTS.values()]


def passed(*names: str) -> bool:
    """True when each named check has run and passed (a lab runs its extras only then)."""
    return all(name in RESULTS and RESULTS[name].status == "pass" for name in names)


SUMMARY_WIDTH = 100  # characters per line of summary(): one line each in a notebook's output, unwrapped


def _first_line(feedback: str, width: int = 100) -> str:
    """A reason's first line, shortened at a word (never mid-word) when it is long."""
    return textwrap.shorten((feedback.splitlines() or [""])[0], width, placeholder=" ...")


def summary() -> None:
    """Print the table of this kernel's results: one line per exercise."""
    if not RESULTS:
        text = "no checks have run yet"
    else:
        width = max(len(name) for name in RESULTS)
        room = SUMMARY_WIDTH - (width + 14)  # what the mark, name and status leave of the line for the reason
        lines = [f"{MARKS[r.status]} {r.name:<{width}}  {r.status:<8}  {_first_line(r.feedback, room)}"
                 for r in RESULTS.values()]
        done = sum(r.status == "pass" for r in RESULTS.values())
        text = "\n".join(lines + [f"{done} of {len(RESULTS)} exercises pass"])
    print(text)


def emit() -> None:
    """Print the results as one JSON line for `deepen grade`."""
    print(RESULTS_MARKER + json.dumps(results()))
