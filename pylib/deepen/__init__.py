"""deepen: make a pretrained decoder LLM deeper without losing what it knows."""

from pathlib import Path

__version__ = "0.1.0"

# The repository the package runs from (an editable install): where configs/, figures/ and runs/ live. Code
# that looks there checks first that it is one (REPO / "pyproject.toml"), and otherwise uses the working directory.
REPO = Path(__file__).resolve().parents[2]
