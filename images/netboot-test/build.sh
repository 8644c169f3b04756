#!/usr/bin/env bash
# Build the netboot test image: Debian's real kernel plus a small busybox initramfs that
# loads the NIC and disk drivers, prints markers on the serial console, DHCPs and powers
# off. Usage: build.sh OUTDIR  ->  OUTDIR/vmlinuz, OUTDIR/initrd.img
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`:
# it is never installed on this machine. Everything downloaded or unpacked is kept in a
# cache (PXEPEER_LAB_CACHE, default /var/cache/pxepeer-lab) so a re-run takes a second,
# and the output is byte-for-byte reproducible (fixed mtimes, owners and cpio order).
#
# Environment:
#   PXEPEER_LAB_CACHE        cache directory
#   PXEPEER_LAB_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#   SOURCE_DATE_EPOCH        timestamp of every file in the output (default 2000-01-01)
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
epoch=${SOURCE_DATE_EPOCH:-946684800}
busybox=${PXEPEER_LAB_BUSYBOX:-/bin/busybox}
# The drivers a QEMU (or typical store PC) test machine needs for its NIC and disk.
modules=(e1000 e1000e virtio_net virtio_pci virtio_blk virtio_scsi ata_piix ahci sd_mod)

die() { echo "build.sh: $*" >&2; exit 1; }
# shellcheck source=SCRIPTDIR/../lib/initramfs.sh
. "$here/../lib/initramfs.sh"
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum
mkdir -p "$out"

debian_kernel
resolve_modules "${modules[@]}"
[ "${#load_order[@]}" -gt 0 ] || echo "build.sh: all drivers are built into $kver" >&2

# --- the output, cached by everything that goes into it ------------------------------
key=$({
    echo "$deb $epoch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$0" "$here/../lib/initramfs.sh" "$busybox" |
        cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    busybox_root "$root" "$here/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    install_modules "$root"
    pack_initramfs "$root" "$stage/initrd.img"
    keep_netboot_build "$stage" "$built"
fi

cp -p "$built/vmlinuz" "$built/initrd.img" "$out/"
echo "build.sh: $out/vmlinuz ($kver) and $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)" >&2
