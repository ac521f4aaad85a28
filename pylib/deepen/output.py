"""How a grown model lands on disk: written into a temporary folder beside OUT and renamed into place (never
half-written), with `expansion.json` — the manifest, the only thing training needs to know about the growth."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from deepen.plan import Plan

MANIFEST = "expansion.json"


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it becomes `out`, on any error it is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: str | os.PathLike, plan: Plan, base: str, **extra) -> dict:
    """Write expansion.json: the base model, the plan, and which layers are new (trainable for LLaMA Pro)."""
    manifest = {"base": str(base), "plan": plan.to_dict(), "new_layers": plan.new_layers, **extra}
    Path(folder, MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> tuple[Plan, dict]:
    """The plan and the whole manifest of a grown model's folder."""
    path = Path(folder, MANIFEST)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} was not grown by deepen (run `deepen expand` first)")
    manifest = json.loads(path.read_text())
    return Plan.from_dict(manifest["plan"]), manifest
