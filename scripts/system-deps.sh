#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need, once. Idempotent: does
# nothing when every command is already there.
set -euo pipefail
declare -A want=(
  [qemu-io]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [nbdinfo]=libnbd-bin
  [nbdkit]=nbdkit
  [fio]=fio
  [busybox]=busybox-static
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [cpio]=cpio
  [gcc]=gcc
  [xz]=xz-utils
  [chromium]=chromium
  [chromedriver]=chromium-driver
  [promtool]=prometheus
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
