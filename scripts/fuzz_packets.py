"""The long packet fuzz run: hostile packets must reach only typed errors, at a bounded cost.

Two phases, seeded and reproducible:

* ``--decode N`` mutants through ``decode_packet``: byte-level mutants of the golden packet
  (plain and zstd-compressed; each tried unsigned, with the trusted key, and re-signed) and
  structure-aware re-signed mutants from ``tests/hostile_packets.py`` (metadata value types
  and string encodings, header integers, layer-table shapes, kinds and counts);
* ``--apply N`` re-signed structure-aware mutants of a packet made for a real exported
  bundle through ``EdgeRuntime.apply`` (``--bundle DIR``; default: the 2-layer GPT-2 example
  exported to a temporary folder, a few seconds), half of them of the same packet carrying
  its update digest (names ``vouched.*``).

Prints the count of each outcome (``ok`` or the error type), the untyped exceptions (any
exception that is not a ``SolarEdgeError``: there must be none; exit status 1 otherwise),
wall time and peak memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The documented
run (docs/security.md)::

    nice python scripts/fuzz_packets.py --decode 100000 --apply 10000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hostile_packets as hp  # noqa: E402

from solar_edge.errors import SolarEdgeError  # noqa: E402
from solar_edge.format.reader import decode_packet  # noqa: E402
from solar_edge.format.writer import encode_packet  # noqa: E402

TINY_GPT2 = "solar_edge.exporters.examples:tiny_gpt2"


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.by_mutation: dict[str, Counter[str]] = {}
        self.untyped: list[str] = []
        self.mutants = 0

    def run(self, name: str, fn) -> None:
        try:
            fn()
            outcome = "ok"
        except SolarEdgeError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 (what the run looks for)
            outcome = "UNTYPED"
            if len(self.untyped) < 20:
                self.untyped.append(f"{name}: {type(exc).__name__}: {exc}")
        self.outcomes[outcome] += 1
        family = name.split("=")[0].split("[")[0].split("+")[0]
        self.by_mutation.setdefault(family, Counter())[outcome] += 1

    def report(self, seconds: float) -> dict:
        return {"mutants": self.mutants, "seconds": round(seconds, 1),
                "outcomes": dict(self.outcomes.most_common()),
                "by_mutation": {k: dict(v.most_common()) for k, v in sorted(
                    self.by_mutation.items())},
                "untyped": self.untyped}


def decode_phase(n: int, seed: int) -> Tally:
    rng = random.Random(seed)
    packet = decode_packet(hp.GOLDEN, hp.TRUSTED)
    compressed = encode_packet(packet.header, packet.codec, packet.records, hp.KEY,
                               compress=True)
    tally = Tally()
    for i in range(n):
        tally.mutants += 1
        if i % 2:
            name, data = hp.structure_mutant(rng, hp.GOLDEN)
            tally.run(name, lambda d=data: decode_packet(d, hp.TRUSTED))
            continue
        data = hp.byte_mutant(rng, compressed if i % 4 == 0 else hp.GOLDEN)
        tally.run("bytes.unsigned", lambda d=data: decode_packet(d))
        tally.run("bytes.trusted", lambda d=data: decode_packet(d, hp.TRUSTED))
        resigned = hp.resign(data)
        tally.run("bytes.resigned", lambda d=resigned: decode_packet(d, hp.TRUSTED))
    return tally


def apply_phase(n: int, seed: int, bundle_dir: str) -> Tally:
    from solar_edge.regen import update_digest
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(bundle_dir, hp.TRUSTED)
    shapes = {lid: s.shape for lid, s in rt.bundle.slots.items()}
    rank = rt.bundle.dims(min(shapes)).rank
    base = hp.bundle_packet(rt.bundle.fingerprint, shapes, rank)
    sizes = hp.bundle_sizes(shapes, rank)
    rt.apply(base)
    # the same packet vouching for its update, as compress signs it: odd mutants start from
    # it, so records that still decode meet the update digest check
    vouched = hp.with_metadata(base, {"update_digest": {
        "digest": rt.update_digest("fuzz"), "tolerance": update_digest.DEFAULT_TOLERANCE}}, 2)
    rt.apply(vouched)
    rng = random.Random(seed)
    tally = Tally()
    for i in range(n):
        tally.mutants += 1
        name, data = hp.structure_mutant(rng, vouched if i % 2 else base, b"m%d" % i, sizes)
        name = f"vouched.{name}" if i % 2 else name
        tally.run(name, lambda d=data: rt.apply(d))
        if rt.active is None or rt.active.adapter_id != "fuzz":
            rt.activate("fuzz")
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decode", type=int, default=100_000, help="mutants through decode_packet")
    ap.add_argument("--apply", type=int, default=10_000, help="mutants through EdgeRuntime.apply")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: export tiny GPT-2)")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--json", action="store_true", help="print one JSON report")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {"seed": args.seed}
    decode = decode_phase(args.decode, args.seed)
    report["decode"] = decode.report(time.perf_counter() - t0)
    untyped = decode.outcomes["UNTYPED"]
    if args.apply:
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            bundle = args.bundle
            if bundle is None:  # exported in a child process: torch stays out of the RSS
                bundle = str(Path(tmp) / "bundle")
                subprocess.run([sys.executable, "-c", "import sys; from solar_edge.exporters."
                                "pipeline import export_bundle; export_bundle(*sys.argv[1:])",
                                TINY_GPT2, "x86-64", bundle], check=True,
                               stderr=subprocess.DEVNULL)
            report["bundle"] = "tiny GPT-2 example" if args.bundle is None else bundle
            apply = apply_phase(args.apply, args.seed, bundle)
        report["apply"] = apply.report(time.perf_counter() - t1)
        untyped += apply.outcomes["UNTYPED"]
    report["untyped"] = untyped
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for phase in ("decode", "apply"):
            if phase in report:
                r = report[phase]
                print(f"{phase}: {r['mutants']} mutants in {r['seconds']} s: {r['outcomes']}")
                for line in r["untyped"]:
                    print(f"  UNTYPED {line}")
        print(f"untyped exceptions: {untyped}; wall {report['wall_s']} s; "
              f"peak RSS {report['peak_rss_mib']} MiB")
    return 1 if untyped else 0


if __name__ == "__main__":
    sys.exit(main())
