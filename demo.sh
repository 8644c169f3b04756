#!/usr/bin/env bash
# sudo ./demo.sh [--firmware bios|uefi] [--peers N] [--wan-rate RATE] [--dashboard-port PORT]
#                [--workdir DIR]
#
# A virtual store (network namespaces, a router with plain DHCP, QEMU): N pxepeer peers
# (default 3) follow an origin over a slow shaped WAN, fetching each chunk across it once
# and swarming it over the LAN; the site elects a PXE responder, whose dashboard is
# relayed to 127.0.0.1 on this host; then a blank VM is assigned the demo OS, images its
# disk from the peers and boots the demo OS from that disk, each stage printed as it
# happens (tests/lab/demo.py). Installs what it needs first: Debian packages if missing,
# and pxepeer into a venv (PXEPEER_VENV, default /var/cache/pxepeer-lab/venv; a venv you
# name that already imports pxepeer's dependencies is used as it is). Nothing leaves the
# namespaces it creates, nothing on the host listens beyond 127.0.0.1; everything is
# deleted on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo ./demo.sh): it creates network namespaces and runs QEMU" >&2
  exit 2
fi

# Tool -> Debian package; only the missing ones are installed.
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86 [/usr/lib/ipxe/qemu/efi-e1000.rom]=ipxe-qemu
  [/usr/lib/ipxe/undionly.kpxe]=ipxe [/usr/share/OVMF/OVMF_CODE_4M.fd]=ovmf
  [dnsmasq]=dnsmasq-base [/bin/busybox]=busybox-static [curl]=curl [ip]=iproute2
  [cpio]=cpio [depmod]=kmod [gzip]=gzip [xz]=xz-utils [zstd]=zstd [apt-get]=apt
  [nginx]=nginx-light [tc]=iproute2 [sfdisk]=fdisk [mkfs.fat]=dosfstools [mcopy]=mtools
  [syslinux]=syslinux [/usr/lib/syslinux/mbr/mbr.bin]=syslinux-common [openssl]=openssl
  [gcc]=gcc [/usr/include/stdio.h]=libc6-dev [readelf]=binutils
)
missing=()
for tool in "${!need[@]}"; do
  if [[ $tool == /* ]]; then [ -e "$tool" ] && continue; else command -v "$tool" >/dev/null && continue; fi
  missing+=("${need[$tool]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# Python's headers build the TFTP server's C fast path (without them it runs in Python).
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' ||
  missing+=(python3-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# pxepeer and its Python dependencies, as the README's test command does it.
venv=${PXEPEER_VENV:-/var/cache/pxepeer-lab/venv}
stamp="$venv/.pxepeer-pyproject.sha256"
# A venv named by PXEPEER_VENV that already runs pxepeer (e.g. the test suite's) is used
# as it is; the default one is (re)made whenever pyproject.toml or setup.py's C changes.
usable() {
  [ -n "${PXEPEER_VENV:-}" ] && "$venv/bin/python" -c 'import peer.serve, peer.daemon' 2>/dev/null
}
if [ ! -x "$venv/bin/python" ] || { ! sha256sum -c --status "$stamp" 2>/dev/null && ! usable; }; then
  echo "setting up $venv (pip install -e .)"
  log=$(mktemp)
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip &&
         "$venv/bin/pip" install -q -e .; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "pip install -e . failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  # setup.py builds the C fast path in place: a changed one needs a new install too.
  sha256sum "$PWD/pyproject.toml" "$PWD/setup.py" "$PWD/pxe/_lockstep.c" >"$stamp"
fi

# The Python side removes everything it made (it handles Ctrl-C, TERM and HUP itself).
# This is the backstop if it is killed hard: its namespaces are named pxlab<its pid>-*,
# so only the demo's own are deleted.
child=
# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
remove_leftovers() {
  [ -n "$child" ] || return 0
  for ns in $(ip netns list | awk -v p="pxlab${child}-" 'index($1, p) == 1 {print $1}'); do
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap remove_leftovers EXIT
# Ctrl-C reaches the child from the terminal too: wait for it to clean up. TERM/HUP sent
# to this script only are passed on.
trap ':' INT
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM HUP

"$venv/bin/python" -m tests.lab.demo "$@" &
child=$!
while :; do
  status=0
  wait "$child" || status=$?
  kill -0 "$child" 2>/dev/null || break  # returned because a trap ran: keep waiting
done
exit "$status"
