"""Link profiles and the transfer-time model (pure arithmetic)."""

from __future__ import annotations

import math

import pytest

from solar_edge.errors import ProfileError
from solar_edge.profiles.links import (
    HTTP_RESPONSE_HEADER,
    LinkProfile,
    get_link,
    goodput_bps,
    load_links,
    lora_airtime_s,
    lorawan_plan,
    transfer_time,
    wire_bytes,
)


def test_packaged_profiles_cover_the_required_links():
    links = load_links()
    assert {"nbiot", "ltem", "3g", "wifi", "satellite", "lorawan"} <= set(links)
    assert links["satellite"].rate_bps == 2400
    lora = links["lorawan"]
    assert lora.kind == "lorawan" and lora.payload > 0 and 0 < lora.duty_cycle < 1
    for link in links.values():
        assert link.latency_s >= 0 and 0 <= link.loss < 0.5


def test_unknown_link_and_bad_fields_are_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="unknown link"):
        get_link("carrier-pigeon")
    bad = tmp_path / "links.toml"
    bad.write_text('[x]\nkind = "tcp"\nrate_bps = -1\nlatency_s = 0.1\nloss = 0\n')
    with pytest.raises(ProfileError, match="rate_bps"):
        load_links(bad)
    bad.write_text('[x]\nkind = "tcp"\nrate_bps = 1\nlatency_s = 0.1\nloss = 0\nspeed = 3\n')
    with pytest.raises(ProfileError, match="speed"):
        load_links(bad)


def test_lora_airtime_matches_the_modem_formula_by_hand():
    # SF7/125 kHz, CR 4/5, 13-byte PHY payload, explicit header, CRC on:
    # Tsym = 1.024 ms; payload symbols = 8 + ceil((104 - 28 + 28 + 16) / 28) * 5 = 33;
    # preamble 8 + 4.25 = 12.25 symbols -> 45.25 * 1.024 ms.
    assert lora_airtime_s(13, 7, 125000) == pytest.approx(45.25 * 1.024e-3)
    # SF12/125 kHz turns on low data rate optimisation: 4 * (12 - 2) in the denominator.
    t_sym = 4096 / 125000
    n = 8 + math.ceil((8 * 51 - 48 + 28 + 16) / 40) * 5
    assert lora_airtime_s(51, 12, 125000) == pytest.approx((12.25 + n) * t_sym)


def test_lorawan_plan_fragments_duty_cycle_and_loss():
    link = get_link("lorawan")
    chunk = link.payload - link.fragment_header
    plan = lorawan_plan(10 * chunk, link)
    assert plan.fragments == 10
    assert plan.frames_sent == math.ceil(10 / (1 - link.loss))
    assert plan.wire_bytes == plan.frames_sent * (link.payload + link.mac_overhead)
    expected = link.latency_s + (plan.frames_sent - 1) * plan.airtime_s / link.duty_cycle \
        + plan.airtime_s
    assert plan.time_s == pytest.approx(expected)
    assert lorawan_plan(10 * chunk + 1, link).fragments == 11


def test_tcp_model_charges_handshake_headers_and_loss():
    clean = LinkProfile("c", "tcp", rate_bps=1e6, latency_s=0.05, loss=0.0, mtu=1500)
    lossy = LinkProfile("l", "tcp", rate_bps=1e6, latency_s=0.05, loss=0.02, mtu=1500)
    assert goodput_bps(clean) == pytest.approx(1e6 * 1448 / 1500)
    assert goodput_bps(lossy) < goodput_bps(clean)
    n = 100_000
    assert transfer_time(n, clean) == pytest.approx(0.2 + (n + HTTP_RESPONSE_HEADER) * 8
                                                    / goodput_bps(clean))
    assert wire_bytes(n, clean) > n + HTTP_RESPONSE_HEADER
    assert transfer_time(2 * n, clean) > transfer_time(n, clean)


def test_slower_links_take_longer_for_the_same_file():
    links = load_links()
    n = 50_000
    times = {name: transfer_time(n, link) for name, link in links.items()}
    assert times["wifi"] < times["3g"] < times["ltem"] < times["nbiot"] < times["satellite"]
