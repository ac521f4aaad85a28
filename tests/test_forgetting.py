"""deepen.forgetting: drift from the base that repair cannot fake — exactly 0 for the base's own function (the base
itself, a LLaMA Pro model at step 0), positive once a model moves, its Monte-Carlo estimate agreeing with the exact
KL. Small for testing efficiency: a random 4-layer Llama of width 32."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from deepen.batches import heldout_blocks
from deepen.forgetting import DRIFT, base_probes, continue_rows, drift, exact_kl, measure
from deepen.grow import grow
from deepen.plan import llama_pro
from deepen.runs import RunResult, bootstrap, drift_difference


@pytest.fixture(scope="module")
def base(small_llama_path):
    return LlamaForCausalLM.from_pretrained(small_llama_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(small_llama_path):
    return AutoTokenizer.from_pretrained(small_llama_path)


def moved(model, scale: float, seed: int = 1):
    """A copy of `model` with noise of `scale` (relative) added to every weight: a model that has drifted."""
    out = LlamaForCausalLM(model.config).eval()
    out.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp(min=1e-3))
    return out


@pytest.fixture(scope="module")
def probes(base, tokenizer, small_llama_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # this module's probes only; the environment is put back after
        patch.setenv("DEEPEN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield base_probes(base, tokenizer, small_llama_path, "general", samples=16, new_tokens=24,
                          progress=lambda _: None)


def test_drift_is_exactly_zero_for_the_base_and_for_llama_pro_at_step_0_and_positive_once_moved(base, probes,
                                                                                                 tokenizer):
    blocks = heldout_blocks("general", tokenizer, 32, 8)
    assert set(probes) == {"text"}  # no chat template: no chat or answer probes
    assert probes["text"].ids.shape[0] == 16 and (probes["text"].end - probes["text"].start == 24).all()
    same = drift(base, base, probes, blocks)
    assert set(same) == {"kl_text", "kl_heldout"}
    assert all(v == 0.0 for values in same.values() for v in values)  # exactly, not nearly
    grown = grow(base, llama_pro(4, 2))  # 6 layers, zeroed o_proj / down_proj: the base's function
    assert all(v == 0.0 for values in drift(base, grown, probes, blocks).values() for v in values)
    off = drift(base, moved(base, 0.3), probes, blocks)
    assert np.mean(off["kl_text"]) > 0 and min(off["kl_heldout"]) > 0  # exact KL is positive block by block
    further = drift(base, moved(base, 1.0), probes, blocks)
    assert np.mean(further["kl_heldout"]) > np.mean(off["kl_heldout"])  # moved further, drifted further


def test_the_monte_carlo_estimate_agrees_with_the_exact_kl(base, tokenizer):
    """One prompt, 3,000 one-token continuations sampled from the base: the mean of log p_base - log p_model over
    them estimates KL(base || model) at that position, which is computed exactly over the vocabulary beside it."""
    model = moved(base, 3.0)
    prompt = tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"]
    rows = continue_rows(base, [prompt] * 3000, 1, sample=True, eos=None, pad=0, seed=0, batch_size=3000)
    tokens = torch.tensor([row[-1] for row in rows])
    with torch.no_grad():
        p = F.log_softmax(base(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        q = F.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = float((p.exp() * (p - q)).sum())
    samples = (p[tokens] - q[tokens]).numpy()
    lo, hi = bootstrap(lambda a: a.mean(-1), samples)
    assert exact > 0.05 and lo <= exact <= hi, (exact, lo, hi)
    assert len(set(tokens.tolist())) > 20  # sampled from the whole distribution, not the top few tokens
    blocks = torch.tensor([prompt + [tokens[0].item()]])  # exact_kl, on a block, is this KL at each position
    assert exact_kl(base, model, blocks)[0] > 0


def test_a_run_folder_is_measured_once_and_read_as_paired_items(base, tokenizer, probes, small_llama_path, tmp_path):
    blocks = heldout_blocks("general", tokenizer, 32, 8)
    for name, model in (("same", base), ("moved", moved(base, 0.3))):
        folder = tmp_path / name
        model.save_pretrained(folder / "model")
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "tokens": 0, "ppl_general": 1.0,
                                                          "ppl_domain": 1.0}) + "\n")
        (folder / "config.yaml").write_text("method: full\n")
        record = measure(folder, base, small_llama_path, tokenizer, "general", blocks, samples=16, new_tokens=24,
                         progress=lambda _: None)
        assert (folder / DRIFT).is_file() and record["measures"].keys() == {"kl_text", "kl_heldout"}
    stale = json.loads((tmp_path / "same" / DRIFT).read_text())
    (tmp_path / "same" / DRIFT).write_text(json.dumps({**stale, "probes": "another draw", "measures": {"kl_text": [9.0]}}))
    again = measure(tmp_path / "same", base, small_llama_path, tokenizer, "general", blocks, samples=16, new_tokens=24,
                    progress=lambda _: None)  # scored on other probes: scored anew, on these
    assert again["probes"] == stale["probes"] and again["measures"] == stale["measures"]
    (tmp_path / "moved" / "model" / "model.safetensors").unlink()  # read, not scored again
    assert measure(tmp_path / "moved", base, small_llama_path, tokenizer, "general", blocks, samples=16,
                   new_tokens=24) == json.loads((tmp_path / "moved" / DRIFT).read_text())
    same, off = RunResult.read(tmp_path / "same"), RunResult.read(tmp_path / "moved")
    summary = off.summary()
    assert summary["kl_text_lo"] <= summary["kl_text"] <= summary["kl_text_hi"] and same.summary()["kl_text"] == 0
    difference, lo, hi = drift_difference(off, same, "kl_heldout")
    assert difference == pytest.approx(np.mean(off.drift["kl_heldout"])) and 0 < lo <= hi
