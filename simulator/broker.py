"""Start and stop a local Mosquitto with the project's own broker configuration (a harness).

Used by the tests, the simulator and the demo, so that all three run against a real broker
configured exactly as documented in ``broker_config/``. No pure-Python broker can stand in:
the ones on PyPI lack MQTT 5 or QoS 1, or leak retained messages.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from fedmqtt.brokerfiles import config_dir
from fedmqtt.errors import FedMQTTError

INSTALL_HINT = "apt-get install -y mosquitto   (Debian/Ubuntu/Raspberry Pi OS; run as root)"
DEFAULT_MAX_PACKET_SIZE = 16 * 1024 * 1024
# glibc malloc tunables for the broker process, the same line that the production drop-in
# systemd/mosquitto.service.d/fedmqtt.conf sets (tests/test_systemd_units.py keeps the two
# equal). ``hugetlb=1`` asks for transparent huge pages on malloc's heap. Every update the
# broker queues for a subscriber that is behind is fresh memory: with 4 KiB pages, a 100 KB
# update costs 25 page faults, each with its kernel bookkeeping. With huge pages that is one
# fault per 2 MiB. Measured with bench/aggregator_throughput.py --broker-malloc-compare
# (docs/benchmarks.md). A kernel with transparent huge pages off, or a glibc older than 2.35,
# ignores the setting. The memory cost is the heap rounded up to 2 MiB.
MALLOC_TUNABLES: Final = "glibc.malloc.hugetlb=1"


class BrokerError(FedMQTTError):
    """Mosquitto is missing or did not start."""


def broker_environ(tunables: str = MALLOC_TUNABLES) -> dict[str, str]:
    """This process's environment plus ``GLIBC_TUNABLES=tunables`` for a broker process.

    A ``GLIBC_TUNABLES`` already in the environment wins: whoever set it meant it. An empty
    ``tunables`` leaves glibc at its defaults.
    """
    env = dict(os.environ)
    if tunables:
        env.setdefault("GLIBC_TUNABLES", tunables)
    return env


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a BrokerError that says how to install it."""
    candidates = (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(f"Mosquitto is not installed. Install it with: {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def raise_nofile(pid: int) -> int:
    """Raise process ``pid``'s open-file limit (RLIMIT_NOFILE) to this process's hard limit and
    return it. Mosquitto needs one descriptor per client; a broker started with the usual soft
    limit of 1,024 refuses connections beyond about a thousand devices. Called right after
    the broker is spawned, before it has read its configuration or accepted anyone."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(OSError, ValueError):  # e.g. a process that already exited
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Mosquitto:
    """A Mosquitto process on 127.0.0.1 with a config rendered from ``broker_config/``.

    ``stop()``/``kill()`` and ``start()`` keep the same port and data directory, so tests can take
    the broker away under running clients and bring it back. The process runs with the
    production drop-in's malloc settings (:data:`MALLOC_TUNABLES`; ``malloc_tunables=""`` for
    glibc's defaults) and its open-file limit raised to the hard limit (:func:`raise_nofile`).
    """

    def __init__(
        self,
        *,
        template: str = "mosquitto-dev.conf",
        port: int | None = None,
        data_dir: Path | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        extra: dict[str, str] | None = None,
        malloc_tunables: str = MALLOC_TUNABLES,
        rendered: Path | None = None,
    ) -> None:
        """``rendered``: run this finished config file as it is (e.g. an edge broker's, from
        ``fedmqtt-admin edge-config``) instead of rendering ``template``; ``port`` must then be
        its listener's, and its log should go to ``data_dir/mosquitto.log``."""
        self.binary = find_mosquitto()
        self.malloc_tunables = malloc_tunables
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedmqtt-broker-")
            data_dir = Path(self._tmp.name)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        values = {
            "port": str(self.port),
            "data_dir": str(self.data_dir),
            "user": getpass.getuser(),
            "max_packet_size": str(max_packet_size),
            "local_listener": "",  # the production template's optional loopback listener
            **(extra or {}),
        }
        self.config_path = self.data_dir / "mosquitto.conf"
        if rendered is not None:
            self.config_path = rendered
        else:
            text = (config_dir() / template).read_text()
            self.config_path.write_text(text.format(**values))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=broker_environ(self.malloc_tunables),
        )
        raise_nofile(self.proc.pid)
        if not wait_for_port(self.host, self.port, timeout):
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            self.kill()
            log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise BrokerError(
                f"mosquitto did not start on port {self.port}: {err.decode(errors='replace')}{log}"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto saves its persistence database."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL): whatever was only in the broker's memory is gone."""
        self._signal(signal.SIGKILL, 10.0)

    def reload(self) -> None:
        """SIGHUP: re-read password and ACL files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def _signal(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
