"""Key generation, storage with 0600 permissions, and loading errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    HmacKey,
    load_device_verifier,
    load_update_signer,
)


def test_ed25519_save_load(tmp_path: Path) -> None:
    s = Ed25519Signer.generate()
    s.save(tmp_path / "agg.key")
    s.verifier().save(tmp_path / "agg.pub")
    assert os.stat(tmp_path / "agg.key").st_mode & 0o777 == 0o600
    s2 = Ed25519Signer.load(tmp_path / "agg.key")
    v = Ed25519Verifier.load(tmp_path / "agg.pub")
    assert v.verify(b"m", s2.sign(b"m"))
    assert not v.verify(b"n", s2.sign(b"m"))


def test_hmac_save_load_and_device_lookup(tmp_path: Path) -> None:
    k = HmacKey.generate()
    k.save(tmp_path / "dev1.hmac")
    assert os.stat(tmp_path / "dev1.hmac").st_mode & 0o777 == 0o600
    signer = load_update_signer("hmac-sha256", tmp_path / "dev1.hmac")
    verifier = load_device_verifier(tmp_path / "dev1.hmac")
    assert verifier.verify(b"x", signer.sign(b"x"))


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
