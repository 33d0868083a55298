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


@pytest.fixture
def amp():
    """A fake Amplitude Export API on 127.0.0.1 with the harness's keys."""
    from .fakes.amplitude import FakeAmplitude
    from .harness import AMP_KEY, AMP_SECRET

    with FakeAmplitude(AMP_KEY, AMP_SECRET) as server:
        yield server


@pytest.fixture
def ph():
    """A fake PostHog capture endpoint on 127.0.0.1 with the harness's project key."""
    from .fakes.posthog import FakePostHog
    from .harness import PH_KEY

    with FakePostHog(PH_KEY) as server:
        yield server
