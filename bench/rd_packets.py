"""Packets and errors for the rate-distortion benchmark (``bench/rd.py``).

:class:`PacketMaker` builds one adapter's real signed packets and decodes them back into
per-layer factors; the helpers make the baselines' records and bases (fp16 safetensors size,
seeded random bases, the adapter's own factors quantised) and :func:`errors_of` measures the
relative Frobenius and activation-weighted errors of decoded factors against the adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from solar_edge.decode import factors_by_layer
from solar_edge.encode.actaware import weighted_sq_error
from solar_edge.encode.quant import quantize
from solar_edge.format.bundle import Bundle, LayerBasis
from solar_edge.format.layout import fixed_overhead_bytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import (
    CodecHeader,
    LayerRecord,
    PerturbationKind,
    RecordKind,
    ValueFormat,
)
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate
from solar_edge.regen.prng import perturbation_columns

RANDOM_SEED = 7

Updates = dict[int, LayerUpdate]
Factors = dict[int, tuple[np.ndarray, np.ndarray]]

# --- packets -------------------------------------------------------------------------------


class PacketMaker:
    """Signed packets for one adapter; decodes them back into per-layer factors."""

    def __init__(self, bundle: Bundle, adapter_id: str, metadata: dict, key) -> None:
        self.header = PacketHeader(bundle.fingerprint, adapter_id, 1, metadata)
        self.overhead = fixed_overhead_bytes(adapter_id, metadata)
        self.key = key

    def roundtrip(self, codec: CodecHeader, records: list[LayerRecord],
                  bases: dict[int, LayerBasis]) -> tuple[int, Factors]:
        data = encode_packet(self.header, codec, records, self.key)
        packet = decode_packet(data, [self.key.public_key()])
        return len(data), factors_by_layer(packet.records, packet.codec, bases)


def safetensors_bytes(path: Path, dtype: str) -> int:
    """Size of the adapter's tensors saved as ``dtype`` safetensors."""
    from safetensors.numpy import load_file, save

    tensors = {k: v.astype(dtype) for k, v in load_file(str(path)).items()}
    return len(save(tensors))


def random_bases(updates: Updates, seed: int) -> dict[int, LayerBasis]:
    """Seeded random orthonormal bases: QR of Philox Rademacher columns, min(out, in) per side.

    (A raw square Rademacher matrix is badly conditioned; a device would regenerate the same
    columns and orthonormalise them. Bytes are what matter here: positions and values.)"""
    out = {}
    for lid, u in updates.items():
        n_out, n_in = u.B.shape[0], u.A.shape[1]
        r = min(n_out, n_in)
        pu = perturbation_columns(seed, lid, 0, n_out, np.arange(r), PerturbationKind.RADEMACHER)
        pv = perturbation_columns(seed, lid, 1, n_in, np.arange(r), PerturbationKind.RADEMACHER)
        out[lid] = LayerBasis(lid, np.linalg.qr(pu.astype(np.float64))[0].astype(np.float32),
                              np.linalg.qr(pv.astype(np.float64))[0].astype(np.float32))
    return out


def lora_int_records(updates: Updates, fmt: ValueFormat) -> list[LayerRecord]:
    """The adapter's own factors (``dW = B @ A``) as DENSE_FACTORS records."""
    recs = []
    for lid, u in sorted(updates.items()):
        vals = np.concatenate([u.B.reshape(-1), u.A.T.reshape(-1)])
        recs.append(LayerRecord(lid, RecordKind.DENSE_FACTORS, u.B.shape[0], u.A.shape[1],
                                u.B.shape[1], quantize(vals, fmt, 64)))
    return recs


# --- errors --------------------------------------------------------------------------------


def errors_of(updates: Updates, factors: Factors, grams: dict[int, np.ndarray]) -> dict:
    """Relative Frobenius and activation-weighted (``G = grams``) errors of ``factors``."""
    fro = [0.0, 0.0]
    act = [0.0, 0.0]
    for lid, u in updates.items():
        B, A = u.B.astype(np.float64), u.A.astype(np.float64)
        n_out, n_in = B.shape[0], A.shape[1]
        L, Rt = factors.get(lid, (np.zeros((n_out, 0)), np.zeros((n_in, 0))))
        L, Rt = L.astype(np.float64), Rt.astype(np.float64)
        eye = np.eye(n_in)
        fro[0] += weighted_sq_error(B, A, L, Rt, eye)
        fro[1] += weighted_sq_error(B, A, np.zeros((n_out, 0)), np.zeros((n_in, 0)), eye)
        g = grams[lid]
        act[0] += weighted_sq_error(B, A, L, Rt, g)
        act[1] += weighted_sq_error(B, A, np.zeros((n_out, 0)), np.zeros((n_in, 0)), g)
    return {"rel_fro": float(np.sqrt(fro[0] / fro[1])), "act_err": float(np.sqrt(act[0] / act[1]))}


def file_hash(path: Path) -> str:
    """Short content hash of an adapter file (the cache key of its points)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

