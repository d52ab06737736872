"""Fixtures of the live tier: rendered deployments under real nginx and supervisord."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from tests.harness.deploy import LiveDeployment
from tests.harness.procs import ProcessGroup

Factory = Callable[..., LiveDeployment]


class _Deployments:
    """Starts deployments under one root and stops them all, reporting any leftover process."""

    def __init__(self, root: Path, procs: ProcessGroup) -> None:
        self.root = root
        self.procs = procs
        self.started: list[LiveDeployment] = []

    def __call__(self, spec: Mapping[str, Any] | Sequence[str], *, env: Mapping[str, str] | None = None) -> LiveDeployment:
        root = self.root / f"deployment{len(self.started)}"
        root.mkdir(parents=True)
        deployment = LiveDeployment(root, self.procs, spec, env=env)
        self.started.append(deployment)  # before start(): a half-started one is stopped too
        return deployment.start()

    def stop_all(self) -> None:
        failures = []
        for deployment in reversed(self.started):
            try:
                deployment.stop()
            except AssertionError as exc:
                failures.append(str(exc))
        self.started.clear()
        if failures:
            raise AssertionError("; ".join(failures))


@pytest.fixture
def live_deploy(procs: ProcessGroup, tmp_path: Path) -> Iterator[Factory]:
    """`live_deploy(spec)` renders, starts and waits for a deployment; all are stopped at teardown."""
    deployments = _Deployments(tmp_path, procs)
    try:
        yield deployments
    finally:
        deployments.stop_all()


@pytest.fixture(scope="module")
def module_live_deploy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Factory]:
    """Like live_deploy, shared by the tests of one module (for deployments no test disturbs)."""
    procs = ProcessGroup()
    deployments = _Deployments(tmp_path_factory.mktemp("live"), procs)
    try:
        yield deployments
    finally:
        try:
            deployments.stop_all()
        finally:
            procs.stop_all()
