"""deepen.runs: the one definition of forgetting and gain — against the base, before growing — read from run folders
that `deepen train` writes; a plan that changes the function (DUS) has its base measured before growing."""

import json

import numpy as np

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from deepen.batches import heldout_blocks
from deepen.config import load_config
from deepen.loop import perplexity
from deepen.runs import RunResult, find_runs, within_noise
from deepen.train import train


def write(folder, records, config=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(json.dumps(config or {"method": "full"}))  # JSON is YAML


def test_forgetting_and_gain_are_against_the_base(tmp_path):
    # a DUS run: growing damaged the model (step 0 worse than the base), training recovered most of it
    write(tmp_path / "dus", [
        {"step": 0, "tokens": 0, "ppl_general": 40.0, "ppl_domain": 400.0,
         "base_ppl_general": 20.0, "base_ppl_domain": 200.0},
        {"step": 1, "loss": 3.0, "lr": 1e-3, "tokens": 64, "tokens_per_s": 32.0, "ppl_general": 25.0,
         "ppl_domain": 50.0}])
    run = RunResult.read(tmp_path / "dus")
    assert run.base_measured and (run.base_general, run.base_domain) == (20.0, 200.0)
    assert (run.forgetting, run.gain) == (1.25, 4.0)  # against step 0 it would read 0.625 and 8.0
    assert (run.steps, run.tokens, run.final_loss, run.train_seconds) == (1, 64, 3.0, 2.0)
    assert "forgetting x1.25" in run.line() and "gain /4.00" in run.line()
    # a run without base numbers (grown on disk by a plan that changes the function, base not loadable)
    write(tmp_path / "old", [{"step": 0, "tokens": 0, "ppl_general": 40.0, "ppl_domain": 400.0},
                             {"step": 1, "tokens": 64, "ppl_general": 20.0, "ppl_domain": 100.0}])
    old = RunResult.read(tmp_path / "old")
    assert not old.base_measured and (old.forgetting, old.gain) == (0.5, 4.0) and "not measured" in old.line()
    assert [r.folder.name for r in find_runs(tmp_path)] == ["dus", "old"]
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        RunResult.read(tmp_path)


def test_a_run_grown_by_dus_records_the_base_it_was_grown_from(small_llama_path, tmp_path):
    base = ["data.seq_len=32", "data.max_tokens=4096", "train.steps=1", "train.global_batch=2", "train.micro_batch=2",
            "train.eval_batches=2", "train.eval_every=1", "train.save_every=10", "method=full"]
    dus = train(load_config(None, [f"model={small_llama_path}", "grow={method: dus, drop: 1}", *base,
                                   f"out={tmp_path / 'dus'}"]), progress=False)
    pro = train(load_config(None, [f"model={small_llama_path}", "grow={method: llama-pro, groups: 2}", *base,
                                   f"out={tmp_path / 'pro'}"]), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(small_llama_path)
    model = LlamaForCausalLM.from_pretrained(small_llama_path)
    general = perplexity(model, heldout_blocks("general", tokenizer, 32, 4))
    d, p = RunResult.read(dus.parent), RunResult.read(pro.parent)
    assert d.base_general == pytest.approx(general, rel=1e-6) != pytest.approx(d.first["ppl_general"], rel=1e-3)
    assert p.base_general == p.first["ppl_general"] == pytest.approx(general, rel=1e-6)  # LLaMA Pro: the same function
    assert torch.isfinite(torch.tensor(d.forgetting)) and d.forgetting == pytest.approx(d.last["ppl_general"] / general)


def test_intervals_and_within_noise_from_per_block_losses(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 200)  # per-block losses of the base on 200 held-out blocks

    def run(name, general_shift, domain_shift, noise):
        general = base + general_shift + rng.normal(0, noise, 200)
        domain = base + 1.0 - domain_shift + rng.normal(0, noise, 200)
        write(tmp_path / name, [
            {"step": 0, "tokens": 0, "ppl_general": float(np.exp(base.mean())), "ppl_domain": float(np.exp(base.mean() + 1))},
            {"step": 1, "tokens": 64, "ppl_general": float(np.exp(general.mean())),
             "ppl_domain": float(np.exp(domain.mean()))}])
        (tmp_path / name / "evaluations.jsonl").write_text(
            json.dumps({"step": 0, "general": base.tolist(), "domain": (base + 1).tolist()}) + "\n"
            + json.dumps({"step": 1, "general": general.tolist(), "domain": domain.tolist()}) + "\n")
        return RunResult.read(tmp_path / name)

    a, b, c = run("a", 0.10, 0.5, 0.01), run("b", 0.101, 0.5, 0.01), run("c", 0.30, 0.5, 0.01)
    summary = a.summary()
    assert summary["forgetting"] == pytest.approx(np.exp(0.10), rel=0.01)
    assert summary["forgetting_lo"] < summary["forgetting"] < summary["forgetting_hi"]
    assert summary["gain_lo"] < summary["gain"] < summary["gain_hi"]
    ratio, lo, hi = within_noise(a, b, "forgetting")
    assert lo < 1 < hi  # 0.001 apart in log-perplexity with 0.01 noise per block: within noise
    ratio, lo, hi = within_noise(c, a, "forgetting")
    assert 1 < lo < ratio < hi and ratio == pytest.approx(np.exp(0.2), rel=0.01)  # c forgets more, clearly
    ratio, lo, hi = within_noise(a, c, "gain")
    assert lo < 1 < hi  # the same domain shift
    validation, test = a.summary("validation"), a.summary("test")
    assert validation["forgetting"] != test["forgetting"]
    assert validation["general_ppl_end"] == pytest.approx(np.exp((base + 0.1)[:100].mean()), rel=0.01)
