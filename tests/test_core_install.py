"""The CLI starts with the core dependencies alone: the optional ones (the notebooks, eval and test extras) made
unimportable in a child process, as on a machine where `pip install deepen` installed no extra."""

import subprocess
import sys

import pytest

# Importing any of these (or a submodule) fails in the child, as if the package were not installed.
OPTIONAL = ("nbformat", "nbclient", "nbmake", "lm_eval", "jupyterlab", "jupyter_server", "ipykernel", "selenium",
            "pytest", "hypothesis")
BLOCK = f"""
import sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))  # None: `import` fails, importlib.util.find_spec says missing
from deepen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def deepen(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True, text=True, cwd=cwd)


def test_the_blocker_blocks():
    done = subprocess.run([sys.executable, "-c", BLOCK.replace("from deepen.cli import main", "import nbformat")],
                          capture_output=True, text=True)
    assert "ModuleNotFoundError" in done.stderr and "nbformat" in done.stderr


@pytest.mark.parametrize("argv", [("--help",), ("plan", "--layers", "8", "--method", "llama-pro", "--groups", "2"),
                                  ("budget", "--config", "configs/llama2-7b-pro.yaml", "--gpus", "8")])
def test_cli_starts_without_the_optional_packages(argv):
    done = deepen(*argv)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_train_runs_without_the_optional_packages(tmp_path):
    done = deepen("train", "--config", "configs/tiny-cpu.yaml", "train.steps=2", "train.eval_every=2",
                  "train.eval_batches=1", "train.save_every=2", f"out={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_a_command_that_needs_an_extra_says_which_in_one_line(tmp_path):
    done = deepen("handout", str(tmp_path / "labs"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "nbformat" in lines[0] and "pip install 'deepen[notebooks]'" in lines[0]
