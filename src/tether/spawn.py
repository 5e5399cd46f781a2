"""`tether [options] [COMMAND...]`: run a command in a new network namespace on tether.

The child unshares its network namespace, tells tether (a pipe), and waits until
tether has created and configured the tap inside it (a second pipe) before it
executes the command.  tether exits with the command's status when it ends.
Needs CAP_SYS_ADMIN (root): unprivileged use would need a user namespace, which
this mode does not create; --netns works with any namespace the user can enter.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000


class SpawnError(OSError):
    """The namespace for the command could not be made."""


def _unshare_net() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SpawnError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


class Child:
    """A command waiting in its own network namespace until `release()`."""

    def __init__(self, command: list[str]) -> None:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(ready_r)
            os.close(go_w)
            try:
                _unshare_net()
                os.write(ready_w, b"1")
                if os.read(go_r, 1) != b"1":
                    os._exit(125)  # tether gave up
                os.execvp(command[0], command)
            except OSError as exc:
                os.write(2, f"tether: {command[0]}: {exc}\n".encode())
            os._exit(127)
        os.close(ready_w)
        os.close(go_r)
        self.pid = pid
        self._go = go_w
        ok = os.read(ready_r, 1)
        os.close(ready_r)
        if ok != b"1":
            os.waitpid(pid, 0)
            os.close(go_w)
            raise SpawnError(1, "the command's network namespace could not be created "
                                "(needs CAP_SYS_ADMIN: run as root, or use --netns)")
        self.netns = f"/proc/{pid}/ns/net"

    def release(self) -> None:
        os.write(self._go, b"1")
        os.close(self._go)

    def abandon(self) -> None:
        os.close(self._go)
        os.waitpid(self.pid, 0)

    def exit_status(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)
