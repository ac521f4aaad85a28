"""Print the README's results tables from the reproduction's CSVs (figures/05_<rung>_summary.csv, _claims.csv), so
the numbers there are the code's: python tools/results_tables.py tiny smol"""

import sys
from pathlib import Path

import pandas as pd

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def interval(row, metric: str, digits: int) -> str:
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    return "" if lo is None or pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(rung: str) -> str:
    summary = pd.read_csv(FIGURES / f"05_{rung}_summary.csv")
    lines = ["| experiment | variant | trainable | forgetting (general ×) | gain (domain ÷) |", "|---|---|---:|---:|---:|"]
    for _, row in summary.iterrows():
        lines.append(f"| {row['experiment']} | {row['variant']} | {int(row['trainable_params']):,} | "
                     f"×{row['forgetting']:.3f}{interval(row, 'forgetting', 3)} | "
                     f"÷{row['gain']:.2f}{interval(row, 'gain', 2)} |")
    return "\n".join(lines)


def claims(rung: str) -> str:
    words = {"yes": "holds", "no": "does not hold", "within noise": "within noise", "n/a": "n/a"}
    frame = pd.read_csv(FIGURES / f"05_{rung}_claims.csv", keep_default_na=False)
    return "\n".join(f"- **{row['claim']}**: {words[row['holds_here']]} — {row['measured']}" for _, row in frame.iterrows())


if __name__ == "__main__":
    for rung in sys.argv[1:] or ["tiny", "smol"]:
        print(f"### {rung}\n\n{table(rung)}\n\n{claims(rung)}\n")
