"""Imports point one way: every module of pylib/deepen imports only modules below it in one order (README's module
table), imports inside functions included, so no cycle can hide in a function body."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pylib" / "deepen"
# The order of the README's module table: a module may import only modules before it.
ORDER = ["extras", "llama", "plan", "manifest", "models", "grow", "checkpoint", "verify", "merge", "config", "data", "stream", "batches",
         "instruct",
         "trainable", "loop", "objectives", "rundir", "budget", "train", "evaluate", "forgetting", "runs", "dpo", "profile",
         "plots",
         "diagrams", "checks", "grade", "grade_child", "widgets", "reproduce", "demo", "handout", "cli", "__main__"]


def imports(path: Path) -> dict[str, int]:
    """{deepen module imported: line} for every import in the file, at any depth."""
    modules = {p.stem for p in PKG.glob("*.py")}
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepen."):
            found.setdefault(node.module.split(".")[1], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "deepen":
            for alias in node.names:
                if alias.name in modules:
                    found.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepen."):
                    found.setdefault(alias.name.split(".")[1], node.lineno)
    return found


def test_every_module_is_in_the_order():
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert modules <= set(ORDER), f"add {sorted(modules - set(ORDER))} to ORDER (and the README's module table)"


def test_imports_point_one_way():
    wrong = []
    for path in sorted(PKG.glob("*.py")):
        if path.stem == "__init__":
            continue
        rank = ORDER.index(path.stem)
        for module, line in imports(path).items():
            if module != path.stem and (module not in ORDER or ORDER.index(module) >= rank):
                wrong.append(f"{path.name}:{line} imports deepen.{module}, which comes after it")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from deepen.train import train\n    import deepen.budget\n")
    assert imports(module) == {"train": 2, "budget": 3}


def test_the_budget_planner_does_not_import_training():
    code = "import sys, deepen.budget; print(sorted(m for m in sys.modules if m.startswith('deepen.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)  # a list of module names printed above
    assert "deepen.budget" in loaded and "deepen.train" not in loaded and "deepen.loop" not in loaded, loaded
