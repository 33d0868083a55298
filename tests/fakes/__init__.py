"""Test fakes: local stand-ins for Amplitude's Export API and PostHog capture.

- ``records``: deterministic, realistic Amplitude export records.
- ``amplitude.FakeAmplitude``: the Export API (zip of gzip'd NDJSON per hour).
- ``posthog.FakePostHog``: the ``/batch/`` capture endpoint with PostHog's
  validation, timestamp and person-merge rules.
- ``posthog_query.QueryApi``: PostHog's app API on the same fake (``ph.api``):
  project lookup and the HogQL query endpoint, answering from the stored events.
"""
