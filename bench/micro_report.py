"""Turns pytest-benchmark's JSON into a compiled-vs-twin table (markdown).

Usage: python bench/micro_report.py bench/micro.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        # The fast path is one part of the test id (others, e.g. plain/deflate, name the group).
        ids = (b.get("param") or b["name"].split("[")[-1].rstrip("]")).split("-")
        variant = next((i for i in ids if i in ("compiled", "purepy")), ids[0])
        groups[b["group"]][variant] = b
    print("| hot-path piece | compiled (median) | pure-Python twin (median) | twin / compiled |")
    print("|---|---|---|---|")
    for group, v in groups.items():
        c, p = v.get("compiled"), v.get("purepy")
        if not (c and p):
            continue
        cm, pm = c["stats"]["median"], p["stats"]["median"]
        extra = c.get("extra_info", {}).get("deliveries_per_round")
        per = f" ({cm / extra * 1e9:.1f} ns/delivery vs {pm / extra * 1e9:.1f})" if extra else ""
        print(f"| {group} | {fmt(cm)} | {fmt(pm)} | {pm / cm:.1f}x{per} |")
    m = data["machine_info"]
    print(f"\n{m.get('cpu', {}).get('brand_raw', '')}, Python {m['python_version']}, {data['datetime']}")


def fmt(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    main(sys.argv[1])
