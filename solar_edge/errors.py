"""Every typed error solar-edge raises, in one place.

Two families, as in secure update clients: errors about bad *data* (a packet, a
bundle, an adapter directory) and errors about *transport* (downloads). A caller
that only wants "did this update fail safely" catches :class:`SolarEdgeError`.
Parse failures from lower layers are wrapped with ``raise ... from exc``.
"""

from __future__ import annotations


class SolarEdgeError(Exception):
    """Base class of every error solar-edge raises on purpose."""


# --- packets -------------------------------------------------------------------------

class PacketError(SolarEdgeError):
    """A packet is malformed, out of limits, or fails verification.

    ``field`` names the part of the packet that failed (e.g. ``"header.version"``,
    ``"layer[3].positions"``) so that logs say exactly what was wrong.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class TruncatedPacketError(PacketError):
    """The packet ends before a field it declares."""


class BadMagicError(PacketError):
    """The packet does not start with the solar-edge magic bytes."""


class UnsupportedVersionError(PacketError):
    """The packet format version is not one this reader implements."""


class LimitExceededError(PacketError):
    """A count or length in the packet exceeds the reader's configured limits."""


class InvalidFieldError(PacketError):
    """A field has a value outside its allowed range (index, enum, NaN, ...)."""


class TrailingDataError(PacketError):
    """Bytes remain after the last declared field."""


class SignatureError(PacketError):
    """The Ed25519 signature does not verify, or the signing key is not trusted."""


class BaseMismatchError(PacketError):
    """The packet was made for another base bundle (fingerprint differs)."""


class RollbackError(PacketError):
    """The packet's adapter version is not newer than the one already installed."""


# --- bundles, adapters, profiles ------------------------------------------------------

class BundleError(SolarEdgeError):
    """An exported bundle is missing, incomplete or altered."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class BundleIntegrityError(BundleError):
    """A bundle file is missing or its SHA-256 does not match the manifest."""


class AdapterError(SolarEdgeError):
    """A PEFT adapter directory cannot be read or does not match the base model."""


class ProfileError(SolarEdgeError):
    """An unknown or malformed device or link profile."""


class ExportError(SolarEdgeError):
    """The export stage cannot produce a bundle as asked (model, targets, graph, converter)."""


class CodecError(SolarEdgeError):
    """The codec was given inconsistent inputs (shapes, budget, parameters)."""


class CalibrationError(CodecError):
    """A data-driven encoder step lacks its inputs: the [export] extra or the task's texts."""


class BudgetError(CodecError):
    """No packet fits the requested byte budget or error bound."""


# --- runtime and transport ------------------------------------------------------------

class RuntimeApplyError(SolarEdgeError):
    """Applying an adapter failed; the previously active adapter keeps serving."""


class HealthCheckError(RuntimeApplyError):
    """The patched model produced non-finite or otherwise invalid outputs."""


class UnknownAdapterError(SolarEdgeError):
    """A switch was requested to an adapter that is not cached."""


class GenerationError(SolarEdgeError):
    """A generation request the model cannot serve (not a decoder, prompt too long, bad
    sampling options or token ids)."""


class ImageError(SolarEdgeError):
    """An input image is unreadable (truncated, not an image) or does not fit the model
    (size, channel count)."""


class DownloadError(SolarEdgeError):
    """A transfer failed (connection, HTTP status, length mismatch)."""


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP status other than 200/206 (redirects included)."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


class MalformedResponseError(DownloadError):
    """The server's HTTP response breaks the protocol (status line, headers, lengths)."""


class SlowRetrievalError(DownloadError):
    """A fetch, headers included, did not finish before its deadline or stalled."""


class RepositoryError(SolarEdgeError):
    """Signed repository metadata is invalid, expired, or rolled back."""


class KeyFileError(SolarEdgeError):
    """A signing or public key file is missing, unreadable or not an Ed25519 key."""


class MetadataSignatureError(RepositoryError):
    """Repository metadata is not signed by enough trusted keys (tampered or forged)."""


class MetadataExpiredError(RepositoryError):
    """Repository metadata has passed its expiry date (freeze attack or stale mirror)."""


class MetadataRollbackError(RepositoryError):
    """Repository metadata is older than metadata the device already trusts."""


class IntegrityError(RepositoryError):
    """A downloaded file's length or SHA-256 differs from the signed metadata."""


class PublishRefusedError(RepositoryError):
    """Publishing would replace a published id+version, or the root does not trust the key."""


class StateError(SolarEdgeError):
    """The device agent's saved state is unreadable or inconsistent."""
