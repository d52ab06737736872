"""Run a rendered deployment on this machine under a private nginx and supervisord (demo and tests).

Everything lives in one work directory: the rendered tree, the wrapper
nginx.conf and supervisord.conf that include it, sockets, pids and logs.
Nothing outside it is touched, and `stop()` ends every process it started.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from vfgen import procfs
from vfgen.errors import VfgenError

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _ephemeral_low() -> int:
    """Start of the kernel's range for outgoing connections, which may grab a port we picked."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int, host: str = "127.0.0.1", low: int = 20000, high: int | None = None) -> int:
    """First of `count` consecutive ports that are free right now (each checked by binding it).

    By default the ports lie below the ephemeral range, so no client connection takes them meanwhile.
    """
    high = high or max(low + count + 1, _ephemeral_low())
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(low, high - count)
        socks = []
        try:
            for port in range(start, start + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return start
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise VfgenError(f"no {count} consecutive free ports found on {host}")


def find_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)
    if found is None:
        raise VfgenError(f"{name} is not installed (Debian: apt-get install {package})")
    return found


def nginx_main_conf(workdir: Path, include: Path, workers: int = 2) -> str:
    """A complete nginx.conf that includes one rendered http-context file."""
    return (
        f"worker_processes {workers};\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/nginx-error.log warn;\n"
        "daemon off;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        f"    access_log off;\n"
        f"    client_body_temp_path {workdir}/nginx-body;\n"
        f"    proxy_temp_path {workdir}/nginx-proxy;\n"
        f"    include {include};\n"
        "}\n"
    )


def supervisord_main_conf(workdir: Path, include: Path) -> str:
    """A supervisord.conf in the foreground, with its socket and logs in workdir, including one rendered conf."""
    return (
        "[supervisord]\n"
        "nodaemon=true\n"
        f"logfile={workdir}/supervisord.log\n"
        f"pidfile={workdir}/supervisord.pid\n"
        f"childlogdir={workdir}\n"
        "[unix_http_server]\n"
        f"file={workdir}/supervisor.sock\n"
        "[supervisorctl]\n"
        f"serverurl=unix://{workdir}/supervisor.sock\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        "[include]\n"
        f"files = {include}\n"
    )


class LocalRun:
    """nginx + supervisord over a rendered tree in `workdir` (rendered with --backend supervisord)."""

    def __init__(self, workdir: Path, nginx_conf: Path | None, supervisord_conf: Path) -> None:
        self.workdir = workdir
        self.nginx_bin = find_tool("nginx", "nginx-light") if nginx_conf else None
        self.supervisord_bin = find_tool("supervisord", "supervisor")
        self.supervisorctl_bin = find_tool("supervisorctl", "supervisor")
        self.nginx_main = workdir / "nginx.conf"
        self.supervisord_main = workdir / "supervisord.conf"
        if nginx_conf:
            self.nginx_main.write_text(nginx_main_conf(workdir, nginx_conf))
        self.supervisord_main.write_text(supervisord_main_conf(workdir, supervisord_conf))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        if self.nginx_bin:
            check = subprocess.run([self.nginx_bin, "-t", "-q", "-p", str(self.workdir), "-c", str(self.nginx_main)],
                                   capture_output=True, text=True, timeout=30)
            if check.returncode != 0:
                raise VfgenError(f"nginx -t rejected the rendered config:\n{check.stderr.strip()}")
        log = open(self.workdir / "processes.log", "ab")
        self.procs.append(subprocess.Popen([self.supervisord_bin, "-c", str(self.supervisord_main)],
                                           stdout=log, stderr=log, start_new_session=True))
        if self.nginx_bin:
            self.procs.append(subprocess.Popen([self.nginx_bin, "-p", str(self.workdir), "-c", str(self.nginx_main)],
                                               stdout=log, stderr=log, start_new_session=True))

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.supervisorctl_bin, "-c", str(self.supervisord_main), *args],
                              capture_output=True, text=True, timeout=120)

    def stop(self, timeout: float = 60.0) -> None:
        """supervisord stops its programs (and so vLLM) on SIGTERM; nginx quits on SIGTERM."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_session(proc.pid)
        self.procs.clear()


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process left in session `sid` (supervisord's children set their own process groups)."""
    killed = []
    for pid, fields in procfs.stat_fields().items():
        if int(fields[procfs.SESSION]) == sid and fields[procfs.STATE] != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return killed
