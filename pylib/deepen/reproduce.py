"""`make reproduce` / `deepen reproduce`: the papers' comparisons, run on one base with the same domain tokens, the
same seeds, schedule and evaluation blocks for every run — only what learns differs — with what the papers claim
set beside what we measured, and whether two numbers are within noise.

1. methods   — LLaMA Pro (grown, only the new blocks learn) vs full fine-tuning of the base (SeqFT) vs LoRA with
               about as many trainable parameters vs full fine-tuning of the grown model vs training every k-th
               *original* block, adding no parameters (the control users asked the LLaMA Pro authors for);
2. placement — the same new blocks interleaved, all on top, all at the bottom;
3. n_blocks  — how many blocks to add (1, 2, 4, 8 on the tiny rung; 1, 3, 6, 10, 15 on SmolLM2);
4. init      — how the new blocks start: zeroed o_proj/down_proj (LLaMA Pro), a plain copy, random, or a full copy
               behind a mask ramped from 0 to 1 (MSG, arXiv 2305.02869); the zeroed and the masked are the base's
               function at step 0, exactly (step 0's perplexity equals the base's);
5. control   — LLaMA Pro and full fine-tuning trained alike on *general* text: what training of any kind does to
               general perplexity (on a dequantised Instruct model, repair) — to tell from forgetting;
6. recovery  — SOLAR: depth up-scaling (drop m = L/4) vs plain stacking (m = 0) vs the base, all trained fully
               on general text: how much the growth costs at step 0 and how fast it recovers.

Every run is one `deepen.train.train` of the rung's config with overrides, in runs/reproduce/<rung>/<run>-s<seed>;
a finished run is read, not retrained, and a killed one resumes. Forgetting and gain are deepen.runs' (against the
base), each with a 95% bootstrap interval over the held-out blocks; a learning-rate sweep (--sweep lr=a,b,c)
picks each variant's rate on the validation half of the held-out blocks and reports the test half.
Results: figures/05_<rung>[_gpu]_results.csv (one row per run), _summary.csv (per variant: seeds pooled, at the
chosen rate), _claims.csv, and figures.

    deepen reproduce                                # the tiny rung: 13 runs x 2 seeds on 2 CPU cores
    deepen reproduce --rung smol                    # SmolLM2 on a CPU: methods, placement, control
    deepen reproduce --rung smol --profile gpu      # every experiment with a learning-rate sweep, on one GPU
    deepen reproduce --rung smol --profile gpu --dry-run   # the runs and the planned GPU time, nothing trained
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from deepen import REPO, plots
from deepen.budget import budget, duration, model_config, shape_of
from deepen.config import load_config
from deepen.plan import llama_pro
from deepen.rundir import read_metrics
from deepen.runs import RunResult, within_noise
from deepen.train import train

CONFIGS = {("tiny", "cpu"): "configs/tiny-cpu.yaml", ("tiny", "gpu"): "configs/tiny-cpu.yaml",
           ("smol", "cpu"): "configs/smol-cpu.yaml", ("smol", "gpu"): "configs/smol-gpu.yaml"}
RUNGS = ("tiny", "smol")
PROFILES = ("cpu", "gpu")
EXPERIMENTS = ("methods", "placement", "n_blocks", "init", "control", "recovery")
# What each profile runs by default: the CPU profile of SmolLM2 only what a laptop affords in about two hours.
DEFAULT_EXPERIMENTS = {("smol", "cpu"): ("methods", "placement", "control")}
DEFAULT_SEEDS = {"tiny": 2, "smol": 1}
DEFAULT_SWEEP = {("smol", "gpu"): "lr=1e-4,3e-4,1e-3"}
BLOCK_COUNTS = {"tiny": (1, 2, 4, 8), "smol": (1, 3, 6, 10, 15)}
INITS = {"plan": "zeroed (LLaMA Pro)", "copy": "plain copy", "random": "random", "masked": "masked copy (MSG)"}


@dataclass(frozen=True)
class Run:
    """One training run: a name (its folder, without the seed) and the overrides to the rung's config."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """A row of an experiment: which run stands for which variant."""

    experiment: str
    variant: str
    run: Run


def rung_config(rung: str, profile: str = "cpu", overrides: list[str] = ()):
    if rung not in RUNGS:
        raise ValueError(f"rung={rung!r} is not one of {', '.join(RUNGS)}")
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not one of {', '.join(PROFILES)}")
    return load_config(REPO / CONFIGS[rung, profile], list(overrides))


def _grow(groups: int, placement: str = "interleave", init: str = "plan") -> str:
    return f"grow={{method: llama-pro, groups: {groups}, copies: 1, placement: {placement}, init: {init}}}"


def lora_rank(config, target: int) -> int:
    """The LoRA rank whose adapters (on the config's lora.targets of the base) have closest to `target` parameters."""
    one = dataclasses.replace(config, grow=None, method="lora", lora=dataclasses.replace(config.lora, r=1))
    return max(1, round(target / shape_of(one).trainable))


def plan_runs(rung: str, profile: str = "cpu", overrides: list[str] = ()) -> list[Entry]:
    """The experiments' entries for a rung (its config's grow.groups is the reference LLaMA Pro run)."""
    config = rung_config(rung, profile, overrides)
    n = model_config(config.model).num_hidden_layers
    groups = config.grow.groups if config.grow and config.grow.method == "llama-pro" and config.grow.groups else 2
    plan = llama_pro(n, groups)
    pro = Run(f"llama-pro-{groups}", (_grow(groups), "method=llama-pro"))
    r = lora_rank(config, shape_of(rung_config(rung, profile, [*overrides, *pro.overrides])).trainable)
    copied = sorted({plan.layers[i].source for i in plan.new_layers})
    general = f"data.domain={config.data.general}"  # trained on the base's own kind of text
    base_general = Run("general-full", ("grow=null", "method=full", general))
    entries = [
        Entry("methods", "llama-pro", pro),
        Entry("methods", "full (SeqFT)", Run("full", ("grow=null", "method=full"))),
        Entry("methods", f"lora r={r}", Run(f"lora-r{r}", ("grow=null", "method=lora", f"lora.r={r}"))),
        Entry("methods", "grown, full", Run(f"grown-full-{groups}", (_grow(groups), "method=full"))),
        Entry("methods", f"every {_ordinal(n // groups)} original block",
              Run("blocks-" + "-".join(map(str, copied)), ("grow=null", "method=blocks", f"blocks={copied}"))),
    ]
    for placement in ("interleave", "top", "bottom"):
        run = pro if placement == "interleave" else Run(f"llama-pro-{groups}-{placement}",
                                                         (_grow(groups, placement), "method=llama-pro"))
        entries.append(Entry("placement", placement, run))
    for g in (g for g in BLOCK_COUNTS[rung] if n % g == 0):
        run = pro if g == groups else Run(f"llama-pro-{g}", (_grow(g), "method=llama-pro"))
        entries.append(Entry("n_blocks", f"{g} new", run))
    for init, label in INITS.items():
        run = pro if init == "plan" else Run(f"llama-pro-{groups}-{init}", (_grow(groups, init=init), "method=llama-pro"))
        entries.append(Entry("init", label, run))
    entries += [
        Entry("control", "llama-pro on general", Run(f"general-llama-pro-{groups}", (*pro.overrides, general))),
        Entry("control", "full on general", base_general),
    ]
    m = n // 4
    entries += [
        Entry("recovery", "base", base_general),
        Entry("recovery", f"DUS m={m} ({2 * (n - m)} layers)",
              Run(f"general-dus-{m}", (f"grow={{method: dus, drop: {m}}}", "method=full", general))),
        Entry("recovery", f"stack m=0 ({2 * n} layers)",
              Run("general-stack", ("grow={method: dus, drop: 0}", "method=full", general))),
    ]
    return entries


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def parse_sweep(sweep: str | None) -> list[float | None]:
    """The learning rates of "lr=1e-4,3e-4,1e-3" ([None]: no sweep, the config's own rate)."""
    if not sweep:
        return [None]
    key, _, values = sweep.partition("=")
    if key.strip() != "lr" or not values:
        raise ValueError(f"--sweep {sweep!r}: write lr=a,b,c (only the learning rate is swept)")
    try:
        rates = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep {sweep!r}: the learning rates must be numbers, e.g. lr=1e-4,3e-4") from None
    if len(set(rates)) < len(rates) or not all(r > 0 for r in rates):
        raise ValueError(f"--sweep {sweep!r}: give distinct positive learning rates")
    return rates


@dataclass(frozen=True)
class Job:
    """One run to train: an entry's run at one seed and learning rate, in its folder."""

    entry: Entry
    seed: int
    lr: float | None
    folder: Path
    overrides: tuple[str, ...]


def jobs_of(entries: list[Entry], seeds: int, rates: list, root: Path, overrides=()) -> list[Job]:
    out = []
    for e in entries:
        for lr in rates:
            for seed in range(seeds):
                name = e.run.name + (f"-lr{lr:g}" if lr is not None else "") + f"-s{seed}"
                extra = (f"train.lr={lr}",) if lr is not None else ()
                out.append(Job(e, seed, lr, root / name, (*overrides, *e.run.overrides, *extra, f"train.seed={seed}")))
    return out


def _one(args: tuple) -> None:
    """Train one run (in a worker process); a finished run returns at once."""
    config_path, overrides, out, threads = args
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()  # one progress bar for the whole reproduction, not a loading bar per run
    logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    train(load_config(config_path, list(overrides) + [f"out={out}"]), progress=False)


def planned_seconds(rung: str, profile: str, jobs: list[Job]) -> float:
    """The GPU time the runs would take on one H100 at deepen.budget's default MFU (40%)."""
    seconds = 0.0
    for job in {j.folder.name.rsplit("-s", 1)[0]: j for j in jobs}.values():  # seeds: the same cost each
        seconds += budget(rung_config(rung, profile, list(job.overrides)), gpus=1).seconds
    return seconds * len({j.seed for j in jobs})


def run(rung: str = "tiny", profile: str = "cpu", seeds: int | None = None, jobs: int = 2, overrides: list[str] = (),
        root: str | Path | None = None, experiments: tuple[str, ...] | None = None, sweep: str | None = None,
        threads: int | None = 1, progress: bool = True, out: str | Path | None = None) -> pd.DataFrame:
    """Run (or pick up the finished) runs of `experiments` for `seeds` seeds (and each rate of `sweep`) with `jobs`
    processes; write the CSVs and figures into `out` (default figures/); return the per-run results. `overrides`
    apply to every run (e.g. train.steps=20); runs with overrides go to their own folder, so they never mix with
    the default ones. threads: torch threads per run (None: as they are)."""
    from tqdm.auto import tqdm

    rung_config(rung, profile, overrides)  # a bad rung or override fails here, before any work
    experiments = experiments or DEFAULT_EXPERIMENTS.get((rung, profile), EXPERIMENTS)
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    seeds = DEFAULT_SEEDS[rung] if seeds is None else seeds
    if seeds < 1 or jobs < 1:
        raise ValueError(f"seeds and jobs must be at least 1, got seeds={seeds}, jobs={jobs}")
    rates = parse_sweep(sweep)
    todo = jobs_of([e for e in plan_runs(rung, profile, overrides) if e.experiment in experiments], seeds, rates,
                   Path(root) if root is not None else runs_root(rung, profile, overrides), overrides)
    distinct = {job.folder: job for job in todo}
    config_path = str(REPO / CONFIGS[rung, profile])
    bar = tqdm(total=len(distinct), desc=f"reproduce {rung} ({profile}): {len(distinct)} runs", disable=not progress)
    work = [(config_path, job.overrides, job.folder, threads) for job in distinct.values()]
    if jobs == 1:
        for args in work:
            _one(args)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            try:
                for future in as_completed([pool.submit(_one, args) for args in work]):
                    future.result()  # a failed run fails the whole reproduction, with its error
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # not the runs queued behind it
                raise
    bar.close()

    part = "test" if rates != [None] else "all"
    results = pd.DataFrame([_row(job, part) for job in todo])
    pooled = pool_seeds(todo, results)
    summary = summarise(results, pooled)
    claims = check_claims(summary, pooled)
    prefix = f"05_{rung}" + ("" if profile == "cpu" else f"_{profile}")
    out = Path(out) if out is not None else plots.figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / f"{prefix}_results.csv", index=False, float_format="%.6g")
    summary.to_csv(out / f"{prefix}_summary.csv", index=False, float_format="%.6g")
    claims.to_csv(out / f"{prefix}_claims.csv", index=False)
    figures(results, summary, prefix, out)
    return results


def runs_root(rung: str, profile: str, overrides=()) -> Path:
    """runs/reproduce/<rung>[-gpu][-<hash of the overrides>] in the repository (else the working directory)."""
    suffix = ("" if profile == "cpu" else f"-{profile}") + (
        "-" + hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:8] if overrides else "")
    return (REPO if (REPO / "pyproject.toml").is_file() else Path.cwd()) / "runs" / "reproduce" / f"{rung}{suffix}"


def _row(job: Job, part: str) -> dict:
    run = RunResult.read(job.folder)
    if not run.evaluations:
        raise ValueError(f"{job.folder} has no per-block losses (made by an older deepen): remove it to train it again")
    shape = shape_of(load_config(job.folder / "config.yaml"))
    return {
        "experiment": job.entry.experiment, "variant": job.entry.variant, "run": job.entry.run.name,
        "seed": job.seed, "lr": run.config["train"]["lr"], "part": part, "method": run.config["method"],
        "layers": len(shape.blocks), "params": shape.params, "trainable_params": shape.trainable,
        **run.summary(part), "validation_domain_ppl": run.ppl("domain", "last", "validation" if part == "test"
                                                                 else "all"),
        "final_loss": run.final_loss, "tokens_per_s": run.tokens_per_s, "train_seconds": run.train_seconds,
        "folder": _shown(job.folder),
    }


def _shown(folder: Path) -> str:
    """A run folder as the tables show it: relative to the repository when inside it (no machine paths)."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def pool_seeds(jobs: list[Job], results: pd.DataFrame) -> dict[tuple[str, str], RunResult]:
    """{(experiment, variant): the seeds of its chosen learning rate pooled into one result}. The rate chosen is the
    one with the lowest validation domain perplexity (mean over seeds); without a sweep, the config's."""
    chosen = (results.groupby(["experiment", "variant", "lr"], sort=False)["validation_domain_ppl"].mean()
              .reset_index().sort_values("validation_domain_ppl").groupby(["experiment", "variant"], sort=False)
              .first()["lr"])
    pooled = {}
    for key, lr in chosen.items():
        runs = [RunResult.read(j.folder) for j in jobs if (j.entry.experiment, j.entry.variant) == key
                and (j.lr is None or np.isclose(j.lr, lr))]
        pooled[key] = RunResult.pooled(runs, results["part"].iloc[0])
    return pooled


def summarise(results: pd.DataFrame, pooled: dict[tuple[str, str], RunResult]) -> pd.DataFrame:
    """One row per experiment and variant at its chosen learning rate: the seeds pooled (per-block losses averaged,
    so perplexities are geometric means over seeds), forgetting and gain with their 95% intervals over the held-out
    blocks, and their spread (max - min) over seeds."""
    rows = []
    for (experiment, variant), result in pooled.items():
        lr = result.config["train"]["lr"]
        part = results[(results["experiment"] == experiment) & (results["variant"] == variant)
                       & np.isclose(results["lr"], lr)]
        first = part.iloc[0]
        rows.append({"experiment": experiment, "variant": variant, "run": first["run"], "lr": lr,
                     "swept": results.loc[(results["experiment"] == experiment) & (results["variant"] == variant),
                                          "lr"].nunique() > 1,
                     "part": first["part"], "layers": int(first["layers"]), "params": int(first["params"]),
                     "trainable_params": int(first["trainable_params"]), **result.summary(first["part"]),
                     "seeds": len(part), "forgetting_spread": part["forgetting"].max() - part["forgetting"].min(),
                     "gain_spread": part["gain"].max() - part["gain"].min(),
                     "tokens_per_s": part["tokens_per_s"].mean(), "train_seconds": part["train_seconds"].mean()})
    return pd.DataFrame(rows)


PAPER = {  # LLaMA Pro (arXiv 2401.02415) ablations and SOLAR (arXiv 2312.15166), as the papers state them
    "retention": "general retention: LoRA > expansion >= full fine-tuning (law domain, general avg: LoRA 58.15, "
                 "+8 blocks 56.70, full 55.01)",
    "gain": "domain gain: expansion > full fine-tuning > LoRA (law score: +8 blocks 75.11, full 70.63, LoRA 65.34)",
    "bottom": "blocks at the bottom are the worst placement on both axes: 8 at the bottom collapse (general 29.36, "
              "law 0.81) where interleaved keep 56.70 / 75.11 and the top 56.19 / 60.98",
    "n_blocks": "more blocks: domain score rises to +8 (67.45 at +1 -> 75.11 at +8), general stays within 55.9-56.7",
    "control": "training every 4th original block: no number in the paper (users asked for it)",
    "init": "zero-initialised o_proj/down_proj: the paper argues for it (a zeroed RMSNorm scale would not learn) "
            "but compares no other initialisation",
    "repair": "no claim in the papers: training on the base's own kind of text, to tell forgetting from what any "
              "training does to general perplexity",
    "recovery": "SOLAR: dropping m layers at the seam reduces the discrepancy vs stacking and recovers fast in "
                "continued pretraining (no curves or numbers given)",
}
VERDICTS = ("yes", "no", "within noise", "n/a")


def compare(pooled: dict, a: tuple[str, str], b: tuple[str, str], metric: str, relation: str) -> str:
    """Whether a's `metric` is `relation` ("<", "<=", ">") b's: "yes", "no", or "within noise" when the 95% interval
    of the paired ratio holds 1 and the relation is strict; point estimates alone when there are no intervals."""
    ra, rb = pooled.get(a), pooled.get(b)
    if ra is None or rb is None:
        return "n/a"
    ratio, lo, hi = within_noise(ra, rb, metric)
    wants_below = relation in ("<", "<=")
    if lo <= 1 <= hi:  # cannot tell the two apart
        return "yes" if relation == "<=" else "within noise"
    return "yes" if (hi < 1) == wants_below else "no"


def _combine(verdicts: list[str]) -> str:
    for verdict in ("n/a", "no", "within noise"):
        if verdict in verdicts:
            return verdict
    return "yes"


def check_claims(summary: pd.DataFrame, pooled: dict | None = None) -> pd.DataFrame:
    """Each paper claim beside what we measured and whether it holds here: "yes", "no", "within noise" (the 95%
    interval of a paired comparison it rests on holds 1), or "n/a" where the paper states no ordering. Without
    `pooled` (per-block losses) the verdicts use the point estimates."""
    def get(experiment: str, prefix: str) -> pd.Series | None:
        rows = summary[(summary["experiment"] == experiment) & summary["variant"].str.startswith(prefix)]
        return rows.iloc[0] if len(rows) else None

    def key(row) -> tuple[str, str]:
        return row["experiment"], row["variant"]

    def holds(a, b, metric: str, relation: str) -> str:
        if pooled:
            return compare(pooled, key(a), key(b), metric, relation)
        x, y = a[metric], b[metric]
        return "yes" if {"<": x < y, "<=": x <= y, ">": x > y}[relation] else "no"

    rows = []

    def claim(name: str, measured: str, verdict: str) -> None:
        rows.append({"claim": name, "paper": PAPER[name], "measured": measured, "holds_here": verdict})

    def interval(row, metric: str) -> str:
        lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
        return "" if lo is None or pd.isna(lo) else f" [{lo:.2f}, {hi:.2f}]"

    pro, full, lora = get("methods", "llama-pro"), get("methods", "full"), get("methods", "lora")
    if pro is not None and full is not None and lora is not None:
        named = (("LoRA", lora), ("expansion", pro), ("full", full))
        claim("retention", "general perplexity x " + ", ".join(f"{k} {v['forgetting']:.2f}{interval(v, 'forgetting')}"
                                                               for k, v in named),
              _combine([holds(lora, pro, "forgetting", "<"), holds(pro, full, "forgetting", "<=")]))
        claim("gain", "domain perplexity / " + ", ".join(f"{k} {v['gain']:.2f}{interval(v, 'gain')}" for k, v in named),
              _combine([holds(pro, full, "gain", ">"), holds(full, lora, "gain", ">")]))
    control = get("methods", "every")
    if pro is not None and control is not None:
        claim("control", f"{control['variant']}: general x{control['forgetting']:.2f}, domain /{control['gain']:.2f} "
                         f"({control['trainable_params']:,} trainable) vs llama-pro x{pro['forgetting']:.2f}, "
                         f"/{pro['gain']:.2f} ({pro['trainable_params']:,} trainable)", "n/a")
    inter, top, bottom = get("placement", "interleave"), get("placement", "top"), get("placement", "bottom")
    if inter is not None and top is not None and bottom is not None:
        claim("bottom", "general x / domain /: " + ", ".join(f"{v['variant']} {v['forgetting']:.2f} / {v['gain']:.2f}"
                                                                for v in (inter, top, bottom)),
              _combine([holds(bottom, other, metric, relation) for other in (inter, top)
                        for metric, relation in (("gain", "<"), ("forgetting", ">"))]))
    counts = summary[summary["experiment"] == "n_blocks"]
    if len(counts) > 1:
        first, last = counts.iloc[0], counts.iloc[-1]
        flat = counts["forgetting"].max() <= 1.1 * counts["forgetting"].min()  # general flat: within 10%
        claim("n_blocks", "domain perplexity / by blocks added: " + ", ".join(
            f"{v} {g:.2f}" for v, g in zip(counts["variant"], counts["gain"])) + "; general x: " + ", ".join(
            f"{f:.2f}" for f in counts["forgetting"]),
              _combine([holds(last, first, "gain", ">"), "yes" if flat else "no"]))
    inits = summary[summary["experiment"] == "init"]
    if len(inits):
        claim("init", "general x / domain / by initialisation: " + ", ".join(
            f"{v['variant']} {v['forgetting']:.2f} / {v['gain']:.2f}" for _, v in inits.iterrows()), "n/a")
    controls = summary[summary["experiment"] == "control"]
    if len(controls):
        claim("repair", "trained on general text, general x: " + ", ".join(
            f"{v['variant']} {v['forgetting']:.2f}{interval(v, 'forgetting')}" for _, v in controls.iterrows()), "n/a")
    rec = summary[summary["experiment"] == "recovery"]
    dus_row, stack_row = get("recovery", "DUS"), get("recovery", "stack")
    if dus_row is not None and stack_row is not None:
        claim("recovery", "general perplexity at step 0 -> end: " + ", ".join(
            f"{v['variant']} {v['general_ppl_start']:.1f} -> {v['general_ppl_end']:.1f}" for _, v in rec.iterrows()),
              "yes" if dus_row["general_ppl_start"] < stack_row["general_ppl_start"]
              and dus_row["general_ppl_end"] <= stack_row["general_ppl_end"] * 1.02 else "no")
    return pd.DataFrame(rows, columns=["claim", "paper", "measured", "holds_here"])


def figures(results: pd.DataFrame, summary: pd.DataFrame, prefix: str, out: str | Path | None = None) -> list[Path]:
    """The experiments as figures: gain against forgetting per experiment (each variant's pooled value with its 95%
    interval; upper left is better), and the held-out curves of the methods and of the recovery. Returns the paths."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    paths = []
    panels = [e for e in ("methods", "placement", "n_blocks", "init") if e in set(summary["experiment"])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False,
                                 layout="constrained")
        for i, (ax, experiment) in enumerate(zip(axes[0], panels)):
            part = summary[summary["experiment"] == experiment]
            colors = sns.color_palette("tab10", len(part))
            for color, (_, row) in zip(colors, part.iterrows()):
                xerr = [[row["forgetting"] - row.get("forgetting_lo", row["forgetting"])],
                        [row.get("forgetting_hi", row["forgetting"]) - row["forgetting"]]]
                yerr = [[row["gain"] - row.get("gain_lo", row["gain"])], [row.get("gain_hi", row["gain"]) - row["gain"]]]
                ax.errorbar(row["forgetting"], row["gain"], xerr=xerr, yerr=yerr, fmt="o", ms=7, color=color,
                            capsize=3, label=row["variant"])
            if part["gain"].max() > 4 * part["gain"].min():
                ax.set_yscale("log")
            if part["forgetting"].max() > 4 * part["forgetting"].min():  # e.g. a run that diverged: log, so the
                ax.set_xscale("log")  # others are not squashed into one point
            ax.set(xlabel="forgetting: general ppl end / base", ylabel="gain: domain ppl base / end" if i == 0 else "",
                   title=experiment)
            ax.legend(fontsize=8, loc="best", framealpha=0.8)
        fig.suptitle("Domain gain against general forgetting (upper left is better; bars: 95% intervals)")
        paths.append(plots.save(fig, f"{prefix}_forgetting_vs_gain", out))
        plt.close(fig)
    chosen = results.merge(summary[["experiment", "variant", "lr"]], on=["experiment", "variant", "lr"])
    curves = []
    for _, row in chosen.iterrows():
        for r in read_metrics(REPO / row["folder"]):  # a relative folder is the repository's; an absolute one stays
            if "ppl_general" in r:
                curves.append({"experiment": row["experiment"], "variant": row["variant"], "seed": row["seed"],
                               "tokens": r["tokens"], "general": r["ppl_general"], "domain": r["ppl_domain"]})
    curves = pd.DataFrame(curves)
    for experiment, metrics in (("methods", ("general", "domain")), ("recovery", ("general",))):
        part = curves[curves["experiment"] == experiment] if len(curves) else curves
        if not len(part):
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False,
                                 layout="constrained")
        for ax, metric in zip(axes[0], metrics):
            sns.lineplot(data=part, x="tokens", y=metric, hue="variant", marker="o", errorbar=("pi", 100), ax=ax)
            ax.set(yscale="log", ylabel=f"held-out {metric} perplexity", xlabel="training tokens",
                   title=f"{experiment}: {metric} text")
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
            ax.legend(fontsize=8, title=None)
        paths.append(plots.save(fig, f"{prefix}_{experiment}_curves", out))
        plt.close(fig)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rung", default="tiny", choices=RUNGS, help="tiny (a few-million-parameter base) or smol "
                                                                      "(SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", choices=PROFILES,
                        help="cpu or gpu: which config and experiments (default: gpu when CUDA is present)")
    parser.add_argument("--seeds", type=int, help="seeds per run (default: tiny 2, smol 1)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at once, one process each (default: 2; use 1 on one GPU)")
    parser.add_argument("--experiments", help=f"comma list of {', '.join(EXPERIMENTS)} (default: the profile's)")
    parser.add_argument("--sweep", help="a learning-rate sweep, e.g. lr=1e-4,3e-4,1e-3: each variant's rate is "
                                        "chosen on the validation half of the held-out blocks, reported on the test "
                                        "half (default: smol's gpu profile lr=1e-4,3e-4,1e-3; none elsewhere)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their planned GPU time; train nothing")
    parser.add_argument("--root", help="folder of the runs (default runs/reproduce/<rung>)")
    parser.add_argument("--out", help="folder for the CSVs and figures (default figures/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run, e.g. train.steps=20")


def main(args: argparse.Namespace) -> int:
    import torch

    start = time.perf_counter()
    gpu = torch.accelerator.is_available()
    profile = args.profile or ("gpu" if gpu else "cpu")
    sweep = args.sweep if args.sweep is not None else DEFAULT_SWEEP.get((args.rung, profile))
    experiments = tuple(args.experiments.split(",")) if args.experiments else None
    if args.dry_run:
        rung_config(args.rung, profile, args.overrides)
        chosen = experiments or DEFAULT_EXPERIMENTS.get((args.rung, profile), EXPERIMENTS)
        todo = jobs_of([e for e in plan_runs(args.rung, profile, args.overrides) if e.experiment in chosen],
                       args.seeds or DEFAULT_SEEDS[args.rung], parse_sweep(sweep),
                       runs_root(args.rung, profile, args.overrides), args.overrides)
        distinct = {j.folder: j for j in todo}
        config = rung_config(args.rung, profile, args.overrides)
        t = config.train
        for folder in distinct:
            print(folder.name)
        print(f"{len(distinct)} runs of {t.steps * t.global_batch * config.data.seq_len:,} tokens each "
              f"({', '.join(chosen)}; sweep {sweep or 'none'}); planned on one H100 at 40% MFU: "
              f"{duration(planned_seconds(args.rung, profile, list(distinct.values())))}")
        return 0
    threads = None if gpu else 1  # CPU: one thread per process is fastest here
    results = run(args.rung, profile, args.seeds, args.jobs, args.overrides, args.root, experiments, sweep,
                  threads=threads, out=args.out)

    out = Path(args.out) if args.out else plots.figures_dir()
    prefix = f"05_{args.rung}" + ("" if profile == "cpu" else f"_{profile}")
    summary = pd.read_csv(out / f"{prefix}_summary.csv")
    cols = ["experiment", "variant", "lr", "trainable_params", "general_ppl_end", "domain_ppl_end", "forgetting",
            "gain"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(summary[cols].round(3).to_string(index=False))
        print()
        for _, row in pd.read_csv(out / f"{prefix}_claims.csv", keep_default_na=False).iterrows():
            print(f"[{row['holds_here']:>12}] {row['paper']}\n      measured: {row['measured']}")
    print(f"\n{results['folder'].nunique()} runs; results in {out}/{prefix}_*.csv and .png "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
