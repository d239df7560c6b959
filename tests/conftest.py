import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets folder (../shared/data in CI), from $NESTED_REFT_DATA; skip when unset."""
    d = os.environ.get("NESTED_REFT_DATA")
    if not d:
        pytest.skip("NESTED_REFT_DATA is unset: point it at the shared data folder to run real-data tests")
    p = Path(d)
    if not p.is_dir():
        pytest.skip(f"NESTED_REFT_DATA={d} is not a directory")
    return p
