#!/usr/bin/env bash
# sudo ./demo.sh [--firmware bios|uefi|edk2] [--workdir DIR]
#
# A virtual store (network namespaces, a router with plain DHCP, a QEMU VM) in which the
# VM network-boots a signed test image from `pxepeer serve`, printing each stage as it
# happens. Installs what it needs first: Debian packages if missing, and pxepeer into a
# venv (PXEPEER_VENV, default /var/cache/pxepeer-lab/venv). Nothing leaves the namespaces
# it creates; they are deleted on exit, Ctrl-C included.
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
)
missing=()
for tool in "${!need[@]}"; do
  if [[ $tool == /* ]]; then [ -e "$tool" ] && continue; else command -v "$tool" >/dev/null && continue; fi
  missing+=("${need[$tool]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# pxepeer and its Python dependencies, as the README's test command does it.
venv=${PXEPEER_VENV:-/var/cache/pxepeer-lab/venv}
stamp="$venv/.pxepeer-pyproject.sha256"
if [ ! -x "$venv/bin/python" ] || ! sha256sum -c --status "$stamp" 2>/dev/null; then
  echo "setting up $venv (pip install -e .)"
  log=$(mktemp)
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip &&
         "$venv/bin/pip" install -q -e .; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "pip install -e . failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  sha256sum "$PWD/pyproject.toml" >"$stamp"
fi

# The Python side removes everything it made (it handles Ctrl-C, TERM and HUP itself).
# This is the backstop if it is killed hard: its namespaces are named pxlab<its pid>-*,
# so only the demo's own are deleted.
child=
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
