"""deepen.reproduce: which runs stand for which comparison, the claims logic, and one small end-to-end pass.
Small for testing efficiency: the end-to-end pass runs the placement experiment for 2 steps."""

import pandas as pd
import pytest

from deepen.budget import shape_of
from deepen.reproduce import check_claims, plan_runs, rung_config, run


def test_the_tiny_rung_plans_the_papers_comparisons():
    entries = plan_runs("tiny")
    by = {(e.experiment, e.variant): e.run for e in entries}
    assert [v for x, v in by if x == "n_blocks"] == ["1 new", "2 new", "4 new", "8 new"]
    assert [v for x, v in by if x == "placement"] == ["interleave", "top", "bottom"]
    pro = by[("methods", "llama-pro")]
    assert by[("placement", "interleave")] == by[("n_blocks", "2 new")] == pro  # one run, used three times
    control = by[("methods", "every 4th original block")]
    assert "blocks=[3, 7]" in control.overrides and "grow=null" in control.overrides  # no new parameters
    trainable = {name: shape_of(rung_config("tiny", list(r.overrides))).trainable for (x, name), r in by.items()
                 if x == "methods"}
    lora = next(v for k, v in trainable.items() if k.startswith("lora"))
    assert trainable["every 4th original block"] == trainable["llama-pro"]  # the same blocks' worth of weights
    assert abs(lora / trainable["llama-pro"] - 1) < 0.05  # LoRA's rank chosen for a comparable count
    recovery = [v for x, v in by if x == "recovery"]
    assert recovery == ["base", "DUS m=2 (12 layers)", "stack m=0 (16 layers)"]
    assert len({r.name for r in by.values()}) == 13  # distinct runs


def summary(rows: dict) -> pd.DataFrame:
    """A summary table from {(experiment, variant): (forgetting, gain, general ppl start, general ppl end)}."""
    return pd.DataFrame([{"experiment": x, "variant": v, "forgetting": f, "gain": g, "trainable_params": 1,
                          "general_ppl_start": s, "general_ppl_end": e}
                         for (x, v), (f, g, s, e) in rows.items()])


def test_claims_hold_or_not_by_the_numbers():
    paper_like = summary({
        ("methods", "llama-pro"): (1.2, 5.0, 100, 120), ("methods", "full (SeqFT)"): (1.5, 4.0, 100, 150),
        ("methods", "lora r=20"): (1.1, 3.0, 100, 110), ("placement", "interleave"): (1.2, 5.0, 100, 120),
        ("placement", "top"): (1.2, 4.0, 100, 120), ("placement", "bottom"): (3.0, 1.5, 100, 300),
        ("recovery", "base"): (1.0, 1.0, 100, 99), ("recovery", "DUS m=2"): (1.1, 1.2, 130, 105),
        ("recovery", "stack m=0"): (1.2, 1.2, 150, 110)})
    holds = dict(zip(*check_claims(paper_like)[["claim", "holds_here"]].T.values))
    assert holds == {"retention": "yes", "gain": "yes", "bottom": "yes", "recovery": "yes"}
    toy = paper_like.copy()
    toy.loc[toy.variant == "full (SeqFT)", "gain"] = 9.0  # full fine-tuning gains the most
    toy.loc[toy.variant == "bottom", "forgetting"] = 1.0  # and the bottom does not collapse
    holds = dict(zip(*check_claims(toy)[["claim", "holds_here"]].T.values))
    assert holds["gain"] == "no" and holds["bottom"] == "no" and holds["retention"] == "yes"


def test_a_small_reproduction_writes_its_tables_and_figures(tmp_path):
    results = run("tiny", seeds=1, jobs=1, experiments=("placement",), root=tmp_path / "runs", out=tmp_path / "fig",
                  progress=False, overrides=["train.steps=2", "train.eval_every=2", "train.eval_batches=1",
                                             "train.save_every=10"])
    assert list(results["variant"]) == ["interleave", "top", "bottom"]
    assert (results["steps"] == 2).all() and (results["trainable_params"] == results["trainable_params"][0]).all()
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["05_tiny_claims.csv", "05_tiny_forgetting_vs_gain.png", "05_tiny_results.csv",
                     "05_tiny_summary.csv"]
    claims = pd.read_csv(tmp_path / "fig" / "05_tiny_claims.csv", keep_default_na=False)
    assert list(claims["claim"]) == ["bottom"] and claims["holds_here"][0] in ("yes", "no")
    with pytest.raises(ValueError, match="unknown experiments"):
        run("tiny", experiments=("nope",))
    with pytest.raises(ValueError, match="rung='huge'"):
        run("huge")
