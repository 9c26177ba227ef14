"""Draw the subscriber-count sweep of ``compare.py``: delivery rate at full
publishing speed and p99 latency at a fixed event rate, against the
number of subscribers of one topic. Needs matplotlib (the ``bench`` extra).

Usage::

    python bench/plot.py sweep.json benchmarks.png
"""

from __future__ import annotations

import json
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "ssepg-pg": "ssepg, Postgres, 1 process",
    "ssepg-pg-p2": "ssepg, Postgres, 2 processes",
    "ssepg-embedded": "ssepg, in-process broker",
    "nchan1": "Nchan, 1 worker",
    "nchanauto": "Nchan, 2 workers",
    "peer": "sse-starlette + broadcaster",
}


def draw(rows: list[dict[str, Any]], path: str) -> None:
    """Write the two-panel PNG for the sweep *rows* to *path*."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for system in systems:
        label = LABELS.get(system, system)
        full = sorted(
            (r["subs_n"], r.get("delivery_rate") or 0)
            for r in rows
            if r["system"] == system and r["mode"] == "max" and not r.get("error")
        )
        paced = sorted(
            (r["subs_n"], (r.get("lat_us_p99") or 0) / 1000)
            for r in rows
            if r["system"] == system
            and r["mode"] == "paced"
            and not r.get("error")
            and r.get("lat_us_p99")
        )
        if full:
            left.plot(
                [x for x, _ in full],
                [y / 1000 for _, y in full],
                marker="o",
                label=label,
            )
        if paced:
            right.plot(
                [x for x, _ in paced], [y for _, y in paced], marker="o", label=label
            )
    paced_rate = next((r.get("rate") for r in rows if r["mode"] == "paced"), None)
    left.set_title("Fan-out to one topic, publishing at full speed")
    left.set_xlabel("subscribers")
    left.set_ylabel("deliveries per second (thousands)")
    right.set_title(f"p99 publish-to-receive latency, {paced_rate or 10:g} events/s")
    right.set_xlabel("subscribers")
    right.set_ylabel("milliseconds (log scale)")
    # Latency spans orders of magnitude once a server falls behind.
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xscale("log")
        ticks = sorted({r["subs_n"] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(
        0.5,
        0.01,
        "2-core machine shared by server, load generator and Postgres",
        ha="center",
        fontsize=8,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: plot.py SWEEP.json OUT.png\n")
        return 2
    with open(argv[1]) as fh:
        rows = json.load(fh)
    draw(rows, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
