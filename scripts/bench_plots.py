#!/usr/bin/env python3
"""Draw `make bench`'s figures: SVG plots and a Markdown table, from the CSV files the benches
write (standard library only, so the plots need nothing installed).

    scripts/bench_plots.py FIGURES_DIR OUT_DIR

FIGURES_DIR holds
  bootstrap.csv  from `cargo bench -p shardwise-bench --bench bootstrap` (BENCH_FIGURES=dir):
                 CPU per record by bootstrap and records per event
  local.csv      from `shardwise bench --figures dir/local.csv`, one row per offered rate:
                 the local pipeline's put-to-acknowledged latency percentiles
OUT_DIR gets bench-bootstrap-cpu.svg, bench-local-latency.svg and bench-figures.md.
"""

import csv
import math
import sys
from html import escape
from pathlib import Path

COLOURS = ["#c92a2a", "#2f6fde", "#1f9d6a", "#e8590c", "#9c36b5"]
WIDTH, HEIGHT = 640, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 44, 56


class FigureError(Exception):
    """A figures file that is missing, empty or malformed (named, with what is wrong)."""


def read_rows(path: Path, needed: list) -> list:
    if not path.is_file():
        raise FigureError(f"{path}: missing (did its bench run?)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise FigureError(f"{path}: no rows")
    for number, row in enumerate(rows, start=2):
        for column in needed:
            try:
                row[column] = float(row[column]) if column != "bootstrap" else row[column]
            except (KeyError, TypeError, ValueError):
                raise FigureError(f"{path}, line {number}: column {column!r} missing or not a number") from None
    return rows


def nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def line_chart(title: str, x_label: str, y_label: str, series: list, log_x: bool = False,
               log_y: bool = False) -> str:
    """An SVG line chart: series is [(name, [(x, y), ...])]; y from 0, or on a log scale (a
    latency that jumps by 100× past saturation would flatten the rest to the axis)."""
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points]
    if not xs:
        raise FigureError(f"{title}: nothing to plot")
    scale = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = scale(min(xs)), scale(max(xs))
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    if log_y:
        low = 10 ** math.floor(math.log10(max(min(ys), 1e-9)))
        high = 10 ** math.ceil(math.log10(max(max(ys), low * 10)))
        y_ticks = [low * 10**i for i in range(round(math.log10(high / low)) + 1)]

        def py(y):
            return TOP + plot_h * (1 - math.log10(max(y, low) / low) / math.log10(high / low))
    else:
        y1 = nice_ceiling(max(ys) * 1.05)
        y_ticks = [y1 * i / 5 for i in range(6)]

        def py(y):
            return TOP + plot_h * (1 - y / y1)

    def px(x):
        return LEFT + plot_w * (scale(x) - x0) / (x1 - x0)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold" fill="#1d2330">{escape(title)}</text>',
    ]
    for value in y_ticks:
        y = py(value)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e5eb"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7385">{value:g}</text>')
    for x in sorted(set(xs)):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#f0f2f5"/>')
        out.append(
            f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" fill="#6b7385">{x:g}</text>'
        )
    out.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 14}" text-anchor="middle" fill="#1d2330">'
        f"{escape(x_label)}</text>"
    )
    out.append(
        f'<text transform="translate(18 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'fill="#1d2330">{escape(y_label)}</text>'
    )
    for index, (name, points) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = sorted(points)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2.2" points="{path}"/>')
        for x, y in points:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.2" fill="{colour}"/>')
        ly = TOP + 10 + 20 * index
        out.append(f'<rect x="{LEFT + plot_w + 16}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{LEFT + plot_w + 34}" y="{ly + 1}" fill="#1d2330">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bootstrap_figures(rows: list):
    names = list(dict.fromkeys(r["bootstrap"] for r in rows))
    series = [(name, [(r["records"], r["total_us"]) for r in rows if r["bootstrap"] == name]) for name in names]
    svg = line_chart("CPU per record against batch size (real bootstraps)", "records per event (log scale)",
                     "CPU µs per record (user + kernel)", series, log_x=True)
    usual = {r["records"]: r["total_us"] for r in rows if r["bootstrap"] == names[0]}
    table = ["| records | bootstrap | user µs/rec | kernel µs/rec | total µs/rec | less CPU than "
             f"{names[0]} | faults/invocation | peak RSS MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["records"], names.index(r["bootstrap"]))):
        ratio = usual.get(r["records"], math.nan) / r["total_us"] if r["total_us"] else math.nan
        table.append(f"| {r['records']:g} | {r['bootstrap']} | {r['user_us']:.2f} | {r['kernel_us']:.2f} | "
                     f"{r['total_us']:.2f} | {ratio:.1f}× | {r['faults_per_invocation']:g} | {r['peak_rss_mib']:.1f} |")
    return svg, table


def local_figures(rows: list):
    series = [(f"p{q}", [(r["offered_per_second"], r[f"p{q}_ms"]) for r in rows]) for q in (50, 90, 99)]
    svg = line_chart("Local pipeline: put → acknowledged latency against offered load", "offered records/s",
                     "latency, ms (log scale)", series, log_y=True)
    table = ["| offered rec/s | acknowledged rec/s | p50 ms | p90 ms | p99 ms | max ms | shards | batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["offered_per_second"]):
        table.append(f"| {r['offered_per_second']:g} | {r['acked_per_second']:.0f} | {r['p50_ms']:g} | "
                     f"{r['p90_ms']:g} | {r['p99_ms']:g} | {r['max_ms']:g} | {r['shards']:g} | {r['batch_size']:g} |")
    return svg, table


def main(argv: list) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    figures, out = Path(argv[1]), Path(argv[2])
    try:
        boot = read_rows(figures / "bootstrap.csv",
                         ["bootstrap", "records", "user_us", "kernel_us", "total_us", "faults_per_invocation",
                          "peak_rss_mib"])
        local = read_rows(figures / "local.csv",
                          ["offered_per_second", "acked_per_second", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                           "shards", "batch_size"])
        boot_svg, boot_table = bootstrap_figures(boot)
        local_svg, local_table = local_figures(local)
    except FigureError as error:
        print(f"bench_plots: {error}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-bootstrap-cpu.svg").write_text(boot_svg)
    (out / "bench-local-latency.svg").write_text(local_svg)
    markdown = "\n".join(["### CPU per record (real bootstraps)", "", *boot_table, "",
                          "### Local pipeline latency against offered load", "", *local_table, ""])
    (out / "bench-figures.md").write_text(markdown)
    print(markdown)
    print(f"plots: {out / 'bench-bootstrap-cpu.svg'}, {out / 'bench-local-latency.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
