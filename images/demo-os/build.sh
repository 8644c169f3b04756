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
#         systemd-boot, reading \loader\loader.conf and \loader\entries\demo.conf.
# Why systemd-boot and not a unified kernel image (the stub + kernel + initrd in one PE):
# a UKI would carry a second copy of the kernel (~8 MiB) and the initrd in every image
# the site stores and every machine downloads; systemd-boot (~140 KiB) loads the same
# vmlinuz and initrd.img SYSLINUX does. A UKI is what Secure Boot with a signed initrd
# needs; the demo OS is booted without Secure Boot (OVMF without it in the lab).
# systemd-boot comes from Debian's systemd-boot-efi package, fetched with `apt-get
# download` and unpacked into the cache with `dpkg-deb -x` like the kernel, never
# installed.
#
# Made without loop devices or mounts, so it runs unprivileged and in containers: the FAT
# file system is made in a file of the partition's size (mkfs.fat), filled with mtools,
# made bootable by syslinux's mtools installer, then copied into the disk file behind an
# MBR partition table written by sfdisk and syslinux's mbr.bin.
#
# Environment:
#   PXEPEER_LAB_CACHE        cache directory (default /var/cache/pxepeer-lab)
#   PXEPEER_DEMO_DISK_MB     disk size in MiB (default 64)
#   PXEPEER_SYSTEMD_BOOT_EFI systemd-bootx64.efi to use instead of Debian's package's
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

# Sets sdboot: systemd-boot's x86-64 EFI binary, from PXEPEER_SYSTEMD_BOOT_EFI or from
# Debian's systemd-boot-efi package (the candidate version, or offline the newest cached).
systemd_boot() {
    local pkg=systemd-boot-efi version='' sb_deb='' sb_tree
    if [ -n "${PXEPEER_SYSTEMD_BOOT_EFI:-}" ]; then
        sdboot=$PXEPEER_SYSTEMD_BOOT_EFI
        [ -f "$sdboot" ] || die "PXEPEER_SYSTEMD_BOOT_EFI=$sdboot is not a file"
        return
    fi
    mkdir -p "$cache/debs"
    version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
        awk '/^Version:/ {print $2; exit}')
    [ -n "$version" ] && sb_deb="$cache/debs/${pkg}_${version//:/%3a}_amd64.deb"
    if [ -z "$sb_deb" ]; then
        sb_deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | sort -V | tail -n 1)
        [ -n "$sb_deb" ] || die "cannot find $pkg: run apt-get update (or set PXEPEER_SYSTEMD_BOOT_EFI)"
    fi
    if [ ! -s "$sb_deb" ]; then
        echo "build.sh: downloading $pkg $version" >&2
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2)
        [ -s "$sb_deb" ] || die "apt-get download did not produce $sb_deb"
    fi
    sb_tree="$cache/unpacked/$(basename "$sb_deb" .deb)"
    if [ ! -e "$sb_tree/.complete" ]; then
        rm -rf "$sb_tree"
        mkdir -p "$sb_tree"
        dpkg-deb -x "$sb_deb" "$sb_tree"
        touch "$sb_tree/.complete"
    fi
    sdboot="$sb_tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    [ -f "$sdboot" ] || die "no systemd-bootx64.efi in $sb_deb"
}

debian_kernel
systemd_boot

mkdir -p "$out"
key=$({
    echo "$deb $epoch $disk_mb"
    sha256sum "$here/init" "$here/syslinux.cfg" "$here/loader/loader.conf" \
        "$here/loader/entries/demo.conf" "$0" "$here/../lib/initramfs.sh" \
        "$busybox" "$mbr_bin" "$(command -v syslinux)" "$sdboot" | cut -d' ' -f1
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
    cp "$here/loader/loader.conf" "$stage/loader.conf"
    cp "$here/loader/entries/demo.conf" "$stage/demo.conf"
    install -m 0644 "$sdboot" "$stage/BOOTX64.EFI"
    touch -d "@$epoch" "$stage/syslinux.cfg" "$stage/loader.conf" "$stage/demo.conf" \
        "$stage/BOOTX64.EFI"

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
    mmd -i "$stage/part.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
    mcopy -m -i "$stage/part.img" "$stage/BOOTX64.EFI" ::/EFI/BOOT/
    mcopy -m -i "$stage/part.img" "$stage/loader.conf" ::/loader/
    mcopy -m -i "$stage/part.img" "$stage/demo.conf" ::/loader/entries/
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
