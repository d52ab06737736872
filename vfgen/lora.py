"""`vfgen lora load|unload`: change a LoRA adapter on every instance of a model at runtime.

vLLM's /v1/load_lora_adapter changes the one instance that receives it, so a call
through nginx would leave the instances disagreeing (the dispatcher refuses it).
This command calls every instance of the model directly, on their loopback
addresses, and reports each outcome. It is idempotent: an instance that already
lists the adapter from the same path (or, for unload, no longer lists it) counts
as done, so a partial failure is repaired by running the command again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import requests

from vfgen.config import Deployment, ModelSpec, runtime_adapter
from vfgen.errors import ConfigError, VfgenError
from vfgen.health import _headers
from vfgen.plan import Plan

ACTIONS = ("load", "unload")


@dataclass(frozen=True)
class Outcome:
    instance: str
    url: str
    ok: bool
    detail: str


def select_model(d: Deployment, model: str | None) -> ModelSpec:
    """The model named by --model (its key or a served name), else the only one serving LoRA."""
    lora_models = [m for m in d.models if m.enable_lora]
    if model is not None:
        found = [m for m in d.models if model == m.key or model in m.served_names]
        if not found:
            raise ConfigError("--model", model, f"no such model (keys: {', '.join(m.key for m in d.models)})")
        if not found[0].enable_lora:
            raise ConfigError("--model", model, "does not serve LoRA adapters; give it lora_modules or enable_lora")
        return found[0]
    if len(lora_models) != 1:
        raise ConfigError("--model", None, f"several models serve LoRA ({', '.join(m.key for m in lora_models)}); name one")
    return lora_models[0]


def change(plan: Plan, action: str, name: str, path: str | None, *, model: str | None, timeout: float,
           out: TextIO, err: TextIO) -> int:
    d = plan.deployment
    if not d.allow_runtime_lora_updating:
        option = "allow_runtime_lora_updating" if d.source is not None else "--allow-runtime-lora-updating"
        raise ConfigError(option, False, "runtime adapter changes are off; turn it on in the deployment, "
                          "re-render and restart the instances", d.source)
    spec = select_model(d, model)
    adapter = runtime_adapter(d, spec, name, path if action == "load" else None)
    if plan.route_by_model and action == "load":
        err.write(f"Warning: nginx routes only the names it was rendered with; through the dispatcher, requests for "
                  f"{name!r} get 404 until it is added to the lora_modules of model {spec.key!r} and nginx re-rendered.\n")
    outcomes = [_apply(inst.name, inst.url, action, adapter.name, adapter.path, timeout)
                for inst in plan.instances_of(spec.key)]
    for o in outcomes:
        out.write(f"{o.instance}  {o.url}  {'ok' if o.ok else 'FAILED'}: {o.detail}\n")
    failed = [o.instance for o in outcomes if not o.ok]
    if failed:
        raise VfgenError(f"{action} of adapter {name!r} failed on {len(failed)} of {len(outcomes)} instance(s) of "
                         f"{spec.key}: {', '.join(failed)}; the instances now disagree. Fix the cause and run the "
                         f"same command again (instances already done are skipped)")
    return 0


def _apply(instance: str, url: str, action: str, name: str, path: str | None, timeout: float) -> Outcome:
    session = requests.Session()
    session.trust_env = False  # loopback calls never go through an HTTP(S)_PROXY
    headers = _headers(None)
    try:
        listed = session.get(f"{url}/v1/models", headers=headers, timeout=timeout)
        listed.raise_for_status()
        roots = {m.get("id"): m.get("root") for m in listed.json().get("data", []) if m.get("parent") is not None}
        if action == "load" and name in roots:
            if roots[name] == path:
                return Outcome(instance, url, True, "already loaded from this path")
            return Outcome(instance, url, False, f"already serves {name!r} from {roots[name]}; unload it first")
        if action == "unload" and name not in roots:
            return Outcome(instance, url, True, "not loaded (nothing to do)")
        body = {"lora_name": name, "lora_path": path} if action == "load" else {"lora_name": name}
        resp = session.post(f"{url}/v1/{action}_lora_adapter", json=body, headers=headers, timeout=timeout)
    except (requests.RequestException, ValueError, AttributeError) as exc:
        return Outcome(instance, url, False, f"no usable answer: {exc.__class__.__name__}: {exc}"[:300])
    finally:
        session.close()
    if resp.status_code == 200:
        return Outcome(instance, url, True, "loaded" if action == "load" else "unloaded")
    if resp.status_code == 404 and "detail" in resp.text and "lora" not in resp.text.lower():
        return Outcome(instance, url, False, "404: the instance has no runtime LoRA endpoint "
                       "(started without VLLM_ALLOW_RUNTIME_LORA_UPDATING? re-render and restart it)")
    return Outcome(instance, url, False, f"{resp.status_code}: {_message(resp)}")


def _message(resp: requests.Response) -> str:
    try:
        data = resp.json()
        return str(data.get("error", {}).get("message") or data.get("detail") or data)[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]
