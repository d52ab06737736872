"""Under a real systemd 252 (nspawn): a start that never becomes healthy fails after --start-timeout,
releases the GPU start lock, and the next instance on the GPU starts.

Two stand-ins on GPU 0, --start-timeout 3. Instance 0's stand-in never opens its
port (--fake-hang-on-port). Its launcher stops it 3 s after taking the lock, frees
the lock and exits 1; the unit fails, and instance 1 (ordered After= it) starts,
takes the lock and becomes active. The unit timeouts are the plan's: TimeoutStartSec
= lock wait + start timeout + 60 s.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from tests.harness.nspawn import booted_container, service_binds
from tests.harness.systemd_deploy import Spec, SystemdDeployment

pytestmark = pytest.mark.systemd

START_TIMEOUT = 3


def test_hung_start_fails_after_start_timeout_and_the_next_instance_starts(rootfs: Path) -> None:
    spec = Spec(name="st", instances=2, cuda_devices="0", startup_delay=0.0, start_timeout=START_TIMEOUT,
                extra_env=(f"VFGEN_FAKE_HANG_ON_PORT={Spec.port_start}",))
    with booted_container(binds=service_binds(), rootfs=rootfs) as container:
        d = SystemdDeployment(container, spec)
        d.prepare()
        d.install()
        hung, next_ = d.units
        try:
            container.systemctl("start", "--no-block", d.target)
            d.wait_until(lambda: d.props(next_, "ActiveState")["ActiveState"] == "active", 60, f"{next_} active")
            plan = d.instance(hung)
            print(f"\nplan of {hung}: lock {plan['lock_timeout']}s, start {plan['start_timeout']}s, "
                  f"unit {plan['unit_start_timeout']}s")
            assert plan["start_timeout"] == START_TIMEOUT and plan["lock_timeout"] == START_TIMEOUT + 30
            assert d.props(hung, "TimeoutStartUSec")["TimeoutStartUSec"] == f"{plan['unit_start_timeout'] // 60}min {plan['unit_start_timeout'] % 60}s"
            journal = d.journal_text(hung)
            print(journal)
            assert f"not healthy after {START_TIMEOUT}s" in journal and "released GPU lock(s)" in journal
            assert "vfgen-launch" in d.journal_text(next_) and "healthy after" in d.journal_text(next_)
            # Start windows on GPU 0 (stand-in exec -> ready, or exit for the hung one) never overlap,
            # and instance 1 started once the hung one had exited.
            ends: dict[int, list] = {}
            for e in d.events():
                if e["event"] == "exec":
                    ends[e["pid"]] = [e["t"], None, e["port"]]
                elif e["event"] in ("ready", "exit") and e["pid"] in ends and ends[e["pid"]][1] is None:
                    ends[e["pid"]][1] = e["t"]
            windows = sorted((a, b if b is not None else float("inf"), port) for a, b, port in ends.values())
            print("windows:", [(round(a - windows[0][0], 2), round(b - windows[0][0], 2), p) for a, b, p in windows])
            assert all(b[0] >= a[1] for a, b in pairwise(windows)), windows
            assert windows[0][2] == Spec.port_start and windows[1][2] == Spec.port_start + 1, windows
        except Exception:
            print(d.diagnostics())
            raise
        finally:
            container.systemctl("stop", d.target, *d.units, check=False, timeout=60)
