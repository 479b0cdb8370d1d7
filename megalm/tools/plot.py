"""``megalm-plot METRICS.jsonl [MORE.jsonl ...] -o curves.png``: training curves from ``--metrics-file``s.

One panel per quantity a run logged (loss with validation loss, learning rate, gradient norm, tokens/s, MFU, the
MoE aux loss), iterations on the x axis; several files are overlaid, each labelled by its file name (or
``--labels``), so runs can be compared at a glance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# (title, y label, [(metric, line style)]): a panel is drawn when some run logged one of its metrics
PANELS = [("loss", "loss", [("loss", "-"), ("valid_loss", "o--")]), ("learning rate", "lr", [("lr", "-")]),
          ("gradient norm", "grad norm", [("grad_norm", "-")]),
          ("throughput", "tokens/s", [("tokens_per_sec", "-")]), ("MFU", "MFU", [("mfu", "-")]),
          ("MoE load balancing", "aux loss", [("moe_aux_loss", "-")])]


class PlotError(ValueError):
    pass


def read_metrics(path: str) -> List[dict]:
    rows = []
    try:
        with open(path) as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PlotError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
    except OSError as exc:
        raise PlotError(f"{path}: {exc.strerror}") from None
    if not any("iteration" in r for r in rows):
        raise PlotError(f"{path}: no metrics rows (a --metrics-file of megalm-pretrain)")
    return rows


def plot(runs: dict, output: str):
    """``runs``: label -> metric rows. Writes ``output`` (PNG) and returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(m in r for rows in runs.values() for r in rows for m, _ in p[2])]
    cols = 2 if len(panels) > 1 else 1
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, ylabel, metrics) in zip(axes.flat, panels):
        for label, rows in runs.items():
            for metric, style in metrics:
                points = [(r["iteration"], r[metric]) for r in rows if metric in r]
                if points:
                    xs, ys = zip(*points)
                    name = label if metric in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu",
                                               "moe_aux_loss") else f"{label} ({metric})"
                    ax.plot(xs, ys, style, label=name, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    return fig


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm-plot", description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", help="--metrics-file JSON lines of one or more runs")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--labels", nargs="+", help="one label per file (default: the file names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        p.error(f"{len(args.labels)} --labels for {len(args.metrics)} files")
    labels = args.labels or [os.path.basename(m) for m in args.metrics]
    try:
        runs = {label: read_metrics(path) for label, path in zip(labels, args.metrics)}
    except PlotError as exc:
        print(f"megalm-plot: error: {exc}", file=sys.stderr)
        return 2
    plot(runs, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
