#!/usr/bin/env bash
# Fetch the Secure Boot chain `pxepeer serve --secure-boot shim` hands to UEFI x64 PXE
# clients: Debian's shim (signed by Microsoft's UEFI CA, so it runs on store PCs with
# the keys they ship with) and Debian's signed network GRUB (signed by Debian's key,
# which shim carries and trusts).
# Usage: fetch.sh OUTDIR  ->  OUTDIR/shimx64.efi, OUTDIR/grubx64.efi, OUTDIR/mmx64.efi
#
# - shimx64.efi: bookworm's shim-signed, /usr/lib/shim/shimx64.efi.signed.
# - mmx64.efi: bookworm's shim-helpers-amd64-signed, MokManager; shim starts it when a
#   MOK change is pending (or when grubx64.efi fails to verify), so it sits beside shim.
# - grubx64.efi: trixie's grub-efi-amd64-signed, grubnetx64.efi.signed. Not bookworm's:
#   GRUB 2.06 ignores a proxyDHCP offer and asks the store's DHCP server for its files
#   (shared FIRMWARE-NOTES, "Secure Boot in QEMU"); GRUB 2.12 takes the server and path
#   from the proxy's offer. shim asks for grubx64.efi next to itself on the same server.
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`, never
# installed. Trixie's package is found through a temporary sources list, package lists
# and apt cache in a directory of ours (-o Dir::Etc::sourcelist=... etc.), so the
# host's apt state is not touched. The archive's address is the one the host's own
# sources use for its release (apt-get indextargets), or PXEPEER_DEBIAN_MIRROR.
#
# Environment:
#   PXEPEER_LAB_CACHE       cache directory (default /var/cache/pxepeer-lab)
#   PXEPEER_DEBIAN_MIRROR   archive URI for trixie (default: the host's Debian archive)
#   PXEPEER_GRUB_SUITE      suite for the network GRUB (default trixie)
set -euo pipefail
umask 022
export LC_ALL=C

usage="usage: fetch.sh OUTDIR"
out=${1:?$usage}
[ $# -eq 1 ] || { echo "fetch.sh: $usage" >&2; exit 2; }
cache=${PXEPEER_LAB_CACHE:-/var/cache/pxepeer-lab}
grub_suite=${PXEPEER_GRUB_SUITE:-trixie}

die() { echo "fetch.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool is missing (this recipe needs Debian's apt)"
done
mkdir -p "$cache/debs" "$cache/unpacked"

# download PKG [APT_OPTION...]: sets deb to the cached .deb of PKG's candidate version
# in the apt configuration the options name (the newest cached one when apt knows none,
# e.g. offline with no package lists).
download() {
    local pkg=$1 version
    shift
    version=$(apt-cache "$@" show --no-all-versions "$pkg" 2>/dev/null |
        awk '/^Version:/ {print $2; exit}') || true
    deb=
    if [ -n "$version" ]; then
        deb="$cache/debs/${pkg}_${version//:/%3a}_amd64.deb"
    else
        deb=$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*_amd64.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || return 1
    fi
    if [ ! -s "$deb" ]; then
        echo "fetch.sh: downloading $pkg $version" >&2
        # Root's downloads are not readable by apt's sandbox user; the warning is noise.
        (cd "$cache/debs" &&
            apt-get download -q -o APT::Sandbox::User=root "$@" "$pkg=$version" >&2)
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

# --- bookworm (the host's own sources): shim and MokManager -------------------------------
download shim-signed || die "cannot find shim-signed: run apt-get update"
unpack "$deb"
shim="$tree/usr/lib/shim/shimx64.efi.signed"
[ -f "$shim" ] || die "no shimx64.efi.signed in $deb"
mm=
if download shim-helpers-amd64-signed; then
    unpack "$deb"
    [ -f "$tree/usr/lib/shim/mmx64.efi.signed" ] && mm="$tree/usr/lib/shim/mmx64.efi.signed"
fi

# --- trixie, through a temporary apt configuration: the network GRUB ----------------------
# shellcheck disable=SC2016 # $(REPO_URI) is apt's format field, not a shell expansion
mirror=${PXEPEER_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk '$2 !~ /-/ && $1 !~ /security/ {print $1; exit}')}
apt_dir="$cache/apt-$grub_suite"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
apt_opts=(
    -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Sandbox::User=root"
)
if [ -n "$mirror" ]; then
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    echo "deb [signed-by=$keyring] ${mirror%/} $grub_suite main" >"$apt_dir/sources.list"
    # The lists are refreshed once a day at most; offline, the cached package is used.
    if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440)" ]; then
        apt-get -q "${apt_opts[@]}" update >&2 || echo "fetch.sh: apt-get update for $grub_suite failed; trying the cache" >&2
    fi
else
    echo "fetch.sh: no Debian archive in the host's sources (set PXEPEER_DEBIAN_MIRROR); trying the cache" >&2
fi
download grub-efi-amd64-signed "${apt_opts[@]}" ||
    die "cannot find $grub_suite's grub-efi-amd64-signed (no archive reachable and none cached)"
case $deb in
    *+2.0[0-6]*) die "$deb is GRUB 2.06 or older, which ignores proxyDHCP offers; want 2.12 ($grub_suite)" ;;
esac
unpack "$deb"
grub="$tree/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"
[ -f "$grub" ] || die "no grubnetx64.efi.signed in $deb"

# --- the signatures, where sbsigntool is here to read them --------------------------------
if command -v sbverify >/dev/null; then
    for file in "$shim" "$grub" ${mm:+"$mm"}; do
        sbverify --list "$file" 2>/dev/null | grep -q 'signature 1' ||
            die "$file carries no Authenticode signature"
    done
else
    echo "fetch.sh: sbverify missing (apt-get install sbsigntool): signatures not checked" >&2
fi

mkdir -p "$out"
install -m 0644 "$shim" "$out/shimx64.efi"
install -m 0644 "$grub" "$out/grubx64.efi"
[ -z "$mm" ] || install -m 0644 "$mm" "$out/mmx64.efi"
echo "fetch.sh: $out/shimx64.efi, $out/grubx64.efi${mm:+, $out/mmx64.efi}" >&2
