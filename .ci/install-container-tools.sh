#!/usr/bin/env bash
# Install what tests/container/ needs to build and run the image without a
# Docker engine: podman with runc, and debootstrap for the stand-in base image
# (see tests/container/standin.sh). Idempotent: does nothing when all present.
#
# Quirks of this kind of machine (gVisor sandbox, cgroup v1, no systemd), all
# handled by the flags in tests/container/conftest.py rather than by config:
#   - use `podman --runtime runc` (crun fails on rlimits/cgroups here);
#   - pass explicit --ulimit nofile/nproc at or below the host's limits:
#     podman 4.3 otherwise asks for nofile=1048576 (even with --ulimit host),
#     which the sandbox refuses ("error setting rlimit type 7");
#   - storage driver overlay (native), cgroup manager cgroupfs and the "file"
#     events backend are what podman picks by itself here;
#   - no systemd: pass --health-interval=disable to `podman run`, else podman
#     logs errors about healthcheck timers (`podman healthcheck run` still works).
set -euo pipefail

need=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "install-container-tools: podman, runc and debootstrap already present"
  exit 0
fi

echo "install-container-tools: installing (missing: ${need[*]})"
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq \
  podman runc debootstrap uidmap fuse-overlayfs slirp4netns >/dev/null
podman --version
runc --version | head -n 1
