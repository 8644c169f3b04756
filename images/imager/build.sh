#!/usr/bin/env bash
# Build the pxepeer imager: Debian's kernel plus a busybox initramfs whose init loads the
# NIC and disk drivers and runs the imaging agent (imaging/agent/pxepeer-agent.sh), which
# writes a disk image from the site's peers and reboots into it.
# Usage: build.sh OUTDIR --trust publisher.pub [--trust other.pub ...] [--arch amd64|arm64]
#            ->  OUTDIR/vmlinuz, OUTDIR/initrd.img
#
# --trust (at least one) names the publisher keys the imager trusts, pxepeer .pub files
# (`pxepeer keys new`; keys with a role other than publisher are skipped). They go into
# the initramfs as /etc/pxepeer/trust/KEYID.pem (images/imager/trust-keys.sh), and the
# agent writes a disk only from a manifest whose id matches its bytes and that one of
# them signed: hashes, offsets, sizes and zero chunks all come from that manifest, the
# plan the server hands out only says which peers to fetch each chunk from. The
# verifier is Debian's openssl with the shared libraries it needs (ldd) and the dynamic
# loader, copied from this machine like busybox: the gzip'd initrd grows from 2.1 to
# 5.6 MB (libcrypto is most of it; a few tenths of a second on a LAN), but there is no
# signature code of our own, and Debian's security updates reach it at the next build.
# A static verifier of our own would be smaller and would be ours to keep correct.
# Rebuild the imager to change the keys.
#
# Then put it into a store as an image of kind imager, e.g.
#   pxepeer image add imager --kind imager --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.img \
#       --cmdline 'console=ttyS0 console=tty0' --key publisher.key
# (the boot script adds pxepeer.server=...; pxepeer.image=NAME, pxepeer.poweroff,
# pxepeer.verify and pxepeer.jobs=N are read by the agent, see its header).
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`
# (never installed), shared with the other recipes through the cache. The output is
# byte-for-byte reproducible: fixed mtimes and owners, sorted cpio, gzip -n (the same
# keys, kernel package and this machine's busybox and openssl give the same bytes).
#
# --arch arm64 builds the imager for ARM64 UEFI machines (default amd64): Debian's arm64
# kernel (linux-image-arm64), and busybox-static, openssl, libssl3 and libc6 of arm64
# unpacked from their .debs (`apt-get download PKG:arm64`: the host needs
# `dpkg --add-architecture arm64 && apt-get update`, as .ci/run does), never this
# machine's binaries. ldd cannot run arm64 programs, so openssl's libraries are found
# from their NEEDED entries (readelf -d) in the unpacked packages, with the loader its
# PT_INTERP names (/lib/ld-linux-aarch64.so.1). The applet links come from this
# machine's busybox, which must be the same Debian version (checked). virtio-pci, net,
# blk and scsi are modules in Debian's arm64 kernel too. Put it into a store with
#   pxepeer image add imager-arm64 --kind imager --arch arm64 --kernel OUTDIR/vmlinuz ...
# and ARM64 machines booting GRUB (pxe/secure_boot.py) get it; x86 machines never do.
# Reproducible like the amd64 build (the same .debs give the same bytes).
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
discover_src="$repo/imaging/agent/pxe-discover.c"
usage="usage: build.sh OUTDIR --trust PUBLISHER.pub [--trust PUBLISHER.pub ...] [--arch amd64|arm64]"
out=${1:?$usage}
shift
trust=()
arch=amd64
while [ $# -gt 0 ]; do
    case $1 in
        --arch)
            [ $# -ge 2 ] || { echo "build.sh: --arch needs a value; $usage" >&2; exit 2; }
            case $2 in
                amd64 | arm64) arch=$2 ;;
                *) echo "build.sh: unknown architecture $2; $usage" >&2; exit 2 ;;
            esac
            shift 2
            ;;
        --trust)
            [ $# -ge 2 ] || { echo "build.sh: --trust needs a file; $usage" >&2; exit 2; }
            trust+=("$2")
            shift 2
            ;;
        --trust=*)
            trust+=("${1#--trust=}")
            shift
            ;;
        *)
            echo "build.sh: unknown argument $1; $usage" >&2
            exit 2
            ;;
    esac
done
if [ ${#trust[@]} -eq 0 ]; then
    echo "build.sh: no --trust PUBLISHER.pub: an imager that trusts no key cannot verify what it writes" >&2
    exit 2
fi
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
epoch=${SOURCE_DATE_EPOCH:-946684800}
busybox=${PXEPEER_LAB_BUSYBOX:-/bin/busybox}
# NICs and disk controllers of QEMU machines and typical store PCs.
modules=(e1000 e1000e virtio_net virtio_pci virtio_blk virtio_scsi ata_piix ahci sd_mod nvme)
if [ "$arch" = arm64 ]; then
    # QEMU's virt machine (virtio over PCI or MMIO) and ARM64 boards' usual NICs.
    modules=(virtio_net virtio_pci virtio_mmio virtio_blk virtio_scsi e1000e igb r8169 ahci sd_mod nvme)
fi
kernel_arch=$arch

die() { echo "build.sh: $*" >&2; exit 1; }
# shellcheck source=SCRIPTDIR/../lib/initramfs.sh
. "$here/../lib/initramfs.sh"
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum openssl ldd base64
[ -f "$agent" ] || die "$agent is missing"
openssl=$(command -v openssl)

# --- arm64: the initramfs's programs from Debian's arm64 packages -------------------------
# sysroot_files PROGRAM: PROGRAM (a path in $sysroot), the libraries it needs, theirs in
# turn, and its loader, one path a line: what ldd prints for this machine's programs.
sysroot_files() {
    local -A seen=()
    local queue=("$1") files=() file lib dir found interp
    interp=$(readelf -l "$sysroot$1" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
    [ -n "$interp" ] || die "$1 names no program interpreter"
    queue+=("$interp")
    while [ ${#queue[@]} -gt 0 ]; do
        file=${queue[0]}
        queue=("${queue[@]:1}")
        [ -z "${seen[$file]:-}" ] || continue
        seen[$file]=1
        files+=("$file")
        for lib in $(readelf -d "$sysroot$file" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
            found=
            # Debian's multiarch directories, where its loader looks first.
            for dir in "/lib/$triplet" "/usr/lib/$triplet" /lib /usr/lib; do
                if [ -e "$sysroot$dir/$lib" ]; then
                    found="$dir/$lib"
                    break
                fi
            done
            [ -n "$found" ] || die "$file needs $lib, which no $arch package here holds"
            queue+=("$found")
        done
    done
    printf '%s\n' "${files[@]}" | sort
}

verifier_files=()
if [ "$arch" != amd64 ]; then
    check_tools readelf
    triplet=aarch64-linux-gnu
    debs=()
    for pkg in busybox-static openssl libssl3 libc6; do
        debian_deb "$pkg" "$arch"
        debs+=("$deb")
    done
    # All four unpacked into one tree, once: the libraries resolve inside it.
    sysroot="$cache/unpacked/imager-sysroot-$arch-$(printf '%s\n' "${debs[@]}" | sha256sum | cut -c1-16)"
    if [ ! -e "$sysroot/.complete" ]; then
        rm -rf "$sysroot"
        mkdir -p "$sysroot"
        for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$sysroot"; done
        touch "$sysroot/.complete"
    fi
    busybox="$sysroot/bin/busybox"
    # This machine cannot run it to list its applets; its own busybox can, when built from
    # the same Debian version (the same configuration, so the same applets).
    busybox_applets=${PXEPEER_LAB_BUSYBOX:-/bin/busybox}
    theirs=$(grep -ao 'BusyBox v[^)]*)' "$busybox" | head -n 1) || true
    ours=$(grep -ao 'BusyBox v[^)]*)' "$busybox_applets" | head -n 1) || true
    if [ -z "$theirs" ] || [ "$theirs" != "$ours" ]; then
        die "$busybox_applets is '${ours:-unknown}', the $arch one '${theirs:-unknown}':" \
            "the applet list needs the same busybox-static version"
    fi
    mapfile -t verifier_files < <(sysroot_files /usr/bin/openssl)
fi

# The keys first: a bad --trust file fails the build before anything is downloaded.
keys=$(mktemp -d)
trap 'rm -rf "$keys"' EXIT
bash "$here/trust-keys.sh" "$keys" "${trust[@]}" || exit 1
# The agent's boot-server discovery (for an imager whose signed command line names no
# server), a static C program of ~200 lines: busybox cannot send a UDP broadcast.
cc=${PXEPEER_IMAGER_CC:-gcc}
[ "$arch" = amd64 ] || cc=${PXEPEER_IMAGER_CC:-aarch64-linux-gnu-gcc}
discover="$keys/pxe-discover"
if [ "$arch" != amd64 ] && ! command -v "$cc" >/dev/null; then
    # Only an imager whose command line names no server needs it; GRUB and iPXE put
    # pxepeer.server= on it.
    echo "build.sh: no $cc (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross):" \
        "the $arch imager has no pxe-discover and needs pxepeer.server= on its command line" >&2
    discover=
else
    check_tools "$cc"
    "$cc" -static -Os -s -Wall -o "$keys/pxe-discover" "$discover_src" ||
        die "could not compile $discover_src with $cc"
fi

debian_kernel
resolve_modules "${modules[@]}"

# --- the output, cached by everything that goes into it -----------------------------------
key=$({
    echo "$deb $epoch $arch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$here/../lib/initramfs.sh" "$0" "$agent" \
        "$here/trust-keys.sh" "$busybox" ${discover:+"$discover"} | cut -d' ' -f1
    # The trusted keys (names and contents) and the verifier with its libraries.
    (cd "$keys" && sha256sum -- *.pem)
    if [ "$arch" = amd64 ]; then
        program_files "$openssl" | xargs sha256sum | cut -d' ' -f1
    else
        printf '%s\n' "${verifier_files[@]}"
        printf "$sysroot%s\\0" "${verifier_files[@]}" | xargs -0 sha256sum | cut -d' ' -f1
    fi
} | sha256sum | cut -c1-16)
built="$cache/builds/imager-$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage" "$keys"' EXIT
    root="$stage/root"
    busybox_root "$root" "$here/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    install -m 0755 "$agent" "$root/bin/pxepeer-agent"
    [ -z "$discover" ] || install -m 0755 "$discover" "$root/bin/pxe-discover"
    install -d -m 0755 "$root/etc/pxepeer/trust"
    install -m 0644 "$keys"/*.pem "$root/etc/pxepeer/trust/"
    if [ "$arch" = amd64 ]; then
        install_program "$root" "$openssl"
    else
        # At the paths the arm64 loader looks them up at (symbolic links followed).
        for file in "${verifier_files[@]}"; do
            install -D -m 0755 "$sysroot$file" "$root$file"
        done
    fi
    install_modules "$root"
    pack_initramfs "$root" "$stage/initrd.img"
    keep_netboot_build "$stage" "$built"
fi

mkdir -p "$out"
cp -p "$built/vmlinuz" "$built/initrd.img" "$out/"
trusted=("$keys"/*.pem)
trusted=("${trusted[@]##*/}")
echo "build.sh: $out/vmlinuz ($kver) and $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)," \
    "trusting publisher key(s) ${trusted[*]%.pem}" >&2
