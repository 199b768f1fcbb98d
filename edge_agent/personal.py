"""The device's personal model: built after each round, kept in the state directory, never sent.

With ``[personalise] mode`` ``head`` or ``finetune`` (:mod:`fedmqtt.models.personal` explains
both) the agent builds a personal model from every global version it trains on and writes it,
atomically, to ``<state_dir>/personal.bin``: a msgpack map with the device, the federation,
the mode, the global version it was built from, the spec, the parameters and, with
``[personalise] onnx = true``, the ONNX export of the personal model (otherwise ``edge-agent
predict`` exports it when it loads it: importing the onnx package would cost the agent process
about 23 MB). Nothing in it is ever published:
the update of the round is the ordinary delta of the global model, and the agent has no code
path that reads this file into a message.

**The trust rule.** Every global model the predictor runs is verified against the pinned
aggregator key. The personal model is the one exception, and it is signed by nothing, so
:func:`load_trusted` accepts it only when all of these hold:

1. personalisation is on in the agent's config (``[personalise] mode`` is not ``off``);
2. it is the file ``personal.bin`` in the state directory that config names, a regular file
   (not a symbolic link), owned by the user running the predictor and writable by nobody
   else, in a directory that is also that user's and writable by nobody else -- the same
   protection as the device's keys: only the agent's own user can have written it;
3. it names this device and this federation;
4. its spec is one the aggregator signed (a verified ``spec-<fingerprint>.bin`` of the state
   directory): a personal model has the federation's architecture, only its values differ.

A file that fails any check is refused with the reason (an operator must hear about it), never
skipped in silence; a model from anywhere else must be signed by the aggregator as before.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, cast

import msgpack
import numpy as np
import numpy.typing as npt

from edge_agent.state import PERSONAL_FILE
from fedmqtt import wire
from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.fsutil import atomic_write_bytes
from fedmqtt.models.personal import train_head
from fedmqtt.models.spec import ModelSpec
from fedmqtt.models.train import TrainConfig
from fedmqtt.params import Params
from fedmqtt.personalise import KINDS
from fedmqtt.rand import RandomSource

log = logging.getLogger(__name__)

FORMAT: Final = 1


class PersonalModelError(FedMQTTError):
    """The personal model file is malformed or fails the trust rule."""


@dataclass(frozen=True)
class PersonalModel:
    federation: str
    device: str
    mode: str
    version: int  # the global version it was built from
    spec: ModelSpec
    params: Params
    created_at: float
    onnx: bytes | None = None  # its ONNX export, with [personalise] onnx = true


def encode(pm: PersonalModel) -> bytes:
    params = {
        k: {"d": np.asarray(v, "<f4").tobytes()} for k, v in pm.params.items()
    }  # shapes: spec
    body = {
        "format": FORMAT,
        "federation": pm.federation,
        "device": pm.device,
        "mode": pm.mode,
        "version": pm.version,
        "spec": pm.spec.to_wire(),
        "params": params,
        "created_at": pm.created_at,
        "onnx": pm.onnx,
    }
    return cast(bytes, msgpack.packb(body, use_bin_type=True))


def decode(data: bytes, what: str) -> PersonalModel:
    """The personal model in ``data``; PersonalModelError naming ``what`` if malformed."""
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError("not a personal model file of a known format")
        spec = ModelSpec.from_wire(d["spec"])
        shapes = spec.param_shapes()
        raw = d["params"]
        if not isinstance(raw, Mapping) or set(raw) != set(shapes):
            raise ValueError("its tensors do not match its spec")
        params: Params = {}
        for name, shape in shapes.items():
            a = np.frombuffer(raw[name]["d"], dtype="<f4").astype(np.float32)
            params[name] = a.reshape(shape)
        if not all(np.isfinite(v).all() for v in params.values()):
            raise ValueError("it holds NaN or Inf")
        onnx = d.get("onnx")
        return PersonalModel(
            federation=str(d["federation"]),
            device=str(d["device"]),
            mode=str(d["mode"]),
            version=int(d["version"]),
            spec=spec,
            params=params,
            created_at=float(d["created_at"]),
            onnx=bytes(onnx) if isinstance(onnx, bytes) else None,
        )
    except (KeyError, TypeError, ValueError, FedMQTTError, msgpack.UnpackException) as e:
        raise PersonalModelError(f"{what} is not a usable personal model: {e}") from None


def build(
    mode: str,
    model: wire.GlobalModel,
    trained: Params,
    previous: PersonalModel | None,
    data: tuple[npt.NDArray[np.float32], npt.NDArray[np.generic]],
    *,
    train: TrainConfig,
    head_epochs: int,
    device: str,
    rng: RandomSource,
    onnx: bool = False,
) -> PersonalModel | None:
    """The personal model after a round on ``model`` (``trained``: the round's locally trained
    parameters), with its ONNX export if ``onnx`` (needs the onnx package). None if
    ``model``'s kind cannot be personalised. No side effects."""
    spec = model.spec
    if spec.kind not in KINDS:
        return None
    if mode == "finetune":
        params = trained
    else:
        prev = previous.params if previous is not None and previous.spec == spec else None
        cfg = replace(train, epochs=head_epochs, mu=0.0)
        params = train_head(spec, model.params, prev, data[0], data[1], config=cfg, rng=rng)
    created = time.time()
    exported: bytes | None = None
    if onnx:
        from fedmqtt.onnx_export import export_onnx  # the onnx package: [personalise] onnx

        exported = export_onnx(
            spec, params, federation=model.federation, version=model.version, created_at=created
        )
    return PersonalModel(
        model.federation, device, mode, model.version, spec, params, created, exported
    )


class PersonalStore:
    """``<state_dir>/personal.bin``, written atomically (0600)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PERSONAL_FILE

    def load(self, device: str, federation: str) -> PersonalModel | None:
        """The stored personal model of this device, or None (missing, or unusable: logged)."""
        try:
            pm = decode(self.path.read_bytes(), str(self.path))
        except FileNotFoundError:
            return None
        except (OSError, PersonalModelError) as e:
            log.error("%s; building a new personal model from the next global version", e)
            return None
        if (pm.device, pm.federation) != (device, federation):
            log.error("%s belongs to another device or federation; ignoring it", self.path)
            return None
        return pm

    def save(self, pm: PersonalModel) -> int:
        data = encode(pm)
        atomic_write_bytes(self.path, data, mode=0o600)
        return len(data)


def _private(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise PersonalModelError(f"{path}: {what} is not owned by this user")
    if st.st_mode & 0o022:
        raise PersonalModelError(f"{path}: {what} is writable by group or others")


def load_trusted(
    state_dir: Path, device: str, federation: str, signed_specs: Mapping[str, ModelSpec]
) -> PersonalModel | None:
    """The personal model under the trust rule (module docstring): None if there is none yet,
    PersonalModelError if there is one that fails a check."""
    path = Path(state_dir) / PERSONAL_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise PersonalModelError(f"{path}: the personal model must be a regular file")
    _private(path, st, "the personal model")
    _private(Path(state_dir), os.stat(state_dir), "the state directory")
    pm = decode(path.read_bytes(), str(path))
    if pm.device != device or pm.federation != federation:
        raise PersonalModelError(
            f"{path} is the personal model of device {pm.device!r} in federation "
            f"{pm.federation!r}, not of {device!r} in {federation!r}"
        )
    if pm.spec.fingerprint() not in signed_specs:
        raise PersonalModelError(
            f"{path}: its model spec is not one the aggregator signed (no verified "
            f"spec-{pm.spec.fingerprint()}.bin here)"
        )
    return pm


class Personaliser:
    """What the agent does with ``[personalise]``: keep the stored personal model, build the
    next one after each round (in the round's worker thread), store it once the round's update
    is queued. A failure here is logged and never fails the round: the update for the
    federation matters more than the personal copy."""

    def __init__(
        self,
        mode: str,
        head_epochs: int,
        *,
        onnx: bool,
        state_dir: Path,
        device: str,
        federation: str,
    ) -> None:
        if onnx and importlib.util.find_spec("onnx") is None:
            raise ConfigError(
                "[personalise] onnx = true needs the onnx package: pip install 'fedmqtt[onnx]'"
            )
        self.mode, self.head_epochs, self.onnx = mode, head_epochs, onnx
        self.device, self.federation = device, federation
        self.store = PersonalStore(state_dir)
        self.current: PersonalModel | None = None
        self.failures = 0

    def load(self) -> None:
        self.current = self.store.load(self.device, self.federation)

    def build(
        self,
        model: wire.GlobalModel,
        trained: Params,
        data: tuple[npt.NDArray[np.float32], npt.NDArray[np.generic]],
        train: TrainConfig,
        rng: RandomSource,
    ) -> PersonalModel | None:
        try:
            return build(
                self.mode,
                model,
                trained,
                self.current,
                data,
                train=train,
                head_epochs=self.head_epochs,
                device=self.device,
                rng=rng,
                onnx=self.onnx,
            )
        except Exception as e:  # the round's update must not depend on the personal copy
            self.failures += 1
            log.error(
                "%s: cannot build the personal model from v%d: %s",
                self.device,
                model.version,
                e,
                exc_info=not isinstance(e, ValueError | FedMQTTError),
            )
            return None

    def save(self, pm: PersonalModel) -> int:
        """Store ``pm`` atomically; returns the bytes written (0 if it could not be written)."""
        try:
            n = self.store.save(pm)
        except OSError as e:
            self.failures += 1
            log.error("%s: cannot write %s: %s", self.device, self.store.path, e)
            return 0
        self.current = pm
        return n
