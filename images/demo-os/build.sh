#!/usr/bin/env bash
# Build the pxepeer demo OS: a small raw disk image that boots on BIOS machines from its
# own disk (MBR -> SYSLINUX on a FAT partition -> Debian's kernel + a busybox initramfs
# that prints `PXEPEER-DEMO-OS: booted from disk` on ttyS0 and powers off).
# Usage: build.sh OUTDIR  ->  OUTDIR/disk.raw (sparse; mostly zeros)
#
# Made without loop devices or mounts, so it runs unprivileged and in containers: the FAT
# file system is made in a file of the partition's size (mkfs.fat), filled with mtools,
# made bootable by syslinux's mtools installer, then copied into the disk file behind an
# MBR partition table written by sfdisk and syslinux's mbr.bin.
#
# Environment:
#   PXEPEER_LAB_CACHE        cache directory (default /var/cache/pxepeer-lab)
#   PXEPEER_DEMO_DISK_MB     disk size in MiB (default 64)
#   SOURCE_DATE_EPOCH        timestamp of every file, in the initramfs and on the FAT
#                            (default 2000-01-01): the disk is byte-for-byte reproducible
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR}
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
epoch=${SOURCE_DATE_EPOCH:-946684800}
# mtools (and so syslinux's installer) stamp FAT directory entries with this, not "now".
export SOURCE_DATE_EPOCH=$epoch
busybox=${PXEPEER_LAB_BUSYBOX:-/bin/busybox}
disk_mb=${PXEPEER_DEMO_DISK_MB:-64}
mbr_bin=${PXEPEER_SYSLINUX_MBR:-/usr/lib/syslinux/mbr/mbr.bin}
part_start_sectors=2048 # 1 MiB: the usual alignment, and room for the MBR gap

die() { echo "build.sh: $*" >&2; exit 1; }
# shellcheck source=SCRIPTDIR/../lib/initramfs.sh
. "$here/../lib/initramfs.sh"
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod sha256sum sfdisk mkfs.fat mcopy syslinux
[ -f "$mbr_bin" ] || die "$mbr_bin is missing (apt-get install syslinux-common)"
[ "$disk_mb" -ge 32 ] || die "PXEPEER_DEMO_DISK_MB must be at least 32 (kernel + FAT overhead)"

debian_kernel

mkdir -p "$out"
key=$({
    echo "$deb $epoch $disk_mb"
    sha256sum "$here/init" "$here/syslinux.cfg" "$0" "$here/../lib/initramfs.sh" \
        "$busybox" "$mbr_bin" "$(command -v syslinux)" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/demo-os-$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT

    # --- the initramfs: busybox and an init, nothing else (the demo OS needs no modules:
    # the serial console is built into Debian's kernel and it never touches a disk) ------
    root="$stage/root"
    busybox_root "$root" "$here/init"
    pack_initramfs "$root" "$stage/initrd.img"
    install -m 0644 "$tree/boot/vmlinuz-$kver" "$stage/vmlinuz"
    touch -d "@$epoch" "$stage/vmlinuz" "$stage/initrd.img"
    cp "$here/syslinux.cfg" "$stage/syslinux.cfg"
    touch -d "@$epoch" "$stage/syslinux.cfg"

    # --- the FAT partition, as a file of its own ------------------------------------------
    part_bytes=$(((disk_mb << 20) - part_start_sectors * 512))
    truncate -s "$part_bytes" "$stage/part.img"
    # -h: the partition's first sector, which SYSLINUX's boot sector adds to find its
    # files on the whole disk. --invariant: a fixed volume id, the same bytes every build.
    mkfs.fat -F 16 -n PXEPEER-OS -h "$part_start_sectors" --invariant \
        "$stage/part.img" >/dev/null
    # -m keeps the (fixed) modification times of the sources.
    mcopy -m -i "$stage/part.img" "$stage/vmlinuz" "$stage/initrd.img" "$stage/syslinux.cfg" ::/
    # The mtools installer: writes ldlinux.sys/ldlinux.c32 and the boot sector into the
    # file; no loop device, no mount.
    syslinux --install "$stage/part.img"

    # --- the disk: partition table, SYSLINUX's MBR code, the partition ---------------------
    truncate -s "${disk_mb}M" "$stage/disk.raw"
    printf 'label: dos\nlabel-id: 0x70787065\nstart=%d, type=e, bootable\n' \
        "$part_start_sectors" | sfdisk --quiet --no-reread --no-tell-kernel "$stage/disk.raw"
    # The first 440 bytes only: the partition table and disk signature stay as sfdisk wrote.
    dd if="$mbr_bin" of="$stage/disk.raw" bs=440 count=1 conv=notrunc status=none
    # conv=sparse: the FAT's empty clusters stay holes, so the file is small on disk too.
    dd if="$stage/part.img" of="$stage/disk.raw" bs=512 seek="$part_start_sectors" \
        conv=notrunc,sparse status=none
    touch -d "@$epoch" "$stage/disk.raw"

    mkdir -p "$built"
    mv "$stage/disk.raw" "$built/"
    echo "$kver" >"$built/kernel-version"
    touch "$built/.complete"
fi

cp --sparse=always -p "$built/disk.raw" "$out/disk.raw"
echo "build.sh: $out/disk.raw ($disk_mb MiB, kernel $kver, $(du -k "$out/disk.raw" | cut -f1) KiB used)" >&2
