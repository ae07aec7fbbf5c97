"""Running a site's commands: on this machine (``LocalRunner``) or on the site's login
node over SSH (``SSHRunner``, one reused connection from ssh.py).

A runner is called with an argv (never a shell string) and optional stdin, and
returns stdout; a non-zero exit raises ``CommandError`` with the last line the command
said. ``TransportError`` is the way to the site failing rather than the command, and
says whether the command may have run anyway (the answer was lost), which is what
makes an idempotent sbatch possible.
"""
from __future__ import annotations

import shlex
import subprocess

from .errors import ScaleboxError, last_line


class CommandError(ScaleboxError):
    """A command on a site failed, or the way to the site did."""


class TransportError(CommandError):
    """The way to the site failed (not the command). ``unsure``: the command may have run."""

    def __init__(self, message: str, unsure: bool, host_key: bool = False):
        super().__init__(message)
        self.unsure = unsure
        self.host_key = host_key      # an unknown or changed host key: it will not heal by itself


def command_failed(argv: list[str], status: int, out: str, err: str, where: str = "") -> CommandError:
    """A command's non-zero exit, with the last line it said."""
    return CommandError(f"{shlex.join(argv[:2])} failed{where} (exit {status}): {last_line(err or out)}")


class LocalRunner:
    """Runs a site's commands on this machine."""

    def __init__(self, env: dict[str, str] | None = None, timeout: float = 60.0):
        self.env = env
        self.timeout = timeout
        self.calls: dict[str, int] = {}          # command -> how many times (benchmarks read it)

    def __call__(self, argv: list[str], input: str | None = None) -> str:
        self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=self.timeout,
                                  env=self.env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(f"{argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise command_failed(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def close(self) -> None:
        pass


class SSHRunner:
    """Runs a site's commands on its login node over one reused SSH connection."""

    def __init__(self, connection, timeout: float = 60.0):
        self.connection = connection
        self.timeout = timeout
        self.calls: dict[str, int] = {}

    def __call__(self, argv: list[str], input: str | None = None) -> str:
        from .ssh import HostKeyError, SSHError
        self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        try:
            status, out, err = self.connection.run(argv, input.encode() if input else None, self.timeout)
        except SSHError as exc:
            raise TransportError(str(exc), unsure=exc.sent, host_key=isinstance(exc, HostKeyError)) from None
        if status != 0:
            raise command_failed(argv, status, out, err, f" on {self.connection.settings.host}")
        return out

    def close(self) -> None:
        self.connection.close()
