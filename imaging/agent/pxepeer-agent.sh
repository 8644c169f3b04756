#!/bin/sh
# pxepeer imaging agent (busybox ash): writes a verified disk image to this machine's disk
# from the site's peers, then reboots into it.
#
#   1. DHCP (udhcpc, vendor class pxepeer-payload so pxepeer's own DHCP leaves it alone)
#   2. POST SERVER/v1/imaging/plan?mac=MAC[&image=NAME] (empty body) -> line-based plan
#      (imaging/plan.py) with the job's secret; GET only if the server answers 405 (older
#      pxepeer, no secret)
#   3. the signed manifest the plan names: GET SERVER/v1/manifests/ID/canonical (the bytes
#      the publisher signed) and .../signatures (lines `KEYID BASE64`). Its SHA-256 must be
#      ID, and one signature by a trusted publisher key (the imager's /etc/pxepeer/trust,
#      KEYID.pem, put there by images/imager/build.sh --trust) must hold over those bytes
#      (openssl). The disk's size, SHA-256, chunk size and every chunk's hash, offset, size
#      and zero marker are taken from THAT manifest; the plan only says which peers to ask
#      for which chunk, and a plan that disagrees with the manifest in anything else (or
#      names another image than pxepeer.image) is refused before the disk is touched.
#      Whoever serves the plan chooses where the bytes come from, never what they are.
#   4. pick the disk, refuse one smaller than the image
#   5. every chunk: if the disk already holds it (hash of that region), keep it, so a
#      machine restarted mid-way resumes without fetching a verified chunk again; else
#      fetch it from the peers listed for it (several chunks at once, next peer on any
#      failure), check its SHA-256 (the signed manifest's) BEFORE it touches the disk,
#      write it at its offset. All-zero chunks are never fetched: the region is only
#      zeroed if it is not already.
#   6. POST SERVER/v1/imaging/progress?mac=MAC every few seconds, with header
#      X-Pxepeer-Job: SECRET (the plan's; never shown on the console), progress on the
#      console
#   7. sync, check nothing is missing, report done, reboot (poweroff with pxepeer.poweroff)
#
# The server is the peer that answered PXE when the machine booted. If it stops answering
# (killed, powered off) while the agent still needs it (the plan, the signed manifest), the
# agent asks the subnet's PXE boot server again (pxe-discover, port 4011): the peer elected
# in its place answers, and the agent carries on with it.
#
# Any fatal problem prints `PXEPEER-IMAGING: FAILED <reason>` and reports `failed`; only a
# disk whose every chunk was verified is reported done (`PXEPEER-IMAGING: done`).
#
# Kernel command line: pxepeer.server=http://IP:PORT (without it, the agent asks the
# subnet's PXE boot server with pxe-discover, imaging/agent/pxe-discover.c, as a signed
# unified kernel image must), pxepeer.image=NAME or
# MANIFEST_ID (else the machine's assignment decides; the signed manifest must be that
# image), pxepeer.disk=/dev/X, pxepeer.jobs=N (parallel chunk
# downloads, default 4), pxepeer.zeros=check (a zero chunk's region is read and zeroed
# if it is not zero, so a used disk ends byte-identical to the image; by default a zero
# chunk is only a seek, as free space in the image holds nothing the OS reads),
# pxepeer.verify (re-read the whole disk after writing), pxepeer.poweroff.
# Outside the imager (tests, benchmarks) the same settings come from the environment:
# PXEPEER_CMDLINE (instead of /proc/cmdline), PXEPEER_MAC, PXEPEER_DISK (may be a file),
# PXEPEER_AGENT_NET=0 (no DHCP), PXEPEER_AGENT_EXIT=1 (exit instead of reboot),
# PXEPEER_RUN (work directory), PXEPEER_IFACE (the interface to ask the PXE boot server
# on when PXEPEER_AGENT_NET=0), PXEPEER_TRUST_DIR (trusted keys, KEYID.pem, as
# images/imager/trust-keys.sh writes them). `--check-plan FILE` only parses a plan and
# prints counts; `--check-manifest FILE` only reads a manifest's canonical JSON (no
# signature check) and prints what the agent would write.

set -u

RUN=${PXEPEER_RUN:-/run/pxepeer-agent}
CHUNK_TIMEOUT=${PXEPEER_CHUNK_TIMEOUT:-60} # seconds for one chunk from one peer
ROUNDS=${PXEPEER_ROUNDS:-3}                # passes over a chunk's peers before giving up
REPORT_EVERY=${PXEPEER_REPORT_EVERY:-2}    # seconds between progress reports
TRUST=${PXEPEER_TRUST_DIR:-/etc/pxepeer/trust} # trusted publisher keys, KEYID.pem
MIB=1048576
MAX_MANIFEST=$((80 * MIB)) # imaging/manifest.py MAX_MANIFEST_BYTES: nothing longer is ours
MAX_SIGNATURES=16          # imaging/signing.py MAX_SIGNATURES

say() { echo "PXEPEER-IMAGING: $*"; }
log() { echo "pxepeer-agent: $*" >&2; }

# --- the plan --------------------------------------------------------------------------------

# parse_plan FILE: checks the plan is whole and well-formed, then leaves
#   $RUN/plan.chunks one line per chunk: INDEX OFFSET SIZE SHA256 zero|IDX,IDX..
#   peer_N           variables holding the peers' base URLs; npeers
#   plan_manifest plan_version plan_name plan_disk_size plan_disk_sha plan_chunk_size
#   plan_nchunks plan_ndata plan_data_bytes, plan_job (the job's secret, or empty)
# Nothing in it is trusted for what goes on the disk: bind_plan holds it against the
# signed manifest.
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
    : >"$RUN/plan.chunks"
    npeers=0 plan_nchunks=0 plan_ndata=0 plan_data_bytes=0 end=''
    plan_manifest='' plan_version='' plan_name='' plan_disk_size='' plan_disk_sha=''
    plan_chunk_size='' plan_job='' seen=' '
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
            image | disk | chunk_size | job)
                case $seen in *" $1 "*) log "plan has two $1 lines"; return 1 ;; esac
                seen="$seen$1 "
                ;;
        esac
        case ${1:-} in
            image)
                [ $# -ge 4 ] || return 1
                plan_manifest=$2 plan_version=$3
                plan_name=${line#image "$2" "$3" }
                ;;
            disk)
                [ $# -eq 3 ] || return 1
                plan_disk_size=$2 plan_disk_sha=$3
                ;;
            chunk_size)
                [ $# -eq 2 ] || return 1
                plan_chunk_size=$2
                ;;
            job)
                # The secret is never echoed, not even in a complaint about it.
                if [ $# -ne 2 ] || [ ${#2} -ne 32 ]; then
                    log "plan has a malformed job line"
                    return 1
                fi
                case $2 in *[!0-9a-f]*) log "plan has a malformed job line"; return 1 ;; esac
                plan_job=$2
                ;;
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
                        plan_ndata=$((plan_ndata + 1))
                        plan_data_bytes=$((plan_data_bytes + $3))
                        ;;
                esac
                echo "$plan_nchunks $2 $3 $4 $5" >>"$RUN/plan.chunks"
                plan_nchunks=$((plan_nchunks + 1))
                ;;
            end) end=$2 ;;
            *) log "unknown plan line: $line"; return 1 ;;
        esac
    done <"$plan"
    if [ -z "$end" ] || [ "$end" -ne "$plan_nchunks" ]; then
        log "plan is cut short"
        return 1
    fi
    case $plan_manifest in *[!0-9a-f]* | '') log "plan names no manifest id"; return 1 ;; esac
    [ ${#plan_manifest} -eq 64 ] || { log "plan names no manifest id"; return 1; }
    [ -n "$plan_disk_size" ] && [ -n "$plan_chunk_size" ]
}

# --- the signed manifest ----------------------------------------------------------------------

# The manifest's canonical JSON (imaging/manifest.py canonical_json: sorted keys, no
# spaces, UTF-8, one line) is read by awk in pieces: first `\\` and `\"` inside strings
# become bytes \001 and \002 (no raw control byte is in valid JSON: they are refused
# before), so every `"` left is a string's start or end, and `tr` makes each one a line
# break. Odd lines are then what lies between strings (brackets, colons, commas, numbers,
# true/false/null: short), even lines a string's content. A 100 GiB disk's manifest
# (25,600 chunks, 2.4 MB) is read in about 3 s on one core of the CI machine; one sed
# regex tokenizing the whole line took 7 s alone.
MANIFEST_ESCAPES=$(printf 's/\\\\\\\\/\001/g;s/\\\\"/\002/g')

# shellcheck disable=SC2016 # an awk program: its $ are awk's
MANIFEST_AWK='
function bad(why) { if (!failed) print "error " why; failed = 1; exit 1 }
function text(t, what,   s) {
    # A name as the plan prints it. Names are printable (doc_fields.text), so canonical
    # JSON escapes only \" and \\ in them (\002, \001 here); any other escape is not ours.
    if (t !~ /^"/) bad(what " is not a string")
    s = substr(t, 2, length(t) - 2)
    if (s ~ /\\/) bad(what " holds an escape the agent does not read")
    return unescape(unescape(s, "\001", "\\"), "\002", "\"")
}
function unescape(s, code, c,   n, i, parts, out) {
    n = split(s, parts, code)
    out = parts[1]
    for (i = 2; i <= n; i++) out = out c parts[i]
    if (out == "") bad("an empty name")
    return out
}
function nat(t, lo, hi, what) {
    if (t !~ /^(0|[1-9][0-9]*)$/ || length(t) > 15 || t + 0 < lo || t + 0 > hi)
        bad(what " is not a whole number from " lo " to " hi)
    return t + 0
}
function hex64(t, what) {
    if (t !~ /^"[0-9a-f]*"$/ || length(t) != 66) bad(what " is not a SHA-256")
    return substr(t, 2, 64)
}
function slot() { return d == 0 ? "top" : ctx[d] (type[d] == "o" ? "." key[d] : "[]") }
function extra(s) { return index(s, "top.extra") == 1 }
function allow(c, keys,   n, i, k) {
    n = split(keys, k, " ")
    for (i = 1; i <= n; i++) known[c, k[i]] = 1
}
function opened(s, t) {
    if (extra(s)) return
    if (s == "top" || s == "top.boot" || s == "top.files[]" || s == "top.files[].chunks[]") {
        if (t != "{") bad(s " is not an object")
    } else if (s == "top.files" || s == "top.files[].chunks") {
        if (t != "[") bad(s " is not a list")
    } else bad("unexpected " t " at " s)
    if (s == "top.boot") have_boot = 1
    if (s == "top.files") {
        if (cs == "") bad("files before chunk_size")
        have_files = 1
        nfile = -1
    }
    if (s == "top.files[]") { nfile++; f_role = f_size = f_sha = ""; f_chunks = 0; nchunk = 0 }
    if (s == "top.files[].chunks") { f_chunks = 1; total = 0; short = 0 }
    if (s == "top.files[].chunks[]") { c_sha = c_size = ""; c_zero = 0 }
}
function closed(s) {
    if (s == "top.files[].chunks[]") {
        if (c_sha == "" || c_size == "") bad("a chunk without sha256 or size")
        # Every chunk is chunk_size bytes but the last, which may be shorter.
        if (short || c_size > cs) bad("chunk " nchunk " of " (f_role == "" ? "a file" : f_role) " is not cut at chunk_size")
        if (c_size < cs) short = 1
        if (++allchunks > 540672) bad("too many chunks")
        printf "%d %d %.0f %.0f %s %s\n", nfile, nchunk, nchunk * cs, c_size, c_sha, (c_zero ? "zero" : "data") > refs
        total += c_size
        nchunk++
    } else if (s == "top.files[]") {
        if (f_role == "" || f_size == "" || f_sha == "" || !f_chunks) bad("a file without role, size, sha256 or chunks")
        if (total != f_size) bad("the chunks of " f_role " do not add up to its size")
        if (f_role in roles) bad("two files with role " f_role)
        roles[f_role] = 1
        if (f_role == "disk") { disk = nfile; dsize = f_size; dsha = f_sha; dcount = nchunk }
    } else if (s == "top.boot") {
        if (!have_kind) bad("boot without kind")
    } else if (s == "top") {
        if (!have_format || name == "" || version == "" || cs == "" || !have_boot || !have_files)
            bad("a manifest without format, name, version, chunk_size, boot or files")
    }
}
function scalar(s, t) {
    # The fields of chunks first: nearly every value is one of them.
    if (s == "top.files[].chunks[].sha256") c_sha = hex64(t, "chunk sha256")
    else if (s == "top.files[].chunks[].size") c_size = nat(t, 1, 67108864, "chunk size")
    else if (s == "top.files[].chunks[].zero") { if (t != "true") bad("zero is not true"); c_zero = 1 }
    else if (extra(s)) return
    else if (s == "top.format") { if (t != "\"pxepeer-manifest/1\"") bad("not a pxepeer-manifest/1"); have_format = 1 }
    else if (s == "top.name") name = text(t, "name")
    else if (s == "top.version") version = text(t, "version")
    else if (s == "top.chunk_size") cs = nat(t, 4096, 67108864, "chunk_size")
    else if (s == "top.created" || s == "top.boot.cmdline") { if (t !~ /^"/) bad(s " is not a string") }
    else if (s == "top.boot.kind") { text(t, "boot.kind"); have_kind = 1 }
    else if (s == "top.boot.kernel" || s == "top.boot.initrd") { if (t != "null") text(t, s) }
    else if (s == "top.files[].role") {
        f_role = text(t, "file role")
        if (f_role !~ /^[A-Za-z0-9][A-Za-z0-9._+-]*$/) bad("a file role is not a name")
    }
    else if (s == "top.files[].size") f_size = nat(t, 0, 281474976710656, "file size")
    else if (s == "top.files[].sha256") f_sha = hex64(t, "file sha256")
    else bad("unexpected value at " s)
}
function tok(t,   k, s) {
    if (t == ":") { if (want != "colon") bad("misplaced :"); want = "value"; return }
    if (t == ",") {
        if (want != "more") bad("misplaced ,")
        want = (type[d] == "o") ? "key" : "value"
        return
    }
    if (t == "}" || t == "]") {
        if (d == 0 || (want != "more" && want != "first")) bad("misplaced " t)
        if ((t == "}") != (type[d] == "o")) bad("mismatched " t)
        closed(ctx[d])
        d--
        want = d ? "more" : "end"
        return
    }
    if (want == "key" || (want == "first" && type[d] == "o")) {
        if (t !~ /^"/) bad("a key is not a string")
        k = substr(t, 2, length(t) - 2)
        if (!extra(ctx[d])) {
            if (!((ctx[d], k) in known)) bad("unknown field " k " in " ctx[d])
            # Canonical JSON sorts the keys: out of order or twice is not what was signed.
            if (nk[d] && !(t > lastkey[d])) bad("fields out of order or twice in " ctx[d])
        }
        lastkey[d] = t
        nk[d]++
        key[d] = k
        want = "colon"
        return
    }
    if (want != "value" && !(want == "first" && type[d] == "a")) bad("misplaced " t)
    s = slot()
    if (t == "{" || t == "[") {
        if (d >= 32) bad("nested too deep")
        opened(s, t)
        d++
        ctx[d] = s
        type[d] = (t == "{") ? "o" : "a"
        nk[d] = 0
        want = "first"
        return
    }
    scalar(s, t)
    want = d ? "more" : "end"
}
BEGIN {
    d = 0; want = "value"; cs = ""; name = ""; version = ""; disk = ""
    allow("top", "boot chunk_size created extra files format name version")
    allow("top.boot", "cmdline initrd kernel kind")
    allow("top.files[]", "chunks role sha256 size")
    allow("top.files[].chunks[]", "sha256 size zero")
}
NR % 2 == 0 {
    # A string: its escapes must be JSON escapes.
    s = $0
    gsub(/[\001\002]/, "", s)
    if (s !~ /^([^\\]|\\[\/bfnrt]|\\u[0-9a-fA-F]{4})*$/) bad("a string with a bad escape")
    tok("\"" $0 "\"")
    next
}
{
    s = $0
    while (s != "") {
        c = substr(s, 1, 1)
        if (index("{}[]:,", c)) {
            tok(c)
            s = substr(s, 2)
        } else if (c ~ /[-0-9]/ ? match(s, /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/) :
                   match(s, /^(true|false|null)/)) {
            tok(substr(s, 1, RLENGTH))
            s = substr(s, RLENGTH + 1)
        } else bad("not JSON")
    }
}
END {
    if (failed) exit 1
    if (NR == 0) bad("empty")
    if (NR % 2 == 0) bad("a string is not closed")
    if (want != "end") bad("cut short")
    if (disk == "") bad("no disk file")
    print "ok"
    print "chunk_size " cs
    printf "disk %d %.0f %s %d\n", disk, dsize, dsha, dcount
    print "name " name
    print "version " version
}'

# parse_manifest FILE: the canonical JSON checked and read; leaves
#   $RUN/manifest.chunks one line per chunk of the disk: INDEX OFFSET SIZE SHA256 zero|data
#   name version disk_size disk_sha chunk_size nchunks ndata data_bytes
# or sets why and fails.
parse_manifest() {
    # Counted, not captured: $(...) would drop a trailing newline.
    if [ "$(tr -d '\040-\377' <"$1" | wc -c)" -ne 0 ]; then
        why="the signed manifest holds control characters: it is not canonical JSON"
        return 1
    fi
    info=$(sed "$MANIFEST_ESCAPES" "$1" | tr '"' '\n' |
        awk -v refs="$RUN/manifest.refs" "$MANIFEST_AWK")
    case $info in
        ok*) ;;
        error*) why="the signed manifest is not one the agent reads: ${info#error }"; return 1 ;;
        *) why="the signed manifest could not be read"; return 1 ;;
    esac
    disk_file=
    while IFS= read -r line; do
        case $line in
            "chunk_size "*) chunk_size=${line#chunk_size } ;;
            "disk "*)
                # shellcheck disable=SC2086 # four words
                set -- ${line#disk }
                disk_file=$1 disk_size=$2 disk_sha=$3 nchunks=$4
                ;;
            "name "*) name=${line#name } ;;
            "version "*) version=${line#version } ;;
        esac
    done <<EOF
$info
EOF
    [ -n "$disk_file" ] || { why="the signed manifest names no disk"; return 1; }
    awk -v f="$disk_file" '$1 == f { print $2, $3, $4, $5, $6 }' "$RUN/manifest.refs" \
        >"$RUN/manifest.chunks"
    # shellcheck disable=SC2046 # two words
    set -- $(awk '$5 == "data" { n++; b += $3 } END { printf "%d %.0f\n", n, b }' \
        "$RUN/manifest.chunks")
    ndata=$1 data_bytes=$2
    [ "$(wc -l <"$RUN/manifest.chunks")" -eq "$nchunks" ] ||
        { why="the signed manifest's disk chunk list is inconsistent"; return 1; }
}

if [ "${1:-}" = "--check-plan" ]; then
    RUN=$(mktemp -d)
    trap 'rm -rf "$RUN"' EXIT
    parse_plan "$2" || exit 1
    echo "chunks=$plan_nchunks data=$plan_ndata peers=$npeers size=$plan_disk_size" \
        "bytes=$plan_data_bytes job=$([ -n "$plan_job" ] && echo yes || echo no)"
    exit 0
fi
if [ "${1:-}" = "--check-manifest" ]; then
    RUN=$(mktemp -d)
    trap 'rm -rf "$RUN"' EXIT
    parse_manifest "$2" || { echo "$why" >&2; exit 1; }
    echo "name=$name"
    echo "version=$version"
    echo "disk=$disk_size $disk_sha chunk_size=$chunk_size chunks=$nchunks data=$ndata bytes=$data_bytes"
    cat "$RUN/manifest.chunks"
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
net_iface=${PXEPEER_IFACE:-} # set by bring_up_network; where to ask for the boot server
state=starting
message=
# What the signed manifest says (parse_manifest); empty until it is verified.
manifest='' name='' version='' disk_size=0 disk_sha='' chunk_size=0 nchunks=0 ndata=0
data_bytes=0 signer=''
job_secret=''     # the job's secret from the plan: sent back with reports, never printed
job_server=''     # the peer that handed out job_secret (reports to another are refused)
plan_method=POST # GET once the server said 405 (an older pxepeer)

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
    if [ -n "$job_secret" ] && [ -n "$manifest" ] && [ "$server" != "$job_server" ]; then
        # The job's secret is the planning peer's, and another peer answers now (it died
        # and $server was rediscovered): that peer refuses the secret, so the run would
        # end untold. Get a job there. Asked once per server, not on every report.
        job_server=$server
        rejoin || log "$server hands out no plan for $manifest: not told"
    fi
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
    # The secret goes in a header, where no log line of ours prints it.
    set --
    [ -n "$job_secret" ] && set -- --header "X-Pxepeer-Job: $job_secret"
    mkdir -p "$RUN"
    timeout 10 wget -q -O /dev/null "$@" --post-data "$body" \
        "$server/v1/imaging/progress?mac=$mac" >/dev/null 2>"$RUN/report.err" && return 0
    # 1 only when nobody answered at all: a refusal was heard, and repeating it changes
    # nothing.
    [ -n "$(http_status "$RUN/report.err")" ]
}

# final_report: the run's last word (done or failed) must reach the site: only from it
# does the site record the machine as imaged (or failed). When the server that planned
# the run no longer answers at all (the responder died after handing out the plan), the
# peer elected in its place is asked for a plan of its own for the same signed manifest,
# which starts a job there and hands out that job's secret, and is told instead. The
# disk is not touched again.
final_report() {
    # Before a plan there is no job to end: one report, best effort, as ever.
    [ -n "$job_secret" ] || { report; return 0; }
    tries=0
    while ! report; do
        tries=$((tries + 1))
        if [ "$tries" -gt 3 ]; then
            log "no peer took the final report: the site may image this machine again"
            return 0
        fi
        rediscover || sleep 3 # a new $server: report's first call gets a job there
    done
}

rejoin() { # rejoin: a job at $server for this run's manifest; its secret in job_secret
    url="$server/v1/imaging/plan?mac=$mac"
    [ -n "$image" ] && url="$url&image=$image"
    timeout 30 wget -q -O "$RUN/plan.again" --post-data '' "$url" 2>/dev/null || return 1
    # Parsed in a subshell, so nothing of this run's plan changes (its chunk list file is
    # rewritten, but the run is over), and taken only for the manifest this run wrote.
    secret=$(
        parse_plan "$RUN/plan.again" >/dev/null 2>&1 &&
            [ "$plan_manifest" = "$manifest" ] && echo "$plan_job"
    ) || return 1
    [ -n "$secret" ] || return 1
    job_secret=$secret job_server=$server
}

fail() { # fail REASON: the one way a run ends badly
    state=failed
    message=$*
    say "FAILED $*"
    final_report
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
                net_iface=$nic
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

http_status() { # http_status FILE: the status in busybox wget's error output, or nothing
    sed -n 's/.*HTTP\/[0-9.]* \([0-9][0-9]*\).*/\1/p' "$1" | tail -n 1
}

# rediscover: $server gave no answer at all; ask the subnet's PXE boot server who answers
# now (the site elects another peer within seconds when the responder dies). Switches
# $server and returns 0 when another peer answered; 1 otherwise (no interface to ask on,
# nobody answered yet, or the same server). Only where to fetch from changes: every byte
# written is still checked against the signed manifest.
rediscover() {
    [ -n "$net_iface" ] && command -v pxe-discover >/dev/null 2>&1 || return 1
    found=$(pxe-discover -t 10 "$net_iface" 2>/dev/null) || return 1
    found=${found%/}
    [ -n "$found" ] && [ "$found" != "$server" ] || return 1
    say "boot server $server does not answer; $found answers PXE now: asking it"
    server=$found
    return 0
}

fetch_plan() {
    attempt=0
    while :; do
        attempt=$((attempt + 1))
        url="$server/v1/imaging/plan?mac=$mac" # $server may change (rediscover)
        [ -n "$image" ] && url="$url&image=$image"
        rm -f "$RUN/plan"
        # POST (empty body): the server makes this run a job and hands out its secret.
        set --
        [ "$plan_method" = POST ] && set -- --post-data ''
        if timeout 30 wget -q -O "$RUN/plan" "$@" "$url" 2>"$RUN/plan.err"; then
            if parse_plan "$RUN/plan"; then
                job_secret=$plan_job job_server=$server
                return 0
            fi
            why="the plan from $server is malformed"
        else
            status=$(http_status "$RUN/plan.err")
            if [ "$status" = 405 ] && [ "$plan_method" = POST ]; then
                # An older pxepeer: plans by GET, reports without a secret.
                plan_method=GET
                log "$server hands out plans by GET only (an older pxepeer): no job secret"
                continue
            fi
            why=
            # The reason is fetched again by GET: a read-only preview, it starts no job.
            [ -n "$status" ] && why=$(error_text "$url")
            [ -n "$why" ] || why="no plan from $server ($(tail -n 1 "$RUN/plan.err"))"
            # 4xx: no such image, no assignment, not a disk image: asking again will not
            # change that. 503 (chunks held by nobody right now) and no answer at all may.
            case $status in 4*) return 1 ;; esac
            # No answer at all: the server may be gone, and another peer elected.
            [ -z "$status" ] && [ "$attempt" -lt 10 ] && rediscover && continue
        fi
        [ "$attempt" -ge 10 ] && return 1
        log "$why; asking again in 3 s"
        sleep 3
    done
}

# get_capped URL FILE MAX: GET URL into FILE, at most MAX bytes (a hostile server cannot
# fill the RAM disk); on failure sets $got (why) and $status (HTTP status, if any).
get_capped() {
    status='' got=
    if (
        # shellcheck disable=SC3040 # busybox ash has pipefail
        set -o pipefail
        timeout 60 wget -q -O - "$1" 2>"$2.err" | head -c $(($3 + 1))
    ) >"$2"; then
        [ "$(wc -c <"$2")" -le "$3" ] && return 0
    fi
    if [ "$(wc -c <"$2")" -gt "$3" ]; then
        got="longer than $3 bytes"
    else
        status=$(http_status "$2.err")
        got=$(tail -n 1 "$2.err")
        got=${got:-no answer}
    fi
    return 1
}

# get_retried PATH FILE MAX WHAT: get_capped of $server PATH, asked again a few times
# unless the server said no (4xx) (of the peer answering PXE by then, if $server stopped
# answering); sets why on failure.
get_retried() {
    attempt=0
    while :; do
        attempt=$((attempt + 1))
        get_capped "$server$1" "$2" "$3" && return 0
        why="no $4 from $server ($got)"
        case $status in 4*) return 1 ;; esac
        [ -z "$status" ] && [ "$attempt" -lt 5 ] && rediscover && continue
        [ "$attempt" -ge 5 ] && return 1
        log "$why; asking again in 3 s"
        sleep 3
    done
}

# verify_manifest: the signed manifest the plan names, from the server: its canonical
# bytes must hash to the id, and a trusted key's Ed25519 signature over them must hold.
# Then read (parse_manifest). Sets signer, or why and fails.
verify_manifest() {
    id=$plan_manifest
    short=${id%"${id#????????????}"}
    canon="$RUN/manifest.json"
    set -- "$TRUST"/*.pem
    [ -e "$1" ] || { why="this imager trusts no publisher key ($TRUST holds none): build it with images/imager/build.sh --trust"; return 1; }
    command -v openssl >/dev/null || { why="no openssl in this imager: it cannot check signatures"; return 1; }
    get_retried "/v1/manifests/$id/canonical" "$canon" "$MAX_MANIFEST" \
        "signed manifest $short" || return 1
    sum=$(sha256sum <"$canon")
    sum=${sum%% *}
    if [ "$sum" != "$id" ]; then
        why="the manifest $server sent as $short is another document (its SHA-256 is ${sum%"${sum#????????????}"}...)"
        return 1
    fi
    get_retried "/v1/manifests/$id/signatures" "$RUN/manifest.sigs" 4096 \
        "signatures of manifest $short" || return 1
    signer='' untrusted='' mismatch='' n=0
    while IFS=' ' read -r kid sig more || [ -n "$kid" ]; do
        n=$((n + 1))
        [ "$n" -le "$MAX_SIGNATURES" ] || break
        # KEYID (16 hex digits) and 64 bytes of base64; any other line is skipped.
        value=${sig%==}
        if [ ${#kid} -ne 16 ] || [ -n "$more" ] || [ ${#value} -ne 86 ] ||
            [ "$value==" != "$sig" ]; then
            continue
        fi
        case $kid$value in *[!0-9a-zA-Z+/]*) continue ;; esac
        case $kid in *[!0-9a-f]*) continue ;; esac
        if [ ! -f "$TRUST/$kid.pem" ]; then
            untrusted="$untrusted $kid"
            continue
        fi
        if echo "$sig" | base64 -d >"$RUN/manifest.sig" 2>/dev/null &&
            [ "$(wc -c <"$RUN/manifest.sig")" -eq 64 ] &&
            openssl pkeyutl -verify -pubin -inkey "$TRUST/$kid.pem" -rawin -in "$canon" \
                -sigfile "$RUN/manifest.sig" >/dev/null 2>&1; then
            signer=$kid
            break
        fi
        mismatch=$kid
    done <"$RUN/manifest.sigs"
    if [ -z "$signer" ]; then
        if [ -n "$mismatch" ]; then
            why="manifest $short: the signature by trusted key $mismatch does not match its bytes"
        elif [ -n "$untrusted" ]; then
            why="manifest $short is signed only by key(s) this imager does not trust:$untrusted"
        else
            why="manifest $short carries no signature"
        fi
        return 1
    fi
    manifest=$id
    parse_manifest "$canon"
}

# bind_plan: the plan held against the signed manifest; leaves $RUN/chunks, one line per
# chunk: INDEX OFFSET SIZE SHA256 zero|IDX,IDX.. with everything but the peers from the
# manifest. A plan that differs in anything else is refused (sets why).
bind_plan() {
    why=
    [ "$plan_manifest" = "$manifest" ] || why="it is for another image"
    [ -n "$why" ] || [ "$plan_name" = "$name" ] || why="image name"
    [ -n "$why" ] || [ "$plan_version" = "$version" ] || why="image version"
    [ -n "$why" ] || [ "$plan_disk_size" = "$disk_size" ] ||
        why="disk size ($plan_disk_size bytes, signed $disk_size)"
    [ -n "$why" ] || [ "$plan_disk_sha" = "$disk_sha" ] || why="disk SHA-256"
    [ -n "$why" ] || [ "$plan_chunk_size" = "$chunk_size" ] || why="chunk size"
    [ -n "$why" ] || [ "$plan_nchunks" = "$nchunks" ] ||
        why="chunk count ($plan_nchunks, signed $nchunks)"
    if [ -z "$why" ]; then
        # Read in step, line by line; compared as text ("08" is not 8).
        why=$(awk -v plan="$RUN/plan.chunks" -v out="$RUN/chunks" '
            function stop(what) { print "chunk " $1 " " what; bad = 1; exit 1 }
            {
                if ((getline line < plan) <= 0) stop("is missing")
                split(line, p, " ")
                if (p[1] "" != $1 "") stop("is out of order")
                if (p[2] "" != $2 "") stop("offset (" p[2] ", signed " $2 ")")
                if (p[3] "" != $3 "") stop("size (" p[3] ", signed " $3 ")")
                if (p[4] "" != $4 "") stop("hash (" substr(p[4], 1, 12) ", signed " substr($4, 1, 12) ")")
                if ((p[5] == "zero") != ($5 == "zero")) stop("zero marker")
                print $1, $2, $3, $4, ($5 == "zero" ? "zero" : p[5]) > out
            }
            END { if (!bad && (getline line < plan) > 0) print "more chunks than signed" }
        ' "$RUN/manifest.chunks")
    fi
    if [ -n "$why" ]; then
        why="the plan from $server disagrees with the signed manifest: $why"
        rm -f "$RUN/chunks"
        return 1
    fi
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
if [ -z "$server" ] && [ -n "${net_iface:-}" ]; then
    # A signed unified kernel image cannot name the peer on its command line (it was
    # signed before any peer was elected): ask the subnet's PXE boot server, on port
    # 4011, where the store's DHCP server does not answer. Whoever answers only says
    # where to fetch from; nothing unsigned is written whatever it says.
    say "no pxepeer.server on the command line: asking the PXE boot server on $net_iface"
    server=$(pxe-discover -t 60 "$net_iface") && say "boot server $server"
fi
[ -n "$server" ] || fail "no pxepeer.server=http://IP:PORT on the kernel command line, and no PXE boot server answered"
# No report before the plan: the plan request itself starts the job on the server, and
# a report without the job's secret would only be refused.
state=planning
fetch_plan || fail "${why:-no plan}"
# Nothing is written before this: the bytes must be those a trusted publisher signed.
verify_manifest || fail "$why"
if [ -n "$image" ] && [ "$image" != "$manifest" ] && [ "$image" != "$name" ]; then
    fail "the plan is for $name $version, not for pxepeer.image=$image"
fi
bind_plan || fail "$why"
say "image $name $version (manifest ${manifest%"${manifest#????????????}"}, signed by key $signer): $((disk_size / MIB)) MiB disk, $ndata data chunks ($((data_bytes / MIB)) MiB) from $npeers peer(s)"

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
    if fetch_plan && [ "$plan_manifest" = "$manifest" ]; then
        # The same signed manifest: only the peers may differ, and nothing else may.
        bind_plan || fail "$why"
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
final_report
say "done ($name $version on $disk: $message)"
finish 0
