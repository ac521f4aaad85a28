"""The labs (notebooks/labs/): each check recognises the common mistakes by name, each lab passes fully with the
reference solutions (tests/labs/solutions/) filled in, and unfilled each runs to the end reporting every exercise
as not done, without a traceback."""

import copy
import csv
import json
import math
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
}


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
    capsys.readouterr()
    checks.summary()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("✓ dus_plan") and lines[1].startswith("✗ new_layers  fail")
    assert lines[-1] == "1 of 2 exercises pass"
    assert [r["status"] for r in checks.results()] == ["pass", "fail"]


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


def test_errors_in_and_outside_the_exercises_are_reported(tmp_path):
    def exercise(name, source):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata[EXERCISE] = name
        return cell

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from deepen import checks"),
        exercise("new_layers", "def new_layers(sources):\n    return ["),  # a syntax error: this exercise fails
        nbformat.v4.new_code_cell("checks.check_new_layers(new_layers)"),
        exercise("dus_plan", "def dus_layers(n_layers, drop):\n    return []"),  # graded all the same
        nbformat.v4.new_code_cell("checks.check_dus_plan(dus_layers)"),
        exercise("rmsnorm", "def my_norm(x, weight, eps):\n    return x"),  # renamed: its check cell raises
        nbformat.v4.new_code_cell("checks.check_rmsnorm(rms_norm)"),
        nbformat.v4.new_code_cell("undefined_name"),  # outside the exercises: the notebook stops
        nbformat.v4.new_code_cell("checks.check_swiglu(lambda x, mlp: x)"),
    ])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    assert main(["grade", str(path), "--out", str(tmp_path / "out")]) == 1
    rows = {r["exercise"]: (r["status"], r["feedback"]) for r in _graded(tmp_path / "out")}
    assert list(rows) == ["new_layers", "dus_plan", "rmsnorm", "swiglu", "(notebook)"]
    assert rows["new_layers"][0] == "fail" and rows["new_layers"][1].startswith(
        "the exercise cell (cell 2) raised SyntaxError")
    assert rows["dus_plan"][0] == "fail" and rows["dus_plan"][1].startswith("for n_layers=32, drop=8: expected")
    assert rows["rmsnorm"] == ("fail", "the check cell (cell 7) raised NameError: name 'rms_norm' is not defined")
    assert rows["swiglu"][0] == "not run" and "cell 8 raised NameError" in rows["swiglu"][1]
    assert rows["(notebook)"] == ("error", "cell 8 raised NameError: name 'undefined_name' is not defined")


def test_an_endless_exercise_cell_is_interrupted_and_grading_goes_on(tmp_path):
    loop = nbformat.v4.new_code_cell("def new_layers(sources):\n    return []\nwhile True:\n    pass")
    loop.metadata[EXERCISE] = "new_layers"
    plan = nbformat.v4.new_code_cell("def dus_layers(n_layers, drop):\n    return []")
    plan.metadata[EXERCISE] = "dus_plan"
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from deepen import checks"),
        loop, nbformat.v4.new_code_cell("checks.check_new_layers(new_layers)"),
        plan, nbformat.v4.new_code_cell("checks.check_dus_plan(dus_layers)"),
    ])
    path = tmp_path / "endless.ipynb"
    nbformat.write(nb, path)
    assert main(["grade", str(path), "--out", str(tmp_path / "out"), "--timeout", "5"]) == 1
    rows = {r["exercise"]: (r["status"], r["feedback"]) for r in _graded(tmp_path / "out")}
    assert list(rows) == ["new_layers", "dus_plan"]  # no "(notebook)" error: the results were read
    assert rows["new_layers"][0] == "fail" and "the exercise cell (cell 2) raised" in rows["new_layers"][1]
    assert rows["dus_plan"][0] == "fail" and rows["dus_plan"][1].startswith("for n_layers=32, drop=8: expected")
