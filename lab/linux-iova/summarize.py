"""Summarises lab/linux-iova/run's rows (JSON values, one after another) as Markdown tables:
instructions per pair, then medians of the alternated timings."""
import json
import statistics
import sys


def values(text):
    dec, i = json.JSONDecoder(), 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        v, i = dec.raw_decode(text, i)
        yield from (v if isinstance(v, list) else [v])


rows = list(values(open(sys.argv[1]).read()))
print(f"\nLinux: {sys.argv[2]}\n")
print("| path (instructions per pair, callgrind) | Linux | busdma |")
print("|---|---|---|")
for r in rows:
    if r.get("kind") == "icount":
        print(f"| {r['path']} | {r['linux']} | {r['busdma'] if r['busdma'] is not None else '–'} |")

loops = {}
for r in rows:
    if r.get("mode") in ("pair", "tree", "tree-ring"):
        key = (r["mode"], r["pages"], r["live"])
        loops.setdefault(key, {}).setdefault(r["impl"], []).append(r["cpu_ns_per_op"])
med = lambda xs: statistics.median(xs)
print("\n| the callgrind loop, timed (1 thread, CPU ns per pair, median) | Linux | busdma | busdma / Linux | rounds |")
print("|---|---|---|---|---|")
for (mode, pages, live), by in sorted(loops.items()):
    if "linux" in by and "busdma" in by:
        l, b = med(by["linux"]), med(by["busdma"])
        what = f"cached pair, {pages} pages" if mode == "pair" else f"tree alone, {mode}, {live} live"
        print(f"| {what} | {l:.1f} | {b:.1f} | {b / l:.2f} | {len(by['linux'])} |")

timed = {}
for r in rows:
    if r.get("kind") == "icount" or r.get("mode") in ("pair", "tree", "tree-ring"):
        continue
    if r.get("impl") == "linux":
        key = ("Linux", "cache" if r["mode"] == "bench-cache" else "tree", r["live"])
    else:
        key = ("busdma", "cache" if r["impl"] == "busdma" else "tree", r["live"])
    timed.setdefault(key, {}).setdefault(r["threads"], []).append((r["ns_per_op"], r["cpu_ns_per_op"]))

print("\n`dmalab bench iova`'s loop (Linux: harness `bench`), ring 1, 1 page: wall ns (CPU ns) per pair, medians\n")
print("| impl | layer | live | 1T ns (cpu) | 2T ns (cpu) per pair | 2T cpu / 1T | 2T throughput / 1T | rounds |")
print("|---|---|---|---|---|---|---|---|")
for (imp, layer, live), by_t in sorted(timed.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
    one, two = by_t.get(1, []), by_t.get(2, [])
    if not one or not two:
        continue
    w1, c1 = med([w for w, _ in one]), med([c for _, c in one])
    w2, c2 = med([w for w, _ in two]), med([c for _, c in two])
    print(f"| {imp} | {layer} | {live} | {w1:.1f} ({c1:.1f}) | {w2:.1f} ({c2:.1f}) | {c2 / c1:.2f} | {w1 / w2:.2f} | {len(one)} |")
