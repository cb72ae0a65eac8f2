"""Shared fixtures of the dd2-teachers tests."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def golden() -> Path:
    """Folder of the official-code golden fixtures: $DD2_GOLDEN, else ../shared/golden beside the repository."""
    env = os.environ.get("DD2_GOLDEN")
    path = Path(env) if env else REPO.parent / "shared" / "golden"
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found: set DD2_GOLDEN or place them at {path}")
    return path
