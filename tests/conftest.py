"""Shared fixtures: one cache folder per test session (decoded images, pretrained sources)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "freeze_depth.yaml"
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera_data"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tl-sweep-cache")
    os.environ["TL_SWEEP_CACHE"] = str(path)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return path


@pytest.fixture
def cli(capsys):
    """Run ``tl-sweep`` in-process; returns (exit code, stdout, stderr)."""
    from tl_sweep.cli import main

    def call(*argv: str):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call
