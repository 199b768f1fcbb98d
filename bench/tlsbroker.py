"""A loopback TLS listener for a benchmark's Mosquitto, with a certificate from a throw-away CA.

The production broker serves devices over TLS; benchmarks that compare a TLS connection with a
plain one add this listener to the development broker (before it starts) next to its plain one.
"""

from __future__ import annotations

from pathlib import Path

from fedmqtt.admin.pki import CA, cert_pem, key_pem
from simulator.broker import Mosquitto, free_port


def add_tls_listener(broker: Mosquitto, directory: Path) -> tuple[int, Path]:
    """Append a TLS listener on 127.0.0.1 to ``broker``'s config; (its port, the CA file)."""
    ca = CA.create("bench CA")
    key, cert = ca.issue_server([], ["127.0.0.1"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(cert_pem(ca.cert))
    (directory / "server.crt").write_bytes(cert_pem(cert))
    (directory / "server.key").write_bytes(key_pem(key))
    port = free_port()
    with broker.config_path.open("a") as conf:
        conf.write(
            f"\nlistener {port} 127.0.0.1\ncertfile {directory / 'server.crt'}\n"
            f"keyfile {directory / 'server.key'}\n"
        )
    return port, directory / "ca.crt"
