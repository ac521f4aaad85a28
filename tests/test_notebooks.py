"""The committed notebooks show what their code computes now: each is stamped by `make notebooks`
(tools/execute_notebooks.py) with a hash of its code cells, and every code cell has run. A notebook whose code was
edited without re-executing it fails here, naming it."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def tool():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_committed_notebook_is_what_its_code_computes(path):
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("deepen")
    assert stamp, f"{path.name} was not executed by `make notebooks` (no stamp): run it"
    assert stamp["code_sha256"] == tool().code_hash(nb), (
        f"{path.name}: its code cells changed since it was executed ({stamp['executed']}): run `make notebooks`")
    unrun = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip() and c.execution_count is None]
    assert not unrun, f"{path.name}: code cells {unrun} never ran"
    assert stamp["profile"] in ("cpu", "gpu") and stamp["minutes"] >= 0


def test_the_check_fails_on_a_notebook_edited_without_re_executing(tmp_path):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    nb.metadata["deepen"] = {"code_sha256": tool().code_hash(nb), "profile": "cpu", "executed": "today", "minutes": 1}
    edited = next(c for c in nb.cells if c.cell_type == "code")
    edited.source += "\nprint('one more line')"
    assert nb.metadata["deepen"]["code_sha256"] != tool().code_hash(nb)
    markdown_only = json.loads(json.dumps(nb))
    assert tool().code_hash(nbformat.from_dict(markdown_only)) == tool().code_hash(nb)
    prose = nbformat.from_dict(markdown_only)
    next(c for c in prose.cells if c.cell_type == "markdown").source += " more prose"
    assert tool().code_hash(prose) == tool().code_hash(nb)  # prose alone does not ask for a re-run
