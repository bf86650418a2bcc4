"""The workdir's faults, found before they cost a run: a workdir that cannot be written, a
filesystem without room for a checkpoint, and a second job on the same workdir (a lock).

Local paths only: a gs:// workdir has no lock or free-space figure to read (Orbax reports its
write errors through clip_jax.train.checkpoint).
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import socket
from typing import Optional

LOCK_NAME = ".lock"


class WorkdirError(RuntimeError):
    """A workdir a run cannot use: the message says why and what to do."""


def is_local(path: str) -> bool:
    return "://" not in path


def check_writable(workdir: str) -> None:
    """Create the workdir and write a file in it, or raise WorkdirError naming the reason."""
    if not is_local(workdir):
        return
    # One probe per process: the processes of a job share the workdir, and one's remove must not
    # race another's write.
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("clip_jax")
        os.remove(probe)
    except OSError as e:
        fault = filesystem_fault(e)
        cause = fault[0] if fault else (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise WorkdirError(f"--workdir={workdir} cannot be written ({cause}): choose a writable folder, or fix its "
                           "permissions or mount") from None


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> Optional[str]:
    """A warning where the workdir's filesystem has less free space than keep + 1 checkpoints of
    `checkpoint_bytes` (the kept ones and one being written), else None. A warning, not an error:
    the size is the state's in memory, and Orbax's compressed files are often smaller."""
    if not is_local(workdir):
        return None
    free = shutil.disk_usage(workdir).free
    if free >= (keep + 1) * checkpoint_bytes:
        return None
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    return (f"warning: --workdir={workdir} has {mib(free)} free, less than keep_checkpoints={keep} + 1 checkpoints "
            f"of up to {mib(checkpoint_bytes)} each: a checkpoint may fail to write (the run then stops, naming "
            "the last complete one)")


class Lock:
    """WORKDIR/.lock held (fcntl.flock) for the life of a run: a second job on the same workdir is
    refused with the first one's pid, host and start time. The kernel drops the lock when the
    process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "Lock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirError(f"--workdir={os.path.dirname(self.path)} is in use by another run ({holder}): wait "
                               "for it to end or stop it, or choose another workdir. Two runs on one workdir would "
                               "overwrite each other's checkpoints.") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, unlocked
            self._fd = None


def lock(workdir: str) -> Lock:
    """The workdir's lock, held (a no-op object for a remote workdir)."""
    if not is_local(workdir):
        return Lock(workdir)  # never acquired: release() does nothing
    return Lock(workdir).acquire()


# Filesystem errors by what they mean to a user, looked up in OSErrors and in the messages Orbax
# and TensorStore raise (which carry the errno's text or code).
_CAUSES = (
    (("No space left on device", "os_error_code='28'", "ENOSPC"), "the filesystem is full (no space left on device)",
     "free space or move the workdir"),
    (("Read-only file system", "os_error_code='30'", "EROFS"), "the filesystem is read-only",
     "remount it writable or move the workdir"),
    (("Permission denied", "os_error_code='13'", "EACCES"), "permission denied", "fix the workdir's permissions"),
    (("Disk quota exceeded", "os_error_code='122'", "EDQUOT"), "the disk quota is exceeded",
     "free space or move the workdir"),
    (("No such file or directory", "os_error_code='2'", "NOT_FOUND"), "a folder on its path was removed",
     "do not delete the workdir of a running job"),
)


def filesystem_fault(e: BaseException) -> Optional[tuple[str, str]]:
    """(what it means, what to do) for an error that is one of the known filesystem faults, else
    None."""
    text = f"{e.strerror if isinstance(e, OSError) and e.strerror else ''} {e}"
    for needles, cause, fix in _CAUSES:
        if any(n in text for n in needles):
            return cause, fix
    return None
