"""Arbitrary text in every user-controlled field: rejected by name, or rendered intact.

For each field a user controls, hypothesis feeds arbitrary strings (nasty
pieces: quotes, backslashes, `$`, `%`, `;`, braces, `#`, newlines, NUL,
unicode, surrogates, leading `-`, specifiers, variables). For every value one
of two things must happen:

- vfgen raises ConfigError, its field is the one fuzzed, and its message is one
  printable line; or
- every rendered file reads back (nginx: crossplane + nginx's unescaping;
  systemd: the strict model in tests/security/parsers.py, checked against a real
  systemd in test_real_tools.py; supervisord: its own ServerOptions) with
  exactly the structure rendered for a harmless marker, the value in each place
  the marker was (tests/security/diff.py), and every command line equal to the
  planned argv.

Reproducible: derandomize=True and no example database. The example count and
time per field are printed at the end of the run. VFGEN_FUZZ_SCALE=0.1 makes it
quicker while developing; CI runs at 1 (over 10,000 examples).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.security import parsers
from tests.harness.tools import in_ci
from tests.security.diff import Subst, assert_same_modulo
from vfgen import config
from vfgen.errors import ConfigError
from vfgen.output import resolve_inside
from vfgen.plan import build_plan
from vfgen.render import render_all

SCALE = float(os.environ.get("VFGEN_FUZZ_SCALE", "1"))
TOTAL_REQUIRED = 10_000


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        # The counter fixture is meant to be shared by all examples of a test.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


# --- the nasty text -----------------------------------------------------------------------

PIECES = [
    '"', "'", "\\", "\\\\", '\\"', "$", "$$", "${HOME}", "$HOME", "${MAINPID}", "%", "%%", "%n", "%i", "%(here)s",
    "%(ENV_HOME)s", ";", "{", "}", "#", " #", " ;", "\n", "\r", "\t", "\x00", "\x7f", "\x85", "\u2028", "\ufeff",
    "\u202e", "\ud800", "é", "日本語", "🙂", " ", "  ", "-", "--", "-o", "--port", "--host=0.0.0.0", "--served-model-name",
    "/", "..", "/../", "./", "~", "*", "?", "[", "]", "^", "|", "&", "<", ">", "(", ")", "`", "=", ":", ",", "@", "+",
    "!", "\\n", "\\t", "\\x41", "\\u0041", "\\101", "include /etc/passwd;", "server {", "return 200 x;", "location /",
    "]:80 default_server; #", "[program:x]", "command=/bin/sh", "ExecStartPre=/bin/sh", "a=b", "0.0.0.0", "::1",
    "fe80::1%eth0", "localhost", "127.0.0.1", "r/s", "20r/s", "16", "abcdefghijklmnop", "sk-live-0123456789abcdef",
]
NAMEISH = string.ascii_letters + string.digits + "._-/"

nasty_text = st.lists(
    st.one_of(
        st.sampled_from(PIECES),
        st.text(max_size=6),
        st.text(alphabet=NAMEISH, min_size=1, max_size=10),
    ),
    max_size=8,
).map("".join)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Printable pieces (no control characters, no surrogates): values that pass validation
# more often, so the render-and-parse path gets exercised too.
PRINTABLE_PIECES = [p for p in PIECES if not CONTROL.search(p) and not re.search("[\ud800-\udfff]", p)]
printable_unicode = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=6)
free_text = st.lists(
    st.one_of(st.text(alphabet=NAMEISH, min_size=1, max_size=12), st.sampled_from(PRINTABLE_PIECES), printable_unicode),
    min_size=1, max_size=5,
).map("".join)
# ... and without the characters served names may not hold.
mostly_valid_text = free_text.map(lambda t: t.replace('"', "'").replace("\\", "/").replace("$", "%"))
field_text = st.one_of(nasty_text, mostly_valid_text, free_text)
address_text = st.one_of(
    field_text,
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,12}(\.[a-z][a-z0-9-]{0,8}){0,2}\Z"),
)
user_text = st.one_of(field_text, st.from_regex(r"\A[a-z_][a-z0-9_-]{0,33}\Z"))
env_key_text = st.one_of(field_text, st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z"))
path_text = st.one_of(field_text, st.lists(st.text(alphabet=NAMEISH, min_size=1, max_size=8), min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)))
# Adapter paths: mostly Hub ids (org/name), which need no file to exist, so they render.
repo_id_text = st.one_of(field_text, st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,10}/[A-Za-z0-9._-]{1,10}\Z"))

# --- the deployment around the fuzzed value -------------------------------------------------


def base_mapping(log_dir: Path) -> dict[str, Any]:
    """Two models (so routing by the JSON "model" field, the /v1/models JSON and error JSON are rendered)."""
    return {
        "name": "fz",
        "user": "nobody",
        "log_dir": str(log_dir),
        "vfgen_bin": "/usr/local/bin/vfgen",
        "vllm_bin": "/opt/vllm/bin/vllm",
        "models": [
            {"model": "org/first", "name": "first", "served_model_name": ["first"], "instances": 2,
             "env": {"HF_HUB_OFFLINE": "1"}, "extra_args": ["--trust-remote-code"]},
            {"model": "org/second", "name": "second", "served_model_name": ["second"]},
        ],
    }


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Scratch files are rewritten for every example: tmpfs makes that ~30x cheaper than a disk.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="vfgen-fuzz-", dir=shm if os.access(shm, os.W_OK) else None))
    try:
        (root / "logs").mkdir()
        (root / "scratch").mkdir()
        keys = root / "benign-keys"
        keys.write_text("zqx-benign-key-0123456789\n")
        keys.chmod(0o600)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Rendered:
    deployment: config.Deployment
    plan: Any
    files: dict[str, Any]  # artefact key -> parsed form
    texts: dict[str, str]  # artefact key -> rendered text


def render_parsed(raw: dict[str, Any], scratch: Path, *, cli: dict[str, Any] | None = None, known_users: bool = True,
                  reference: Rendered | None = None) -> Rendered:
    """Validate, plan, render, and read every file back. Raises ConfigError for rejected input.

    A file whose text equals the reference's is not parsed again: identical
    bytes parse identically, and equal text is the stronger check.
    """
    if cli is not None:
        from vfgen.cli import load_deployment

        deployment = load_deployment(cli)
    else:
        deployment = config.parse_deployment(raw, source="fuzz.yaml")
    plan = build_plan(deployment)
    files: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for art in render_all(plan):
        # Paths that come from input stay inside any output root.
        assert not os.path.isabs(art.path) and ".." not in art.path.split("/"), art.path
        assert str(resolve_inside(scratch, art.path)).startswith(str(scratch.resolve())), art.path
        key = "keys" if art.secret else art.kind if art.kind not in ("systemd", "nginx-exporter") else art.name
        texts[key] = art.content
        if reference is not None and reference.texts.get(key) == art.content:
            files[key] = reference.files[key]
            continue
        if art.secret:
            assert art.mode == 0o600
            files["keys"] = parsers.parse_nginx_text("map $a $b {\n" + art.content + "}\n", scratch / "keys.conf")
        elif art.kind == "nginx":
            assert art.mode & 0o004, "the dispatcher conf is meant to be world-readable"
            files["nginx"] = parsers.parse_nginx_text(art.content, scratch / "dispatcher.conf")
        elif art.kind in ("systemd", "nginx-exporter"):
            files[art.name] = parsers.parse_unit(art.content)
        elif art.kind == "supervisord":
            files["supervisord"] = parsers.parse_supervisord(art.content, scratch, known_users=known_users)
        elif art.kind == "prometheus":
            files["prometheus"] = parsers.json_or_none(art.content)
        elif art.kind == "prometheus-rules":
            files["prometheus-rules"] = parsers.yaml_document(art.content)
        else:
            raise AssertionError(f"unexpected artefact {art.path}")
    return Rendered(deployment, plan, files, texts)


def check_planned_argv(plan, files) -> None:
    """Every command line reads back as exactly the argv the plan intends."""
    for inst in plan.instances:
        unit = files[inst.unit]
        assert parsers.unit_values(unit, "ExecStart") == [inst.exec_start]
        env = parsers.unit_environment(unit)
        assert env[-len(inst.env):] == list(inst.env), (env, inst.env)
        assert files["supervisord"][inst.name]["argv"] == inst.supervisor_command


class Case:
    """One fuzzed field: where the value goes, its marker, and how an accepted value must appear."""

    def __init__(self, label: str, place: Callable[[dict, Any], None], marker: Any, *,
                 subst: Callable[[Any, config.Deployment], dict[str, Subst]] | None = None, known_users: bool = True,
                 literal: tuple[str, ...] = ()):
        self.label = label
        self.place = place
        self.marker = marker
        self.subst = subst or (lambda value, d: {self.marker: Subst(value)})
        self.known_users = known_users
        # Values that legitimately change the structure: compared with their own render, unfuzzed.
        self.literal = literal


def _model(raw: dict) -> dict:
    return raw["models"][0]


def _connect_form(address: str) -> str:
    if address == "0.0.0.0":
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address


def _set(path: tuple, value_of=lambda v: v):
    def place(raw: dict, value: Any) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value_of(value)
    return place


CASES: dict[str, Case] = {
    "model_source": Case("models[0].model", _set(("models", 0, "model")), "zqxsource"),
    "served_name": Case("models[0].served_model_name", _set(("models", 0, "served_model_name"), lambda v: [v, "first"]), "zqxservedname"),
    "alias": Case("models[0].aliases", _set(("models", 0, "aliases"), lambda v: [v]), "zqxalias"),
    "env_key": Case("models[0].env", _set(("models", 0, "env"), lambda v: {v: "1"}), "ZQXKEY"),
    "env_value": Case("models[0].env.MY_VAR", _set(("models", 0, "env"), lambda v: {"MY_VAR": v}), "zqxenvvalue"),
    "instance_env_value": Case(
        "models[0].instance_env[1].MY_VAR", _set(("models", 0, "instance_env"), lambda v: [{}, {"MY_VAR": v}]), "zqxinstenv"),
    # root: supervisord's `user=` line is left out on purpose.
    "user": Case("user", _set(("user",)), "zqxuser", known_users=False, literal=("root",)),
    "listen": Case("listen", _set(("listen",)), "127.0.0.98",
                   subst=lambda v, d: {"127.0.0.98": Subst(d.listen, f"[{d.listen}]" if ":" in d.listen else d.listen)}),
    "host": Case("host", _set(("host",)), "127.0.0.98",
                 subst=lambda v, d: {"127.0.0.98": Subst(d.host, _connect_form(d.host))}),
    "upstream_host": Case("upstream_hosts", _set(("upstream_hosts",), lambda v: [v]), "10.0.0.98",
                          subst=lambda v, d: {"10.0.0.98": Subst(d.upstream_hosts[0], _connect_form(d.upstream_hosts[0]))}),
    "vfgen_bin": Case("vfgen_bin", _set(("vfgen_bin",)), "/zqx/vfgen"),
    "vllm_bin": Case("vllm_bin", _set(("vllm_bin",)), "/zqx/vllm"),
    "io_processor_plugin": Case("models[0].io_processor_plugin", _set(("models", 0, "io_processor_plugin")), "zqxplugin"),
    # base_model_name makes vLLM's JSON spelling of --lora-modules, the form any name may take.
    "lora_name": Case("models[0].lora_modules[0].name", _set(("models", 0, "lora_modules"), lambda v: [
        {"name": v, "path": "org/zqx-adapter", "base_model_name": "first"}]), "zqxlora"),
    "lora_path": Case("models[0].lora_modules[0].path", _set(("models", 0, "lora_modules"), lambda v: [
        {"name": "zqxlora", "path": v, "base_model_name": "first"}]), "zqx/adapter"),
}
FIELD_NAMES = sorted(CASES)


def run_case(case: Case, value: Any, workdir: Path, count, *, extra: dict | None = None) -> None:
    raw = base_mapping(workdir / "logs")
    raw.update(extra or {})
    case.place(raw, value)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    literal = value if value in case.literal else None
    benign = benign_render(case, workdir, tuple(sorted((extra or {}).items())), literal)
    try:
        got = render_parsed(raw, scratch, known_users=case.known_users, reference=benign)
    except ConfigError as exc:
        assert_names_field(exc, case.label)
        count(False)
        return
    subst = {} if literal else case.subst(value, got.deployment)
    assert_same_modulo(got.files, benign.files, subst, case.label)
    check_planned_argv(got.plan, got.files)
    count(True)


@functools.lru_cache(maxsize=None)
def benign_render(case: Case, workdir: Path, extra: tuple, literal: str | None) -> Rendered:
    """The render of the case's marker (or of a literal value), cached per case object."""
    raw = base_mapping(workdir / "logs")
    raw.update(dict(extra))
    case.place(raw, case.marker if literal is None else literal)
    scratch = workdir / "benign-scratch"
    scratch.mkdir(exist_ok=True)
    return render_parsed(raw, scratch, known_users=case.known_users)


def assert_names_field(exc: ConfigError, label: str) -> None:
    message = str(exc)
    assert exc.field.startswith(label) or label.startswith(exc.field), f"error names {exc.field!r}, expected {label!r}: {message}"
    assert exc.field in message
    assert not CONTROL.search(message), f"error message is not one printable line: {message!r}"


# --- one test per field ----------------------------------------------------------------------

EXAMPLES = 700


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_field_is_rejected_by_name_or_rendered_intact(name: str, workdir: Path, fuzz_counter) -> None:
    case = CASES[name]
    strategy = {"listen": address_text, "host": address_text, "upstream_host": address_text, "vfgen_bin": path_text,
                "vllm_bin": path_text, "user": user_text, "env_key": env_key_text,
                "lora_path": repo_id_text}.get(name, field_text)

    @fuzz_settings(EXAMPLES)
    @given(value=strategy)
    def check(value: str) -> None:
        run_case(case, value, workdir, fuzz_counter)

    check()


@fuzz_settings(EXAMPLES)
@given(values=st.lists(field_text, min_size=1, max_size=3))
def test_extra_args_are_rejected_by_name_or_passed_intact(values: list[str], workdir: Path, fuzz_counter) -> None:
    markers = [f"zqxarg{chr(65 + i)}" for i in range(len(values))]
    case = Case("models[0].extra_args", _set(("models", 0, "extra_args")), markers,
                subst=lambda v, d: {m: Subst(x) for m, x in zip(markers, v)})
    raw = base_mapping(workdir / "logs")
    case.place(raw, values)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    benign = _benign_extra_args(workdir, len(values))
    try:
        got = render_parsed(raw, scratch, reference=benign)
    except ConfigError as exc:
        assert_names_field(exc, case.label)
        fuzz_counter(False)
        return
    assert_same_modulo(got.files, benign.files, case.subst(values, None), case.label)
    check_planned_argv(got.plan, got.files)
    assert list(values) == list(got.plan.instances[0].vllm_argv[-len(values):])
    fuzz_counter(True)


@functools.lru_cache(maxsize=None)
def _benign_extra_args(workdir: Path, count: int) -> Rendered:
    raw = base_mapping(workdir / "logs")
    raw["models"][0]["extra_args"] = [f"zqxarg{chr(65 + i)}" for i in range(count)]
    scratch = workdir / "benign-scratch"
    scratch.mkdir(exist_ok=True)
    return render_parsed(raw, scratch)


# --- the edge: TLS paths, rate limit, API key file path and content, nginx_dir, access log path --


def edge_extra(workdir: Path) -> dict[str, Any]:
    return {"api_key_file": str(workdir / "benign-keys"), "rate_limit": "17r/s", "rate_limit_burst": 5,
            "tls_certificate": "/zqx/cert.pem", "tls_certificate_key": "/zqx/cert.key", "nginx_dir": "/zqxnginx",
            "access_log": "json", "access_log_path": "/zqx/access.json", "nginx_exporter": True}


EDGE_CASES = {
    "tls_certificate": Case("tls_certificate", _set(("tls_certificate",)), "/zqx/cert.pem"),
    "tls_certificate_key": Case("tls_certificate_key", _set(("tls_certificate_key",)), "/zqx/cert.key"),
    "rate_limit": Case("rate_limit", _set(("rate_limit",)), "17r/s"),
    "access_log_path": Case("access_log_path", _set(("access_log_path",)), "/zqx/access.json"),
    "nginx_dir": Case("nginx_dir", _set(("nginx_dir",)), "/zqxnginx",
                      subst=lambda v, d: {"/zqxnginx": Subst(d.nginx_dir.rstrip("/"))}),
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_setting_is_rejected_by_name_or_rendered_intact(name: str, workdir: Path, fuzz_counter) -> None:
    case = EDGE_CASES[name]
    rates = st.one_of(st.from_regex(r"\A[0-9]{1,7}r/[smh]\Z"), st.from_regex(r"\A[1-9][0-9]{0,5}r/[sm]\Z"))
    strategy = st.one_of(field_text, rates) if name == "rate_limit" else path_text

    @fuzz_settings(EXAMPLES // 2)
    @given(value=strategy)
    def check(value: str) -> None:
        run_case(case, value, workdir, fuzz_counter, extra=edge_extra(workdir))

    check()


@fuzz_settings(EXAMPLES)
@given(value=path_text)
def test_api_key_file_path_is_rejected_by_name_or_read(value: str, workdir: Path, fuzz_counter) -> None:
    """Paths are validated, then read; the path itself never reaches a rendered file."""
    base = workdir / "keyfiles"
    base.mkdir(exist_ok=True)
    path = f"{base}/{value}"
    raw = base_mapping(workdir / "logs")
    raw["api_key_file"] = path
    try:
        checked = config.parse_deployment(raw, source="fuzz.yaml").api_key_file
    except ConfigError as exc:
        assert_names_field(exc, "api_key_file")
        fuzz_counter(False)
        return
    # Validated paths cannot climb out of `base`: create the file there if nothing is in the way.
    assert os.path.realpath(checked).startswith(str(base.resolve()) + os.sep) or os.path.realpath(checked) == str(base.resolve())
    target = Path(checked)
    if not target.exists() and not any(p.exists() and not p.is_dir() for p in target.parents):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("zqx-fuzzed-path-key-0123\n")
        target.chmod(0o600)
    reference = _benign_keys(workdir)
    try:
        got = render_parsed(raw, workdir / "scratch", reference=reference)
    except ConfigError as exc:  # a directory, for instance
        assert_names_field(exc, "api_key_file")
        fuzz_counter(False)
        return
    assert "keys" in got.files
    # The world-readable conf does not depend on where the keys are, nor on what they are.
    assert got.texts["nginx"] == reference.texts["nginx"], "the key file's path or a key reached the world-readable conf"
    fuzz_counter(True)


@functools.lru_cache(maxsize=None)
def _benign_keys(workdir: Path) -> Rendered:
    raw = base_mapping(workdir / "logs")
    raw["api_key_file"] = str(workdir / "benign-keys")
    scratch = workdir / "benign-scratch"
    scratch.mkdir(exist_ok=True)
    return render_parsed(raw, scratch)


printable_ascii = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
valid_key = st.text(alphabet=printable_ascii.filter(lambda c: c not in '"\\$'), min_size=16, max_size=48)
key_line = st.one_of(
    valid_key,
    valid_key.map(lambda k: f"  {k}\t"),
    st.text(alphabet=printable_ascii, min_size=14, max_size=40),
    field_text,
    st.sampled_from(["", "# comment", "   ", "\t"]),
)
key_lines = st.one_of(st.lists(valid_key, min_size=1, max_size=6, unique=True), st.lists(key_line, min_size=1, max_size=6))


@fuzz_settings(EXAMPLES)
@given(lines=key_lines, crlf=st.booleans())
@example(lines=["etc/nginx/conf.d"], crlf=False)  # a valid key that the conf's comments contain
@example(lines=["zqx-valid-key-0123456789", " #ĥ comment ÷"], crlf=False)  # a comment that is not ASCII
def test_api_keys_are_rejected_by_line_without_echo_or_matched_exactly(lines: list[str], crlf: bool, workdir: Path, fuzz_counter) -> None:
    path = workdir / "fuzzed-keys"
    data = ("\r\n" if crlf else "\n").join(lines).encode("utf-8", errors="surrogatepass")
    path.write_bytes(data)
    path.chmod(0o600)
    raw = base_mapping(workdir / "logs")
    raw["api_key_file"] = str(path)
    try:
        reference = _benign_keys(workdir)
        got = render_parsed(raw, workdir / "scratch", reference=reference)
    except ConfigError as exc:
        message = str(exc)
        assert exc.field == "api_key_file" and exc.value == str(path)
        assert re.search(r": line \d+: |contains no keys", message), message
        for line in lines:
            secret = line.strip()
            if len(secret) >= 8 and secret not in str(path):
                assert secret not in message, f"the error echoes a key line: {message}"
        assert not CONTROL.search(message)
        fuzz_counter(False)
        return
    expected = []
    for line in data.split(b"\n"):
        text = line.strip(b" \t\r")
        # A comment may hold any bytes (config skips it unread); only key lines are ASCII.
        if text and not text.startswith(b"#"):
            expected.append(text.decode("ascii"))
    entries = got.files["keys"][0][1]
    matched = []
    for words, block in entries:
        assert block is None and words[1:] == ("1",)
        pattern = words[0]
        prefix = "~^(?i:Bearer) "
        assert pattern.startswith(prefix) and pattern.endswith("$"), pattern
        matched.append(parsers.pcre_literal_value(pattern[len(prefix):-1]))
    assert matched == expected
    # Byte for byte the conf rendered with other keys: no key can be in it (a substring check
    # would also flag a key such as "etc/nginx/conf.d" that the conf's comments happen to contain).
    assert got.texts["nginx"] == reference.texts["nginx"], "a key reached the world-readable conf"
    fuzz_counter(True)


# --- the CLI spells fields as options ------------------------------------------------------


def cli_opts(**given: Any) -> dict[str, Any]:
    from vfgen.options import unset

    opts = unset()
    opts.update(instances=2, user="nobody", vfgen_bin="/usr/local/bin/vfgen", vllm_bin="/opt/vllm/bin/vllm")
    opts.update(given)
    return opts


CLI_CASES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "model": ("MODEL", lambda v: {"model": v, "served_model_name": ["m"]}),
    "served_model_name": ("--served-model-name", lambda v: {"model": "org/m", "served_model_name": [v]}),
    "served_name_from_model": ("MODEL", lambda v: {"model": v}),
    "env": ("--env", lambda v: {"model": "org/m", "env": [f"MY_VAR={v}"]}),
    "env_key": ("--env", lambda v: {"model": "org/m", "env": [f"{v}=1"]}),
    "vllm_args": ("arguments after --", lambda v: {"model": "org/m", "vllm_args": [v, "x"]}),
    "user": ("--user", lambda v: {"model": "org/m", "user": v}),
    "listen": ("--listen", lambda v: {"model": "org/m", "listen": v}),
    "api_key_file": ("--api-key-file", lambda v: {"model": "org/m", "api_key_file": "/nonexistent-dir/" + v}),
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_option_is_rejected_by_name_or_rendered(name: str, workdir: Path, fuzz_counter) -> None:
    label, build = CLI_CASES[name]

    @fuzz_settings(EXAMPLES // 4)
    @given(value={"listen": address_text, "user": user_text, "env_key": env_key_text}.get(name, field_text))
    def check(value: str) -> None:
        opts = cli_opts(log_dir=str(workdir / "logs"), **build(value))
        scratch = workdir / "scratch"
        scratch.mkdir(exist_ok=True)
        try:
            got = render_parsed({}, scratch, cli=opts, known_users=name != "user", reference=_benign_cli(workdir))
        except ConfigError as exc:
            message = str(exc)
            # MODEL doubles as the default served name: its errors may name that option instead.
            allowed = {label, "--served-model-name"} if name == "served_name_from_model" else {label}
            assert any(exc.field.startswith(a) for a in allowed), f"{exc.field!r} not in {allowed}: {message}"
            assert not CONTROL.search(message)
            assert not message.startswith("fuzz.yaml")
            fuzz_counter(False)
            return
        check_planned_argv(got.plan, got.files)
        fuzz_counter(True)

    check()


@functools.lru_cache(maxsize=None)
def _benign_cli(workdir: Path) -> Rendered:
    scratch = workdir / "benign-scratch"
    scratch.mkdir(exist_ok=True)
    return render_parsed({}, scratch, cli=cli_opts(log_dir=str(workdir / "logs"), model="org/m"))


def test_zz_at_least_ten_thousand_examples_ran() -> None:
    """CI must run the full budget: a partial run (-k) or VFGEN_FUZZ_SCALE < 1 skips this check, except under CI=true."""
    from tests.security.conftest import FUZZ

    ran = [n for n in FUZZ["examples"] if "test_" in n]
    if SCALE < 1 or len(ran) < len(FIELD_NAMES) + len(EDGE_CASES) + len(CLI_CASES) + 3:
        message = f"partial fuzz run ({len(ran)} tests, scale {SCALE}): the 10,000-example budget applies to a full run"
        if in_ci():
            pytest.fail(f"CI=true and {message}; CI must run the whole file at scale 1", pytrace=False)
        pytest.skip(message)
    total = sum(FUZZ["examples"].values())
    assert total >= TOTAL_REQUIRED, f"only {total} fuzz examples ran"
