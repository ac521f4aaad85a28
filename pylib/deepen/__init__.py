"""deepen: make a pretrained decoder LLM deeper without losing what it knows."""

__version__ = "0.1.0"
