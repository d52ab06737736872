"""The launcher reads an env_file exactly as real systemd's EnvironmentFile= does.

Under systemd the unit's EnvironmentFile= reads a deployment's env_file; under
supervisord `vfgen launch --env-file` does. One file must give vLLM the same
environment either way. Each corpus file below is handed to a transient
service of a real systemd 252 (booted in nspawn) that prints its environment,
and to vfgen.launch.read_env_file; the variables the file added must be equal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.nspawn import Container, booted_container, service_binds
from vfgen.launch import EnvFileError, read_env_file

pytestmark = pytest.mark.systemd

DUMP_ENV = "import json, os; print(json.dumps(dict(os.environ)))"

# name -> file content. Every name the corpus sets starts with P_, so none collides with
# what systemd itself puts in a service's environment.
CORPUS: dict[str, bytes] = {
    "plain": b"P_A=1\nP_B=two words\n",
    "blanks-around-key-and-value": b"  P_A = x  \n\tP_B=\t y \t\n",
    "double-quotes-and-their-escapes": b'P_A="a b"\nP_B="x\\"y"\nP_C="\\$HOME \\` \\\\ \\n \\q"\n',
    "single-quotes-are-literal": b"P_A='a \"b\" \\n'\nP_B='multi\nline'\n",
    "quoted-parts-concatenate": b"P_A=\"a\" \"b\"\nP_B='x'y\nP_C=a \"b\"\n",
    "backslashes-unquoted": b'P_A=a\\ b\\\\c\\"d\nP_B=trail\\ \nP_C=\\x\n',
    "continuation-lines": b"P_A=first \\\n  second\nP_B=\"dq \\\ncont\"\nP_C=x\\\n",
    "comments": b"# c\n; c2\n  # indented\nP_A=1 # not a comment\n#cont \\\nP_SWALLOWED=1\nP_B=2\n",
    "crlf-line-ends": b"P_A=1\r\nP_B=\"x\"\r\nP_C=y \r\n",
    "last-assignment-wins": b"P_A=1\nP_B=b\nP_A=2\n",
    "lines-systemd-drops": b"P_A=1\nP_NOEQ value\n1P_BAD=x\nP-DASH=x\nexport P_EXP=1\nP \xc3\xa9=1\nP_OK=2\n",
    "empty-values-and-no-final-newline": b"P_A=\nP_B=''\nP_C=\"\"\nP_D=",
    "utf-8-values": "P_A=h\u00e9llo \u2713\nP_B='\u00fc'\n".encode(),
    "no-variable-expansion": b"P_A=$PATH\nP_B=${HOME}x\nP_C=%h\n",
    "equals-signs-in-values": b"P_A=a=b=c\nP_B==\n",
    "unterminated-quote-runs-to-the-end": b'P_A="open\nP_B=2\n',
    "secret-shaped": b"HF_TOKEN_P=hf_abc\nP_TOKEN='s3 cr=t#x'\n",
}

# Files systemd refuses: the unit does not start, and the launcher exits 1 naming the line.
REFUSED: dict[str, tuple[bytes, str]] = {
    "invalid-utf-8-value": (b"P_A=1\nP_B=\xff\xfe\n", ":2: invalid UTF-8"),
    # systemd 252: "Failed to load environment files: Bad message".
    "nul-byte": (b"P_A=1\nP_B=x\0y\n", ": a NUL byte"),
}


@pytest.fixture(scope="module")
def container(rootfs: Path) -> Iterator[Container]:
    with booted_container(binds=service_binds(), rootfs=rootfs) as booted:
        yield booted


def _systemd_environment(container: Container, name: str, content: bytes) -> tuple[int, dict[str, str] | None, str]:
    """(exit code, environment or None when it did not start, journal) of a unit reading `content`."""
    env_path, out_path = f"/root/parity/{name}.env", f"/root/parity/{name}.json"
    container.write_file(env_path, content, mode=0o600)
    unit = f"parity-{name}"
    result = container.run(
        ["systemd-run", "--wait", "--quiet", f"--unit={unit}", f"-pEnvironmentFile={env_path}",
         f"-pStandardOutput=file:{out_path}", "/usr/bin/python3", "-c", DUMP_ENV],
        check=False,
    )
    out = container.run(["cat", out_path], check=False).stdout
    env = json.loads(out) if result.returncode == 0 and out.strip() else None
    return result.returncode, env, container.journal(f"{unit}.service", lines=20)


@pytest.fixture(scope="module")
def baseline_keys(container: Container) -> set[str]:
    code, env, journal = _systemd_environment(container, "empty", b"")
    assert code == 0 and env, journal
    return set(env)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_launcher_reads_the_file_as_systemd_does(container: Container, baseline_keys: set[str], tmp_path: Path,
                                                 name: str) -> None:
    content = CORPUS[name]
    code, env, journal = _systemd_environment(container, name, content)
    assert code == 0 and env is not None, f"systemd did not start with {name}: {journal}"
    from_systemd = {k: v for k, v in env.items() if k not in baseline_keys}
    local = tmp_path / f"{name}.env"
    local.write_bytes(content)
    from_launcher = read_env_file(str(local))
    assert from_launcher == from_systemd, f"{name}: launcher {from_launcher!r} != systemd {from_systemd!r}"
    # A corpus file that set nothing would prove nothing.
    assert from_systemd, name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_file_systemd_refuses_stops_the_launcher_too(container: Container, tmp_path: Path, name: str) -> None:
    content, message = REFUSED[name]
    code, env, journal = _systemd_environment(container, name, content)
    assert code != 0 and env is None, f"systemd started with {name}: {env}"
    assert "Failed to load environment files" in journal, journal
    local = tmp_path / f"{name}.env"
    local.write_bytes(content)
    with pytest.raises(EnvFileError, match=re.escape(message)):
        read_env_file(str(local))
