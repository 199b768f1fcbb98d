"""Authentication of messages: Ed25519 for the global model; a device MAC or Ed25519 for updates.

What is authenticated is the *body bytes exactly as sent* (the canonical msgpack encoding of the
message without its signature, see :mod:`fedmqtt.wire`). The verifier therefore never
re-encodes a message to check it, which would cost a copy of every tensor and depend on two
msgpack versions producing identical bytes.

Why three algorithms for updates (measured in ``bench/auth.py`` and
``bench/aggregator_throughput.py``, numbers in docs/benchmarks.md): the aggregator verifies every
update, so per-update cost caps ingestion.

* ``chacha20-poly1305`` (the default for new enrolments): a MAC built from the ChaCha20-Poly1305
  AEAD of RFC 8439 with an empty plaintext and the body as associated data; the "signature" is
  a random 96-bit nonce followed by the 16-byte tag; several times cheaper to verify than
  HMAC-SHA256 for large updates (docs/benchmarks.md, "Update authentication"). A repeated
  nonce under one key would let an observer forge tags, so every message draws a fresh random
  96-bit nonce: after 2**32 messages under one key the chance of any repeat is still about
  2**-33, the bound NIST SP 800-38D accepts for random 96-bit nonces, far beyond what a device
  sends. Replays are refused by the replay check.
  Devices compute it with PyNaCl (libsodium), which they have anyway for model verification.
* ``hmac-sha256``: accepted for devices enrolled with it; standard library only.
* ``ed25519``: for fleets that want the aggregator to hold only public keys (a stolen aggregator
  key store cannot forge device updates), at a fixed extra verification cost per update.

The global model is always Ed25519: one signer, many verifiers that must not be able to forge
it.

Key files: Ed25519 private keys as PKCS#8 PEM, public keys as raw 32 bytes in hex; MAC keys as
32 random bytes in hex. Secrets are written with mode 0600 atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Protocol, Self

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # cryptography is imported lazily: a MAC device never loads it for signing
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ED25519: Final = "ed25519"
HMAC_SHA256: Final = "hmac-sha256"
CHACHA20_POLY1305: Final = "chacha20-poly1305"
ALGORITHMS: Final = (CHACHA20_POLY1305, HMAC_SHA256, ED25519)
DEFAULT_UPDATE_AUTH: Final = CHACHA20_POLY1305
#: The file an enrolled device's update key has in the aggregator's ``devices_dir``, by algorithm.
DEVICE_KEY_SUFFIX: Final = {CHACHA20_POLY1305: ".chacha", HMAC_SHA256: ".hmac", ED25519: ".pub"}
#: Algorithms whose device key is a shared secret of this many random bytes (hex in its file).
SHARED_SECRET_ALGS: Final = (CHACHA20_POLY1305, HMAC_SHA256)
MAC_KEY_BYTES: Final = 32  # shared secrets: ChaCha20-Poly1305 keys, generated HMAC keys
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16


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
    verify, and PyNaCl costs a device several times less memory than cryptography
    (docs/benchmarks.md, "Edge agent footprint").
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


class _SharedSecret:
    """A per-device secret held by the device and the aggregator alike: generated as
    :data:`MAC_KEY_BYTES` random bytes, stored in hex with mode 0600 (:meth:`save`,
    :meth:`load`). Subclasses add ``alg``, ``sign`` and ``verify``."""

    #: Exact key length that :meth:`load` requires; None accepts any (see ``__init__``).
    _LOAD_BYTES: ClassVar[int | None] = MAC_KEY_BYTES

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    @classmethod
    def generate(cls) -> Self:
        return cls(secrets.token_bytes(MAC_KEY_BYTES))

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self._key.hex() + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(_read_hex(path, cls._LOAD_BYTES, secret=True))


class HmacKey(_SharedSecret):
    """HMAC-SHA256 with a per-device secret; signs and verifies."""

    alg = HMAC_SHA256
    _LOAD_BYTES = None  # keys enrolled before 32 bytes became the rule: any length >= 16

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("an HMAC key must be at least 16 bytes")
        super().__init__(key)

    def sign(self, data: Buffer) -> bytes:
        return hmac.digest(self._key, data, hashlib.sha256)

    def verify(self, data: Buffer, sig: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, data, hashlib.sha256), sig)


class ChaChaPolyKey(_SharedSecret):
    """A per-device secret used as a MAC key with ChaCha20-Poly1305 (see the module docstring).

    ``sign`` returns ``nonce (12 bytes) || tag (16 bytes)``; ``verify`` recomputes the tag for
    that nonce and compares in constant time. The tag is the AEAD's output for an empty
    plaintext, so both backends -- PyNaCl on devices, cryptography on the aggregator (four
    times faster here) -- compute the same RFC 8439 function; a test checks they agree.
    """

    alg = CHACHA20_POLY1305

    def __init__(self, key: bytes) -> None:
        if len(key) != MAC_KEY_BYTES:
            raise ConfigError(f"a {CHACHA20_POLY1305} key must be {MAC_KEY_BYTES} bytes")
        super().__init__(key)
        self._sign_tag: Callable[[bytes, Buffer], bytes] | None = None
        self._verify_tag: Callable[[bytes, Buffer], bytes] | None = None

    def sign(self, data: Buffer) -> bytes:
        if self._sign_tag is None:
            self._sign_tag = _chacha_tagger(self._key, prefer_nacl=True)
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._sign_tag(nonce, data)

    def verify(self, data: Buffer, sig: bytes) -> bool:
        if len(sig) != _NONCE_BYTES + _TAG_BYTES:
            return False
        if self._verify_tag is None:
            self._verify_tag = _chacha_tagger(self._key, prefer_nacl=False)
        tag = self._verify_tag(sig[:_NONCE_BYTES], data)
        return hmac.compare_digest(tag, sig[_NONCE_BYTES:])


def _chacha_tagger(key: bytes, *, prefer_nacl: bool) -> Callable[[bytes, Buffer], bytes]:
    """tag(nonce, data): the ChaCha20-Poly1305 tag of an empty plaintext with ``data`` as
    associated data. Devices prefer PyNaCl (light to import, already loaded for the model
    signature); the aggregator prefers cryptography (8.6 vs 31 microseconds per 100 KB)."""

    def nacl() -> Callable[[bytes, Buffer], bytes] | None:
        try:
            from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt as seal
        except ImportError:
            return None
        return lambda nonce, data: bytes(seal(b"", bytes(data), nonce, key))

    def crypto() -> Callable[[bytes, Buffer], bytes] | None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        except ImportError:
            return None
        aead = ChaCha20Poly1305(key)
        return lambda nonce, data: aead.encrypt(nonce, b"", data)

    order = (nacl, crypto) if prefer_nacl else (crypto, nacl)
    for backend in order:
        tagger = backend()
        if tagger is not None:
            return tagger
    raise ConfigError(f"{CHACHA20_POLY1305} needs PyNaCl or cryptography: pip install pynacl")


def load_update_signer(alg: str, path: Path) -> Signer:
    """The device's update signer, by algorithm name from its config."""
    if alg == CHACHA20_POLY1305:
        key = ChaChaPolyKey.load(path)
        key.sign(b"")  # a missing backend (PyNaCl or cryptography) fails here, at start-up
        return key
    if alg == HMAC_SHA256:
        return HmacKey.load(path)
    if alg == ED25519:
        return Ed25519Signer.load(path)
    raise ConfigError(f"unknown update authentication {alg!r}; use one of {ALGORITHMS}")


def load_device_verifier(path: Path) -> Verifier:
    """An enrolled device's verifier, by the suffix of its key file (:data:`DEVICE_KEY_SUFFIX`)."""
    loaders: dict[str, Callable[[Path], Verifier]] = {
        DEVICE_KEY_SUFFIX[CHACHA20_POLY1305]: ChaChaPolyKey.load,
        DEVICE_KEY_SUFFIX[HMAC_SHA256]: HmacKey.load,
        DEVICE_KEY_SUFFIX[ED25519]: Ed25519Verifier.load,
    }
    load = loaders.get(path.suffix)
    if load is None:
        raise ConfigError(f"{path}: device keys end in {', '.join(DEVICE_KEY_SUFFIX.values())}")
    return load(path)


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
