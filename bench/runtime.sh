#!/usr/bin/env bash
# Real language-runtime start, side by side in one run: an image built from this machine's
# Debian python3.11 (interpreter, standard library, the shared libraries it loads, busybox for
# /bin/sh) whose workload imports ~120 standard-library modules (hundreds of files). Time from
# pull start to container exit and registry bytes served, fresh containerd + snapshotter each
# run, for:
#   overlayfs   containerd's own pull + run
#   stargz      stargz-snapshotter, eStargz (ctr-remote image optimize --no-optimize)
#   stargz-opt  stargz-snapshotter, eStargz with prioritized files recorded by running the
#               workload (ctr-remote image optimize, default)
#   soci        soci-rs, no prefetch
#   soci-pf     soci-rs, prefetch artifact from `soci convert --prefetch-files-json` (the files
#               the workload opens, gathered with strace in a chroot of the same rootfs)
#   soci-rec    soci-rs, prefetch recorded from a real run (`soci prefetch record`, zTOCs
#               refined around the bytes read), only when that command exists
#   soci-keep   the same recording with `--keep-spans` (original zTOCs, whole spans; not in
#               the default KINDS)
# Profiles as bench/start.sh: near (veth) and far (20 ms RTT + 200 Mbit/s).
#
# Usage: bench/runtime.sh [RUNS]   (default 3; PROFILES="near far", KINDS=...)
# Results: bench/results/runtime.md (table, ratios vs stargz) and bench/results/runtime.png.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PROFILES=${PROFILES:-near far}
BIN=$PWD/target/release
PY=${PY:-/usr/bin/python3.11}
command -v gnuplot >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null; }
command -v strace >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null; }
[ -x "$PY" ] || { echo "$PY missing (Debian package python3.11)" >&2; exit 1; }
STARGZ=${STARGZ:-$PWD/target/stargz/stargz-snapshotter}
CTR_REMOTE=$(command -v ctr-remote || true)
W=$(mktemp -d /tmp/soci-bench.XXXXXX)
source scripts/env.sh
cleanup() {
  env_cleanup
  net_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM
source bench/net.sh
started=$(date +%s)

MODULES="json, email, email.mime.multipart, email.parser, http.client, http.server, urllib.request, \
xml.etree.ElementTree, xml.dom.minidom, asyncio, sqlite3, decimal, fractions, statistics, \
logging.handlers, argparse, csv, datetime, zoneinfo, pathlib, shutil, tempfile, subprocess, \
threading, concurrent.futures, multiprocessing, unittest, doctest, pydoc, difflib, textwrap, \
string, re, html.parser, configparser, tarfile, zipfile, gzip, bz2, lzma, hashlib, hmac, \
secrets, ssl, socket, selectors, uuid, pickle, copy, pprint, dataclasses, enum, typing, inspect, \
ast, dis, tokenize, importlib.metadata, sysconfig, platform, locale, gettext, calendar, heapq, \
bisect, array, struct, base64, binascii, codecs, ctypes, mailbox, smtplib, imaplib, ftplib, \
xmlrpc.client, wsgiref.simple_server, plistlib, cProfile, pstats, timeit, trace, tracemalloc, \
queue, sched, contextvars, ipaddress, mimetypes, glob, fnmatch, filecmp, fileinput, shelve, dbm, \
sqlite3.dump, curses, optparse, getopt, venv, compileall, py_compile, zipapp, runpy, pkgutil, \
modulefinder, tomllib, graphlib, colorsys, wave, random"
WORK=("$PY" -c "import $MODULES")

# --- rootfs: base layer (merged /usr, busybox, shared libraries) + python layer ---------------
B=$W/base P=$W/py
mkdir -p "$B/usr/bin" "$B/usr/lib/x86_64-linux-gnu" "$B/usr/lib64" "$B/usr/sbin" "$B/etc" "$B/tmp" "$B/root"
for d in bin lib lib64 sbin; do ln -s "usr/$d" "$B/$d"; done
cp /bin/busybox "$B/usr/bin/"
for a in sh cat ls env; do ln -s busybox "$B/usr/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$B/etc/passwd"
printf 'root:x:0:\n' > "$B/etc/group"
to_usr() { local p=${1#/usr}; echo "usr/${p#/}"; } # /lib/x/y and /usr/lib/x/y -> usr/lib/x/y
{ ldd "$PY"; find "/usr/lib/python3.11/lib-dynload" -name '*.so' -exec ldd {} \; ; } 2>/dev/null |
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/lib/ {print $1}' | sort -u > "$W/libs"
# A distro base carries more than one program needs: other libraries up to ~60 MiB.
find /usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -name 'lib*.so*' -size -16M -printf '%s %p\n' | sort -k2 |
  awk '{ s += $1; print $2; if (s > 60 * 1048576) exit }' >> "$W/libs" || true
sort -u "$W/libs" | while read -r l; do
  t=$B/$(to_usr "$l"); mkdir -p "$(dirname "$t")"; [ -e "$t" ] || cp -L "$l" "$t"
done
mkdir -p "$B/usr/lib/locale" "$B/usr/lib/ssl" "$B/usr/share"
cp -a /usr/lib/locale/C.utf8 "$B/usr/lib/locale/" 2>/dev/null || true
cp -L /usr/lib/ssl/openssl.cnf "$B/usr/lib/ssl/" 2>/dev/null || true
cp -a /usr/share/zoneinfo "$B/usr/share/" 2>/dev/null || true
mkdir -p "$P/usr/bin" "$P/usr/lib" "$P/etc"
cp -L "$PY" "$P/usr/bin/python3.11"; ln -s python3.11 "$P/usr/bin/python3"
cp -a /usr/lib/python3.11 "$P/usr/lib/"
[ -d /etc/python3.11 ] && cp -a /etc/python3.11 "$P/etc/"

# Files the workload opens (run in a chroot of the same rootfs): the prefetch list.
R=$W/root
mkdir -p "$R"; cp -a "$B/." "$R/"; cp -a "$P/." "$R/"
strace -f -qq -e trace=openat,open,execve -o "$W/strace" chroot "$R" "${WORK[@]}"
# Paths as stored in the layers: the top-level links (bin, lib, lib64, sbin) lead into /usr.
grep -v ENOENT "$W/strace" | grep -o '"/[^"]*"' | tr -d '"' |
  sed -E 's#^/(bin|lib|lib64|sbin)/#/usr/\1/#' | sort -u | while read -r f; do
  if [ -f "$R$f" ] && [ ! -L "$R$f" ]; then echo "$f"; fi
done | python3 -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))' > "$W/prefetch.json"
nfiles=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$W/prefetch.json")
rm -rf "$R"

L=$W/layout
umoci init --layout "$L" >/dev/null
umoci new --image "$L:py" >/dev/null
umoci insert --image "$L:py" "$B" / >/dev/null
umoci insert --image "$L:py" "$P" / >/dev/null
umoci config --image "$L:py" --config.env PATH=/usr/bin:/bin >/dev/null
# Cmd = the workload, set here: umoci splits flag values at commas.
python3 - "$L" "${WORK[@]}" <<'PY'
import json, os, sys, hashlib
layout, cmd = sys.argv[1], sys.argv[2:]
# Rewrite the config of tag "py": Cmd = the workload (stargz's optimize runs the image's command).
idx = json.load(open(os.path.join(layout, "index.json")))
desc = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "py")
blob = lambda d: os.path.join(layout, "blobs", *d.split(":"))
def put(obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    open(blob(d), "wb").write(data)
    return d, len(data)
man = json.load(open(blob(desc["digest"])))
cfg = json.load(open(blob(man["config"]["digest"])))
cfg.setdefault("config", {})["Cmd"] = cmd
man["config"]["digest"], man["config"]["size"] = put(cfg)
desc["digest"], desc["size"] = put(man)
json.dump(idx, open(os.path.join(layout, "index.json"), "w"))
PY
usize=$(( $(du -sb "$B" | cut -f1) + $(du -sb "$P" | cut -f1) ))
rm -rf "$B" "$P"
skopeo copy -q --dest-tls-verify=false "oci:$L:py" "docker://$NEAR/py:v1"
"$BIN/soci" convert --plain-http "docker://$NEAR/py:v1" "docker://$NEAR/py:soci" >/dev/null
"$BIN/soci" convert --plain-http --prefetch-files-json "$W/prefetch.json" "docker://$NEAR/py:v1" "docker://$NEAR/py:soci-pf" >/dev/null
blobs=$(skopeo inspect --tls-verify=false --raw "docker://$NEAR/py:v1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]), len(m["layers"]))')
size=${blobs% *}; nlayers=${blobs#* }

notes=()
KINDS_ALL="overlayfs"
if [ -n "${KINDS:-}" ] && [[ " $KINDS " != *" stargz"* ]]; then
  : # stargz not asked for: no eStargz conversions
elif [ -x "$STARGZ" ] && [ -n "$CTR_REMOTE" ]; then
  bash bench/stargz.sh convert "$NEAR/py:v1" "$NEAR/py:esgz"
  KINDS_ALL+=" stargz"
  if bash bench/stargz.sh convert-opt "$NEAR/py:v1" "$NEAR/py:esgz-opt" > "$W/optimize.log" 2>&1; then
    KINDS_ALL+=" stargz-opt"
  else
    notes+=("stargz-opt (ctr-remote image optimize with recording): failed here: $(tail -3 "$W/optimize.log" | tr '\n' ' ')")
  fi
else
  notes+=("stargz-snapshotter not built (bash bench/stargz.sh build): compared without it")
fi
KINDS_ALL+=" soci soci-pf"
# --- HOOK: recorded prefetch (soci prefetch record, issue 16 part 2) ---------------------------
# Runs only when the command exists: one recording run of py:soci under a soci daemon (near
# profile), the new SOCI index bound to the image as py:soci-rec.
if [ -n "${KINDS:-}" ] && [[ " $KINDS " != *" soci-rec "* ]]; then
  :
elif "$BIN/soci" prefetch record --help >/dev/null 2>&1; then
  start_soci_containerd rec "$NEAR"
  if "$BIN/soci" -a "$W/rec/ctd.sock" prefetch record ${REFINE_ARGS:-} --plain-http --daemon-root "$W/rec/soci" \
      --dst "docker://$NEAR/py:soci-rec" "docker://$NEAR/py:soci" -- "${WORK[@]}" > "$W/record.log" 2>&1; then
    KINDS_ALL+=" soci-rec"
  else
    notes+=("soci-rec: soci prefetch record failed: $(tail -3 "$W/record.log" | tr '\n' ' ')")
  fi
  stop_soci_containerd rec
  mkdir -p bench/results; grep -E '^layer|^soci:' "$W/record.log" > bench/results/runtime-record.log || true
else
  notes+=("soci-rec (recorded prefetch): not available (soci prefetch record --help fails in this build)")
fi
if [[ " ${KINDS:-} " == *" soci-keep "* ]]; then
  start_soci_containerd keep "$NEAR"
  "$BIN/soci" -a "$W/keep/ctd.sock" prefetch record --keep-spans --plain-http --daemon-root "$W/keep/soci" \
    --dst "docker://$NEAR/py:soci-keep" "docker://$NEAR/py:soci" -- "${WORK[@]}" > "$W/record-keep.log" 2>&1 ||
    notes+=("soci-keep: soci prefetch record --keep-spans failed: $(tail -3 "$W/record-keep.log" | tr '\n' ' ')")
  stop_soci_containerd keep
fi
KINDS=${KINDS:-$KINDS_ALL}
for n in "${notes[@]}"; do echo "note: $n" >&2; done

now() { date +%s.%N; }
measure() { # measure KIND PROFILE -> "seconds bytes"
  local kind=$1 a ctd b0 t0 t1 tag snap=soci
  a=$(addr "$2")
  case $kind in
    overlayfs) tag=v1 ;; stargz) tag=esgz ;; stargz-opt) tag=esgz-opt ;;
    soci) tag=soci ;; soci-pf) tag=soci-pf ;; soci-rec) tag=soci-rec ;; soci-keep) tag=soci-keep ;;
  esac
  if [[ $kind == stargz* ]]; then
    bash bench/stargz.sh start "$W/run" "$a"
  else
    SOCI_CONFIG_EXTRA=$'[prefetch]\nenable = true' start_soci_containerd run "$a"
  fi
  ctd=$W/run/ctd.sock
  b0=$(served); t0=$(now)
  case $kind in
    soci*) "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/py:$tag" > /dev/null ;;
    stargz*) "$CTR_REMOTE" -a "$ctd" image rpull --plain-http "$a/py:$tag" > /dev/null; snap=stargz ;;
    overlayfs) ctr -a "$ctd" image pull --plain-http "$a/py:$tag" > /dev/null; snap=overlayfs ;;
  esac
  tp=$(now)
  ctr -a "$ctd" run --rm --snapshotter "$snap" "$a/py:$tag" c "${WORK[@]}" > /dev/null
  t1=$(now)
  local b1; b1=$(served)
  # The same container again: everything fetched, page cache warm (the snapshotter's own cost).
  ctr -a "$ctd" run --rm --snapshotter "$snap" "$a/py:$tag" c "${WORK[@]}" > /dev/null
  t2=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $(( b1 - b0 )) $(echo "$tp - $t0" | bc -l) $(echo "$t1 - $tp" | bc -l) $(echo "$t2 - $t1" | bc -l)"
  stop_soci_containerd run
}
# trace_run PROFILE: one soci-rs start of py:$TRACE_TAG (default soci: no prefetch) with the daemon's timeline on, drawn as
# bench/results/waterfall-runtime-PROFILE.png (+ .md).
trace_run() {
  local p=$1 a d t0 t1 t2 ctd
  a=$(addr "$p"); d=$W/trace-$p
  mkdir -p "$d"
  SOCI_CONFIG_EXTRA=$'[prefetch]\nenable = true' SOCI_SNAPSHOTTER_TIMELINE=$d/timeline.jsonl start_soci_containerd run "$a"
  ctd=$W/run/ctd.sock
  t0=$(now)
  "$BIN/soci" -a "$ctd" image rpull --plain-http "$a/py:$TRACE_TAG" > /dev/null
  t1=$(now)
  ctr -a "$ctd" run --rm --snapshotter soci "$a/py:$TRACE_TAG" c "${WORK[@]}" > /dev/null
  t2=$(now)
  stop_soci_containerd run
  printf 'rpull %s %s\nrun %s %s\n' "$t0" "$t1" "$t1" "$t2" > "$d/markers"
  mkdir -p bench/results
  cp "$d/timeline.jsonl" "bench/results/timeline-runtime-$p.jsonl" || true
  python3 bench/waterfall.py "$d/timeline.jsonl" --markers "$d/markers" \
    --title "soci-rs lazy start ($TRACE_TAG), python3.11 imports, $p profile" \
    --png "bench/results/waterfall-runtime-$p.png" --md "bench/results/waterfall-runtime-$p.md" >&2
}

TRACE_TAG=${TRACE_TAG:-soci}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: > "$W/results"
for p in $PROFILES; do
  shape "$p"
  for kind in $KINDS; do
    for i in $(seq "$RUNS"); do
      echo "$p $kind $(measure "$kind" "$p")" | tee -a "$W/results" >&2
    done
  done
  [ "${WATERFALL:-1}" = 1 ] && trace_run "$p"
done
shape near

med() { awk -v p="$1" -v k="$2" -v c="$3" '$1==p && $2==k {print $c}' "$W/results" | median; }
ratio() { [ -n "$2" ] && printf '%.2f' "$(echo "$1 / $2" | bc -l)" || echo -; }
mkdir -p bench/results
{
  echo "Language-runtime start: pull start to container exit (s), median of $RUNS runs; registry bytes served."
  echo "Image: Debian's python3.11 + standard library + shared libraries + busybox, $((usize >> 20)) MiB unpacked,"
  echo "$((size >> 20)) MiB in $nlayers gzip layers. Workload: \`python3.11 -c 'import json, email, http.client, ...'\`"
  echo "(120 standard-library modules; $nfiles files opened). Registry in a network namespace; near = veth,"
  echo "far = 20 ms RTT + 200 Mbit/s. Fresh containerd + snapshotter each run. Ratios vs stargz of the same run."
  echo "Time = pull + run (medians each; the parts' medians need not add up); run again = the same"
  echo "container once more at once (nothing left to fetch, page cache warm)."
  echo
  echo "| profile | snapshotter | time (s) | time / stargz | bytes served | bytes / stargz | pull (s) | run (s) | run again (s) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for p in $PROFILES; do
    gt=$(med "$p" stargz 3); gb=$(med "$p" stargz 4)
    for kind in $KINDS; do
      t=$(med "$p" "$kind" 3); b=$(med "$p" "$kind" 4)
      printf '| %s | %s | %.2f | %s | %.1f MiB | %s | %.2f | %.2f | %.2f |\n' "$p" "$kind" "$t" "$(ratio "$t" "$gt")" \
        "$(echo "$b / 1048576" | bc -l)" "$(ratio "$b" "$gb")" \
        "$(med "$p" "$kind" 5)" "$(med "$p" "$kind" 6)" "$(med "$p" "$kind" 7)"
    done
  done
  echo
  echo "Kinds: overlayfs = containerd pull + run; stargz = eStargz without prioritized files;"
  echo "stargz-opt = eStargz with files recorded by \`ctr-remote image optimize\`; soci = soci-rs without"
  echo "prefetch; soci-pf = soci-rs with a prefetch artifact from \`soci convert --prefetch-files-json\`"
  echo "(the $nfiles files the workload opens, from strace); soci-rec = soci-rs with a prefetch recorded by"
  echo "\`soci prefetch record\` (zTOCs refined around the bytes read); soci-keep = the same with \`--keep-spans\`."
  for n in "${notes[@]}"; do echo; echo "Note: $n"; done
  echo
  echo "command: bash bench/runtime.sh $RUNS ($(( $(date +%s) - started )) s); machine: $(nproc) cores (shared), $(uname -m), kernel $(uname -r), $(date -u +%F)"
} | tee bench/results/runtime.md

{
  echo "case $KINDS"
  for p in $PROFILES; do
    printf '%s' "$p"
    for kind in $KINDS; do printf ' %s' "$(med "$p" "$kind" 3)"; done
    echo
  done
} > "$W/chart.dat"
n=$(echo $KINDS | wc -w)
gnuplot <<GP
set terminal pngcairo size 900,480 noenhanced
set output 'bench/results/runtime.png'
set title 'python3.11 importing 120 stdlib modules: pull start to exit (s, lower is better)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set ylabel 'seconds'
set yrange [0:*]
set key top left
set grid ytics
plot for [i=2:$((n + 1))] '$W/chart.dat' using i:xtic(1) title columnheader(i)
GP
