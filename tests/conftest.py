import json
from pathlib import Path

import pytest

# A copy of shared/reference/amplitude-export-sample.jsonl: real exported records, ids redacted.
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "amplitude-export-sample.jsonl"


def sample_records() -> list[dict]:
    """The real exported records of shared/reference (ids redacted)."""
    return [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines() if line.strip()]


@pytest.fixture
def samples() -> list[dict]:
    return sample_records()
