"""The routers people pick instead of vfgen, each run from its own pinned venv, in front of the same backends.

    vllm-router-rr      vllm-router 0.1.17 (the Rust vllm-project/router), --policy round_robin
    vllm-router-cache   the same, --policy cache_aware
    sglang-router-rr    sglang-router 0.3.2 (SGLang's model gateway), --policy round_robin
    litellm             LiteLLM proxy 1.108.7, routing_strategy simple-shuffle

scripts/install-bench.sh makes the venvs at ~/.cache/vfgen/bench-venvs/<package>-<version>
(VFGEN_BENCH_VENVS moves the parent). Every peer runs with its defaults (retries, circuit
breaker, health checks) except what binding to loopback needs: a user compares defaults.
Each peer binds its own free Prometheus port, since two would clash on the default one.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import free_port

# package -> pinned version; scripts/install-bench.sh installs exactly these (a unit test compares).
PEER_PINS = {"vllm-router": "0.1.17", "sglang-router": "0.3.2", "litellm": "1.108.7"}
# LiteLLM refuses to start without a master key; every request through it sends this.
LITELLM_KEY = "sk-vfgen-bench"
LITELLM_AUTH = f"Bearer {LITELLM_KEY}"


@dataclass(frozen=True)
class Peer:
    name: str  # path label in the results
    package: str
    executable: str
    title: str  # for the tables
    health: str = "/health"  # a GET that answers 200 once the peer serves
    authorization: str | None = None  # Authorization header every request needs
    slow: bool = False  # CPU-bound far below the others: settle after each run

    @property
    def version(self) -> str:
        return PEER_PINS[self.package]

    @property
    def venv(self) -> Path:
        return venvs_dir() / f"{self.package}-{self.version}"

    @property
    def binary(self) -> Path:
        return self.venv / "bin" / self.executable


PEERS = {
    peer.name: peer for peer in (
        Peer("vllm-router-rr", "vllm-router", "vllm-router", "vllm-router 0.1.17 round_robin"),
        Peer("vllm-router-cache", "vllm-router", "vllm-router", "vllm-router 0.1.17 cache_aware"),
        Peer("sglang-router-rr", "sglang-router", "sglang-router", "sglang-router 0.3.2 round_robin"),
        Peer("litellm", "litellm", "litellm", "LiteLLM proxy 1.108.7 simple-shuffle",
             health="/health/liveliness", authorization=LITELLM_AUTH, slow=True),
    )
}


def venvs_dir() -> Path:
    return Path(os.environ.get("VFGEN_BENCH_VENVS") or Path.home() / ".cache/vfgen/bench-venvs")


def missing_peers(names) -> list[str]:
    """The peers among `names` whose venv has no executable, as 'name (path)'."""
    return [f"{name} ({PEERS[name].binary})" for name in names if not PEERS[name].binary.exists()]


def command(peer: Peer, port: int, backend_urls: list[str], model: str, workdir: Path) -> tuple[list[str], dict]:
    """argv and extra environment that start `peer` on 127.0.0.1:port in front of `backend_urls`."""
    if peer.package in ("vllm-router", "sglang-router"):
        policy = "cache_aware" if peer.name.endswith("-cache") else "round_robin"
        argv = [str(peer.binary), *(["launch"] if peer.package == "sglang-router" else []),
                "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *backend_urls,
                "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--log-level", "warning" if peer.package == "vllm-router" else "warn"]
        return argv, {}
    config = workdir / f"{peer.name}.yaml"
    config.write_text(litellm_config(backend_urls, model))
    argv = [str(peer.binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--telemetry", "False"]
    # Without the local cost map LiteLLM fetches one from the internet at start.
    return argv, {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


def litellm_config(backend_urls: list[str], model: str) -> str:
    """One model_name, one hosted_vllm deployment per backend, simple-shuffle routing (LiteLLM's default)."""
    deployments = "".join(
        f"  - model_name: {model}\n    litellm_params:\n      model: hosted_vllm/{model}\n"
        f"      api_base: {url}/v1\n      api_key: none\n" for url in backend_urls)
    return (f"model_list:\n{deployments}"
            "router_settings:\n  routing_strategy: simple-shuffle\n"
            f"general_settings:\n  master_key: {LITELLM_KEY}\n")


def start(stack, peer: Peer, port: int, backend_urls: list[str], model: str) -> subprocess.Popen:
    argv, env = command(peer, port, backend_urls, model, stack.root)
    return stack.procs.start(argv, cwd=stack.root, env={**os.environ, **env}, stdout=stack._log(f"{peer.name}-stdout"),
                             stderr=subprocess.STDOUT)
