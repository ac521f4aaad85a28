import json
from pathlib import Path

import pytest
import torch
import yaml

from deepen import budget as B
from deepen.config import RunConfig, load_config, merged
from deepen.widgets import (NO_RUNS, attention_explorer, method_label, plan_explorer, results_explorer, rope_scores,
                            runs_folder, setting_label)

ROOT = Path(__file__).resolve().parents[1]


def test_plan_explorer_defaults_counts_and_memory_at_7b():
    explorer = plan_explorer()  # LLaMA Pro on the Llama-2-7B shape, 8 groups, 8 GPUs
    assert "32 -> 40 layers" in explorer.summary
    assert "8,357,482,496" in explorer.summary and "1,619,066,880" in explorer.summary  # the paper's counts
    assert "19.4% of the grown model" in explorer.summary
    # memory at 7B is the budget of the paper's run config, whatever the explorer's own wiring
    paper = B.budget(load_config(ROOT / "configs/llama2-7b-pro.yaml"), gpus=8, gpu_memory=80)
    assert f"{paper.memory_total / B.GB:7.1f} GB" in explorer.summary
    assert explorer._repr_mimebundle_()["text/plain"] == explorer.summary

    explorer.controls["gpus"].value = 1
    full_1 = B.budget(load_config(ROOT / "configs/llama2-7b-pro.yaml"), gpus=1, gpu_memory=80, method="full")
    assert f"{full_1.memory_total / B.GB:7.1f} GB  does not fit" in explorer.summary

    explorer.controls["shape"].value = "toy"  # 8 layers
    explorer.controls["groups"].value = 2
    assert explorer.plan.n_layers == 10 and "8 -> 10 layers" in explorer.summary
    explorer.controls["groups"].value = 3
    assert explorer.plan is None and explorer.summary.startswith("no plan: groups=3")
    explorer.controls["method"].value = "dus"  # the drop slider offers only what 8 layers allow: 0 .. 3
    assert explorer.controls["drop"].max == 3 and explorer.controls["drop"].value == 3
    assert explorer.plan.n_layers == 10  # [0, 5) + [3, 8)
    explorer.controls["shape"].value = "llama2-7b"
    assert explorer.controls["drop"].max == 15 and explorer.controls["group"].max == 16


@pytest.fixture(scope="module")
def attention():
    return attention_explorer()  # the tiny English base on the default sentence


def test_attention_explorer_default_and_controls(attention):
    n = len(attention.tokens)
    c = attention.config
    assert attention.weights.shape == (c.n_layers, c.n_heads, n, n)
    assert torch.allclose(attention.weights.sum(-1), torch.ones(c.n_layers, c.n_heads, n))  # softmax rows
    assert attention.weights.triu(1).abs().max() == 0  # causal: nothing read from later tokens
    lines = attention.summary.splitlines()
    assert lines[1] == f"block {c.n_layers // 2}, head 0: the token each token attends to most (weight)"
    pattern = attention.weights[c.n_layers // 2, 0]
    j = pattern[-1].argmax().item()
    assert lines[1 + n] == f"  {attention.tokens[-1]!r:>14} -> {attention.tokens[j]!r:<14} {pattern[-1, j]:.2f}"
    assert attention.figure is not None and "image/png" in attention._repr_mimebundle_()

    before, figure = attention.summary, attention.figure
    attention.controls["head"].value = 1
    assert attention.summary != before and attention.figure is not figure
    assert "head 1" in attention.figure.axes[0].get_title()

    attention.controls["distance"].value = 40
    assert len(attention.rope) == 4 * 40 + 1 and "at distance 40" in attention.summary
    notes = [t.get_text() for t in attention.figure.axes[1].texts]
    assert not any("band" in t for t in notes)  # pair 0 turns every 6.3 tokens: 160 tokens still draw as a line
    attention.controls["distance"].value = 400
    assert any("pair 0 turns once every 6.3 tokens" in t.get_text() for t in attention.figure.axes[1].texts)


def test_rope_scores_are_cosines_of_the_angles():
    every, single = rope_scores(head_dim=16, theta=10000.0, distances=50, pair=3)
    d = torch.arange(51).float()
    angle = 10000.0 ** (-2 * 3 / 16)
    torch.testing.assert_close(single, torch.cos(d * angle), atol=1e-5, rtol=0)
    torch.testing.assert_close(every[0], torch.tensor(1.0))
    assert every[1:].max() < 1  # identical q and k score highest at distance 0


def test_attention_explorer_takes_a_model_and_restores_its_attention(attention):
    from deepen.train import tiny_base

    model, tokenizer = tiny_base()
    before = model.config._attn_implementation
    explorer = attention_explorer("the king said", model=model, tokenizer=tokenizer, layer=0, head=1)
    assert model.config._attn_implementation == before
    assert explorer.summary.splitlines()[1].startswith("block 0, head 1")
    assert len(explorer.tokens) == len(tokenizer("the king said").input_ids)


def write_run(folder, method, grow, records):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "tiny-base", "method": method, "grow": grow}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def records(general, domain, losses):
    """general, domain: perplexity (before, after). Step 0 evaluates; then one record per step, the last one
    also evaluates (as deepen.train.train writes)."""
    out = [{"step": 0, "tokens": 0, "ppl_general": general[0], "ppl_domain": domain[0]}]
    for step, loss in enumerate(losses, 1):
        out.append({"step": step, "loss": loss, "lr": 1e-3, "tokens": 64 * step, "tokens_per_s": 100.0})
    out[-1].update(ppl_general=general[1], ppl_domain=domain[1])
    return out


@pytest.fixture
def two_runs(tmp_path):
    grow = {"method": "llama-pro", "groups": 2, "copies": 1, "placement": "interleave", "drop": None}
    write_run(tmp_path / "tiny" / "pro", "llama-pro", grow, records((20.0, 30.0), (1000.0, 100.0), [5.0, 4.0, 3.0]))
    write_run(tmp_path / "tiny" / "full", "full", grow, records((20.0, 60.0), (1000.0, 20.0), [5.0, 3.0, 2.5]))
    with open(tmp_path / "tiny" / "full" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a run still writing its next line
    return tmp_path


def test_results_explorer_final_numbers(two_runs):
    explorer = results_explorer(two_runs)
    runs = explorer.runs.set_index("run")
    assert list(runs.index) == ["tiny/full", "tiny/pro"]
    pro, full = runs.loc["tiny/pro"], runs.loc["tiny/full"]
    assert (pro["steps"], pro["tokens"], pro["loss"]) == (3, 192, 3.0)
    assert (pro["forgetting"], pro["gain"]) == (1.5, 10.0)
    assert (full["loss"], full["forgetting"], full["gain"]) == (2.5, 3.0, 50.0)
    assert pro["method"] == "llama-pro" and pro["grow"] == "llama-pro(groups=2, copies=1, placement=interleave)"
    assert pro["setting"] == "llama-pro, grow llama-pro(groups=2, copies=1, placement=interleave)"
    assert "2 of 2 runs" in explorer.summary and "tiny/pro" in explorer.summary

    assert list(explorer.data["loss"]) == [5.0, 3.0, 2.5, 5.0, 4.0, 3.0]  # loss against step, both runs
    explorer.controls["runs"].value = ("tiny/pro",)
    assert "1 of 2 runs" in explorer.summary and "tiny/full" not in explorer.summary
    explorer.controls["metric"].value = "ppl_domain"
    explorer.controls["x"].value = "tokens"
    assert list(explorer.data["tokens"]) == [0, 192] and list(explorer.data["ppl_domain"]) == [1000.0, 100.0]

    explorer.controls["runs"].value = ("tiny/full", "tiny/pro")
    explorer.controls["by"].value = "method"
    explorer.controls["view"].value = "forgetting vs gain"
    assert sorted(explorer.data["gain"]) == [10.0, 50.0] and explorer.controls["metric"].disabled
    assert explorer.figure.axes[0].get_xscale() == "log"
    legend = explorer.figure.axes[0].get_legend()
    assert legend.get_bbox_to_anchor().x0 > explorer.figure.axes[0].get_window_extent().x1  # beside, not over
    assert 'white-space:pre' in explorer.output.value  # the table never wraps a row


def test_results_explorer_without_runs(tmp_path):
    explorer = results_explorer(tmp_path / "nothing")
    assert explorer.summary == NO_RUNS.format(root=tmp_path / "nothing")
    assert "make reproduce" in explorer.summary and explorer.figure is None
    assert "image/png" not in explorer._repr_mimebundle_()


def test_setting_labels_and_the_runs_folder(tmp_path, monkeypatch):
    def config(**changes):
        return merged(RunConfig(), changes)

    assert setting_label(config(method="lora", lora={"r": 4}, grow=None)) == "lora r=4"
    assert setting_label(config(method="blocks", blocks=[3, 7])) == "blocks [3, 7]"
    assert setting_label(config(method="full", grow={"method": "dus", "drop": 2})) == "full, grow dus(drop=2)"
    assert setting_label(config(method="full", data={"domain": "general"})) == "full, on general"  # not the code run
    assert setting_label(config(method="full", data={"domain": "code"})) == "full"
    assert method_label(config(method="full", data={"domain": "general"})) == "full, on general"  # its own colour
    assert method_label(config(method="llama-pro")) == "llama-pro"
    monkeypatch.chdir(tmp_path)  # as a notebook in notebooks/: a relative folder is read from the repository
    assert runs_folder("tests") == ROOT / "tests"
    assert runs_folder("no-such-runs") == Path("no-such-runs")
