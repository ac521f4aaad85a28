"""The results tables of README.md and docs/results.md, made from the reproduction's CSVs (figures/05_*), so every
number there is the code's. Each table sits between `<!-- results:NAME -->` and `<!-- /results -->` in those files.

    python tools/results_tables.py           # print every table
    python tools/results_tables.py --write   # rewrite the marked tables in README.md and docs/results.md
    python tools/results_tables.py --check   # exit 1 if a marked table differs from what the CSVs give (a test runs it)
"""

import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
FILES = (ROOT / "README.md", ROOT / "docs" / "results.md")
MARK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
WORDS = {"yes": "holds", "no": "does not hold", "within noise": "within noise", "n/a": "no ordering to test"}
DRIFT = ("kl_text", "kl_chat", "kl_heldout", "answer_drift")


def interval(row, metric: str, digits: int) -> str:
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    return "" if lo is None or pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def _csv(name: str) -> pd.DataFrame | None:
    path = FIGURES / f"05_{name}.csv"
    return pd.read_csv(path, keep_default_na=not name.endswith("claims")) if path.is_file() else None


def methods(prefix: str) -> str:
    """The methods experiment at each variant's chosen rate: forgetting (and net of repair), drift, gain."""
    summary, results = _csv(f"{prefix}_summary"), _csv(f"{prefix}_results")
    order = list(dict.fromkeys(results.loc[results["experiment"] == "methods", "variant"]))  # the experiment's order
    rows = summary[summary["experiment"] == "methods"].set_index("variant").loc[order].reset_index()
    drift = [m for m in DRIFT if m in rows and rows[m].notna().all()]
    head = ["run", "lr", "trainable", "tokens/s", "general ppl ×", *(["net of repair ×"] if "net_forgetting" in rows
                                                                    else []), *drift, "code ppl ÷ (gain)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for _, r in rows.iterrows():
        net = []
        if "net_forgetting" in rows:
            net = [f"×{r['net_forgetting']:.3f}{interval(r, 'net_forgetting', 3)}"
                   if pd.notna(r["net_forgetting"]) else "—"]
        lines.append("| " + " | ".join([
            r["variant"], f"{float(r['lr']):g}", f"{int(r['trainable_params']):,}", f"{float(r['tokens_per_s']):,.0f}",
            f"×{float(r['forgetting']):.3f}{interval(r, 'forgetting', 3)}", *net,
            *(f"{float(r[m]):.4f}{interval(r, m, 4)}" for m in drift),
            f"÷{float(r['gain']):.3f}{interval(r, 'gain', 3)}"]) + " |")
    return "\n".join(lines)


def frontier(prefix: str) -> str:
    """For each run of the methods experiment (every rate), the runs of other methods that reach at least its gain
    with less drift on the base's own samples, beyond noise (deepen.reproduce.dominated)."""
    from deepen.reproduce import dominated

    pairs = _csv(f"{prefix}_pairs")
    measure = "kl_text" if (pairs["metric"] == "kl_text").any() else "kl_heldout"
    return "\n".join(f"- {r['variant']} at {r['lr']:g}: " + (
        f"reached with less {measure} and at least its gain by {', '.join(r['by'])}" if r["by"] else
        f"on the frontier: no run of another method reaches its gain with less {measure}")
        for _, r in dominated(pairs, measure).iterrows())


def paired(prefix: str) -> str:
    """Every pair of runs, paired on the same items: the gain ratio and the drift differences, with verdicts."""
    frame = _csv(f"{prefix}_pairs")
    lines = []
    for (a, a_lr, b, b_lr), group in frame.groupby(["a", "a_lr", "b", "b_lr"], sort=False):
        parts = [f"{r['metric']} {'×' if r['metric'] in ('gain', 'forgetting') else ''}"
                 f"{r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] ({r['a_is']})" for _, r in group.iterrows()
                 if r["metric"] in ("gain", "kl_text", "kl_heldout")]
        lines.append(f"- {a} at {a_lr:g} against {b} at {b_lr:g}: " + "; ".join(parts))
    return "\n".join(lines)


def claims(prefix: str) -> str:
    frame = _csv(f"{prefix}_claims")
    return "\n".join(f"- **{row['claim']}**: {WORDS[row['holds_here']]} — {row['measured']}"
                     for _, row in frame.iterrows())


def tiny() -> str:
    summary = _csv("tiny_summary")
    lines = ["| experiment | variant | trainable | forgetting (general ×) | kl_text | gain (domain ÷) |",
             "|---|---|---:|---:|---:|---:|"]
    for _, r in summary.iterrows():
        kl = f"{r['kl_text']:.3f}{interval(r, 'kl_text', 3)}" if "kl_text" in r and pd.notna(r["kl_text"]) else "—"
        lines.append(f"| {r['experiment']} | {r['variant']} | {int(r['trainable_params']):,} | "
                     f"×{float(r['forgetting']):.3f}{interval(r, 'forgetting', 3)} | {kl} | "
                     f"÷{float(r['gain']):.2f}{interval(r, 'gain', 2)} |")
    return "\n".join(lines)


def notebook_minutes() -> str:
    """How long each notebook took when `make notebooks` last executed it (its stamp), and in which profile."""
    import json

    cells = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        stamp = json.loads(path.read_text())["metadata"].get("deepen")
        cells.append(f"`{path.stem[:2]}` {stamp['minutes']:g} min" if stamp else f"`{path.stem[:2]}` not stamped")
    profiles = {json.loads(p.read_text())["metadata"].get("deepen", {}).get("profile")
                for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    return (f"Run time of each notebook in the `{'/'.join(sorted(p for p in profiles if p))}` profile, as `make "
            f"notebooks` last measured it on 2 CPU cores (with the runs they read already there): " + ", ".join(cells) + ".")


TABLES = {
    "notebook-minutes": notebook_minutes,
    "smol-gpu": lambda: methods("smol_gpu"), "smol-gpu-frontier": lambda: frontier("smol_gpu"),
    "smol-gpu-claims": lambda: claims("smol_gpu"), "smol-cpu": lambda: methods("smol"),
    "smol-cpu-pairs": lambda: paired("smol"), "tiny": tiny, "tiny-claims": lambda: claims("tiny"),
}


def rewritten(text: str) -> str:
    return MARK.sub(lambda m: m.group(1) + TABLES[m.group("name")]() + "\n" + m.group(4), text)


def main(argv: list[str]) -> int:
    if "--write" in argv or "--check" in argv:
        stale = []
        for path in FILES:
            text = path.read_text()
            new = rewritten(text)
            if new != text:
                stale.append(path.relative_to(ROOT))
                if "--write" in argv:
                    path.write_text(new)
        if stale and "--check" in argv:
            print(f"results tables out of date in {', '.join(map(str, stale))}: run python tools/results_tables.py "
                  "--write", file=sys.stderr)
            return 1
        return 0
    for name, make in TABLES.items():
        print(f"### {name}\n\n{make()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
