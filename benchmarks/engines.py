"""The HF engine against the vLLM engine, on the demo pair, in one run whose arms alternate.

Offline (engine level, through serving.engine.protocol, engines built by
`serving.replica.open_engine`): engine (hf, vllm) x draft (plain decoding, the initial draft, the
draft distilled offline on --domain) x load (one request at a time, and --concurrency at once in a
closed loop), greedy, --max-tokens new tokens (stopping at the target's EOS, as a server does), k
fixed at --k on both engines (the HF engine's adaptive k is off). Every engine stays open for the
whole run, and blocks of --requests held-out prompts alternate between the arms, in reverse order
every other round, so that drift on this machine hits them alike. Per arm: tokens/s, acceptance;
per config: vLLM over HF; per engine: speculative over plain; per draft: whether the two engines'
greedy outputs are identical.

Over HTTP: --concurrency clients in a closed loop stream greedy completions (token-id prompts) from
`osd serve --engine hf|vllm --ingress proxy|haproxy` (each --ingress; plain decoding, no trainer)
and vLLM's own OpenAI server on the target, all up at once on loopback, in alternating blocks. Per
server: tokens/s, latency, its share of its engine's offline plain rate at the same concurrency;
per ingress, osd on vLLM over vLLM's own server; and whether the servers' texts are identical.

    osd bench engines --json benchmarks/results/engines_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import packages_distributions, version
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.progress import Progress

from benchmarks.demo_pair import add_arguments, demo_pair
from benchmarks.http_load import closed_loop, count_to, summarize
from benchmarks.results import print_rows, write_report
from benchmarks.serve_child import osd_serve, wait_until_up
from deploy.serve import INGRESSES
from serving.engine.protocol import Engine, EngineRequest, Step
from serving.engine.vllm import VLLMSettings
from serving.replica import ENGINES, EngineName, ReplicaConfig, open_engine
from store.redis_server import LocalRedis, free_port

# vLLM's CPU backend reads these before it starts: a 1 GiB KV cache per engine (its default takes a
# share of the machine's memory, and this run holds several engines), and warnings only.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
RECORDED_ENV = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "LD_PRELOAD",
)
BLOCK_SECONDS = 1800  # a block that has not finished by then has hung
VLLM_SERVER = "vllm"  # vLLM's own OpenAI server, beside osd serve's arms


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench engines", description=__doc__.splitlines()[0])
    add_arguments(p)  # --draft base: no distilled arms
    p.add_argument("--k", type=int, default=3, help="speculative tokens per step, on both engines")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16, help="requests at once, beside one at a time")
    p.add_argument("--requests", type=int, default=64, help="per block and arm")
    p.add_argument("--blocks", type=int, default=3, help="per arm")
    p.add_argument(
        "--dtype",
        default="float32",
        help="every engine's and server's, passed to each (vLLM's own auto would take bfloat16 on a CPU)",
    )
    p.add_argument(
        "--vllm-eager", action="store_true", help="offline vLLM without compilation (a faster start)"
    )
    p.add_argument(
        "--ingress", nargs="+", choices=INGRESSES, default=list(INGRESSES),
        help="osd serve's fronts to measure over HTTP (default: both)",
    )  # fmt: skip
    p.add_argument("--no-offline", action="store_true", help="skip the engine-level part")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    p.add_argument("--json", type=Path, help="write the report here")
    return p


@dataclass(frozen=True)
class Settings:
    """What every arm runs with (see the flags)."""

    k: int = 3
    max_tokens: int = 48
    concurrency: int = 16
    requests: int = 64  # per block and arm
    blocks: int = 3
    dtype: str = "float32"
    vllm_eager: bool = False
    ingresses: tuple[str, ...] = INGRESSES  # osd serve's fronts, over HTTP
    settle_seconds: float = 1.5  # before each timed block: vLLM's workers spin a second after their last step

    def __post_init__(self):
        if min(self.k, self.max_tokens, self.concurrency, self.requests, self.blocks) < 1:
            raise ValueError("k, max_tokens, concurrency, requests and blocks must be >= 1")


@dataclass(frozen=True)
class DraftConfig:
    """What proposes: a draft model, or nothing (plain decoding)."""

    name: str  # "plain", "initial" or "distilled"
    path: str | None  # the draft's directory; None: plain decoding


@dataclass(frozen=True)
class Arm:
    """One engine, one draft config, one load: what a block measures."""

    engine: EngineName
    draft: str  # a DraftConfig's name
    concurrency: int


@dataclass
class Block:
    """One block of requests an engine served: its time, tokens, outputs and spec-decode counts."""

    seconds: float = 0.0
    tokens: int = 0
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request's place in the block -> new ids
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    failures: list[str] = field(default_factory=list)


def plan(arms: list, blocks: int) -> list:
    """Each block of every arm in turn: the arms in order, then reversed, and so on, so that a
    linear drift hits each arm alike."""
    return [arm for block in range(blocks) for arm in (arms if block % 2 == 0 else arms[::-1])]


def http_servers(ingresses: tuple[str, ...]) -> dict[str, tuple[EngineName, str | None]]:
    """The HTTP arms by name: osd serve on each engine behind each ingress, then vLLM's own server,
    as (engine, ingress)."""
    osd = {
        f"osd-{engine}" + ("" if ingress == "proxy" else f"-{ingress}"): (engine, ingress)
        for engine in ENGINES
        for ingress in ingresses
    }
    return osd | {VLLM_SERVER: ("vllm", None)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def mismatches(a: dict, b: dict) -> tuple[int, int]:
    """(how many of the keys both hold map to different values, how many keys both hold)."""
    common = a.keys() & b.keys()
    return sum(a[key] != b[key] for key in common), len(common)


def replica_config(target: str, draft: DraftConfig, engine: EngineName, settings: Settings) -> ReplicaConfig:
    return ReplicaConfig(
        target=target, draft=draft.path, engine=engine, proposer="draft" if draft.path else "none",
        num_speculative_tokens=settings.k, max_batch=settings.concurrency, adaptive_k=False,
        dtype=settings.dtype, vllm=VLLMSettings(enforce_eager=settings.vllm_eager),
    )  # fmt: skip


class Driver:
    """An open engine serving blocks of requests in a closed loop: each request that ends hands its
    place to the next one (from the engine's Deliver, on the engine's thread)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._block = Block()
        self._waiting: list[tuple[str, int, list[int]]] = []  # (request id, place, prompt), last first
        self._in_flight: dict[str, int] = {}  # request id -> its place in the block
        self._max_tokens = 0
        self._done = threading.Event()
        engine.start(self._deliver)

    def run(self, prompts: list[list[int]], concurrency: int, max_tokens: int, tag: str) -> Block:
        """Serve `prompts` (greedy, `max_tokens` each) with `concurrency` in flight while any wait."""
        with self._lock:
            self._block, self._done, self._max_tokens = Block(), threading.Event(), max_tokens
            self._waiting = [(f"{tag}-{i}", i, p) for i, p in enumerate(prompts)][::-1]
            began = time.perf_counter()
            for _ in range(concurrency):
                self._submit_next()
        if not self._done.wait(BLOCK_SECONDS):
            raise TimeoutError(f"block {tag}: unfinished after {BLOCK_SECONDS} s")
        self._block.seconds = time.perf_counter() - began
        return self._block

    def _submit_next(self) -> None:
        if self._waiting:
            request_id, index, prompt = self._waiting.pop()
            self._in_flight[request_id] = index
            self.engine.submit(EngineRequest(request_id, prompt, self._max_tokens))

    def _deliver(self, events: list[tuple[str, Step | BaseException]]) -> None:
        with self._lock:
            block = self._block
            for request_id, event in events:
                if isinstance(event, BaseException):
                    block.failures.append(f"{request_id}: {event!r}")
                elif event.generation is not None:
                    stats = event.generation.stats
                    block.outputs[self._in_flight[request_id]] = event.generation.token_ids
                    block.tokens += len(event.generation.token_ids)
                    block.steps, block.drafted = block.steps + stats.steps, block.drafted + stats.drafted
                    block.accepted += stats.accepted
                else:
                    continue
                del self._in_flight[request_id]
                self._submit_next()
            if not self._waiting and not self._in_flight:
                self._done.set()


def cycled(prompts: list[list[int]], n: int) -> list[list[int]]:
    """n requests' prompts: the held-out prompts in order, again from the first when they run out."""
    return [prompts[i % len(prompts)] for i in range(n)]


def offline(
    target: str, drafts: list[DraftConfig], prompts: list[list[int]], settings: Settings, console: Console
) -> dict:
    """Every arm's blocks, its engines all open, after one untimed warm-up block per engine."""
    arms = [
        Arm(engine, draft.name, concurrency)
        for concurrency in (1, settings.concurrency) for draft in drafts for engine in ENGINES
    ]  # fmt: skip
    requests = cycled(prompts, settings.requests)
    drivers: dict[tuple[str, str], Driver] = {}
    runs: dict[Arm, list[Block]] = {arm: [] for arm in arms}
    try:
        for draft, engine in itertools.product(drafts, ENGINES):
            with console.status(f"starting the {engine} engine, {draft.name}"):
                drivers[engine, draft.name] = Driver(
                    open_engine(replica_config(target, draft, engine, settings))
                )
        steps = plan(arms, settings.blocks)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warm-up", total=len(drivers) + len(steps))
            for (engine, draft), driver in drivers.items():
                driver.run(
                    requests[: settings.concurrency], settings.concurrency, settings.max_tokens, "warm"
                )
                progress.update(task, advance=1, description=f"warm-up: {engine}, {draft}")
            for i, arm in enumerate(steps):
                progress.update(task, description=f"{arm.engine}, {arm.draft}, {arm.concurrency} at once")
                time.sleep(settings.settle_seconds)
                block = drivers[arm.engine, arm.draft].run(
                    requests, arm.concurrency, settings.max_tokens, f"b{i}"
                )
                runs[arm].append(block)
                progress.update(task, advance=1)
    finally:
        for driver in drivers.values():
            driver.engine.close(60)
    return offline_report(runs, [d.name for d in drafts])


def arm_row(arm: Arm, blocks: list[Block]) -> dict:
    tokens, seconds = sum(b.tokens for b in blocks), sum(b.seconds for b in blocks)
    steps, drafted, accepted = (sum(getattr(b, n) for b in blocks) for n in ("steps", "drafted", "accepted"))
    return {
        "engine": arm.engine,
        "draft": arm.draft,
        "concurrency": arm.concurrency,
        "requests": sum(len(b.outputs) for b in blocks),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "tokens_per_s_blocks": [round(b.tokens / b.seconds, 1) for b in blocks],
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "mean_accepted_length": round((accepted + steps) / steps, 3) if steps else None,
        "failures": [f for b in blocks for f in b.failures][:10],
    }


def offline_report(runs: dict[Arm, list[Block]], drafts: list[str]) -> dict:
    """Rows per arm; vLLM over HF per (draft, concurrency); speculative over plain per (engine,
    draft, concurrency), when plain decoding ran; per draft, whether the engines' greedy outputs
    agree on every prompt."""
    rows = [arm_row(arm, blocks) for arm, blocks in runs.items()]
    rate = {(r["engine"], r["draft"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    levels = sorted({arm.concurrency for arm in runs})
    outputs = {arm: {i: o for b in blocks for i, o in b.outputs.items()} for arm, blocks in runs.items()}
    identical = []
    for draft in drafts:
        counts = [
            mismatches(outputs[Arm("hf", draft, c)], outputs[Arm("vllm", draft, c)]) for c in levels
        ]  # fmt: skip
        differ, compared = sum(n for n, _ in counts), sum(n for _, n in counts)
        identical.append(
            {"draft": draft, "identical": differ == 0, "mismatches": differ, "compared": compared}
        )
    return {
        "arms": rows,
        "vllm_over_hf": [
            {"draft": d, "concurrency": c, "ratio": ratio(rate["vllm", d, c], rate["hf", d, c])}
            for d in drafts
            for c in levels
        ],
        "spec_over_plain": [
            {"engine": e, "draft": d, "concurrency": c, "ratio": ratio(rate[e, d, c], rate[e, "plain", c])}
            for e in ENGINES
            for d in drafts
            if d != "plain" and "plain" in drafts
            for c in levels
        ],
        "identical": identical,
        "failed_requests": sum(len(b.failures) for blocks in runs.values() for b in blocks),
    }


@contextmanager
def vllm_server(target: str, port: int, settings: Settings, log: Path) -> Iterator[str]:
    """vLLM's own OpenAI server on the target (plain decoding, the batch and dtype of the others);
    yields its base URL once it answers, stopped with Ctrl-C (SIGINT) after."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
        "--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(settings.concurrency), "--dtype", settings.dtype,
        "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(server, base)
            yield base
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(120)


async def texts(
    base: str, prompts: list[list[int]], max_tokens: int, concurrency: int, failures: list[str]
) -> dict[int, str | None]:
    """Each prompt's greedy completion text (not streamed; None if it failed), by its index,
    `concurrency` at a time."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:

        async def one(prompt: list[int]) -> str | None:
            body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            try:
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
            except httpx.HTTPError as err:
                failures.append(repr(err))
                return None
            return response.json()["choices"][0]["text"]

        return dict(enumerate(await asyncio.gather(*(one(p) for p in prompts))))


def over_http(
    target: str, prompts: list[list[int]], settings: Settings, offline_rows: list[dict], console: Console
) -> dict:
    """The three servers up at once, their blocks alternating after one untimed warm-up block each."""
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        redis = stack.enter_context(LocalRedis(data_dir=Path(scratch) / "redis")).url.removesuffix("/0")
        common = ["--target", target, "--served-model-name", "demo", "--no-trainer", "--proposer", "none",
                  "--max-batch", str(settings.concurrency), "--dtype", settings.dtype]  # fmt: skip
        arms, bases = http_servers(settings.ingresses), {}
        for db, (name, (engine, ingress)) in enumerate(list(arms.items())[:-1]):
            flags = [*common, "--engine", engine, "--ingress", ingress, "--redis-url", f"{redis}/{db}"]
            bases[name] = stack.enter_context(
                osd_serve(flags, free_port(), Path(scratch) / f"{name}.log", console)
            )[1]
        with console.status("starting vLLM's own server"):
            bases[VLLM_SERVER] = stack.enter_context(
                vllm_server(target, free_port(), settings, Path(scratch) / "vllm.log")
            )
        steps = plan(list(arms), settings.blocks)
        runs: dict[str, list] = {name: [] for name in arms}
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warm-up", total=len(arms) + len(steps))
            for name in arms:
                run = closed_loop(bases[name], itertools.cycle(prompts), settings.concurrency,
                                  settings.max_tokens, count_to(settings.concurrency), failures)  # fmt: skip
                asyncio.run(run)
                progress.update(task, advance=1)
            for name in steps:
                progress.update(task, description=f"{name}: {settings.concurrency} clients")
                time.sleep(settings.settle_seconds)
                run = closed_loop(bases[name], itertools.cycle(prompts), settings.concurrency,
                                  settings.max_tokens, count_to(settings.requests), failures)  # fmt: skip
                runs[name].append(asyncio.run(run))
                progress.update(task, advance=1)
        distinct = prompts[: settings.requests]
        with console.status("greedy texts from each server"):
            completions = {
                name: asyncio.run(
                    texts(bases[name], distinct, settings.max_tokens, settings.concurrency, failures)
                )
                for name in arms
            }
    return http_report(arms, runs, completions, offline_rows, settings.concurrency, failures)


def http_report(
    arms: dict[str, tuple[EngineName, str | None]],
    runs: dict[str, list],
    completions: dict[str, dict],
    offline_rows: list[dict],
    concurrency: int,
    failures: list[str],
) -> dict:
    """Per server (`http_servers`' arms): the load summary and its share of its engine's offline
    plain rate at this concurrency (None without the offline part); per ingress, osd on vLLM over
    vLLM's own server; whether the texts agree with the first server's."""
    offline_rate = {
        r["engine"]: r["tokens_per_s"]
        for r in offline_rows if r["draft"] == "plain" and r["concurrency"] == concurrency
    }  # fmt: skip
    servers = []
    for name, (engine, ingress) in arms.items():
        summary = summarize(runs[name])
        share = ratio(summary["tokens_per_s"], offline_rate.get(engine))
        servers.append({"server": name, "ingress": ingress, **summary, "share_of_offline": share})
    rate = {s["server"]: s["tokens_per_s"] for s in servers}
    osd_over_vllm = {
        ingress: ratio(rate[name], rate[VLLM_SERVER])
        for name, (engine, ingress) in arms.items()
        if engine == "vllm" and name != VLLM_SERVER
    }
    first, *others = arms
    counts = [mismatches(completions[first], completions[name]) for name in others]
    differ = sum(n for n, _ in counts)
    return {
        "servers": servers,
        "osd_vllm_over_vllm": osd_over_vllm,
        "texts": {"identical": differ == 0, "mismatches": differ, "compared": sum(n for _, n in counts)},
        "failed_requests": len(failures),
        "failures": failures[:10],
    }


def environment() -> dict:
    """The machine, the threads torch uses here and vLLM's CPU settings."""
    vllm = packages_distributions().get("vllm", [])
    return {
        "platform": platform.platform(),
        "vllm": f"{vllm[0]} {version(vllm[0])}" if vllm else None,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **{name: os.environ.get(name) for name in RECORDED_ENV},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.no_offline and args.no_http:
        sys.exit("osd bench engines: nothing to run (--no-offline and --no-http)")
    try:
        settings = Settings(
            args.k, args.max_tokens, args.concurrency, args.requests, args.blocks, args.dtype,
            args.vllm_eager, tuple(dict.fromkeys(args.ingress)),
        )  # fmt: skip
    except ValueError as err:
        sys.exit(f"osd bench engines: {err}")
    for name, value in VLLM_ENV.items():  # before vLLM is imported here or in a child
        os.environ.setdefault(name, value)
    console = Console()
    models, draft, prompts = demo_pair(args, console)
    drafts = [DraftConfig("plain", None), DraftConfig("initial", str(models.draft))]
    if args.draft == "distilled":
        drafts.append(DraftConfig("distilled", str(draft)))
    report = {
        "benchmark": "engines",
        "demo": args.demo,
        "domain": args.domain,
        "settings": asdict(settings) | {"prompts": len(prompts)},
        "environment": environment(),
    }
    if not args.no_offline:
        report["offline"] = offline(str(models.target), drafts, prompts, settings, console)
    if not args.no_http:
        rows = report.get("offline", {}).get("arms", [])
        report["http"] = over_http(str(models.target), prompts, settings, rows, console)
    print_report(console, report)
    if args.json:
        write_report(args.json, report)
    return report


def print_report(console: Console, report: dict) -> None:
    if "offline" in report:
        part = report["offline"]
        columns = ("engine", "draft", "at once", "tok/s", "alpha", "tau", "vllm/hf", "spec/plain")
        vllm_over_hf = {(r["draft"], r["concurrency"]): r["ratio"] for r in part["vllm_over_hf"]}
        spec_over_plain = {
            (r["engine"], r["draft"], r["concurrency"]): r["ratio"] for r in part["spec_over_plain"]
        }
        rows = [
            {
                "engine": r["engine"], "draft": r["draft"], "at once": r["concurrency"],
                "tok/s": r["tokens_per_s"], "alpha": r["acceptance_rate"] or "",
                "tau": r["mean_accepted_length"] or "",
                "vllm/hf": vllm_over_hf[r["draft"], r["concurrency"]] if r["engine"] == "vllm" else "",
                "spec/plain": spec_over_plain.get((r["engine"], r["draft"], r["concurrency"]), ""),
            }
            for r in part["arms"]
        ]  # fmt: skip
        print_rows(console, "Offline: HF engine against vLLM engine", columns, rows)
        for entry in part["identical"]:
            console.print(
                f"{entry['draft']}: greedy outputs {'identical' if entry['identical'] else 'DIFFER'} "
                f"({entry['mismatches']} of {entry['compared']} prompts differ)"
            )
    if "http" in report:
        part = report["http"]
        columns = ("server", "ingress", "tok/s", "p50 s", "share of offline")
        rows = [
            {"server": s["server"], "ingress": s["ingress"] or "", "tok/s": s["tokens_per_s"],
             "p50 s": s["latency_p50_s"],
             "share": "" if s["share_of_offline"] is None else s["share_of_offline"]}
            for s in part["servers"]
        ]  # fmt: skip
        print_rows(console, "Over HTTP, plain decoding", columns, rows)
        same = part["texts"]
        over = ", ".join(f"{ingress} {value}" for ingress, value in part["osd_vllm_over_vllm"].items())
        console.print(
            f"osd on vLLM / vLLM's own server: {over}; texts "
            f"{'identical' if same['identical'] else 'DIFFER'} ({same['mismatches']} of "
            f"{same['compared']} differ); failed requests: {part['failed_requests']}"
        )


if __name__ == "__main__":
    main()
