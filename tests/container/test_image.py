"""Build the real image (on a local stand-in base) and check its shape.

Needs podman (``.ci/install-container-tools.sh``); skipped without it.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from .conftest import REPO_ROOT, podman, report, run_once

pytestmark = pytest.mark.container

UID = 10001


def inspect(image: str, fmt: str) -> str:
    return podman("image", "inspect", "--format", fmt, image).stdout.strip()


def test_runs_as_non_root(image):
    assert inspect(image, "{{.Config.User}}") == f"{UID}:{UID}"
    out = run_once("-u", entrypoint="id").stdout.strip()
    assert int(out) == UID != 0
    # the state directory is the volume, owned by that user
    out = run_once("-c", "import os; print(os.getcwd(), os.stat('.').st_uid, os.access('.', os.W_OK))",
                   entrypoint="python").stdout.split()
    assert out == ["/data", str(UID), "True"]


def test_cli_help(image):
    proc = run_once("--help", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage" in (proc.stdout + proc.stderr).lower()


def test_image_size(image):
    size = int(inspect(image, "{{.Size}}"))
    base = inspect(image, "{{index .Config.Labels \"org.opencontainers.image.base.name\"}}")
    base_size = int(inspect(base, "{{.Size}}"))
    added = size - base_size
    report(f"image size: {size / 1e6:.1f} MB ({added / 1e6:.1f} MB on top of {base})")
    print(f"image size {size} bytes, {added} over the base")
    # dependencies are a few small wheels; anything big means a cache or a
    # toolchain slipped into the final stage
    assert added < 80e6, f"{added / 1e6:.1f} MB added over the base image"


def test_no_compiler_no_caches(image):
    script = (
        "found=; for c in gcc cc c++ g++ clang make ld; do "
        "command -v $c >/dev/null 2>&1 && found=\"$found $c\"; done; "
        "for d in /root/.cache /src /opt/build /tmp/dist; do "
        "[ -e $d ] && found=\"$found $d\"; done; "
        "echo \"found:$found\""
    )
    out = run_once("-c", script, entrypoint="sh",
                   podman_args=("--user", "0")).stdout.strip()
    assert out == "found:", out


def test_package_has_plugin_json(image):
    code = (
        "import importlib.util, json, os, sys; "
        "spec = importlib.util.find_spec('connector'); "
        "p = os.path.join(spec.submodule_search_locations[0], 'plugin.json'); "
        "assert not os.path.islink(p), p; "
        "sys.stdout.write(open(p).read())"
    )
    out = run_once("-c", code, entrypoint="python").stdout
    assert json.loads(out) == json.loads((REPO_ROOT / "plugin.json").read_text())


def test_image_config(image):
    cfg = json.loads(inspect(image, "{{json .Config}}"))
    assert cfg["Entrypoint"] == ["python", "-m", "connector"]
    assert cfg["Cmd"] == ["run"]
    assert cfg["WorkingDir"] == "/data"
    assert "/data" in cfg["Volumes"]
    assert "8000/tcp" in cfg["ExposedPorts"]
    assert cfg["StopSignal"] == "SIGTERM"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HEALTH_PORT"] == "8000"
    assert env["PYTHONUNBUFFERED"] == "1"
    full = json.loads(podman("image", "inspect", image).stdout)[0]
    health = full.get("Healthcheck") or full["Config"].get("Healthcheck")
    assert health and "healthz" in " ".join(health["Test"]), health
    labels = cfg.get("Labels") or {}
    assert labels.get("org.opencontainers.image.title")
    assert labels.get("org.opencontainers.image.source")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert labels.get("org.opencontainers.image.version") == project["version"]
