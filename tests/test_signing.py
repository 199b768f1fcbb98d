"""Key generation, storage with 0600 permissions, and loading errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.signing import (
    ChaChaPolyKey,
    Ed25519Signer,
    Ed25519Verifier,
    HmacKey,
    load_device_verifier,
    load_update_signer,
)
from fedmqtt.signing import _chacha_tagger as chacha_tagger


def test_ed25519_save_load(tmp_path: Path) -> None:
    s = Ed25519Signer.generate()
    s.save(tmp_path / "agg.key")
    s.verifier().save(tmp_path / "agg.pub")
    assert os.stat(tmp_path / "agg.key").st_mode & 0o777 == 0o600
    s2 = Ed25519Signer.load(tmp_path / "agg.key")
    v = Ed25519Verifier.load(tmp_path / "agg.pub")
    assert v.verify(b"m", s2.sign(b"m"))
    assert not v.verify(b"n", s2.sign(b"m"))


@pytest.mark.parametrize(
    ("key_type", "alg", "suffix"),
    [(HmacKey, "hmac-sha256", ".hmac"), (ChaChaPolyKey, "chacha20-poly1305", ".chacha")],
)
def test_shared_secret_save_load_and_device_lookup(
    tmp_path: Path, key_type: type[HmacKey] | type[ChaChaPolyKey], alg: str, suffix: str
) -> None:
    key_type.generate().save(tmp_path / f"dev1{suffix}")
    assert os.stat(tmp_path / f"dev1{suffix}").st_mode & 0o777 == 0o600
    signer = load_update_signer(alg, tmp_path / f"dev1{suffix}")
    verifier = load_device_verifier(tmp_path / f"dev1{suffix}")
    assert signer.alg == verifier.alg == alg
    body = os.urandom(100_000)
    sig = signer.sign(body)
    assert verifier.verify(body, sig)
    assert verifier.verify(memoryview(b"xx" + body)[2:], sig)  # the body as the wire hands it
    assert not verifier.verify(body[:-1], sig)


def test_world_readable_secret_refused(tmp_path: Path) -> None:
    k = HmacKey.generate()
    k.save(tmp_path / "dev.hmac")
    os.chmod(tmp_path / "dev.hmac", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        HmacKey.load(tmp_path / "dev.hmac")


def test_bad_key_files(tmp_path: Path) -> None:
    (tmp_path / "x.pub").write_text("zz")
    with pytest.raises(ConfigError):
        Ed25519Verifier.load(tmp_path / "x.pub")
    with pytest.raises(ConfigError):
        load_device_verifier(tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        HmacKey.load(tmp_path / "missing.hmac")


@pytest.mark.parametrize("backend", ["pynacl", "cryptography"])
def test_both_ed25519_backends_agree(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    if backend == "cryptography":  # hide PyNaCl: the verifier must fall back
        monkeypatch.setitem(sys.modules, "nacl.signing", None)
        monkeypatch.setitem(sys.modules, "nacl.exceptions", None)
    s = Ed25519Signer.generate()
    v = Ed25519Verifier.from_bytes(s.public_bytes())
    sig = s.sign(b"payload")
    assert v.verify(b"payload", sig)
    assert v.verify(memoryview(b"xpayload")[1:], sig)
    assert not v.verify(b"payloaD", sig)
    assert not v.verify(b"payload", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not v.verify(b"payload", sig[:10])


def test_chacha_poly_mac_is_a_fresh_nonce_and_a_tag() -> None:
    k = ChaChaPolyKey.generate()
    sig = k.sign(b"body")
    assert len(sig) == 28  # 12-byte nonce + 16-byte tag
    assert k.sign(b"body")[:12] != sig[:12]  # a fresh nonce per message


@pytest.mark.parametrize("where", ["body", "nonce", "tag", "short", "long", "key"])
def test_chacha_poly_mac_refuses_any_change(where: str) -> None:
    k = ChaChaPolyKey.generate()
    body = bytearray(os.urandom(3000))
    sig = bytearray(k.sign(bytes(body)))
    verifier = k
    if where == "body":
        body[1234] ^= 1
    elif where == "nonce":
        sig[3] ^= 0x80
    elif where == "tag":
        sig[-1] ^= 1
    elif where == "short":
        sig = sig[:-1]
    elif where == "long":
        sig += b"\0"
    else:
        verifier = ChaChaPolyKey.generate()
    assert not verifier.verify(bytes(body), bytes(sig))


def test_chacha_poly_backends_compute_the_same_rfc8439_tag() -> None:
    """PyNaCl (libsodium, on devices) and cryptography (OpenSSL, on the aggregator) are two
    independent implementations of RFC 8439; a device's tag must verify at the aggregator.
    Both libraries are dependencies (agent and aggregator extras), so both are called directly
    here as well: the test cannot pass by one backend standing in for the other."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt as nacl_seal

    key, nonce = os.urandom(32), os.urandom(12)
    device_tag = chacha_tagger(key, prefer_nacl=True)
    aggregator_tag = chacha_tagger(key, prefer_nacl=False)
    for n in (0, 1, 63, 64, 65, 100_000):
        data = os.urandom(n)
        by_nacl = nacl_seal(b"", data, nonce, key)
        assert len(by_nacl) == 16
        assert by_nacl == ChaCha20Poly1305(key).encrypt(nonce, b"", data)
        assert device_tag(nonce, data) == by_nacl == aggregator_tag(nonce, data)


def test_chacha_poly_key_file_must_hold_32_bytes(tmp_path: Path) -> None:
    (tmp_path / "d.chacha").write_text("00" * 16 + "\n")
    os.chmod(tmp_path / "d.chacha", 0o600)
    with pytest.raises(ConfigError, match="32 bytes"):
        load_device_verifier(tmp_path / "d.chacha")


def test_chacha_poly_signer_without_a_backend_fails_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    ChaChaPolyKey.generate().save(tmp_path / "k")
    monkeypatch.setitem(sys.modules, "nacl.bindings", None)  # None: importing it fails
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(ConfigError, match="pip install pynacl"):
        load_update_signer("chacha20-poly1305", tmp_path / "k")
