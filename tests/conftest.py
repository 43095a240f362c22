"""Shared fixtures for the ComfyUI-free unit tests."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE = ROOT.parent / "shared" / "reference_tokens" / "softrepa"


@pytest.fixture
def reference_dir():
    if not REFERENCE.is_dir():
        pytest.skip(f"official reference tokens not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
