"""Amplitude Export API client: hour windows in, archives out.

`ExportClient.download_window(start, end)` asks for the hours `start`..`end`,
both INCLUSIVE as the API defines them, and returns the `Archive` (kept in a
temporary file; None when Amplitude has no data) with the last hour it really
covers: a 400 (over 4 GB) shrinks the window to its first hour, and a single
hour that still gets 400 raises `HourTooLarge`. `ahead(start, end)` runs the
same download in the background, so the next window arrives while the current
one is sent. `probe(hour)` is what `check` asks.

What Amplitude's answers mean (each attempt; `retry.retrying` repeats the
transient ones with backoff):

| answer                                      | meaning                                     |
|---------------------------------------------|---------------------------------------------|
| 200 with a zip                              | the archive                                 |
| 200 that is not a zip (HTML, empty, cut)    | `ExportUnavailable`: retry                  |
| 404                                         | no data for the range                       |
| 400                                         | `RangeTooLarge`: ask for fewer hours        |
| 401 / 403                                   | `AuthError`: fix keys or region             |
| 429, 5xx, timeouts, broken connections      | `ExportUnavailable`: retry (Retry-After)    |
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import zipfile
from datetime import datetime
from typing import Callable

import requests

from .archive import Archive, UnnamedMembers
from .config import Secret
from .errors import AuthError, ConnectorError, ExportUnavailable, HourTooLarge
from .hours import HOUR, hour_param, hour_range
from .retry import Backoff, retry_after_seconds, retrying

# Amplitude refuses exports over 4 GB; anything much larger is not Amplitude.
MAX_ARCHIVE_BYTES = 8 * 1024**3
_READ_BYTES = 1024**2
_ZIP_MAGIC = b"PK\x03\x04"


class RangeTooLarge(ConnectorError):
    """Amplitude answered 400 for this range (over 4 GB, or malformed)."""


class ExportClient:
    """Downloads hour windows from `url` (`{base}/api/2/export`) with retries.

    `sleep(seconds)` waits and returns True when the process is stopping.
    `on_retry(cause)` and `on_bytes(n)` are told of each retry and each archive.
    """

    def __init__(
        self,
        session: requests.Session,
        url: str,
        api_key: Secret,
        secret_key: Secret,
        *,
        region: str,
        sleep: Callable[[float], bool],
        rng: random.Random | None = None,
        backoff: Backoff = Backoff(),
        timeout: tuple[float, float] = (10.0, 600.0),
        tmp_dir: str | None = None,
        on_retry: Callable[[str], None] = lambda cause: None,
        on_bytes: Callable[[int], None] = lambda n: None,
    ):
        self._session = session
        self._url = url
        self._auth = (api_key, secret_key)
        self._region = region
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._tmp_dir = tmp_dir
        self._on_retry = on_retry
        self._on_bytes = on_bytes

    # -- windows -------------------------------------------------------------

    def download_window(self, start: datetime, end: datetime) -> tuple[Archive | None, datetime]:
        """The archive for start..end and the last hour it really covers (see the module doc)."""
        try:
            archive = self.download(start, end)
        except RangeTooLarge:
            if start == end:
                raise HourTooLarge(
                    f"Amplitude refuses to export hour {hour_param(start)} (400: over its 4 GB export limit). "
                    "It cannot be imported through the Export API: export it with Amplitude's Amazon S3 export "
                    "and import it separately. The cursor stays at this hour; nothing after it is imported until then."
                ) from None
            return self.download_window(start, start)
        if archive is not None and start != end:
            try:
                for hour in hour_range(start, end + HOUR):
                    archive.members_for(hour)
            except UnnamedMembers:
                archive.close()
                return self.download_window(start, start)
        return archive, end

    def ahead(self, start: datetime, end: datetime) -> "Pending":
        """`download_window(start, end)` in a background thread."""
        return Pending(self.download_window, start, end)

    # -- one request ---------------------------------------------------------

    def download(self, start: datetime, end: datetime) -> Archive | None:
        """The archive of hours start..end inclusive, or None when there is no data."""
        return retrying(
            lambda: self._attempt(start, end),
            backoff=self._backoff,
            sleep=self._sleep,
            rng=self._rng,
            what=f"Amplitude export {hour_param(start)}..{hour_param(end)}",
            on_retry=self._on_retry,
        )

    def probe(self, hour: datetime) -> dict:
        """For `check`: reach the Export API for one hour, reading headers only."""
        try:
            response = self._get(hour, hour, stream=True, timeout=(10.0, 60.0))
        except ExportUnavailable as exc:
            return {"ok": False, "url": self._url, "error": str(exc)}
        response.close()
        result = {"ok": response.status_code in (200, 404), "status": response.status_code, "url": self._url}
        if response.status_code in (401, 403):
            result["hint"] = "check AMPLITUDE_API_KEY, AMPLITUDE_SECRET_KEY and AMPLITUDE_REGION"
        return result

    def _get(self, start: datetime, end: datetime, *, stream: bool, timeout: tuple[float, float]) -> requests.Response:
        span = f"{hour_param(start)}..{hour_param(end)}"
        api_key, secret_key = self._auth
        try:
            return self._session.get(
                self._url,
                params={"start": hour_param(start), "end": hour_param(end)},
                auth=(api_key.reveal(), secret_key.reveal()),
                stream=stream,
                timeout=timeout,
            )
        except requests.Timeout as exc:
            raise ExportUnavailable(f"export {span} timed out: {type(exc).__name__}", cause="timeout") from None
        except requests.RequestException as exc:
            raise ExportUnavailable(f"export {span}: connection failed ({type(exc).__name__})", cause="connection") from None

    def _attempt(self, start: datetime, end: datetime) -> Archive | None:
        span = f"{hour_param(start)}..{hour_param(end)}"
        with self._get(start, end, stream=True, timeout=self._timeout) as response:
            status = response.status_code
            if status == 404:
                return None
            if status == 400:
                raise RangeTooLarge(f"Amplitude answered 400 for {span}: {response.text[:200]}")
            if status in (401, 403):
                raise AuthError(
                    f"Amplitude refused the export ({status} {response.text[:80].strip()}): check AMPLITUDE_API_KEY "
                    f"and AMPLITUDE_SECRET_KEY, and AMPLITUDE_REGION (now {self._region}; EU-resident projects need EU)"
                )
            if status != 200:
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                cause = "rate_limited" if status == 429 else "timeout" if status == 504 else "server_error"
                raise ExportUnavailable(f"Amplitude answered {status} for {span}", retry_after, cause=cause)
            archive = self._save(response, start, end, span)
        self._on_bytes(archive.size)
        return archive

    def _save(self, response: requests.Response, start: datetime, end: datetime, span: str) -> Archive:
        fd, path = tempfile.mkstemp(prefix="amplitude-export-", suffix=".zip", dir=self._tmp_dir)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_content(chunk_size=_READ_BYTES):
                    size += len(chunk)
                    if size > MAX_ARCHIVE_BYTES:
                        raise ExportUnavailable(f"export {span} is over {MAX_ARCHIVE_BYTES} bytes", cause="bad_archive")
                    out.write(chunk)
            with open(path, "rb") as check:
                magic = check.read(4)
            if magic != _ZIP_MAGIC:
                raise ExportUnavailable(
                    f"export {span}: a 200 whose body is not a zip ({size} bytes, starts {magic!r})", cause="bad_archive"
                )
            try:
                return Archive(path, size, start, end)
            except zipfile.BadZipFile as exc:
                raise ExportUnavailable(f"export {span}: incomplete zip ({size} bytes: {exc})", cause="bad_archive") from None
        except requests.RequestException as exc:
            os.unlink(path)
            raise ExportUnavailable(f"export {span}: download broke off ({type(exc).__name__})", cause="connection") from None
        except BaseException:
            os.unlink(path)
            raise


class Pending:
    """A window download running in a daemon thread, so a stopping process never waits for it."""

    def __init__(self, download: Callable[[datetime, datetime], tuple[Archive | None, datetime]], start: datetime, end: datetime):
        self.start = start
        self._done = threading.Event()
        self._value: tuple[Archive | None, datetime] | None = None
        self._error: BaseException | None = None
        self._discarded = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(download, start, end), name="export-ahead", daemon=True).start()

    def _run(self, download, start, end) -> None:
        try:
            value = download(start, end)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        else:
            with self._lock:
                if self._discarded and value[0] is not None:
                    value[0].close()
                self._value = value
        self._done.set()

    def result(self) -> tuple[Archive | None, datetime]:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def discard(self) -> None:
        """Drop the download; its archive is deleted whenever it arrives."""
        with self._lock:
            self._discarded = True
            if self._value is not None and self._value[0] is not None:
                self._value[0].close()
