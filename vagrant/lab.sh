#!/usr/bin/env bash
# sudo vagrant/lab.sh up [--clients bios,uefi] [--peers N] [--wan-rate RATE] [--workdir DIR]
# sudo vagrant/lab.sh status [--workdir DIR]
# sudo vagrant/lab.sh down [--workdir DIR]
#
# The pxepeer virtual store on libvirt, with its PXE clients brought up by Vagrant from
# this directory's Vagrantfile (box-less: nothing is downloaded). `up` makes a lab bridge
# with no physical port, a site of `pxepeer serve` peers in network namespaces (store
# router, origin behind a shaped WAN), a libvirt network and pool, starts libvirtd if
# none answers, then `vagrant up`s the clients and shows each imaging its disk and
# booting it. `down` removes all of it; a failed or interrupted `up` does so itself.
# The work directory (default /var/tmp/pxepeer-vagrant-lab) keeps state and logs.
# The engine is tests/lab/vagrant_lab.py; README.md says what is made and how to watch.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (sudo vagrant/lab.sh ...): it makes network namespaces, a bridge and VMs" >&2
  exit 2
fi

# Nothing is installed from here (offline): say what is missing instead.
declare -A need=(
  [vagrant]=vagrant [virsh]=libvirt-clients [libvirtd]=libvirt-daemon-system
  [virtlogd]=libvirt-daemon-system [qemu-system-x86_64]=qemu-system-x86
  [/usr/lib/ipxe/qemu/efi-e1000.rom]=ipxe-qemu [/usr/lib/ipxe/undionly.kpxe]=ipxe
  [/usr/share/OVMF/OVMF_CODE_4M.fd]=ovmf [dnsmasq]=dnsmasq-base [nginx]=nginx-light
  [/bin/busybox]=busybox-static [curl]=curl [ip]=iproute2 [tc]=iproute2 [unshare]=util-linux
  [cpio]=cpio [depmod]=kmod [zstd]=zstd [xz]=xz-utils [sfdisk]=fdisk [mkfs.fat]=dosfstools
  [mcopy]=mtools [syslinux]=syslinux [/usr/lib/syslinux/mbr/mbr.bin]=syslinux-common
  [openssl]=openssl [gcc]=gcc [readelf]=binutils
)
missing=()
for tool in "${!need[@]}"; do
  if [[ $tool == /* ]]; then [ -e "$tool" ] && continue; else command -v "$tool" >/dev/null && continue; fi
  missing+=("${need[$tool]}")
done
if [ ! -d /usr/share/rubygems-integration/all/gems ] ||
   ! compgen -G "/usr/share/rubygems-integration/all/gems/vagrant-libvirt-*" >/dev/null; then
  missing+=(vagrant-libvirt)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing Debian packages: apt-get install $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')" >&2
  exit 2
fi

# A Python that runs pxepeer: PXEPEER_VENV, else demo.sh's venv, else python3 itself.
python=
for candidate in "${PXEPEER_VENV:+$PXEPEER_VENV/bin/python}" /var/cache/pxepeer-lab/venv/bin/python python3; do
  [ -n "$candidate" ] || continue
  if "$candidate" -c 'import aiohttp, cryptography, click, scapy, zeroconf, dnslib, aiofiles' 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "no Python with pxepeer's dependencies: run ./demo.sh once (it makes" \
       "/var/cache/pxepeer-lab/venv), or set PXEPEER_VENV to a venv with 'pip install -e .'" >&2
  exit 2
fi

# The Python side tears down on failure, Ctrl-C, TERM and HUP. If it is killed hard
# during `up`, this trap runs `down`, which removes what was made by the names and pid
# files in the work directory.
args=("$@")
rc=0
child=
# shellcheck disable=SC2317  # run by the trap
backstop() {
  [ "${args[0]:-}" = up ] && [ "$rc" -gt 128 ] || return 0
  echo "lab.sh up was killed (status $rc): lab.sh down" >&2
  "$python" -m tests.lab.vagrant_lab down "${args[@]:1}" || true
}
trap backstop EXIT
# Ctrl-C reaches Python from the terminal too: wait for it to tear down. TERM/HUP sent
# to this script only are passed on.
trap ':' INT
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM HUP
"$python" -m tests.lab.vagrant_lab "$@" &
child=$!
while :; do
  rc=0
  wait "$child" || rc=$?
  kill -0 "$child" 2>/dev/null || break  # returned because a trap ran: keep waiting
done
exit "$rc"
