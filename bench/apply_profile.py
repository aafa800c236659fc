"""Where one apply of the large (~73 KB) packet goes, piece by piece, on the ``lora`` mechanism.

    python bench/apply_profile.py --bundle BUNDLE_DIR [--repeat 30] [--threads 1] [--out F]

Each round times the pieces of ``EdgeRuntime.stage`` on their own (the Ed25519 check of
the signed bytes, zstd, the whole packet reader, the basis products alone, the record
decoder, the factor checks, the slot feeds, the update digest check that replaces the
forward pass, and, for comparison, that forward pass on the health input and on its first 1
and 2 tokens), then one real apply of a new version, so every piece sees the caches an
apply leaves. Medians and minimums in ms (the minimum is the cost with
the least interference on a shared machine). Packets as in ``bench/runtime.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def pieces(rt, data: bytes, key) -> dict[str, float]:
    """One timing of each piece of staging ``data`` (nothing is cached or served)."""
    import zstandard

    from solar_edge.decode import decode_records
    from solar_edge.format import signing
    from solar_edge.format.reader import decode_packet
    from solar_edge.runtime.patching import one_blas_thread

    out: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        res = fn()
        out[name] = (time.perf_counter() - t) * 1e3
        return res

    pub = key.public_key()
    timed("ed25519_verify", lambda: signing.verify(pub, data[-64:], data[:-64]))
    packet = timed("decode_packet", lambda: decode_packet(data, rt.keys, rt.limits))
    frame = data[_body_start(data) + 4 : len(data) - 72]  # after the raw length, before the trailer
    timed("zstd", lambda: zstandard.ZstdDecompressor().decompress(
        frame, max_output_size=1 << 24))
    with one_blas_thread():
        recs = [(r, r.values.dequantize(), rt._basis(r.layer_id)) for r in packet.records]

        def products() -> None:
            for r, v, b in recs:
                split = r.rows * r.rank
                _ = b.U[:, : r.rows] @ v[:split].reshape(r.rows, r.rank)
                _ = b.V[:, : r.cols] @ v[split:].reshape(r.cols, r.rank)

        timed("basis_products", products)
        decoded = timed("decode_records", lambda: decode_records(
            packet.records, packet.codec, rt.bundle.dims, rt._basis))
        patches = timed("check_factors", lambda: rt._patches(decoded))
        staged = timed("slot_feeds", lambda: rt.backend.prepare(patches))
        timed("update_digest_check", lambda: rt.checks.run(
            staged, packet.header.metadata, patches, None))
    health = rt._health_feeds
    timed("probe", lambda: rt.backend.probe(staged, health))
    for n in (1, 2):
        short = {k: np.ascontiguousarray(v[:, :n]) for k, v in health.items()}
        timed(f"probe_{n}_token", lambda short=short: rt.backend.probe(staged, short))
    return out


def _body_start(data: bytes) -> int:
    """Offset of the body (after the header and its u32 length), from the reader itself."""
    from solar_edge.format.layout import U32
    from solar_edge.format.packet import PacketLimits
    from solar_edge.format.reader import _read_header, _Reader

    r = _Reader(data)
    _read_header(r, PacketLimits())
    r.unpack(U32, "header.body_length")
    return r.pos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import runtime as bench  # bench/runtime.py: adapters and packets made the same way
    from solar_edge.format import signing
    from solar_edge.runtime.engine import EdgeRuntime

    with tempfile.TemporaryDirectory(prefix="solar-edge-profile-") as tmp:
        bundle_dir = bench.prepare_bundle(args.bundle, Path(tmp))
        key = signing.generate_private_key()
        adapters = bench.make_peft_adapters(Path(tmp), n=1)
        packets = bench.make_packets(bundle_dir, adapters, key, args.repeat + 1,
                                     representation="factored_core", max_rank=8)[0]
        rt = EdgeRuntime(str(bundle_dir), [key.public_key()], mechanism="lora",
                         threads=args.threads)
        rt.apply(packets[0])
        rows: dict[str, list[float]] = {}
        for v in range(1, args.repeat + 1):
            for name, ms in pieces(rt, packets[v], key).items():
                rows.setdefault(name, []).append(ms)
            t = time.perf_counter()
            rt.apply(packets[v])
            rows.setdefault("apply", []).append((time.perf_counter() - t) * 1e3)
            for name, ms in rt.last_timings.items():
                rows.setdefault(f"apply.{name}", []).append(ms)
    result = {"packet_bytes": len(packets[0]), "repeat": args.repeat, "threads": args.threads,
              "ms": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3)}
                     for k, v in rows.items()}}
    for name, s in result["ms"].items():
        print(f"{name:24s} {s['median']:8.3f} ({s['min']:7.3f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
