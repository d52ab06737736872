"""Restart vLLM instances one at a time, each healthy again before the next is touched.

With systemd, `systemctl restart UNIT` itself blocks on the unit's ExecStartPost health
wait; with supervisord, `supervisorctl restart PROGRAM` returns once the launcher runs.
Either way the instance must then pass `vfgen.health.wait` before the next restart, so at
most one instance is out of the pool at any moment. The first failure stops the rollout
(exit 1) and names the instance; later instances are left untouched.

With a dispatcher on this host (the manifest under --output-dir lists its nginx conf),
each instance is drained first, as `vfgen apply` does (vfgen.apply.Executor.drain): nginx
marks it `down` and reloads, its in-flight requests finish, and only then does it
restart; it is served again from the next reload on.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from vfgen.errors import ConfigError, VfgenError
from vfgen.health import wait


@dataclass(frozen=True)
class RolloutStep:
    name: str  # unit name (systemd) or program name (supervisord)
    url: str  # instance base URL
    expected_model: str


def _restart_command(step: RolloutStep, backend: str, supervisorctl: list[str] | None,
                     systemctl: list[str] | None) -> list[str]:
    if backend == "systemd":
        return [*(systemctl or ["systemctl"]), "restart", step.name]
    return [*(supervisorctl or ["supervisorctl"]), "restart", step.name]


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _tail(output: str | bytes | None, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in _text(output).strip().splitlines()[-lines:] if line.strip())


def rollout(steps: list[RolloutStep], *, backend: str, timeout: float, supervisorctl: list[str] | None = None,
            systemctl: list[str] | None = None, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
            out: TextIO | None = None, drain: Callable[[RolloutStep], None] | None = None,
            served: Callable[[RolloutStep], None] | None = None, finish: Callable[[], None] | None = None) -> int:
    """Restart each step in order; `timeout` bounds each step (restart plus health wait). 0 done, 1 stopped.

    `drain(step)` runs before a restart (nginx stops sending the instance requests and its
    in-flight ones finish), `served(step)` once it is healthy again, `finish()` at the end
    and after a failure; a VfgenError from them stops the rollout like a failed restart.
    """
    if backend not in ("systemd", "supervisord"):
        raise ConfigError("backend", backend, "must be 'systemd' or 'supervisord'")
    out = out if out is not None else sys.stderr

    def say(message: str) -> None:
        out.write(message + "\n")
        out.flush()

    def stopped(index: int, step: RolloutStep, why: str) -> int:
        untouched = [s.name for s in steps[index + 1:]]
        if finish is not None:
            try:
                finish()
            except VfgenError as exc:
                say(f"rollout: could not update nginx after the failure: {exc}")
        say(f"rollout stopped at {step.name}: {why}")
        say(f"{index} of {len(steps)} instance(s) restarted"
            + (f"; not touched: {', '.join(untouched)}" if untouched else ""))
        return 1

    began = time.monotonic()
    for index, step in enumerate(steps):
        command = _restart_command(step, backend, supervisorctl, systemctl)
        step_began = time.monotonic()
        if drain is not None:
            say(f"[{index + 1}/{len(steps)}] {step.name}: draining")
            try:
                drain(step)
            except VfgenError as exc:
                return stopped(index, step, f"drain failed: {exc}")
        say(f"[{index + 1}/{len(steps)}] {step.name}: {' '.join(command)}")
        try:
            result = runner(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return stopped(index, step, f"restart did not finish within {timeout:g}s")
        except OSError as exc:
            return stopped(index, step, f"cannot run {command[0]}: {exc.strerror or exc}")
        restart_s = time.monotonic() - step_began
        output = _tail(result.stderr) or _tail(result.stdout)
        # Old supervisorctl exits 0 even on "ERROR (spawn error)"; "ERROR (not running)" from
        # the stop half is harmless, so look for the start half's "started".
        if result.returncode != 0 or (backend == "supervisord" and "started" not in _text(result.stdout)):
            return stopped(index, step, f"restart failed (exit {result.returncode})" + (f": {output}" if output else ""))
        say(f"[{index + 1}/{len(steps)}] {step.name}: restarted in {restart_s:.1f}s; waiting for health")
        remaining = max(1.0, timeout - restart_s)
        if wait([step.url], model=step.expected_model, timeout=remaining, out=out) != 0:
            return stopped(index, step, f"not healthy within {timeout:g}s of the restart ({step.url})")
        say(f"[{index + 1}/{len(steps)}] {step.name}: healthy; step took {time.monotonic() - step_began:.1f}s")
        if served is not None:
            served(step)
    if finish is not None:
        try:
            finish()
        except VfgenError as exc:
            say(f"rollout: every instance restarted, but the final nginx update failed: {exc}")
            return 1
    say(f"rollout complete: {len(steps)} instance(s) in {time.monotonic() - began:.1f}s")
    return 0
