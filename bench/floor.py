"""The floor (a contender): the least work any importer must do, in one process.

For each hour: stream the export to a temporary file, open the zip, gunzip each
member (isal, the fastest inflater here) and parse every line with orjson.
Nothing is translated or sent. No importer that reads every record can be
faster than this in one process.

Prints one JSON line on stdout: records parsed, bytes downloaded and inflated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from datetime import datetime, timedelta, timezone

import orjson
import requests
from isal import isal_zlib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--amplitude", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--start", required=True, help="first hour, YYYYMMDDTHH")
    parser.add_argument("--hours", type=int, required=True)
    args = parser.parse_args(argv)

    loads = orjson.loads
    session = requests.Session()
    start = datetime.strptime(args.start, "%Y%m%dT%H").replace(tzinfo=timezone.utc)
    records = downloaded = inflated = 0
    for i in range(args.hours):
        hour = (start + timedelta(hours=i)).strftime("%Y%m%dT%H")
        with session.get(f"{args.amplitude}/api/2/export", params={"start": hour, "end": hour},
                         auth=(args.api_key, args.secret_key), stream=True, timeout=600) as response:
            if response.status_code == 404:
                continue
            response.raise_for_status()
            with tempfile.TemporaryFile() as tmp:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    tmp.write(chunk)
                    downloaded += len(chunk)
                tmp.seek(0)
                with zipfile.ZipFile(tmp) as archive:
                    for info in archive.infolist():
                        if not info.filename.endswith(".json.gz"):
                            continue
                        data = isal_zlib.decompress(archive.read(info), 31)
                        inflated += len(data)
                        for line in data.split(b"\n"):
                            if line:
                                loads(line)
                                records += 1
    print(json.dumps({"records_parsed": records, "bytes_downloaded": downloaded, "bytes_inflated": inflated}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
