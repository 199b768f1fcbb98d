"""Footprint of the edge agent: peak RSS and CPU seconds per round, next to bare numpy.

Runs, in one go and on this machine:

* ``python -c "import numpy"``: the floor any numpy-based agent pays;
* ``python -c "import numpy, msgpack, paho.mqtt.client"`` and the same plus PyNaCl: the agent's
  dependencies alone (no agent code, no data); and, for comparison, plus numpy.random and
  cryptography's Ed25519, which the agent deliberately avoids (fedmqtt/rand.py, signing.py);
* ``edge-agent run`` (``python -m edge_agent run``) training softmax regression on a
  digits-sized shard (scikit-learn's digits: 1797 samples x 64 features, 10 classes), against a
  local Mosquitto, for ``--rounds`` rounds: this script plays the aggregator (publishes a signed
  model version, waits for the update, applies it, publishes the next version);
* the same agent started and stopped with no model (zero rounds), to separate start-up cost
  from the per-round cost.
* the same agent with federated evaluation on (``[evaluation] fraction``, ``--eval-fraction``,
  default 0.2): it also evaluates every version on its validation split and publishes the report.

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the kernel's VmHWM at exit), measured
per process; CPU is user + system seconds of the child. CPU per round = (CPU with N rounds -
CPU with zero rounds) / N, i.e. training, encoding, signing, the outbox write and MQTT.

    .venv/bin/python bench/agent_footprint.py [--rounds 20] [--json out.json]
        [--personalise head|finetune]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedmqtt import topics, wire  # noqa: E402
from fedmqtt.codecs import decode_params  # noqa: E402
from fedmqtt.models.dense import init_params  # noqa: E402
from fedmqtt.models.spec import ModelSpec  # noqa: E402
from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer  # noqa: E402
from simulator.broker import Mosquitto  # noqa: E402

FED = "bench"
DEVICE = "bench-dev"


# A minimal launcher measures each child. The kernel's per-process peak (ru_maxrss) also
# counts the memory of the process that forked it (up to exec): spawned directly from this
# script, which has numpy and friends loaded, every child would "peak" at this script's size.
# The launcher (python -S, nothing imported) is far smaller than any measured process.
_LAUNCHER = """
import os, sys
null = os.open(os.devnull, os.O_WRONLY)
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
print(pid, flush=True)
_, status, ru = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), ru.ru_maxrss, ru.ru_utime + ru.ru_stime, flush=True)
"""


def measure(
    cmd: list[str], env: dict[str, str] | None = None, during: Any = None
) -> dict[str, float]:
    """Run ``cmd`` through the launcher; ``during(pid)`` may interact and must make it exit."""
    launcher = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, *cmd],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    t0 = time.monotonic()
    if during is not None:
        during(pid)
    out, err = launcher.communicate(timeout=120)
    code, maxrss_kib, cpu = out.decode().split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd} exited {code}: {err.decode()[-2000:]}")
    return {
        "peak_rss_mib": int(maxrss_kib) / 1024,
        "cpu_s": float(cpu),
        "wall_s": time.monotonic() - t0,
    }


def digits() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target.astype(np.int64), "sklearn digits"
    except ImportError:  # same shape, synthetic
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, 1797)
        centers = rng.uniform(0, 16, (10, 64))
        X = np.clip(centers[y] + rng.normal(0, 3, (1797, 64)), 0, 16).astype(np.float32)
        return X, y, "synthetic digits-shaped"


class Aggregator:
    """Publishes signed model versions and applies each update it receives."""

    def __init__(
        self, broker: Mosquitto, signer: Ed25519Signer, key: ChaChaPolyKey, spec: ModelSpec
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.signer, self.key, self.spec = signer, key, spec
        self.layout = spec.layout()
        self.flat = self.layout.flatten(init_params(spec, np.random.default_rng(0)))
        self.version = 0
        self.updates: list[wire.Update] = []
        self.cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-agg", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.updates_filter(FED), qos=1)
        self.client.loop_start()
        plan = wire.Plan(FED, "agg", 1, epochs=1, lr=0.1, batch_size=32, codec="int8")
        self.client.publish(
            topics.plan(FED), wire.encode(plan, signer), qos=1, retain=True
        ).wait_for_publish(5)
        self.client.publish(
            topics.spec(FED), wire.encode(wire.SpecMessage(FED, "agg", spec), signer), 1, True
        ).wait_for_publish(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        u = wire.decode(bytes(msg.payload), wire.Update, self.key)
        with self.cond:
            self.flat += decode_params(u.delta, self.layout)
            self.updates.append(u)
            self.cond.notify_all()

    def publish_next(self) -> None:
        self.version += 1
        m = wire.GlobalModel(FED, "agg", self.version, self.spec, self.layout.unflatten(self.flat))
        self.client.publish(
            topics.model(FED), wire.encode(m, self.signer), qos=1, retain=True
        ).wait_for_publish(5)
        ann = wire.Announce(FED, "agg", self.version, self.spec.fingerprint())
        self.client.publish(
            topics.announce(FED), wire.encode(ann, self.signer), qos=1, retain=True
        ).wait_for_publish(5)

    def wait(self, n: int, timeout: float = 60) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.updates) >= n, timeout):
                raise RuntimeError(f"only {len(self.updates)} of {n} updates arrived")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_device(
    root: Path,
    broker: Mosquitto,
    signer: Ed25519Signer,
    X: np.ndarray,
    y: np.ndarray,
    *,
    personalise: str | None = None,
    eval_fraction: float = 0.0,
) -> tuple[Path, ChaChaPolyKey]:
    signer.verifier().save(root / "aggregator.pub")
    key = ChaChaPolyKey.generate()
    key.save(root / "device.key")
    (root / "data").mkdir()
    np.savez(root / "data" / "shard.npz", X=X, y=y)
    cfg = root / "agent.toml"
    cfg.write_text(
        f'[device]\nid = "{DEVICE}"\nfederation = "{FED}"\nstate_dir = "state"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[security]\naggregator_public_key = "aggregator.pub"\nupdate_key = "device.key"\n'
        f'[data]\nsource = "npz"\npath = "data"\n'
        f'[logging]\nlevel = "WARNING"\n'
        + (f'[personalise]\nmode = "{personalise}"\n' if personalise else "")
        + (f"[evaluation]\nfraction = {eval_fraction}\n" if eval_fraction > 0 else "")
    )
    return cfg, key


def run_agent(
    broker: Mosquitto,
    X: np.ndarray,
    y: np.ndarray,
    spec: ModelSpec,
    *,
    rounds: int,
    env: dict[str, str],
    personalise: str | None = None,
    eval_fraction: float = 0.0,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-") as tmp:
        root = Path(tmp)
        signer = Ed25519Signer.generate()
        cfg, key = write_device(
            root, broker, signer, X, y, personalise=personalise, eval_fraction=eval_fraction
        )
        agg = Aggregator(broker, signer, key, spec)

        def drive(pid: int) -> None:
            deadline = time.monotonic() + 30
            # wait until the agent is up (its outbox exists once it opened its state)
            while not (root / "state" / "outbox").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
            for n in range(1, rounds + 1):
                agg.publish_next()
                agg.wait(n)
            time.sleep(0.3)
            os.kill(pid, signal.SIGTERM)

        try:
            result = measure(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                env=env,
                during=drive,
            )
        finally:
            agg.close()
            # the aggregator's retained messages must not leak into the next measurement
            for t in (topics.model(FED), topics.plan(FED), topics.spec(FED), topics.announce(FED)):
                _clear_retained(broker, t)
        if agg.updates:
            result["train_cpu_s_median"] = float(
                np.median([u.metrics["train_cpu_s"] for u in agg.updates])
            )
            result["update_bytes"] = float(len(wire.encode(agg.updates[-1], key)))
        return result


def _clear_retained(broker: Mosquitto, topic: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import msgpack
    import nacl
    import paho.mqtt

    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "paho-mqtt": paho.mqtt.__version__,
        "pynacl": nacl.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--personalise",
        default=None,
        metavar="MODE",
        help="also measure the agent with [personalise] mode = MODE (head or finetune)",
    )
    ap.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="[evaluation] fraction of the extra run with federated evaluation (0: no such run)",
    )
    args = ap.parse_args()
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "OPENBLAS_NUM_THREADS")
    }
    X, y, source = digits()
    spec = ModelSpec("softmax", 64, 10, feature_scale=(1 / 16,) * 64)
    paho = "import numpy, msgpack, paho.mqtt.client"
    deps = f"{paho}, nacl.signing"
    # What the agent avoids (fedmqtt/rand.py, fedmqtt/signing.py), measured for comparison.
    avoided = (
        f"{paho}, numpy.random; "
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey"
    )
    results: dict[str, dict[str, float]] = {}
    with Mosquitto() as broker:
        results["bare numpy"] = measure([sys.executable, "-c", "import numpy"], env=base_env)
        results["numpy + msgpack + paho-mqtt"] = measure([sys.executable, "-c", paho], env=base_env)
        results["agent deps only (+ PyNaCl)"] = measure([sys.executable, "-c", deps], env=base_env)
        results["deps with numpy.random + cryptography instead (not used)"] = measure(
            [sys.executable, "-c", avoided], env=base_env
        )
        results["agent, 0 rounds"] = run_agent(broker, X, y, spec, rounds=0, env=base_env)
        results[f"agent, {args.rounds} rounds"] = run_agent(
            broker, X, y, spec, rounds=args.rounds, env=base_env
        )
        one = {**base_env, "OPENBLAS_NUM_THREADS": "1"}
        results[f"agent, {args.rounds} rounds, OPENBLAS_NUM_THREADS=1"] = run_agent(
            broker, X, y, spec, rounds=args.rounds, env=one
        )
        if args.personalise:
            for label, env in (("", base_env), (", OPENBLAS_NUM_THREADS=1", one)):
                name = f"agent, {args.rounds} rounds, personalise {args.personalise}{label}"
                results[name] = run_agent(
                    broker, X, y, spec, rounds=args.rounds, env=env, personalise=args.personalise
                )
        if args.eval_fraction > 0:
            results[f"agent, {args.rounds} rounds, [evaluation] fraction {args.eval_fraction}"] = (
                run_agent(
                    broker,
                    X,
                    y,
                    spec,
                    rounds=args.rounds,
                    env=base_env,
                    eval_fraction=args.eval_fraction,
                )
            )
    bare = results["bare numpy"]["peak_rss_mib"]
    idle_cpu = results["agent, 0 rounds"]["cpu_s"]
    print(f"machine: {json.dumps(machine())}")
    print(
        f"data: {source}, shard {X.shape[0]} x {X.shape[1]}, softmax regression, "
        f"1 epoch, batch 32, int8 codec, {args.rounds} rounds"
    )
    print()
    print("| process | peak RSS (MiB) | x bare numpy | CPU s total | CPU s / round |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        per_round = ""
        if name.startswith("agent,") and name != "agent, 0 rounds":
            per_round = f"{(r['cpu_s'] - idle_cpu) / args.rounds:.4f}"
        print(
            f"| {name} | {r['peak_rss_mib']:.1f} | {r['peak_rss_mib'] / bare:.2f} | "
            f"{r['cpu_s']:.2f} | {per_round} |"
        )
    key = f"agent, {args.rounds} rounds"
    print()
    print(
        f"training CPU per round (median, measured in the agent's worker thread): "
        f"{results[key].get('train_cpu_s_median', float('nan')):.4f} s; "
        f"update size {results[key].get('update_bytes', 0):.0f} bytes"
    )
    ratio = results[key]["peak_rss_mib"] / bare
    print(
        f"goal peak RSS <= 1.5 x bare numpy: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
