"""Property test: for random shapes, ranks, budgets, seeds, epsilons and formats the codec
stays within budget (counted on the bytes of the written packet), the packet read back
decodes to what the encoder kept, and the encoder reports the error it really makes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solar_edge.decode import factors_by_layer
from solar_edge.encode.solar import REPRESENTATIONS, CodecConfig, encode
from solar_edge.errors import BudgetError
from solar_edge.format import signing
from solar_edge.format.bundle import LayerBasis
from solar_edge.format.layout import LAYER_ENTRY_BYTES, fixed_overhead_bytes, values_nbytes
from solar_edge.format.packet import PacketHeader
from solar_edge.format.reader import decode_packet
from solar_edge.format.records import PerturbationKind, RecordKind, ValueFormat
from solar_edge.format.writer import encode_packet
from solar_edge.methods.base import LayerUpdate

KEY = signing.generate_private_key()
HEADER = PacketHeader(bytes(32), "property", 1, {})


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ups, bases = {}, {}
    for lid in range(n_layers):
        out, inn = draw(st.integers(2, 20)), draw(st.integers(2, 20))
        r = draw(st.integers(1, 5))
        u, _, vt = np.linalg.svd(rng.normal(size=(out, inn)), full_matrices=draw(st.booleans()))
        keep_u, keep_v = draw(st.integers(1, u.shape[1])), draw(st.integers(1, vt.shape[0]))
        scale = 10.0 ** draw(st.integers(-3, 1))
        ups[lid] = LayerUpdate(f"l{lid}", (rng.normal(size=(out, r)) * scale).astype(np.float32),
                               rng.normal(size=(r, inn)).astype(np.float32))
        bases[lid] = LayerBasis(lid, u[:, :keep_u].astype(np.float32),
                                vt[:keep_v].T.astype(np.float32))
    cfg = CodecConfig(
        seed=draw(st.integers(0, 2**64 - 1)),
        epsilon=draw(st.sampled_from([0.0, 0.01, 0.3])),
        perturbation=draw(st.sampled_from(list(PerturbationKind))),
        value_format=draw(st.one_of(
            st.sampled_from(list(ValueFormat)),
            st.lists(st.sampled_from(list(ValueFormat)), min_size=1, max_size=3,
                     unique=True).map(tuple))),
        group_size=draw(st.sampled_from([1, 7, 64])),
        budget_bytes=draw(st.one_of(st.none(), st.integers(40, 3000))),
        representation=draw(st.sampled_from(REPRESENTATIONS)),
        max_rank=draw(st.one_of(st.none(), st.integers(1, 4))),
        variants=draw(st.integers(1, 3)),
        overhead_bytes=draw(st.integers(0, 200)),
    )
    return ups, bases, cfg


def _smallest_record(upd: LayerUpdate, basis: LayerBasis, cfg: CodecConfig) -> int:
    """A lower bound on the bytes of any non-empty record for this layer."""
    gs = cfg.group_size
    sizes = {
        "sparse_core": min(values_nbytes(f, 1, gs) for f in cfg.formats) + 1,
        "factored_core": min(values_nbytes(f, basis.U.shape[1] + basis.V.shape[1], gs)
                             for f in cfg.formats),
        "dense_factors": min(values_nbytes(f, upd.B.shape[0] + upd.A.shape[1], gs)
                             for f in cfg.formats),
    }
    reps = list(sizes) if cfg.representation == "auto" else [cfg.representation]
    return LAYER_ENTRY_BYTES + min(sizes[r] for r in reps)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_codec_properties(problem):
    ups, bases, cfg = problem
    try:
        res = encode(ups, bases, cfg)
    except BudgetError:
        assert cfg.budget_bytes is not None
        floor = min(_smallest_record(ups[k], bases[k], cfg) for k in ups)
        assert cfg.budget_bytes - cfg.overhead_bytes < floor
        return
    # budget: the encoder's count is the written packet's size, never above the budget
    data = encode_packet(HEADER, res.header, res.records, KEY, compress=False)
    payload = len(data) - fixed_overhead_bytes(HEADER.adapter_id, HEADER.metadata)
    assert res.total_bytes == cfg.overhead_bytes + payload
    if cfg.budget_bytes is not None:
        assert res.total_bytes <= cfg.budget_bytes
    elif set(cfg.formats) <= {ValueFormat.FLOAT32, ValueFormat.FLOAT16, ValueFormat.INT8}:
        # nothing dropped without a budget (with coarser formats a layer whose every option
        # is predicted worse than leaving it out may be dropped)
        assert len(res.records) == len(ups)
    assert set(res.reconstructions) == set(res.predicted_error) == set(ups)
    decoded = factors_by_layer(decode_packet(data).records, res.header, bases)
    for rec in res.records:
        assert rec.values.fmt in cfg.formats
        if cfg.representation != "auto":
            assert rec.kind == RecordKind[cfg.representation.upper()]
        if cfg.max_rank is not None and rec.kind != RecordKind.SPARSE_CORE:
            assert rec.rank <= cfg.max_rank
        # the packet read back decodes to the encoder's reconstruction (same process, bit for bit)
        lf, rt = decoded[rec.layer_id]
        elf, ert = res.reconstructions[rec.layer_id]
        assert np.array_equal(lf, elf) and np.array_equal(rt, ert)
    for lid, upd in ups.items():
        dw = upd.B.astype(np.float64) @ upd.A.astype(np.float64)
        lf, rt = res.reconstructions[lid]
        assert lf.shape[0] == dw.shape[0] and rt.shape[0] == dw.shape[1]
        assert np.all(np.isfinite(lf)) and np.all(np.isfinite(rt))
        err = np.linalg.norm(dw - lf.astype(np.float64) @ rt.astype(np.float64).T)
        rel = err / np.linalg.norm(dw)
        assert abs(res.predicted_error[lid] - rel) < 1e-3 * max(1.0, rel)
        # the basis side: with float32 values and no budget nothing beyond the projection is lost
        if (cfg.budget_bytes is None and cfg.value_format == ValueFormat.FLOAT32
                and cfg.max_rank is None and cfg.representation != "auto" and cfg.epsilon == 0):
            if cfg.representation == "dense_factors":
                assert rel < 1e-5
            else:
                u, v = bases[lid].U.astype(np.float64), bases[lid].V.astype(np.float64)
                proj = u @ (u.T @ dw @ v) @ v.T
                lost = np.linalg.norm(dw - proj) / np.linalg.norm(dw)
                assert lost == pytest.approx(rel, abs=1e-5)
