"""Print the first training loss and the last validation loss of a ``--metrics-file``, and their ratio."""
from __future__ import annotations

import json
import sys


def summarize(path: str) -> dict:
    first_loss = last_valid = None
    with open(path) as fh:
        for line in fh:
            row = json.loads(line)
            if first_loss is None and "loss" in row:
                first_loss = row["loss"]
            if "valid_loss" in row:
                last_valid = row["valid_loss"]
    return {"first_loss": first_loss, "last_valid_loss": last_valid}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m megalm.tools.summarize_metrics METRICS.jsonl", file=sys.stderr)
        return 2
    s = summarize(argv[0])
    if s["first_loss"] is None or s["last_valid_loss"] is None:
        print(f"{argv[0]}: no training or validation rows", file=sys.stderr)
        return 1
    drop = 1 - s["last_valid_loss"] / s["first_loss"]
    print(f"loss at iteration 1: {s['first_loss']:.3f}; final validation loss: {s['last_valid_loss']:.3f} "
          f"({100 * drop:.0f}% lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
