"""Optional dependencies: a command that needs a package outside the core install imports it through `need`, which
says in one line which extra installs it. The CLI starts with the core dependencies alone (pyproject's
`dependencies`); grading wants the `notebooks` extra, the papers' benchmarks the `eval` extra, SmolLM2's offline
copy the `smol` extra."""

from __future__ import annotations

import importlib

EXTRAS = {"nbformat": "notebooks", "nbclient": "notebooks", "lm_eval": "eval", "gguf": "smol"}


class MissingExtra(RuntimeError):
    """An optional package a command needs is not installed."""


def need(module: str, purpose: str):
    """The module `module` imported; if it is missing, MissingExtra naming `purpose` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] and e.name != module:
            raise
        extra = EXTRAS.get(module.split(".")[0])
        how = f"pip install 'deepen[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingExtra(f"{purpose} needs the package {module.split('.')[0]}, which is not installed: {how}") \
            from None
