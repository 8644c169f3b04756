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
for tool in apt-get apt-cache dpkg-deb cpio gzip depmod modprobe sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg cpio gzip kmod)"
done
[ -x "$busybox" ] || die "$busybox is missing (apt-get install busybox-static)"
if command -v file >/dev/null && file -L "$busybox" | grep -q 'dynamically linked'; then
    die "$busybox is dynamically linked; the initramfs needs busybox-static"
fi

mkdir -p "$cache/debs" "$out"

# --- 1. the kernel package --------------------------------------------------------------
pkg=${PXEPEER_LAB_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
deb=
if [ -n "$pkg" ]; then
    version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
    [ -n "$version" ] && deb="$cache/debs/${pkg}_${version//:/%3a}_amd64.deb"
fi
if [ -z "$deb" ]; then
    # No apt metadata (offline, no `apt-get update`): fall back to the newest cached one.
    deb=$(ls -1 "$cache"/debs/linux-image-*-amd64_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$deb" ] || die "cannot find the kernel package: run apt-get update (or set PXEPEER_LAB_KERNEL_PKG)"
fi
if [ ! -s "$deb" ]; then
    echo "build.sh: downloading $pkg $version" >&2
    # Root's downloads are not readable by apt's sandbox user; the warning is noise.
    (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2)
    [ -s "$deb" ] || die "apt-get download did not produce $deb"
fi

# --- 2. unpack once (cached by package file name) ----------------------------------------
tree="$cache/unpacked/$(basename "$deb" .deb)"
if [ ! -e "$tree/.complete" ]; then
    rm -rf "$tree"
    mkdir -p "$tree"
    dpkg-deb -x "$deb" "$tree"
    kver=$(ls -1 "$tree/lib/modules" | head -n 1)
    # The package ships no modules.dep (depmod runs at install, which we never do).
    depmod -b "$tree" "$kver"
    touch "$tree/.complete"
fi
kver=$(ls -1 "$tree/lib/modules" | head -n 1)
moddir="$tree/lib/modules/$kver"
[ -f "$tree/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $deb"

# --- 3. resolve the modules (dependencies and soft dependencies, load order) -------------
# kmod's modprobe reads the tree's modules.dep/softdep; each module's dependencies come
# before it, so first occurrences give a valid load order. Built-in modules print
# "builtin NAME" and need nothing.
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
[ "${#load_order[@]}" -gt 0 ] || echo "build.sh: all drivers are built into $kver" >&2

# --- 4. the output, cached by everything that goes into it ------------------------------
key=$({
    echo "$deb $epoch"
    printf '%s\n' "${load_order[@]}"
    sha256sum "$here/init" "$here/udhcpc.script" "$0" "$busybox" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
built="$cache/builds/$key"
if [ ! -e "$built/.complete" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    root="$stage/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root}
    install -m 0755 "$busybox" "$root/bin/busybox"
    # Applet links made here, not with `busybox --install` at boot, so they are in the
    # archive in a fixed order.
    for applet in $("$busybox" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$root/$applet"
    done
    install -m 0755 "$here/init" "$root/init"
    install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
    # Without a console node the kernel cannot give init stdout before devtmpfs is up.
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
        # packages use (zstd in newer Debian), and plain .ko always loads.
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

cp -p "$built/vmlinuz" "$built/initrd.img" "$out/"
echo "build.sh: $out/vmlinuz ($kver) and $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)" >&2
