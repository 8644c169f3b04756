# shellcheck shell=bash disable=SC2034,SC2154 # sets variables for, and reads them from, its caller
# Shared by the recipes in images/ (bash, sourced): Debian's kernel and a reproducible
# busybox initramfs. The kernel package is fetched with `apt-get download` and unpacked
# once with `dpkg-deb -x` into the cache (never installed here).
#
# Callers set: cache (directory), epoch (mtime of every file), busybox (a static busybox)
# and define die(); optionally kernel_arch (Debian architecture of the kernel, default
# amd64) and busybox_applets (a busybox this machine can run that lists the same applets,
# when $busybox is another architecture's). Functions:
#   check_tools TOOL...          die unless each is installed, and busybox is static
#   debian_kernel                sets deb, tree, kver, moddir
#   resolve_modules MODULE...    sets load_order: module files (relative to moddir) with
#                                their dependencies, in an order insmod can load them
#   busybox_root ROOT INIT       a root with busybox, its applet links, /init, /dev/console
#   install_modules ROOT         the load_order modules (decompressed), load-order file and
#                                a modules.dep of just those
#   program_files PROGRAM        PROGRAM, the shared libraries it loads and the dynamic
#                                loader (ldd), one path a line
#   install_program ROOT PROGRAM those files at the same paths under ROOT
#   pack_initramfs ROOT OUT      a gzip'd newc cpio, byte-for-byte reproducible
#   keep_netboot_build STAGE BUILT  STAGE/initrd.img plus the kernel, moved into the
#                                cache directory BUILT and marked complete
# Env: PXEPEER_LAB_KERNEL_PKG  kernel package (default: what linux-image-ARCH depends on)

check_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is missing (see the recipe's header for packages)"
    done
    [ -x "$busybox" ] || die "$busybox is missing (apt-get install busybox-static)"
    if command -v file >/dev/null && file -L "$busybox" | grep -q 'dynamically linked'; then
        die "$busybox is dynamically linked; the initramfs needs busybox-static"
    fi
}

# debian_deb PKG ARCH: sets deb to the cached .deb of PKG:ARCH's candidate version,
# downloading it once (offline, with no package lists: the newest one cached).
debian_deb() {
    local pkg=$1 arch=$2 version
    mkdir -p "$cache/debs"
    version=$(apt-cache show --no-all-versions "$pkg:$arch" 2>/dev/null |
        awk '/^Version:/ {print $2; exit}') || true
    if [ -n "$version" ]; then
        deb="$cache/debs/${pkg}_${version//:/%3a}_$arch.deb"
    else
        deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*_$arch.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || die "cannot find $pkg:$arch: run apt-get update (for a foreign architecture, dpkg --add-architecture $arch first)"
    fi
    if [ ! -s "$deb" ]; then
        echo "build.sh: downloading $pkg:$arch $version" >&2
        # Root's downloads are not readable by apt's sandbox user; the warning is noise.
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg:$arch=$version" >&2)
        [ -s "$deb" ] || die "apt-get download did not produce $deb"
    fi
}

# unpack_deb DEB: sets tree to DEB's files, unpacked once into the cache.
unpack_deb() {
    tree="$cache/unpacked/$(basename "$1" .deb)"
    if [ ! -e "$tree/.complete" ]; then
        rm -rf "$tree"
        mkdir -p "$tree"
        dpkg-deb -x "$1" "$tree"
        touch "$tree/.complete"
    fi
}

debian_kernel() {
    mkdir -p "$cache/debs"
    local pkg version='' arch=${kernel_arch:-amd64}
    pkg=${PXEPEER_LAB_KERNEL_PKG:-$(apt-cache depends "linux-image-$arch:$arch" 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
    pkg=${pkg%:*} # apt names a foreign architecture's package PKG:ARCH
    deb=
    if [ -n "$pkg" ]; then
        version=$(apt-cache show --no-all-versions "$pkg:$arch" 2>/dev/null |
            awk '/^Version:/ {print $2; exit}')
        [ -n "$version" ] && deb="$cache/debs/${pkg}_${version//:/%3a}_$arch.deb"
    fi
    if [ -z "$deb" ]; then
        # No apt metadata (offline, no `apt-get update`): the newest cached package.
        deb=$(find "$cache/debs" -maxdepth 1 -name "linux-image-*-${arch}_*.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || die "cannot find the kernel package: run apt-get update (or set PXEPEER_LAB_KERNEL_PKG)"
    fi
    if [ ! -s "$deb" ]; then
        echo "build.sh: downloading $pkg $version" >&2
        # Root's downloads are not readable by apt's sandbox user; the warning is noise.
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg:$arch=$version" >&2)
        [ -s "$deb" ] || die "apt-get download did not produce $deb"
    fi
    tree="$cache/unpacked/$(basename "$deb" .deb)"
    if [ ! -e "$tree/.complete" ]; then
        rm -rf "$tree"
        mkdir -p "$tree"
        dpkg-deb -x "$deb" "$tree"
        kver=$(find "$tree/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n 1)
        # The package ships no modules.dep (depmod runs at install, which we never do).
        depmod -b "$tree" "$kver"
        touch "$tree/.complete"
    fi
    kver=$(find "$tree/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n 1)
    moddir="$tree/lib/modules/$kver"
    [ -f "$tree/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $deb"
}

resolve_modules() {
    # kmod's modprobe reads the tree's modules.dep/softdep; each module's dependencies come
    # before it, so first occurrences give a valid load order. Built-in modules print
    # "builtin NAME" and need nothing.
    load_order=()
    local -A seen=()
    local module verb path rel
    for module in "$@"; do
        while read -r verb path _; do
            [ "$verb" = insmod ] || continue
            rel=${path#"$moddir"/}
            [ -n "${seen[$rel]:-}" ] && continue
            seen[$rel]=1
            load_order+=("$rel")
        done < <(modprobe -d "$tree" -S "$kver" --show-depends "$module")
    done
}

busybox_root() {
    local root=$1 init=$2 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root}
    install -m 0755 "$busybox" "$root/bin/busybox"
    # Applet links made here, not with `busybox --install` at boot, so they are in the
    # archive in a fixed order.
    for applet in $("${busybox_applets:-$busybox}" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$root/$applet"
    done
    install -m 0755 "$init" "$root/init"
    # Without a console node the kernel cannot give init stdout before devtmpfs is up.
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 0600 "$root/dev/console" c 5 1
    fi
}

install_modules() {
    local target="$1/lib/modules/$kver" rel plain
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
}

program_files() {
    local program=$1 listing
    listing=$(ldd "$program") || die "ldd $program failed"
    if grep -q 'not found' <<<"$listing"; then
        die "$program needs a library this machine lacks: $(grep 'not found' <<<"$listing" | head -n 1)"
    fi
    echo "$program"
    # "libx.so => /path (0x..)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x..)";
    # linux-vdso has no file.
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$listing" | sort -u
}

install_program() {
    local root=$1 file
    # Copied (symbolic links followed) to the paths the program and the loader look them
    # up at; the mtimes are fixed later by pack_initramfs.
    while read -r file; do
        install -D -m 0755 "$file" "$root$file"
    done < <(program_files "$2")
}

pack_initramfs() {
    local root=$1 out=$2
    find "$root" -exec touch -h -d "@$epoch" {} +
    (cd "$root" && find . -print0 | sort -z |
        cpio --quiet --null --create --format=newc --owner=0:0 --reproducible) |
        gzip -n -9 >"$out"
    touch -d "@$epoch" "$out"
}

keep_netboot_build() {
    local stage=$1 built=$2
    install -m 0644 "$tree/boot/vmlinuz-$kver" "$stage/vmlinuz"
    touch -d "@$epoch" "$stage/vmlinuz" "$stage/initrd.img"
    mkdir -p "$built"
    mv "$stage/vmlinuz" "$stage/initrd.img" "$built/"
    echo "$kver" >"$built/kernel-version"
    touch "$built/.complete"
}
