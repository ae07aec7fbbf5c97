"""Forwarding files from one site to another site's inbox.

The sender (a worker, on the node where the files are) streams them as one tar
stream through the OpenSSH client to ``scalebox-hpc receive`` on the target's login
node; a manifest with every file's size and SHA-256 ends the stream. The receiver
writes into a temporary directory inside the inbox, checks every file against the
manifest, and only then renames the directory into place, so a reader of the inbox
sees all of a delivery or nothing. A failed or cut transfer is sent again whole
(``retries`` times, with backoff); a repeated delivery replaces the earlier one.

The ``sftp`` mode puts the files one by one over paramiko's SFTP into the same
temporary directory, then asks the receiver to verify and commit them: slower for many
small files, for sites whose login node allows SFTP but no stream.

Names inside the inbox come from messages: they are relative, without '..', and the
receiver checks them again; nothing lands outside ``inbox/dest``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass

from .backoff import Backoff
from .errors import ScaleboxError, last_line
from .ssh import HOST_KEY_FAILED, HostKeyError, SSHConnection, SSHError, SSHSettings, openssh_argv

MANIFEST = ".scalebox-manifest.json"
INCOMING = ".incoming"
CHUNK = 1 << 20
READ_BUFSIZE = 64 << 10
WRITE_PIECE = 64 << 10


class TransferError(ScaleboxError):
    """A forward failed (after its retries)."""


class PathRefused(ScaleboxError):
    """A path from a message would leave the place it must stay in."""


@dataclass
class Item:
    source: str      # the file on this node
    name: str        # its relative name at the destination


@dataclass(frozen=True)
class ForwardTarget:
    """Where files forwarded to a site go and how to reach it: its inbox, the python
    that runs the receiver there, and its login node (None: a site on this machine).
    The controller stores it in the sites table (to_json); workers elsewhere read it
    back (from_json)."""

    site: str
    inbox: str | None = None
    python: str | None = None
    ssh: SSHSettings | None = None

    def to_json(self) -> dict:
        return {"inbox": self.inbox, "python": self.python, "ssh": self.ssh.as_dict() if self.ssh else None}

    @classmethod
    def from_json(cls, site: str, data: dict | None) -> ForwardTarget:
        data = data or {}
        ssh = data.get("ssh")
        return cls(site, inbox=data.get("inbox"), python=data.get("python"),
                   ssh=SSHSettings.from_dict(ssh) if ssh else None)


def safe_name(name: str, what: str = "path") -> str:
    """A relative path with no '..' and no absolute start, normalised; else PathRefused."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise PathRefused(f"{what} {name!r} is empty or not text")
    if name.startswith("/") or name.startswith("~"):
        raise PathRefused(f"{what} {name!r} is absolute: refused (paths must stay inside the inbox)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PathRefused(f"{what} {name!r} contains '..': refused (paths must stay inside the inbox)")
    if not parts or parts[0] in (MANIFEST, INCOMING):
        raise PathRefused(f"{what} {name!r} is not a file name")
    return "/".join(parts)


def plan(files: list[str], workdir: str, files_root: str | None = None) -> tuple[list[Item], dict[str, str]]:
    """The files to send for these message paths, and each path's name at the
    destination. Relative paths are taken in ``files_root`` (else WORK_DIR) and keep
    their relative name; an absolute path is sent under its base name, or its name
    relative to ``files_root`` when it lies there. A directory is sent whole."""
    items: list[Item] = []
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    base = os.path.realpath(files_root) if files_root else workdir
    for path in files:
        if not isinstance(path, str):
            raise PathRefused(f"file entry {path!r} is not a path")
        if os.path.isabs(path):
            real = os.path.realpath(path)
            inside = files_root and os.path.commonpath([real, base]) == base and real != base
            name = safe_name(os.path.relpath(real, base) if inside else os.path.basename(real), "file name")
            source = path
        else:
            name = safe_name(path, "file path")
            source = os.path.join(base, name)
            # A symlink in WORK_DIR may point anywhere; what counts is that the name is confined.
        if os.path.isdir(source):
            for root, dirs, found in os.walk(source):
                dirs.sort()
                for file in sorted(found):
                    full = os.path.join(root, file)
                    rel = os.path.relpath(full, source)
                    items.append(Item(full, f"{name}/{rel}"))
        elif os.path.isfile(source):
            items.append(Item(source, name))
        else:
            raise TransferError(f"file {path!r} named by the message does not exist on this node")
        names[path] = name
    for item in items:
        if item.name in seen:
            raise TransferError(f"two files would both arrive as {item.name!r}: {seen[item.name]} and {item.source}")
        seen[item.name] = item.source
    return items, names


class _Hashing:
    """A file reader that hashes what goes through it."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def _receiver_argv(target: ForwardTarget, dest: str, extra: list[str] = (), *, local: bool = False) -> list[str]:
    """The receiver's command line: through ssh, unless the target is on this machine
    or ``local`` (already run on the target's login node)."""
    python = target.python or ("python3" if target.ssh else sys.executable)
    command = [python, "-m", "scalebox_hpc.transfer", "--inbox", target.inbox, "--dest", dest, *extra]
    if not target.ssh or local:
        return command
    return [*openssh_argv(target.ssh), target.ssh.remote_command(command)]


def send(target: ForwardTarget, dest: str, items: list[Item], *, mode: str = "stream", retries: int = 3,
         timeout: float = 3600.0, on_retry=None) -> dict:
    """Deliver ``items`` into the target's ``inbox/dest``; returns what the receiver
    reported ({path, files, bytes}) plus seconds and tries. Raises TransferError after
    the last try."""
    dest = safe_name(dest, "destination")
    if not target.inbox:
        raise TransferError(f"site {target.site} has no inbox for forwarded files: set 'inbox' in its site config")
    started = time.monotonic()
    last, backoff = None, Backoff(1.0, 30.0)
    for attempt in range(1, retries + 2):
        try:
            if mode == "sftp":
                report = _send_sftp(target, dest, items, timeout)
            else:
                report = _send_stream(target, dest, items, timeout)
            report.update(seconds=round(time.monotonic() - started, 3), tries=attempt, mode=mode)
            return report
        except (TransferError, SSHError, OSError) as exc:
            last = exc
            if HOST_KEY_FAILED in str(exc) or isinstance(exc, HostKeyError):
                break              # an unknown or changed host key does not heal by trying again
            if attempt <= retries:
                if on_retry:
                    on_retry(attempt, exc)
                time.sleep(backoff.failed())
    raise TransferError(f"forward to {dest} failed after {attempt} tr{'y' if attempt == 1 else 'ies'}: {last}")


def _manifest_bytes(manifest: list[dict]) -> bytes:
    return json.dumps({"files": manifest}).encode()


def _send_stream(target: ForwardTarget, dest: str, items: list[Item], timeout: float) -> dict:
    argv = _receiver_argv(target, dest)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        manifest = []
        try:
            tar = _TarWriter(proc.stdin.fileno())
            for item in items:
                with open(item.source, "rb", buffering=0) as fh:
                    st = os.fstat(fh.fileno())
                    info = tarfile.TarInfo(item.name)
                    info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o755
                    sha = tar.add(info, fh, item.source)
                    after = os.fstat(fh.fileno())
                    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                        raise TransferError(f"{item.source} changed while it was sent")
                manifest.append({"name": item.name, "size": st.st_size, "sha256": sha})
            data = _manifest_bytes(manifest)
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.add(info, io.BytesIO(data), MANIFEST)
            tar.close()
            proc.stdin.close()
            proc.stdin = None                  # communicate() must not flush it
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            proc.kill()
            proc.wait()
            raise TransferError(f"stream cut: {exc}{_tail(errors)}") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TransferError(f"no answer from the receiver within {timeout:g} s") from None
        return _answer(proc.returncode, out, _tail(errors), manifest)


class _TarWriter:
    """A tar stream (headers from tarfile, as tarfile.open(mode='w|') writes them) straight
    to a pipe: each file is read into one buffer, hashed and written from there, and small
    files are batched, so the data is copied as little as possible."""

    def __init__(self, fd: int):
        self.fd = fd
        self.written = 0
        self.pending = bytearray()
        self.buffer = memoryview(bytearray(CHUNK))

    def _write(self, data) -> None:
        view = memoryview(data)
        self.written += len(view)
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending.clear()

    def add(self, info: tarfile.TarInfo, fh, label: str) -> str:
        """Header and exactly info.size bytes of fh; returns their SHA-256."""
        self.pending += info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        sha = hashlib.sha256()
        left = info.size
        while left:
            n = fh.readinto(self.buffer[:min(left, CHUNK)])
            if not n:
                raise TransferError(f"{label} changed while it was sent (shorter than {info.size} bytes)")
            chunk = self.buffer[:n]
            sha.update(chunk)
            if n < CHUNK // 4 and len(self.pending) + n <= CHUNK:
                self.pending += chunk          # small files: batched into fewer writes
            else:
                self.flush()
                self._write(chunk)
            left -= n
        self.pending += bytes(-info.size % tarfile.BLOCKSIZE)
        if len(self.pending) >= CHUNK:
            self.flush()
        return sha.hexdigest()

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tarfile does."""
        self.pending += bytes(2 * tarfile.BLOCKSIZE)
        self.pending += bytes(-(self.written + len(self.pending)) % tarfile.RECORDSIZE)
        self.flush()


def _tail(errors) -> str:
    """The last line the receiver (or ssh) wrote to its stderr file."""
    errors.seek(0)
    return _detail(errors.read().decode(errors="replace"))


def _detail(text: str) -> str:
    """' (the last line said)', or nothing when nothing was said."""
    line = last_line(text, default="")
    return f" ({line})" if line else ""


def _answer(code: int, out: bytes, detail: str, manifest: list[dict]) -> dict:
    try:
        report = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = None
    if not isinstance(report, dict):
        raise TransferError(f"the receiver gave no answer (exit {code}){detail}")
    if not report.get("ok"):
        raise TransferError(f"the receiver refused: {report.get('error')}")
    if report.get("files") != len(manifest) or report.get("bytes") != sum(f["size"] for f in manifest):
        raise TransferError(f"the receiver reports {report.get('files')} files / {report.get('bytes')} bytes, "
                            f"{len(manifest)} / {sum(f['size'] for f in manifest)} were sent")
    return {"path": report["path"], "files": report["files"], "bytes": report["bytes"]}


def _send_sftp(target: ForwardTarget, dest: str, items: list[Item], timeout: float) -> dict:
    """One SFTP put per file into a temporary directory, then a verified commit."""
    if not target.ssh:
        raise TransferError(f"sftp mode needs an 'ssh' section in the site config of {target.site}")
    inbox = target.inbox
    conn = SSHConnection(target.ssh)
    try:
        sftp = conn.open_sftp()
        sftp.get_channel().settimeout(timeout)
        made: set[str] = set()

        def mkdirs(path: str) -> None:
            """mkdir -p (the inbox too, as the stream receiver makes it)."""
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                if sub and sub not in made:
                    try:
                        sftp.mkdir(sub)
                    except OSError:
                        pass                    # exists (a real failure shows at put)
                    made.add(sub)

        staging = f"{INCOMING}/sftp-{uuid.uuid4().hex}"
        mkdirs(f"{inbox.rstrip('/')}/{staging}")
        manifest = []
        for item in items:
            path = f"{inbox}/{staging}/{item.name}"
            mkdirs(os.path.dirname(path))
            with open(item.source, "rb") as fh:
                reader = _Hashing(fh)
                attrs = sftp.putfo(reader, path, confirm=True)
            manifest.append({"name": item.name, "size": attrs.st_size, "sha256": reader.sha.hexdigest()})
        sftp.close()
        status, out, err = conn.run(_receiver_argv(target, dest, ["--commit", staging], local=True),
                                    _manifest_bytes(manifest), timeout)
    except SSHError:
        raise
    except Exception as exc:             # paramiko's SFTP errors are IOError/SSHException/EOFError
        raise TransferError(f"sftp: {exc}") from None
    finally:
        conn.close()
    return _answer(status, out.encode(), _detail(err), manifest)


# ------------------------------------------------------------------ the receiving side

def receive(inbox: str, dest: str, stream, *, commit: str | None = None) -> dict:
    """Take one delivery into ``inbox/dest``: from a tar stream (the manifest last), or,
    with ``commit``, from files already put into that staging directory of the inbox
    (the manifest is the stream). Verified, then renamed into place."""
    dest = safe_name(dest, "destination")
    inbox = os.path.realpath(inbox)
    incoming = os.path.join(inbox, INCOMING)
    os.makedirs(incoming, exist_ok=True)
    _sweep(incoming)
    if commit:
        # The sender names it as '.incoming/NAME' (relative to the inbox); it must be right in there.
        name = commit[len(INCOMING) + 1:] if commit.startswith(INCOMING + "/") else commit
        staging = os.path.realpath(os.path.join(incoming, safe_name(name, "staging directory")))
        if os.path.dirname(staging) != incoming or not os.path.isdir(staging):
            raise PathRefused(f"staging directory {commit!r} is not in {incoming}")
    else:
        staging = tempfile.mkdtemp(dir=incoming, prefix=dest.replace("/", "_") + ".")
    manifest, got = None, {}
    try:
        if commit:
            manifest = json.loads(stream.read().decode())["files"]
            # Every file in the staging directory is checked, so that nothing unlisted is placed.
            for root, dirs, files in os.walk(staging):
                for entry in dirs + files:
                    if os.path.islink(os.path.join(root, entry)):
                        raise PathRefused(f"{os.path.relpath(os.path.join(root, entry), staging)}: "
                                          "only plain files are accepted")
                for entry in files:
                    full = os.path.join(root, entry)
                    got[os.path.relpath(full, staging)] = _hash_file(full)
        else:
            made = set()
            # tarfile copies its whole read buffer's rest at every read: a small one for small files.
            with tarfile.open(fileobj=stream, mode="r|", bufsize=READ_BUFSIZE) as tar:
                for member in tar:
                    if member.name == MANIFEST:
                        manifest = json.loads(tar.extractfile(member).read().decode())["files"]
                        continue
                    name = safe_name(member.name, "file name")
                    path = os.path.join(staging, name)
                    if member.isdir():
                        os.makedirs(path, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise PathRefused(f"{name}: only plain files are accepted")
                    parent = os.path.dirname(path)
                    if parent not in made:              # (a file of that name makes this fail)
                        os.makedirs(parent, exist_ok=True)
                        made.add(parent)
                    got[name] = _write(tar.extractfile(member), path)
                    os.chmod(path, member.mode & 0o755 | 0o600)
                    os.utime(path, (member.mtime, member.mtime))
        if manifest is None:
            raise TransferError("the stream ended before its manifest: incomplete transfer")
        expected = {safe_name(f["name"], "file name"): (f["size"], f["sha256"]) for f in manifest}
        if expected != got:
            bad = sorted(set(expected) ^ set(got)) or sorted(n for n in expected if expected[n] != got.get(n))
            raise TransferError(f"verification failed for {len(bad)} file(s), first {bad[0]!r}: "
                                "size or SHA-256 differs from what was sent")
        final = os.path.join(inbox, dest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.lexists(final):
            # An earlier attempt of the same task delivered here: replaced whole.
            old = f"{staging}.old"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"ok": True, "path": final, "files": len(got), "bytes": sum(size for size, _ in got.values())}


def _write(source, path: str) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "xb", buffering=0) as out:   # x: the same name twice in a stream is refused
        # Pieces of 64 KiB: larger reads make tarfile allocate (and the kernel fault in) fresh
        # memory for every piece, and larger writes get large page-cache folios, both of which
        # cost more than the data's copy itself (measured: 1 GiB over ssh 5.0 s -> 3.4 s).
        while chunk := source.read(WRITE_PIECE):
            sha.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[out.write(view):]
            size += len(chunk)
    return size, sha.hexdigest()


def _hash_file(path: str) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _sweep(incoming: str, max_age: float = 86400.0) -> None:
    """Remove staging directories of transfers cut more than a day ago."""
    now = time.time()
    try:
        entries = list(os.scandir(incoming))
    except OSError:
        return
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m scalebox_hpc.transfer --inbox DIR --dest REL [--commit STAGING]``: the
    receiving end, run on the target's login node by a forwarding worker (kept apart
    from the CLI so that it starts fast). Prints one JSON line; exit 0 when placed."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m scalebox_hpc.transfer")
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--commit")
    args = parser.parse_args(argv)
    try:
        report = receive(args.inbox, args.dest, sys.stdin.buffer, commit=args.commit)
    except (TransferError, PathRefused, OSError, ValueError, KeyError, TypeError, tarfile.TarError) as exc:
        print(json.dumps({"ok": False, "error": str(exc) or type(exc).__name__}), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
