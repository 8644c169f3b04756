#!/usr/bin/env bash
# Build the pxepeer demo OS: a small raw disk image that boots from its own disk on BIOS
# and on UEFI machines, into Debian's kernel + a busybox initramfs that prints
# `PXEPEER-DEMO-OS: booted from disk` and `PXEPEER-DEMO-OS: firmware uefi|bios` on ttyS0
# and powers off.
# Usage: build.sh OUTDIR  ->  OUTDIR/disk.raw (sparse; mostly zeros)
#
# One MBR partition, FAT16, active, of type 0xEF (the UEFI specification's EFI System
# Partition type on an MBR disk), holding the kernel and initrd once and both loaders:
#   BIOS: the MBR code (syslinux's mbr.bin) boots the active partition's boot sector,
#         SYSLINUX, which reads syslinux.cfg. mbr.bin does not look at the type.
#   UEFI: the firmware boots the removable-media path \EFI\BOOT\BOOTX64.EFI, which is
#         what a machine with a fresh NVRAM (no boot entry for this disk) runs; that is
#         Debian's shim (signed by Microsoft's UEFI CA), which starts grubx64.efi beside
#         it, Debian's signed GRUB, which reads \EFI\debian\grub.cfg (its built-in
#         prefix) and boots Debian's signed kernel.
# Why shim + GRUB: a store PC has Secure Boot on with Microsoft's keys, and the disk a
# machine was imaged with must boot there (pxepeer's network GRUB chainloads this same
# \EFI\BOOT\BOOTX64.EFI once a machine is imaged); shim runs with Secure Boot off too.
# systemd-boot is unsigned and a unified kernel image would need an organisation's key
# in db. The initrd is not covered by this chain (GRUB's linux verifies the kernel
# only); a signed UKI covers it, and images/imager shows that chain.
# shim-signed and grub-efi-amd64-signed come from the host's Debian release, fetched
# with `apt-get download` and unpacked into the cache with `dpkg-deb -x` like the
# kernel, never installed.
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
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod sha256sum sfdisk mkfs.fat mcopy mmd syslinux
[ -f "$mbr_bin" ] || die "$mbr_bin is missing (apt-get install syslinux-common)"
[ "$disk_mb" -ge 32 ] || die "PXEPEER_DEMO_DISK_MB must be at least 32 (kernel + FAT overhead)"

# signed_file PKG PATH: sets file to PATH inside PKG's unpacked amd64 .deb.
signed_file() {
    local deb tree # not the kernel's, which debian_kernel left in these names
    debian_deb "$1" amd64
    unpack_deb "$deb"
    file="$tree/$2"
    [ -f "$file" ] || die "no $2 in $deb"
}

debian_kernel
signed_file shim-signed usr/lib/shim/shimx64.efi.signed
shim=$file
signed_file grub-efi-amd64-signed usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
grub=$file

mkdir -p "$out"
key=$({
    echo "$deb $epoch $disk_mb"
    sha256sum "$here/init" "$here/syslinux.cfg" "$here/grub.cfg" "$0" \
        "$here/../lib/initramfs.sh" "$busybox" "$mbr_bin" "$(command -v syslinux)" \
        "$shim" "$grub" | cut -d' ' -f1
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
    cp "$here/grub.cfg" "$stage/grub.cfg"
    install -m 0644 "$shim" "$stage/BOOTX64.EFI"
    install -m 0644 "$grub" "$stage/grubx64.efi"
    touch -d "@$epoch" "$stage/syslinux.cfg" "$stage/grub.cfg" "$stage/BOOTX64.EFI" \
        "$stage/grubx64.efi"

    # --- the FAT partition, as a file of its own ------------------------------------------
    part_bytes=$(((disk_mb << 20) - part_start_sectors * 512))
    truncate -s "$part_bytes" "$stage/part.img"
    # -h: the partition's first sector, which SYSLINUX's boot sector adds to find its
    # files on the whole disk. --invariant: a fixed volume id, the same bytes every build.
    mkfs.fat -F 16 -n PXEPEER-OS -h "$part_start_sectors" --invariant \
        "$stage/part.img" >/dev/null
    # -m keeps the (fixed) modification times of the sources.
    mcopy -m -i "$stage/part.img" "$stage/vmlinuz" "$stage/initrd.img" "$stage/syslinux.cfg" ::/
    # The UEFI side. Directories are stamped with SOURCE_DATE_EPOCH by mtools.
    mmd -i "$stage/part.img" ::/EFI ::/EFI/BOOT ::/EFI/debian
    mcopy -m -i "$stage/part.img" "$stage/BOOTX64.EFI" "$stage/grubx64.efi" ::/EFI/BOOT/
    mcopy -m -i "$stage/part.img" "$stage/grub.cfg" ::/EFI/debian/
    # The mtools installer: writes ldlinux.sys/ldlinux.c32 and the boot sector into the
    # file; no loop device, no mount.
    syslinux --install "$stage/part.img"

    # --- the disk: partition table, SYSLINUX's MBR code, the partition ---------------------
    truncate -s "${disk_mb}M" "$stage/disk.raw"
    # type=ef: the EFI System Partition (see the header); bootable: mbr.bin's choice.
    printf 'label: dos\nlabel-id: 0x70787065\nstart=%d, type=ef, bootable\n' \
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
