"""Forwarding files to another site's inbox (scalebox_hpc.transfer) against real
components: real files, the real receiver process, and a private real sshd on port 7231
(tests/env/sshd-up.sh) as the target's login node."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from scalebox_hpc import ssh, transfer
from scalebox_hpc.transfer import PathRefused, TransferError

ENV = Path(__file__).resolve().parent / "env"
PORT = 7231
MIB = 1 << 20


# ------------------------------------------------------------------ helpers

def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root by relative name -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            sha.update(chunk)
    return sha.hexdigest()


def _incoming_left(inbox: Path) -> list[str]:
    incoming = inbox / transfer.INCOMING
    return sorted(os.listdir(incoming)) if incoming.exists() else []


def _make_small_tree(root: Path, count: int) -> None:
    rng = __import__("random").Random(7)
    for i in range(count):
        sub = root / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04d}.dat").write_bytes(os.urandom(rng.randint(0, 4096)))
    (root / "empty.txt").write_bytes(b"")
    (root / ("long-" * 12) / "é" / ("name-" * 15)).parent.mkdir(parents=True)
    (root / ("long-" * 12) / "é" / ("name-" * 15)).write_bytes(b"pax")


def _target(inbox: Path, settings: ssh.SSHSettings | None) -> transfer.ForwardTarget:
    return transfer.ForwardTarget("test", inbox=str(inbox), python=sys.executable, ssh=settings)


@pytest.fixture(scope="module")
def sshd():
    """A private real sshd on 127.0.0.1:7231 (root, key only), stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix="sbx-test-transfer-"))
    ssh_dir = base / "sshd"
    up = subprocess.run(["bash", str(ENV / "sshd-up.sh"), str(ssh_dir), str(PORT)],
                        capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, f"tests/env/sshd-up.sh on port {PORT} failed:\n{up.stderr[-3000:]}"
    exports = {}
    for line in up.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        exports[key] = value
    settings = ssh.SSHSettings(host="127.0.0.1", port=PORT, user="root", key=exports["SSHD_KEY"],
                               known_hosts=exports["SSHD_KNOWN_HOSTS"], connect_timeout=10)
    try:
        yield SimpleNamespace(dir=ssh_dir, base=base, settings=settings)
    finally:
        # Close the transfers' own ControlMaster connection(s), then the listener.
        for s in (settings,):
            argv = ssh.openssh_argv(s)
            subprocess.run([*argv[:-1], "-O", "exit", argv[-1]], capture_output=True, timeout=30)
        subprocess.run(["bash", str(ENV / "sshd-down.sh"), str(ssh_dir)], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ names and plans

@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "a/..", "/etc/passwd", "/tmp", "~root/x", "",
                                  transfer.MANIFEST, f"{transfer.INCOMING}/x"])
def test_safe_name_refuses_escaping_names(name):
    with pytest.raises(PathRefused):
        transfer.safe_name(name)


def test_safe_name_normalises_harmless_names():
    assert transfer.safe_name("a/./b//c/") == "a/b/c"
    assert transfer.safe_name("x..y/..z") == "x..y/..z"


def test_plan_names_files_and_directories(tmp_path):
    work = tmp_path / "work"
    (work / "res" / "deep").mkdir(parents=True)
    (work / "a.txt").write_text("a")
    (work / "res" / "r1").write_text("1")
    (work / "res" / "deep" / "r2").write_text("2")

    items, names = transfer.plan(["a.txt", "res"], str(work))
    assert {i.name: i.source for i in items} == {
        "a.txt": str(work / "a.txt"),
        "res/r1": str(work / "res" / "r1"),
        "res/deep/r2": str(work / "res" / "deep" / "r2"),
    }
    assert names == {"a.txt": "a.txt", "res": "res"}


def test_plan_files_root_naming(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.dat").write_text("in")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "out.dat").write_text("out")
    items, names = transfer.plan(["sub/in.dat", str(other / "out.dat")], str(tmp_path), files_root=str(root))
    assert names == {"sub/in.dat": "sub/in.dat", str(other / "out.dat"): "out.dat"}
    assert [(i.name, i.source) for i in items] == [("sub/in.dat", str(root / "sub" / "in.dat")),
                                                   ("out.dat", str(other / "out.dat"))]
    items, names = transfer.plan([str(root / "sub" / "in.dat")], str(tmp_path), files_root=str(root))
    assert names == {str(root / "sub" / "in.dat"): "sub/in.dat"}
    # Without files_root an absolute path keeps only its base name.
    items, names = transfer.plan([str(root / "sub" / "in.dat")], str(tmp_path))
    assert names == {str(root / "sub" / "in.dat"): "in.dat"}


def test_plan_refuses_bad_paths(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(PathRefused):
        transfer.plan(["../x"], str(tmp_path / "sub"))
    with pytest.raises(PathRefused):
        transfer.plan(["a/../../x"], str(tmp_path))
    with pytest.raises(TransferError, match="does not exist"):
        transfer.plan(["missing.dat"], str(tmp_path))
    # Two different files that would arrive under the same name.
    for d in ("p", "q"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "same.dat").write_text(d)
    with pytest.raises(TransferError, match="same.dat"):
        transfer.plan([str(tmp_path / "p" / "same.dat"), str(tmp_path / "q" / "same.dat")], str(tmp_path))
    # ... also when a directory's file collides with a file named directly.
    (tmp_path / "r" / "same.dat").parent.mkdir()
    (tmp_path / "r" / "same.dat").write_text("r")
    with pytest.raises(TransferError, match="r/same.dat"):
        transfer.plan(["r", str(tmp_path / "r" / "same.dat")], str(tmp_path), files_root=str(tmp_path))


# ------------------------------------------------------------------ local (no ssh)

def test_local_roundtrip_and_redelivery_replaces_whole(tmp_path):
    src = tmp_path / "src"
    (src / "out" / "a" / "b").mkdir(parents=True)
    (src / "out" / "top.txt").write_text("top\n")
    (src / "out" / "a" / "mid.bin").write_bytes(os.urandom(300_000))
    (src / "out" / "a" / "b" / "leaf.bin").write_bytes(os.urandom(5))
    (src / "out" / "a" / "b" / "zero").write_bytes(b"")
    (src / "log.txt").write_text("log\n")
    # Names that need PAX headers: longer than 100 bytes, and not ASCII.
    (src / "out" / ("long-" * 12) / ("name-" * 15)).parent.mkdir(parents=True)
    (src / "out" / ("long-" * 12) / ("name-" * 15)).write_bytes(os.urandom(1000))
    (src / "out" / "données" / "é ñ.txt").parent.mkdir(parents=True)
    (src / "out" / "données" / "é ñ.txt").write_text("accents\n")
    inbox = tmp_path / "inbox"
    items, _ = transfer.plan(["out", "log.txt"], str(src))
    report = transfer.send(_target(inbox, None), "app1/task7", items, retries=0)
    delivered = inbox / "app1" / "task7"
    assert report["path"] == str(delivered)
    assert report["files"] == 7 and report["tries"] == 1
    assert report["bytes"] == sum(len(b) for b in _tree(src).values())
    assert _tree(delivered) == _tree(src)
    assert _incoming_left(inbox) == []

    # A second delivery to the same place replaces the first whole.
    (src / "out" / "a" / "b" / "leaf.bin").unlink()
    (src / "out" / "top.txt").write_text("changed\n")
    items, _ = transfer.plan(["out", "log.txt"], str(src))
    transfer.send(_target(inbox, None), "app1/task7", items, retries=0)
    assert _tree(delivered) == _tree(src)
    assert not (delivered / "out" / "a" / "b" / "leaf.bin").exists()
    assert _incoming_left(inbox) == []
    assert sorted(os.listdir(inbox)) == [transfer.INCOMING, "app1"]


# ------------------------------------------------------------------ crafted streams

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _stream(members: list, manifest: list[dict] | None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                _add(tar, *member)
        if manifest is not None:
            _add(tar, transfer.MANIFEST, json.dumps({"files": manifest}).encode())
    return buf.getvalue()


def _entry(name: str, data: bytes) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _receive(inbox: Path, dest: str, stream: bytes) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc.transfer", "--inbox", str(inbox), "--dest", dest],
                          input=stream, capture_output=True, timeout=60)
    lines = proc.stdout.decode().strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr.decode()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


@pytest.mark.parametrize("bad", ["dotdot", "dotdot-deep", "absolute", "symlink", "symlink-then-write",
                                 "hardlink"])
def test_receiver_refuses_crafted_members(tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    inbox = tmp_path / "inbox"
    good = ("ok/good.txt", b"fine\n")
    evil = b"evil\n"
    members = {
        "dotdot": [good, ("../evil", evil)],                       # -> inbox/.incoming/evil
        "dotdot-deep": [good, ("../../../outside/evil", evil)],    # -> tmp_path/outside/evil
        "absolute": [good, (str(outside / "evil"), evil)],
        "symlink": [good, _symlink("evil", str(outside))],
        # A link to outside, then a file written "through" it.
        "symlink-then-write": [good, _symlink("lnk", str(outside)), ("lnk/evil", evil)],
        "hardlink": [good, _hardlink("evil", "/etc/passwd")],
    }[bad]
    manifest = [_entry(*m) for m in members if isinstance(m, tuple)]
    code, answer, err = _receive(inbox, "d/x", _stream(members, manifest))
    assert code != 0, err
    assert answer is not None and answer["ok"] is False and answer["error"], err
    # Nothing written outside the inbox, nothing placed, the staging directory gone.
    assert list(outside.iterdir()) == []
    assert [p.name for p in tmp_path.rglob("evil")] == []
    assert [p.name for p in tmp_path.rglob("lnk")] == []
    assert not (inbox / "d").exists()
    assert _incoming_left(inbox) == []


@pytest.mark.parametrize("case", ["wrong-sha", "wrong-size", "file-missing", "file-extra", "no-manifest",
                                  "cut-in-the-middle"])
def test_receiver_refuses_stream_not_matching_manifest(tmp_path, case):
    inbox = tmp_path / "inbox"
    # An earlier good delivery to the same place must survive a refused one.
    old = _stream([("keep.txt", b"earlier\n")], [_entry("keep.txt", b"earlier\n")])
    code, answer, err = _receive(inbox, "d/x", old)
    assert code == 0 and answer["ok"], err
    a, b = ("a.bin", os.urandom(70_000)), ("sub/b.txt", b"bee\n")
    stream = {
        "wrong-sha": lambda: _stream([a, b], [_entry(*a), _entry("sub/b.txt", b"bef\n")]),
        "wrong-size": lambda: _stream([a, b], [_entry(*a), _entry("sub/b.txt", b"bee\n\n")]),
        "file-missing": lambda: _stream([a], [_entry(*a), _entry(*b)]),
        "file-extra": lambda: _stream([a, b], [_entry(*a)]),
        "no-manifest": lambda: _stream([a, b], None),
        "cut-in-the-middle": lambda: _stream([a, b], [_entry(*a), _entry(*b)])[:40_000],
    }[case]()
    code, answer, err = _receive(inbox, "d/x", stream)
    assert code != 0, err
    assert answer is not None and answer["ok"] is False, err
    assert _tree(inbox / "d" / "x") == {"keep.txt": b"earlier\n"}
    assert _incoming_left(inbox) == []


def test_receiver_accepts_a_handmade_stream(tmp_path):
    """The crafted-stream helpers produce what the receiver takes (so the refusals above are
    about the one defect each, not a broken helper)."""
    inbox = tmp_path / "inbox"
    a, b = ("a.bin", os.urandom(70_000)), ("sub/b.txt", b"bee\n")
    code, answer, err = _receive(inbox, "d/x", _stream([a, b], [_entry(*a), _entry(*b)]))
    assert code == 0, err
    assert answer == {"ok": True, "path": str(inbox / "d" / "x"), "files": 2, "bytes": 70_004}
    assert _tree(inbox / "d" / "x") == {"a.bin": a[1], "sub/b.txt": b[1]}


# ------------------------------------------------------------------ over ssh

@pytest.mark.parametrize("mode", ["stream", "sftp"])
def test_ssh_delivers_tree_byte_for_byte(sshd, tmp_path, mode):
    src = tmp_path / "src"
    _make_small_tree(src / "many", 200)
    (src / "big.bin").write_bytes(os.urandom(20 * MIB))
    inbox = sshd.base / f"inbox-{mode}"
    items, _ = transfer.plan(["many", "big.bin"], str(src))
    assert len(items) == 203
    retried = []
    report = transfer.send(_target(inbox, sshd.settings), "app/t1", items, mode=mode, retries=0,
                           on_retry=lambda *a: retried.append(a))
    assert retried == []
    assert report["mode"] == mode and report["tries"] == 1 and report["files"] == 203
    delivered = inbox / "app" / "t1"
    assert report["path"] == str(delivered)
    expected = _tree(src)
    assert report["bytes"] == sum(len(v) for v in expected.values())
    assert _tree(delivered) == expected
    assert _incoming_left(inbox) == []


def _other_known_hosts(tmp_path: Path) -> Path:
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "not-the-login-node", "-f", str(key)],
                   check=True, capture_output=True)
    keytype, keydata = (tmp_path / "other_host_key.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts_wrong"
    known.write_text(f"[127.0.0.1]:{PORT} {keytype} {keydata}\n")
    return known


def test_wrong_host_key_is_refused(sshd, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("secret\n")
    items, _ = transfer.plan(["f.txt"], str(src))
    inbox = sshd.base / "inbox-hostkey"
    # First a good send, so that a shared master connection to this host exists: a send with
    # other trust settings must not slip through it.
    transfer.send(_target(inbox, sshd.settings), "good", items, retries=0)
    assert (inbox / "good" / "f.txt").read_text() == "secret\n"

    known = _other_known_hosts(tmp_path)
    bad = ssh.SSHSettings(**{**sshd.settings.__dict__, "known_hosts": str(known)})
    with pytest.raises(TransferError, match="(?i)host key verification failed"):
        transfer.send(_target(inbox, bad), "bad", items, retries=0)
    with pytest.raises(TransferError, match="does not match"):
        transfer.send(_target(inbox, bad), "bad", items, mode="sftp", retries=0)
    assert not (inbox / "bad").exists()
    assert _incoming_left(inbox) == []

    with pytest.raises(ssh.HostKeyError) as err:
        ssh.SSHConnection(bad).run(["true"])
    assert str(known) in str(err.value) and "does not match" in str(err.value)

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    unknown = ssh.SSHSettings(**{**sshd.settings.__dict__, "known_hosts": str(empty)})
    with pytest.raises(ssh.HostKeyError, match="is not in") as err:
        ssh.SSHConnection(unknown).run(["true"])
    assert str(empty) in str(err.value)
    with pytest.raises(TransferError, match="(?i)host key verification failed"):
        transfer.send(_target(inbox, unknown), "bad", items, retries=0)
    assert not (inbox / "bad").exists()
    # The right key still works through paramiko too (the refusals above are about the key).
    assert ssh.SSHConnection(sshd.settings).run(["true"])[0] == 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _session_above(pid: int, listener: int) -> int | None:
    """The per-connection sshd process above pid (not the listener), if any."""
    while pid > 1:
        if pid == listener:
            return None
        if _cmdline(pid).startswith("sshd:"):
            return pid
        pid = _ppid(pid)
    return None


def _staging_bytes(incoming: Path) -> int:
    total = 0
    for root, _, files in os.walk(incoming):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def test_connection_killed_mid_transfer_is_sent_again(sshd, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.bin"
    sha = hashlib.sha256()
    with open(big, "wb") as fh:
        for _ in range(300):
            chunk = os.urandom(MIB)
            sha.update(chunk)
            fh.write(chunk)
    source_sha = sha.hexdigest()
    inbox = sshd.base / "inbox-cut"
    incoming = inbox / transfer.INCOMING
    listener = int((sshd.dir / "sshd.pid").read_text().strip())
    killed: list[tuple[int, str, int]] = []
    stop = threading.Event()

    def killer():
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                line = _cmdline(int(entry))
                if "scalebox_hpc.transfer" not in line or str(inbox) not in line:
                    continue
                session = _session_above(int(entry), listener)   # None for our own ssh client
                if session is None or _staging_bytes(incoming) == 0:
                    continue
                cmd = _cmdline(session)
                os.kill(session, signal.SIGKILL)
                killed.append((session, cmd, int(entry)))
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    retries = []
    items, _ = transfer.plan(["big.bin"], str(src))
    try:
        report = transfer.send(_target(inbox, sshd.settings), "cut/t", items, retries=3,
                               on_retry=lambda attempt, exc: retries.append((attempt, str(exc))))
    finally:
        stop.set()
        thread.join(10)
    assert len(killed) == 1, "the watcher never found the receiving process to cut its connection"
    session, cmd, receiver = killed[0]
    assert cmd.startswith("sshd:") and session != listener
    assert len(retries) == 1 and retries[0][0] == 1, retries
    assert report["tries"] == 2
    assert report["files"] == 1 and report["bytes"] == 300 * MIB
    assert _sha(inbox / "cut" / "t" / "big.bin") == source_sha
    # The cut receiver cleans its staging directory up on its own.
    for _ in range(300):
        if not os.path.exists(f"/proc/{receiver}"):
            break
        time.sleep(0.1)
    assert _incoming_left(inbox) == []
