"""The obvious Amplitude -> PostHog import, written the obvious way (a contender).

For each hour: download the whole export into memory, unzip and gunzip every
member in memory, ``json.loads`` each line, and hand every event to the
``posthog`` package's client with default settings (plus one ``alias`` per new
device/user pair). Nothing here is tuned; it is the baseline a user would write
from PostHog's docs.

Known flaws, kept on purpose (they are what the obvious code does):
- ``capture()`` drops events when the client's queue (10,000) is full, and
  gives up on a batch after its retries; both only log. What arrived is
  counted at the sink.
- ``capture()`` overwrites ``$os`` with this machine's, and stamps ``sent_at``.
- ``alias(previous_id=device, distinct_id=user)`` as the docs read; per
  FACTS.md the package sends the merge the opposite way round.
- session markers (``session_start``/``session_end``) are sent like any event.

Prints one JSON line on stdout: records read, captures accepted/dropped, aliases.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import zipfile
from datetime import datetime, timedelta, timezone

import requests
from posthog import Posthog


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--amplitude", required=True, help="base URL of the Export API")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--posthog", required=True, help="PostHog host")
    parser.add_argument("--project-key", required=True)
    parser.add_argument("--start", required=True, help="first hour, YYYYMMDDTHH")
    parser.add_argument("--hours", type=int, required=True)
    args = parser.parse_args(argv)

    client = Posthog(args.project_key, host=args.posthog, historical_migration=True)
    start = datetime.strptime(args.start, "%Y%m%dT%H").replace(tzinfo=timezone.utc)
    seen_pairs = set()
    read = accepted = dropped = aliases = 0

    for i in range(args.hours):
        hour = (start + timedelta(hours=i)).strftime("%Y%m%dT%H")
        response = requests.get(
            f"{args.amplitude}/api/2/export",
            params={"start": hour, "end": hour},
            auth=(args.api_key, args.secret_key),
            timeout=600,
        )
        if response.status_code == 404:
            continue
        response.raise_for_status()
        archive = zipfile.ZipFile(io.BytesIO(response.content))
        for name in sorted(archive.namelist()):
            if not name.endswith(".json.gz"):
                continue
            text = gzip.decompress(archive.read(name)).decode("utf-8")
            for line in text.splitlines():
                if not line.strip():
                    continue
                event = json.loads(line)
                read += 1
                user_id = event.get("user_id")
                device_id = event.get("device_id")
                distinct_id = user_id or device_id
                properties = {
                    **event.get("event_properties", {}),
                    **{k: v for k, v in event.items()
                       if k not in ("event_properties", "user_properties", "event_type")},
                    "$set": event.get("user_properties") or {},
                }
                timestamp = datetime.fromisoformat(event["event_time"]).replace(tzinfo=timezone.utc)
                result = client.capture(
                    event["event_type"],
                    distinct_id=distinct_id,
                    properties=properties,
                    timestamp=timestamp,
                    uuid=event["uuid"],
                )
                if result is None:
                    dropped += 1
                else:
                    accepted += 1
                if user_id and device_id and (device_id, user_id) not in seen_pairs:
                    seen_pairs.add((device_id, user_id))
                    client.alias(previous_id=device_id, distinct_id=user_id)
                    aliases += 1

    client.flush()
    client.shutdown()
    print(json.dumps({"records_read": read, "captures_accepted": accepted,
                      "captures_dropped": dropped, "aliases": aliases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
