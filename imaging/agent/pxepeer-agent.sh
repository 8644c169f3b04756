#!/bin/sh
# pxepeer imaging agent (busybox ash): writes a verified disk image to this machine's disk
# from the site's peers, then reboots into it.
#
#   1. DHCP (udhcpc, vendor class pxepeer-payload so pxepeer's own DHCP leaves it alone)
#   2. GET SERVER/v1/imaging/plan?mac=MAC[&image=NAME]  -> line-based plan (imaging/plan.py)
#   3. pick the disk, refuse one smaller than the image
#   4. every chunk: if the disk already holds it (hash of that region), keep it, so a
#      machine restarted mid-way resumes without fetching a verified chunk again; else
#      fetch it from the peers listed for it (several chunks at once, next peer on any
#      failure), check its SHA-256 BEFORE it touches the disk, write it at its offset.
#      All-zero chunks are never fetched: the region is only zeroed if it is not already.
#   5. POST SERVER/v1/imaging/progress?mac=MAC every few seconds, progress on the console
#   6. sync, check nothing is missing, report done, reboot (poweroff with pxepeer.poweroff)
#
# Any fatal problem prints `PXEPEER-IMAGING: FAILED <reason>` and reports `failed`; only a
# disk whose every chunk was verified is reported done (`PXEPEER-IMAGING: done`).
#
# Kernel command line: pxepeer.server=http://IP:PORT (required), pxepeer.image=NAME (else
# the machine's assignment decides), pxepeer.disk=/dev/X, pxepeer.jobs=N (parallel chunk
# downloads, default 4), pxepeer.zeros=check (a zero chunk's region is read and zeroed
# if it is not zero, so a used disk ends byte-identical to the image; by default a zero
# chunk is only a seek, as free space in the image holds nothing the OS reads),
# pxepeer.verify (re-read the whole disk after writing), pxepeer.poweroff.
# Outside the imager (tests, benchmarks) the same settings come from the environment:
# PXEPEER_CMDLINE (instead of /proc/cmdline), PXEPEER_MAC, PXEPEER_DISK (may be a file),
# PXEPEER_AGENT_NET=0 (no DHCP), PXEPEER_AGENT_EXIT=1 (exit instead of reboot),
# PXEPEER_RUN (work directory). `--check-plan FILE` only parses a plan and prints counts.

set -u

RUN=${PXEPEER_RUN:-/run/pxepeer-agent}
CHUNK_TIMEOUT=${PXEPEER_CHUNK_TIMEOUT:-60} # seconds for one chunk from one peer
ROUNDS=${PXEPEER_ROUNDS:-3}                # passes over a chunk's peers before giving up
REPORT_EVERY=${PXEPEER_REPORT_EVERY:-2}    # seconds between progress reports
MIB=1048576

say() { echo "PXEPEER-IMAGING: $*"; }
log() { echo "pxepeer-agent: $*" >&2; }

# --- the plan --------------------------------------------------------------------------------

# parse_plan FILE: checks the plan is whole and well-formed, then leaves
#   $RUN/chunks      one line per chunk: INDEX OFFSET SIZE SHA256 zero|IDX,IDX..
#   peer_N           variables holding the peers' base URLs; npeers
#   manifest version name disk_size disk_sha chunk_size nchunks ndata data_bytes
parse_plan() {
    set -f # each line is split into words: never glob them
    parse_plan_lines "$1"
    rc=$?
    set +f
    return $rc
}

parse_plan_lines() {
    plan=$1
    mkdir -p "$RUN"
    : >"$RUN/chunks"
    npeers=0 nchunks=0 ndata=0 data_bytes=0 end='' manifest='' disk_size='' chunk_size=''
    first=1
    while IFS= read -r line || [ -n "$line" ]; do
        if [ -n "$first" ]; then
            [ "$line" = "pxepeer-plan 1" ] || { log "not a pxepeer plan: $line"; return 1; }
            first=
            continue
        fi
        [ -z "$end" ] || { log "plan has lines after end"; return 1; }
        # shellcheck disable=SC2086 # splitting the line into words is the point
        set -- $line
        case ${1:-} in
            image)
                [ $# -ge 4 ] || return 1
                manifest=$2 version=$3
                name=${line#image "$2" "$3" }
                ;;
            disk) disk_size=$2 disk_sha=$3 ;;
            chunk_size) chunk_size=$2 ;;
            peer)
                [ $# -eq 3 ] || return 1
                case $2 in *[!0-9]* | '') return 1 ;; esac
                [ "$2" -eq "$npeers" ] || { log "plan peers out of order"; return 1; }
                # Assigned by name, never evaluated: a URL cannot run anything here.
                eval "peer_$2=\$3"
                npeers=$((npeers + 1))
                ;;
            chunk)
                [ $# -eq 5 ] || { log "bad chunk line: $line"; return 1; }
                case $2$3 in *[!0-9]*) return 1 ;; esac
                case $4 in *[!0-9a-f]*) return 1 ;; esac
                [ ${#4} -eq 64 ] || return 1
                case $5 in
                    zero) ;;
                    *[!0-9,]* | '') return 1 ;;
                    *)
                        ndata=$((ndata + 1))
                        data_bytes=$((data_bytes + $3))
                        ;;
                esac
                echo "$nchunks $2 $3 $4 $5" >>"$RUN/chunks"
                nchunks=$((nchunks + 1))
                ;;
            end) end=$2 ;;
            *) log "unknown plan line: $line"; return 1 ;;
        esac
    done <"$plan"
    if [ -z "$end" ] || [ "$end" -ne "$nchunks" ]; then
        log "plan is cut short"
        return 1
    fi
    [ -n "$manifest" ] && [ -n "$disk_size" ] && [ -n "$chunk_size" ]
}

if [ "${1:-}" = "--check-plan" ]; then
    RUN=$(mktemp -d)
    trap 'rm -rf "$RUN"' EXIT
    parse_plan "$2" || exit 1
    echo "chunks=$nchunks data=$ndata peers=$npeers size=$disk_size bytes=$data_bytes"
    exit 0
fi

# --- settings ----------------------------------------------------------------------------

cmdline=${PXEPEER_CMDLINE-$(cat /proc/cmdline 2>/dev/null)}
arg() { # arg NAME: value of NAME=VALUE on the command line (last wins), or nothing
    value=
    for word in $cmdline; do
        case $word in "$1="*) value=${word#*=} ;; esac
    done
    echo "$value"
}
flag() { # flag NAME: true when NAME (alone or NAME=...) is on the command line
    for word in $cmdline; do
        case $word in "$1" | "$1="*) return 0 ;; esac
    done
    return 1
}

server=$(arg pxepeer.server)
server=${server%/}
image=$(arg pxepeer.image)
jobs=${PXEPEER_JOBS:-$(arg pxepeer.jobs)}
case $jobs in '' | *[!0-9]* | 0) jobs=4 ;; esac
zeros=${PXEPEER_ZEROS:-$(arg pxepeer.zeros)}
case $zeros in check) ;; *) zeros=skip ;; esac
mac=${PXEPEER_MAC:-}
disk=${PXEPEER_DISK:-$(arg pxepeer.disk)}
state=starting
message=

finish() { # finish: reboot into the new disk, or power off, or (tests) exit
    code=$1
    if [ "${PXEPEER_AGENT_EXIT:-0}" = 1 ]; then
        exit "$code"
    fi
    sync
    if flag pxepeer.poweroff; then
        say "powering off"
        poweroff -f
    elif [ "$code" -eq 0 ]; then
        say "rebooting into the new disk"
        reboot -f
    fi
    # A failed machine stays up with its console: rebooting would only start the same
    # imaging again, and the technician needs the message on the screen.
    say "holding; shell on the console"
    while :; do setsid cttyhack sh 2>/dev/null || sh; sleep 1; done
}

report() { # report: one progress POST to the responder (best effort, never fatal)
    [ -n "$server" ] && [ -n "$mac" ] || return 0
    body="state=$state
manifest=${manifest:-}
image=${name:-${image:-}} ${version:-}
disk=$disk
total=${nchunks:-0}
done=${done_chunks:-0}
bytes=${done_bytes:-0}
size=${disk_size:-0}
fetched=${fetched_bytes:-0}
peers=${peers_used:-}
corrupt=$(sort "$RUN/corrupt" 2>/dev/null | uniq -c | awk '{ printf "%s%s=%s", s, $2, $1; s = "," }')
message=$(echo "$message" | tr '\n\r' '  ')"
    timeout 10 wget -q -O /dev/null --post-data "$body" \
        "$server/v1/imaging/progress?mac=$mac" >/dev/null 2>&1 || true
}

fail() { # fail REASON: the one way a run ends badly
    state=failed
    message=$*
    say "FAILED $*"
    report
    finish 1
}

# --- network -------------------------------------------------------------------------------

bring_up_network() {
    [ "${PXEPEER_AGENT_NET:-1}" = 1 ] || return 0
    ip link set lo up 2>/dev/null
    tries=0
    while [ "$tries" -lt 50 ]; do
        for path in /sys/class/net/*; do
            nic=${path##*/}
            [ "$nic" = lo ] && continue
            ip link set "$nic" up
            # The address only: udhcpc.script sets no default route and no resolver.
            if udhcpc -i "$nic" -V pxepeer-payload -s /etc/udhcpc.script -f -q -n -t 10 -T 2 \
                >/dev/null 2>&1; then
                [ -n "$mac" ] || mac=$(cat "/sys/class/net/$nic/address")
                say "network up on $nic ($(cat /run/ip 2>/dev/null)), mac $mac"
                return 0
            fi
        done
        # No NIC yet (driver still probing) or no lease: try again shortly.
        sleep 0.2
        tries=$((tries + 1))
    done
    return 1
}

# error_text URL: the body of an error response (busybox wget drops it and prints only
# the status line), fetched again with a raw HTTP/1.0 request through nc.
error_text() {
    hostport=${1#http://}
    path=/${hostport#*/}
    hostport=${hostport%%/*}
    host=${hostport%:*} port=${hostport##*:}
    [ "$port" = "$hostport" ] && port=80
    # busybox nc quits when its input ends: keep it open while the answer comes back.
    { printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport"; sleep 2; } |
        timeout 10 nc -w 5 "$host" "$port" 2>/dev/null | tr -d '\r' |
        sed '1,/^$/d' | head -n 3 | tr '\n' ' ' | sed 's/ *$//'
}

fetch_plan() {
    url="$server/v1/imaging/plan?mac=$mac"
    [ -n "$image" ] && url="$url&image=$image"
    attempt=0
    while :; do
        attempt=$((attempt + 1))
        rm -f "$RUN/plan"
        if timeout 30 wget -q -O "$RUN/plan" "$url" 2>"$RUN/plan.err"; then
            parse_plan "$RUN/plan" && return 0
            why="the plan from $server is malformed"
        else
            status=$(sed -n 's/.*HTTP\/[0-9.]* \([0-9][0-9]*\).*/\1/p' "$RUN/plan.err" | tail -n 1)
            why=
            [ -n "$status" ] && why=$(error_text "$url")
            [ -n "$why" ] || why="no plan from $server ($(tail -n 1 "$RUN/plan.err"))"
            # 4xx: no such image, no assignment, not a disk image: asking again will not
            # change that. 503 (chunks held by nobody right now) and no answer at all may.
            case $status in 4*) return 1 ;; esac
        fi
        [ "$attempt" -ge 10 ] && return 1
        log "$why; asking again in 3 s"
        sleep 3
    done
}

# --- the disk -------------------------------------------------------------------------------

pick_disk() {
    if [ -n "$disk" ]; then
        [ -e "$disk" ] || return 1
        return 0
    fi
    # Disk drivers probe asynchronously (AHCI/ATA can take a few seconds under emulation).
    tries=0
    while [ "$tries" -lt 75 ]; do
        for candidate in /dev/vda /dev/sda /dev/nvme0n1; do
            if [ -b "$candidate" ]; then
                disk=$candidate
                return 0
            fi
        done
        sleep 0.2
        tries=$((tries + 1))
    done
    return 1
}

disk_bytes() {
    if [ -b "$disk" ]; then
        blockdev --getsize64 "$disk"
    else
        stat -c %s "$disk"
    fi
}

region_sha() { # region_sha OFFSET SIZE: $rsha = SHA-256 of that region of the disk
    rsha=$(dd if="$disk" bs=$MIB skip="$1" count="$2" iflag=skip_bytes,count_bytes 2>/dev/null |
        sha256sum)
    rsha=${rsha%% *}
}

region_is_zero() { # region_is_zero OFFSET SIZE: true when that region reads as all zeros
    # tr drops the zeros; the first byte left over ends the pipe early. pipefail: a read
    # error must not pass for zeros (it is then "not zero", and the chunk is written).
    left=$(
        # shellcheck disable=SC3040 # busybox ash has pipefail
        set -o pipefail
        dd if="$disk" bs=$MIB skip="$1" count="$2" iflag=skip_bytes,count_bytes 2>/dev/null |
            tr -d '\000' | head -c 1 | wc -c
    ) && [ "$left" -eq 0 ]
}

# --- one chunk --------------------------------------------------------------------------------

# problem TEXT: one chunk's trouble, on the console at once and kept for the reports.
problem() {
    echo "$*" >>"$RUN/errors"
    log "chunk $*"
}

# peer_order WHERE: the peer indexes to try, those that failed this run moved to the back.
peer_order() {
    good='' bad=''
    for i in $(echo "$1" | tr ',' ' '); do
        if [ -e "$RUN/bad/$i" ]; then bad="$bad $i"; else good="$good $i"; fi
    done
    echo "$good $bad"
}

# do_chunk INDEX OFFSET SIZE SHA WHERE LOG: appends "INDEX HOW SIZE FETCHED" to LOG when
# the disk holds the chunk (HOW: disk = it was already there, zero, or pN = fetched from
# peer N).
do_chunk() {
    index=$1 offset=$2 size=$3 sha=$4 where=$5 out=$6
    if [ "$where" = zero ] && [ "$zeros" = skip ]; then
        # The default: what is left in the image's free space does not matter (and
        # reading every zero region of a large disk would cost more than the image).
        echo "$index zero $size 0" >>"$out"
        return 0
    fi
    if [ "$where" = zero ]; then
        # pxepeer.zeros=check: read, and zeroed only if not zero already (an old OS);
        # discard would be faster but need not read back as zeros on every device.
        region_is_zero "$offset" "$size" && {
            echo "$index zero $size 0" >>"$out"
            return 0
        }
        if ! dd if=/dev/zero of="$disk" bs=$MIB seek="$offset" count="$size" \
            oflag=seek_bytes iflag=count_bytes conv=notrunc 2>/dev/null; then
            problem "$index write error at byte $offset"
            return 1
        fi
        echo "$index zero $size 0" >>"$out"
        return 0
    fi
    # A data chunk: already on the disk (a reboot mid-way) only if its region hashes
    # right. Hashing costs more than fetching under emulation, so a region whose first
    # 4 KiB are zeros is not hashed: it is (almost always) not there, and if it is, the
    # worst case is fetching and writing it again.
    if ! region_is_zero "$offset" 4096; then
        region_sha "$offset" "$size"
        if [ "$rsha" = "$sha" ]; then
            echo "$index disk $size 0" >>"$out"
            return 0
        fi
    fi
    base=''
    round=0
    while [ "$round" -lt "$ROUNDS" ]; do
        round=$((round + 1))
        for p in $(peer_order "$where"); do
            eval "base=\$peer_$p"
            # wget -O truncates: one download file per worker, reused, few processes.
            if ! timeout "$CHUNK_TIMEOUT" wget -q -O "$tmp" "$base/v1/chunks/$sha" 2>/dev/null; then
                : >"$RUN/bad/$p"
                problem "$index peer $base: download failed"
                continue
            fi
            # Verified before it is written: a corrupt or truncated chunk never touches
            # the disk, and the peer that sent it goes to the back of the line.
            got=$(sha256sum <"$tmp")
            got=${got%% *}
            if [ "$got" != "$sha" ]; then
                : >"$RUN/bad/$p"
                echo "$base" >>"$RUN/corrupt" # reported: the site counts it against the peer
                problem "$index peer $base: corrupt chunk (sha256 ${got%"${got#????????????}"}...)"
                continue
            fi
            if ! dd if="$tmp" of="$disk" bs=$MIB seek="$offset" oflag=seek_bytes conv=notrunc \
                2>/dev/null; then
                problem "$index write error at byte $offset"
                return 1
            fi
            echo "$index p$p $size $size" >>"$out"
            return 0
        done
        sleep "$round"
    done
    problem "$index no peer could supply chunk ${sha%"${sha#????????????????}"} (at byte $offset)"
    return 1
}

worker() { # worker N TODO: claims chunks of TODO one at a time (mkdir is atomic)
    out="$RUN/log.$1"
    tmp="$RUN/download.$1"
    : >>"$out"
    while read -r index offset size sha where; do
        mkdir "$RUN/claim/$index" 2>/dev/null || continue
        do_chunk "$index" "$offset" "$size" "$sha" "$where" "$out" ||
            echo "$index" >>"$RUN/failed"
    done <"$2"
    rm -f "$tmp"
}

# tally: done_chunks done_bytes fetched_bytes peers_used, from the workers' logs
tally() {
    # shellcheck disable=SC2046 # four words, split on purpose
    set -- $(cat "$RUN"/log.* 2>/dev/null | awk '
        { n++; bytes += $3; fetched += $4; if ($2 ~ /^p/) used[substr($2, 2)]++ }
        END { s = ""; for (p in used) s = s (s ? "," : "") p "=" used[p]
              printf "%d %d %d %s\n", n, bytes, fetched, (s ? s : "-") }')
    done_chunks=$1 done_bytes=$2 fetched_bytes=$3
    peers_used=
    [ "$4" = - ] && return 0
    for pair in $(echo "$4" | tr ',' ' '); do
        eval "base=\$peer_${pair%=*}"
        peers_used="$peers_used${peers_used:+,}$base=${pair#*=}"
    done
}

show_progress() {
    tally
    now=$(date +%s)
    elapsed=$((now - started))
    [ "$elapsed" -gt 0 ] || elapsed=1
    rate=$((fetched_bytes / elapsed / 1024))
    say "$done_chunks/$nchunks chunks, $((done_bytes / MIB))/$((disk_size / MIB)) MiB on disk, fetched $((fetched_bytes / MIB)) MiB at $rate KiB/s"
    last_error=$(tail -n 1 "$RUN/errors" 2>/dev/null)
    message="$done_chunks/$nchunks chunks${last_error:+; last problem: chunk $last_error}"
    report
}

# run_pass TODO: all chunks listed in TODO, $jobs at a time, progress while they run
run_pass() {
    rm -rf "$RUN/claim" "$RUN/bad"
    mkdir -p "$RUN/claim" "$RUN/bad"
    pids=
    w=0
    while [ "$w" -lt "$jobs" ]; do
        worker "$w" "$1" &
        pids="$pids $!"
        w=$((w + 1))
    done
    while :; do
        alive=
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ -n "$alive" ] || break
        show_progress
        sleep "$REPORT_EVERY"
    done
    for pid in $pids; do wait "$pid"; done
}

# --- main -------------------------------------------------------------------------------------

rm -rf "$RUN"
mkdir -p "$RUN"
: >"$RUN/errors"
say "pxepeer imaging agent starting"
bring_up_network || fail "no network: no NIC got an address by DHCP"
[ -n "$mac" ] || fail "cannot tell this machine's MAC address"
[ -n "$server" ] || fail "no pxepeer.server=http://IP:PORT on the kernel command line"
state=planning
report
fetch_plan || fail "${why:-no plan}"
say "image $name $version: $((disk_size / MIB)) MiB disk, $ndata data chunks ($((data_bytes / MIB)) MiB) from $npeers peer(s)"

pick_disk || fail "no disk found (looked for ${disk:-/dev/vda /dev/sda /dev/nvme0n1})"
have=$(disk_bytes)
[ -n "$have" ] || fail "cannot read the size of $disk"
if [ "$have" -lt "$disk_size" ]; then
    fail "disk $disk is too small: $have bytes, the image needs $disk_size"
fi
say "writing to $disk ($((have / MIB)) MiB)"

state=writing
started=$(date +%s)
run_pass "$RUN/chunks"

if [ -s "$RUN/failed" ]; then
    # The peer set may have changed since the plan was made (a peer died, another got
    # the chunk): ask again and retry only what is missing.
    log "$(wc -l <"$RUN/failed") chunk(s) failed; asking for a fresh plan"
    old=$manifest
    if fetch_plan && [ "$manifest" = "$old" ]; then
        cat "$RUN"/log.* | awk 'NR == FNR { done[$1] = 1; next } !($1 in done)' - "$RUN/chunks" \
            >"$RUN/todo"
        rm -f "$RUN/failed"
        run_pass "$RUN/todo"
    fi
fi

tally
missing=$((nchunks - done_chunks))
if [ "$missing" -ne 0 ]; then
    fail "$missing of $nchunks chunks could not be written: $(tail -n 1 "$RUN/errors")"
fi

state=verifying
sync
[ -b "$disk" ] && blockdev --flushbufs "$disk" 2>/dev/null
if flag pxepeer.verify; then
    # Everything read back from the device itself, not the page cache.
    say "verifying the whole disk"
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
    got=$(dd if="$disk" bs=$MIB count="$disk_size" iflag=count_bytes 2>/dev/null |
        sha256sum | cut -d' ' -f1)
    [ "$got" = "$disk_sha" ] || fail "the disk does not read back as the image (sha256 $got)"
fi

show_progress
state='done'
elapsed=$(($(date +%s) - started))
message="$nchunks chunks, $((data_bytes / MIB)) MiB of data in ${elapsed} s"
report
say "done ($name $version on $disk: $message)"
finish 0
