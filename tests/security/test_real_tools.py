"""The fuzz tier's parsers agree with the real tools on a sample of fuzzed deployments.

test_injection.py reads rendered files with crossplane and a model of systemd's
unit syntax, because the real tools are too slow for 10,000 examples. Here a
smaller, reproducible sample goes through the real thing:

- `nginx -t` accepts every accepted dispatcher (with TLS, API keys and a rate
  limit), and a running nginx answers /v1/models with the fuzzed names and
  paths byte for byte and routes each fuzzed name to its model;
- `systemd-analyze verify` is silent on every accepted unit;
- a real systemd 252 (nspawn) starts fuzzed units, and the argv and
  environment the processes receive equal both the plan and what the model in
  tests/security/parsers.py predicted from the same unit text.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.harness.procs import free_port, free_port_range, wait_port
from tests.harness.tls import self_signed_certificate
from tests.harness.tools import require_tool
from tests.security import parsers
from tests.security.test_injection import field_text, free_text, fuzz_settings, mostly_valid_text, valid_key
from vfgen import config
from vfgen.errors import ConfigError
from vfgen.output import write_tree
from vfgen.plan import build_plan
from vfgen.render import render_all

SAMPLE = 200
VFGEN_BIN = shutil.which("vfgen") or "/usr/local/bin/vfgen"  # systemd-analyze verify wants it to exist


def fuzzed_mapping(draw_values: dict[str, Any], log_dir: Path, name: str = "fz") -> dict[str, Any]:
    v = draw_values
    return {
        "name": name,
        "user": "vllm",
        "log_dir": str(log_dir),
        "vfgen_bin": VFGEN_BIN,
        "vllm_bin": "/opt/vllm/bin/vllm",
        "listen": v["listen"],
        "models": [
            # Distinct first letters keep the three names apart (duplicates are rejected, rightly).
            {"model": v["source"], "name": "first", "served_model_name": ["s" + v["served"]], "aliases": ["a" + v["alias"]],
             "instances": 2, "env": {"MY_VAR": v["env_value"], v["env_key"]: "1"}, "extra_args": v["args"]},
            {"model": "org/second", "name": "second", "served_model_name": ["t" + v["served2"]]},
        ],
    }


# Mostly values that pass validation (still full of quotes, %, $, ;, braces, unicode):
# this sample is about what the real tools make of accepted values.
deployment_values = st.fixed_dictionaries({
    "source": free_text.filter(lambda t: t.strip() and not t.startswith("-")), "served": mostly_valid_text,
    "alias": mostly_valid_text, "served2": mostly_valid_text,
    # nginx -t binds the listen address: loopback only (tests never listen elsewhere).
    "listen": st.one_of(st.ip_addresses(network="127.0.0.0/8").map(str), st.just("::1")),
    "env_value": st.one_of(free_text, field_text), "env_key": st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,10}\Z"),
    "args": st.lists(st.one_of(free_text, field_text), max_size=3),
})


def accepted(raw: dict[str, Any]) -> config.Deployment | None:
    try:
        deployment = config.parse_deployment(raw, source="fuzz.yaml")
        build_plan(deployment)
        return deployment
    except ConfigError:
        return None


def collect(strategy, make, count: int) -> list:
    """Up to `count` accepted deployments built from `strategy` (reproducible: derandomized)."""
    found: list = []

    @fuzz_settings(count * 2)
    @given(values=strategy)
    def gather(values) -> None:
        if len(found) < count:
            item = make(values, len(found))
            if item is not None:
                found.append(item)

    gather()
    return found


# --- nginx -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def nginx_main(tmp: Path, include: Path, daemon: bool = True) -> Path:
    main = tmp / "nginx-main.conf"
    main.write_text(
        f"worker_processes 1;\n{'' if daemon else 'daemon off;'}\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
        f"    include {include};\n}}\n"
    )
    return main


def test_nginx_t_accepts_fuzzed_dispatchers_with_every_edge_option(tmp_path: Path, tls_files) -> None:
    nginx = require_tool("nginx", "nginx-light")
    cert, key = tls_files
    edge = st.fixed_dictionaries({"keys": st.lists(valid_key, min_size=1, max_size=4, unique=True),
                                  "rate": st.from_regex(r"\A[1-9][0-9]{0,3}r/[sm]\Z"),
                                  "burst": st.one_of(st.none(), st.integers(0, 100000))})

    def make(values, n):
        deployment_part, edge_part = values
        keys_file = tmp_path / f"keys-{n}"
        keys_file.write_text("\n".join(edge_part["keys"]) + "\n")
        keys_file.chmod(0o600)
        raw = fuzzed_mapping(deployment_part, tmp_path, name=f"fz{n}")
        raw.update(api_key_file=str(keys_file), rate_limit=edge_part["rate"], rate_limit_burst=edge_part["burst"], tls_certificate=str(cert),
                   tls_certificate_key=str(key), nginx_dir=str(tmp_path / f"nginx-{n}"), port=free_port())
        return accepted(raw)

    deployments = collect(st.tuples(deployment_values, edge), make, SAMPLE)
    assert len(deployments) >= SAMPLE * 0.9, f"only {len(deployments)} accepted deployments in the sample"
    for n, deployment in enumerate(deployments):
        arts = [a for a in render_all(build_plan(deployment)) if a.kind == "nginx"]
        assert all(("/" + a.path).startswith(deployment.nginx_dir + "/") for a in arts)
        write_tree(Path("/"), arts)  # only under nginx_dir, in tmp_path (asserted above)
        conf = Path(deployment.nginx_dir) / "conf.d" / f"{deployment.name}.conf"
        result = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(nginx_main(tmp_path, conf))],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and not result.stderr.strip(), f"deployment {n}: {result.stderr}\n{deployment}"


@pytest.mark.live
def test_running_nginx_serves_fuzzed_names_and_paths_intact(tmp_path: Path, procs) -> None:
    """/v1/models is nginx's own JSON (`return`), routing is a PCRE map: the two escaping-heavy places."""
    nginx = require_tool("nginx", "nginx-light")

    def make(values, n):
        return accepted(fuzzed_mapping({**values, "listen": "127.0.0.1"}, tmp_path, name=f"live{n}"))

    deployments = collect(deployment_values, make, 25)
    assert len(deployments) >= 20
    client = httpx.Client(timeout=5.0, trust_env=False)
    for n, deployment in enumerate(deployments):
        port = free_port_range(4)
        live = dataclasses.replace(deployment, port=port, port_start=port + 1)
        conf = tmp_path / f"live{n}.conf"
        conf.write_text(next(a.content for a in render_all(build_plan(live)) if a.kind == "nginx"))
        run_dir = tmp_path / f"run{n}"
        run_dir.mkdir()
        proc = procs.start([nginx, "-p", str(run_dir), "-c", str(nginx_main(run_dir, conf, daemon=False))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", port, timeout=10)
            models = client.get(f"http://127.0.0.1:{port}/v1/models").json()
            expected = [(name, m.source) for m in live.models for name in m.served_names]
            assert [(d["id"], d["root"]) for d in models["data"]] == expected
            for name in live.all_served_names:
                for ascii_only in (False, True):  # raw UTF-8, and \uXXXX as Python's json.dumps writes it
                    body = json.dumps({"model": name, "prompt": "x"}, ensure_ascii=ascii_only).encode()
                    routed = client.post(f"http://127.0.0.1:{port}/v1/completions", content=body,
                                         headers={"Content-Type": "application/json"})
                    # Routed to its pool, whose backends are not running: 503, never "unknown model".
                    assert routed.status_code == 503, (name, ascii_only, routed.status_code, routed.text)
                unknown = json.dumps({"model": name + "x"}, ensure_ascii=False).encode()
                assert client.post(f"http://127.0.0.1:{port}/v1/completions", content=unknown).status_code == 404
        finally:
            procs.stop(proc)
    client.close()


# --- systemd ---------------------------------------------------------------------------


def units_of(deployment: config.Deployment) -> dict[str, str]:
    return {a.name: a.content for a in render_all(build_plan(deployment)) if a.kind == "systemd"}


def test_systemd_analyze_verify_is_silent_on_fuzzed_units(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    deployments = collect(deployment_values, lambda values, n: accepted(fuzzed_mapping(values, tmp_path, name=f"fz{n}")), SAMPLE)
    assert len(deployments) >= SAMPLE * 0.9
    batch_size = 40
    for start in range(0, len(deployments), batch_size):
        unit_dir = tmp_path / f"units{start}"
        unit_dir.mkdir()
        for deployment in deployments[start : start + batch_size]:
            for name, text in units_of(deployment).items():
                (unit_dir / name).write_text(text)
        units = sorted(p.name for p in unit_dir.iterdir())
        result = subprocess.run([analyze, "verify", *units], cwd=unit_dir, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


ARGV_DUMP = textwrap.dedent("""\
    #!/usr/bin/python3
    # Stand-in for vfgen in fuzzed units: record argv and environment, then linger
    # so that ExecStartPost (which calls it again with `health`) runs too.
    import json, os, sys, time
    out = f"/var/lib/vfgen/dump-{os.environ['INVOCATION_ID']}-{sys.argv[1]}.json"
    with open(out + ".tmp", "w") as fh:
        json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, fh)
    os.rename(out + ".tmp", out)
    if sys.argv[1] == "launch":
        time.sleep(5)
""")


@pytest.mark.systemd
def test_real_systemd_gives_fuzzed_units_the_argv_and_env_the_model_predicts(tmp_path: Path) -> None:
    from tests.harness.nspawn import booted_container

    dump_bin = "/usr/local/bin/vfgen-argv-dump"

    def make(values, n):
        raw = fuzzed_mapping(values, tmp_path, name=f"fz{n}")
        raw.update(vfgen_bin=dump_bin, user="vllm", port_start=20000 + 10 * n)
        return accepted(raw)

    deployments = collect(deployment_values, make, 40)
    assert len(deployments) >= 35
    with booted_container() as box:
        box.run(["useradd", "--system", "--no-create-home", "vllm"])
        box.write_file(dump_bin, ARGV_DUMP, mode=0o755)
        expectations = {}
        for deployment in deployments:
            plan = build_plan(deployment)
            inst = plan.instances[0]
            text = units_of(deployment)[inst.unit]
            box.write_file(f"/etc/systemd/system/{inst.unit}", text)
            model = parsers.parse_unit(text)
            expectations[inst.unit] = (plan, inst, model)
        box.systemctl("daemon-reload")
        box.systemctl("start", "--no-block", *expectations)
        deadline = time.monotonic() + 90
        pending = set(expectations)
        dumps: dict[str, dict[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            for unit in sorted(pending):
                invocation = box.show(unit, "InvocationID").get("InvocationID", "")
                if not invocation:
                    continue
                files = box.run(f"ls /var/lib/vfgen/dump-{invocation}-*.json 2>/dev/null", check=False).stdout.split()
                if len(files) == 2:
                    dumps[unit] = {f.rsplit("-", 1)[1][:-5]: json.loads(box.read_file(f)) for f in files}
                    pending.discard(unit)
            time.sleep(0.5)
        assert not pending, f"no dumps from {sorted(pending)}:\n{box.journal(lines=80)}"

    for unit, (plan, inst, model) in expectations.items():
        launch, health = dumps[unit]["launch"], dumps[unit]["health"]
        # Real systemd == the model == the plan, word for word.
        predicted = parsers.unit_values(model, "ExecStart")[0]
        assert [dump_bin, *launch["argv"]] == list(predicted) == list(inst.exec_start)
        predicted_post = list(parsers.unit_values(model, "ExecStartPost")[0])
        assert predicted_post[-1] == "${MAINPID}" and health["argv"][-1].isdigit()
        assert [dump_bin, *health["argv"][:-1]] == predicted_post[:-1]
        for key, value in parsers.unit_environment(model):
            assert launch["env"].get(key) == value, (unit, key)
        for key, value in inst.env:
            assert launch["env"].get(key) == value, (unit, key)
