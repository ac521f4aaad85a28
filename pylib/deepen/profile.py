"""Which rung a notebook runs on: DEEPEN_PROFILE = tiny (tests, CI), cpu or gpu; default by what is present."""

from __future__ import annotations

import os

import torch

PROFILES = ("tiny", "cpu", "gpu")


def profile() -> str:
    name = os.environ.get("DEEPEN_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"DEEPEN_PROFILE={name!r} is not one of {', '.join(PROFILES)}")
    return name


def device() -> torch.device:
    return torch.device("cuda" if profile() == "gpu" and torch.cuda.is_available() else "cpu")
