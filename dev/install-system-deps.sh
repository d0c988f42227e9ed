#!/usr/bin/env bash
# Debian packages the project uses, by group; only what is missing is installed, so a run with
# everything present costs a few `command -v` calls (no apt-get update).
#   dev/install-system-deps.sh             prometheus (the demo and its end-to-end test scrape with it) and
#                                          its promtool (checks and unit-tests the alert rules)
#   dev/install-system-deps.sh containers  podman, buildah, runc, mmdebstrap (`make images`, `make demo-helm`)
# Go (for the control plane and helm) and Python 3.11 are expected on the machine. `make demo`
# needs only the first group: pods run as processes when no container runtime is installed.
set -euo pipefail
group="${1:-base}"
case "$group" in
  base) wanted="prometheus:prometheus promtool:prometheus" ;;
  # crun refuses some hosts' hybrid cgroup layout: dev/containers.conf selects runc (+ cgroupfs).
  containers) wanted="podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap" ;;
  *)
    echo "error: unknown group '$group' (known: base, containers)" >&2
    exit 2
    ;;
esac
missing=()
for pair in $wanted; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${pair%%:*}" >/dev/null 2>&1 ||
    missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing ${missing[*]}; this script installs them with apt-get only: install them with your package manager" >&2
  exit 1
fi
echo ">> installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq || ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  echo "error: could not install ${missing[*]} with apt-get (root or sudo, and a reachable Debian mirror, are needed)" >&2
  exit 1
fi
