"""A live systemd for the tests: Debian bookworm trees booted with ``systemd-nspawn --boot``.

The machine running the tests has no systemd as PID 1 (a container or CI runner), so the
installers and units are exercised inside containers that do:

* :func:`rootfs` builds a minimal bookworm tree once with ``mmdebstrap``, from the Debian
  mirror(s) and apt settings the host's apt uses (so it works wherever ``apt-get`` works), and
  caches it under ``/var/cache/fedmqtt-live/<hash of suite and packages>``; a lock makes
  concurrent runs build it once.
* :func:`wheelhouse` downloads, on the host, the wheels the installers will need (for the
  container's Python and architecture): the containers have no network, so ``pip`` inside runs
  with ``PIP_NO_INDEX`` from that directory, bind-mounted read-only.
* :class:`Machine` boots the cached tree on a throw-away overlay (each machine its own upper
  directory, a unique name and its own cgroup), with a private network (only loopback: the
  broker's ports cannot clash with the host's) or sharing another machine's network namespace
  (so a server and its devices reach each other on 127.0.0.1 and nothing else does). Commands
  run inside through ``nsenter`` into the container's init -- ``machinectl`` needs a systemd
  bus on the host, which there is not. :meth:`Machine.close` powers it off, kills whatever is
  left in its cgroup, unmounts the overlay and removes every file it made; it is safe to call
  after any failure and more than once.

Facts of this machine class the tests must not depend on: on a cgroup v1 host memory and CPU
limits are accepted but not enforced, and ``LimitNOFILE`` above the host's hard limit is
lowered silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FEDMQTT_LIVE_CACHE", "/var/cache/fedmqtt-live"))
#: Where machines live while they run (overlay upper/work directories, the merged root).
RUNS = Path(os.environ.get("FEDMQTT_LIVE_RUNS", "/var/tmp/fedmqtt-live"))
SUITE = "bookworm"
#: A blank Debian 12 server or device: what both installers expect to find, without network
#: (they would apt-get these themselves). Mosquitto is in the tree so that the server's
#: installer has it; device machines disable it.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "mosquitto",
    "ca-certificates",
    "passwd",
    "procps",
)
#: A device: the same without the broker.
DEVICE_PACKAGES = tuple(p for p in PACKAGES if p != "mosquitto")
#: The container's Python (bookworm's) and architecture, for the wheel downloads.
CONTAINER_PYTHON = "3.11"
TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "unshare", "ip")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: In each machine's directory: the pid of the test process and the machine's cgroups.
OWNER = "owner.json"
#: systemd-nspawn exits with this when the container rebooted.
EXIT_REBOOT = 133


class LiveError(RuntimeError):
    """A machine could not be built, booted or reached."""


def missing_prerequisites() -> list[str]:
    """What this host lacks to boot live machines (empty: everything is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [t for t in TOOLS if not shutil.which(t)]  # scripts/setup installs them
    if "overlay" not in Path("/proc/filesystems").read_text():
        missing.append("overlay file system")
    elif os.geteuid() == 0 and not _overlay_mounts():
        missing.append(f"an overlay mount in {RUNS} (FEDMQTT_LIVE_RUNS: put it on ext4/xfs/tmpfs)")
    if (
        not Path("/sys/fs/cgroup/systemd").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.procs").exists()
    ):
        missing.append("a systemd cgroup hierarchy")
    try:
        apt_sources(SUITE)
    except LiveError as e:
        missing.append(str(e))
    return missing


def _overlay_mounts() -> bool:
    """Whether an overlay with its upper directory in RUNS can be mounted (not, e.g., when
    RUNS is itself on an overlay, as in many container images)."""
    probe = RUNS / f".probe-{os.getpid()}"
    try:
        for d in ("lower", "upper", "work", "merged"):
            (probe / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}"
        merged = str(probe / "merged")
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, merged],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if r.returncode == 0:
            subprocess.run(["umount", merged], check=False, timeout=30)
        return r.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# --------------------------------------------------------------------------- the cached tree


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, cur = [], {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur = {}
        elif not line.startswith("#") and ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            cur[key.strip().lower()] = value.strip()
    return stanzas


def apt_sources(suite: str) -> str:
    """The host's apt sources for ``suite`` and its -updates/-security suites, as deb822.

    Read from ``/etc/apt/sources.list`` and ``sources.list.d/*.list|*.sources`` (only those apt
    reads), so the tree comes from the same mirror, with the same keyring, as the host's apt."""
    etc = Path("/etc/apt")
    found: list[str] = []
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in files:
        if not f.is_file():
            continue
        for raw in f.read_text().splitlines():
            parts = raw.split("#", 1)[0].split()
            if len(parts) < 4 or parts[0] != "deb":
                continue
            opts: dict[str, str] = {}
            if parts[1].startswith("["):
                end = next(i for i, p in enumerate(parts) if p.endswith("]"))
                for o in " ".join(parts[1 : end + 1]).strip("[]").split():
                    k, _, v = o.partition("=")
                    opts[k] = v
                parts = [parts[0], *parts[end + 1 :]]
            uri, dist, comps = parts[1], parts[2], parts[3:]
            if dist in wanted and "main" in comps:
                stanza = f"Types: deb\nURIs: {uri}\nSuites: {dist}\nComponents: main\n"
                if "signed-by" in opts:
                    stanza += f"Signed-By: {opts['signed-by']}\n"
                found.append(stanza)
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for s in _deb822_stanzas(f.read_text()):
            if s.get("enabled", "yes").lower() == "no" or "deb" not in s.get("types", "").split():
                continue
            suites = [x for x in s.get("suites", "").split() if x in wanted]
            if not suites or "main" not in s.get("components", "").split():
                continue
            stanza = (
                f"Types: deb\nURIs: {s['uris']}\nSuites: {' '.join(suites)}\nComponents: main\n"
            )
            if "signed-by" in s:
                stanza += f"Signed-By: {s['signed-by']}\n"
            found.append(stanza)
    if not any(f"Suites: {suite}" in s or f" {suite}\n" in s for s in found):
        raise LiveError(f"no Debian {suite} source in the host's apt sources (/etc/apt)")
    return "\n".join(found)


def _apt_options() -> list[str]:
    """The host's apt settings that decide how the mirror is reached: proxies, CA and
    certificate checks, release-file date checks (``apt-config dump``)."""
    out = subprocess.run(
        ["apt-config", "dump"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    keep = re.compile(r'^Acquire::(https?(::\S+)?|Check-Valid-Until|Check-Date|Retries) "')
    return [line.rstrip(";") for line in out.splitlines() if keep.match(line)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(dest: Path, build: Callable[[Path], None]) -> Path:
    """``dest``, made once by ``build(tmp)`` under a lock and then renamed into place, so that
    concurrent runs build it once and a run that dies half way leaves nothing that looks done."""
    if (dest / ".complete").exists():
        return dest
    with _locked(dest.parent / f".{dest.name}.lock"):
        if (dest / ".complete").exists():
            return dest
        tmp = dest.parent / f".{dest.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            (tmp / ".complete").write_text(f"{time.time()}\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def emulation_missing(machine: str) -> list[str]:
    """What this host lacks to run ``machine`` (e.g. aarch64) binaries: qemu-user-static
    registered with binfmt_misc, with the F flag so that it works inside containers."""
    entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{machine}")
    try:
        text = entry.read_text()
    except OSError:
        return [f"{entry} (apt-get install qemu-user-static binfmt-support)"]
    flags = next((line.split()[1] for line in text.splitlines() if line.startswith("flags:")), "")
    if not text.startswith("enabled") or "F" not in flags:
        return [f"{entry} enabled with flag F (update-binfmts --enable qemu-{machine})"]
    return []


def rootfs(
    packages: Sequence[str] = PACKAGES, arch: str = "", log: Callable[[str], None] = print
) -> Path:
    """The cached bookworm tree with ``packages`` (built on first use, ~265 MB), for the
    host's architecture or Debian architecture ``arch`` (e.g. arm64, run under emulation)."""
    sources = apt_sources(SUITE)

    def build(tmp: Path) -> None:
        src = tmp.with_suffix(".sources")
        src.write_text(sources)
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(packages),
            *([f"--arch={arch}"] if arch else []),
            *(f"--aptopt={o}" for o in _apt_options()),
            SUITE,
            str(tmp),
            str(src),
        ]
        log("building " + shlex.join(cmd))
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
        src.unlink()
        if r.returncode != 0:
            raise LiveError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-4000:]}")
        log(f"built the {SUITE} tree in {time.monotonic() - t0:.0f} s")

    CACHE.mkdir(parents=True, exist_ok=True)
    key = _key(SUITE, sorted(packages), "minbase", *([arch] if arch else []))
    return _cached(CACHE / f"rootfs-{SUITE}{'-' + arch if arch else ''}-{key}", build)


def _requirements(extras: Sequence[str]) -> list[str]:
    """What pip needs to install the checkout with ``extras``: the dependencies, those of each
    extra and of the extras it names in turn (``aggregator`` lists ``fedmqtt[privacy]``), and
    the build backend's."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    optional = project["optional-dependencies"]
    self_ref = re.compile(rf"{re.escape(project['name'])}\[([^\]]+)\]\s*$")
    reqs = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in optional[extra]:
            if m := self_ref.match(r):
                todo += [e.strip() for e in m.group(1).split(",")]
            else:
                reqs.append(r)
    reqs += meta["build-system"]["requires"]
    return [*sorted(set(reqs)), "pip", "wheel"]


def wheelhouse(
    extras: Sequence[str] = ("agent", "aggregator", "onnx"),
    machine: str = "x86_64",
    log: Callable[[str], None] = print,
) -> Path:
    """Wheels of every dependency the installers pip-install (and of pip and the build
    backend), for the container's Python and ``machine``; downloaded once per requirement set."""
    reqs = _requirements(extras)
    # glibc 2.36 in bookworm: any manylinux up to 2_36.
    platforms = [f"manylinux_2_{n}_{machine}" for n in range(36, 16, -1)]
    platforms += [f"manylinux2014_{machine}"]

    def build(tmp: Path) -> None:
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(tmp),
            "--only-binary=:all:", "--python-version", CONTAINER_PYTHON,
            "--implementation", "cp",
            *(a for p in platforms for a in ("--platform", p)),
            *reqs,
        ]  # fmt: skip
        log(f"downloading wheels for {machine}: {' '.join(reqs)}")
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
        if r.returncode != 0:
            raise LiveError(f"pip download failed ({r.returncode}):\n{r.stderr[-4000:]}")

    CACHE.mkdir(parents=True, exist_ok=True)
    return _cached(CACHE / f"wheels-{machine}-{_key(CONTAINER_PYTHON, machine, reqs)}", build)


def checkout_files() -> list[str]:
    """The checkout as a clone would have it, with uncommitted changes: tracked and untracked
    files that git does not ignore."""
    r = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return [p for p in r.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


# --------------------------------------------------------------------------- machines


def _own_cgroups() -> dict[Path, Path]:
    """Hierarchy mount -> this process's cgroup in it, for the hierarchies nspawn uses."""
    out: dict[Path, Path] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            mount = Path("/sys/fs/cgroup/systemd")
        elif controllers == "":
            mount = Path("/sys/fs/cgroup/unified")
            if not (mount / "cgroup.procs").exists():
                mount = Path("/sys/fs/cgroup")
        else:
            continue
        if (mount / "cgroup.procs").exists():
            out[mount] = mount / path.lstrip("/")
    return out


def _tree_pids(cg: Path) -> list[int]:
    pids: list[int] = []
    if not cg.is_dir():
        return pids
    for procs in cg.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _release(name: str, cgroups: Sequence[Path], mounted: Path | None) -> None:
    """Kill whatever runs in a machine's cgroups, remove them, unmount its overlay and delete
    its directory."""
    for _ in range(50):
        pids = [p for cg in cgroups for p in _tree_pids(cg)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for cg in cgroups:
        if cg.is_dir():
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()
    if mounted is not None and os.path.ismount(mounted):
        r = subprocess.run(["umount", str(mounted)], check=False, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "--lazy", str(mounted)], check=False, timeout=30)
    propagate = Path("/run/systemd/nspawn/propagate") / name
    if propagate.is_dir() and not os.path.ismount(propagate):
        shutil.rmtree(propagate, ignore_errors=True)
    run_dir = RUNS / name
    if run_dir.exists() and not os.path.ismount(run_dir / "merged"):
        shutil.rmtree(run_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Release the machines and networks of test runs that died without cleaning up (killed,
    power cut); those of live runs are left alone. Returns what was released."""
    swept: list[str] = []
    if not RUNS.is_dir():
        return swept
    for entry in sorted(RUNS.iterdir()):
        record = entry / OWNER if entry.is_dir() else entry
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(owner["pid"])):
            continue
        if entry.is_dir():
            _release(entry.name, [Path(c) for c in owner["cgroups"]], entry / "merged")
        else:
            holder = int(owner["holder"])
            with contextlib.suppress(OSError):
                if Path(f"/proc/{holder}/comm").read_text().strip() == "sleep":
                    os.kill(holder, signal.SIGKILL)
            entry.unlink()
        swept.append(entry.name)
    return swept


class Network:
    """A network namespace of its own (loopback only), held by a sleeping process, that
    several machines share: a server and its devices reach each other on 127.0.0.1, nothing
    else reaches them, and a machine that reboots joins the same namespace again."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            # Loopback up here: systemd in a container that joins a namespace it did not make
            # lacks the capability to do it.
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.path = f"/proc/{self.proc.pid}/ns/net"
        RUNS.mkdir(parents=True, exist_ok=True)
        self.record = RUNS / f"network-{self.proc.pid}.json"
        self.record.write_text(json.dumps({"pid": os.getpid(), "holder": self.proc.pid}))
        wait_for("the network namespace", self._sleeping, 10, 0.01)

    def _sleeping(self) -> bool:
        if self.proc.poll() is not None:
            raise LiveError(f"unshare --net exited with {self.proc.returncode}")
        with contextlib.suppress(OSError):
            return Path(f"/proc/{self.proc.pid}/comm").read_text().strip() == "sleep"
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.record.unlink(missing_ok=True)


class Machine:
    """One booted container; see the module docstring."""

    def __init__(
        self,
        tree: Path,
        role: str,
        binds: Sequence[tuple[Path, str]] = (),
        network: Network | None = None,
        prepare: Callable[[Path], None] | None = None,
    ) -> None:
        self.tree = tree
        self.name = f"fedmqtt-{role}-{uuid.uuid4().hex[:8]}"
        self.dir = RUNS / self.name
        self.root = self.dir / "merged"
        self.binds = list(binds)
        self.network = network
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.cgroups = [c / self.name for c in _own_cgroups().values()]
        self.mounted = False
        self.boots = 0
        for d in ("upper", "work", "merged"):
            (self.dir / d).mkdir(parents=True)
        # For sweep_stale(): what to release if this process dies without closing the machine.
        owner = {"pid": os.getpid(), "cgroups": [str(c) for c in self.cgroups]}
        (self.dir / OWNER).write_text(json.dumps(owner))
        try:
            self._mount()
            if prepare is not None:
                prepare(self.root)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- lifecycle

    def _mount(self) -> None:
        opts = f"lowerdir={self.tree},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)],
            check=True,
            timeout=30,
        )
        self.mounted = True

    def boot(self, timeout: float = 60) -> float:
        """Start systemd in the container and wait until it is up; seconds it took."""
        t0 = time.monotonic()
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
        cgroup_procs = [str(cg / "cgroup.procs") for cg in self.cgroups]

        def into_own_cgroup() -> None:  # in the child, before exec: nspawn runs --keep-unit
            for procs in cgroup_procs:
                with open(procs, "w") as f:
                    f.write("0")

        net = (
            [f"--network-namespace-path={self.network.path}"]
            if self.network is not None
            else ["--private-network"]
        )
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--keep-unit",
            "--register=no",
            f"--machine={self.name}",
            f"--directory={self.root}",
            "--console=passive",
            "--link-journal=no",
            *net,
            *(f"--bind-ro={src}:{dst}" for src, dst in self.binds),
        ]
        console = open(self.dir / "console.log", "ab")  # noqa: SIM115 -- kept by the process
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            preexec_fn=into_own_cgroup,  # noqa: PLW1509 -- only joins its cgroup
            start_new_session=True,
        )
        console.close()
        self.boots += 1
        self.leader = 0
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise LiveError(f"{self.name}: systemd-nspawn exited:\n{self.console()}")
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise LiveError(f"{self.name}: no container init after {timeout} s")
            time.sleep(0.05)
        while True:
            left = deadline - time.monotonic()
            r = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=max(left, 1)
            )
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise LiveError(f"{self.name}: system state {state!r} after {timeout} s")
            time.sleep(0.1)  # "Failed to connect to bus" before dbus/systemd are up
        return time.monotonic() - t0

    def _find_leader(self) -> int:
        """The container's init: the process in our cgroup whose pid in its namespace is 1."""
        assert self.proc is not None
        for cg in self.cgroups:
            with contextlib.suppress(OSError):
                for pid in _tree_pids(cg):
                    with contextlib.suppress(OSError):
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            ns = line.split()
                            if ns[0] == "NSpid:" and len(ns) > 2 and ns[-1] == "1":
                                return pid
        return 0

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def reboot(self, timeout: float = 90) -> float:
        """``systemctl reboot`` inside; nspawn exits with 133 and is started again on the same
        overlay. Seconds from the command until the system is up again."""
        t0 = time.monotonic()
        self.run(["systemctl", "reboot"], check=False, timeout=30)
        code = self.wait_exit(timeout)
        if code != EXIT_REBOOT:
            raise LiveError(f"{self.name}: nspawn exited {code} on reboot:\n{self.console()}")
        self.boot(timeout)
        return time.monotonic() - t0

    def close(self) -> None:
        """Power off (SIGTERM to nspawn: the container halts), then kill what is left, unmount
        and remove everything. Idempotent; never raises for a half-made machine."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(30) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.wait_exit(10)
        _release(self.name, self.cgroups, self.root if self.mounted else None)
        self.mounted = False

    def leftovers(self) -> list[str]:
        """What of this machine is still there after :meth:`close` (should be nothing)."""
        found = []
        if self.proc is not None and self.proc.poll() is None:
            found.append(f"{self.name}: systemd-nspawn pid {self.proc.pid}")
        if os.path.ismount(self.root):
            found.append(f"{self.name}: mount {self.root}")
        if self.dir.exists():
            found.append(f"{self.name}: directory {self.dir}")
        found += [f"{self.name}: cgroup {cg}" for cg in self.cgroups if cg.exists()]
        if (Path("/run/systemd/nspawn/propagate") / self.name).exists():
            found.append(f"{self.name}: /run/systemd/nspawn/propagate/{self.name}")
        return found

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- inside

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a shell command line) as root inside the container, with a
        clean environment; on timeout its whole process group is killed."""
        if not self.leader:
            raise LiveError(f"{self.name} is not running")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        full = [
            "nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
            "--pid", "--cgroup", "--root", "--wd",
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv,
        ]  # fmt: skip
        p = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise LiveError(
                f"{self.name}: timed out after {timeout} s: {cmd}\n{out[-3000:]}\n{err[-3000:]}"
            ) from None
        r = subprocess.CompletedProcess(full, p.returncode, out, err)
        if check and r.returncode != 0:
            raise LiveError(
                f"{self.name}: exit {r.returncode}: {cmd}\n{out[-4000:]}\n{err[-4000:]}"
            )
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``."""
        r = self.run(["systemctl", "show", unit, "--property=" + ",".join(props)])
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 200) -> str:
        r = self.run(
            ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-monotonic"],
            check=False,
        )
        return r.stdout

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file into the container's tree (as root)."""
        dest = self.root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data.encode() if isinstance(data, str) else data)
        dest.chmod(mode)

    def read(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()

    def copy_checkout(self, dest: str = "/root/fedmqtt") -> str:
        """The checkout's files (as a clone has them) copied to ``dest`` in the container."""
        target = self.root / dest.lstrip("/")
        for rel in checkout_files():
            src = ROOT / rel
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
        return dest

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "console.log").read_text(errors="replace")[-4000:]
        return ""


def wait_for(
    what: str, pred: Callable[[], object], timeout: float, interval: float = 0.2
) -> object:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
