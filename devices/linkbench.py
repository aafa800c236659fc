"""Bytes and download time of each update artifact over each link profile.

Artifacts: the full model (a bundle's ONNX graph with every external data file it names,
shipped as one uncompressed tar; see :mod:`.artifact_info`), the LoRA adapter
(safetensors), the same compressed with zstd (level 19, computed here), and the SOLAR
packet. Each row carries the artifact's real dtype, read from the file (ONNX initializer
types, the safetensors header, the packet's value formats), never assumed. Per link and
artifact:

* ``computed``: the link's time model (solar_edge/profiles/links.py; TCP/IP + HTTP overheads, loss;
  LoRaWAN fragments, airtime and duty cycle).
* ``measured``: a real download through :class:`RepoServer` throttled to the link, over
  real TCP on loopback, with the agent's HTTP client. When the model says the whole file
  takes longer than ``budget_s``, only a prefix is downloaded (as many bytes as the model
  says fit in ``budget_s``, at least four TCP segments) and the rest is extrapolated
  linearly from the body rate measured after the first chunk:
  ``t = t_first + (size - n_first) * (t_prefix - t_first) / (prefix - n_first)``.
  The method column says which. LoRaWAN carries no TCP: computed only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from solar_edge.devices.artifact_info import FilePart
from solar_edge.devices.fetcher import HttpTransport
from solar_edge.devices.server import RepoServer
from solar_edge.profiles.links import LinkProfile, transfer_time, wire_bytes

ARTIFACTS = ("full model", "LoRA", "LoRA zstd", "SOLAR packet")
MIN_PREFIX = 1024


@dataclass(frozen=True)
class Row:
    link: str
    artifact: str
    bytes: int
    wire_bytes: int
    computed_s: float
    measured_s: float | None
    method: str
    dtype: str = "-"


def tar_parts(folder: Path, parts: Sequence[FilePart], dst: Path) -> Path:
    """One uncompressed tar of ``parts`` (paths relative to ``folder``): one download."""
    with tarfile.open(dst, "w", format=tarfile.GNU_FORMAT) as tar:
        for part in parts:
            tar.add(folder / part.rel, arcname=part.rel, recursive=False)
    return dst


def zstd_file(src: Path, dst: Path, level: int = 19) -> Path:
    dst.write_bytes(zstandard.ZstdCompressor(level=level).compress(src.read_bytes()))
    return dst


def _place(src: Path, dst: Path) -> None:
    """Hard-link (or copy) an input under the server root; the server follows no links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def measure(url: str, size: int, prefix: int | None) -> tuple[float, str]:
    """Seconds to fetch ``url`` (or its first ``prefix`` bytes, extrapolated)."""
    start = time.monotonic()
    body = HttpTransport(timeout_s=120).get(url)
    first: tuple[float, int] | None = None   # (time of the first chunk, its length)
    got = 0
    try:
        for chunk in body.chunks:
            got += len(chunk)
            if first is None:
                first = (time.monotonic() - start, len(chunk))
            if prefix is not None and got >= prefix:
                break
    finally:
        body.close()
    elapsed = time.monotonic() - start
    if prefix is None:
        if got != size:
            raise RuntimeError(f"short read: {got} of {size} bytes")
        return elapsed, "measured"
    t_first, n_first = first if first is not None else (0.0, 0)
    if got <= n_first or got >= size:
        return elapsed * size / max(got, 1), f"measured {got} B, scaled"
    rate = (got - n_first) / (elapsed - t_first)   # body bytes/s after the first chunk
    return t_first + (size - n_first) / rate, f"measured {got} B prefix, extrapolated"


def prefix_for(size: int, link: LinkProfile, budget_s: float) -> int | None:
    """``None`` if the whole file fits the budget, else the prefix length to measure."""
    if transfer_time(size, link) <= budget_s:
        return None
    lo, hi = MIN_PREFIX, size
    while hi - lo > 1024:  # bounded bisection on the monotone model
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if transfer_time(mid, link) <= budget_s else (lo, mid)
    prefix = max(MIN_PREFIX, 4 * link.mss, lo)  # several segments: a rate, not one burst
    return None if prefix >= size else prefix


def run_linkbench(files: dict[str, Path], links: Sequence[LinkProfile],
                  budget_s: float = 3.0, dtypes: dict[str, str] | None = None) -> list[Row]:
    """Rows for every (link, artifact); ``files`` maps artifact name -> path, ``dtypes``
    artifact name -> its dtype summary."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="linkbench-") as tmp:
        root = Path(tmp)
        names = {}
        for i, (artifact, path) in enumerate(files.items()):
            names[artifact] = f"a{i}.bin"
            _place(Path(path), root / names[artifact])
        for link in links:
            server = RepoServer(root, link=link).start() if link.kind == "tcp" else None
            try:
                for artifact, path in files.items():
                    size = Path(path).stat().st_size
                    computed = transfer_time(size, link)
                    measured, method = None, "computed (no TCP on this link)"
                    if server is not None:
                        measured, method = measure(f"{server.url}/{names[artifact]}", size,
                                                   prefix_for(size, link, budget_s))
                    rows.append(Row(link.name, artifact, size, wire_bytes(size, link),
                                    computed, measured, method,
                                    (dtypes or {}).get(artifact, "-")))
            finally:
                if server is not None:
                    server.stop()
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_time(s: float | None) -> str:
    if s is None:
        return "-"
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h")):
        if s < limit:
            return f"{s / div:.2f} {unit}" if unit == "s" else f"{s / div:.1f} {unit}"
    return f"{s / 86400:.1f} d"


def table(rows: Sequence[Row]) -> str:
    lines = ["| link | artifact | dtype | bytes | on the wire | computed | measured | method |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.link} | {r.artifact} | {r.dtype} | {human_bytes(r.bytes)} | "
                     f"{human_bytes(r.wire_bytes)} | {human_time(r.computed_s)} | "
                     f"{human_time(r.measured_s)} | {r.method} |")
    return "\n".join(lines)


def chart(rows: Sequence[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(r.link for r in rows))
    artifacts = list(dict.fromkeys(r.artifact for r in rows))
    width = 0.8 / max(1, len(artifacts))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for j, artifact in enumerate(artifacts):
        xs, ys, computed_only = [], [], []
        for i, link in enumerate(links):
            for r in rows:
                if r.link == link and r.artifact == artifact:
                    xs.append(i + (j - (len(artifacts) - 1) / 2) * width)
                    ys.append(r.measured_s if r.measured_s is not None else r.computed_s)
                    computed_only.append(r.measured_s is None)
        bars = ax.bar(xs, ys, width, label=artifact)
        for bar, hatched in zip(bars, computed_only, strict=True):
            if hatched:
                bar.set_hatch("//")
    ax.set_yscale("log")
    ax.set_xticks(range(len(links)), links)
    ax.set_ylabel("download time (s, log scale)")
    for seconds, label in ((1, "1 s"), (60, "1 min"), (3600, "1 h"), (86400, "1 day")):
        ax.axhline(seconds, color="grey", lw=0.5, ls=":")
        ax.text(len(links) - 0.5, seconds, label, fontsize=7, va="bottom", ha="right")
    ax.set_title("Update download time per link (measured through the throttled server; "
                 "hatched: computed)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parts_table(parts: Sequence[FilePart]) -> str:
    """The full model's files: what its byte count is made of."""
    lines = ["| full model file | bytes | dtype |", "| --- | ---: | --- |"]
    shown = list(parts) if len(parts) <= 6 else [*parts[:4]]
    for p in shown:
        lines.append(f"| {p.rel} | {human_bytes(p.bytes)} | {p.dtype} |")
    if len(shown) < len(parts):
        rest = parts[len(shown):]
        lines.append(f"| ... {len(rest)} more | {human_bytes(sum(p.bytes for p in rest))} | "
                     f"{', '.join(sorted({p.dtype for p in rest}))} |")
    lines.append(f"| total ({len(parts)} files) | {human_bytes(sum(p.bytes for p in parts))} | |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[Row], out: Path,
                  parts: Sequence[FilePart] = ()) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "linkbench.json", "table": out / "linkbench.md",
             "chart": out / "linkbench.png"}
    doc = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(r).items()} for r in rows]
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["table"].write_text(table(rows) + "\n"
                              + (f"\n{parts_table(parts)}\n" if parts else ""))
    chart(rows, paths["chart"])
    return paths
