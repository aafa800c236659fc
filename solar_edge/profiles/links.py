"""Link profiles (devices/links.toml) and the time model for moving a file over each link.

Pure arithmetic apart from reading the TOML file. Two kinds of link:

* ``tcp``: HTTP over TCP/IP. Time = connection handshake (1 RTT) + request to first
  byte (1 RTT) + wire bytes at the link rate, where wire bytes add 52 bytes of IPv4/TCP
  headers (with timestamps) per segment of ``mtu - 52`` payload bytes and the HTTP
  response header. Loss costs retransmissions (divide by ``1 - loss``) and caps the
  throughput at the Mathis et al. bound ``MSS / RTT * 1.22 / sqrt(loss)``. Slow start is
  not modelled (it changes these links' times by less than a few RTTs).
* ``lorawan``: no IP. The file is cut into fragments of ``payload - fragment_header``
  bytes; each frame carries ``mac_overhead`` bytes of LoRaWAN header and MIC; its airtime
  follows the Semtech LoRa modem formula (AN1200.13); frames are spaced by the duty
  cycle, and ``ceil(n / (1 - loss))`` frames are sent so that forward error correction
  can recover lost fragments.

The throttled server (``devices/server.py``) paces bytes at :func:`goodput_bps`, so a
measured download can be checked against :func:`transfer_time`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from solar_edge.errors import ProfileError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib  # type: ignore[no-redef]

LINKS_TOML = Path(__file__).with_name("links.toml")
TCP_IP_HEADER = 52          # IPv4 20 + TCP 20 + timestamps option 12
HTTP_RESPONSE_HEADER = 250  # status line + headers our server sends, rounded up
MATHIS_C = 1.22


@dataclass(frozen=True)
class LinkProfile:
    """One link, as read from links.toml (units in the field names)."""

    name: str
    kind: str
    rate_bps: float
    latency_s: float
    loss: float
    description: str = ""
    mtu: int = 1500
    payload: int = 0
    sf: int = 9
    bw_hz: int = 125000
    coding_rate: int = 1
    preamble_symbols: int = 8
    duty_cycle: float = 1.0
    fragment_header: int = 3
    mac_overhead: int = 13

    def __post_init__(self) -> None:
        where = f"link {self.name!r}"
        if self.kind not in ("tcp", "lorawan"):
            raise ProfileError(f"{where}: kind must be 'tcp' or 'lorawan', got {self.kind!r}")
        if not self.rate_bps > 0:
            raise ProfileError(f"{where}: rate_bps must be > 0")
        if not 0 <= self.latency_s <= 60:
            raise ProfileError(f"{where}: latency_s must be in [0, 60]")
        if not 0 <= self.loss < 0.5:
            raise ProfileError(f"{where}: loss must be in [0, 0.5)")
        if self.kind == "tcp" and not 576 <= self.mtu <= 65535:
            raise ProfileError(f"{where}: mtu must be in [576, 65535]")
        if self.kind == "lorawan":
            if not self.fragment_header < self.payload <= 242:
                raise ProfileError(f"{where}: payload must be in ({self.fragment_header}, 242]")
            if not 7 <= self.sf <= 12 or self.coding_rate not in (1, 2, 3, 4):
                raise ProfileError(f"{where}: sf must be 7..12 and coding_rate 1..4")
            if not 0 < self.duty_cycle <= 1:
                raise ProfileError(f"{where}: duty_cycle must be in (0, 1]")

    @property
    def rtt_s(self) -> float:
        return 2.0 * self.latency_s

    @property
    def mss(self) -> int:
        return self.mtu - TCP_IP_HEADER


def load_links(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """All link profiles of a TOML file (default: the packaged links.toml), by name."""
    source = Path(path) if path is not None else LINKS_TOML
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read link profiles from {source}: {exc}") from exc
    links: dict[str, LinkProfile] = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict):
            raise ProfileError(f"{source}: [{name}] must be a table")
        try:
            links[name] = LinkProfile(name=name, **fields)
        except TypeError as exc:
            raise ProfileError(f"{source}: [{name}]: {exc}") from exc
    return links


def get_link(name: str, path: str | Path | None = None) -> LinkProfile:
    links = load_links(path)
    if name not in links:
        raise ProfileError(f"unknown link {name!r}; known: {', '.join(sorted(links))}")
    return links[name]


# --- TCP -------------------------------------------------------------------------------

def goodput_bps(link: LinkProfile) -> float:
    """Payload bits per second a TCP flow gets: header tax, retransmissions, Mathis cap."""
    if link.kind != "tcp":
        raise ProfileError(f"link {link.name!r} carries no TCP")
    rate = link.rate_bps * link.mss / link.mtu * (1.0 - link.loss)
    if link.loss > 0 and link.rtt_s > 0:
        rate = min(rate, link.mss * 8 / link.rtt_s * MATHIS_C / math.sqrt(link.loss))
    return rate


def tcp_wire_bytes(nbytes: int, link: LinkProfile) -> int:
    """Bytes on the wire for one HTTP response carrying ``nbytes`` of body (first copy)."""
    payload = nbytes + HTTP_RESPONSE_HEADER
    return payload + math.ceil(payload / link.mss) * TCP_IP_HEADER


def tcp_transfer_time(nbytes: int, link: LinkProfile, *, new_connection: bool = True) -> float:
    setup = (2 if new_connection else 1) * link.rtt_s
    return setup + (nbytes + HTTP_RESPONSE_HEADER) * 8 / goodput_bps(link)


# --- LoRaWAN ---------------------------------------------------------------------------

def lora_airtime_s(phy_payload: int, sf: int, bw_hz: int, coding_rate: int = 1,
                   preamble_symbols: int = 8, explicit_header: bool = True,
                   crc: bool = True) -> float:
    """Time on air of one LoRa frame (Semtech AN1200.13); low data rate optimisation
    is on when a symbol lasts more than 16 ms (SF11/SF12 at 125 kHz)."""
    t_sym = (2**sf) / bw_hz
    de = 1 if t_sym > 0.016 else 0
    h = 0 if explicit_header else 1
    numerator = 8 * phy_payload - 4 * sf + 28 + 16 * int(crc) - 20 * h
    n_payload = 8 + max(math.ceil(numerator / (4 * (sf - 2 * de))) * (coding_rate + 4), 0)
    return (preamble_symbols + 4.25) * t_sym + n_payload * t_sym


@dataclass(frozen=True)
class LoraPlan:
    fragments: int       # needed to carry the file
    frames_sent: int     # including redundancy for loss
    airtime_s: float     # per frame
    wire_bytes: int      # PHY payload bytes of all frames sent
    time_s: float


def lorawan_plan(nbytes: int, link: LinkProfile) -> LoraPlan:
    if link.kind != "lorawan":
        raise ProfileError(f"link {link.name!r} is not a LoRaWAN link")
    chunk = link.payload - link.fragment_header
    fragments = max(1, math.ceil(nbytes / chunk))
    frames = math.ceil(fragments / (1.0 - link.loss))
    phy = link.mac_overhead + link.payload
    air = lora_airtime_s(phy, link.sf, link.bw_hz, link.coding_rate, link.preamble_symbols)
    period = air / link.duty_cycle
    time_s = link.latency_s + (frames - 1) * period + air
    return LoraPlan(fragments, frames, air, frames * phy, time_s)


# --- either ----------------------------------------------------------------------------

def transfer_time(nbytes: int, link: LinkProfile) -> float:
    """Seconds to deliver ``nbytes`` over ``link`` by the model of its kind."""
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    if link.kind == "lorawan":
        return lorawan_plan(nbytes, link).time_s
    return tcp_transfer_time(nbytes, link)


def wire_bytes(nbytes: int, link: LinkProfile) -> int:
    if link.kind == "lorawan":
        return lorawan_plan(nbytes, link).wire_bytes
    return tcp_wire_bytes(nbytes, link)
