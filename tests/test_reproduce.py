"""deepen.reproduce: which runs stand for which comparison, the claims logic, and one small end-to-end pass.
Small for testing efficiency: the end-to-end pass runs the placement experiment for 2 steps."""

import pandas as pd
import pytest

from deepen.batches import HELDOUT_SETS
from deepen.budget import shape_of
from deepen.config import merged
from deepen.reproduce import (MEASURED, PROFILES, check_claims, dry_run, jobs_of, parse_sweep, plan_runs,
                              rung_config, run)


def test_the_tiny_rung_plans_the_papers_comparisons():
    entries = plan_runs("tiny")
    by = {(e.experiment, e.variant): e.run for e in entries}
    assert [v for x, v in by if x == "n_blocks"] == ["1 new", "2 new", "4 new", "8 new"]
    assert [v for x, v in by if x == "placement"] == ["interleave", "top", "bottom"]
    pro = by[("methods", "llama-pro")]
    assert by[("placement", "interleave")] == by[("n_blocks", "2 new")] == pro  # one run, used three times
    control = by[("methods", "every 4th original block")]
    assert control.changes["blocks"] == [3, 7] and control.changes["grow"] is None  # no new parameters
    trainable = {name: shape_of(rung_config("tiny", "cpu", r.changes)).trainable for (x, name), r in by.items()
                 if x == "methods"}
    lora = next(v for k, v in trainable.items() if k.startswith("lora"))
    assert trainable["every 4th original block"] == trainable["llama-pro"]  # the same blocks' worth of weights
    assert abs(lora / trainable["llama-pro"] - 1) < 0.05  # LoRA's rank chosen for a comparable count
    recovery = [v for x, v in by if x == "recovery"]
    assert recovery == ["base", "DUS m=2 (12 layers)", "stack m=0 (16 layers)"]
    assert [v for x, v in by if x == "init"] == ["zeroed (LLaMA Pro)", "plain copy", "random", "masked copy (MSG)"]
    assert by[("init", "zeroed (LLaMA Pro)")] == pro
    assert by[("control", "full (SeqFT) on general")] == by[("recovery", "base")]
    controls = [e for e in entries if e.experiment == "control"]
    assert [e.controls for e in controls] == [v for x, v in by if x == "methods"]  # one control per method
    for e in controls:  # the same run as the one it controls, on the general text
        method = by[("methods", e.controls)].changes
        assert e.run.changes == {**method, "data": {"domain": "general"}}
    assert len({r.name for r in by.values()}) == 20  # distinct runs


def test_the_smol_rung_plans_what_the_issue_asks_without_training():
    """SmolLM2 (30 layers) -> 36: the five methods with matched trainable counts, placement, 1/3/6/10/15 new
    blocks, four initialisations, the controls on general text and the recovery; every run the same tokens,
    schedule and held-out blocks; the CPU profile at least 100k tokens per run, the GPU one 20M with a sweep."""
    for profile, tokens in (("cpu", 100_000), ("gpu", 3_000_000), ("gpu-long", 6_000_000)):
        entries = plan_runs("smol", profile)
        by = {(e.experiment, e.variant): e.run for e in entries}
        assert [v for x, v in by if x == "n_blocks"] == ["1 new", "3 new", "6 new", "10 new", "15 new"]
        assert [v for x, v in by if x == "methods"][:2] == ["llama-pro", "full (SeqFT)"]
        trainable = {v: shape_of(rung_config("smol", profile, r.changes)).trainable
                     for (x, v), r in by.items() if x == "methods"}
        assert trainable["llama-pro"] == 6 * 3_540_096
        if profile != "cpu":  # the CPU profile runs LLaMA Pro and full fine-tuning only
            lora = next(n for v, n in trainable.items() if v.startswith("lora"))
            assert trainable["every 5th original block"] == trainable["llama-pro"]
            assert abs(lora / trainable["llama-pro"] - 1) < 0.02
        configs = {r.name: rung_config("smol", profile, r.changes) for r in by.values()}
        budgets = {(c.train.steps, c.train.global_batch, c.data.seq_len, c.train.lr, c.train.seed,
                    c.train.eval_batches, c.data.general) for c in configs.values()}
        assert len(budgets) == 1  # the same tokens, schedule, seed and evaluation blocks for every run
        steps, batch, seq, *_ = budgets.pop()
        assert steps * batch * seq >= tokens
        assert {c.data.domain for c in configs.values()} == {"code", "wiki"}  # wiki: the controls and recovery
    assert [v for x, v in {(e.experiment, e.variant) for e in plan_runs("smol", "cpu")} if x == "methods"] != []
    assert parse_sweep("lr=1e-4,3e-4") == [1e-4, 3e-4] and parse_sweep(None) is None
    base = rung_config("smol", "gpu")
    jobs = jobs_of(plan_runs("smol", "gpu")[:1], 2, parse_sweep("lr=1e-4,3e-4"), __import__("pathlib").Path("r"), base)
    assert [j.folder.name.rsplit("-", 1)[0] for j in jobs] == ["llama-pro-6-lr0.0001-s0", "llama-pro-6-lr0.0001-s1",
                                                              "llama-pro-6-lr0.0003-s0", "llama-pro-6-lr0.0003-s1"]
    assert jobs[2].config.train.lr == 3e-4 and jobs[3].config.train.seed == 1
    assert len({j.config.key() for j in jobs}) == 4 and all(j.folder.name.endswith(j.config.key()) for j in jobs)
    with pytest.raises(ValueError, match="only the learning rate is swept"):
        parse_sweep("wd=0.1")


def test_the_short_gpu_profile_fits_ten_minutes_of_an_h200_and_dry_run_says_so(capsys):
    """Planned from the throughput measured on an H200 (deepen.reproduce.MEASURED), not from an assumed MFU: at
    least 3M tokens per run, a two-rate sweep of every method, the controls, all inside 10 minutes."""
    todo, seconds = dry_run("smol", "gpu")
    assert MEASURED["H200"].date == "2026-12-04" and PROFILES["smol", "gpu"].card == "H200"
    assert 0 < seconds <= 600
    methods = [j for j in todo if j.entry.experiment == "methods"]
    assert len({j.entry.variant for j in methods}) == 5 and len(methods) == 10  # two rates each
    assert {j.entry.experiment for j in todo} == {"methods", "control"}
    tokens = {j.config.train.steps * j.config.train.global_batch * j.config.data.seq_len for j in todo}
    assert min(tokens) >= 3_000_000
    long_todo, long_seconds = dry_run("smol", "gpu-long")
    assert long_seconds > 3600 and len({j.entry.experiment for j in long_todo}) == 6
    from deepen.cli import main

    assert main(["reproduce", "--rung", "smol", "--profile", "gpu", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "planned on one NVIDIA H200, 1 run at a time: " in printed and f"({seconds / 60:.1f} minutes)" in printed
    assert "measured there on 2026-12-04" in printed


def test_each_rung_scores_on_its_named_heldout_set():
    """Every run of a rung's CPU profile evaluates on the blocks of deepen.batches.HELDOUT_SETS[rung], which the
    notebooks and labs use too: one base, one perplexity."""
    for rung in ("tiny", "smol"):
        held = HELDOUT_SETS[rung]
        for entry in plan_runs(rung, "cpu"):
            c = rung_config(rung, "cpu", entry.run.changes)
            assert (c.data.seq_len, c.train.eval_batches * c.train.global_batch) == (held.seq_len, held.n_blocks)
            assert c.data.general == held.general, entry.run.name
        assert rung_config(rung, "cpu").data.domain == held.domain
    with pytest.raises(ValueError, match="role='english' is not one of general, domain"):
        HELDOUT_SETS["tiny"].blocks("english", None)


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
    results = run("tiny", seeds=1, jobs=1, experiments=("placement", "init"), root=tmp_path / "runs",
                  out=tmp_path / "fig", progress=False,
                  overrides=["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.save_every=10"])
    assert list(results["variant"]) == ["interleave", "top", "bottom", "zeroed (LLaMA Pro)", "plain copy", "random",
                                        "masked copy (MSG)"]
    assert (results["steps"] == 2).all() and (results["trainable_params"] == results["trainable_params"][0]).all()
    init = results[results["experiment"] == "init"].set_index("variant")
    for exact in ("zeroed (LLaMA Pro)", "masked copy (MSG)"):  # the base's function at step 0, exactly
        assert init.loc[exact, "general_ppl_start"] == init.loc[exact, "general_ppl_base"]
    for moved in ("plain copy", "random"):
        assert init.loc[moved, "general_ppl_start"] != init.loc[moved, "general_ppl_base"]
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["05_tiny_claims.csv", "05_tiny_forgetting_vs_gain.png", "05_tiny_results.csv",
                     "05_tiny_summary.csv"]
    summary = pd.read_csv(tmp_path / "fig" / "05_tiny_summary.csv")
    assert (summary["forgetting_lo"] <= summary["forgetting"]).all() and (summary["forgetting"] <= summary["forgetting_hi"]).all()
    assert summary["trainable_params"].dtype.kind == "i"  # counts stay exact integers
    claims = pd.read_csv(tmp_path / "fig" / "05_tiny_claims.csv", keep_default_na=False)
    assert list(claims["claim"]) == ["bottom", "init"]
    assert claims["holds_here"][0] in ("yes", "no", "within noise") and claims["holds_here"][1] == "n/a"


def test_a_sweep_picks_on_validation_and_reports_on_test(tmp_path):
    results = run("tiny", seeds=1, jobs=1, experiments=("placement",), root=tmp_path / "runs", out=tmp_path / "fig",
                  progress=False, sweep="lr=1e-3,1e-2",
                  overrides=["train.steps=3", "train.eval_every=3", "train.eval_batches=1", "train.save_every=10"])
    assert len(results) == 6 and set(results["part"]) == {"test"} and set(results["lr"]) == {1e-3, 1e-2}
    summary = pd.read_csv(tmp_path / "fig" / "05_tiny_summary.csv").set_index("variant")
    for variant, rows in results.groupby("variant"):
        best = rows.sort_values("validation_domain_ppl").iloc[0]
        assert summary.loc[variant, "lr"] == best["lr"] and summary.loc[variant, "swept"]
        assert summary.loc[variant, "domain_ppl_end"] == pytest.approx(best["domain_ppl_end"], rel=1e-5)  # test half
    with pytest.raises(ValueError, match="unknown experiments"):
        run("tiny", experiments=("nope",))
    with pytest.raises(ValueError, match="rung='huge'"):
        run("huge")
    with pytest.raises(ValueError, match="profile='tpu'"):
        run("tiny", "tpu")


def test_forgetting_net_of_repair_is_the_ratio_of_the_run_and_its_control(tmp_path, monkeypatch):
    """A methods run and its control trained alike on general text: its net forgetting is the ratio of their
    general perplexities on the same blocks (both against one base), with a paired interval; every run's drift
    from the base is measured (drift.json) and summarised with its interval."""
    import dataclasses

    monkeypatch.setitem(PROFILES, ("tiny", "cpu"), dataclasses.replace(PROFILES["tiny", "cpu"], variants=("llama-pro",)))
    results = run("tiny", seeds=1, jobs=1, experiments=("methods", "control"), root=tmp_path / "runs",
                  out=tmp_path / "fig", progress=False, sweep="lr=1e-3,1e-2",
                  overrides=["train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.save_every=10"])
    assert list(results["variant"]) == ["llama-pro", "llama-pro", "llama-pro on general"]  # the control: one rate,
    methods = results[results["experiment"] == "methods"]  # the one chosen for the run it controls
    chosen = methods.sort_values("validation_domain_ppl").iloc[0]["lr"]
    assert results[results["experiment"] == "control"]["lr"].tolist() == [chosen]
    summary = pd.read_csv(tmp_path / "fig" / "05_tiny_summary.csv").set_index("variant")
    assert summary.loc["llama-pro", "lr"] == summary.loc["llama-pro", "control_lr"] == chosen
    pro, control = summary.loc["llama-pro"], summary.loc["llama-pro on general"]
    # the CSV holds 6 significant digits: equal to that precision
    assert pro["net_forgetting"] == pytest.approx(pro["general_ppl_end"] / control["general_ppl_end"], rel=1e-5)
    assert pro["net_forgetting_lo"] <= pro["net_forgetting"] <= pro["net_forgetting_hi"]
    for measure in ("kl_text", "kl_heldout"):
        assert (summary[measure] > 0).all() and (summary[f"{measure}_lo"] <= summary[measure]).all()
    assert (tmp_path / "fig" / "05_tiny_drift_vs_gain.png").is_file()
