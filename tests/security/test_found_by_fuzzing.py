"""Values the fuzzer found breaking vfgen, kept as fixed examples so they stay fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.test_injection import CASES, EDGE_CASES, edge_extra, run_case, workdir  # noqa: F401 (fixture)
from vfgen import config
from vfgen.errors import ConfigError

FOUND = [
    # supervisord's configparser strip()s values, Unicode spaces included: the last
    # word lost its NEL / trailing space and left a dangling backslash for shlex.
    ("extra_args", ["\x85"], True),
    ("extra_args", ["--chat-template", "trailing space "], True),
    ("env_value", "ends in NBSP\xa0", True),
    # '$' in a model path reached nginx's /v1/models JSON and made rendering fail.
    ("model_source", "/models/$HOME/m", True),
    # Python accepts any text as an IPv6 zone: `listen [fe80::1%a b]:8000;` broke the conf.
    ("listen", "fe80::1%a b", False),
    ("listen", "fe80::1%eth0", False),
    # A newline in an env key reached the error message's field name.
    ("env_key", "BAD\nKEY", False),
    # A lone surrogate (YAML "\ud800") cannot be written to any file.
    ("served_name", "\ud800", False),
    # '+' first makes systemd run ExecStart with full privileges.
    ("vfgen_bin", "+/usr/bin/vfgen", False),
]


@pytest.mark.parametrize(("case", "value", "accepted"), FOUND, ids=[f"{c}-{v!r}" for c, v, _ in FOUND])
def test_found_value_stays_handled(case: str, value, accepted: bool, workdir: Path) -> None:  # noqa: F811
    outcomes: list[bool] = []
    if case == "extra_args":
        from tests.security.test_injection import Case, Subst, _set

        markers = [f"zqxarg{chr(65 + i)}" for i in range(len(value))]
        extra_args = Case("models[0].extra_args", _set(("models", 0, "extra_args")), markers,
                          subst=lambda v, d: {m: Subst(x) for m, x in zip(markers, v)})
        run_case(extra_args, value, workdir, outcomes.append)
    else:
        run_case(CASES[case], value, workdir, outcomes.append)
    assert outcomes == [accepted]


def test_rate_limit_burst_zero_renders_without_burst(workdir: Path) -> None:  # noqa: F811
    """nginx refuses `burst=0`; no burst means the same thing."""
    outcomes: list[bool] = []
    extra = {**edge_extra(workdir), "rate_limit_burst": 0}
    run_case(EDGE_CASES["rate_limit"], "5r/s", workdir, outcomes.append, extra=extra)
    assert outcomes == [True]


def test_key_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    raw = {"api_key_file": str(tmp_path), "models": [{"model": "org/m", "instances": 2}]}
    with pytest.raises(ConfigError, match="is not a regular file"):
        config.read_api_keys(config.parse_deployment(raw, source="x.yaml"))
