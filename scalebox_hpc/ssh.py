"""SSH to a site's login node: one reused paramiko connection for commands, and the
OpenSSH client for data streams.

Keys only: no password and no prompt, ever. Host keys are checked against the site's
known_hosts file; an unknown or changed key is an error naming the file and what to do,
never accepted silently. A site behind MFA is reached through an OpenSSH ControlMaster
socket the user opened (``control_path``): commands and data then go through the
``ssh`` binary over that socket, as the user's own terminal would.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass

from .backoff import Backoff
from .errors import ScaleboxError, last_line

log = logging.getLogger(__name__)


class SSHError(ScaleboxError):
    """The connection failed. ``sent`` is True when a command may have started remotely
    before the failure (its effect is unknown)."""

    def __init__(self, message: str, *, sent: bool = False):
        super().__init__(message)
        self.sent = sent


class HostKeyError(SSHError):
    """The login node's host key is unknown or differs from known_hosts."""


# What the OpenSSH client says of an unknown or changed host key.
HOST_KEY_FAILED = "Host key verification failed"


@dataclass
class SSHSettings:
    host: str
    port: int = 22
    user: str | None = None            # None: the local user's name
    key: str | None = None             # private key file; None: ssh-agent / ~/.ssh/id_* (never a password)
    known_hosts: str = "~/.ssh/known_hosts"
    jump: "SSHSettings | None" = None  # a jump host ('user@host:port' or the same keys)
    control_path: str | None = None    # an OpenSSH ControlMaster socket opened by the user (MFA sites)
    control_persist: int = 60          # seconds the transfers' own master connection outlives its use
    login_shell: bool = False          # run commands under 'bash -l' (sites whose Slurm needs the profile)
    connect_timeout: float = 20.0

    def remote_command(self, argv: list[str]) -> str:
        """The command line the login node's shell runs for argv (every word quoted)."""
        command = shlex.join(argv)
        return shlex.join(["bash", "-lc", command]) if self.login_shell else command

    def hop(self) -> "SSHSettings":
        """The jump host's settings: its own, else the login node's key, user and known_hosts."""
        return SSHSettings(**{**self.jump.__dict__, "key": self.jump.key or self.key,
                              "user": self.jump.user or self.user, "known_hosts": self.known_hosts,
                              "control_persist": 0, "jump": None})

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def as_dict(self) -> dict:
        """What a worker needs to reach this login node (stored in the sites table)."""
        out = {k: getattr(self, k) for k in ("host", "port", "user", "key", "known_hosts", "control_path",
                                              "control_persist", "login_shell", "connect_timeout")}
        out["jump"] = self.jump.as_dict() if self.jump else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SSHSettings":
        data = dict(data)
        jump = data.pop("jump", None)
        return cls(**data, jump=cls.from_dict(jump) if jump else None)


def parse_jump(text: str) -> SSHSettings:
    """'[user@]host[:port]' -> settings (keys and known_hosts as the main host's)."""
    user, _, rest = text.rpartition("@")
    host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"invalid jump host {text!r}: use [user@]host[:port]")
    return SSHSettings(host=host, port=int(port or 22), user=user or None)


def _expand(path: str | None) -> str | None:
    return os.path.expandvars(os.path.expanduser(path)) if path else None


def _fingerprint(key) -> str:
    import base64
    import hashlib
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class SSHConnection:
    """One paramiko connection to a login node, opened on first use and reopened with
    backoff after a failure. Commands run one at a time."""

    def __init__(self, settings: SSHSettings, *, site: str = ""):
        self.settings = settings
        self.site = site
        self.client = None
        self.jump_client = None
        self.lock = threading.Lock()
        self.failures = 0
        self.reconnect_backoff = Backoff(2.0, 300.0)   # no login storm against a site that is down
        self.next_try = 0.0
        self.last_error: str | None = None
        self.last_class: type[SSHError] = SSHError
        self.connects = 0                      # how many times a connection was opened (tests read it)

    def _label(self) -> str:
        return f"site {self.site} ({self.settings.where})" if self.site else self.settings.where

    def _open(self, s: SSHSettings, sock=None):
        import paramiko
        label = self._label() if s is self.settings else f"{self._label()} via jump host {s.where}"
        client = paramiko.SSHClient()
        known = _expand(s.known_hosts)
        try:
            client.load_host_keys(known)
        except FileNotFoundError:
            raise HostKeyError(f"{label}: known_hosts file {known} not found: create it with the "
                               f"login node's key, checked with the site (ssh-keyscan -p {s.port} {s.host})") from None
        except OSError as exc:
            raise HostKeyError(f"{label}: cannot read known_hosts {known}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = _expand(s.key)
        if key and not os.path.isfile(key):
            raise SSHError(f"{label}: key file {key} not found (ssh.key in the site config: a private "
                           "key; scalebox-hpc never uses passwords)")
        try:
            client.connect(s.host, s.port, username=s.user or _local_user(), key_filename=key,
                           look_for_keys=key is None, allow_agent=key is None, timeout=s.connect_timeout,
                           banner_timeout=s.connect_timeout, auth_timeout=s.connect_timeout, sock=sock)
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                f"{label}: the host key of {s.host}:{s.port} does not match {known} (offered "
                f"{exc.key.get_name()} {_fingerprint(exc.key)}): refusing to connect. If the site really "
                f"changed its key, check the new fingerprint with the site and replace the line") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(
                    f"{label}: the host key of {s.host}:{s.port} is not in {known}: refusing to "
                    f"connect. Check the key's fingerprint with the site, then add it "
                    f"(ssh-keyscan -p {s.port} {s.host} >> {known})") from None
            if isinstance(exc, paramiko.PasswordRequiredException):
                raise SSHError(f"{label}: key {key} is encrypted: use ssh-agent (leave 'key' unset) "
                               "or a key without passphrase; scalebox-hpc never prompts") from None
            raise SSHError(f"{label}: {exc}") from None
        except (OSError, EOFError) as exc:
            raise SSHError(f"{label}: cannot connect: {exc}") from None
        transport = client.get_transport()
        transport.set_keepalive(15)
        return client

    def _client(self):
        if self.client is not None and self.client.get_transport() and self.client.get_transport().is_active():
            return self.client
        self._drop()
        now = time.monotonic()
        if now < self.next_try:
            raise self.last_class(f"{self._label()}: not reconnecting for another {self.next_try - now:.0f} s "
                                  f"(last error: {self.last_error})")
        s = self.settings
        try:
            sock = None
            if s.jump:
                self.jump_client = self._open(s.hop())
                sock = self.jump_client.get_transport().open_channel("direct-tcpip", (s.host, s.port), ("", 0))
            self.client = self._open(s, sock=sock)
        except Exception as exc:          # paramiko raises a zoo of exceptions from the jump channel
            error = exc if isinstance(exc, SSHError) else SSHError(f"{self._label()}: cannot connect: {exc}")
            self.failures += 1
            self.next_try = time.monotonic() + self.reconnect_backoff.failed()
            self.last_error, self.last_class = str(error), type(error)
            self._drop()
            raise error from None
        if self.failures:
            log.info("%s: connected again after %d failure(s)", self._label(), self.failures)
        self.failures, self.next_try, self.last_error = 0, 0.0, None
        self.reconnect_backoff.reset()
        self.connects += 1
        return self.client

    def _drop(self) -> None:
        for client in (self.client, self.jump_client):
            if client is not None:
                try:
                    client.close()
                except Exception:   # closing a broken transport may raise anything
                    pass
        self.client = self.jump_client = None

    def run(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a command (argv, each word quoted for the remote shell) on the login node;
        returns (exit status, stdout, stderr). Raises SSHError when the connection fails."""
        command = self.settings.remote_command(argv)
        with self.lock:
            client = self._client()
            sent = False
            try:
                channel = client.get_transport().open_session(timeout=timeout)
                channel.settimeout(timeout)
                channel.exec_command(command)
                sent = True
                if input:
                    channel.sendall(input)
                channel.shutdown_write()
                out = channel.makefile("rb").read()
                err = channel.makefile_stderr("rb").read()
                status = channel.recv_exit_status()
                channel.close()
            except Exception as exc:   # socket.timeout, EOFError, paramiko.SSHException ...
                self._drop()
                self.last_error = str(exc) or type(exc).__name__
                raise SSHError(f"{self._label()}: connection lost while running {argv[0]}: "
                               f"{self.last_error}", sent=sent) from None
            if status == -1:           # the channel closed without an exit status
                self._drop()
                raise SSHError(f"{self._label()}: connection lost while running {argv[0]}", sent=True)
        return status, out.decode(errors="replace"), err.decode(errors="replace")

    def open_sftp(self):
        """An SFTP session on this connection (opened if need be)."""
        with self.lock:
            return self._client().open_sftp()

    def close(self) -> None:
        with self.lock:
            self._drop()


def _local_user() -> str:
    import getpass
    return getpass.getuser()


# OpenSSH's default ciphers, AES-GCM first: with AES-NI (any HPC node) it costs both ends far
# less CPU than chacha20-poly1305 for bulk data (1 GiB over ssh: 3.4 s -> 2.8 s on 2 cores).
# The same set as the default, so whatever the server accepts by default still matches.
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"


def openssh_argv(s: SSHSettings) -> list[str]:
    """The OpenSSH client's argv up to and including the destination (the command
    follows). Host keys are checked strictly against the site's known_hosts."""
    argv = ["ssh", "-p", str(s.port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={_expand(s.known_hosts)}",
            "-o", f"ConnectTimeout={int(s.connect_timeout)}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR", "-o", f"Ciphers={CIPHERS}"]
    if s.key:
        argv += ["-i", _expand(s.key), "-o", "IdentitiesOnly=yes"]
    if s.control_path:
        # The user's own master connection (opened once with MFA): reuse it, never open one.
        argv += ["-o", "ControlMaster=no", "-o", f"ControlPath={_expand(s.control_path)}"]
    elif s.control_persist:
        # Our own master, shared by the transfers of this node for control_persist seconds,
        # so that a task's forward does not pay a handshake. The socket lives on local disk.
        folder = os.path.join(tempfile.gettempdir(), f"sbx-ssh-{os.getuid()}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # %C covers only local host, host, port and user: a master opened with other trust
        # settings (known_hosts, key, jump) must not be reused, as a mux client checks no host key.
        trust = repr((_expand(s.known_hosts), _expand(s.key), s.jump.as_dict() if s.jump else None))
        tag = hashlib.sha256(trust.encode()).hexdigest()[:12]
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPersist={int(s.control_persist)}",
                 "-o", f"ControlPath={folder}/{tag}-%C"]
    if s.jump:
        # Not -J: options given here would not apply to the jump host, its key least of all.
        hop = openssh_argv(s.hop())
        argv += ["-o", "ProxyCommand=" + shlex.join([*hop[:-1], "-W", "%h:%p", hop[-1]])]
    argv.append(f"{s.user or _local_user()}@{s.host}")
    return argv


class OpenSSHConnection:
    """The SSHConnection interface through the OpenSSH client, for sites reached through
    the user's ControlMaster socket (MFA): every command reuses that one login."""

    def __init__(self, settings: SSHSettings, *, site: str = ""):
        self.settings = settings
        self.site = site
        self.connects = 0

    def run(self, argv: list[str], input: bytes | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
        import subprocess
        try:
            proc = subprocess.run([*openssh_argv(self.settings), self.settings.remote_command(argv)], input=input or b"",
                                  capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SSHError(f"site {self.site} ({self.settings.where}): {exc}", sent=True) from None
        err = proc.stderr.decode(errors="replace")
        if proc.returncode == 255:     # ssh's own failure, not the command's
            if HOST_KEY_FAILED in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
                raise HostKeyError(f"site {self.site} ({self.settings.where}): host key verification failed "
                                   f"against {_expand(self.settings.known_hosts)}")
            raise SSHError(f"site {self.site} ({self.settings.where}): ssh failed: "
                           f"{last_line(err, default='no message')}", sent=True)
        return proc.returncode, proc.stdout.decode(errors="replace"), err

    def close(self) -> None:
        pass


def connect(settings: SSHSettings, *, site: str = ""):
    """The connection for a site's commands: paramiko, or OpenSSH over the user's
    ControlMaster socket when the site config names one."""
    return OpenSSHConnection(settings, site=site) if settings.control_path else SSHConnection(settings, site=site)
