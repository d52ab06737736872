"""The rendered alert rules are valid for the real promtool, and each alert fires when it should.

- `promtool check rules` accepts the rules file of every golden scenario.
- `promtool test rules` runs the rendered rules on synthetic series: each alert
  fires (with the targets file's labels and its annotations expanded) on a broken
  instance, model or dispatcher, and stays quiet on healthy ones and while its
  `for:` window has not passed.
- A deliberately wrong expectation makes promtool fail, so the check can fail.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tests.harness.tools import require_tool
from tests.scenarios import SCENARIOS
from vfgen.cli import app

NAME = "chat"
# Two instances of model "a" (GPUs 0 and 1), one of model "b", a dispatcher with its exporter; default thresholds.
DEPLOYMENT = {
    "name": NAME,
    "nginx_exporter": True,
    "models": [
        {"model": "org/a", "served_model_name": "a", "instances": 2, "gpus": [0, 1]},
        {"model": "org/b", "served_model_name": "b", "instances": 1, "gpus": [2]},
    ],
}
INSTANCES = {  # instance_name: (model, gpu, port)
    f"{NAME}-a-0": ("a", "0", 9100),
    f"{NAME}-a-1": ("a", "1", 9101),
    f"{NAME}-b-0": ("b", "2", 9102),
}
DISPATCHER = {"job": "vfgen", "instance": "127.0.0.1:9113", "deployment": NAME, "component": "dispatcher",
              "instance_name": f"{NAME}-dispatcher"}


def promtool() -> str:
    return require_tool("promtool", "prometheus")


def render(args: list[str], emit: str) -> str:
    split = args.index("--") if "--" in args else len(args)  # the tail after -- belongs to vllm
    args = [*args[:split], "--emit", emit, *args[split:]]
    result = CliRunner().invoke(app, ["render", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_promtool_check_rules_accepts_every_scenario(name: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(render(SCENARIOS[name], "prometheus-rules"))
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    found = int(re.search(r"SUCCESS: (\d+) rules found", result.stdout).group(1))
    assert found >= 5, result.stdout  # every alert of the issue, the dispatcher's only with the exporter


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail."""
    rules = tmp_path / "rules.yml"
    rules.write_text(render(SCENARIOS["four-instances"], "prometheus-rules").replace("== 0", "== == 0", 1))
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


# --- promtool test rules -------------------------------------------------------------


def labels(instance_name: str) -> dict[str, str]:
    model, gpu, port = INSTANCES[instance_name]
    return {"job": "vfgen", "instance": f"127.0.0.1:{port}", "deployment": NAME, "component": "vllm",
            "model": model, "instance_name": instance_name, "gpu": gpu}


def series(metric: str, lab: dict[str, str], values: str, **extra: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {**lab, **extra}.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def healthy_up(minutes: int, but: tuple[str, ...] = ()) -> list[dict[str, str]]:
    return [series("up", labels(n), f"1x{minutes}") for n in INSTANCES if n not in but]


def expand(text: str, lab: dict[str, str], value: str) -> str:
    """Prometheus's expansion of the few template forms the rules use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: lab.get(m.group(1), ""), text)
    text = text.replace("{{ $value | humanizePercentage }}", f"{float(value) * 100:.4g}%")
    return text.replace("{{ $value }}", value)


class Rules:
    def __init__(self, text: str) -> None:
        self.by_name = {r["alert"]: r for g in yaml.safe_load(text)["groups"] for r in g["rules"]}

    def alert(self, name: str, lab: dict[str, str], value: str) -> dict[str, Any]:
        rule = self.by_name[name]
        return {
            "exp_labels": {**lab, **rule["labels"]},
            "exp_annotations": {k: expand(v, lab, value) for k, v in rule["annotations"].items()},
        }


def run_promtool_test(tmp_path: Path, rules_text: str, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yml").write_text(rules_text)
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    return subprocess.run([promtool(), "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def cases(rules: Rules) -> list[dict[str, Any]]:
    a0, a1, b0 = (labels(n) for n in INSTANCES)

    def at(minute: str, name: str, *alerts: dict[str, Any]) -> dict[str, Any]:
        return {"eval_time": minute, "alertname": name, "exp_alerts": list(alerts)}

    def vllm_gauge(metric: str, name: str, high: str, low: str, *, quiet_at: str, fires_at: str,
                   value: str) -> dict[str, Any]:
        """a-0's gauge at `high`, a-1's at `low`: quiet before the `for:` window ends, then a-0 only."""
        vllm_labels = {"engine": "0", "model_name": "a"}
        return {
            "interval": "1m",
            "input_series": [series(metric, a0, high, **vllm_labels), series(metric, a1, low.strip(), **vllm_labels)],
            "alert_rule_test": [at(quiet_at, name), at(fires_at, name, rules.alert(name, {**a0, **vllm_labels}, value))],
        }

    return [
        {   # a-0 down for 5m: warning after its 2m `for:`, nothing before; its model still has a-1.
            "interval": "1m",
            "input_series": [series("up", a0, "0x10"), *healthy_up(10, but=(f"{NAME}-a-0",))],
            "alert_rule_test": [
                at("1m", "VfgenInstanceDown"),
                at("5m", "VfgenInstanceDown", rules.alert("VfgenInstanceDown", a0, "0")),
                at("5m", "VfgenModelDown"),
            ],
        },
        {   # Both instances of model a down: critical, once per instance; model b stays quiet.
            "interval": "1m",
            "input_series": [series("up", a0, "0x10"), series("up", a1, "0x10"), series("up", b0, "1x10")],
            "alert_rule_test": [
                at("5m", "VfgenModelDown", rules.alert("VfgenModelDown", a0, "0"), rules.alert("VfgenModelDown", a1, "0")),
            ],
        },
        {   # One of a's instances comes back: the model alert resolves, that instance's goes on.
            "interval": "1m",
            "input_series": [series("up", a0, "0x10"), series("up", a1, "0 0 0 0 1 1 1 1 1 1 1"), series("up", b0, "1x10")],
            "alert_rule_test": [
                at("3m", "VfgenModelDown", rules.alert("VfgenModelDown", a0, "0"), rules.alert("VfgenModelDown", a1, "0")),
                at("8m", "VfgenModelDown"),
                at("8m", "VfgenInstanceDown", rules.alert("VfgenInstanceDown", a0, "0")),
            ],
        },
        # 3 requests wait on a-0 without a break for 12m; a-1's queue empties every other minute.
        vllm_gauge("vllm:num_requests_waiting", "VfgenQueueLong", "3x20", "3 0 " * 10, quiet_at="9m", fires_at="12m",
                   value="3"),
        # a-0's KV cache at 95% for 20m; a-1 at 89%.
        vllm_gauge("vllm:kv_cache_usage_perc", "VfgenKvCacheHigh", "0.95x20", "0.89x20", quiet_at="10m",
                   fires_at="17m", value="0.95"),
        {   # a-0 restarted at minutes 5, 10 and 15 (each start time is new); a-1 ran throughout.
            "interval": "1m",
            "input_series": [
                series("process_start_time_seconds", a0, "1000x4 1300x4 1600x4 1900x4"),
                series("process_start_time_seconds", a1, "1000x20"),
            ],
            "alert_rule_test": [
                at("14m", "VfgenInstanceRestarting"),
                at("16m", "VfgenInstanceRestarting", rules.alert("VfgenInstanceRestarting", a0, "3")),
            ],
        },
        {   # The exporter reads no stub_status (nginx down).
            "interval": "1m",
            "input_series": [series("up", DISPATCHER, "1x10"), series("nginx_up", DISPATCHER, "1 1 0 0 0 0 0 0 0 0")],
            "alert_rule_test": [
                at("2m", "VfgenDispatcherDown"),
                at("6m", "VfgenDispatcherDown", rules.alert("VfgenDispatcherDown", DISPATCHER, "0")),
            ],
        },
        {   # The exporter itself is gone: no nginx_up at all, up 0.
            "interval": "1m",
            "input_series": [series("up", DISPATCHER, "0x10")],
            "alert_rule_test": [at("5m", "VfgenDispatcherDown", rules.alert("VfgenDispatcherDown", DISPATCHER, "0"))],
        },
        {   # Everything healthy for an hour: no alert at all.
            "interval": "1m",
            "input_series": [
                *healthy_up(60),
                series("up", DISPATCHER, "1x60"), series("nginx_up", DISPATCHER, "1x60"),
                *[series("vllm:num_requests_waiting", labels(n), "0x60", engine="0", model_name=INSTANCES[n][0]) for n in INSTANCES],
                *[series("vllm:kv_cache_usage_perc", labels(n), "0.3x60", engine="0", model_name=INSTANCES[n][0]) for n in INSTANCES],
                *[series("process_start_time_seconds", labels(n), "1000x60") for n in INSTANCES],
            ],
            "alert_rule_test": [at("60m", name) for name in rules.by_name],
        },
    ]


@pytest.fixture(scope="module")
def rules_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("deploy") / "deploy.yaml"
    path.write_text(yaml.safe_dump(DEPLOYMENT))
    return render(["-f", str(path)], "prometheus-rules")


def test_every_alert_fires_on_synthetic_series_and_stays_quiet_when_healthy(rules_text: str, tmp_path: Path) -> None:
    rules = Rules(rules_text)
    assert set(rules.by_name) == {"VfgenInstanceDown", "VfgenModelDown", "VfgenQueueLong", "VfgenKvCacheHigh",
                                  "VfgenInstanceRestarting", "VfgenDispatcherDown"}
    assert rules.by_name["VfgenModelDown"]["labels"]["severity"] == "critical"
    tests = cases(rules)
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == set(rules.by_name), "a case for every alert firing"
    result = run_promtool_test(tmp_path, rules_text, tests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_fails_on_a_wrong_expectation(rules_text: str, tmp_path: Path) -> None:
    """The test above can fail: expecting silence while a-0 is down for 5m is an error."""
    wrong = [{
        "interval": "1m",
        "input_series": [series("up", labels(f"{NAME}-a-0"), "0x10")],
        "alert_rule_test": [{"eval_time": "5m", "alertname": "VfgenInstanceDown", "exp_alerts": []}],
    }]
    result = run_promtool_test(tmp_path, rules_text, wrong)
    assert result.returncode != 0 and "VfgenInstanceDown" in result.stdout + result.stderr


def test_thresholds_from_the_deployment_change_the_rules(tmp_path: Path) -> None:
    """Settings reach the rules: a 1-request queue threshold, 0.5 KV cache, 30s windows."""
    spec = {**DEPLOYMENT, "alerts": {"queue_waiting": 1, "queue_for": "30s", "kv_cache_usage": 0.5, "kv_cache_for": "45s",
                                     "instance_down_for": "10s", "restarts": 2, "restarts_window": "5m"}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    rules = Rules(render(["-f", str(path)], "prometheus-rules")).by_name
    assert rules["VfgenQueueLong"]["expr"].endswith("> 1") and rules["VfgenQueueLong"]["for"] == "30s"
    assert rules["VfgenKvCacheHigh"]["expr"].endswith("> 0.5") and rules["VfgenKvCacheHigh"]["for"] == "45s"
    assert rules["VfgenInstanceDown"]["for"] == "10s"
    assert rules["VfgenInstanceRestarting"]["expr"].endswith("[5m]) >= 2")


def test_rules_query_only_metrics_the_real_vllm_exports(rules_text: str) -> None:
    """Names checked against the /metrics of the real vLLM 0.32 CPU build, saved by a run
    (tests/fixtures/vllm-metrics); tests/vllm checks the same against a live one."""
    real = (Path(__file__).resolve().parents[1] / "fixtures/vllm-metrics/vllm-0.32.0-cpu.txt").read_text()
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", real, re.M))
    queried = {name for rule in Rules(rules_text).by_name.values()
               for name in re.findall(r"(vllm:[a-z0-9_]+|process_start_time_seconds)", rule["expr"])}
    assert queried == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "process_start_time_seconds"}
    assert queried <= exported, queried - exported
