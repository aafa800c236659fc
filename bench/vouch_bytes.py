"""Bytes and kept values of the same ``compress`` call with each vouch a packet can carry.

    python bench/vouch_bytes.py --bundle BUNDLE_DIR ADAPTER_DIR... [--budgets 5000,10000]
                                [--out F]

For every adapter and byte budget: the data-free ``compress --budget B`` with ``--canary
update`` (the default), ``outputs`` and ``none``; prints one row each (packet bytes, values
kept) and writes them as JSON with ``--out``. A budget the adapter's fixed part does not
fit in is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("update", "outputs", "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("adapters", nargs="+", type=Path)
    ap.add_argument("--budgets", default="5000,10000,20000,40000")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from solar_edge.errors import BudgetError
    from solar_edge.exporters.compress import CompressOptions, compress_adapter
    from solar_edge.format import signing
    from solar_edge.format.bundle import load_bundle
    from solar_edge.format.reader import decode_packet

    bundle = load_bundle(args.bundle)
    key = signing.generate_private_key()
    rows = []
    print(f"{'adapter':40s} {'budget':>7s} " + " ".join(f"{k + ' B':>10s} {'values':>7s}"
                                                        for k in KINDS))
    for adapter in args.adapters:
        for budget in (int(b) for b in args.budgets.split(",")):
            row: dict = {"adapter": str(adapter), "budget": budget}
            try:
                for kind in KINDS:
                    packet = compress_adapter(adapter, bundle, key,
                                              CompressOptions(budget=budget, canary=kind)).data
                    row[kind] = {"bytes": len(packet), "values": sum(
                        r.values.count for r in decode_packet(packet).records)}
            except BudgetError as exc:
                print(f"{adapter.name:40s} {budget:7d} skipped: {exc}", file=sys.stderr)
                continue
            rows.append(row)
            print(f"{str(adapter)[-40:]:40s} {budget:7d} " + " ".join(
                f"{row[k]['bytes']:10d} {row[k]['values']:7d}" for k in KINDS), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
