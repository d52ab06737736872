"""The testinfra overflow check (tests/infra/test_dispatcher.py) can fail: it compares the rendered
upstream with the overflow cap that `vfgen plan --json` reports, so lost or wrong `backup` lines fail it."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from tests.infra.test_dispatcher import check_pool_servers
from vfgen.cli import app


def rendered(*args: str) -> tuple[str, dict]:
    runner = CliRunner()
    conf = runner.invoke(app, ["render", "org/m", "-n", "3", *args, "--emit", "nginx"], catch_exceptions=False)
    plan = runner.invoke(app, ["plan", "org/m", "-n", "3", *args, "--json"], catch_exceptions=False)
    assert conf.exit_code == 0 and plan.exit_code == 0, conf.stderr + plan.stderr
    return conf.stdout, json.loads(plan.stdout)["pools"][0]


@pytest.mark.parametrize("args", [[], ["--max-queue", "4"], ["--max-queue", "0"]])
def test_check_passes_on_the_rendered_upstream(args: list[str]) -> None:
    conf, pool = rendered(*args)
    check_pool_servers(conf, pool, [])


@pytest.mark.parametrize("args", [[], ["--max-queue", "4"]])
def test_check_fails_when_every_backup_line_disappears(args: list[str]) -> None:
    conf, pool = rendered(*args)
    without_backups = "\n".join(line for line in conf.splitlines() if " backup " not in line)
    assert without_backups != conf
    with pytest.raises(AssertionError, match="overflow"):
        check_pool_servers(without_backups, pool, [])


def test_check_fails_when_the_backup_cap_is_wrong_or_backups_appear_for_no_overflow() -> None:
    conf, pool = rendered("--max-queue", "4")
    with pytest.raises(AssertionError, match="overflow caps"):
        check_pool_servers(re.sub(r"backup max_conns=4", "backup", conf), pool, [])
    conf, pool = rendered("--max-queue", "0")
    capped, _ = rendered()
    with pytest.raises(AssertionError, match="plans no overflow"):
        check_pool_servers(capped, pool, [])
