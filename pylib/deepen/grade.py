"""Grade lab notebooks without trusting them — `deepen grade NOTEBOOK... [--out DIR]`, exit 1 unless all pass — and
hand the labs out — `deepen handout OUT`.

A submission is graded against the pristine lab it answers (notebooks/labs/labNN_*.ipynb, found by its name's
`labNN` prefix): only the student's exercise cells are taken from it — the cell marked with the exercise's name,
else the cell that defines the function the lab's exercise cell defines — and run, with the lab's own setup cells
and its own check calls, in a fresh process per notebook. So:

- an edited or deleted check cell changes nothing (the lab's own check runs), and a deleted exercise is "not done";
- nothing printed counts: the verdict comes back on a channel of the grader's, tagged with a number the answer is
  not given (an answer written to dig it out of the grading process's own frames is not stopped by this: the
  grader guards against edits and shortcuts, not against a deliberate exploit of the Python process it shares);
- an answer that changes the checks or what they compare with (torch's comparisons, deepen's reference, the
  reporter) while it runs is refused ("tampered"), as is one that only calls deepen's own implementation of the
  exercise (`deepen.checks.IMPLEMENTS`);
- an answer that raises fails that exercise; one that runs past --timeout is stopped and fails; the others go on.

Each row: notebook, exercise, status (pass, fail, not done, not run), points (earned of possible), feedback.
Reference solutions are Python files with one `# %% NAME` section per exercise: `--fill-from FOLDER` grades
labNN_*.ipynb with FOLDER/labNN.py's sections as the answers.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from deepen import REPO
from deepen.extras import need
from deepen.manifest import atomic_folder

EXERCISE = "exercise"  # the cell metadata key naming the exercise a cell holds
POINTS = "points"  # the cell metadata key giving an exercise's points (default 1)
QUESTION = "question"  # the cell metadata key naming a written question (model answers: tests/labs/solutions)
CHECK_CALL = re.compile(r"\bcheck_(\w+)\s*\(")
SECTION = re.compile(r"^# %% (\w+)\s*$", re.MULTILINE)
FIELDS = ("notebook", "exercise", "status", "points", "feedback")
LABS = REPO / "notebooks" / "labs"


def _nbformat():
    return need("nbformat", "grading and handing out labs")


def exercises(nb) -> list[str]:
    """The exercises of a notebook in order: its exercise cells' names and the checks its cells call."""
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
    nb = _nbformat().from_dict(json.loads(json.dumps(nb)))
    cells = {cell.metadata.get(EXERCISE): cell for cell in nb.cells if cell.metadata.get(EXERCISE)}
    if set(code) != set(cells):
        raise ValueError(f"the solutions ({', '.join(sorted(code))}) do not match the notebook's exercise cells "
                         f"({', '.join(sorted(cells))})")
    for name, cell in cells.items():
        cell.source = code[name].rstrip("\n")
    return nb


def pristine_lab(submission: str | os.PathLike, labs: str | os.PathLike = LABS) -> Path:
    """The lab a submission answers: labs/labNN_*.ipynb for a file named labNN_... (a copy keeps the lab's name)."""
    prefix = Path(submission).stem.split("_")[0]
    found = sorted(Path(labs).glob(f"{prefix}_*.ipynb")) if re.fullmatch(r"lab\d+", prefix) else []
    if not found:
        names = ", ".join(p.name for p in sorted(Path(labs).glob("lab*.ipynb")))
        raise ValueError(f"{submission} answers no lab: a submission keeps the name of the lab it answers ({names})")
    return found[0]


def _defined(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def answers(submission, lab) -> dict[str, str | None]:
    """{exercise: the student's code} for each exercise of the pristine `lab` (notebooks): the submission's cell
    marked with that exercise, else its cell that defines the function the lab's exercise cell defines; None when
    the submission has neither (the exercise cell was deleted)."""
    marked = {c.metadata[EXERCISE]: c.source for c in submission.cells
              if c.cell_type == "code" and c.metadata.get(EXERCISE)}
    out = {}
    for cell in lab.cells:
        name = cell.metadata.get(EXERCISE) if cell.cell_type == "code" else None
        if not name:
            continue
        if name in marked:
            out[name] = marked[name]
            continue
        wanted = _defined(cell.source)
        out[name] = next((c.source for c in submission.cells if c.cell_type == "code" and wanted & _defined(c.source)),
                         None)
    return out


def _job(lab, answered: dict[str, str | None], timeout: int) -> dict:
    """What the grading process runs: the lab's setup cells (its code before the first exercise), then for each
    exercise the student's code (or the lab's own TODO cell) and the lab's own check call."""
    setup, steps, seen_exercise = [], [], False
    for cell in lab.cells:
        if cell.cell_type != "code":
            continue
        name = cell.metadata.get(EXERCISE)
        if name:
            seen_exercise = True
            source = answered.get(name)
            steps.append({"exercise": name, "source": cell.source if source is None else source,
                          "points": float(cell.metadata.get(POINTS, 1)), "check": None})
        elif CHECK_CALL.search(cell.source) and steps:
            steps[-1]["check"] = cell.source.strip()
        elif not seen_exercise:
            setup.append(cell.source)
    return {"setup": setup, "steps": steps, "timeout": timeout}


def run(path: str | os.PathLike, nb=None, timeout: int = 600, solutions: dict[str, str] | None = None) -> list[dict]:
    """Grade one submission (its notebook file, or `nb` read from it) against its pristine lab; one row per
    exercise of the lab. `solutions`: answers to use instead of the submission's cells (--fill-from)."""
    path = Path(path)
    lab_path = pristine_lab(path)
    nbformat = _nbformat()
    lab = nbformat.read(lab_path, as_version=4)
    submission = nbformat.read(path, as_version=4) if nb is None else nb
    answered = solutions if solutions is not None else answers(submission, lab)
    job = _job(lab, answered, timeout)
    verdicts = _grade_in_a_process(job, lab_path.parent, timeout * (len(job["steps"]) + 1) + 120)
    rows = []
    for step in job["steps"]:
        verdict = verdicts.get(step["exercise"], {"status": "not run", "feedback": verdicts.get(
            "(process)", "the grading process stopped before this exercise")})
        earned = step["points"] if verdict["status"] == "pass" else 0.0
        rows.append({"notebook": str(path), "exercise": step["exercise"], "status": verdict["status"],
                     "points": f"{earned:g}/{step['points']:g}", "feedback": verdict["feedback"]})
    return rows


def _grade_in_a_process(job: dict, folder: Path, timeout: float) -> dict:
    """Run the job in a fresh Python process (deepen.grade_child); {exercise: {status, feedback}} from its verdict
    line, the one tagged with the nonce only this process and the grader's part of the child know."""
    nonce = secrets.token_hex(16)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # the channel and stderr are files, not pipes: a child that writes much can never block on a full pipe
    with tempfile.TemporaryFile("w+") as channel, tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen([sys.executable, "-m", "deepen.grade_child", str(channel.fileno())],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, cwd=folder, env=env,
                                 pass_fds=(channel.fileno(),), text=True)
        try:
            child.stdin.write(json.dumps({"nonce": nonce, **job}) + "\n")
            child.stdin.close()
            child.wait(timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            child.kill()
            child.wait()
        channel.seek(0)
        lines = channel.read().splitlines()
        errors.seek(0)
        error = (errors.read().strip().splitlines() or [""])[-1][:200]
    verdicts = {}
    for line in lines:
        tag, _, body = line.partition(" ")
        if tag == nonce:
            verdict = json.loads(body)
            verdicts[verdict["exercise"]] = {"status": verdict["status"], "feedback": verdict["feedback"]}
    if child.returncode != 0 and len(verdicts) < len(job["steps"]):
        why = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit status {child.returncode}"
        verdicts["(process)"] = f"the grading process stopped ({why}{': ' + error if error else ''})"
    return verdicts


def grade(notebooks: list[str | os.PathLike], out: str | os.PathLike, solutions: str | os.PathLike | None = None,
          timeout: int = 600) -> list[dict]:
    """Grade each submission (answered from `solutions`, a folder of labNN.py, if given); write out/results.json and
    out/results.csv; return the rows."""
    rows = []
    for notebook in notebooks:
        given = read_solutions(solutions_file(notebook, solutions)) if solutions is not None else None
        rows += run(notebook, timeout=timeout, solutions=given)
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
    """The rows as a text table, one line per exercise, feedback cut at a word to fit `width`."""
    if not rows:
        return "no notebooks graded"
    columns = FIELDS[:-1]
    w = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
    room = max(width - sum(w.values()) - 2 * len(columns), 30)

    def line(row: dict) -> str:
        feedback = row["feedback"].replace("\n", " ")
        if len(feedback) > room:
            feedback = feedback[:room - 1].rsplit(" ", 1)[0] + " …"
        return "  ".join([f"{row[k]:<{w[k]}}" for k in columns] + [feedback])

    done = sum(r["status"] == "pass" for r in rows)
    earned = sum(float(r["points"].split("/")[0]) for r in rows)
    possible = sum(float(r["points"].split("/")[1]) for r in rows)
    return "\n".join([line({k: k for k in FIELDS}), *map(line, rows),
                      f"{done} of {len(rows)} pass, {earned:g} of {possible:g} points"])


def handout(out: str | os.PathLike, labs: str | os.PathLike = LABS) -> Path:
    """Write what students receive into the new folder `out`: the labs as handed out (unexecuted, every exercise a
    TODO: no solution is in them) and a README listing each lab's exercises and points. The reference solutions
    are not copied."""
    labs = sorted(Path(labs).glob("lab*.ipynb"))
    lines = ["# Labs", "", "Open each notebook in JupyterLab, fill every cell marked `# TODO`, and run the check "
             "under it. Hand in the notebooks under the names they have here.", "",
             "| lab | exercise | points |", "|---|---|---|"]
    questions = []
    nbformat = _nbformat()
    with atomic_folder(out) as tmp:
        for path in labs:
            nb = nbformat.read(path, as_version=4)
            for cell in (c for c in nb.cells if c.cell_type == "code"):
                cell.outputs, cell.execution_count = [], None
                name = cell.metadata.get(EXERCISE)
                if name and "raise NotImplementedError" not in cell.source:
                    raise ValueError(f"{path.name}: exercise {name} is not a TODO cell; hand out only pristine labs")
                if name:
                    lines.append(f"| {path.stem} | {name} | {float(cell.metadata.get(POINTS, 1)):g} |")
            questions += [f"- {path.stem}: {c.source.splitlines()[0].lstrip('# ')}" for c in nb.cells
                          if c.metadata.get(QUESTION)]
            nbformat.write(nb, tmp / path.name)
        if questions:
            lines += ["", "Each lab also ends with a written question, answered in the cell under it and graded by "
                      "your instructor (not by `deepen grade`):", "", *questions]
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
    return Path(out)


def add_arguments(parser) -> None:
    parser.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="submitted lab notebooks (.ipynb), each "
                                                                          "named like the lab it answers")
    parser.add_argument("--out", default="grades", help="folder for results.json and results.csv (default grades)")
    parser.add_argument("--fill-from", metavar="FOLDER",
                        help="answer each labNN_*.ipynb from FOLDER/labNN.py's sections instead (reference solutions)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one exercise may run (default 600)")


def main(args) -> int:
    rows = grade(args.notebooks, args.out, args.fill_from, args.timeout)
    print(table(rows))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.csv'}")
    return 0 if all(r["status"] == "pass" for r in rows) else 1


def main_handout(args) -> int:
    out = handout(args.out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.glob('*.ipynb')))} and README.md (no solutions)")
    return 0
