"""Ansible connection plugin for the test tier: run every command inside a booted container with nsenter.

Test-only. Chosen over community.docker.nsenter (which needs the ~550 MB
`ansible` package) and over SSH (which needs sshd in the rootfs and a network
into the container): a command costs one nsenter exec, and nothing has to
listen inside. The container's init PID is required and must not be in the
controller's mount namespace, so a missing or wrong PID can never make
Ansible configure the machine the tests run on.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: vfgen_nsenter
    short_description: Run commands in a container's namespaces with nsenter (vfgen test tier)
    description:
        - Enters every namespace of the container's init (nsenter --target PID --all) and runs the command with a clean environment.
    author: vfgen
    options:
        nsenter_pid:
            description: Host PID of the container's init. Required; there is no default.
            type: int
            required: true
            vars:
                - name: vfgen_nsenter_pid
    extends_documentation_fragment:
        - connection_pipelining
"""

import os
import shlex
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

# The container's own PATH; never the controller's (pyenv shims and the like).
CONTAINER_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"]


class Connection(ConnectionBase):
    transport = "vfgen_nsenter"
    has_pipelining = True
    default_user = "root"

    def _connect(self) -> "Connection":
        if not self._connected:
            self._nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
            self._pid = int(self.get_option("nsenter_pid"))
            try:
                target_ns = os.stat(f"/proc/{self._pid}/ns/mnt").st_ino
            except OSError as exc:
                raise AnsibleConnectionFailure(f"vfgen_nsenter: no process {self._pid}: {exc.strerror}") from None
            if target_ns == os.stat("/proc/self/ns/mnt").st_ino:
                raise AnsibleConnectionFailure(f"vfgen_nsenter: PID {self._pid} shares the controller's mount namespace; refusing")
            self._connected = True
        return self

    def _argv(self, script: str) -> list[str]:
        return [self._nsenter, "--target", str(self._pid), "--all", "--", "env", "-i", *CONTAINER_ENV, "/bin/sh", "-c", script]

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        stdin = {"input": in_data} if in_data is not None else {"stdin": subprocess.DEVNULL}
        proc = subprocess.run(self._argv(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **stdin)
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as source:
            proc = subprocess.run(self._argv(f"cat > {shlex.quote(out_path)}"), stdin=source, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise AnsibleError(f"vfgen_nsenter: cannot write {out_path}: {proc.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as target:
            proc = subprocess.run(self._argv(f"cat {shlex.quote(in_path)}"), stdout=target, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AnsibleError(f"vfgen_nsenter: cannot read {in_path}: {proc.stderr.decode(errors='replace')}")

    def close(self) -> None:
        self._connected = False
