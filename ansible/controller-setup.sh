#!/usr/bin/env bash
# Prepares a Debian 12 controller (as root) for rkllm-fleet: the Debian packages the playbooks, the
# C test double and the fleet simulator need. Python dependencies are pinned and installed by
# `make venv`. Safe to run again.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "controller-setup.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

packages=(
  make gcc libc6-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross   # test double, host and aarch64
  python3 python3-venv python3-dev git openssh-client curl rsync    # controller
  mmdebstrap arch-test gpg qemu-user-static binfmt-support            # simulated boards: images
  systemd-container                                                   # simulated boards: boot
  iproute2 nftables iputils-ping                                      # simulated network, firewall checks
  nginx libnginx-mod-http-js                                          # balancer config checks and bench
  prometheus prometheus-alertmanager                                  # promtool, amtool checks, alert tests
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Installing nginx or prometheus may start them on a systemd host; the controller needs the binaries.
for service in nginx prometheus prometheus-alertmanager; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
done
echo "controller-setup: Debian packages present"
