"""ansible-lint with the production profile is clean on the role and the example playbooks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.ansible.harness import EXAMPLES, REPO_ROOT, ROLES_PATH
from tests.harness.tools import require_tool

pytestmark = pytest.mark.ansible


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    lint = require_tool("ansible-lint", "ansible-lint: run scripts/install-ansible-tier.sh")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
           "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "ANSIBLE_ROLES_PATH": str(ROLES_PATH), "NO_COLOR": "1"}
    argv = [lint, "--offline", "--nocolor", "--profile", "production", "ansible/", str(EXAMPLES.relative_to(REPO_ROOT))]
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output
    # Every playbook and role file was linted, not skipped as unknown.
    assert "0 failure(s), 0 warning(s)" in output, output
