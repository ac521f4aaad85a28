"""Re-execute notebooks in place, keeping outputs, stripping execution metadata so diffs stay small.

Usage: python tools/execute_notebooks.py notebooks/*.ipynb   (DEEPEN_PROFILE picks the rung; default by hardware)
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm import tqdm


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nb.metadata.pop("widgets", None)
    nb.metadata.get("language_info", {}).pop("version", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
    tmp = path.with_suffix(".tmp.ipynb")
    nbformat.write(nb, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    for name in tqdm(sys.argv[1:], desc="notebooks"):
        execute(Path(name))
