"""The aggregator's fast path and the paho/aiomqtt internals it relies on.

:mod:`aggregator.paho_internals` is the only module allowed to use private attributes of paho
and aiomqtt. These tests fail -- loudly, not by measuring a slower path -- if the installed
(pinned) releases no longer have what it uses, and if any other module starts using them.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator import paho_internals
from aggregator.config import BrokerConfig
from aggregator.mqtt import MqttLink
from aggregator.paho_internals import FastPath, MissingInternalsError, missing, require
from aggregator.readahead import ReadAhead

ROOT = Path(__file__).resolve().parent.parent


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("package", ["paho-mqtt", "aiomqtt"])
def test_installed_release_is_within_the_pins(package: str) -> None:
    """What the other tests here check is the release pyproject.toml pins."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (spec,) = {
        s
        for s in pyproject["project"]["optional-dependencies"]["aggregator"]
        if s.startswith(package)
    }
    lower, upper = re.fullmatch(rf"{package}>=([\d.]+),<([\d.]+)", spec).groups()  # type: ignore[union-attr]
    assert _release(lower) <= _release(version(package)) < _release(upper)


def test_the_pinned_paho_has_every_internal_the_fast_path_uses() -> None:
    assert missing() == []
    require()


def test_aiomqtt_drives_a_paho_client_the_fast_path_takes_over() -> None:
    async def main() -> None:
        client = aiomqtt.Client("127.0.0.1", 1, protocol=aiomqtt.ProtocolVersion.V5)
        fast = FastPath(client, lambda *m: None, name="t")
        assert isinstance(fast.paho, paho.Client)
        assert "_handle_publish" in vars(fast.paho)  # replaced on this client only
        assert "_handle_publish" not in vars(paho.Client(CallbackAPIVersion.VERSION2))

    asyncio.run(main())


def _packet(header: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([header, len(body)]) + body


def _publish(topic: bytes, mid: int, payload: bytes) -> bytes:
    # QoS 1, MQTT 5: topic, packet id, empty properties, payload
    return _packet(
        0x32, struct.pack("!H", len(topic)) + topic + struct.pack("!HB", mid, 0) + payload
    )


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        a.settimeout(5)
        yield a, b


def test_fast_path_reads_and_acknowledges_through_a_real_paho_client(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The behaviour the fast path relies on, on a real paho client: once the socket is
    adopted, paho's own read goes through the read-ahead buffer and hands a PUBLISH to the
    replaced handler; the framed reader takes one past paho and advances paho's keepalive
    clock; a batch of PUBACKs reaches the socket as the exact bytes of MQTT 5 PUBACKs."""
    a, b = pair
    pc = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pc.manual_ack_set(True)
    got: list[tuple[str, bytes, int, int]] = []
    fast = FastPath(SimpleNamespace(_client=pc), lambda *m: got.append(m), name="t")  # type: ignore[arg-type]
    sock = fast.adopt_socket(b)
    assert isinstance(sock, ReadAhead) and pc.socket() is sock

    a.sendall(_publish(b"fl/x/updates/d", 7, b"one"))
    assert pc.loop_read() == paho.MQTT_ERR_SUCCESS  # paho's read, our handler
    assert got == [("fl/x/updates/d", b"one", 7, 1)]

    pc._last_bytes_received = 0.0
    a.sendall(_publish(b"fl/x/updates/e", 8, b"two"))
    assert fast.packet_reader(sock)() == paho.MQTT_ERR_SUCCESS
    assert got[1] == ("fl/x/updates/e", b"two", 8, 1)
    assert pc._last_bytes_received > 0

    fast.ack_qos1([7, 8, 0x1234])
    want = b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in (7, 8, 0x1234))
    assert a.recv(100) == want


@pytest.mark.parametrize("name", ["_handle_publish", "_packet_read", "_sock_recv", "_packet_queue"])
def test_a_paho_without_a_method_the_fast_path_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delattr(paho.Client, name)
    assert any(name in m for m in missing())
    with pytest.raises(MissingInternalsError, match=name):
        require()


def test_a_changed_signature_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def packet_queue(self: paho.Client, packet: bytes) -> None: ...

    monkeypatch.setattr(paho.Client, "_packet_queue", packet_queue)
    with pytest.raises(MissingInternalsError, match="_packet_queue"):
        require()


@pytest.mark.parametrize("name", ["_sock", "_in_packet", "_msgtime_mutex", "_last_bytes_received"])
def test_a_paho_client_without_the_state_the_fast_path_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    init = paho.Client.__init__
    made: list[paho.Client] = []
    intact = paho.Client(CallbackAPIVersion.VERSION2)

    def without(self: paho.Client, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        delattr(self, name)
        made.append(self)

    monkeypatch.setattr(paho.Client, "__init__", without)
    with pytest.raises(MissingInternalsError, match=name):
        require()
    for c in made:
        setattr(c, name, getattr(intact, name))  # what paho's __del__ needs


def test_the_link_stops_when_aiomqtt_hides_its_paho_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No fallback: the link's run() ends with the error instead of running without the
    fast path (or without manual acknowledgements)."""
    init = aiomqtt.Client.__init__

    def renamed(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._paho_client = self.__dict__.pop("_client")

    monkeypatch.setattr(aiomqtt.Client, "__init__", renamed)
    cfg = BrokerConfig(host="127.0.0.1", port=1, client_id="t")
    link = MqttLink(cfg, subscriptions=["fl/x/updates/+"], receive_maximum=10)

    async def main() -> None:
        await asyncio.wait_for(link.run(asyncio.Event()), 10)

    with pytest.raises(MissingInternalsError, match="_client"):
        asyncio.run(main())


# Private names of paho's and aiomqtt's objects that only aggregator/paho_internals.py may use.
INTERNALS = (
    "_client|_handle_publish|_packet_queue|_packet_read|_sock_recv|_in_packet|_sock"
    "|_msgtime_mutex|_last_bytes_received|_out_packet|_out_messages|_in_messages"
)
# obj.<name> where obj is not the module's own ``self``, or the name as a string (getattr).
USE = re.compile(rf"""(?<!\bself)\.({INTERNALS})\b|["']({INTERNALS})["']""")
SCANNED = ("fedmqtt", "edge_agent", "aggregator", "simulator", "bench", "scripts")


def test_no_other_module_touches_library_internals() -> None:
    allowed = ROOT / "aggregator" / "paho_internals.py"
    uses: list[str] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if USE.search(line.split("#", 1)[0]):
                    uses.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert uses == [], "only aggregator/paho_internals.py may use these:\n" + "\n".join(uses)
    assert USE.search(allowed.read_text())  # the pattern does find what it looks for
    assert paho_internals.__file__ == str(allowed)
