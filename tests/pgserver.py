"""A real, throwaway PostgreSQL server for the tests: its own cluster in a temp dir.

`PgServer.start()` runs `initdb` into a fresh temporary directory and starts
`postgres` listening on 127.0.0.1 only, on a free port, with password
(scram-sha-256) authentication for every connection, TCP and unix socket alike.
The socket lives in the temp dir, never in /var/run/postgresql. `stop()`,
`restart()` and `kill()` let tests shut the server down cleanly or crash it;
`cleanup()` stops it and removes the temp dir, and also runs at interpreter exit.

PostgreSQL refuses to run as root, so when the tests run as root the binaries run
as the system user `pgtest` (created if missing) through `runuser`, or `setpriv`
where there is no runuser.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

PG_TOOLS = ("initdb", "pg_ctl", "postgres")
RUN_AS = "pgtest"  # the unprivileged user the server runs as when we are root
SUPERUSER = "postgres"
START_TIMEOUT = 60.0  # seconds; generous because sandboxes can be slow to fsync


class PgUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started; the message says why."""


def find_pg_bin() -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    `initdb` on PATH first (its symlinks resolved, so /usr/local/bin/initdb ->
    /usr/lib/postgresql/15/bin/initdb gives the latter), then the highest version
    under /usr/lib/postgresql/*/bin. Raises PgUnavailable if none has all three.
    """
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates += [Path(on_path).resolve().parent, Path(on_path).parent]

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in PG_TOOLS):
            return d
    raise PgUnavailable(
        "no directory with initdb, pg_ctl and postgres on PATH or under "
        "/usr/lib/postgresql/*/bin; run .ci/install-postgres.sh"
    )


def _free_port() -> int:
    # The OS picks a free port; there is a small window before postgres binds it,
    # which start() covers by retrying on "Address already in use".
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_run_as_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        pass
    # check=False: another test process may create the user at the same time.
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--user-group", RUN_AS],
        check=False, capture_output=True,
    )
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PgUnavailable(f"running as root and could not create the system user {RUN_AS!r}") from None


def _runner_prefix() -> list[str]:
    """The command prefix that runs a PostgreSQL binary: empty unless we are root."""
    if os.geteuid() != 0:
        return []
    _ensure_run_as_user()
    if shutil.which("runuser"):
        return ["runuser", "-u", RUN_AS, "--"]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", "--"]
    raise PgUnavailable("running as root and neither runuser nor setpriv is available")


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (zombies hold no shared memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


class PgServer:
    """One PostgreSQL cluster in a temporary directory, started and stopped on demand.

    Layout of the temp dir: `data/` (the cluster), `postgres.log` (initdb and server
    output, appended across restarts), and the unix socket. The port is chosen on the
    first start and kept by restart()/start() afterwards.
    """

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        self.password = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.tmp: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._prefix: list[str] = []

    # -- paths ---------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def log_path(self) -> Path:
        return self.tmp / "postgres.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the server (running initdb first if there is no cluster yet) and
        return once it accepts a password connection. Raises PgUnavailable, with the
        last 30 log lines, if it does not."""
        if self.is_running():
            raise RuntimeError("PgServer.start(): already running")
        if self.tmp is None:
            self._prefix = _runner_prefix()
            self.tmp = Path(tempfile.mkdtemp(prefix="pgtest-"))
            atexit.register(self.cleanup)
            self._initdb()
        first_start = self.port is None
        for _attempt in range(3 if first_start else 1):
            if first_start:
                self.port = _free_port()
            try:
                return self._start_postmaster()
            except PgUnavailable as e:
                if not (first_start and "Address already in use" in str(e)):
                    raise
        self.port = None  # so that a later start() picks afresh
        raise PgUnavailable(f"no free port after 3 attempts; last log lines:\n{self.log_tail()}")

    def _run(self, *args: str) -> None:
        with open(self.log_path, "ab") as log:
            rc = subprocess.run([*self._prefix, *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.tmp).returncode
        if rc != 0:
            raise PgUnavailable(f"{Path(args[0]).name} exited with {rc}; last log lines:\n{self.log_tail()}")

    def _initdb(self) -> None:
        pwfile = self.tmp / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._prefix:  # root: the files initdb and postgres use belong to RUN_AS
            user = pwd.getpwnam(RUN_AS)
            for path in (self.tmp, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            # --no-sync: initdb's final flush only protects the fresh cluster against
            # an OS crash, which a throwaway cluster does not need. The running server
            # keeps fsync on (below), which is what durability tests exercise.
            self._run(str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                      f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                      "--locale=C", "--no-sync")
        finally:
            pwfile.unlink()
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# tests/pgserver.py\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmp}'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "shared_buffers = 16MB\n"
                "max_connections = 50\n"
                "logging_collector = off\n"
            )

    def _start_postmaster(self) -> None:
        with open(self.log_path, "ab") as log:
            # Same process group as the tests, so Ctrl-C reaches postgres too
            # (SIGINT is a fast shutdown). If the test process is SIGKILLed, nothing
            # here runs and /tmp/pgtest-* stays; postgres shuts itself down within
            # a minute of that dir being deleted, as it rechecks its lock file.
            self._proc = subprocess.Popen(
                [*self._prefix, str(self.bin / "postgres"), "-D", str(self.data_dir),
                 "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.tmp,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise PgUnavailable(f"postgres exited during start-up; last log lines:\n{self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:  # still starting up, or recovering
                last_error = e
                time.sleep(0.05)
        self.kill()
        raise PgUnavailable(f"postgres did not accept connections within {START_TIMEOUT:.0f}s "
                            f"({last_error}); last log lines:\n{self.log_tail()}")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _postmaster_pid(self) -> int:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # not written yet: early in start-up
            # Popen started postgres itself, or runuser, whose only child is postgres.
            kids = _children(self._proc.pid) if self._prefix else []
            return kids[0] if kids else self._proc.pid

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down with `pg_ctl stop -m MODE` (smart, fast or immediate)
        and wait until it has exited. Does nothing if it is not running."""
        if not self.is_running():
            self._proc = None
            return
        self._run(str(self.bin / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode,
                  "-w", "-t", str(int(START_TIMEOUT)))
        self._proc.wait(timeout=START_TIMEOUT)
        self._proc = None

    def restart(self, mode: str = "fast") -> None:
        """stop(mode) then start(), same data dir and port."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster, as a crash or OOM kill would.

        Its backends notice the postmaster is gone and exit by themselves; this waits
        for that (SIGKILLing any still there after 10 s), because a new postmaster
        refuses to start while old processes still hold the cluster's shared memory.
        The next start() then runs crash recovery from the WAL."""
        if not self.is_running():
            self._proc = None
            return
        pid = self._postmaster_pid()
        procs = [pid, *_children(pid)]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        for p in procs:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        while any(_alive(p) for p in procs):
            time.sleep(0.02)
        self._proc.wait(timeout=10)  # postgres itself, or the runuser waiting for it
        self._proc = None

    def cleanup(self) -> None:
        """Stop the server (killing it if a clean stop fails) and remove the temp dir."""
        atexit.unregister(self.cleanup)
        try:
            self.stop("fast")
        except Exception:
            self.kill()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- clients -------------------------------------------------------------
    def url(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        """postgresql://user:password@127.0.0.1:PORT/dbname (the superuser's by default)."""
        if password is None and user == SUPERUSER:
            password = self.password
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        """A psycopg connection as the superuser, in autocommit mode."""
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=5)

    def create_role(self, name: str, password: str) -> None:
        """A login role (not a superuser) with this password."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)))

    def create_database(self, name: str, owner: str | None = None) -> None:
        with self.connect() as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if owner is not None:
                query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
            conn.execute(query)

    def drop_database(self, name: str) -> None:
        """Drop the database, disconnecting whoever is still connected to it."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def drop_role(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
