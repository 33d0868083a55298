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

| answer                                          | meaning                                   |
|-------------------------------------------------|-------------------------------------------|
| 200 with a zip                                  | the archive                               |
| 200 that is not a zip (HTML, empty, cut)        | `ExportUnavailable`: retry                |
| 404 `Raw data files were not found.`            | no data for the range                     |
| 404 with anything else (a proxy's page, a wrong path) | `WrongEndpoint`: never taken as empty; fix AMPLITUDE_BASE_URL |
| 400                                             | `RangeTooLarge`: ask for fewer hours      |
| 3xx                                             | `WrongEndpoint`: not followed (the keys would go along); names the Location |
| 401 / 403                                       | `AuthError`: fix keys or region           |
| 429, 5xx, timeouts, broken connections          | `ExportUnavailable`: retry (Retry-After)  |

Every answer's `Date` is reported (`on_date`) and kept with the window
(`Window.served_at`): whether an hour is due is judged by Amplitude's clock
too, not by this machine's alone. A download has EXPORT_TIMEOUT_SECONDS to
start answering and to deliver each further megabyte (`deadline.py`), so a
trickling peer cannot hold it forever.

Downloads are kept in `export_dir()`, named with the process id, so a
connector that starts again can remove what a killed one left behind
(`remove_leftovers`).
"""

from __future__ import annotations

import errno
import os
import random
import re
import tempfile
import threading
import zipfile
from datetime import datetime
from typing import Callable, NamedTuple
from urllib.parse import urljoin

import requests

from . import deadline
from .archive import Archive, UnnamedMembers
from .clock import http_date
from .config import Secret
from .errors import AuthError, ConnectorError, ExportUnavailable, HourTooLarge, WrongEndpoint
from .hours import HOUR, hour_param, hour_range
from .redact import Redactor, snippet
from .retry import Backoff, retry_after_seconds, retrying

# Amplitude refuses exports over 4 GB; anything much larger is not Amplitude.
MAX_ARCHIVE_BYTES = 8 * 1024**3
_READ_BYTES = 1024**2
_ZIP_MAGIC = b"PK\x03\x04"
NO_DATA = "Raw data files were not found"  # Amplitude's 404 body for an empty range
_LEFTOVER = re.compile(r"amplitude-export-(\d+)-.*\.zip$")


class RangeTooLarge(ConnectorError):
    """Amplitude answered 400 for this range (over 4 GB, or malformed)."""


class Window(NamedTuple):
    """A downloaded window: its archive (None: no data), its last hour, and the answer's `Date`."""

    archive: Archive | None
    last: datetime
    served_at: datetime | None


def export_dir(base: str | None = None) -> str:
    """The connector's own folder for downloads, owner-only, in TMPDIR (or `base`)."""
    path = os.path.join(base or tempfile.gettempdir(), f"amplitude-posthog-connector-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def remove_leftovers(directory: str) -> list[str]:
    """Delete downloads left by processes that no longer run (killed, crashed); return their names."""
    removed = []
    for name in os.listdir(directory):
        match = _LEFTOVER.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        on_date: Callable[[datetime], None] = lambda served_at: None,
    ):
        self._session = deadline.install(session)
        self._url = url
        self._auth = (api_key, secret_key)
        self._redact = Redactor([api_key.reveal(), secret_key.reveal()], [(api_key.reveal(), secret_key.reveal())])
        self._region = region
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._backoff = backoff
        self._timeout = timeout
        self._tmp_dir = tmp_dir
        self._on_retry = on_retry
        self._on_bytes = on_bytes
        self._on_date = on_date

    # -- windows -------------------------------------------------------------

    def download_window(self, start: datetime, end: datetime) -> Window:
        """The archive for start..end and the last hour it really covers (see the module doc)."""
        try:
            archive, served_at = self.download(start, end)
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
        return Window(archive, end, served_at)

    def ahead(self, start: datetime, end: datetime) -> "Pending":
        """`download_window(start, end)` in a background thread."""
        return Pending(self.download_window, start, end)

    # -- one request ---------------------------------------------------------

    def download(self, start: datetime, end: datetime) -> tuple[Archive | None, datetime | None]:
        """The archive of hours start..end inclusive (None when there is no data) and the answer's Date."""
        return retrying(
            lambda: self._attempt(start, end),
            backoff=self._backoff,
            sleep=self._sleep,
            rng=self._rng,
            what=f"Amplitude export {hour_param(start)}..{hour_param(end)}",
            on_retry=self._on_retry,
        )

    def probe(self, hour: datetime) -> dict:
        """For `check`: ask for one hour, reading the headers (and a 404's short body) only."""
        result: dict = {"url": self._url}
        try:
            with deadline.whole_request(60.0):
                response = self._get(hour, hour, timeout=(10.0, 60.0))
                with response:
                    status = result["status"] = response.status_code
                    kind = response.headers.get("Content-Type", "")
                    text = response.text[:2000] if status != 200 else ""
        except ExportUnavailable as exc:
            return {**result, "ok": False, "error": str(exc)}
        except requests.RequestException as exc:
            return {**result, "ok": False, "error": f"{type(exc).__name__}: no complete answer"}
        if status == 200:
            result["ok"] = "zip" in kind or "octet-stream" in kind
            if not result["ok"]:
                result["hint"] = f"a 200 that is not a zip ({kind or 'no content type'}): not Amplitude's Export API?"
        elif status == 404:
            result["ok"] = NO_DATA in text
            if not result["ok"]:
                result["hint"] = ("a 404 that is not Amplitude's 'no data' answer: AMPLITUDE_BASE_URL must be the "
                                  "host only (e.g. https://amplitude.com), without /api/2/export")
        else:
            result["ok"] = False
            if status in (401, 403):
                result["hint"] = "check AMPLITUDE_API_KEY, AMPLITUDE_SECRET_KEY and AMPLITUDE_REGION"
            elif 300 <= status < 400:
                result["hint"] = f"redirects to {response.headers.get('Location', '?')}: set AMPLITUDE_BASE_URL to it"
        return result

    def _get(self, start: datetime, end: datetime, *, timeout: tuple[float, float]) -> requests.Response:
        span = f"{hour_param(start)}..{hour_param(end)}"
        api_key, secret_key = self._auth
        try:
            return self._session.get(
                self._url,
                params={"start": hour_param(start), "end": hour_param(end)},
                auth=(api_key.reveal(), secret_key.reveal()),
                stream=True,
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise ExportUnavailable(f"export {span} timed out: {type(exc).__name__}", cause="timeout") from None
        except requests.RequestException as exc:
            raise ExportUnavailable(f"export {span}: connection failed ({type(exc).__name__})", cause="connection") from None

    def _attempt(self, start: datetime, end: datetime) -> tuple[Archive | None, datetime | None]:
        span = f"{hour_param(start)}..{hour_param(end)}"
        read_timeout = self._timeout[1]
        try:
            with deadline.whole_request(read_timeout) as watch:
                with self._get(start, end, timeout=self._timeout) as response:
                    served_at = http_date(response.headers.get("Date"))
                    if served_at is not None:
                        self._on_date(served_at)
                    archive = self._answer(response, start, end, span, watch)
        except deadline.DeadlineExceeded:
            raise ExportUnavailable(f"export {span}: no progress within {read_timeout:g} s", cause="timeout") from None
        if archive is not None:
            self._on_bytes(archive.size)
        return archive, served_at

    def _answer(self, response: requests.Response, start: datetime, end: datetime, span: str,
                watch: deadline.Deadline) -> Archive | None:
        status = response.status_code
        if status == 404:
            text = response.text[:2000]
            if NO_DATA in text:
                return None
            raise WrongEndpoint(
                f"{self._url} answered 404 with something that is not Amplitude's 'no data' answer "
                f"({response.headers.get('Content-Type', 'no content type')}: {snippet(text, self._redact, 80)!r}): "
                "nothing is taken as empty. AMPLITUDE_BASE_URL must be the host only (e.g. https://amplitude.com), "
                "without /api/2/export; a proxy in between must pass the Export API through"
            )
        if status == 400:
            raise RangeTooLarge(f"Amplitude answered 400 for {span}: {snippet(response.text, self._redact, 200)}")
        if status in (401, 403):
            raise AuthError(
                f"Amplitude refused the export ({status}): check AMPLITUDE_API_KEY "
                f"and AMPLITUDE_SECRET_KEY, and AMPLITUDE_REGION (now {self._region}; EU-resident projects need EU)"
            )
        if 300 <= status < 400:
            location = urljoin(self._url, response.headers.get("Location", ""))
            raise WrongEndpoint(
                f"Amplitude's export answered {status} redirecting to {location}: not followed (the keys would go "
                "along). Set AMPLITUDE_BASE_URL (or AMPLITUDE_REGION) to where the Export API answers"
            )
        if status != 200:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            cause = "rate_limited" if status == 429 else "timeout" if status == 504 else "server_error"
            raise ExportUnavailable(f"Amplitude answered {status} for {span}", retry_after, cause=cause)
        return self._save(response, start, end, span, watch)

    def _save(self, response: requests.Response, start: datetime, end: datetime, span: str,
              watch: deadline.Deadline) -> Archive:
        directory = self._tmp_dir or export_dir()
        try:
            fd, path = tempfile.mkstemp(prefix=f"amplitude-export-{os.getpid()}-", suffix=".zip", dir=directory)
        except OSError as exc:
            raise ExportUnavailable(f"cannot create a download file in {directory}: {exc.strerror}", cause="disk") from None
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_content(chunk_size=_READ_BYTES):
                    size += len(chunk)
                    if size > MAX_ARCHIVE_BYTES:
                        raise ExportUnavailable(f"export {span} is over {MAX_ARCHIVE_BYTES} bytes", cause="bad_archive")
                    out.write(chunk)
                    watch.extend(self._timeout[1])  # progress: another chunk may take as long
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
            if watch.expired:
                raise
            raise ExportUnavailable(f"export {span}: download broke off ({type(exc).__name__})", cause="connection") from None
        except OSError as exc:
            os.unlink(path)
            full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
            raise ExportUnavailable(f"cannot write the download to {directory}{full}: {exc.strerror}", cause="disk") from None
        except BaseException:
            os.unlink(path)
            raise


class Pending:
    """A window download running in a daemon thread, so a stopping process never waits for it."""

    def __init__(self, download: Callable[[datetime, datetime], Window], start: datetime, end: datetime):
        self.start = start
        self._done = threading.Event()
        self._value: Window | None = None
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

    def result(self) -> Window:
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
