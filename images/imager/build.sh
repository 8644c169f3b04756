#!/usr/bin/env bash
# Build the pxepeer imager: Debian's kernel plus a busybox initramfs whose init loads the
# NIC and disk drivers and runs the imaging agent (imaging/agent/pxepeer-agent.sh), which
# writes a disk image from the site's peers and reboots into it.
# Usage: build.sh OUTDIR  ->  OUTDIR/vmlinuz, OUTDIR/initrd.img
#
# Then put it into a store as an image of kind imager, e.g.
#   pxepeer image add imager --kind imager --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.img \
#       --cmdline 'console=ttyS0 console=tty0' --key publisher.key
# (the boot script adds pxepeer.server=...; pxepeer.image=NAME, pxepeer.poweroff,
# pxepeer.verify and pxepeer.jobs=N are read by the agent, see its header).
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`
# (never installed), shared with the other recipes through the cache. The output is
# byte-for-byte reproducible: fixed mtimes and owners, sorted cpio, gzip -n.
#
# Environment:
#   PXEPEER_LAB_CACHE        cache directory (default /var/cache/pxepeer-lab)
#   PXEPEER_LAB_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#   SOURCE_DATE_EPOCH        timestamp of every file in the output (default 2000-01-01)
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
agent="$repo/imaging/agent/pxepeer-agent.sh"
out=${1:?usage: build.sh OUTDIR}
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
epoch=${SOURCE_DATE_EPOCH:-946684800}
busybox=${PXEPEER_LAB_BUSYBOX:-/bin/busybox}
# NICs and disk controllers of QEMU machines and typical store PCs.
modules=(e1000 e1000e virtio_net virtio_pci virtio_blk virtio_scsi ata_piix ahci sd_mod nvme)

die() { echo "build.sh: $*" >&2; exit 1; }
# shellcheck source=SCRIPTDIR/../lib/initramfs.sh
. "$here/../lib/initramfs.sh"
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum
[ -f "$agent" ] || die "$agent is missing"

debian_kernel
resolve_modules "${modules[@]}"

# --- the output, cached by everything that goes into it -----------------------------------
key=$({
    echo "$deb $epoch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$here/../lib/initramfs.sh" "$0" "$agent" \
        "$busybox" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/imager-$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    busybox_root "$root" "$here/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    install -m 0755 "$agent" "$root/bin/pxepeer-agent"
    install_modules "$root"
    pack_initramfs "$root" "$stage/initrd.img"
    keep_netboot_build "$stage" "$built"
fi

mkdir -p "$out"
cp -p "$built/vmlinuz" "$built/initrd.img" "$out/"
echo "build.sh: $out/vmlinuz ($kver) and $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)" >&2
