"""The labs (notebooks/labs/): each check recognises the common mistakes by name, each lab passes fully with the
reference solutions (tests/labs/solutions/) filled in, and unfilled each runs to the end reporting every exercise
as not done, without a traceback."""

import copy
import csv
import json
import math
import re
import runpy
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from deepen import checks, llama
from deepen.cli import main
from deepen.grade import EXERCISE, exercises, fill, read_solutions, solutions_file
from deepen.plan import llama_pro

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted((ROOT / "notebooks" / "labs").glob("lab*.ipynb"))
SOLUTIONS = ROOT / "tests" / "labs" / "solutions"


def solution(lab: str, name: str):
    return runpy.run_path(str(SOLUTIONS / f"{lab}.py"))[name]


# each check with the lab and the function of the reference solution it checks
CHECKS = {
    "rmsnorm": ("lab01", "rms_norm"), "rope": ("lab01", "apply_rope"), "attention": ("lab01", "attention"),
    "swiglu": ("lab01", "swiglu"), "block": ("lab01", "block"),
    "llama_pro_plan": ("lab02", "llama_pro_layers"), "zero_init": ("lab02", "zeroed_copy"),
    "dus_plan": ("lab03", "dus_layers"), "new_layers": ("lab03", "new_layers"),
    "freeze": ("lab04", "freeze_by_manifest"), "train_step": ("lab04", "train_step"),
    "dpo_loss": ("lab05", "dpo_loss"), "slerp": ("lab05", "slerp"),
    "param_count": ("lab06", "param_count"), "train_flops": ("lab06", "train_flops"),
    "state_memory": ("lab06", "state_memory"),
    "seam_cosine": ("lab07", "seam_cosine"), "choose_m": ("lab07", "choose_m"),
    "lora_params": ("lab08", "lora_params"), "matching_rank": ("lab08", "matching_rank"),
    "forgetting_and_gain": ("lab08", "forgetting_and_gain"),
    "gets_gradient": ("lab09", "gets_gradient"),
    "capstone": ("lab10", "logits"),
}


def check(name: str, fn, **kwargs) -> checks.Result:
    return getattr(checks, f"check_{name}")(fn, **kwargs)


def test_every_check_has_a_solution_and_a_lab():
    names = {name.removeprefix("check_") for name in dir(checks) if name.startswith("check_")}
    assert names == set(CHECKS)
    in_labs = [n for lab in LABS for n in exercises(nbformat.read(lab, as_version=4))]
    assert sorted(in_labs) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_the_reference_solution_passes(name, capsys):
    result = check(name, solution(*CHECKS[name]))
    assert result.status == "pass", result.feedback
    assert capsys.readouterr().out.startswith(f"✓ {name}: pass — ")
    assert checks.passed(name)


@pytest.mark.parametrize("name", CHECKS)
def test_unfilled_is_not_done(name):
    def todo(*args):
        raise NotImplementedError

    result = check(name, todo)
    assert (result.status, result.feedback) == ("not done", "still raises NotImplementedError — fill in the cell "
                                                            "marked # TODO above")
    assert not checks.passed(name)


def test_an_error_in_the_answer_is_one_line_naming_the_line():
    def rms_norm(x, weight, eps):
        return weight * x / x.pow(2).mean(-1).sqrt()  # no keepdim: (2, 5, 64) / (2, 5) does not broadcast

    result = checks.check_rmsnorm(rms_norm)
    assert result.status == "fail"
    assert "RuntimeError" in result.feedback and "keepdim=True" in result.feedback
    assert "line" in result.feedback and "x.pow(2).mean(-1).sqrt()" in result.feedback
    assert "Traceback" not in result.feedback and "\n" not in result.feedback


def test_wrong_shape_says_expected_and_got():
    result = checks.check_rmsnorm(lambda x, weight, eps: x[..., :-1])
    assert "wrong shape: expected (2, 5, 64) (batch, seq, dim), got (2, 5, 63)" in result.feedback


def test_numerically_off_says_max_error_and_where():
    result = checks.check_rmsnorm(lambda x, weight, eps: solution("lab01", "rms_norm")(x, weight, eps) * 1.01)
    assert result.feedback.startswith("numerically off: max error ")
    assert "(batch, seq, dim): expected" in result.feedback and ", got " in result.feedback


def test_the_attention_written_out_for_the_mistakes_equals_deepen_llama():
    c, attn, x, cos, sin, want = checks._attention_case()
    with torch.no_grad():
        torch.testing.assert_close(checks._attention_by_hand(attn, x, cos, sin, c.n_heads, c.n_kv_heads), want)


def test_interleaved_rope_turns_neighbouring_pairs():
    x, theta = torch.randn(1, 8), 10000.0  # (seq, head_dim): one token at position 3
    got = checks._interleaved_rope(x, torch.tensor([3]), theta)[0]
    x = x[0]
    for i in range(4):
        angle = 3 * theta ** (-2 * i / 8)
        a, b = x[2 * i], x[2 * i + 1]
        torch.testing.assert_close(got[2 * i: 2 * i + 2], torch.stack([a * math.cos(angle) - b * math.sin(angle),
                                                                         b * math.cos(angle) + a * math.sin(angle)]))


# ---------------------------------------------------------------- every named mistake, recognised


def _attention_with(**mistake):
    def attention(x, attn, cos, sin, n_heads, n_kv_heads):
        return checks._attention_by_hand(attn, x, cos, sin, n_heads, n_kv_heads, **mistake)

    return attention


def _attention_not_repeated(x, attn, cos, sin, n_heads, n_kv_heads):
    batch, seq, _ = x.shape
    q = attn.q_proj(x).view(batch, seq, n_heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, n_kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, n_kv_heads, -1).transpose(1, 2)
    q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no enable_gqa, no repeat: 4 vs 2 heads
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def _zeroing(*parts, in_place=False):
    def zeroed_copy(block):
        new = block if in_place else copy.deepcopy(block)
        with torch.no_grad():
            for name, p in new.named_parameters():
                if any(part in name for part in parts):
                    p.zero_()
        return new

    return zeroed_copy


def _freezing(learn):
    def freeze(model, manifest):
        for name, p in model.named_parameters():
            p.requires_grad_(learn(name, manifest["new_layers"]))

    return freeze


def _block_index(name):
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def _step(labels="same", zero_grad=True, step=True):
    def train_step(model, batch, optimizer):
        if labels == "shifted":
            loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if step:
            optimizer.step()
        if zero_grad:
            optimizer.zero_grad()
        return loss.item()

    return train_step


def _halves(x, positions, theta):
    return solution("lab01", "apply_rope")(x, positions, theta)


MISTAKES = {
    "LayerNorm instead of RMSNorm": (
        "rmsnorm", lambda x, weight, eps: weight * F.layer_norm(x, x.shape[-1:], eps=eps), {}, "this is LayerNorm"),
    "RMSNorm without the gain": (
        "rmsnorm", lambda x, weight, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), {},
        "the gain is missing"),
    "RMSNorm without eps": (
        "rmsnorm", lambda x, weight, eps: weight * x / x.pow(2).mean(-1, keepdim=True).sqrt(), {}, "eps is missing"),
    "RoPE pairs interleaved instead of halves": (
        "rope", lambda x, positions, theta: checks._interleaved_rope(x, positions, theta), {},
        "pairs interleaved instead of halves"),
    "RoPE pairs halves instead of interleaved": (
        "rope", _halves, {"layout": "interleaved"}, "pairs taken as halves instead of interleaved"),
    "RoPE rotated backwards": (
        "rope", lambda x, positions, theta: _halves(x, -positions, theta), {}, "rotated the wrong way"),
    "RoPE exponent without the 2": (
        "rope", lambda x, positions, theta: _halves(x, positions, theta ** 0.5), {}, "the 2 is missing"),
    "RoPE positions from 1": (
        "rope", lambda x, positions, theta: _halves(x, positions + 1, theta), {}, "positions start at 1"),
    "k/v heads not repeated": ("attention", _attention_not_repeated, {}, "k/v heads not repeated"),
    "k/v heads tiled (repeat instead of repeat_interleave)": (
        "attention", _attention_with(repeat="tile"), {}, "k/v heads repeated in the wrong order"),
    "head_dim written in as a number": (
        "attention", lambda x, attn, cos, sin, n_heads, n_kv_heads: checks._attention_by_hand(
            attn, x, cos, sin, n_heads, n_kv_heads, scale=0.25), {}, "is a size written in as a number?"),
    "causal mask sees the next token": ("attention", _attention_with(mask="sees next"), {}, "causal mask off by one"),
    "causal mask hides the diagonal": ("attention", _attention_with(mask="hides self"), {}, "causal mask off by one"),
    "no causal mask": ("attention", _attention_with(mask="none"), {}, "no causal mask"),
    "scores not scaled": ("attention", _attention_with(scale=1.0), {}, "scores not scaled"),
    "RoPE on q only": ("attention", _attention_with(rope="q"), {}, "RoPE applied to q only"),
    "heads split without a transpose": ("attention", _attention_with(split="view"), {}, "heads split the wrong way"),
    "heads merged without a transpose": (
        "attention", _attention_with(merge="reshape"), {}, "heads merged the wrong way"),
    "SiLU on up_proj": (
        "swiglu", lambda x, mlp: mlp.down_proj(F.silu(mlp.up_proj(x)) * mlp.gate_proj(x)), {},
        "SiLU on the wrong projection"),
    "SwiGLU without down_proj": (
        "swiglu", lambda x, mlp: F.silu(mlp.gate_proj(x)) * mlp.up_proj(x), {}, "down_proj not applied"),
    "post-norm block": (
        "block", lambda x, b, cos, sin: (lambda h: b.mlp_norm(h + b.mlp(h)))(b.attn_norm(x + b.attn(x, cos, sin))),
        {}, "post-norm"),
    "parallel block": (
        "block", lambda x, b, cos, sin: x + b.attn(b.attn_norm(x), cos, sin) + b.mlp(b.mlp_norm(x)), {},
        "the MLP reads x instead of h"),
    "LLaMA Pro copies all on top": (
        "llama_pro_plan", lambda n, groups: llama_pro(n, groups, placement="top").sources, {}, "at the top"),
    "LLaMA Pro groups and group size swapped": (
        "llama_pro_plan", lambda n, groups: llama_pro(n, n // groups).sources, {}, "groups and group size swapped"),
    "down_proj left unzeroed": ("zero_init", _zeroing("o_proj"), {}, "down_proj left unzeroed"),
    "o_proj left unzeroed": ("zero_init", _zeroing("down_proj"), {}, "o_proj left unzeroed"),
    "norm weights zeroed": ("zero_init", _zeroing("o_proj", "down_proj", "layernorm"), {}, "norm weights zeroed"),
    "every weight zeroed": ("zero_init", _zeroing(""), {}, "every weight zeroed"),
    "original zeroed in place": ("zero_init", _zeroing("o_proj", "down_proj", in_place=True), {}, "in place"),
    "DUS copies in the wrong order": (
        "dus_plan", lambda n, m: list(range(m, n)) + list(range(n - m)), {}, "wrong order"),
    "DUS off by one": (
        "dus_plan", lambda n, m: list(range(n - m + 1)) + list(range(m - 1, n)), {}, "off by one"),
    "new layers as base indices": (
        "new_layers", lambda sources: [sources[i] for i in solution("lab03", "new_layers")(sources)], {},
        "base-layer indices"),
    "frozen blocks still receive gradients": (
        "freeze", _freezing(lambda name, new: _block_index(name) in new or _block_index(name) == 0), {},
        "frozen blocks 0 still receive gradients"),
    "new blocks off by one": (
        "freeze", _freezing(lambda name, new: _block_index(name) in [i - 1 for i in new]), {}, "off by one"),
    "embeddings still trained": (
        "freeze", _freezing(lambda name, new: _block_index(name) in new or "embed" in name), {},
        "model.embed_tokens.weight still receive gradients"),
    "model.eval() as freezing": ("freeze", lambda model, manifest: model.eval(), {}, "model.eval() does not freeze"),
    "gradients never cleared": ("train_step", _step(zero_grad=False), {}, "optimizer.zero_grad()"),
    "labels shifted twice": ("train_step", _step(labels="shifted"), {}, "labels shifted twice"),
    "no optimizer step": ("train_step", _step(step=False), {}, "optimizer.step()"),
    "DPO without the reference": (
        "dpo_loss", lambda c, r, rc, rr, beta: -F.logsigmoid(beta * (c - r)).mean(), {}, "reference is not subtracted"),
    "DPO chosen and rejected swapped": (
        "dpo_loss", lambda c, r, rc, rr, beta: -F.logsigmoid(beta * ((r - rr) - (c - rc))).mean(), {}, "swapped"),
    "DPO summed": ("dpo_loss", lambda c, r, rc, rr, beta: -F.logsigmoid(beta * ((c - rc) - (r - rr))).sum(), {},
                   "take the mean"),
    "DPO one loss per pair": ("dpo_loss", lambda c, r, rc, rr, beta: -F.logsigmoid(beta * ((c - rc) - (r - rr))), {},
                              "one loss per pair"),
    "DPO log of sigmoid": (
        "dpo_loss", lambda c, r, rc, rr, beta: -torch.log(torch.sigmoid(beta * ((c - rc) - (r - rr)))).mean(), {},
        "use torch.nn.functional.logsigmoid"),
    "SLERP as a line": ("slerp", lambda a, b, t: (1 - t) * a + t * b, {}, "linear interpolation"),
    "SLERP the wrong way": ("slerp", lambda a, b, t: solution("lab05", "slerp")(a, b, 1 - t), {}, "the wrong way"),
    "SLERP of the directions": (
        "slerp", lambda a, b, t: (lambda m: m / m.norm())(solution("lab05", "slerp")(a, b, t)), {}, "unit sphere"),
    "SLERP without a fallback": ("slerp", lambda a, b, t: _slerp_always(a, b, t), {}, "fall back to linear"),
    "parameters without GQA": (
        "param_count", lambda v, h, n, i, heads, kv, tied: solution("lab06", "param_count")(v, h, n, i, heads, heads,
                                                                                          tied), {}, "grouped-query"),
    "parameters without norms": (
        "param_count", lambda v, h, n, i, heads, kv, tied: solution("lab06", "param_count")(v, h, n, i, heads, kv, tied)
        - (2 * n + 1) * h, {}, "RMSNorm weights are missing"),
    "parameters with a tied head counted": (
        "param_count", lambda v, h, n, i, heads, kv, tied: solution("lab06", "param_count")(v, h, n, i, heads, kv,
                                                                                          False), {}, "tied"),
    "parameters of a two-matrix MLP": (
        "param_count", lambda v, h, n, i, heads, kv, tied: solution("lab06", "param_count")(v, h, n, i, heads, kv, tied)
        - n * h * i, {}, "three matrices"),
    "parameters as a string": ("param_count", lambda *shape: "6.7B", {}, "expected a parameter count, a number"),
    "FLOPs 6N everywhere": ("train_flops", lambda matmul, trainable: 6 * sum(matmul), {}, "6 FLOPs per parameter"),
    "FLOPs without the backward through frozen stages": (
        "train_flops", lambda matmul, trainable: sum(2 * p + (4 * p if t else 0) for p, t in zip(matmul, trainable)),
        {}, "the gradient must pass through"),
    "FLOPs per multiply-add": (
        "train_flops", lambda matmul, trainable: solution("lab06", "train_flops")(matmul, trainable) / 2, {},
        "a multiply and an add"),
    "optimizer state not sharded": ("state_memory", lambda n, gpus: 16 * n / 1e9, {}, "not divided over the GPUs"),
    "optimizer state of the moments only": ("state_memory", lambda n, gpus: 8 * n / gpus / 1e9, {}, "two moments"),
    "optimizer state in GiB": ("state_memory", lambda n, gpus: 16 * n / gpus / 2 ** 30, {}, "GiB"),
}


def _seam_with(seam=0, seen=0, first=False, flat=False):
    """A student's seam cosine with one mistake: the seam's or the seen stream's index moved, token 0 kept, or one
    cosine of the flattened tensors."""
    def seam_cosine(hidden, m):
        a, b = hidden[len(hidden) - 1 - m + seam], hidden[m + seen]
        if not first:
            a, b = a[:, 1:], b[:, 1:]
        if flat:
            return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        return F.cosine_similarity(a, b, dim=-1).mean().item()

    return seam_cosine


def _choose_with(pick=min, upto_half=False, shift=0, cosine=False, from_zero=False):
    def choose_m(hidden, threshold):
        n = len(hidden) - 1
        last = n // 2 + 1 if upto_half else (n + 1) // 2
        seams = {m: solution("lab07", "seam_cosine")(hidden, m) for m in range(0 if from_zero else 1, last)}
        reaching = [m for m, c in seams.items() if c >= threshold]
        if not reaching:
            return None
        m = pick(reaching)
        return seams[m] if cosine else m + shift

    return choose_m


def _choose_from_the_top(hidden, threshold):
    """Assumes the seam grows with m: scans down from the largest m and stops at the first that misses."""
    n, chosen = len(hidden) - 1, None
    for m in reversed(range(1, (n + 1) // 2)):
        if solution("lab07", "seam_cosine")(hidden, m) < threshold:
            break
        chosen = m
    return chosen


def _gradients_with(case: tuple, answer: list):
    """The reference prediction, wrong for one (init, step)."""
    def gets_gradient(init, step):
        return answer if (init, step) == case else solution("lab09", "gets_gradient")(init, step)

    return gets_gradient


def _capstone_with(old: str, new: str):
    """The reference capstone with one line of its source rewritten, as a student might have written it."""
    source = (SOLUTIONS / "lab10.py").read_text()
    assert old in source
    namespace = {}
    exec(compile(source.replace(old, new), "<exercise capstone>", "exec"), namespace)
    return namespace["logits"]


_PRO = [n for n in checks.BLOCK_PARAMETERS if n not in ("self_attn.o_proj.weight", "mlp.down_proj.weight")]

MISTAKES.update({
    "seam one layer early": ("seam_cosine", _seam_with(seam=-1), {}, "hidden[L - m - 1] is the input"),
    "seen stream one layer early": ("seam_cosine", _seam_with(seen=-1), {}, "not hidden[m - 1]"),
    "seam as hidden[-m]": ("seam_cosine", _seam_with(seam=1), {}, "hidden[-m] is hidden[L + 1 - m]"),
    "seam with token 0": ("seam_cosine", _seam_with(first=True), {}, "token 0 included"),
    "seam of flattened tensors": ("seam_cosine", _seam_with(flat=True), {}, "one cosine of the flattened tensors"),
    "the largest m": ("choose_m", _choose_with(pick=max), {}, "the largest m that reaches"),
    "m = L/2 allowed": ("choose_m", _choose_with(upto_half=True), {}, "m = L/2 gives 2(L - m) = L layers"),
    "m off by one": ("choose_m", _choose_with(shift=-1), {}, "off by one"),
    "the cosine instead of m": ("choose_m", _choose_with(cosine=True), {}, "returned the cosine"),
    "LoRA as a full matrix": ("lora_params", lambda shapes, r: sum(r * i * o for i, o in shapes), {}, "a full matrix"),
    "LoRA's A only": ("lora_params", lambda shapes, r: sum(r * i for i, o in shapes), {}, "only A"),
    "LoRA r squared": ("lora_params", lambda shapes, r: r * r * len(shapes), {}, "r² per layer"),
    "rank rounded down": (
        "matching_rank", lambda shapes, target: max(1, target // sum(i + o for i, o in shapes)), {}, "rounded down"),
    "rank rounded up": (
        "matching_rank", lambda shapes, target: -(-target // sum(i + o for i, o in shapes)), {}, "rounded up"),
    "rank 0 allowed": (
        "matching_rank", lambda shapes, target: round(target / sum(i + o for i, o in shapes)), {}, "a rank of 0"),
    "rank of one block": (
        "matching_rank", lambda shapes, target: max(1, round(target / sum(i + o for i, o in shapes[:7]))), {},
        "one block's adapters"),
    "gain and forgetting swapped": (
        "forgetting_and_gain", lambda base, end: solution("lab08", "forgetting_and_gain")(base, end)[::-1], {},
        "return forgetting first"),
    "forgetting upside down": (
        "forgetting_and_gain", lambda base, end: (base["general"] / end["general"], base["domain"] / end["domain"]), {},
        "forgetting upside down"),
    "gain upside down": (
        "forgetting_and_gain", lambda base, end: (end["general"] / base["general"], end["domain"] / base["domain"]), {},
        "gain upside down"),
    "differences of perplexities": (
        "forgetting_and_gain", lambda base, end: (end["general"] - base["general"], base["domain"] - end["domain"]),
        {}, "differences, not ratios"),
    "zeroed matrices get no gradient": (
        "gets_gradient", _gradients_with(("llama-pro", 0), _PRO), {}, "the other way round"),
    "zeroed matrices stay the only ones": (
        "gets_gradient", _gradients_with(("llama-pro", 1), ["self_attn.o_proj.weight", "mlp.down_proj.weight"]), {},
        "are o_proj and down_proj still zero"),
    "an all-zero block learns": (
        "gets_gradient", _gradients_with(("zeros", 0), ["mlp.down_proj.weight"]), {}, "look at each matrix's input"),
    "the MLP norm learns with zero gains": (
        "gets_gradient",
        _gradients_with(("zero-norms", 0), ["input_layernorm.weight", "post_attention_layernorm.weight"]),
        {}, "not the parameters that get a gradient"),
    "nothing learns in LLaMA Pro's block": (
        "gets_gradient", _gradients_with(("llama-pro", 0), []), {}, "a zero matrix still gets a weight gradient"),
    "m = 0 allowed": ("choose_m", _choose_with(from_zero=True), {}, "m = 0 is plain stacking"),
    "m scanned down from the top": ("choose_m", _choose_from_the_top, {}, "expected m = "),
    "gradients as one string": ("gets_gradient", lambda init, step: "mlp.down_proj.weight", {},
                                "return a list of parameter names"),
    "gradients under other names": ("gets_gradient", lambda init, step: ["o_proj"], {}, "not a parameter of a block"),
    "capstone with theta written in": (
        "capstone", _capstone_with('theta = config.rope_parameters["rope_theta"]', "theta = 10000.0"), {},
        "RoPE theta written in"),
    "capstone with eps written in": (
        "capstone",
        _capstone_with("head_dim, eps = hidden // heads, config.rms_norm_eps", "head_dim, eps = hidden // heads, 1e-6"),
        {}, "RMSNorm eps written in"),
    "capstone without the final norm": (
        "capstone", _capstone_with('return rms_norm(h, state["model.norm.weight"], eps) @ head.T', "return h @ head.T"),
        {}, "the final norm"),
})


def _rope_ignoring_positions(x, positions, theta):
    """Right but for `positions`: it rotates by 0, 1, 2, ... whatever it is given."""
    return llama.apply_rope(x, *llama.rope(torch.arange(x.shape[-2]), x.shape[-1], theta))


def _freeze_by_substring(model, manifest):
    """Right but for how it finds a block: `f"layers.{i}"` in the name also matches layers.1x for i = 1."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(f"layers.{i}" in name for i in manifest["new_layers"]))


MISTAKES.update({
    "rope ignoring positions": ("rope", _rope_ignoring_positions, {}, "`positions` ignored"),
    "freeze matching a prefix": ("freeze", _freeze_by_substring, {}, "as a substring also catches layers.1"),
})


def _slerp_always(a, b, t):
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()
    theta = math.acos(min(1.0, cos))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_common_mistake_is_named(mistake):
    name, wrong, kwargs, words = MISTAKES[mistake]
    result = check(name, wrong, **kwargs)
    assert result.status == "fail"
    assert words in result.feedback, result.feedback
    assert "Traceback" not in result.feedback


def test_rope_layout_must_be_known():
    with pytest.raises(ValueError, match="layout='meta' is not one of halves, interleaved"):
        checks.check_rope(_halves, layout="meta")


def test_summary_lists_every_result(capsys):
    checks.RESULTS.clear()
    checks.check_dus_plan(solution("lab03", "dus_layers"))
    checks.check_new_layers(lambda sources: [])
    checks.check_forgetting_and_gain(lambda base, end: (base["general"] / end["general"], 1.0))  # a long reason
    capsys.readouterr()
    checks.summary()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("✓ dus_plan") and lines[1].startswith("✗ new_layers           fail")
    assert lines[2].startswith("✗ forgetting_and_gain  fail") and lines[2].endswith(" ...")  # shortened
    assert lines[-1] == "1 of 3 exercises pass"
    assert all(len(line) <= checks.SUMMARY_WIDTH for line in lines), lines  # unwrapped in a notebook's output
    assert [r["status"] for r in checks.results()] == ["pass", "fail", "fail"]
    long = "the answer has the right shape but its values differ from the reference everywhere past position " * 3
    assert checks._first_line(long).endswith(" position ...") and len(checks._first_line(long)) <= 100  # at a word


# ---------------------------------------------------------------- grading notebooks


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_solutions_fill_every_exercise_cell(lab):
    nb = nbformat.read(lab, as_version=4)
    cells = [c for c in nb.cells if c.metadata.get(EXERCISE)]
    assert [c.metadata[EXERCISE] for c in cells] == exercises(nb)  # each exercise cell comes before its check
    assert all("# TODO" in c.source and "raise NotImplementedError" in c.source for c in cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # handed out unexecuted
    filled = fill(nb, solutions_file(lab, SOLUTIONS))
    assert [c.source for c in filled.cells if c.metadata.get(EXERCISE)] == \
        [code.rstrip("\n") for code in read_solutions(solutions_file(lab, SOLUTIONS)).values()]
    assert nb.cells[0].source == filled.cells[0].source and "NotImplementedError" in cells[0].source  # nb untouched


def test_solutions_for_another_lab_are_refused():
    nb = nbformat.read(LABS[0], as_version=4)
    with pytest.raises(ValueError, match="do not match the notebook's exercise cells"):
        fill(nb, SOLUTIONS / "lab02.py")


def _graded(out: Path) -> list[dict]:
    report = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        assert list(csv.DictReader(f)) == report["results"]
    assert report["passed"] == all(r["status"] == "pass" for r in report["results"])
    return report["results"]


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_a_lab_filled_with_its_solutions_passes(lab, tmp_path, capsys):
    assert main(["grade", str(lab), "--fill-from", str(SOLUTIONS), "--out", str(tmp_path)]) == 0
    rows = _graded(tmp_path)
    expected = exercises(nbformat.read(lab, as_version=4))
    assert [(r["exercise"], r["status"]) for r in rows] == [(name, "pass") for name in expected]
    assert f"{len(expected)} of {len(expected)} pass" in capsys.readouterr().out


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.stem)
def test_an_unfilled_lab_runs_to_the_end_and_reports_not_done(lab, tmp_path):
    assert main(["grade", str(lab), "--out", str(tmp_path)]) == 1
    rows = _graded(tmp_path)
    expected = exercises(nbformat.read(lab, as_version=4))
    assert [(r["notebook"], r["exercise"]) for r in rows] == [(str(lab), name) for name in expected]  # no error row
    assert {r["status"] for r in rows} == {"not done"}
    assert not any("Traceback" in r["feedback"] for r in rows)


def submission(tmp_path, lab: str, answers: dict[str, str], strip_metadata: bool = False, name: str | None = None):
    """A copy of a pristine lab with some exercise cells answered (a None answer deletes that cell)."""
    path = next(p for p in LABS if p.stem.startswith(lab))
    nb = nbformat.read(path, as_version=4)
    kept = []
    for cell in nb.cells:
        exercise = cell.metadata.get(EXERCISE)
        if exercise in answers:
            if answers[exercise] is None:
                continue
            cell.source = answers[exercise]
        if strip_metadata:
            cell.metadata.pop(EXERCISE, None)
        kept.append(cell)
    nb.cells = kept
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / (name or path.name)
    nbformat.write(nb, out)
    return out


def grade_rows(tmp_path, *notebooks, timeout=600) -> dict:
    assert main(["grade", *map(str, notebooks), "--out", str(tmp_path / "out"), "--timeout", str(timeout)]) in (0, 1)
    return {r["exercise"]: (r["status"], r["feedback"]) for r in _graded(tmp_path / "out")}


def graded_tricks(tmp_path, lab: str, exercise: str, tricks: dict) -> dict:
    """{trick: (status, feedback)}: each trick's source as the answer to `exercise` of `lab`, graded in one call."""
    notebooks = {trick: submission(tmp_path / str(i), lab, {exercise: source})
                 for i, (trick, source) in enumerate(tricks.items())}
    assert main(["grade", *map(str, notebooks.values()), "--out", str(tmp_path / "out")]) in (0, 1)
    rows = {r["notebook"]: (r["status"], r["feedback"]) for r in _graded(tmp_path / "out") if r["exercise"] == exercise}
    return {trick: rows[str(path)] for trick, path in notebooks.items()}


def test_errors_in_an_exercise_fail_that_exercise_only(tmp_path):
    lab = submission(tmp_path, "lab03", {"new_layers": "def new_layers(sources):\n    return [",  # does not parse
                                         "dus_plan": "def dus_layers(n_layers, drop):\n    return []"})
    rows = grade_rows(tmp_path, lab)
    assert list(rows) == ["dus_plan", "new_layers"]
    assert rows["dus_plan"][0] == "fail" and rows["dus_plan"][1].startswith("for n_layers=32, drop=8: expected")
    assert rows["new_layers"][0] == "fail" and "does not parse: SyntaxError" in rows["new_layers"][1]
    renamed = submission(tmp_path, "lab01", {"rmsnorm": "def my_norm(x, weight, eps):\n    return x"})
    rows = grade_rows(tmp_path, renamed)
    assert rows["rmsnorm"] == ("fail", "defines no `rms_norm`: the lab checks checks.check_rmsnorm(rms_norm); keep "
                                       "the function's name")
    assert rows["rope"][0] == "not done"  # the others still graded


def test_an_endless_exercise_is_stopped_and_grading_goes_on(tmp_path):
    lab = submission(tmp_path, "lab03", {
        "new_layers": "def new_layers(sources):\n    while True:\n        pass",
        "dus_plan": "def dus_layers(n_layers, drop):\n    return list(range(n_layers - drop)) + list(range(drop, n_layers))"})
    rows = grade_rows(tmp_path, lab, timeout=5)
    assert rows["dus_plan"][0] == "pass"
    assert rows["new_layers"] == ("fail", "the check of your function ran past the --timeout of 5 s")


def test_an_answer_that_writes_a_lot_is_still_graded(tmp_path):
    """Megabytes on stdout and stderr fill no pipe: the grader neither hangs nor loses the verdicts."""
    lab = submission(tmp_path, "lab03", {
        "new_layers": "import sys\nsys.stderr.write('x' * 3_000_000)\nprint('y' * 3_000_000)\n"
                      "def new_layers(sources):\n    return []",
        "dus_plan": "def dus_layers(n_layers, drop):\n    return list(range(n_layers - drop)) + list(range(drop, n_layers))"})
    rows = grade_rows(tmp_path, lab, timeout=60)
    assert rows["dus_plan"][0] == "pass" and rows["new_layers"][0] == "fail"
    assert "timeout" not in rows["new_layers"][1]  # failed on its answer, not stuck writing


def test_a_grade_cannot_be_forged(tmp_path):
    """Every way to pass without doing the work that a student might try: none passes."""
    right = "def dus_layers(n_layers, drop):\n    return list(range(n_layers - drop)) + list(range(drop, n_layers))"
    forged = json.dumps([{"name": "dus_plan", "status": "pass", "feedback": "forged"}])
    tricks = {
        "a forged result printed": f"print({checks.RESULTS_MARKER!r} + {forged!r})\n"
                                   "def dus_layers(n_layers, drop):\n    return []",
        "the comparison patched": "import torch\ntorch.equal = lambda a, b: True\ntorch.allclose = lambda *a, **k: True\n"
                                  "def dus_layers(n_layers, drop):\n    return []",
        "the reporter replaced": "from deepen import checks\n"
                                 "checks._check = lambda name, body, *args: checks.Result(name, 'pass', 'faked')\n"
                                 "def dus_layers(n_layers, drop):\n    return []",
        "deepen's own plan called": "from deepen.plan import dus\n"
                                    "def dus_layers(n_layers, drop):\n    return dus(n_layers, drop).sources",
        "deepen's plan called by name": "import importlib\n"
                                        "def dus_layers(n_layers, drop):\n"
                                        "    return getattr(importlib.import_module('deepen.plan'), 'dus')(n_layers, drop).sources",
    }
    for trick, (status, feedback) in graded_tricks(tmp_path / "tricks", "lab03", "dus_plan", tricks).items():
        assert status == "fail", (trick, feedback)
        assert ("tampered" in feedback) == (trick in ("the comparison patched", "the reporter replaced")), trick
        assert ("calls deepen's own implementation" in feedback) == trick.startswith("deepen's"), (trick, feedback)
    # an edited check cell is not used: the lab's own check runs
    lab = submission(tmp_path / "edited", "lab03", {"dus_plan": "def dus_layers(n_layers, drop):\n    return []"})
    nb = nbformat.read(lab, as_version=4)
    for cell in nb.cells:
        if "check_dus_plan" in cell.source:
            cell.source = "print('✓ dus_plan: pass')"
    nbformat.write(nb, lab)
    assert grade_rows(tmp_path / "edited", lab)["dus_plan"][0] == "fail"
    # a deleted exercise cell is not done; an answer without the exercise's marking is still found
    lab = submission(tmp_path / "other", "lab03", {"dus_plan": right, "new_layers": None}, strip_metadata=True)
    rows = grade_rows(tmp_path / "other", lab)
    assert rows == {"dus_plan": rows["dus_plan"], "new_layers": rows["new_layers"]}
    assert rows["dus_plan"][0] == "pass" and rows["new_layers"][0] == "not done"


def test_the_capstone_must_not_run_a_model_of_the_libraries(tmp_path):
    """The capstone's answer has the weights and the config: building transformers' or deepen's model from them, or
    patching transformers' forward that the check compares with, does not pass."""
    tricks = {
        "transformers' model": "from transformers import LlamaForCausalLM\n"
                               "def logits(state, config, input_ids):\n"
                               "    model = LlamaForCausalLM(config)\n"
                               "    model.load_state_dict(state)\n"
                               "    return model(input_ids).logits",
        "deepen's model": "from transformers import LlamaForCausalLM\nfrom deepen.llama import Llama\n"
                          "def logits(state, config, input_ids):\n"
                          "    model = LlamaForCausalLM(config)\n"
                          "    model.load_state_dict(state)\n"
                          "    return Llama.from_hf(model)(input_ids)",
        "the reference patched": "import torch\nfrom transformers.models.llama import modeling_llama\n"
                                 "modeling_llama.LlamaModel.forward = lambda self, *a, **k: None\n"
                                 "def logits(state, config, input_ids):\n"
                                 "    return torch.zeros(*input_ids.shape, config.vocab_size)",
    }
    for trick, (status, feedback) in graded_tricks(tmp_path, "lab10", "capstone", tricks).items():
        assert status == "fail", (trick, feedback)
        expected = {"transformers' model": "calls transformers' own implementation",
                    "deepen's model": "calls deepen's own implementation",
                    "the reference patched": "tampered"}[trick]
        assert feedback.startswith(expected), (trick, feedback)


def test_a_right_answer_written_another_way_passes(tmp_path):
    """A NumPy array where a list is asked for, a generator of steps: the checks judge the values."""
    lab = submission(tmp_path, "lab03", {
        "dus_plan": "import numpy as np\ndef dus_layers(n_layers, drop):\n"
                    "    return np.concatenate([np.arange(n_layers - drop), np.arange(drop, n_layers)])",
        "new_layers": "def new_layers(sources):\n    return [i for i, s in enumerate(sources) if s in sources[:i]]"})
    rows = grade_rows(tmp_path, lab)
    assert rows["new_layers"][0] == "pass" and rows["dus_plan"][0] == "pass", rows


def test_a_submission_must_be_named_like_its_lab(tmp_path, capsys):
    lab = submission(tmp_path, "lab03", {}, name="my_homework.ipynb")
    assert main(["grade", str(lab), "--out", str(tmp_path / "out")]) == 2
    assert "answers no lab: a submission keeps the name of the lab it answers" in capsys.readouterr().err


def test_the_handout_holds_the_labs_without_solutions(tmp_path, capsys):
    assert main(["handout", str(tmp_path / "handout")]) == 0
    out = tmp_path / "handout"
    assert sorted(p.name for p in out.glob("*.ipynb")) == sorted(p.name for p in LABS)
    readme = (out / "README.md").read_text()
    points = {c.metadata[EXERCISE]: c.metadata["points"] for lab in LABS for c in nbformat.read(lab, as_version=4).cells
              if c.metadata.get(EXERCISE)}
    assert all(f"| {name} | {points[name]:g} |" in readme for name in CHECKS)  # every exercise, with its points
    assert points["capstone"] > points["dus_plan"] and len(set(points.values())) >= 3  # points follow difficulty
    solutions = [line for path in SOLUTIONS.glob("*.py") for line in read_solutions(path).values()]
    text = "".join(p.read_text() for p in out.glob("*.ipynb"))
    assert not any(code.strip() in text for code in solutions)  # no solution in what students receive
    answers = re.split(r"^## (lab\d\d-q\d+)\n", (SOLUTIONS / "written.md").read_text(), flags=re.M)[1:]
    answers = dict(zip(answers[::2], answers[1::2]))
    questions = [c.metadata["question"] for path in LABS for c in nbformat.read(path, as_version=4).cells
                 if c.metadata.get("question")]
    assert sorted(questions) == sorted(answers) and len(questions) == len(LABS)  # one per lab, each answered
    assert all(f"- {path.stem}: Written question" in readme for path in LABS)
    assert not any(answer.split(".")[0] in text + readme for answer in answers.values())  # no model answer
    assert not (out / "written.md").exists()
    assert main(["handout", str(out)]) == 2  # never over an existing folder
