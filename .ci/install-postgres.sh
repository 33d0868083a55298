#!/usr/bin/env bash
# Make initdb, pg_ctl and postgres available for tests/pgserver.py, which runs
# its own throwaway cluster. Idempotent: installs nothing when the binaries are
# already on PATH or under /usr/lib/postgresql/*/bin. Starts no cluster.
#
# Debian's postgresql package normally creates and starts a "main" cluster on
# port 5432 when installed. The tests do not want it, so postgresql-common is
# installed first and told not to (create_main_cluster = false), the way the
# official postgres Docker image does it.
set -euo pipefail

# Print the directory holding initdb, pg_ctl and postgres: PATH first (through
# symlinks), then the highest version under /usr/lib/postgresql.
find_pg_bin() {
  local d
  if command -v initdb >/dev/null 2>&1; then
    d=$(dirname "$(readlink -f "$(command -v initdb)")")
    if [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"; return 0
    fi
  done
  return 1
}

if ! bin=$(find_pg_bin); then
  echo "install-postgres: no initdb found, installing postgresql"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq postgresql-common >/dev/null
  conf=/etc/postgresql-common/createcluster.conf
  if grep -qE '^[#[:space:]]*create_main_cluster' "$conf"; then
    $SUDO sed -ri 's/^[#[:space:]]*create_main_cluster.*/create_main_cluster = false/' "$conf"
  else
    echo 'create_main_cluster = false' | $SUDO tee -a "$conf" >/dev/null
  fi
  $SUDO apt-get install -y -qq postgresql >/dev/null
  bin=$(find_pg_bin) || { echo "install-postgres: still no initdb after install" >&2; exit 1; }
fi

echo "install-postgres: $("$bin/postgres" --version) in $bin"
