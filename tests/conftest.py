import json
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
SAMPLE_PATH = REFERENCE / "amplitude-export-sample.jsonl"


def sample_records() -> list[dict]:
    """The real exported records of shared/reference (ids redacted)."""
    return [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]


@pytest.fixture
def samples() -> list[dict]:
    return sample_records()
