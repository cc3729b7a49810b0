"""Child processes of the agent's parent, started without fork().

The parent runs grpc's threads (the controller link). A fork() there runs grpc's pthread_atfork
handlers: with another thread inside grpc they skip their work and log `fork_posix.cc:71] Other
threads are currently calling into gRPC, skipping fork() handlers`, and the child starts with
grpc's poller state copied mid-change (on a real node a child died with `ev_epoll1_linux.cc:1121]
Check failed: next_worker->state == KICKED`). asyncio's subprocesses do fork(): under uvloop they
are libuv's uv_spawn, which is fork() then exec().

`os.posix_spawn` is exec without fork: glibc and musl implement it as clone(CLONE_VM|CLONE_VFORK)
and exec, running no atfork handler and no Python code in the child, so nothing of grpc's state is
touched, whatever its threads are doing. Exit is watched with a pidfd on the running loop and output
is read from a pipe on the loop, so nothing here blocks or needs a thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

# What subprocess.Popen(restore_signals=True) resets: Python ignores these, and an ignored
# signal stays ignored across exec.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class Child:
    """A child process by pid: wait for its exit on the loop (pidfd), signal it, read its stdout."""

    def __init__(self, pid: int, stdout: int | None = None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] | None = None
        self._stdout = stdout
        self._buffer = bytearray()
        self._eof = False
        self._keep = True                        # False once the caller took what it wanted: discard
        self._data: asyncio.Event | None = None

    # ------------------------------------------------------------------ exit
    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        if self._exited is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[int] = loop.create_future()
            pidfd = os.pidfd_open(self.pid)

            def reap() -> None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
                exited.set_result(self.returncode)

            loop.add_reader(pidfd, reap)
            self._exited = exited
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # ------------------------------------------------------------------ stdout
    def _start_reading(self) -> asyncio.Event:
        if self._data is None:
            self._data = asyncio.Event()
            if self._stdout is None:
                self._eof = True
            else:
                os.set_blocking(self._stdout, False)
                asyncio.get_running_loop().add_reader(self._stdout, self._on_readable)
        return self._data

    def _on_readable(self) -> None:
        assert self._stdout is not None and self._data is not None
        try:
            chunk = os.read(self._stdout, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._eof = True
            asyncio.get_running_loop().remove_reader(self._stdout)
            os.close(self._stdout)
            self._stdout = None
        elif self._keep:
            self._buffer += chunk
        self._data.set()

    async def readline(self) -> bytes:
        """The first line of stdout (b"" if it closed first). Later output is read and discarded,
        so a chatty child never blocks on a full pipe."""
        data = self._start_reading()
        while b"\n" not in self._buffer and not self._eof:
            data.clear()
            await data.wait()
        buf = bytes(self._buffer)
        self._buffer.clear()
        self._keep = False
        end = buf.find(b"\n")
        return buf[: end + 1] if end >= 0 else buf

    async def read(self) -> bytes:
        """All of stdout, until the child closes it."""
        data = self._start_reading()
        while not self._eof:
            data.clear()
            await data.wait()
        out = bytes(self._buffer)
        self._buffer.clear()
        return out

    def close(self) -> None:
        """Stop reading stdout (the child's next write to it fails)."""
        if self._stdout is not None:
            if self._data is not None:
                asyncio.get_running_loop().remove_reader(self._stdout)
            os.close(self._stdout)
            self._stdout = None
            self._eof = True


def spawn(argv: Sequence[str], *, pass_fds: Sequence[int] = (), capture_stdout: bool = False,
          quiet_stderr: bool = False) -> Child:
    """Start `argv` (argv[0] found on PATH) with posix_spawn. The child inherits stdin, stderr
    (unless `quiet_stderr`), stdout (unless `capture_stdout`) and exactly the fds in `pass_fds`;
    its signal mask is empty and SIGPIPE/SIGXFSZ are back to their defaults. Raises OSError
    (FileNotFoundError when the program is not installed)."""
    actions: list[tuple[int, int, int] | tuple[int, int, str, int, int]] = []
    # dup2 onto itself clears close-on-exec (POSIX.1-2024; glibc >= 2.29, musl): the fd stays, same number.
    actions += [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in pass_fds]
    read_end = write_end = None
    if capture_stdout:
        read_end, write_end = os.pipe()          # both close-on-exec; the child gets a dup2 as fd 1
        actions.append((os.POSIX_SPAWN_DUP2, write_end, 1))
    if quiet_stderr:
        actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0))
    try:
        pid = os.posix_spawnp(argv[0], list(argv), os.environ, file_actions=actions,
                              setsigmask=(), setsigdef=_RESET_SIGNALS)
    except BaseException:
        if read_end is not None:
            os.close(read_end)
        raise
    finally:
        if write_end is not None:
            os.close(write_end)
    return Child(pid, read_end)


async def run(argv: Sequence[str], timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Run `argv` to completion: (exit code, stdout); stderr discarded. A child still running after
    `timeout_s` is killed (exit code -9). Raises OSError when it cannot be started."""
    child = spawn(argv, capture_stdout=True, quiet_stderr=True)
    try:
        out = await asyncio.wait_for(child.read(), timeout_s)
    except TimeoutError:
        child.kill()
        child.close()
        out = b""
    return await child.wait(), out
