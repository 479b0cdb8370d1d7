"""``megalm-merge-datasets``: concatenate several ``.bin/.idx`` datasets of one dtype into one."""
from __future__ import annotations

import argparse
import sys

from megalm.data.indexed import IndexedFormatError, merge_datasets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megalm-merge-datasets", description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, in the order to concatenate")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    try:
        merge_datasets(args.input, args.output_prefix)
    except (IndexedFormatError, FileNotFoundError) as exc:
        print(f"megalm-merge-datasets: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(args.input)} datasets into {args.output_prefix}.{{bin,idx}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
