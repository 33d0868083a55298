"""The command line a new user meets, from a fresh state file."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from connector import cli

from .harness import HOUR, ROOT, START, connector_env, populate, run, spawn, status

COMMANDS = list(cli.COMMANDS)


def test_status_before_anything_ran_prints_the_plan_and_creates_nothing(amp, ph, tmp_path):
    env = connector_env(amp, ph, tmp_path)
    code, out = run(["status"], env)
    assert code == 0
    state = json.loads(out)
    assert state["cursor"] == START.isoformat() and state["cursor_stored"] is False
    assert state["backlog_hours"] == 3, "START..END_DATE is 3 due hours"
    assert state["next_due_at"] == (START + HOUR + 3 * HOUR).isoformat()
    assert state["totals"]["hours_done"] == 0 and state["last_error"] is None
    assert list(tmp_path.iterdir()) == [], "status creates no state file"


def test_check_and_dry_run_leave_status_as_it_was(amp, ph, tmp_path):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    before = status(env)
    code, out = run(["check"], env)
    assert code == 0, out
    assert json.loads(out)["state"]["ok"] is True
    assert run(["sync", "--dry-run"], env)[0] == 0
    after = status(env)
    for key in ("cursor", "cursor_stored", "backlog_hours", "next_due_at", "finished", "totals"):
        assert after[key] == before[key], key
    assert list(tmp_path.iterdir()) == []


def test_the_backlog_status_shows_is_what_sync_delivers(amp, ph, tmp_path):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    backlog = status(env)["backlog_hours"]
    assert run(["sync"], env)[0] == 0
    state = status(env)
    assert state["totals"]["hours_done"] == backlog == 3
    assert state["backlog_hours"] == 0 and state["finished"] is True and state["cursor_stored"] is True


def test_dry_run_piped_into_head_ends_quietly(amp, ph, tmp_path):
    populate(amp, hours=3)
    env = connector_env(amp, ph, tmp_path)
    full = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(ROOT), **env}
    # `python -m connector sync --dry-run | head -n 2`, with a real pipe and a real head.
    proc = subprocess.run(f"{sys.executable} -m connector sync --dry-run | head -n 2", shell=True, env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, executable="/bin/bash")
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 2 and json.loads(proc.stdout.splitlines()[0])["uuid"]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "sync"])
def test_stderr_is_only_json_lines_when_not_a_terminal(amp, ph, tmp_path, command):
    populate(amp, hours=1)
    env = connector_env(amp, ph, tmp_path, LOG_LEVEL="INFO", END_DATE=(START + HOUR).strftime("%Y-%m-%dT%H"))
    proc = spawn([command], env)
    if command == "run":
        ph.wait_for_events(1, timeout=30)
        proc.terminate()
    _, err = proc.communicate(timeout=60)
    lines = err.splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), err


@pytest.mark.parametrize("command", ["run", "sync"])
def test_configuration_errors_are_a_json_line_naming_each_variable(tmp_path, command):
    proc = spawn([command], {"POSTHOG_HOST": "not a url", "BATCH_SIZE": "lots", "STATE_STORE_URL": str(tmp_path / "s")})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    [line] = err.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["message"] == "configuration error"
    named = {p["variable"] for p in record["problems"]}
    assert named == {"AMPLITUDE_API_KEY", "AMPLITUDE_SECRET_KEY", "POSTHOG_PROJECT_API_KEY", "POSTHOG_HOST", "BATCH_SIZE"}
    assert all(p["variable"] in p["problem"] for p in record["problems"])


def test_configuration_errors_are_readable_text_at_a_terminal(tmp_path):
    leader, follower = pty.openpty()
    full = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(ROOT), "STATE_STORE_URL": str(tmp_path / "s")}
    proc = subprocess.Popen([sys.executable, "-m", "connector", "sync"], env=full, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 2
    text = b"".join(chunks).decode()
    assert text.startswith("configuration error:") and "  - POSTHOG_HOST is required" in text
    assert "{" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_says_what_it_does_its_exit_statuses_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"], env={})
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert cli.COMMANDS[command][2].split("\n")[0] in text
    assert "exit status:" in text and "example" in text and "python -m connector" in text


def test_rejected_with_an_hour_that_is_not_one_is_a_clear_error(amp, ph, tmp_path, capsys):
    code, _ = run(["rejected", "--hour", "yesterday"], connector_env(amp, ph, tmp_path))
    assert code == 2
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["problems"][0]["variable"] == "--hour" and "yesterday" in record["problems"][0]["problem"]
