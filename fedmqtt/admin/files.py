"""Atomic writes with ownership, for files another service user must read.

:func:`fedmqtt.fsutil.atomic_write_bytes` leaves new files owned by whoever runs the admin tool
(root). Mosquitto reads its password file, ACL, CRL and key *after* dropping to the mosquitto
user, and the aggregator reads device keys as its own service user; a file that is briefly
root-owned after the rename is a file a concurrent SIGHUP could fail to read. So the owner and
mode are set on the temporary file, before the rename makes it visible.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes

log = logging.getLogger("fedmqtt.admin")


@dataclass(frozen=True)
class Owner:
    """uid/gid to give new files; -1 keeps the writer's. Resolved from names once."""

    uid: int = -1
    gid: int = -1

    @classmethod
    def named(cls, user: str | None = None, group: str | None = None) -> Owner:
        uid = gid = -1
        if user:
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise ConfigError(f"no such user {user!r}") from None
            uid, gid = pw.pw_uid, pw.pw_gid
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"no such group {group!r}") from None
        return cls(uid, gid)

    @classmethod
    def group_if_exists(cls, group: str) -> Owner:
        """The group (root keeps ownership), or nobody if the group does not exist here."""
        if not group:
            return cls()
        try:
            return cls(-1, grp.getgrnam(group).gr_gid)
        except KeyError:
            return cls()

    @classmethod
    def of(cls, path: Path) -> Owner:
        """Same owner as an existing file or directory (e.g. a service's key directory)."""
        st = path.stat()
        return cls(st.st_uid, st.st_gid)

    def apply(self, fd_or_path: int | Path) -> None:
        if self.uid == -1 and self.gid == -1:
            return
        try:
            if isinstance(fd_or_path, int):
                os.fchown(fd_or_path, self.uid, self.gid)
            else:
                os.chown(fd_or_path, self.uid, self.gid)
        except PermissionError:
            # Not root and not a member of the group: the service must run as the same user
            # (a test, a developer's machine); say so rather than fail.
            log.warning(
                "cannot give %s to uid %d gid %d (not root)", fd_or_path, self.uid, self.gid
            )


def write_file(path: Path, data: bytes, *, mode: int, owner: Owner = Owner()) -> None:
    """Crash-safe replace of ``path`` with ``data``, created with ``mode`` and ``owner``."""
    atomic_write_bytes(path, data, mode=mode, prepare=owner.apply)


def make_dir(path: Path, *, mode: int, owner: Owner = Owner()) -> None:
    """Create ``path`` (and parents) if missing, then enforce mode and owner on it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    owner.apply(path)
