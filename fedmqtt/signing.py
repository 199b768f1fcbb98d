"""Authentication of messages: Ed25519 for the global model, HMAC-SHA256 or Ed25519 for updates.

What is authenticated is the *body bytes exactly as sent* (the canonical msgpack encoding of the
message without its signature, see :mod:`fedmqtt.wire`). The verifier therefore never
re-encodes a message to check it, which would cost a copy of every tensor and depend on two
msgpack versions producing identical bytes.

Why two algorithms for updates (measured in ``bench/auth.py``, numbers in docs/benchmarks.md):
the aggregator verifies every update, so per-update cost caps ingestion. HMAC-SHA256 is the
default: a few microseconds for small updates, and it needs only the standard library on the
device. Ed25519 is offered for fleets that want the aggregator to hold only public keys (a stolen
aggregator key store cannot forge device updates); it costs a fixed ~50-100 microseconds more per
update. The global model is always Ed25519: one signer, many verifiers that must not be able to
forge it.

Key files: Ed25519 private keys as PKCS#8 PEM, public keys as raw 32 bytes in hex; HMAC keys as
32 random bytes in hex. Secrets are written with mode 0600 atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # cryptography is imported lazily: a device using HMAC never loads it for signing
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ED25519: Final = "ed25519"
HMAC_SHA256: Final = "hmac-sha256"
ALGORITHMS: Final = (ED25519, HMAC_SHA256)
HMAC_KEY_BYTES: Final = 32


Buffer = bytes | memoryview


class Signer(Protocol):
    @property
    def alg(self) -> str: ...

    def sign(self, data: Buffer) -> bytes: ...


class Verifier(Protocol):
    @property
    def alg(self) -> str: ...

    def verify(self, data: Buffer, sig: bytes) -> bool: ...


class Ed25519Signer:
    alg = ED25519

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> Ed25519Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: Buffer) -> bytes:
        return self._key.sign(data)

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier.from_bytes(self.public_bytes())

    def save(self, path: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(path, pem, mode=0o600)

    @classmethod
    def load(cls, path: Path) -> Ed25519Signer:
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        except ImportError:
            raise ConfigError(
                "Ed25519 signing keys need the cryptography package: "
                "pip install 'fedmqtt[ed25519-device]'"
            ) from None

        data = _read_secret(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as e:
            raise ConfigError(f"{path}: not a PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 private key")
        return cls(key)


class Ed25519Verifier:
    """Checks Ed25519 signatures against one public key.

    Uses PyNaCl (libsodium) when it is installed and cryptography otherwise. Devices only ever
    verify, and importing PyNaCl costs ~1.4 MiB of RSS against ~6.6 MiB for cryptography
    (measured next to bare numpy, docs/benchmarks.md), a large share of a device's budget.
    """

    alg = ED25519

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ConfigError("an Ed25519 public key is 32 bytes")
        self._raw = bytes(raw)
        self._verify = _ed25519_backend(self._raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Ed25519Verifier:
        return cls(raw)

    def verify(self, data: Buffer, sig: bytes) -> bool:
        return len(sig) == 64 and self._verify(bytes(data), sig)

    def public_hex(self) -> str:
        return self._raw.hex()

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self.public_hex() + "\n").encode(), mode=0o644)

    @classmethod
    def load(cls, path: Path) -> Ed25519Verifier:
        return cls.from_bytes(_read_hex(path, 32))


def _ed25519_backend(raw: bytes) -> Callable[[bytes, bytes], bool]:
    """A verify(data, sig) function for public key ``raw`` from the lightest available library."""
    try:
        from nacl.exceptions import BadSignatureError, CryptoError
        from nacl.signing import VerifyKey
    except ImportError:
        pass
    else:
        try:
            nacl_key = VerifyKey(raw)
        except (CryptoError, ValueError, TypeError):
            raise ConfigError("not a valid Ed25519 public key") from None

        def nacl_verify(data: bytes, sig: bytes) -> bool:
            try:
                nacl_key.verify(data, sig)
            except (BadSignatureError, CryptoError, ValueError):
                return False
            return True

        return nacl_verify

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        crypto_key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError("not a valid Ed25519 public key") from None

    def crypto_verify(data: bytes, sig: bytes) -> bool:
        try:
            crypto_key.verify(sig, data)
        except InvalidSignature:
            return False
        return True

    return crypto_verify


class HmacKey:
    """A per-device secret shared by the device and the aggregator; signs and verifies."""

    alg = HMAC_SHA256

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("an HMAC key must be at least 16 bytes")
        self._key = key

    @classmethod
    def generate(cls) -> HmacKey:
        return cls(secrets.token_bytes(HMAC_KEY_BYTES))

    def sign(self, data: Buffer) -> bytes:
        return hmac.digest(self._key, data, hashlib.sha256)

    def verify(self, data: Buffer, sig: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, data, hashlib.sha256), sig)

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self._key.hex() + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> HmacKey:
        return cls(_read_hex(path, None, secret=True))


def load_update_signer(alg: str, path: Path) -> Signer:
    """The device's update signer, by algorithm name from its config."""
    if alg == HMAC_SHA256:
        return HmacKey.load(path)
    if alg == ED25519:
        return Ed25519Signer.load(path)
    raise ConfigError(f"unknown update authentication {alg!r}; use one of {ALGORITHMS}")


def load_device_verifier(path: Path) -> Verifier:
    """An enrolled device's verifier: ``<id>.hmac`` (shared secret) or ``<id>.pub`` (Ed25519)."""
    if path.suffix == ".hmac":
        return HmacKey.load(path)
    if path.suffix == ".pub":
        return Ed25519Verifier.load(path)
    raise ConfigError(f"{path}: device keys end in .hmac or .pub")


def _read_secret(path: Path) -> bytes:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key {path}: {e.strerror}") from None
    if st.st_mode & 0o077 and os.name == "posix":
        raise ConfigError(
            f"key {path} is readable by group/others (mode {st.st_mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    return data


def _read_hex(path: Path, length: int | None, *, secret: bool = False) -> bytes:
    data = _read_secret(path) if secret else _read_plain(path)
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: expected a key in hex") from None
    if length is not None and len(raw) != length:
        raise ConfigError(f"{path}: expected {length} bytes of key, found {len(raw)}")
    return raw


def _read_plain(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key {path}: {e.strerror}") from None
