#!/usr/bin/env bash
# Fetch the boot chains `pxepeer serve` hands to UEFI PXE clients that cannot run iPXE:
# Debian's shim (signed by Microsoft's UEFI CA, so it runs on store PCs with the keys
# they ship with) and Debian's signed network GRUB (signed by Debian's key, which shim
# carries and trusts), for x86-64 and ARM64.
# Usage: fetch.sh [--arch amd64|arm64|all] OUTDIR   (default all)
#   amd64 ->  OUTDIR/shimx64.efi, OUTDIR/grubx64.efi, OUTDIR/mmx64.efi
#   arm64 ->  OUTDIR/grubaa64.efi, OUTDIR/shimaa64.efi, OUTDIR/mmaa64.efi
#
# - shim{x64,aa64}.efi: bookworm's shim-signed, /usr/lib/shim/shim*.efi.signed.
# - mm{x64,aa64}.efi: bookworm's shim-helpers-{amd64,arm64}-signed, MokManager; shim
#   starts it when a MOK change is pending (or when GRUB fails to verify), so it sits
#   beside shim.
# - grub{x64,aa64}.efi: trixie's grub-efi-{amd64,arm64}-signed, grubnet*.efi.signed. Not
#   bookworm's: GRUB 2.06 ignores a proxyDHCP offer and asks the store's DHCP server for
#   its files (shared FIRMWARE-NOTES, "Secure Boot in QEMU"); GRUB 2.12 takes the server
#   and path from the proxy's offer. shim asks for grub{x64,aa64}.efi next to itself on
#   the same server.
#
# ARM64: Debian builds no arm64 iPXE, so this chain is how ARM64 UEFI machines boot
# (pxe/secure_boot.py: architecture 11 gets shimaa64.efi, or grubaa64.efi without shim,
# whenever the directory has grubaa64.efi, whatever --secure-boot says). Its shim comes
# from the host's own sources, which know arm64 packages only once the architecture is
# added (`dpkg --add-architecture arm64 && apt-get update`, as .ci/run does); without it
# the arm64 GRUB alone is fetched (enough where Secure Boot is off) and a line says so.
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`, never
# installed. Trixie's packages are found through a temporary sources list, package lists
# and apt cache in a directory of ours per architecture (-o Dir::Etc::sourcelist=...,
# -o APT::Architecture=...), so the host's apt state is not touched. The archive's
# address is the one the host's own sources use for its release (apt-get indextargets),
# or PXEPEER_DEBIAN_MIRROR.
#
# Environment:
#   PXEPEER_LAB_CACHE       cache directory (default /var/cache/pxepeer-lab)
#   PXEPEER_DEBIAN_MIRROR   archive URI for trixie (default: the host's Debian archive)
#   PXEPEER_GRUB_SUITE      suite for the network GRUB (default trixie)
set -euo pipefail
umask 022
export LC_ALL=C

usage="usage: fetch.sh [--arch amd64|arm64|all] OUTDIR"
arches=(amd64 arm64)
out=
while [ $# -gt 0 ]; do
    case $1 in
        --arch)
            [ $# -ge 2 ] || { echo "fetch.sh: --arch needs a value; $usage" >&2; exit 2; }
            case $2 in
                amd64 | arm64) arches=("$2") ;;
                all) arches=(amd64 arm64) ;;
                *) echo "fetch.sh: unknown architecture $2; $usage" >&2; exit 2 ;;
            esac
            shift 2
            ;;
        -*) echo "fetch.sh: unknown option $1; $usage" >&2; exit 2 ;;
        *)
            [ -z "$out" ] || { echo "fetch.sh: $usage" >&2; exit 2; }
            out=$1
            shift
            ;;
    esac
done
[ -n "$out" ] || { echo "fetch.sh: $usage" >&2; exit 2; }
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
grub_suite=${PXEPEER_GRUB_SUITE:-trixie}

die() { echo "fetch.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool is missing (this recipe needs Debian's apt)"
done
mkdir -p "$cache/debs" "$cache/unpacked"

# download PKG ARCH [APT_OPTION...]: sets deb to the cached .deb of PKG's candidate
# version for ARCH in the apt configuration the options name (the newest cached one when
# apt knows none, e.g. offline with no package lists).
download() {
    local pkg=$1 arch=$2 version
    shift 2
    version=$(apt-cache "$@" show --no-all-versions "$pkg:$arch" 2>/dev/null |
        awk '/^Version:/ {print $2; exit}') || true
    deb=
    if [ -n "$version" ]; then
        deb="$cache/debs/${pkg}_${version//:/%3a}_$arch.deb"
    else
        deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*_$arch.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || return 1
    fi
    if [ ! -s "$deb" ]; then
        echo "fetch.sh: downloading $pkg:$arch $version" >&2
        # Root's downloads are not readable by apt's sandbox user; the warning is noise.
        (cd "$cache/debs" &&
            apt-get download -q -o APT::Sandbox::User=root "$@" "$pkg:$arch=$version" >&2)
        [ -s "$deb" ] || die "apt-get download did not produce $deb"
    fi
}

# unpack DEB: sets tree to its contents, unpacked once into the cache.
unpack() {
    tree="$cache/unpacked/$(basename "$1" .deb)"
    if [ ! -e "$tree/.complete" ]; then
        rm -rf "$tree"
        mkdir -p "$tree"
        dpkg-deb -x "$1" "$tree"
        touch "$tree/.complete"
    fi
}

# shellcheck disable=SC2016 # $(REPO_URI) is apt's format field, not a shell expansion
mirror=${PXEPEER_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk '$2 !~ /-/ && $1 !~ /security/ {print $1; exit}')}

# suite_apt ARCH: sets apt_opts to a temporary apt configuration for $grub_suite and
# ARCH only, its package lists refreshed once a day at most (offline: the cache).
suite_apt() {
    local arch=$1 apt_dir
    # amd64 keeps the directory it always had, so its cached lists stay in use.
    apt_dir="$cache/apt-$grub_suite"
    [ "$arch" = amd64 ] || apt_dir="$apt_dir-$arch"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    apt_opts=(
        -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Architecture=$arch"
        -o "APT::Architectures::=$arch"
        -o "APT::Sandbox::User=root"
    )
    if [ -n "$mirror" ]; then
        local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        echo "deb [signed-by=$keyring] ${mirror%/} $grub_suite main" >"$apt_dir/sources.list"
        if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name "*binary-${arch}_Packages*" -mmin -1440)" ]; then
            apt-get -q "${apt_opts[@]}" update >&2 ||
                echo "fetch.sh: apt-get update for $grub_suite ($arch) failed; trying the cache" >&2
        fi
    else
        echo "fetch.sh: no Debian archive in the host's sources (set PXEPEER_DEBIAN_MIRROR); trying the cache" >&2
    fi
}

# fetch ARCH: the chain of one architecture, checked and installed into OUTDIR.
fetch() {
    local arch=$1 efi grub_dir shim='' mm='' grub file installed=()
    case $arch in
        amd64) efi=x64 grub_dir=x86_64-efi-signed ;;
        arm64) efi=aa64 grub_dir=arm64-efi-signed ;;
    esac

    # --- bookworm (the host's own sources): shim and MokManager ---------------------------
    if download shim-signed "$arch"; then
        unpack "$deb"
        shim="$tree/usr/lib/shim/shim$efi.efi.signed"
        [ -f "$shim" ] || die "no shim$efi.efi.signed in $deb"
        if download "shim-helpers-$arch-signed" "$arch"; then
            unpack "$deb"
            [ -f "$tree/usr/lib/shim/mm$efi.efi.signed" ] && mm="$tree/usr/lib/shim/mm$efi.efi.signed"
        fi
    elif [ "$arch" = amd64 ]; then
        die "cannot find shim-signed: run apt-get update"
    else
        # GRUB alone boots ARM64 machines with Secure Boot off; with it on they need shim.
        echo "fetch.sh: no shim-signed:$arch in the host's sources" \
            "(dpkg --add-architecture $arch && apt-get update); fetching GRUB without shim" >&2
    fi

    # --- trixie, through a temporary apt configuration: the network GRUB ------------------
    suite_apt "$arch"
    download "grub-efi-$arch-signed" "$arch" "${apt_opts[@]}" ||
        die "cannot find $grub_suite's grub-efi-$arch-signed (no archive reachable and none cached)"
    case $deb in
        *+2.0[0-6]*) die "$deb is GRUB 2.06 or older, which ignores proxyDHCP offers; want 2.12 ($grub_suite)" ;;
    esac
    unpack "$deb"
    grub="$tree/usr/lib/grub/$grub_dir/grubnet$efi.efi.signed"
    [ -f "$grub" ] || die "no grubnet$efi.efi.signed in $deb"

    # --- the signatures, where sbsigntool is here to read them ----------------------------
    if command -v sbverify >/dev/null; then
        for file in ${shim:+"$shim"} "$grub" ${mm:+"$mm"}; do
            sbverify --list "$file" 2>/dev/null | grep -q 'signature 1' ||
                die "$file carries no Authenticode signature"
        done
    else
        echo "fetch.sh: sbverify missing (apt-get install sbsigntool): signatures not checked" >&2
    fi

    mkdir -p "$out"
    install -m 0644 "$grub" "$out/grub$efi.efi"
    installed+=("$out/grub$efi.efi")
    if [ -n "$shim" ]; then
        install -m 0644 "$shim" "$out/shim$efi.efi"
        installed+=("$out/shim$efi.efi")
    else
        # A stale shim from an earlier run would be offered with no MokManager beside it.
        rm -f "$out/shim$efi.efi" "$out/mm$efi.efi"
    fi
    if [ -n "$mm" ]; then
        install -m 0644 "$mm" "$out/mm$efi.efi"
        installed+=("$out/mm$efi.efi")
    fi
    echo "fetch.sh: ${installed[*]}" >&2
}

for arch in "${arches[@]}"; do
    fetch "$arch"
done
