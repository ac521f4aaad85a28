"""Re-execute notebooks in place, keeping outputs, stripping execution metadata so diffs stay small, and stamping
each with what produced its outputs: a hash of its code cells, the profile, the date and the minutes it took
(notebook metadata "deepen"). A test holds every committed notebook to its stamp, so outputs older than their code
are caught: `tests/test_notebooks.py`.

Usage: python tools/execute_notebooks.py notebooks/*.ipynb   (DEEPEN_PROFILE picks the rung; default by hardware)
"""

import hashlib
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm


def code_hash(nb) -> str:
    """sha256 of the notebook's code cells, in order: what its outputs were computed by."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256("\n\x00\n".join(sources).encode()).hexdigest()


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    began = time.perf_counter()
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata.pop("widgets", None)
    nb.metadata.get("language_info", {}).pop("version", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pylib"))
    from deepen.profile import profile

    nb.metadata["deepen"] = {"code_sha256": code_hash(nb), "profile": os.environ.get("DEEPEN_PROFILE") or profile(),
                             "executed": time.strftime("%Y-%m-%d"),
                             "minutes": round((time.perf_counter() - began) / 60, 1)}
    tmp = path.with_suffix(".tmp.ipynb")
    nbformat.write(nb, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    for name in tqdm(sys.argv[1:], desc="notebooks"):
        execute(Path(name))
