# shellcheck shell=bash disable=SC2034,SC2154 # sets variables for, and reads them from, its caller
# Sourced by images/imager/build.sh and images/demo-os/build.sh (bash): fetch Debian's
# kernel package with `apt-get download`, unpack it once with `dpkg-deb -x` (it is never
# installed here) and run depmod on the unpacked tree. The same cache and file names as
# images/netboot-test/build.sh, so the three recipes share one download.
#
# In:  cache (directory), die (function)
# Out: deb, tree, kver, moddir
# Env: PXEPEER_LAB_KERNEL_PKG  kernel package (default: what linux-image-amd64 depends on)

debian_kernel() {
    mkdir -p "$cache/debs"
    local pkg version=
    pkg=${PXEPEER_LAB_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
    deb=
    if [ -n "$pkg" ]; then
        version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
            awk '/^Version:/ {print $2; exit}')
        [ -n "$version" ] && deb="$cache/debs/${pkg}_${version//:/%3a}_amd64.deb"
    fi
    if [ -z "$deb" ]; then
        # No apt metadata (offline, no `apt-get update`): the newest cached package.
        deb=$(find "$cache/debs" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' | sort -V | tail -n 1)
        [ -n "$deb" ] || die "cannot find the kernel package: run apt-get update (or set PXEPEER_LAB_KERNEL_PKG)"
    fi
    if [ ! -s "$deb" ]; then
        echo "build.sh: downloading $pkg $version" >&2
        # Root's downloads are not readable by apt's sandbox user; the warning is noise.
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2)
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
