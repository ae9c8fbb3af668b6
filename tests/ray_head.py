"""A real Ray head on localhost for the cluster=ray tests, stopped for sure afterwards.

Every port is chosen free and passed explicitly so the head never collides with the tests' own
local Ray instance; `ray stop` is not used because it would stop that instance too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

PORT_FLAGS = (
    "--port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--ray-client-server-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_tree(pgid: int, marker: str) -> None:
    """SIGKILL the head's process group and anything else whose command line names its temp dir
    (Ray daemonises some of its processes out of the group)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 120):
    """Yields (dashboard address http://127.0.0.1:PORT, GCS address, temp dir) of a fresh
    `ray start --head --block`."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    ray = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = (temp / "head.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers (401 under Ray's token authentication): up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start:\n{(temp / 'head.log').read_text()[-3000:]}") from None
                time.sleep(1)
        yield address, f"127.0.0.1:{ports['--port']}", temp
    finally:
        _kill_tree(proc.pid, str(temp))
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
