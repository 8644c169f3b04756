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
for tool in apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg cpio gzip kmod)"
done
[ -x "$busybox" ] || die "$busybox is missing (apt-get install busybox-static)"
if command -v file >/dev/null && file -L "$busybox" | grep -q 'dynamically linked'; then
    die "$busybox is dynamically linked; the initramfs needs busybox-static"
fi
[ -f "$agent" ] || die "$agent is missing"

# shellcheck source=SCRIPTDIR/debian-kernel.sh
. "$here/debian-kernel.sh"
debian_kernel

# --- the modules (dependencies and soft dependencies, in load order) ----------------------
# kmod's modprobe reads the tree's modules.dep/softdep; each module's dependencies come
# before it, so first occurrences give a valid load order. Built-in modules need nothing.
load_order=()
declare -A seen=()
for module in "${modules[@]}"; do
    while read -r verb path _; do
        [ "$verb" = insmod ] || continue
        rel=${path#"$moddir"/}
        [ -n "${seen[$rel]:-}" ] && continue
        seen[$rel]=1
        load_order+=("$rel")
    done < <(modprobe -d "$tree" -S "$kver" --show-depends "$module")
done

# --- the output, cached by everything that goes into it -----------------------------------
key=$({
    echo "$deb $epoch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$here/debian-kernel.sh" "$0" "$agent" \
        "$busybox" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/imager-$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root}
    install -m 0755 "$busybox" "$root/bin/busybox"
    # Applet links made here, in a fixed order in the archive, not at boot.
    for applet in $("$busybox" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$root/$applet"
    done
    install -m 0755 "$here/init" "$root/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    install -m 0755 "$agent" "$root/bin/pxepeer-agent"
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 0600 "$root/dev/console" c 5 1
    fi

    target="$root/lib/modules/$kver"
    mkdir -p "$target"
    : >"$target/load-order"
    for rel in "${load_order[@]}"; do
        plain=${rel%.xz}; plain=${plain%.zst}; plain=${plain%.gz}
        mkdir -p "$target/$(dirname "$plain")"
        # Decompressed here: busybox insmod cannot read every compression the kernel
        # packages use (zstd in newer Debian); plain .ko always loads.
        case "$rel" in
            *.ko.xz) xz -dc "$moddir/$rel" >"$target/$plain" ;;
            *.ko.zst) zstd -qdc "$moddir/$rel" >"$target/$plain" ;;
            *.ko.gz) gzip -dc "$moddir/$rel" >"$target/$plain" ;;
            *) cp "$moddir/$rel" "$target/$plain" ;;
        esac
        echo "$plain" >>"$target/load-order"
    done
    # A modules.dep for what is in the image, so the kernel's own request_module() (via
    # busybox modprobe) finds e.g. the crc providers sd_mod asks for.
    awk -v keep="$(printf '%s\n' "${load_order[@]}")" '
        BEGIN { n = split(keep, k, "\n"); for (i = 1; i <= n; i++) have[k[i]] = 1 }
        function plain(p) { sub(/\.(xz|zst|gz)$/, "", p); return p }
        { mod = $1; sub(/:$/, "", mod)
          if (!(mod in have)) next
          line = plain(mod) ":"
          for (i = 2; i <= NF; i++) if ($i in have) line = line " " plain($i)
          print line }' "$moddir/modules.dep" | sort >"$target/modules.dep"

    find "$root" -exec touch -h -d "@$epoch" {} +
    (cd "$root" && find . -print0 | sort -z |
        cpio --quiet --null --create --format=newc --owner=0:0 --reproducible) |
        gzip -n -9 >"$stage/initrd.img"
    install -m 0644 "$tree/boot/vmlinuz-$kver" "$stage/vmlinuz"
    touch -d "@$epoch" "$stage/vmlinuz" "$stage/initrd.img"

    mkdir -p "$built"
    mv "$stage/vmlinuz" "$stage/initrd.img" "$built/"
    echo "$kver" >"$built/kernel-version"
    touch "$built/.complete"
fi

mkdir -p "$out"
cp -p "$built/vmlinuz" "$built/initrd.img" "$out/"
echo "build.sh: $out/vmlinuz ($kver) and $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)" >&2
