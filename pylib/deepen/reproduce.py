"""`make reproduce` / `deepen reproduce`: the papers' comparisons, run on one base with the same domain tokens and
the same seeds, with what the papers claim set beside what we measured.

1. methods   — LLaMA Pro (grown, only the new blocks learn) vs full fine-tuning of the base (SeqFT) vs LoRA with
               about as many trainable parameters vs full fine-tuning of the grown model vs training every k-th
               *original* block, adding no parameters (the control users asked the LLaMA Pro authors for);
2. placement — the same new blocks interleaved, all on top, all at the bottom;
3. n_blocks  — how many blocks to add (1, 2, 4, 8 on the tiny rung);
4. recovery  — SOLAR: depth up-scaling (drop m = L/4) vs plain stacking (m = 0) vs the base, all trained fully
               on general text: how much the growth costs at step 0 and how fast it recovers.

Every run is one `deepen.train.train` of the rung's config (configs/tiny-cpu.yaml, configs/smol-gpu.yaml) with
overrides, in runs/reproduce/<rung>/<run>-s<seed>; a finished run is not run again, a killed one resumes.
Results: figures/05_<rung>_results.csv (one row per run and seed), 05_<rung>_summary.csv (seed means),
05_<rung>_claims.csv, and figures 05_<rung>_*.png.

    deepen reproduce                      # the tiny rung, 2 seeds, 2 processes: under 30 minutes on 2 CPU cores
    deepen reproduce --rung smol --jobs 1 # on a GPU
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

import pandas as pd

from deepen import REPO, plots
from deepen.budget import model_config, shape_of
from deepen.config import load_config
from deepen.plan import llama_pro
from deepen.rundir import read_metrics
from deepen.runs import RunResult
from deepen.train import train

RUNGS = {"tiny": "configs/tiny-cpu.yaml", "smol": "configs/smol-gpu.yaml"}
EXPERIMENTS = ("methods", "placement", "n_blocks", "recovery")


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


def rung_config(rung: str, overrides: list[str] = ()):
    if rung not in RUNGS:
        raise ValueError(f"rung={rung!r} is not one of {', '.join(RUNGS)}")
    return load_config(REPO / RUNGS[rung], list(overrides))


def base_layers(config) -> int:
    return model_config(config.model).num_hidden_layers


def _grow(groups: int, placement: str = "interleave") -> str:
    return f"grow={{method: llama-pro, groups: {groups}, copies: 1, placement: {placement}}}"


def lora_rank(config, target: int) -> int:
    """The LoRA rank whose adapters (on the config's lora.targets of the base) have closest to `target` parameters."""
    one = dataclasses.replace(config, grow=None, method="lora", lora=dataclasses.replace(config.lora, r=1))
    return max(1, round(target / shape_of(one).trainable))


def plan_runs(rung: str, overrides: list[str] = ()) -> list[Entry]:
    """The experiments' entries for a rung (its config's grow.groups is the reference LLaMA Pro run)."""
    config = rung_config(rung, overrides)
    n = base_layers(config)
    groups = config.grow.groups if config.grow and config.grow.method == "llama-pro" and config.grow.groups else 2
    plan = llama_pro(n, groups)
    pro = Run(f"llama-pro-{groups}", (_grow(groups), "method=llama-pro"))
    r = lora_rank(config, shape_of(rung_config(rung, [*overrides, *pro.overrides])).trainable)
    copied = sorted({plan.layers[i].source for i in plan.new_layers})
    every = n // groups
    entries = [
        Entry("methods", "llama-pro", pro),
        Entry("methods", "full (SeqFT)", Run("full", ("grow=null", "method=full"))),
        Entry("methods", f"lora r={r}", Run(f"lora-r{r}", ("grow=null", "method=lora", f"lora.r={r}"))),
        Entry("methods", "grown, full", Run(f"grown-full-{groups}", (_grow(groups), "method=full"))),
        Entry("methods", f"every {_ordinal(every)} original block",
              Run("blocks-" + "-".join(map(str, copied)), ("grow=null", "method=blocks", f"blocks={copied}"))),
    ]
    for placement in ("interleave", "top", "bottom"):
        run = pro if placement == "interleave" else Run(f"llama-pro-{groups}-{placement}",
                                                         (_grow(groups, placement), "method=llama-pro"))
        entries.append(Entry("placement", placement, run))
    counts = [g for g in (1, 2, 4, 8) if n % g == 0] if n <= 16 else [g for g in range(1, 11) if n % g == 0]
    for g in counts:
        run = pro if g == groups else Run(f"llama-pro-{g}", (_grow(g), "method=llama-pro"))
        entries.append(Entry("n_blocks", f"{g} new", run))
    general = ("data.domain=general",)  # recovery: trained on the base's own kind of text, like SOLAR's CPT
    m = n // 4
    entries += [
        Entry("recovery", "base", Run("recovery-base", ("grow=null", "method=full", *general))),
        Entry("recovery", f"DUS m={m} ({2 * (n - m)} layers)",
              Run(f"recovery-dus-{m}", (f"grow={{method: dus, drop: {m}}}", "method=full", *general))),
        Entry("recovery", f"stack m=0 ({2 * n} layers)",
              Run("recovery-stack", ("grow={method: dus, drop: 0}", "method=full", *general))),
    ]
    return entries


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


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


def run(rung: str = "tiny", seeds: int = 2, jobs: int = 2, overrides: list[str] = (), root: str | Path | None = None,
        experiments: tuple[str, ...] = EXPERIMENTS, threads: int | None = 1, progress: bool = True,
        out: str | Path | None = None) -> pd.DataFrame:
    """Run (or pick up the finished) runs of `experiments` for `seeds` seeds with `jobs` processes; write the
    CSVs and figures into `out` (default figures/); return the per-run results. `overrides` apply to every run
    (e.g. train.steps=20); runs with overrides go to their own folder, so they never mix with the default ones.
    threads: torch threads per run (None: as they are)."""
    from tqdm.auto import tqdm

    rung_config(rung, overrides)  # a bad rung or override fails here, before any work
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if seeds < 1 or jobs < 1:
        raise ValueError(f"seeds and jobs must be at least 1, got seeds={seeds}, jobs={jobs}")
    if root is None:
        suffix = "-" + hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:8] if overrides else ""
        root = runs_dir() / f"{rung}{suffix}"
    root = Path(root)
    entries = [e for e in plan_runs(rung, overrides) if e.experiment in experiments]
    todo = {}
    for e in entries:
        for seed in range(seeds):
            todo[(e.run.name, seed)] = (str(REPO / RUNGS[rung]),
                                        (*overrides, *e.run.overrides, f"train.seed={seed}"),
                                        root / f"{e.run.name}-s{seed}", threads)
    bar = tqdm(total=len(todo), desc=f"reproduce {rung}: {len(todo)} runs", disable=not progress)
    if jobs == 1:
        for args in todo.values():
            _one(args)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            try:
                for future in as_completed([pool.submit(_one, args) for args in todo.values()]):
                    future.result()  # a failed run fails the whole reproduction, with its error
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # not the runs queued behind it
                raise
    bar.close()

    results = pd.DataFrame([_row(e, seed, root / f"{e.run.name}-s{seed}") for e in entries for seed in range(seeds)])
    summary = summarise(results)
    claims = check_claims(summary)
    prefix = f"05_{rung}"
    out = Path(out) if out is not None else plots.figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / f"{prefix}_results.csv", index=False, float_format="%.6g")
    summary.to_csv(out / f"{prefix}_summary.csv", index=False, float_format="%.6g")
    claims.to_csv(out / f"{prefix}_claims.csv", index=False)
    figures(results, prefix, out)
    return results


def runs_dir() -> Path:
    """runs/reproduce in the repository (else in the working directory): where every rung's runs live."""
    return (REPO if (REPO / "pyproject.toml").is_file() else Path.cwd()) / "runs" / "reproduce"


def _row(entry: Entry, seed: int, folder: Path) -> dict:
    run = RunResult.read(folder)
    shape = shape_of(load_config(folder / "config.yaml"))
    return {
        "experiment": entry.experiment, "variant": entry.variant, "run": entry.run.name, "seed": seed,
        "method": run.config["method"], "layers": len(shape.blocks), "params": shape.params,
        "trainable_params": shape.trainable, **run.summary(), "final_loss": run.final_loss,
        "tokens_per_s": run.tokens_per_s, "train_seconds": run.train_seconds, "folder": _shown(folder),
    }


def _shown(folder: Path) -> str:
    """A run folder as the tables show it: relative to the repository when inside it (no machine paths)."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Seed means per experiment and variant, with the spread (max - min) of forgetting and gain over seeds;
    forgetting and gain as deepen.runs defines them (against the base, before growing)."""
    keep = ["layers", "params", "trainable_params", "general_ppl_base", "general_ppl_start", "general_ppl_end",
            "domain_ppl_base", "domain_ppl_start", "domain_ppl_end", "forgetting", "gain", "tokens_per_s",
            "train_seconds"]
    grouped = results.groupby(["experiment", "variant", "run"], sort=False)
    summary = grouped[keep].mean().reset_index()
    for column in ("layers", "params", "trainable_params"):
        summary[column] = summary[column].round().astype("int64")  # counts stay exact integers
    summary["seeds"] = grouped.size().values
    spread = grouped[["forgetting", "gain"]].agg(lambda s: s.max() - s.min()).reset_index(drop=True)
    summary["forgetting_spread"], summary["gain_spread"] = spread["forgetting"].values, spread["gain"].values
    return summary


PAPER = {  # LLaMA Pro (arXiv 2401.02415) ablations and SOLAR (arXiv 2312.15166), as the papers state them
    "retention": "general retention: LoRA > expansion >= full fine-tuning (law domain, general avg: LoRA 58.15, "
                 "+8 blocks 56.70, full 55.01)",
    "gain": "domain gain: expansion > full fine-tuning > LoRA (law score: +8 blocks 75.11, full 70.63, LoRA 65.34)",
    "bottom": "blocks at the bottom are the worst placement on both axes: 8 at the bottom collapse (general 29.36, "
              "law 0.81) where interleaved keep 56.70 / 75.11 and the top 56.19 / 60.98",
    "n_blocks": "more blocks: domain score rises to +8 (67.45 at +1 -> 75.11 at +8), general stays within 55.9-56.7",
    "control": "training every 4th original block: no number in the paper (users asked for it)",
    "recovery": "SOLAR: dropping m layers at the seam reduces the discrepancy vs stacking and recovers fast in "
                "continued pretraining (no curves or numbers given)",
}


def check_claims(summary: pd.DataFrame) -> pd.DataFrame:
    """Each paper claim beside what we measured and whether it holds here (None where the paper states no
    ordering)."""
    def get(experiment: str, prefix: str) -> pd.Series | None:
        rows = summary[(summary["experiment"] == experiment) & summary["variant"].str.startswith(prefix)]
        return rows.iloc[0] if len(rows) else None

    rows = []

    def claim(key: str, measured: str, holds: bool | None) -> None:
        rows.append({"claim": key, "paper": PAPER[key], "measured": measured,
                     "holds_here": "n/a" if holds is None else "yes" if holds else "no"})

    pro, full, lora = get("methods", "llama-pro"), get("methods", "full"), get("methods", "lora")
    if pro is not None and full is not None and lora is not None:
        f = {k: v["forgetting"] for k, v in (("LoRA", lora), ("expansion", pro), ("full", full))}
        g = {k: v["gain"] for k, v in (("LoRA", lora), ("expansion", pro), ("full", full))}
        claim("retention", "general perplexity x " + ", ".join(f"{k} {v:.2f}" for k, v in f.items()),
              f["LoRA"] < f["expansion"] <= f["full"])
        claim("gain", "domain perplexity / " + ", ".join(f"{k} {v:.1f}" for k, v in g.items()),
              g["expansion"] > g["full"] > g["LoRA"])
    control = get("methods", "every")
    if pro is not None and control is not None:
        claim("control", f"{control['variant']}: general x{control['forgetting']:.2f}, domain /{control['gain']:.1f} "
                         f"({control['trainable_params']:,.0f} trainable) vs llama-pro x{pro['forgetting']:.2f}, "
                         f"/{pro['gain']:.1f} ({pro['trainable_params']:,.0f} trainable)", None)
    inter, top, bottom = get("placement", "interleave"), get("placement", "top"), get("placement", "bottom")
    if inter is not None and top is not None and bottom is not None:
        claim("bottom", "general x / domain /: " + ", ".join(f"{v['variant']} {v['forgetting']:.2f} / {v['gain']:.1f}"
                                                                for v in (inter, top, bottom)),
              bottom["gain"] < min(inter["gain"], top["gain"]) and bottom["forgetting"] > max(inter["forgetting"],
                                                                                               top["forgetting"]))
    counts = summary[summary["experiment"] == "n_blocks"]
    if len(counts) > 1:
        claim("n_blocks", "domain perplexity / by blocks added: " + ", ".join(
            f"{v} {g:.1f}" for v, g in zip(counts["variant"], counts["gain"])) + "; general x: " + ", ".join(
            f"{f:.2f}" for f in counts["forgetting"]),
              counts["gain"].iloc[-1] > counts["gain"].iloc[0]  # more gain with more blocks ...
              and counts["forgetting"].max() <= 1.1 * counts["forgetting"].min())  # ... general flat (within 10%)
    rec = summary[summary["experiment"] == "recovery"]
    dus_row, stack_row = get("recovery", "DUS"), get("recovery", "stack")
    if dus_row is not None and stack_row is not None:
        base_row = get("recovery", "base")
        claim("recovery", "general perplexity at step 0 -> end: " + ", ".join(
            f"{v['variant']} {v['general_ppl_start']:.1f} -> {v['general_ppl_end']:.1f}" for _, v in rec.iterrows()),
              dus_row["general_ppl_start"] < stack_row["general_ppl_start"]
              and dus_row["general_ppl_end"] <= stack_row["general_ppl_end"] * 1.02
              if base_row is not None else None)
    return pd.DataFrame(rows, columns=["claim", "paper", "measured", "holds_here"])


def figures(results: pd.DataFrame, prefix: str, out: str | Path | None = None) -> list[Path]:
    """The experiments as figures: forgetting against gain per method, placement and block count, and the
    recovery curves. Returns the paths written."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = results
    paths = []
    panels = [e for e in ("methods", "placement", "n_blocks") if e in set(df["experiment"])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False,
                                 layout="constrained")
        for i, (ax, experiment) in enumerate(zip(axes[0], panels)):
            part = df[df["experiment"] == experiment]
            sns.scatterplot(data=part, x="forgetting", y="gain", hue="variant", style="variant", s=90, ax=ax)
            ax.set(xlabel="forgetting: general ppl end / base  (lower: better)",
                   ylabel="gain: domain ppl start / end  (higher: better)" if i == 0 else "", title=experiment)
            if part["gain"].max() > 4 * part["gain"].min():
                ax.set_yscale("log")
            ax.legend(fontsize=8, title=None)
        fig.suptitle("Domain gain against general forgetting (each point one seed)")
        paths.append(plots.save(fig, f"{prefix}_forgetting_vs_gain", out))
        plt.close(fig)
    curves = []
    for _, row in results.iterrows():
        for r in read_metrics(REPO / row["folder"]):  # a relative folder is the repository's; an absolute one stays
            if "ppl_general" in r:
                curves.append({"experiment": row["experiment"], "variant": row["variant"], "seed": row["seed"],
                               "tokens": r["tokens"], "general": r["ppl_general"], "domain": r["ppl_domain"]})
    curves = pd.DataFrame(curves)
    for experiment, metrics in (("methods", ("general", "domain")), ("recovery", ("general",))):
        part = curves[curves["experiment"] == experiment] if len(curves) else curves
        if not len(part):
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            sns.lineplot(data=part, x="tokens", y=metric, hue="variant", marker="o", errorbar=("pi", 100), ax=ax)
            ax.set(yscale="log", ylabel=f"held-out {metric} perplexity", xlabel="training tokens",
                   title=f"{experiment}: {metric} text")
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
        paths.append(plots.save(fig, f"{prefix}_{experiment}_curves", out))
        plt.close(fig)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rung", default="tiny", choices=list(RUNGS), help="tiny (CPU) or smol (a GPU)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per run (default 2)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at once, one process each (default: 2; use 1 on one GPU)")
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma list of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--root", help="folder of the runs (default runs/reproduce/<rung>)")
    parser.add_argument("--out", help="folder for the CSVs and figures (default figures/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run, e.g. train.steps=20")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    import torch

    threads = 1 if not torch.accelerator.is_available() else None  # CPU: one thread per process is fastest here
    results = run(args.rung, args.seeds, args.jobs, args.overrides, args.root, tuple(args.experiments.split(",")),
                  threads=threads, out=args.out)

    out = Path(args.out) if args.out else plots.figures_dir()
    prefix = f"05_{args.rung}"
    summary = pd.read_csv(out / f"{prefix}_summary.csv")
    cols = ["experiment", "variant", "trainable_params", "general_ppl_end", "domain_ppl_end", "forgetting", "gain"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(summary[cols].round(2).to_string(index=False))
        print()
        for _, row in pd.read_csv(out / f"{prefix}_claims.csv", keep_default_na=False).iterrows():
            print(f"[{row['holds_here']:>3}] {row['paper']}\n      measured: {row['measured']}")
    print(f"\n{results['folder'].nunique()} runs; results in {out}/{prefix}_*.csv and .png ({time.perf_counter() - start:.0f} s)")
    return 0
