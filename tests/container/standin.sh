#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image (the official
# python:3.11-slim-bookworm) from Debian packages, for machines that reach
# Debian's mirrors and PyPI but no container registry (CI here).
#
#   tests/container/standin.sh [TAG]
#
# TAG defaults to the image named on the Dockerfile's first FROM line, so the
# two never drift. Skips the build when `podman image exists TAG` (set
# STANDIN_REBUILD=1 to force). Everything that makes the build work on this
# machine (CA bundle, pip configuration) lives in the stand-in only; none of it
# goes into the real Dockerfile.
#
# Env: DEBIAN_MIRROR (default: http://deb.debian.org/debian), SUITE (bookworm),
#      PODMAN (default: "podman --runtime runc").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
PODMAN="${PODMAN:-podman --runtime runc}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${SUITE:-bookworm}"

# --- the base image's exact name, from the Dockerfile -----------------------
base_from_dockerfile() {
  local ref
  ref="$(awk 'toupper($1)=="FROM" { for (i = 2; i <= NF; i++) if ($i !~ /^--/) { print $i; exit } }' \
    "$repo/Dockerfile")"
  [ -n "$ref" ] || { echo "standin: no FROM line in $repo/Dockerfile" >&2; exit 2; }
  case "$ref" in *'$'*) echo "standin: FROM uses a variable ($ref); pass TAG" >&2; exit 2 ;; esac
  # Normalise like Docker does: python:3.11 -> docker.io/library/python:3.11
  local first="${ref%%/*}"
  if [ "$first" = "$ref" ]; then
    ref="docker.io/library/$ref"
  elif ! [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then
    ref="docker.io/$ref"
  fi
  printf '%s\n' "$ref"
}

TAG="${1:-$(base_from_dockerfile)}"

if [ -z "${STANDIN_REBUILD:-}" ] && $PODMAN image exists "$TAG"; then
  echo "standin: $TAG already present, skipping"
  exit 0
fi

for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "standin: $tool missing (run .ci/install-container-tools.sh)" >&2; exit 2; }
done

start=$SECONDS
work="$(mktemp -d /tmp/standin.XXXXXX)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "standin: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,ca-certificates \
  "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 40 "$rootfs/debootstrap/debootstrap.log" >&2
  exit 1
}

# --- behave like the official image where the Dockerfile relies on it -------
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED

# --- reach the package index the way this machine does ----------------------
# The host's CA bundle (it may contain a TLS-intercepting egress proxy's CA).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
# The host's pip settings that matter for reaching an index over the network
# (index URLs, proxy, trusted hosts, timeouts). Local file:// indexes and
# find-links directories don't exist inside the build and are left out.
host_python="$(command -v python3 || command -v python || true)"
if [ -n "$host_python" ] && "$host_python" -m pip --version >/dev/null 2>&1; then
  "$host_python" -m pip config list 2>/dev/null | "$host_python" -c '
import ast, sys
keep = {"index-url", "extra-index-url", "trusted-host", "proxy", "timeout",
        "default-timeout", "retries", "disable-pip-version-check"}
conf = {}
for line in sys.stdin:
    key, _, val = line.strip().partition("=")
    if not val:
        continue
    name = key.rsplit(".", 1)[-1]
    if name == "default-timeout":
        name = "timeout"
    if name not in keep:
        continue
    try:
        val = ast.literal_eval(val)
    except Exception:
        pass
    if name in ("index-url", "extra-index-url"):
        urls = [u for u in str(val).split() if u.startswith(("http://", "https://"))]
        if not urls:
            continue
        val = " ".join(urls)
    # env: entries (PIP_*) come last in pip config list and win, as in pip
    conf[name] = str(val)
conf["cert"] = "/etc/ssl/certs/ca-certificates.crt"
print("[global]")
for k, v in sorted(conf.items()):
    print(f"{k} = {v}")
' >"$rootfs/etc/pip.conf"
else
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
fi
echo "standin: /etc/pip.conf in the stand-in:"; sed 's/^/  /' "$rootfs/etc/pip.conf"

# --- keep it small -----------------------------------------------------------
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/log/* "$rootfs"/debootstrap \
  "$rootfs"/tmp/* "$rootfs"/root/.cache
find "$rootfs/usr/lib" -name __pycache__ -type d -prune -exec rm -rf {} +

echo "standin: importing as $TAG"
tar --numeric-owner -C "$rootfs" -c . | $PODMAN import --quiet \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "stand-in for $TAG built by tests/container/standin.sh" \
  - "$TAG" >/dev/null
echo "standin: built $TAG in $((SECONDS - start))s ($($PODMAN image inspect --format '{{.Size}}' "$TAG") bytes)"
