"""Turn the benchmark's results into the targets verdict, markdown tables and matplotlib plots."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench import outage, streaming
from bench.peers import PEERS

PATH_NAMES = {
    "direct": "direct to the backends",
    "vfgen": "vfgen nginx (least_conn + caps + overflow)",
    "round-robin": "nginx round robin",
    "vllm-factory": "vllm-factory 0.2.1 Dispatcher",
    "vfgen-affinity": "vfgen nginx + --enable-request-affinity",
    "nginx-minimal": "reference: minimal nginx proxy_pass",
    **{name: peer.title for name, peer in PEERS.items()},
}
COLORS = {"direct": "#7f7f7f", "vfgen": "#2ca02c", "round-robin": "#1f77b4", "vllm-factory": "#d62728",
          "vfgen-affinity": "#98df8a", "nginx-minimal": "#bcbd22", "vllm-router-rr": "#9467bd",
          "vllm-router-cache": "#c5b0d5", "sglang-router-rr": "#ff7f0e", "litellm": "#8c564b"}
OUTSIDE_LOAD_WARNING = 0.25  # cores used by other tenants during a measurement
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


# --- machine ---------------------------------------------------------------------------------


def machine_info(nginx_bin: str, wrk_bin: str) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return ((result.stdout or result.stderr).strip().splitlines() or ["?"])[0]

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem_kb = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', os_release, re.M)

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "?",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": pretty.group(1) if pretty else platform.platform(),
        "nginx": first_line([nginx_bin, "-v"]).replace("nginx version: ", ""),
        "wrk": first_line([wrk_bin, "--version"]).split(" Copyright")[0],
        "python": sys.version.split()[0],
        "vllm-factory": version("vllm-factory"),
        "aiohttp": version("aiohttp"),
        "loadavg_at_start": loadavg(),
        **{f"peer {peer.package}": _venv_version(peer) for peer in PEERS.values()},
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _venv_version(peer) -> str:
    """The version installed in the peer's venv (not the pin: the venv is what ran)."""
    python = peer.venv / "bin" / "python"
    if not python.exists():
        return "not installed"
    result = subprocess.run([str(python), "-c", f"from importlib.metadata import version; print(version({peer.package!r}))"],
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or "?"


# --- targets ---------------------------------------------------------------------------------


def _paired(numerator: dict, denominator: dict, key=lambda run: run["rps"]) -> tuple[float, float, float]:
    """Median, min and max over rounds of numerator/denominator, each ratio taken within one round."""
    ratios = [key(a) / key(b) for a, b in zip(numerator["runs"], denominator["runs"]) if key(b)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _added_p50(path: dict, direct: dict) -> list[float]:
    """Per round: the path's p50 at one connection minus direct's in the same round, ms."""
    return [a["latency_ms"]["50.0"] - d["latency_ms"]["50.0"] for a, d in zip(path["runs"], direct["runs"])]


def fastest_peer(part: dict, key) -> str | None:
    peers = [name for name in PEERS if name in part]
    return max(peers, key=key) if peers else None


def targets(results: dict) -> list[dict]:
    """Each target as a ratio taken in this run. Throughput ratios pair the runs of one round."""
    rows = []
    fast = results.get("fast")
    if fast:
        sat, light = fast["saturated"], fast["light"]
        hop = _paired(sat["vfgen"], sat["nginx-minimal"])
        rows.append({"target": "Throughput on fast backends >= 95% of the minimal nginx proxy's", "value": hop[0],
                     "fmt": "{:.0%}", "detail": f"per round {hop[1]:.0%}–{hop[2]:.0%}; medians {sat['vfgen']['rps']:,.0f} "
                     f"vs {sat['nginx-minimal']['rps']:,.0f} req/s", "ok": lambda v: v >= 0.95})
        peer = fastest_peer(sat, key=lambda name: sat[name]["rps"])
        if peer:
            vs_peer = _paired(sat["vfgen"], sat[peer])
            rows.append({"target": "Throughput on fast backends >= 2.5x the fastest peer's", "value": vs_peer[0],
                         "fmt": "{:.1f}x", "detail": f"fastest peer {peer}; per round {vs_peer[1]:.1f}–{vs_peer[2]:.1f}x; "
                         f"medians {sat['vfgen']['rps']:,.0f} vs {sat[peer]['rps']:,.0f} req/s",
                         "ok": lambda v: v >= 2.5})
            added = {name: _added_p50(light[name], light["direct"]) for name in [*PEERS, "vfgen"] if name in light}
            peer = fastest_peer(light, key=lambda name: -statistics.median(added[name]))
            ratios = [a / b for a, b in zip(added["vfgen"], added[peer]) if b > 0]
            value = statistics.median(ratios) if ratios else float("inf")
            rows.append({"target": "Added p50 at one connection <= 1/3 of the fastest peer's", "value": value,
                         "fmt": "{:.2f}x", "detail": f"fastest peer {peer}; medians "
                         f"{_plus(statistics.median(added['vfgen']))} vs {_plus(statistics.median(added[peer]))} ms "
                         f"over direct; ratio per round {min(ratios, default=0):.2f}–{max(ratios, default=0):.2f}",
                         "ok": lambda v: v <= 1 / 3})
        vs_factory = _paired(sat["vfgen"], sat["vllm-factory"])
        rows.append({"target": "Throughput on fast backends >= 5x vllm-factory's", "value": vs_factory[0],
                     "fmt": "{:.1f}x", "detail": f"per round {vs_factory[1]:.1f}–{vs_factory[2]:.1f}x; medians "
                     f"{sat['vfgen']['rps']:,.0f} vs {sat['vllm-factory']['rps']:,.0f} req/s",
                     "ok": lambda v: v >= 5.0})
    overload = results.get("scheduling", {}).get("2")
    if overload:
        vs_rr = _paired(overload["vfgen"], overload["round-robin"], key=lambda run: run["latency_ms"]["99.0"])
        rows.append({"target": "p99 at 2x capacity no worse than round robin", "value": vs_rr[0], "fmt": "{:.2f}x",
                     "detail": f"per round {vs_rr[1]:.2f}–{vs_rr[2]:.2f}x; medians {overload['vfgen']['p99_ms']:.0f} "
                               f"vs {overload['round-robin']['p99_ms']:.0f} ms",
                     "ok": lambda v: v <= 1.0})
    failure = results.get("failure")
    if failure:
        vfgen = failure["vfgen"]
        rows.append({"target": "0 failed requests when a backend is killed", "value": vfgen["failed"], "fmt": "{:d}",
                     "detail": f"of {vfgen['requests']:,} requests, outage {vfgen['outage_s']:.0f} s",
                     "ok": lambda v: v == 0})
        limit = results["fail_timeout_s"] + 2
        revived = vfgen["revived_after_s"]
        rows.append({"target": "Revived backend gets traffic within fail_timeout + 2 s",
                     "value": revived if revived is not None else float("inf"), "fmt": "{:.1f} s",
                     "detail": f"limit {results['fail_timeout_s']:g} + 2 = {limit:g} s; "
                     + ", ".join(f"{name} {outage.revival_text(s)}" for name, s in failure.items() if name in PEERS),
                     "ok": lambda v, limit=limit: v <= limit})
    for row in rows:
        row["pass"] = bool(row.pop("ok")(row["value"]))
        row["measured"] = row.pop("fmt").format(row["value"])
    return rows


# --- markdown --------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float) -> str:
    # Below 0.1 ms (one request at a time on fast backends) the third decimal is what differs.
    if abs(value) < 0.1:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _plus(value: float) -> str:
    return ("+" if value >= 0 else "") + _ms(value) if abs(value) >= 0.0005 else "0.000"


def direct_reference(results: dict) -> str | None:
    """The ratio to direct, for information, with the CPU arithmetic that explains it."""
    fast = results.get("fast", {}).get("saturated")
    if not fast:
        return None
    vs_direct = _paired(fast["vfgen"], fast["direct"])
    hop = _paired(fast["nginx-minimal"], fast["direct"])
    d, v = fast["direct"]["cpu"], fast["vfgen"]["cpu"]
    direct_cost = d["client_us_per_req"] + d["backends_us_per_req"]
    via = v["client_us_per_req"] + v["backends_us_per_req"] + v["dispatcher_us_per_req"]
    return (f"For information (no target): vfgen kept {vs_direct[0]:.0%} of direct-to-backend throughput "
            f"(per round {vs_direct[1]:.0%}–{vs_direct[2]:.0%}), the minimal nginx proxy {hop[0]:.0%}. "
            f"CPU per request: direct {d['client_us_per_req']:.0f} µs client + {d['backends_us_per_req']:.0f} µs "
            f"backend = {direct_cost:.0f} µs; through vfgen {v['client_us_per_req']:.0f} + "
            f"{v['backends_us_per_req']:.0f} + {v['dispatcher_us_per_req']:.0f} µs nginx = {via:.0f} µs. With "
            f"the {results['machine']['cpus']} CPUs saturated, throughput goes as 1 / (CPU per request): "
            f"{direct_cost:.0f} / {via:.0f} = {direct_cost / via:.0%}. One nginx hop costs that much; "
            "no nginx-based dispatcher can do better.")


def markdown(results: dict, command: str, plots: list[str]) -> str:
    machine = results["machine"]
    settings = results["settings"]
    out = [f"Command: `{command}` (total {results['elapsed_s']:.0f} s).", ""]
    out.append(_table(["machine", ""], [
        ["CPUs (nproc)", machine["cpus"]], ["CPU model", machine["cpu_model"]], ["memory", machine["memory"]],
        ["OS / kernel", f"{machine['os']} / {machine['kernel']}"], ["nginx", machine["nginx"]],
        ["Python", machine["python"]], ["wrk", machine["wrk"]],
        ["vllm-factory / aiohttp", f"{machine['vllm-factory']} / {machine['aiohttp']}"],
        *[[f"{key} (own venv)", value] for key, value in machine.items() if key.startswith("peer ")],
        ["load average (1 / 5 / 15 min) at start", machine["loadavg_at_start"]],
        ["load average at the end", machine.get("loadavg_at_end", "?")],
        ["1-min load average before each run: median / max", results.get("loadavg_runs", "?")],
        ["outside load seen (max, cores)", f"{results['outside_cores_max']:.2f}"],
    ]))
    out += ["", "The machine is shared: other engineers' test suites ran beside this bench, so absolute numbers "
            "move between runs. The verdicts rest on paired ratios of interleaved rounds, which a burst of "
            "outside load hits on both sides."]

    out += ["", "### Targets", ""]
    out.append(_table(["target", "measured", "", "result"], [
        [t["target"], t["measured"], t["detail"], "PASS" if t["pass"] else "**FAIL**"] for t in results["targets"]]))
    reference = direct_reference(results)
    if reference:
        out += ["", reference]
    if "fast" in results:
        out += _fast_markdown(results)
    if "realistic_overhead" in results:
        out += _realistic_markdown(results)
    if "scheduling" in results:
        out += _scheduling_markdown(results)
    if "affinity" in results:
        out += _affinity_markdown(results)
    if "failure" in results:
        out += outage.markdown(results, PATH_NAMES)
    if "streaming" in results:
        out += streaming.markdown(results, PATH_NAMES)
    if plots:
        out += ["", "### Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def _fast_markdown(results: dict) -> list[str]:
    settings = results["settings"]
    out: list[str] = []
    fast = results["fast"]
    direct = fast["saturated"]["direct"]
    light_direct = fast["light"]["direct"]
    out += ["", "### 1. Dispatch overhead, fast static backends",
            "", f"{settings['fast_connections']} connections, {results['threads']} wrk threads, "
            f"{settings['duration']} s per run, median of {settings['rounds_fast']} interleaved round(s) "
            f"(1 conn: {settings['rounds']} interleaved round(s)). "
            "\"1 conn\": one request at a time, so the latency is the path's own cost without queueing.", ""]
    rows = []
    for path, s in fast["saturated"].items():
        light = fast["light"][path]
        rows.append([
            PATH_NAMES[path], f"{s['rps']:,.0f} ({s['rps_min']:,.0f}–{s['rps_max']:,.0f})",
            f"{s['rps'] / direct['rps']:.0%}", _ms(s["p50_ms"]), _ms(s["p99_ms"]),
            _ms(light["p50_ms"]), _ms(light["p99_ms"]),
            _plus(light["p50_ms"] - light_direct["p50_ms"]), _plus(light["p99_ms"] - light_direct["p99_ms"]),
            f"{s['cpu']['client_us_per_req']:.0f} / {s['cpu']['backends_us_per_req']:.0f} / "
            + (f"{s['cpu']['dispatcher_us_per_req']:.0f}" if path != "direct" else "–"), str(s["failed"]),
        ])
    out.append(_table(["path", "req/s (min–max)", "vs direct", "p50 ms", "p99 ms", "1 conn p50 ms",
                       "1 conn p99 ms", "added p50", "added p99", "CPU µs/req: client / backends / dispatcher",
                       "failed"], rows))
    return out


def _realistic_markdown(results: dict) -> list[str]:
    settings = results["settings"]
    out: list[str] = []
    real = results["realistic_overhead"]
    out += ["", "### 1b. Dispatch overhead, stand-in vLLM backends",
            "", f"{results['capacity']} connections = capacity (4 backends × max-num-seqs "
            f"{results['realistic']['cap']}), service time 20–50 ms, short requests only, median of "
            f"{settings['rounds']} interleaved round(s) of {settings['duration']} s.", ""]
    rows = []
    for path, s in real.items():
        rows.append([PATH_NAMES[path], f"{s['rps']:,.0f}", f"{s['rps'] / real['direct']['rps']:.0%}",
                     _ms(s["p50_ms"]), _ms(s["p99_ms"]), _plus(s["p50_ms"] - real["direct"]["p50_ms"]),
                     _plus(s["p99_ms"] - real["direct"]["p99_ms"]),
                     f"{s['cpu']['dispatcher_us_per_req']:.0f}" if path != "direct" else "–", str(s["failed"])])
    out.append(_table(["path", "req/s", "vs direct", "p50 ms", "p99 ms", "added p50", "added p99",
                       "dispatcher CPU µs/req", "failed"], rows))
    return out


def _scheduling_markdown(results: dict) -> list[str]:
    settings = results["settings"]
    out: list[str] = []
    out += ["", "### 2. Scheduling: short and long requests at 1×, 2×, 4× capacity", "",
            f"{results['long_fraction']:.0%} long requests (streamed, ~200–230 ms), the rest short (20–50 ms); "
            f"capacity = {results['capacity']} requests in flight; wrk keeps factor × capacity connections busy; "
            f"median of {settings['rounds']} interleaved round(s) of {settings['duration']} s.", ""]
    rows = []
    for factor, per in results["scheduling"].items():
        for name, s in per.items():
            rows.append([f"{factor}×", PATH_NAMES[name], f"{s['rps']:,.0f}", _ms(s["p50_ms"]), _ms(s["p90_ms"]),
                         _ms(s["p99_ms"]), str(s["failed"])])
    out.append(_table(["load", "dispatcher", "req/s", "p50 ms", "p90 ms", "p99 ms", "failed"], rows))
    return out


def _affinity_markdown(results: dict) -> list[str]:
    out: list[str] = []
    out += ["", "### 3. Affinity", "", "GLiNER-style `/pooling` bodies: 16 label sets (shapes), random text, "
            f"{results['capacity'] // 2} connections (half capacity). Hit rate: share of each shape's requests "
            "that reached that shape's most frequent backend (25% is what chance gives with 4 backends).", ""]
    rows = []
    for name, s in results["affinity"].items():
        rows.append([PATH_NAMES[name], f"{s['hit_rate']:.1%}", " / ".join(map(str, s["shapes_per_backend"])),
                     " / ".join(map(str, s["requests_per_backend"])), f"{s['load_max_over_mean']:.2f}",
                     _ms(s["p50_ms"]), _ms(s["p99_ms"]), str(s["failed"])])
    out.append(_table(["dispatcher", "hit rate", "shapes per backend", "requests per backend",
                       "busiest / mean", "p50 ms", "p99 ms", "failed"], rows))
    return out


def console_table(results: dict) -> str:
    """What the terminal shows at the end: the targets and the headline numbers."""
    lines = ["", "vfgen dispatcher benchmark — results", "=" * 38]
    if "fast" in results:
        fast = results["fast"]["saturated"]
        lines.append("fast static backends (req/s, median):")
        for path, s in fast.items():
            lines.append(f"  {path:<18} {s['rps']:>10,.0f} req/s   {s['rps'] / fast['direct']['rps']:>5.0%} of direct   "
                         f"1-conn p50 {results['fast']['light'][path]['p50_ms']:.3f} ms")
    if "realistic_overhead" in results:
        lines.append("stand-in vLLM backends at capacity:")
        for path, s in results["realistic_overhead"].items():
            lines.append(f"  {path:<18} {s['rps']:>10,.0f} req/s   p50 {s['p50_ms']:.1f} ms   p99 {s['p99_ms']:.1f} ms")
    for factor, per in results.get("scheduling", {}).items():
        lines.append(f"scheduling at {factor}x capacity:")
        for name, s in per.items():
            lines.append(f"  {name:<18} p50 {s['p50_ms']:7.1f} ms   p99 {s['p99_ms']:7.1f} ms   failed {s['failed']}")
    if "affinity" in results:
        lines.append("affinity (hit rate, shapes per backend):")
        for name, s in results["affinity"].items():
            lines.append(f"  {name:<18} {s['hit_rate']:6.1%}   {s['shapes_per_backend']}")
    if "streaming" in results:
        lines += streaming.console(results)
    if "failure" in results:
        lines += outage.console(results)
    if results["outside_cores_max"] > OUTSIDE_LOAD_WARNING:
        lines += ["", f"WARNING: other processes used up to {results['outside_cores_max']:.2f} of the "
                      f"{os.cpu_count()} cores during a measurement; throughput numbers are depressed and noisy."]
    lines.append("")
    lines.append("targets:")
    width = max((len(t["target"]) for t in results["targets"]), default=0)
    for t in results["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        lines.append(f"  {verdict}  {t['target']:<{width}}  {t['measured']:>7}  ({t['detail']})")
    reference = direct_reference(results)
    if reference:
        lines.append(reference)
    return "\n".join(lines)


def update_docs(doc: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace a generated block of docs/benchmarks.md, keeping the hand-written text around it."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise RuntimeError(f"{doc} has no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}{end}{tail}")


# --- plots -----------------------------------------------------------------------------------


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if not all(part in results for part in ("fast", "realistic_overhead", "scheduling", "affinity", "failure",
                                            "streaming")):
        return made  # a --parts run: tables only

    def save(fig, name: str) -> None:
        path = out_dir / name
        for ax in fig.axes:  # nine paths: slanted names stay readable
            for label in ax.get_xticklabels():
                label.set_rotation(30)
                label.set_horizontalalignment("right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    # Throughput and per-request cost.
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (title, data) in zip(axes[:2], [("fast static backends", results["fast"]["saturated"]),
                                            ("stand-in vLLM backends, at capacity", results["realistic_overhead"])]):
        names = list(data)
        values = [data[n]["rps"] for n in names]
        errors = [[max(0.0, data[n]["rps"] - data[n]["rps_min"]) for n in names],
                  [max(0.0, data[n]["rps_max"] - data[n]["rps"]) for n in names]]
        ax.bar(names, values, yerr=errors, capsize=4, color=[COLORS[n] for n in names])
        for i, v in enumerate(values):
            ax.text(i + 0.05, v, f" {v:,.0f}", ha="left", va="bottom", fontsize=8)
        ax.set_title(f"req/s, {title} (log)", fontsize=10)
        ax.set_yscale("log")  # LiteLLM serves ~1/1000 of the others
        ax.tick_params(axis="x", labelsize=8)
    cpu = results["fast"]["saturated"]
    names = [n for n in cpu if n != "direct"]
    values = [cpu[n]["cpu"]["dispatcher_us_per_req"] for n in names]
    axes[2].bar(names, values, color=[COLORS[n] for n in names])
    for i, v in enumerate(values):
        axes[2].text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    axes[2].set_yscale("log")
    axes[2].set_title("dispatcher CPU µs per request (fast backends, log)", fontsize=10)
    axes[2].tick_params(axis="x", labelsize=8)
    save(fig, "bench-throughput.png")

    # Latency the path adds, one request at a time.
    light = results["fast"]["light"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(light)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [light[n]["p50_ms"] for n in names], 0.4, label="p50",
           color=[COLORS[n] for n in names])
    ax.bar([x + 0.2 for x in xs], [light[n]["p99_ms"] for n in names], 0.4, label="p99",
           color=[COLORS[n] for n in names], alpha=0.5, hatch="//")
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("latency, one request at a time (fast backends): p50 solid, p99 hatched", fontsize=10)
    save(fig, "bench-latency.png")

    # Scheduling quality.
    sched = results["scheduling"]
    factors = sorted(sched, key=int)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")]:
        for name in sched[factors[0]]:
            ax.plot([int(f) for f in factors], [sched[f][name][key] for f in factors], marker="o",
                    color=COLORS[name], label=name)
        ax.set_xticks([int(f) for f in factors], [f"{f}×" for f in factors])
        ax.set_xlabel("load (× capacity)")
        ax.set_ylabel("ms")
        ax.set_title(f"{label} latency, 80% short / 20% long requests", fontsize=10)
        ax.legend(fontsize=8)
    save(fig, "bench-scheduling.png")

    # Affinity and failure.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    aff = results["affinity"]
    names = list(aff)
    axes[0].bar(names, [aff[n]["hit_rate"] * 100 for n in names], color=[COLORS[n] for n in names])
    axes[0].axhline(25, color="black", linestyle=":", linewidth=1)
    axes[0].set_ylim(0, 105)
    axes[0].set_title("affinity hit rate % (dotted: chance, 25%)", fontsize=10)
    axes[0].tick_params(axis="x", labelsize=8)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per = aff[name]["requests_per_backend"]
        total = sum(per) or 1
        axes[1].bar([b + i * width for b in range(len(per))], [100 * v / total for v in per], width,
                    color=COLORS[name], label=name)
    axes[1].set_xticks([b + 0.4 - width / 2 for b in range(len(per))], [f"backend {b}" for b in range(len(per))])
    axes[1].set_title("share of requests per backend %", fontsize=10)
    axes[1].legend(fontsize=7)
    fail = results["failure"]
    names = list(fail)
    values = [fail[n]["failed"] for n in names]
    axes[2].bar(names, values, color=[COLORS[n] for n in names])
    axes[2].set_yscale("symlog")
    for i, v in enumerate(values):
        axes[2].text(i, v, f"{v:,} / {fail[names[i]]['requests']:,}", ha="center", va="bottom", fontsize=8)
    axes[2].set_title("failed requests, one backend killed, revived 10 s later", fontsize=10)
    axes[2].tick_params(axis="x", labelsize=8)
    save(fig, "bench-affinity-failure.png")

    # Streaming and revival.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    stream = results["streaming"]
    names = list(stream)
    xs = range(len(names))
    axes[0].bar([x - 0.2 for x in xs], [stream[n]["first_p50_ms"] for n in names], 0.4,
                color=[COLORS[n] for n in names], label="first chunk p50")
    axes[0].bar([x + 0.2 for x in xs], [stream[n]["gap_p50_ms"] for n in names], 0.4,
                color=[COLORS[n] for n in names], alpha=0.5, hatch="//", label="gap between chunks p50")
    axes[0].set_xticks(list(xs), names, fontsize=8)
    axes[0].set_ylabel("ms")
    axes[0].set_title("streaming: first chunk (solid), chunk gap (hatched; backends send every 20 ms)", fontsize=9)
    fail = results["failure"]
    names = list(fail)
    watched = max(fail[n]["watched_s"] for n in names)
    values = [fail[n]["revived_after_s"] if fail[n]["revived_after_s"] is not None else watched for n in names]
    axes[1].bar(names, values, color=[COLORS[n] for n in names])
    for i, name in enumerate(names):
        axes[1].text(i, values[i], outage.revival_text(fail[name]), ha="center", va="bottom", fontsize=8)
    axes[1].axhline(results["fail_timeout_s"] + 2, color="black", linestyle=":", linewidth=1)
    axes[1].set_ylabel("s")
    axes[1].set_title("revived backend: seconds until its first request (dotted: fail_timeout + 2 s)", fontsize=9)
    save(fig, "bench-streaming-revival.png")
    return made
