"""Every error scenario is a fixture file carrying its own assertions.

tests/fixtures/errors/*.yaml are deployment files run as
`vfgen render -f FILE --output-dir DIR`; tests/fixtures/cli-errors/*.args
hold one command line ({ROOT} is the repository, {FIXTURES} tests/fixtures, {NL} a newline). Header
lines `# expect-exit: N`, `# expect-stderr: TEXT` and `# reject-stderr: TEXT`
(both repeatable) are the assertions. Every case must also leave the output
directory empty and print no traceback.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vfgen.cli import app

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOT = FIXTURES.parent.parent


def _expectations(path: Path) -> tuple[int, list[str], list[str], list[str]]:
    code, stderr, rejected, body = None, [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# expect-exit:"):
            code = int(line.split(":", 1)[1])
        elif line.startswith("# expect-stderr:"):
            stderr.append(line.split(":", 1)[1].strip())
        elif line.startswith("# reject-stderr:"):
            rejected.append(line.split(":", 1)[1].strip())
        elif line.strip() and not line.startswith("#"):
            body.append(line)
    assert code is not None and stderr, f"{path.name}: fixture lacks expect-exit / expect-stderr"
    return code, stderr, rejected, body


def _run(argv: list[str]):
    return CliRunner().invoke(app, argv, catch_exceptions=False)


def _check(path: Path, argv: list[str], out_dir: Path) -> None:
    code, expected, rejected, _ = _expectations(path)
    result = _run(argv)
    stderr = result.stderr
    assert result.exit_code == code, f"{path.name}: exit {result.exit_code}, stderr: {stderr}"
    for text in expected:
        assert text in stderr, f"{path.name}: {text!r} not in stderr:\n{stderr}"
    for text in rejected:
        assert text not in stderr, f"{path.name}: {text!r} in stderr:\n{stderr}"
    assert "Traceback" not in stderr + result.stdout
    if code == 1:
        assert stderr.startswith("Error: "), stderr
    assert not out_dir.exists() or not any(out_dir.rglob("*")), f"{path.name}: files were written"


@pytest.mark.parametrize("path", sorted((FIXTURES / "errors").glob("*.yaml")), ids=lambda p: p.stem)
def test_deployment_file_errors(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = path.read_text(encoding="utf-8")
    deployment = path
    if "{FIXTURES}" in text:  # fixtures that name files (adapter dirs, model configs) by absolute path
        deployment = tmp_path / path.name
        deployment.write_text(text.replace("{FIXTURES}", str(FIXTURES)), encoding="utf-8")
    _check(path, ["render", "-f", str(deployment), "--output-dir", str(out)], out)


@pytest.mark.parametrize("path", sorted((FIXTURES / "cli-errors").glob("*.args")), ids=lambda p: p.stem)
def test_cli_errors(path: Path, tmp_path: Path) -> None:
    *_, body = _expectations(path)
    argv = [a.replace("{NL}", "\n").replace("{FIXTURES}", str(FIXTURES)).replace("{ROOT}", str(ROOT)) for a in shlex.split(body[0])]
    out = tmp_path / "out"
    if argv[0] == "render" and "--emit" not in argv:
        split = argv.index("--") if "--" in argv else len(argv)
        argv[split:split] = ["--output-dir", str(out)]
    _check(path, argv, out)


def test_verbose_shows_traceback() -> None:
    with pytest.raises(Exception) as info:
        CliRunner().invoke(app, ["--verbose", "render", "org/m", "-n", "0"], catch_exceptions=False)
    assert "--instances=0" in str(info.value)


def test_version_and_bare_invocation() -> None:
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("vfgen ")
    bare = CliRunner().invoke(app, [])
    assert bare.exit_code == 2 and "render" in bare.stdout


def test_secret_in_env_renders_with_a_warning_on_stderr(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--env", "HF_TOKEN=hf_x", "--output-dir",
                                      str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Warning: env HF_TOKEN looks like a secret" in result.stderr and "--env-file" in result.stderr
    assert (tmp_path / "etc/systemd/system/vllm-m-0.service").exists()
