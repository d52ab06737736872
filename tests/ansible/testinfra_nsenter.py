"""pytest plugin for the test tier: a testinfra backend `nsenter://PID` that runs commands inside a container.

Load it with `-p tests.ansible.testinfra_nsenter` and pass `--hosts=nsenter://PID`.
It is the same transport as the Ansible plugin in connection_plugins/, so the
user-facing suite in tests/infra runs unchanged against the test containers;
users run that suite with `--hosts=ssh://HOST`.
"""

from __future__ import annotations

import os
from typing import Any

import testinfra.backend
from testinfra.backend import base

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NsenterBackend(base.BaseBackend):
    NAME = "nsenter"

    def __init__(self, hostname: str, *args: Any, **kwargs: Any) -> None:
        self.pid = int(hostname)
        # Never the controller itself: a wrong PID must not make the suite check this machine.
        if os.stat(f"/proc/{self.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            raise RuntimeError(f"nsenter://{self.pid} shares the controller's mount namespace")
        super().__init__(hostname, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        out = self.run_local(
            "nsenter --target %s --all -- env -i PATH=%s HOME=/root LANG=C.UTF-8 /bin/sh -c %s",
            str(self.pid), CONTAINER_PATH, cmd,
        )
        out.command = self.encode(cmd)
        return out


testinfra.backend.BACKENDS.setdefault("nsenter", f"{__name__}.NsenterBackend")
