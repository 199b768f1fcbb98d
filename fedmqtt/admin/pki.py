"""A small private CA for the broker's TLS listener and, optionally, device client certificates.

Why a private CA rather than a public one: devices pin exactly this CA (``ca.crt`` in their
bundle), so no other certificate authority in the world can impersonate the broker to them, and in
the certificate-identity variant every client certificate Mosquitto accepts was issued here for a
device id. Keys are EC P-256 (small and fast on a Raspberry Pi, supported by every OpenSSL that
Mosquitto and Python link against).

Validity: CA 10 years, broker and device certificates 825 days (long enough not to surprise an
operator, short enough that a forgotten credential dies). The CRL is valid until the CA expires:
OpenSSL refuses *every* client once the CRL's nextUpdate has passed, and this CRL is read only by
the broker from a local file, so freshness is guaranteed by ``revoke`` rewriting it, not by expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

CA_DAYS: Final = 3650
LEAF_DAYS: Final = 825
CA_KEY: Final = "ca.key"
CA_CERT: Final = "ca.crt"
CRL: Final = "crl.pem"
_BACKDATE: Final = dt.timedelta(minutes=5)  # tolerate small clock skew between hosts


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _name(common_name: str, org: str = "fedmqtt") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _serial() -> int:
    # 159 random bits: positive, at most 20 bytes (RFC 5280), unpredictable.
    return secrets.randbits(159) | 1


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "fedmqtt CA", days: int = CA_DAYS) -> CA:
        key = new_key()
        name = _name(common_name)
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def save(self, directory: Path) -> None:
        atomic_write_bytes(directory / CA_KEY, key_pem(self.key), mode=0o600)
        atomic_write_bytes(directory / CA_CERT, cert_pem(self.cert), mode=0o644)

    @classmethod
    def load(cls, directory: Path) -> CA:
        key_path, cert_path = directory / CA_KEY, directory / CA_CERT
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"no CA in {directory}; create one with: fedmqtt-admin --dir {directory} ca init"
            ) from None
        except ValueError as e:
            raise ConfigError(f"{directory}: cannot load the CA ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: not an EC private key")
        return cls(key, cert)

    def _leaf(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        usage: x509.ObjectIdentifier,
        days: int,
        san: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(
        self, hosts: list[str], ips: list[str], days: int = LEAF_DAYS
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The broker's certificate; clients check the host they dial against its SAN."""
        if not hosts and not ips:
            raise ConfigError("the broker certificate needs at least one host name or IP address")
        san: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        try:
            san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        key = new_key()
        cn = hosts[0] if hosts else ips[0]
        return key, self._leaf(cn, key, ExtendedKeyUsageOID.SERVER_AUTH, days, san)

    def issue_client(
        self, common_name: str, days: int = LEAF_DAYS
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A client certificate; with ``use_identity_as_username`` its CN is the MQTT username."""
        key = new_key()
        return key, self._leaf(common_name, key, ExtendedKeyUsageOID.CLIENT_AUTH, days)

    def crl(self, revoked: dict[str, dt.datetime]) -> bytes:
        """A CRL listing ``revoked`` (serial in hex -> revocation time), as PEM."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(max(self.cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(when)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
