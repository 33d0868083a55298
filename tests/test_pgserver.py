"""The PostgreSQL test harness works for real: auth, restart, crash recovery, isolation."""

import os
import pwd

import psycopg
import pytest

from .pg_fixtures import pg_database, pg_server, pg_url  # noqa: F401
from .pgserver import RUN_AS, find_pg_bin


def test_find_pg_bin_has_the_tools():
    d = find_pg_bin()
    for tool in ("initdb", "pg_ctl", "postgres"):
        assert os.access(d / tool, os.X_OK)


def test_connects_with_the_password_as_a_non_superuser(pg_url):
    with psycopg.connect(pg_url) as conn:
        user, superuser = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert user != "postgres" and superuser is False
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()[0]
        assert owner == user
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.info.hostaddr == "127.0.0.1"


def test_wrong_password_is_refused(pg_url):
    wrong = psycopg.conninfo.make_conninfo(pg_url, password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="authentication"):
        psycopg.connect(wrong, connect_timeout=5)


def test_no_password_is_refused(pg_url):
    # Trust is off for TCP: leaving the password out must fail too.
    no_password = psycopg.conninfo.make_conninfo(pg_url, password="")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(no_password, connect_timeout=5)


def test_runs_unprivileged_when_root(pg_server):
    pid = int((pg_server.data_dir / "postmaster.pid").read_text().split()[0])
    uid = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam(RUN_AS).pw_uid
    else:
        assert uid == os.geteuid()


def test_committed_row_survives_restart(pg_server, pg_url):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('before restart')")
    port = pg_server.port
    pg_server.restart()
    assert pg_server.port == port
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("before restart",)]


def test_kill_then_start_recovers_committed_data(pg_server, pg_url):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('committed')")
    idle = psycopg.connect(pg_url)  # a backend alive at the crash, as in real life
    uncommitted = psycopg.connect(pg_url)
    uncommitted.execute("INSERT INTO t VALUES ('never committed')")

    pg_server.kill()
    assert not pg_server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_url, connect_timeout=5)

    pg_server.start()
    assert "automatic recovery in progress" in pg_server.log_path.read_text()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("committed",)]
    for conn in (idle, uncommitted):
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()


def test_each_pg_url_is_its_own_database(pg_url, pg_database):
    other_url = pg_database()  # made the same way as pg_url
    assert other_url != pg_url
    with psycopg.connect(pg_url) as a, psycopg.connect(other_url) as b:
        a.execute("CREATE TABLE t (v text)")
        a.execute("INSERT INTO t VALUES ('a')")
        assert b.execute("SELECT to_regclass('t')").fetchone()[0] is None
        assert a.execute("SELECT current_database()").fetchone()[0] != \
            b.execute("SELECT current_database()").fetchone()[0]
    # Each role can connect to the other's database (CONNECT is granted to PUBLIC)
    # but cannot create anything there.
    other_db = psycopg.conninfo.conninfo_to_dict(other_url)["dbname"]
    intruder = psycopg.conninfo.make_conninfo(pg_url, dbname=other_db)
    with psycopg.connect(intruder) as c, pytest.raises(psycopg.errors.InsufficientPrivilege):
        c.execute("CREATE TABLE intruder (v text)")


def test_second_test_gets_a_fresh_database(pg_url):
    # The previous tests created table t in their databases; this one has none.
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone()[0] is None
