#!/usr/bin/env bash
# Build the pxepeer imager: Debian's kernel plus a busybox initramfs whose init loads the
# NIC and disk drivers and runs the imaging agent (imaging/agent/pxepeer-agent.sh), which
# writes a disk image from the site's peers and reboots into it.
# Usage: build.sh OUTDIR --trust publisher.pub [--trust other.pub ...]
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
usage="usage: build.sh OUTDIR --trust PUBLISHER.pub [--trust PUBLISHER.pub ...]"
out=${1:?$usage}
shift
trust=()
while [ $# -gt 0 ]; do
    case $1 in
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

die() { echo "build.sh: $*" >&2; exit 1; }
# shellcheck source=SCRIPTDIR/../lib/initramfs.sh
. "$here/../lib/initramfs.sh"
check_tools apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum openssl ldd base64
[ -f "$agent" ] || die "$agent is missing"
openssl=$(command -v openssl)

# The keys first: a bad --trust file fails the build before anything is downloaded.
keys=$(mktemp -d)
trap 'rm -rf "$keys"' EXIT
bash "$here/trust-keys.sh" "$keys" "${trust[@]}" || exit 1
# The agent's boot-server discovery (for an imager whose signed command line names no
# server), a static C program of ~200 lines: busybox cannot send a UDP broadcast.
cc=${PXEPEER_IMAGER_CC:-gcc}
check_tools "$cc"
"$cc" -static -Os -s -Wall -o "$keys/pxe-discover" "$discover_src" ||
    die "could not compile $discover_src with $cc"

debian_kernel
resolve_modules "${modules[@]}"

# --- the output, cached by everything that goes into it -----------------------------------
key=$({
    echo "$deb $epoch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$here/../lib/initramfs.sh" "$0" "$agent" \
        "$here/trust-keys.sh" "$busybox" "$keys/pxe-discover" | cut -d' ' -f1
    # The trusted keys (names and contents) and the verifier with its libraries.
    (cd "$keys" && sha256sum -- *.pem)
    program_files "$openssl" | xargs sha256sum | cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/imager-$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage" "$keys"' EXIT
    root="$stage/root"
    busybox_root "$root" "$here/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    install -m 0755 "$agent" "$root/bin/pxepeer-agent"
    install -m 0755 "$keys/pxe-discover" "$root/bin/pxe-discover"
    install -d -m 0755 "$root/etc/pxepeer/trust"
    install -m 0644 "$keys"/*.pem "$root/etc/pxepeer/trust/"
    install_program "$root" "$openssl"
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
