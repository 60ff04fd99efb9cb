"""What `osd demo` reports: pure functions from the requests served and the registry's events to the
summary (JSON), its table and its plot.

Requests are counted in the order they finished, the order in which the trainer saw their traces.
A window is `window` consecutive finished requests. Acceptance is accepted / drafted speculative
tokens; tokens/s is the generated tokens of a window over the time from its first request's
start to its last one's end (all clients together). Windows mix both endpoints; `endpoints`
accounts for the completion and the chat requests apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from deploy.demo.client import Served
from deploy.demo.workloads import Phase


def _percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-quantile (0..1), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def acceptance(served: Sequence[Served]) -> float | None:
    drafted = sum(s.drafted for s in served)
    return sum(s.accepted for s in served) / drafted if drafted else None


def window_stats(served: Sequence[Served]) -> dict:
    """Acceptance, throughput and latency of some successful requests."""
    if not served:
        return {"requests": 0}
    span = max(s.end for s in served) - min(s.start for s in served)
    latency, ttft = [s.latency for s in served], [s.ttft for s in served if s.ttft is not None]
    return {
        "requests": len(served),
        "acceptance": _round(acceptance(served)),
        "tokens_per_s": _round(sum(s.tokens for s in served) / span if span > 0 else None, 1),
        "latency_p50": _round(_percentile(latency, 0.5)),
        "latency_p99": _round(_percentile(latency, 0.99)),
        "ttft_p50": _round(_percentile(ttft, 0.5), 4),
        "ttft_p99": _round(_percentile(ttft, 0.99), 4),
    }


def endpoint_stats(served: Sequence[Served]) -> dict:
    """Per endpoint (completions, chat): requests, failures, and of the successful ones the
    acceptance, the mean generated tokens and how many stopped before max_tokens."""
    stats = {}
    for name, chat in (("completions", False), ("chat", True)):
        own = [s for s in served if s.chat == chat]
        ok = [s for s in own if s.ok]
        stats[name] = {
            "requests": len(own),
            "failed": len(own) - len(ok),
            "acceptance": _round(acceptance(ok)),
            "tokens_per_request": _round(sum(s.tokens for s in ok) / len(ok), 1) if ok else None,
            "stopped_early": sum(s.finish_reason == "stop" for s in ok),
        }
    return stats


def requests_before(served: Sequence[Served], at: float) -> int:
    """How many requests had finished at unix time `at`."""
    return sum(s.end <= at for s in served)


def version_name(event: dict, version: int | None = None) -> int | str:
    """A registry event's version: its number for the shared draft, "<domain> v<n>" for a domain's."""
    version = event["version"] if version is None else version
    domain = event.get("domain", "-")
    return version if domain == "-" else f"{domain} v{version}"


def summarise(
    served: Sequence[Served],
    phases: Sequence[Phase],
    window: int,
    events: Sequence[dict],
    alerts: Sequence[dict],
    speedup: dict | None,
) -> dict:
    """The demo's report: per phase the first and last window; the first and last windows of the
    run; the completion and chat requests apart; the registry's events and the drift alerts placed
    on the request axis; the acceptance series for the plot; and the measured speedup."""
    ok = sorted((s for s in served if s.ok), key=lambda s: s.end)
    per_phase = []
    for index, phase in enumerate(phases):
        own = [s for s in ok if s.phase == index]
        per_phase.append(
            {
                "domain": phase.domain,
                "requests": len(own),
                "first_window": window_stats(own[:window]),
                "last_window": window_stats(own[-window:]),
            }
        )
    return {
        "requests": len(served),
        "failed": sum(not s.ok for s in served),
        "errors": sorted({s.error for s in served if s.error})[:5],
        "window": window,
        "seconds": _round(max(s.end for s in served) - min(s.start for s in served), 1) if served else 0,
        "phases": per_phase,
        "first_window": window_stats(ok[:window]),
        "last_window": window_stats(ok[-window:]),
        "endpoints": endpoint_stats(served),
        "published": [version_name(e) for e in events if e["event"] == "publish"],
        "rolled_back": [version_name(e, e["previous"]) for e in events if e["event"] == "rollback"],
        "refused": [version_name(e) for e in events if e["event"] == "reject"],
        "events": [_placed(e, ok) for e in events],
        "alerts": [_placed(a, ok) for a in alerts],
        "series": [
            {
                "requests": end,
                "phase": ok[end - 1].phase,
                "domain": ok[end - 1].domain,
                "acceptance": _round(acceptance(ok[end - window : end])),
            }
            for end in range(window, len(ok) + 1, max(1, window // 2))
        ],
        "speedup": speedup,
    }


def _placed(item: dict, ok: Sequence[Served]) -> dict:
    return item | {"request": requests_before(ok, item["time"])}


def speedup_summary(measured: dict, initial: str, live: str) -> dict:
    """`deploy.demo.measure.rotate`'s result with the ratios to plain decoding."""
    per_s = measured["tokens_per_s"]
    return measured | {
        "initial_draft": initial,
        "live_draft": live,
        "live_vs_ar": _round(per_s["live draft"] / per_s["no speculation"]),
        "initial_vs_ar": _round(per_s["initial draft"] / per_s["no speculation"]),
    }


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def tables(report: dict) -> list[Table]:
    """The summary as rich tables: acceptance per phase, the run's first and last windows, and the
    requests per endpoint when some went through chat."""
    phases = Table(title=f"acceptance per phase (first and last {report['window']} requests)")
    for column in ("phase", "domain", "requests", "first window", "last window", "change"):
        phases.add_column(column, justify="right")
    for index, phase in enumerate(report["phases"]):
        first, last = phase["first_window"].get("acceptance"), phase["last_window"].get("acceptance")
        change = None if first is None or last is None else last - first
        phases.add_row(
            str(index + 1), phase["domain"], str(phase["requests"]), _fmt(first), _fmt(last),
            _fmt(change, "{:+.2f}"),
        )  # fmt: skip
    run = Table(title="the run's first and last windows")
    for column in ("window", "acceptance", "tokens/s", "latency p50 / p99 (s)", "TTFT p50 / p99 (ms)"):
        run.add_column(column, justify="right")
    for name in ("first_window", "last_window"):
        w = report[name]
        run.add_row(
            name.replace("_", " "), _fmt(w.get("acceptance")), _fmt(w.get("tokens_per_s"), "{:.0f}"),
            f"{_fmt(w.get('latency_p50'))} / {_fmt(w.get('latency_p99'))}",
            f"{_fmt(_ms(w.get('ttft_p50')), '{:.0f}')} / {_fmt(_ms(w.get('ttft_p99')), '{:.0f}')}",
        )  # fmt: skip
    endpoints = report.get("endpoints", {})
    if not endpoints.get("chat", {}).get("requests"):
        return [phases, run]
    by_endpoint = Table(title="requests per endpoint (/v1/completions, /v1/chat/completions)")
    for column in ("endpoint", "requests", "failed", "acceptance", "tokens each", "ended early"):
        by_endpoint.add_column(column, justify="right")
    for name, e in endpoints.items():
        by_endpoint.add_row(
            name, str(e["requests"]), str(e["failed"]), _fmt(e["acceptance"]),
            _fmt(e["tokens_per_request"], "{:.1f}"), str(e["stopped_early"]),
        )  # fmt: skip
    return [phases, run, by_endpoint]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def plot(report: dict, path: Path) -> None:
    """Acceptance against requests served, with the phases and the publish, rollback and refusal
    markers, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = report["series"]
    ax.plot([p["requests"] for p in series], [p["acceptance"] for p in series], "-o", markersize=3)
    start = 0
    for phase in report["phases"]:
        ax.axvline(start, color="grey", linewidth=0.5)
        ax.text(start + 1, 0.03, phase["domain"], fontsize=9)
        start += phase["requests"]
    colors = {"publish": "tab:green", "rollback": "tab:red", "reject": "tab:orange"}
    for event in report["events"]:
        ax.axvline(event["request"], color=colors[event["event"]], alpha=0.5, linewidth=1)
    for alert in report["alerts"]:
        ax.plot(alert["request"], 0.95, "v", color="tab:red")
    ax.set_xlabel("requests served")
    ax.set_ylabel(f"acceptance rate (last {report['window']} requests)")
    ax.set_ylim(0, 1)
    ax.set_title("osd demo: green = publish, red = rollback, orange = refused; triangles = drift alerts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
