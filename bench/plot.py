#!/usr/bin/env python3
"""Chart a fanout.py results.json: the gateway variants side by side.

    python bench/plot.py [bench/results.json] [-o bench/results.png]

Panels: gateway CPU per delivery (saturation scenarios), saturation throughput,
publish->client latency percentiles at the fixed offered loads, and RSS per idle
connection.  With --repeat runs, each bar is the median of the repeats.
matplotlib is a bench-only dependency (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")            # files only, no display
import matplotlib.pyplot as plt

BENCH = Path(__file__).resolve().parent
ORDER = ["compiled", "purepy", "baseline"]
COLORS = {"compiled": "#1f77b4", "purepy": "#ff7f0e", "baseline": "#7f7f7f"}


def median_of(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def variants_in(results):
    seen = {r["variant"] for r in results if "skipped" not in r}
    return [v for v in ORDER if v in seen]


def grouped_bars(ax, results, groups, variants, *, label_fmt="{:.2f}", log=False):
    """groups: (scenario, x label, result key) per group of bars."""
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, (scen, _, key) in enumerate(groups):
            y = median_of([r for r in results if r["scenario"] == scen and r["variant"] == v], key)
            if y is not None:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(y)
        bars = ax.bar(xs, ys, width, label=v, color=COLORS.get(v))
        ax.bar_label(bars, [label_fmt.format(y) for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), [lab for _, lab, _ in groups])
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def plot(doc: dict, out: Path) -> None:
    results = [r for r in doc["results"] if "skipped" not in r and "error" not in r]
    variants = variants_in(results)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    meta = doc.get("meta", {})
    fig.suptitle(f"Gateway fan-out benchmark ({'smoke, ' if meta.get('smoke') else ''}"
                 f"gateway pinned to 1 core; {meta.get('cpu', '')})", fontsize=11)

    ax = axes[0][0]
    grouped_bars(ax, results, [
        ("market", "market: µs/delivery\n100 sym, 1k clients x 5", "gateway_cpu_us_per_delivery"),
        ("hot", "hot: µs/delivery\n1 sym, 5k clients", "gateway_cpu_us_per_delivery"),
        ("wide", "wide: µs/published msg\n10k sym, 1k clients x 5", "gateway_cpu_us_per_publish"),
    ], variants, log=True)
    ax.set_title("Gateway CPU at saturation (µs, lower is better)")
    ax.legend()

    ax = axes[0][1]
    grouped_bars(ax, results, [
        ("market", "market: deliveries/s", "deliveries_per_s"),
        ("hot", "hot: deliveries/s", "deliveries_per_s"),
        ("wide", "wide: published msgs/s", "publishes_per_s"),
    ], variants, label_fmt="{:,.0f}", log=True)
    ax.set_title("Saturation throughput (higher is better)")

    ax = axes[1][0]
    lat = [r for r in results if r["scenario"] == "latency" and r.get("latency_us")]
    loads = sorted({r["offered_label"] for r in lat})
    styles = {"p50": ":", "p99": "-", "p999": "--"}
    for v in variants:
        for pct, ls in styles.items():
            ys = []
            for load in loads:
                rows = [r for r in lat if r["variant"] == v and r["offered_label"] == load]
                vals = [r["latency_us"][pct] / 1000 for r in rows]
                ys.append(statistics.median(vals) if vals else float("nan"))
            ax.plot(range(len(loads)), ys, ls, marker="o", color=COLORS.get(v),
                    label=f"{v} {pct.replace('p999', 'p99.9')}")
        # mark loads the variant could not sustain
        for k, load in enumerate(loads):
            if any(r["variant"] == v and r["offered_label"] == load and r.get("overloaded")
                   for r in lat):
                ax.annotate("overloaded", (k, 1), fontsize=7, color=COLORS.get(v),
                            xytext=(0, 6 * (variants.index(v) + 1)), textcoords="offset points")
    ax.set_xticks(range(len(loads)), [f"{n:,}/s" for n in loads])
    ax.set_yscale("log")
    ax.set_xlabel("offered deliveries/s (1,000 clients x 5 of 100 symbols)")
    ax.set_title("Publish -> client latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=len(variants), loc="upper left")

    ax = axes[1][1]
    grouped_bars(ax, results, [("memory", "idle subscribed connection", "rss_kib_per_conn")],
                 variants, label_fmt="{:.1f}")
    n = median_of([r for r in results if r["scenario"] == "memory"], "connected")
    ax.set_title(f"Gateway RSS per connection (KiB, {int(n or 0):,} connections)")
    ax.legend()

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(BENCH / "results.json"))
    p.add_argument("-o", "--out", default=None)
    a = p.parse_args()
    src = Path(a.results)
    out = Path(a.out) if a.out else src.with_suffix(".png")
    plot(json.loads(src.read_text()), out)


if __name__ == "__main__":
    main()
