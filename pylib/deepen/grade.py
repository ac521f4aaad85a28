"""Grade lab notebooks: run each one headless, read every exercise's check result from its kernel, and write a
per-exercise table (results.json, results.csv) — `deepen grade NOTEBOOK... [--out DIR]`, exit 1 unless all pass.

- An exercise is a code cell whose metadata says `"exercise": NAME`; its check is the cell calling
  `checks.check_NAME(...)`. An exercise whose check never ran (the notebook stopped earlier) is "not run".
- An exercise cell that raises (a syntax error, say), or a check cell that does (the function renamed), fails that
  exercise; the notebook goes on. A notebook that fails outside the exercises (a cell raising, a timeout) stops
  there and gets a row "(notebook)" with status "error", naming the cell and the error.
- Reference solutions are Python files with one `# %% NAME` section per exercise; `fill(notebook, solutions)`
  puts them into the exercise cells (`deepen grade --fill-from FOLDER` grades labNN_*.ipynb filled from
  FOLDER/labNN.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import nbformat

from deepen.checks import RESULTS_MARKER

EXERCISE = "exercise"  # the cell metadata key naming the exercise a cell holds
CHECK_CALL = re.compile(r"\bcheck_(\w+)\s*\(")
SECTION = re.compile(r"^# %% (\w+)\s*$", re.MULTILINE)
FIELDS = ("notebook", "exercise", "status", "feedback")


def exercises(nb) -> list[str]:
    """The exercises of a notebook in order: its exercise cells' names and the checks its cells call (a check cell
    deleted by mistake still leaves its exercise expected)."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            found = [cell.metadata[EXERCISE]] if cell.metadata.get(EXERCISE) else []
            names += [n for n in found + CHECK_CALL.findall(cell.source) if n not in names]
    return names


def read_solutions(path: str | os.PathLike) -> dict[str, str]:
    """{exercise name: code} from a solutions file's `# %% NAME` sections (the text before the first is ignored)."""
    text = Path(path).read_text()
    parts = SECTION.split(text)
    return {name: code.strip() + "\n" for name, code in zip(parts[1::2], parts[2::2])}


def solutions_file(notebook: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """FOLDER/labNN.py for a notebook named labNN_topic.ipynb."""
    path = Path(folder) / (Path(notebook).stem.split("_")[0] + ".py")
    if not path.is_file():
        raise FileNotFoundError(f"no solutions for {Path(notebook).name}: {path} not found")
    return path


def fill(nb, solutions: str | os.PathLike | dict[str, str]):
    """A copy of notebook `nb` with each exercise cell's code replaced by its solution."""
    code = solutions if isinstance(solutions, dict) else read_solutions(solutions)
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    cells = {cell.metadata.get(EXERCISE): cell for cell in nb.cells if cell.metadata.get(EXERCISE)}
    if set(code) != set(cells):
        raise ValueError(f"the solutions ({', '.join(sorted(code))}) do not match the notebook's exercise cells "
                         f"({', '.join(sorted(cells))})")
    for name, cell in cells.items():
        cell.source = code[name].rstrip("\n")
    return nb


def run(path: str | os.PathLike, nb=None, timeout: int = 600) -> list[dict]:
    """Execute a lab notebook (or `nb`, e.g. a filled copy, in the notebook's folder); return one row per exercise
    (notebook: the path as given, so many students' copies of one lab stay apart), and a "(notebook)" row if the
    notebook failed outside its exercises."""
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4) if nb is None else nb
    expected = exercises(nb)
    from nbclient.exceptions import DeadKernelError

    # interrupt_on_timeout: a cell that runs too long (a student's endless loop) is stopped, so the cells after it
    # and the final read of the results still run
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", interrupt_on_timeout=True,
                            resources={"metadata": {"path": str(path.parent)}})
    error, found, broken = None, [], {}  # broken: exercise -> the error its own cell raised
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            checked = set(CHECK_CALL.findall(cell.source))
            if cell.cell_type != "code" or checked and checked <= set(broken):
                continue  # the check of an exercise whose cell failed: it would only fail again
            try:
                client.execute_cell(cell, index)
            except Exception as e:  # noqa: BLE001 — a cell's error, a timeout, a dead kernel: reported, not raised
                message = f"(cell {index + 1}) raised {_error(e)}"
                if isinstance(e, DeadKernelError):  # nothing more can run, the results included
                    error = f"cell {index + 1}: the kernel died ({_error(e)})"
                    break
                if cell.metadata.get(EXERCISE):  # the student's own cell: that exercise fails, the others go on
                    broken[cell.metadata[EXERCISE]] = f"the exercise cell {message}"
                elif checked:  # a check cell raises only when the student renamed or deleted what it checks
                    broken.update({name: f"the check cell {message}" for name in checked})
                else:
                    error = f"cell {index + 1} raised {_error(e)}"
                    break
        collect = nbformat.v4.new_code_cell("import deepen.checks\ndeepen.checks.emit()")
        nb.cells.append(collect)
        try:
            if error is None or "kernel died" not in error:
                client.execute_cell(collect, len(nb.cells) - 1)
                found = _emitted(collect)
        except Exception as e:  # noqa: BLE001
            error = error or f"the results could not be read: {_error(e)}"
        finally:
            nb.cells.pop()
    results = {name: {"status": "fail", "feedback": feedback} for name, feedback in broken.items()}
    results.update({r["name"]: r for r in found})
    not_run = {"status": "not run", "feedback": f"the check did not run: the notebook stopped first ({error})" if error
               else "the check did not run"}
    rows = [{"notebook": str(path), "exercise": name, "status": results.get(name, not_run)["status"],
             "feedback": results.get(name, not_run)["feedback"]} for name in dict.fromkeys([*expected, *results])]
    if error:
        rows.append({"notebook": str(path), "exercise": "(notebook)", "status": "error", "feedback": error})
    return rows


def _error(e: Exception) -> str:
    """'NameError: name 'x' is not defined' from a cell's error (nbclient gives ename and evalue), one line."""
    name = getattr(e, "ename", None) or type(e).__name__
    value = getattr(e, "evalue", None)
    if value is None:
        value = (str(e).strip().splitlines() or [""])[-1]
    return f"{name}: {value}"


def _emitted(cell) -> list[dict]:
    for output in cell.outputs:
        for line in output.get("text", "").splitlines():
            if line.startswith(RESULTS_MARKER):
                return json.loads(line[len(RESULTS_MARKER):])
    return []


def grade(notebooks: list[str | os.PathLike], out: str | os.PathLike, solutions: str | os.PathLike | None = None,
          timeout: int = 600) -> list[dict]:
    """Run each notebook (filled from `solutions`, a folder of labNN.py, if given); write out/results.json and
    out/results.csv; return the rows."""
    rows = []
    for notebook in notebooks:
        nb = nbformat.read(notebook, as_version=4)
        if not exercises(nb):
            raise ValueError(f"{notebook} has no exercises (no cell marked as one, no checks.check_... call): "
                             "is it a lab? The labs are notebooks/labs/lab*.ipynb")
        if solutions is not None:
            nb = fill(nb, solutions_file(notebook, solutions))
        rows += run(notebook, nb, timeout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    passed = all(r["status"] == "pass" for r in rows)
    report = {"passed": passed, "results": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def table(rows: list[dict], width: int = 120) -> str:
    """The rows as a text table, one line per exercise, feedback cut to fit `width`."""
    if not rows:
        return "no notebooks graded"
    columns = FIELDS[:-1]
    w = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
    room = max(width - sum(w.values()) - 2 * len(columns), 30)

    def line(row: dict) -> str:
        feedback = row["feedback"].replace("\n", " ")
        feedback = feedback if len(feedback) <= room else feedback[:room - 1] + "…"
        return "  ".join([f"{row[k]:<{w[k]}}" for k in columns] + [feedback])

    done = sum(r["status"] == "pass" for r in rows)
    return "\n".join([line({k: k for k in FIELDS}), *map(line, rows), f"{done} of {len(rows)} pass"])


def add_arguments(parser) -> None:
    parser.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="lab notebooks to run and grade (.ipynb)")
    parser.add_argument("--out", default="grades", help="folder for results.json and results.csv (default grades)")
    parser.add_argument("--fill-from", metavar="FOLDER",
                        help="fill each labNN_*.ipynb's exercise cells from FOLDER/labNN.py first (reference "
                             "solutions)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default 600)")


def main(args) -> int:
    rows = grade(args.notebooks, args.out, args.fill_from, args.timeout)
    print(table(rows))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.csv'}")
    return 0 if all(r["status"] == "pass" for r in rows) else 1
