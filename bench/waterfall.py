#!/usr/bin/env python3
"""Waterfall of one lazy start from the daemon's timeline (soci-snapshotter-grpc --timeline).

usage: bench/waterfall.py TIMELINE.jsonl [--markers FILE] [--title T] [--png OUT.png] [--md OUT.md]

TIMELINE: JSON lines, one per closed span (name, start_us, dur_us, fields, path).
MARKERS:  optional client-side steps, one per line: "NAME START_EPOCH_S END_EPOCH_S"
          (e.g. the benchmark's rpull and ctr run).
One bar per step, x = ms since the Prepare of the first layer; range reads are grouped per
layer and kind (demand: under a FUSE read; prefetch; background) on one row each. Bars on the
critical path (walked back from the end: the step ending last before the current point) are
red. Prints a markdown summary (steps, round trips, bytes) and draws the PNG with gnuplot.
"""
import json
import subprocess
import sys
import tempfile

# Steps drawn one bar each (containers like `prepare` too, to show the sequence).
STEPS = {"prepare", "discover", "get_manifest", "referrers", "prepare_layer", "fetch_ztoc",
         "ztoc_parse", "layer_tree", "mount_lazy", "fuse_mount", "prefetch", "fetch_prefetch",
         "auth", "full_pull", "layer_download", "layer_stream_unpack", "unpack_slot_wait",
         "layer_unpack"}
# Steps the critical-path walk may pick (the ones something waits on, not containers).
WAITED = {"get_manifest", "referrers", "fetch_ztoc", "layer_tree", "fuse_mount",
          "fetch_prefetch", "auth", "full_pull", "layer_download", "layer_stream_unpack",
          "layer_unpack", "range", "marker"}


def main():
    args = sys.argv[1:]
    opt = {}
    pos = []
    while args:
        a = args.pop(0)
        if a.startswith("--"):
            opt[a[2:]] = args.pop(0)
        else:
            pos.append(a)
    if not pos:
        sys.exit(__doc__)
    spans = [json.loads(l) for l in open(pos[0]) if l.strip()]
    markers = []
    if "markers" in opt:
        for l in open(opt["markers"]):
            p = l.split()
            if len(p) == 3:
                markers.append((p[0], float(p[1]) * 1e3, float(p[2]) * 1e3))
    prepares = [s for s in spans if s["name"] == "prepare" and s["fields"].get("layer")]
    if not prepares:
        sys.exit("no Prepare of a remote layer in the timeline")
    t0 = min(s["start_us"] for s in prepares) / 1e3
    layers = []
    for s in sorted(prepares, key=lambda s: s["start_us"]):
        if s["fields"]["layer"] not in layers:
            layers.append(s["fields"]["layer"])

    def lname(d):
        return "L%d" % (layers.index(d) + 1) if d in layers else (d or "")[7:15]

    def ms(s):
        a = s["start_us"] / 1e3 - t0
        return a, a + s["dur_us"] / 1e3

    # Steps run on blocking threads (tree build, mount) take the layer of their parent step.
    by_seq = {s["seq"]: s for s in spans}
    for s in spans:
        p = by_seq.get(s.get("parent"))
        while "layer" not in s["fields"] and p is not None:
            if "layer" in p["fields"]:
                s["fields"]["layer"] = p["fields"]["layer"]
            p = by_seq.get(p.get("parent"))

    rows = {}  # label -> list of (start, end, kind)

    def add(label, a, b, kind):
        rows.setdefault(label, []).append((a, b, kind))

    items = []  # (start, end, kind, label) for the critical-path walk
    for s in spans:
        n, f = s["name"], s["fields"]
        a, b = ms(s)
        if n in STEPS:
            if n == "prepare" and not f.get("layer"):
                label = "prepare (rw) " + f.get("key", "")[:16]
            elif n == "get_manifest":
                label = "get_manifest " + str(f.get("object", ""))[:19]
            elif n == "discover":
                label = "discover"
            else:
                label = "%s %s" % (n, lname(f.get("layer", "")))
            add(label, a, b, n)
            items.append((a, b, n, label))
        elif n == "get_range":
            path = s.get("path", [])
            kind = ("demand" if "fuse_read" in path else "prefetch" if "prefetch" in path
                    else "background" if "background_fetch" in path else "other")
            label = "%s reads %s" % (kind, blob_layer(spans, f.get("digest", ""), layers, lname))
            add(label, a, b, "range")
            if kind in ("demand", "prefetch"):
                items.append((a, b, "range", label))
    for name, a, b in markers:
        add("client: " + name, a - t0, b - t0, "marker")
    end = max([b - t0 for _, _, b in markers] or [max(b for r in rows.values() for _, b, _ in r)])

    # Critical path: from the end, repeatedly take the waited-on step that ends last before the
    # current point (and starts before it, so the walk always moves back).
    crit = set()
    ctr_run = [(a - t0, b - t0) for n, a, b in markers if n.startswith("run")]

    def walk_back(t, lo, kinds):
        while True:
            c = [i for i in items if i[2] in kinds and i[1] <= t + 0.5 and i[0] < t - 0.001
                 and i[0] >= lo]
            if not c:
                return
            best = max(c, key=lambda i: (i[1], i[1] - i[0]))
            crit.add((best[3], best[0]))
            t = best[0]

    if ctr_run:
        crit.add(("client: run", ctr_run[0][0]))
        walk_back(ctr_run[0][1], ctr_run[0][0], {"range"})  # demand reads inside the run
    walk_back(ctr_run[0][0] if ctr_run else end, 0.0, WAITED - {"range"})

    order = sorted(rows, key=lambda k: min(a for a, _, _ in rows[k]))
    http = [s for s in spans if s["name"] == "http"]
    run_start = ctr_run[0][0] if ctr_run else end
    before_run = [s for s in http if ms(s)[0] < run_start]
    during_run = [s for s in http if run_start <= ms(s)[0] <= end]
    rng = [s for s in spans if s["name"] == "get_range"]
    blobs = [s for s in spans if s["name"] == "get_blob"]
    out = []
    out.append("| step | start (ms) | duration (ms) | critical |")
    out.append("|---|---|---|---|")
    for k in order:
        r = rows[k]
        a = min(x[0] for x in r)
        b = max(x[1] for x in r)
        c = "yes" if any((k, x[0]) in crit for x in r) else ""
        extra = " (%d requests)" % len(r) if len(r) > 1 else ""
        out.append("| %s%s | %.0f | %.0f | %s |" % (k, extra, a, b - a, c))
    out.append("")
    out.append("Round trips (HTTP requests) from the first Prepare until `ctr run`: %d "
               "(%d range reads, %d whole blobs, %d manifests); during the run until exit: %d."
               % (len(before_run), sum(1 for s in rng if ms(s)[0] < run_start),
                  sum(1 for s in blobs if ms(s)[0] < run_start),
                  sum(1 for s in spans if s["name"] == "get_manifest"), len(during_run)))
    last_prepare = max(ms(s)[1] for s in prepares)
    out.append("Last layer Prepare answered at %.0f ms; container exited at %.0f ms." % (last_prepare, end))
    text = "\n".join(out)
    print(text)
    if "md" in opt:
        open(opt["md"], "w").write(text + "\n")
    if "png" in opt:
        draw(opt["png"], opt.get("title", "lazy start"), order, rows, crit, end)


def blob_layer(spans, digest, layers, lname):
    return lname(digest) if digest in layers else digest[7:15]


def draw(png, title, order, rows, crit, end):
    colors = {"marker": "0x888888", "range": "0x4a90d9", "prepare": "0xc9c9c9"}
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as d:
        for i, k in enumerate(order):
            y = len(order) - i
            for a, b, kind in rows[k]:
                col = "0xd62728" if (k, a) in crit else colors.get(kind, "0x2ca02c")
                d.write("%f %d %f %s\n" % ((a + b) / 2, y, max((b - a) / 2, 0.3), col))
        dat = d.name
    ytics = ", ".join('"%s" %d' % (k.replace('"', ""), len(order) - i) for i, k in enumerate(order))
    h = max(300, 22 * len(order) + 120)
    gp = """
set terminal pngcairo size 1100,%d noenhanced font ',9'
set output '%s'
set title '%s (red: critical path; x = ms since the first layer Prepare)'
set ytics (%s)
set yrange [0:%d]
set xlabel 'ms'
set grid xtics
unset key
set style fill solid 0.9 noborder
plot '%s' using 1:2:3:(0.35):4 with boxxyerror lc rgb variable
""" % (h, png, title, ytics, len(order) + 1, dat)
    subprocess.run(["gnuplot"], input=gp, text=True, check=True)


if __name__ == "__main__":
    main()
