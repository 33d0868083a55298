"""Fixtures and helpers for tests that build and run the real image with podman.

No Docker engine and no image registry are needed: the Dockerfile's base image
is replaced by a local stand-in built from Debian packages
(``tests/container/standin.sh``), then the real Dockerfile is built with
``--pull=never``. Install the tools with ``.ci/install-container-tools.sh``.

Reusable pieces:

* ``image`` (session fixture): name of the freshly built image.
* ``run_container(name, env, volume, *args)`` -> container id (detached).
* ``write_env_file(name, env)`` -> path of a 0600 env file (for ``run_once``).
* ``stop_container(cid, timeout=10)`` -> ``(exit_code, seconds)``.
* ``logs(cid)`` -> container stdout+stderr.
* ``healthcheck(cid)`` -> 0 when the image's HEALTHCHECK passes.
* ``run_once(*args, entrypoint=None)``: ``podman run --rm`` in the foreground.
* ``podman(*args)`` -> ``CompletedProcess``; ``remove_container``, ``remove_volume``.

Containers and volumes created through these helpers are removed at the end of
the session.

Environment knobs: ``CONNECTOR_TEST_IMAGE`` (image tag), ``PODMAN`` (command,
default ``podman --runtime runc``), ``CONTAINER_ULIMITS`` (e.g.
``nofile=4096:4096,nproc=4096:4096``).
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin.sh"
IMAGE = os.environ.get("CONNECTOR_TEST_IMAGE", "amplitude-posthog-connector:test")
PODMAN = shlex.split(os.environ.get("PODMAN", "podman --runtime runc"))

STANDIN_TIMEOUT = 900
BUILD_TIMEOUT = 900

_report: list[str] = []
_started: set[str] = set()
_volumes: set[str] = set()
_tmpdir: Path | None = None


def report(line: str) -> None:
    """Record a line for the terminal summary (shown even without -s)."""
    _report.append(line)


def pytest_terminal_summary(terminalreporter):
    if _report:
        terminalreporter.section("container image")
        for line in _report:
            terminalreporter.write_line(line)


# --------------------------------------------------------------------------- podman


def have_podman() -> bool:
    return shutil.which(PODMAN[0]) is not None


def podman(*args: str, check: bool = True, timeout: float = 120,
           merge_stderr: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run ``podman --runtime runc ARGS`` and capture text output."""
    proc = subprocess.run(
        [*PODMAN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        timeout=timeout,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(PODMAN + list(args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{(proc.stderr or '')[-4000:]}"
        )
    return proc


def ulimit_args() -> list[str]:
    """Explicit rlimits at or below the host's.

    podman 4.3 asks runc for nofile=1048576 unless told otherwise (even with
    ``--ulimit host``); a sandboxed kernel refuses raising it above the hard
    limit ("error setting rlimit type 7").
    """
    spec = os.environ.get("CONTAINER_ULIMITS")
    if spec:
        return [a for u in spec.split(",") if u for a in ("--ulimit", u)]
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile == resource.RLIM_INFINITY or nofile > 1048576:
        nofile = 1048576
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    if nproc == resource.RLIM_INFINITY or nproc > 32768:
        nproc = 32768
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def run_args(healthcheck: bool = True) -> list[str]:
    """Flags every ``podman run`` here needs (see .ci/install-container-tools.sh).

    Without systemd podman cannot schedule the HEALTHCHECK: it logs errors
    (harmless) and never runs it by itself; ``healthcheck(cid)`` runs it on
    demand. ``healthcheck=False`` drops it (quiet one-shot runs).
    """
    health = ["--health-interval=disable"] if healthcheck else ["--no-healthcheck"]
    return [*ulimit_args(), "--network=host", *health]


def run_once(*args: str, entrypoint: str | None = None, image: str = IMAGE,
             check: bool = True, timeout: float = 120,
             podman_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``podman run --rm [--entrypoint E] IMAGE ARGS`` in the foreground."""
    ep = ["--entrypoint", entrypoint] if entrypoint else []
    return podman("run", "--rm", *run_args(healthcheck=False), *podman_args, *ep, image, *args,
                  check=check, timeout=timeout)


def _secret_dir() -> Path:
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = Path(tempfile.mkdtemp(prefix="connector-ctest-"))
        _tmpdir.chmod(0o700)
    return _tmpdir


def write_env_file(name: str, env: dict[str, str]) -> Path:
    """Write ``env`` as a docker ``--env-file`` (mode 0600, private temp dir,
    removed at session end); return its path. For ``run_once`` too:
    ``podman_args=("--env-file", str(path))`` keeps secrets off command lines."""
    for key, value in env.items():
        if "\n" in str(value) or "=" in key:
            raise ValueError(f"env {key!r}: env files take one KEY=VALUE per line")
    env_file = _secret_dir() / f"{name}.env"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in env.items())
    return env_file


def run_container(name: str, env: dict[str, str], volume: str, *args: str,
                  image: str = IMAGE, podman_args: tuple[str, ...] = ()) -> str:
    """Start IMAGE detached as NAME with VOLUME on /data; return its id.

    ``env`` goes through an env file (mode 0600 in a private temp dir), so
    secrets never appear on a command line. ``volume`` is a named volume or an
    absolute host path (a host directory must be writable by uid 10001).
    ``args`` replace the image's CMD (default ``run``). Any old container of the
    same name is removed first.
    """
    podman("rm", "-f", "--ignore", name, check=False)
    env_file = write_env_file(name, env)
    if not volume.startswith(("/", ".")):
        _volumes.add(volume)
    proc = podman("run", "-d", *run_args(), "--name", name,
                  "-v", f"{volume}:/data", "--env-file", str(env_file),
                  *podman_args, image, *args)
    cid = proc.stdout.strip().splitlines()[-1]
    _started.add(cid)
    return cid


def stop_container(cid: str, timeout: int = 10) -> tuple[int, float]:
    """``podman stop -t TIMEOUT``; return (exit code, seconds the stop took).

    Exit code 137 with seconds ~= timeout means SIGTERM was not honoured and
    podman had to SIGKILL.
    """
    t0 = time.monotonic()
    podman("stop", "-t", str(timeout), cid, timeout=timeout + 60)
    seconds = time.monotonic() - t0
    code = podman("inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
    return int(code), seconds


def wait_container(cid: str, timeout: float = 60) -> int:
    """Wait for the container to exit by itself; return its exit code."""
    return int(podman("wait", cid, timeout=timeout).stdout.strip().splitlines()[-1])


def logs(cid: str) -> str:
    """The container's stdout and stderr, interleaved."""
    return podman("logs", cid, merge_stderr=True).stdout


def healthcheck(cid: str) -> int:
    """Run the image's HEALTHCHECK once in the container; 0 means healthy."""
    return podman("healthcheck", "run", cid, check=False).returncode


def is_running(cid: str) -> bool:
    proc = podman("inspect", "--format", "{{.State.Running}}", cid, check=False)
    return proc.stdout.strip() == "true"


def remove_container(cid: str) -> None:
    podman("rm", "-f", "--ignore", cid, check=False)
    _started.discard(cid)


def remove_volume(name: str) -> None:
    podman("volume", "rm", "-f", name, check=False)
    _volumes.discard(name)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def podman_ready():
    """Skip unless podman is installed; clean up helper-made containers at the end."""
    if not have_podman():
        pytest.skip("podman not installed (run .ci/install-container-tools.sh)")
    yield
    for cid in list(_started):
        remove_container(cid)
    for vol in list(_volumes):
        remove_volume(vol)
    if _tmpdir is not None:
        shutil.rmtree(_tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def base_image(podman_ready) -> None:
    """The Dockerfile's base image: present already, or the local stand-in."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(STANDIN)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=STANDIN_TIMEOUT,
        env={**os.environ, "PODMAN": " ".join(PODMAN)},
    )
    if proc.returncode == 2 and "missing" in proc.stdout:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        pytest.fail(f"standin.sh failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    report(f"stand-in base: {proc.stdout.strip().splitlines()[-1]} "
           f"({time.monotonic() - t0:.1f}s)")


@pytest.fixture(scope="session")
def image(base_image) -> str:
    """Build the real Dockerfile from the repo root once; yield the tag."""
    t0 = time.monotonic()
    proc = podman(
        "build", "--pull=never", "--network=host", "--format", "docker",
        "-t", IMAGE, ".",
        cwd=REPO_ROOT, check=False, merge_stderr=True, timeout=BUILD_TIMEOUT,
    )
    if proc.returncode != 0:
        pytest.fail(f"podman build failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
    report(f"image build: {IMAGE} in {time.monotonic() - t0:.1f}s")
    return IMAGE
