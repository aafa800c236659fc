"""Decode a packet in a fresh Python process: what a device that only has the bytes gets.

The packet and the bases go to files; a new interpreter reads the packet with the reader,
decodes every record with the device decoder and writes the factors back. Comparing those
with what the encoder kept checks the wire format and the decoder end to end, not a
function against itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from solar_edge.format.bundle import LayerBasis

_CHILD = r"""
import sys
import numpy as np
from solar_edge.decode import factors_by_layer
from solar_edge.format.reader import decode_packet
from solar_edge.format.bundle import LayerBasis

data = open(sys.argv[1], "rb").read()
arrays = np.load(sys.argv[2])
bases = {int(k[2:]): LayerBasis(int(k[2:]), arrays[k], arrays["V_" + k[2:]])
         for k in arrays.files if k.startswith("U_")}
packet = decode_packet(data)
factors = factors_by_layer(packet.records, packet.codec, bases)
out = {}
for lid, (left, right_t) in factors.items():
    out[f"L_{lid}"], out[f"R_{lid}"] = left, right_t
np.savez(sys.argv[3], **out)
"""


def decode_in_fresh_process(data: bytes, bases: dict[int, LayerBasis],
                            tmp: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    packet_path, bases_path, out_path = tmp / "p.slr", tmp / "bases.npz", tmp / "factors.npz"
    packet_path.write_bytes(data)
    arrays = {}
    for lid, b in bases.items():
        arrays[f"U_{lid}"], arrays[f"V_{lid}"] = b.U, b.V
    np.savez(bases_path, **arrays)
    subprocess.run([sys.executable, "-c", _CHILD, str(packet_path), str(bases_path),
                    str(out_path)], check=True, capture_output=True, timeout=120)
    got = np.load(out_path)
    lids = sorted({int(k[2:]) for k in got.files})
    return {lid: (got[f"L_{lid}"], got[f"R_{lid}"]) for lid in lids}
