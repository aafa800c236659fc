"""Device profiles (``solar_edge/profiles/devices/*.toml``) and the rank rule for per-layer bases.

A profile says what a board is (architecture, memory), how it runs the model (backend
and execution providers in preference order) and how much it may spend on SOLAR bases
(basis dtype, a byte budget for all bases together, an optional per-layer rank cap).
The export stage reads it to size the bases; the runtime reads it to pick a backend.

Rank rule (:func:`choose_ranks`): one rank ``r`` for every layer, capped per layer at its
full rank ``min(out, in)`` and at ``max_rank``; ``r`` is the largest value whose bases
``sum_l (out_l + in_l) * r_l * itemsize`` fit in ``basis_budget_mb`` MiB. Where the budget
holds every layer at full rank, bases are full rank (the SVD then reconstructs ``W0``).
Pure arithmetic apart from reading TOML.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solar_edge.errors import ProfileError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 boards
    import tomli as tomllib  # type: ignore[no-redef]

PROFILES_DIR = Path(__file__).with_name("devices")
BACKENDS = ("onnxruntime", "tflite")
BASIS_DTYPES = {"float16": 2, "float32": 4}
MIB = 1 << 20


@dataclass(frozen=True)
class DeviceProfile:
    """One board, as read from its TOML file (units in the field names)."""

    name: str
    architecture: str
    memory_mb: int
    backend: str
    execution_providers: tuple[str, ...]
    basis_dtype: str
    basis_budget_mb: int
    link: str
    description: str = ""
    max_rank: int | None = None
    tflite_seq_len: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"device profile {self.name!r}"
        if self.backend not in BACKENDS:
            raise ProfileError(f"{where}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.basis_dtype not in BASIS_DTYPES:
            raise ProfileError(
                f"{where}: basis_dtype must be one of {sorted(BASIS_DTYPES)}, "
                f"got {self.basis_dtype!r}"
            )
        if not self.execution_providers:
            raise ProfileError(f"{where}: execution_providers must not be empty")
        if self.memory_mb <= 0 or self.basis_budget_mb <= 0:
            raise ProfileError(f"{where}: memory_mb and basis_budget_mb must be > 0")
        if self.basis_budget_mb > self.memory_mb:
            raise ProfileError(f"{where}: basis_budget_mb exceeds memory_mb")
        if self.max_rank is not None and self.max_rank < 1:
            raise ProfileError(f"{where}: max_rank must be >= 1")
        if not 1 <= self.tflite_seq_len <= 4096:
            raise ProfileError(f"{where}: tflite_seq_len must be in [1, 4096]")

    @property
    def basis_itemsize(self) -> int:
        return BASIS_DTYPES[self.basis_dtype]

    @property
    def basis_budget_bytes(self) -> int:
        return self.basis_budget_mb * MIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as recorded in a bundle manifest (ints and strings only)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "memory_mb": self.memory_mb,
            "backend": self.backend,
            "execution_providers": list(self.execution_providers),
            "basis_dtype": self.basis_dtype,
            "basis_budget_mb": self.basis_budget_mb,
            "max_rank": self.max_rank,
            "tflite_seq_len": self.tflite_seq_len,
            "link": self.link,
        }
        out.update(self.extra)
        return out


_FIELDS = {
    "description", "architecture", "memory_mb", "backend", "execution_providers",
    "basis_dtype", "basis_budget_mb", "max_rank", "tflite_seq_len", "link",
}
_REQUIRED = _FIELDS - {"description", "max_rank", "tflite_seq_len"}


def profile_from_dict(name: str, raw: dict[str, Any]) -> DeviceProfile:
    """Build a profile from parsed TOML; unknown keys are kept in ``extra``, not guessed."""
    missing = sorted(_REQUIRED - set(raw))
    if missing:
        raise ProfileError(f"device profile {name!r}: missing fields {missing}")
    try:
        return DeviceProfile(
            name=name,
            description=str(raw.get("description", "")),
            architecture=str(raw["architecture"]),
            memory_mb=int(raw["memory_mb"]),
            backend=str(raw["backend"]),
            execution_providers=tuple(str(p) for p in raw["execution_providers"]),
            basis_dtype=str(raw["basis_dtype"]),
            basis_budget_mb=int(raw["basis_budget_mb"]),
            max_rank=None if raw.get("max_rank") is None else int(raw["max_rank"]),
            tflite_seq_len=int(raw.get("tflite_seq_len", 128)),
            link=str(raw["link"]),
            extra={k: v for k, v in raw.items() if k not in _FIELDS},
        )
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"device profile {name!r}: {exc}") from exc


def known_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    """Names of the profiles shipped in ``directory`` (file stems), sorted."""
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_profile(name: str, directory: Path = PROFILES_DIR) -> DeviceProfile:
    """Read profile ``name``; an unknown name raises :class:`ProfileError` listing known ones."""
    known = known_profiles(directory)
    if name not in known:
        raise ProfileError(
            f"unknown device profile {name!r}; known profiles: {', '.join(known) or '(none)'}"
        )
    path = directory / f"{name}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"device profile {name!r}: cannot read {path.name}: {exc}") from exc
    return profile_from_dict(name, raw)


def basis_bytes(shapes: Sequence[tuple[int, int]], ranks: Sequence[int], itemsize: int) -> int:
    """Bytes of all bases: ``sum (out + in) * rank * itemsize``."""
    return sum((o + i) * r * itemsize for (o, i), r in zip(shapes, ranks, strict=True))


def choose_ranks(shapes: Sequence[tuple[int, int]], profile: DeviceProfile) -> list[int]:
    """Per-layer ranks for weights of ``shapes`` ``(out, in)`` under the profile's budget.

    One uniform rank ``r`` (capped per layer at ``min(out, in)`` and ``max_rank``), the
    largest whose bases fit the byte budget. Raises :class:`ProfileError` if not even
    rank 1 fits.
    """
    if not shapes:
        return []
    full = [min(o, i) for o, i in shapes]
    cap = max(full) if profile.max_rank is None else min(max(full), profile.max_rank)

    def ranks_at(r: int) -> list[int]:
        return [min(r, f) for f in full]

    def fits(r: int) -> bool:
        used = basis_bytes(shapes, ranks_at(r), profile.basis_itemsize)
        return used <= profile.basis_budget_bytes

    if not fits(1):
        raise ProfileError(
            f"device profile {profile.name!r}: basis_budget_mb={profile.basis_budget_mb} "
            f"cannot hold even rank-1 bases for {len(shapes)} layers"
        )
    lo, hi = 1, cap  # fits(lo) holds; find the largest r <= hi that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return ranks_at(lo)
