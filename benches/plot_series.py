#!/usr/bin/env python3
"""Draws read_series.py's CSV as an SVG line chart (no plotting library
needed): throughput over time, with a marker at each event."""
import csv, sys

src, dst = sys.argv[1], sys.argv[2]
pts, events = [], []
with open(src) as f:
    for r in csv.DictReader(f):
        if r["event"]:
            events.append((float(r["seconds"]), r["event"]))
        else:
            pts.append((float(r["seconds"]), float(r["mib_per_s"])))
W, H, L, R, T, B = 800, 360, 70, 20, 30, 50
tmax = max(t for t, _ in pts) or 1
ymax = max(v for _, v in pts) * 1.1 or 1
def x(t): return L + (W - L - R) * t / tmax
def y(v): return H - B - (H - T - B) * v / ymax
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle" font-size="14">Sequential read through the mount while nodes are SIGKILLed</text>']
step = 10 ** len(str(int(ymax))) / 10
while ymax / step > 8:
    step *= 2
v = 0.0
while v <= ymax:
    out.append(f'<line x1="{L}" x2="{W-R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{L-6}" y="{y(v)+4:.1f}" text-anchor="end">{v:.0f}</text>')
    v += step
for s in range(0, int(tmax) + 1):
    out.append(f'<text x="{x(s):.1f}" y="{H-B+16}" text-anchor="middle">{s}</text>')
out.append(f'<text x="{(W+L)/2}" y="{H-12}" text-anchor="middle">seconds</text>')
out.append(f'<text x="16" y="{H/2}" text-anchor="middle" transform="rotate(-90 16 {H/2})">MiB/s (100 ms intervals)</text>')
out.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="' +
           " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts) + '"/>')
for i, (t, e) in enumerate(events):
    out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{T}" y2="{H-B}" stroke="#d62728" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x(t)+4:.1f}" y="{T+14+14*i}" fill="#d62728">{e}</text>')
out.append("</svg>")
open(dst, "w").write("\n".join(out) + "\n")
