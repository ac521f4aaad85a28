"""Read a run folder (deepen.rundir) as a result — and the one definition of forgetting and gain.

    forgetting = general perplexity at the end / the base's     (1.0: nothing forgotten; higher: worse)
    gain       = the base's domain perplexity / at the end      (1.0: nothing learnt; higher: better)

"The base" is the model before it was grown: for a plan that keeps the function (LLaMA Pro) and for no plan,
the run's own step 0; for a plan that changes it (SOLAR's DUS, stacking), the base measured before growing, so
the damage the growth did counts against the run. Every caller — the CLI, the demo, `deepen reproduce`, the
results explorer, the notebooks — reads runs through `RunResult`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepen.config import RunConfig, saved_config
from deepen.forgetting import MEASURES, load_drift
from deepen.rundir import CONFIG, EVALUATIONS, FINAL, METRICS, read_metrics

BOOTSTRAP = 2000  # resamples of the held-out blocks for a 95% interval
# Parts of the held-out blocks: a learning-rate sweep picks on the validation half and reports on the test half
# (the blocks are the held-out documents packed in order, so the halves share at most the one straddling document).
PARTS = ("all", "validation", "test")


def part_of(n: int, part: str) -> slice:
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not one of {', '.join(PARTS)}")
    return {"all": slice(None), "validation": slice(0, n // 2), "test": slice(n // 2, n)}[part]


def bootstrap(stat, *columns: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of stat(*columns) over the blocks resampled with replacement — paired: every
    column resampled at the same blocks (the same held-out text for every run of a rung)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(columns[0]), size=(n, len(columns[0])))
    values = stat(*(c[idx] for c in columns))  # each column (n, blocks)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _exp_mean_difference(a, b):
    return np.exp(a.mean(-1) - b.mean(-1))


@dataclass
class RunResult:
    folder: Path
    config: RunConfig  # config.yaml as the run saved it
    records: list[dict]  # metrics.jsonl
    evaluations: list[dict] = field(default_factory=list)  # evaluations.jsonl: per-block losses (None: not saved)
    part: str = "all"  # the part of the held-out blocks its numbers are reported on by default (PARTS)
    drift: dict[str, list[float]] = field(default_factory=dict)  # drift.json's per-item values (deepen.forgetting)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunResult:
        folder = Path(folder)
        if not (folder / METRICS).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: it has no {METRICS} (written by `deepen train`)")
        config = folder / CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: it has no {CONFIG} (written by `deepen train`)")
        drift = load_drift(folder)
        return cls(folder, saved_config(config), read_metrics(folder), read_metrics(folder, EVALUATIONS),
                   drift=drift["measures"] if drift else {})

    @classmethod
    def pooled(cls, runs: list[RunResult], part: str = "all") -> RunResult:
        """One result standing for several runs of one setting (its seeds): per-block losses averaged over the runs,
        so its perplexities are their geometric mean; steps, tokens and config are the first run's."""
        if not runs or any(not r.evaluations for r in runs):
            raise ValueError("pooling needs runs with per-block losses (evaluations.jsonl)")

        def mean(key: str, when: str) -> list[float]:
            return np.mean([r.losses(key, when) for r in runs], axis=0).tolist()

        keys = ("general", "domain")
        evaluations = [{"step": 0, **{k: mean(k, "first") for k in keys}, **{f"base_{k}": mean(k, "base") for k in keys}},
                       {"step": runs[0].evaluations[-1]["step"], **{k: mean(k, "last") for k in keys}}]
        first = runs[0]
        drift = {name: np.mean([r.drift[name] for r in runs], axis=0).tolist() for name in first.drift
                 if all(name in r.drift for r in runs)}
        return cls(first.folder, first.config, first.records, evaluations, part, drift)

    @property
    def evaluated(self) -> list[dict]:
        """The records with held-out perplexities: step 0, every eval_every steps, the end."""
        return [r for r in self.records if "ppl_general" in r]

    @property
    def first(self) -> dict:
        return self.evaluated[0]

    @property
    def last(self) -> dict:
        return self.evaluated[-1]

    def losses(self, key: str, when: str = "last") -> np.ndarray | None:
        """Per-block held-out losses of corpus `key` ("general", "domain") at the base, the first or the last
        evaluation; None for a run that did not save them."""
        if not self.evaluations:
            return None
        if when == "base":
            record = self.evaluations[0]
            values = record.get(f"base_{key}", record.get(key))
        else:
            values = self.evaluations[0 if when == "first" else -1].get(key)
        return None if values is None else np.asarray(values, dtype=np.float64)

    def ppl(self, key: str, when: str = "last", part: str | None = None) -> float:
        """Held-out perplexity of corpus `key` at `when` ("base", "first", "last") on `part` of the blocks."""
        part = part or self.part
        losses = self.losses(key, when)
        if losses is None:
            if part != "all":
                raise ValueError(f"{self.folder} has no per-block losses ({EVALUATIONS}); only part='all'")
            record = self.first if when != "last" else self.last
            return record.get(f"base_ppl_{key}", record[f"ppl_{key}"]) if when == "base" else record[f"ppl_{key}"]
        return math.exp(losses[part_of(len(losses), part)].mean())

    def intervals(self, part: str | None = None) -> dict[str, tuple[float, float]]:
        """95% bootstrap intervals over the held-out blocks of the end perplexities, forgetting and gain (paired with
        the base's losses on the same blocks); {} for a run that did not save per-block losses."""
        part = part or self.part
        if self.losses("general") is None:
            return {}
        columns = {f"{key}_{when}": self.losses(key, when)[part_of(len(self.losses(key)), part)]
                   for key in ("general", "domain") for when in ("base", "last")}
        return {"general_ppl_end": bootstrap(lambda a: np.exp(a.mean(-1)), columns["general_last"]),
                "domain_ppl_end": bootstrap(lambda a: np.exp(a.mean(-1)), columns["domain_last"]),
                "forgetting": bootstrap(_exp_mean_difference, columns["general_last"], columns["general_base"]),
                "gain": bootstrap(_exp_mean_difference, columns["domain_base"], columns["domain_last"])}

    @property
    def finished(self) -> bool:
        return (self.folder / FINAL / "config.json").is_file()

    @property
    def base_measured(self) -> bool:
        """Whether the base's perplexities are known (else forgetting and gain are against step 0: a model grown
        on disk by a plan that changes the function, whose base could not be loaded)."""
        return "base_ppl_general" in self.first

    @property
    def base_general(self) -> float:
        return self.first.get("base_ppl_general", self.first["ppl_general"])

    @property
    def base_domain(self) -> float:
        return self.first.get("base_ppl_domain", self.first["ppl_domain"])

    @property
    def forgetting(self) -> float:
        return self.last["ppl_general"] / self.base_general

    @property
    def gain(self) -> float:
        return self.base_domain / self.last["ppl_domain"]

    @property
    def steps(self) -> int:
        return self.records[-1]["step"]

    @property
    def tokens(self) -> int:
        return self.records[-1]["tokens"]

    @property
    def _steps(self) -> list[dict]:
        return [r for r in self.records if "tokens_per_s" in r]

    @property
    def final_loss(self) -> float:
        steps = self._steps
        return steps[-1]["loss"] if steps else math.nan

    @property
    def tokens_per_s(self) -> float:
        """The mean of each step's tokens / its seconds (evaluation not counted)."""
        steps = self._steps
        return sum(r["tokens_per_s"] for r in steps) / len(steps) if steps else math.nan

    @property
    def train_seconds(self) -> float:
        steps = self._steps
        per_step = {r["step"]: r for r in steps}
        tokens = {r["step"]: r["tokens"] for r in self.records}
        return sum((r["tokens"] - tokens.get(s - 1, 0)) / r["tokens_per_s"] for s, r in per_step.items())

    def summary(self, part: str | None = None) -> dict:
        """The numbers a table shows, on `part` of the held-out blocks: base, start and end perplexities,
        forgetting and gain, and their 95% intervals (`_lo`, `_hi`) where per-block losses were saved."""
        part = part or self.part
        ppl = {f"{key}_ppl_{name}": self.ppl(key, when, part) for key in ("general", "domain")
               for name, when in (("base", "base"), ("start", "first"), ("end", "last"))}
        out = {"steps": self.steps, "tokens": self.tokens, **ppl,
               "forgetting": ppl["general_ppl_end"] / ppl["general_ppl_base"],
               "gain": ppl["domain_ppl_base"] / ppl["domain_ppl_end"], "base_measured": self.base_measured}
        for name, (lo, hi) in self.intervals(part).items():
            out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
        for name in MEASURES:  # drift from the base (deepen.forgetting): on all of its items whatever the part
            if name in self.drift:
                values = np.asarray(self.drift[name])
                out[name] = float(values.mean())
                out[f"{name}_lo"], out[f"{name}_hi"] = bootstrap(lambda a: a.mean(-1), values)
        return out

    def line(self) -> str:
        """One line for a terminal: perplexities from the base to the end, forgetting and gain."""
        against = "the base" if self.base_measured else "step 0 (the base was not measured)"
        return (f"held-out perplexity, base -> step {self.last['step']}: general {self.base_general:.2f} -> "
                f"{self.last['ppl_general']:.2f} (forgetting x{self.forgetting:.2f}), domain {self.base_domain:.2f} -> "
                f"{self.last['ppl_domain']:.2f} (gain /{self.gain:.2f}), against {against}")


def find_runs(root: str | os.PathLike, say=print) -> list[RunResult]:
    """Every run folder under `root` (root itself included), in path order; folders with no records skipped, and
    folders that cannot be read (no config.yaml, or one this version cannot read) skipped with a line each."""
    runs = []
    for path in sorted(Path(root).rglob(METRICS)):
        try:
            runs.append(RunResult.read(path.parent))
        except (FileNotFoundError, ValueError) as e:
            say(f"skipped {path.parent}: {e}")
    return [run for run in runs if run.evaluated]


def drift_difference(a: RunResult, b: RunResult, measure: str) -> tuple[float, float, float]:
    """(difference, lo, hi): run a's drift `measure` (deepen.forgetting.MEASURES) minus run b's, with the 95%
    interval of a paired bootstrap over the items both were scored on; an interval holding 0 means within noise."""
    x, y = np.asarray(a.drift[measure]), np.asarray(b.drift[measure])
    if x.shape != y.shape:
        raise ValueError(f"{a.folder} and {b.folder} were scored on different {measure} items")
    return (float(x.mean() - y.mean()), *bootstrap(lambda u, v: u.mean(-1) - v.mean(-1), x, y))


def within_noise(a: RunResult, b: RunResult, metric: str, part: str | None = None) -> tuple[float, float, float]:
    """(ratio, lo, hi): run a's `metric` ("forgetting" or "gain") over run b's, with the 95% interval of a paired
    bootstrap over the held-out blocks both were scored on; an interval holding 1 means the two are within noise."""
    key = {"forgetting": "general", "gain": "domain"}[metric]
    cut = part_of(len(a.losses(key)), part or a.part)
    columns = [r.losses(key, when)[cut] for r in (a, b) for when in ("last", "base")]
    if metric == "gain":  # gain = base / end: the ratio of two gains flips each run's pair
        columns = [columns[1], columns[0], columns[3], columns[2]]
    stat = lambda a_num, a_den, b_num, b_den: np.exp(a_num.mean(-1) - a_den.mean(-1) - b_num.mean(-1)  # noqa: E731
                                                     + b_den.mean(-1))
    ratio = float(stat(*(c[None] for c in columns))[0])
    return (ratio, *bootstrap(stat, *columns))
