#!/usr/bin/env python3
"""Forwarding throughput over one ssh link (issue: cross-site file forwarding).

Starts its own private sshd on 127.0.0.1:PORT (tests/env/sshd-up.sh; default 7331) as the
target's login node, then measures on that link, in MB/s (10^6 bytes per second):

a) one big file (--big-mib, default 1024): transfer.send(mode="stream") against plain
   `scp` of the same file; ratio send/scp (target >= 0.9). For reference also scp with
   the cipher transfer.send prefers (-c aes128-gcm@openssh.com);
b) many small files (--small-count x --small-kib, default 10,000 x 10 KiB):
   transfer.send(mode="stream") against one paramiko SFTP put per file over one
   connection (the naive baseline); ratio stream/sftp-per-file (target >= 5). For
   reference also our sftp mode and `scp -r` of the same directory.

Each measurement is taken --repeat times (default 3), the methods taking turns, after a
`sync` (so no run pays for an earlier run's writeback); the best and the median time are
printed and the ratios use the best. Our sends reuse the transfers' ssh master connection
(ControlPersist), opened by a tiny warm-up send first, so no handshake is in their figures;
scp opens its own connection every time (a login's time is printed for comparison). Every
delivery of the big file is removed before the next run; the small-file deliveries are kept
to the end (mass deletes make the next file creations slower on ext4). Sources come from
the page cache.

Usage: bench_forward.py [--big-mib N] [--small-count N] [--small-kib N] [--repeat N]
                        [--port P] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scalebox_hpc import ssh, transfer  # noqa: E402

MIB = 1 << 20


def start_sshd(ssh_dir: Path, port: int) -> dict:
    up = subprocess.run(["bash", str(REPO / "tests" / "env" / "sshd-up.sh"), str(ssh_dir), str(port)],
                        capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"sshd-up.sh failed:\n{up.stderr[-2000:]}")
    env = {}
    for line in up.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def make_big(path: Path, mib: int) -> str:
    sha = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(mib):
            chunk = os.urandom(MIB)
            sha.update(chunk)
            fh.write(chunk)
    return sha.hexdigest()


def make_small(root: Path, count: int, kib: int) -> int:
    per_dir = 100
    total = 0
    for i in range(count):
        sub = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True)
        data = os.urandom(kib * 1024)
        (sub / f"f{i:06d}.dat").write_bytes(data)
        total += len(data)
    return total


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            sha.update(chunk)
    return sha.hexdigest()


def ssh_options(env: dict) -> list[str]:
    return ["-i", env["SSHD_KEY"], "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={env['SSHD_KNOWN_HOSTS']}", "-o", "StrictHostKeyChecking=yes"]


def sftp_per_file(settings: ssh.SSHSettings, src: Path, remote: Path) -> None:
    """The naive baseline: one connection, one SFTP put per file."""
    conn = ssh.SSHConnection(settings)
    try:
        sftp = conn.open_sftp()
        sftp.mkdir(str(remote))
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(root, src)
            target = remote if rel == "." else remote / rel
            if rel != ".":
                sftp.mkdir(str(target))
            for name in sorted(files):
                sftp.put(os.path.join(root, name), str(target / name))
        sftp.close()
    finally:
        conn.close()


def listing(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


class Timings:
    def __init__(self):
        self.runs: dict[str, list[float]] = {}

    def run(self, label: str, fn) -> None:
        os.sync()
        started = time.perf_counter()
        fn()
        self.runs.setdefault(label, []).append(time.perf_counter() - started)

    def best(self, label: str) -> float:
        return min(self.runs[label])

    def line(self, label: str, nbytes: int, files: int | None = None) -> str:
        best, median = self.best(label), statistics.median(self.runs[label])
        text = (f"   {label:34s} best {best:7.2f} s {nbytes / best / 1e6:8.1f} MB/s   "
                f"median {median:7.2f} s {nbytes / median / 1e6:8.1f} MB/s")
        if files:
            text += f"   {files / best:7.0f} files/s (best)"
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big file (MiB)")
    parser.add_argument("--small-count", type=int, default=10000, help="number of small files")
    parser.add_argument("--small-kib", type=int, default=10, help="size of each small file (KiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (best and median shown)")
    parser.add_argument("--port", type=int, default=7331, help="port of the benchmark's own sshd")
    parser.add_argument("--inbox-dir", help="where the deliveries go (default: in the work directory under "
                        "/tmp); e.g. a directory in /dev/shm to leave the file system out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (and leave sshd running)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sbx-bench-forward-"))
    ssh_dir = work / "sshd"
    env = start_sshd(ssh_dir, args.port)
    settings = ssh.SSHSettings(host="127.0.0.1", port=args.port, user="root", key=env["SSHD_KEY"],
                               known_hosts=env["SSHD_KNOWN_HOSTS"])
    inbox = Path(tempfile.mkdtemp(prefix="inbox-", dir=args.inbox_dir)) if args.inbox_dir else work / "inbox"
    target = transfer.ForwardTarget("bench", inbox=str(inbox), python=sys.executable, ssh=settings)
    scp = ["scp", "-q", *ssh_options(env), "-P", str(args.port)]
    remote = "root@127.0.0.1"
    try:
        src = work / "src"
        src.mkdir()
        big = src / "big.bin"
        print(f"preparing a {args.big_mib} MiB file and {args.small_count} x {args.small_kib} KiB files in {work}; "
              f"deliveries go to {inbox}", flush=True)
        big_sha = make_big(big, args.big_mib)
        small = src / "small"
        small_bytes = make_small(small, args.small_count, args.small_kib)
        big_bytes = big.stat().st_size
        small_listing = listing(small)

        # Warm-up: opens the ssh master connection the sends share (so no handshake below).
        (src / "tiny").write_text("x")
        started = time.perf_counter()
        transfer.send(target, "warmup", transfer.plan(["tiny"], str(src))[0], retries=0)
        warm = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run(["ssh", *ssh_options(env), "-p", str(args.port), remote, "true"], check=True)
        login = time.perf_counter() - started
        print(f"warm-up: a tiny send took {warm:.2f} s and opened the ssh master connection the sends below "
              f"reuse (no handshake in their figures); a fresh ssh login (`ssh true`) takes {login:.2f} s, "
              f"which every scp run below includes", flush=True)

        # ---------------------------------------------------------------- a) one big file
        if args.big_mib > 0:
            t = Timings()
            inbox.mkdir(exist_ok=True)
            items, _ = transfer.plan(["big.bin"], str(src))
            scp_dest = inbox / "scp-big"
            scp_dest.mkdir(parents=True)

            def send_big():
                report = transfer.send(target, "big", items, retries=0)
                assert report["bytes"] == big_bytes and report["tries"] == 1, report

            def scp_big(*extra):
                subprocess.run([*scp, *extra, str(big), f"{remote}:{scp_dest}/"], check=True)
                assert (scp_dest / "big.bin").stat().st_size == big_bytes

            for _ in range(args.repeat):
                t.run("transfer.send stream", send_big)
                assert sha256_of(inbox / "big" / "big.bin") == big_sha, "the delivered big file differs"
                shutil.rmtree(inbox / "big")
                t.run("scp", scp_big)
                (scp_dest / "big.bin").unlink()
                t.run("scp -c aes128-gcm@openssh.com", lambda: scp_big("-c", "aes128-gcm@openssh.com"))
                (scp_dest / "big.bin").unlink()
            print(f"a) one {big_bytes / MIB:.0f} MiB file, {args.repeat} runs each:")
            for label in t.runs:
                print(t.line(label, big_bytes))
            print(f"   ratio send/scp = {t.best('scp') / t.best('transfer.send stream'):.2f} (target >= 0.9); "
                  f"send/scp with the same cipher = "
                  f"{t.best('scp -c aes128-gcm@openssh.com') / t.best('transfer.send stream'):.2f}", flush=True)

        # ---------------------------------------------------------------- b) many small files
        if args.small_count > 0:
            t = Timings()
            items, _ = transfer.plan(["small"], str(src))
            n = len(items)
            for i in range(args.repeat):
                def send_small(mode: str):
                    report = transfer.send(target, f"small-{mode}-{i}", items, mode=mode, retries=0)
                    assert report["files"] == n and report["bytes"] == small_bytes, report
                    assert listing(inbox / f"small-{mode}-{i}" / "small") == small_listing

                def put_each():
                    sftp_per_file(settings, small, inbox / f"sftp-per-file-{i}")
                    assert listing(inbox / f"sftp-per-file-{i}") == small_listing

                def scp_r():
                    (inbox / f"scp-r-{i}").mkdir()
                    subprocess.run([*scp, "-r", str(small), f"{remote}:{inbox}/scp-r-{i}/"], check=True)
                    assert listing(inbox / f"scp-r-{i}" / "small") == small_listing

                t.run("transfer.send stream", lambda: send_small("stream"))
                t.run("sftp put per file (paramiko)", put_each)
                t.run("transfer.send sftp mode", lambda: send_small("sftp"))
                t.run("scp -r", scp_r)
            print(f"b) {n} files x {args.small_kib} KiB = {small_bytes / 1e6:.1f} MB, {args.repeat} runs each:")
            for label in t.runs:
                print(t.line(label, small_bytes, n))
            stream = t.best("transfer.send stream")
            print(f"   ratio stream / sftp-per-file = {t.best('sftp put per file (paramiko)') / stream:.1f}x "
                  f"(target >= 5); stream / our sftp mode = {t.best('transfer.send sftp mode') / stream:.1f}x; "
                  f"stream / scp -r = {t.best('scp -r') / stream:.1f}x", flush=True)
    finally:
        argv = ssh.openssh_argv(settings)
        subprocess.run([*argv[:-1], "-O", "exit", argv[-1]], capture_output=True)
        if args.keep:
            print(f"kept {work} (sshd still running: bash tests/env/sshd-down.sh {ssh_dir})")
        else:
            subprocess.run(["bash", str(REPO / "tests" / "env" / "sshd-down.sh"), str(ssh_dir)],
                           capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(inbox, ignore_errors=True)


if __name__ == "__main__":
    main()
