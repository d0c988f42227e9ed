#!/usr/bin/env bash
# Debian packages the demo and its end-to-end test use: Prometheus (scrapes the operator and
# the trainer) and its promtool (checks and unit-tests the alert rules; same package).
# Go (for the control plane) and Python 3.11 are expected on the machine.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo ">> installing Debian package: prometheus"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
