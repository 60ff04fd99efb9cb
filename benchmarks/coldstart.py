"""Cold start: the first hundred requests of a domain the demo pair never saw, then idle.

A fresh deployment (`osd serve` with its defaults on the demo pair, as `--demo` starts it, with a
Redis and a trainer directory of its own) serves --requests chat requests through
/v1/chat/completions, from --concurrency clients with the openai client, untagged, at the API's
default sampling (temperature 1) and --max-tokens each. The questions are made from the man pages
on this machine (`man_questions`: each page's name line and the start of its description, put to
the model in a few phrasings), text the demo corpora (Python sources, C headers, docstring prose)
never use. Then no request comes for up to --idle-seconds. Recorded:

- the seconds of idle until the trainer's first gate decision (a publish or a refusal in the
  registry), whether a version was published, the decision's numbers and its replay rounds, and
  the trainer's activity as the dashboard showed it, once a second;
- on --eval unseen questions of the same workload (other man pages), for the starting draft and
  for the version live after the idle time: the expected acceptance (sum min(p, q) on the target's
  top-16, what the gate measures) on the target's own answers (sampled with the engine and fixed
  seeds, before the server starts), and the acceptance rate the engine realises drafting k = 3
  tokens at every step on the same questions, sampled with the same seeds and greedy (after the
  server has stopped);
- served acceptance (accepted over drafted, from each response's `metrics`): of the traffic, which
  the starting draft served, and of the unseen questions sent once the live version serves them.
  k follows the load there (the default), so these count only the tokens the replica chose to draft.

    osd bench coldstart --json benchmarks/results/coldstart_cpu.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import torch
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.results import write_report
from benchmarks.serve_child import osd_serve
from deploy.demo.build import DEFAULT_CACHE_DIR, PRESETS, build_demo_models
from distill.acceptance import mean_acceptance, trace_acceptance
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, NullProposer
from serving.http.api import ChatMessage, chat_prompt
from serving.tracing import trace_of
from store.load import read_load
from store.redis_server import LocalRedis, free_port
from store.registry import DraftVersion, Registry
from store.traces import Trace

DRAFT = "draft"  # the registry name `osd serve` trains under
TARGET_MET_SECONDS = 120.0  # the first gate decision within this much idle time

# --- the workload: questions from man pages ----------------------------------------------------

ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),  # strings
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\((lq|rq|dq|aq)"), '"'),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\(\(..|\[[^\]]*\]|.)"), ""),  # any other escape
]
BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "Pp", "sp", "br", "SS", "Ss"}  # paragraph breaks
TEXT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "Nm", "Nd", "Ar", "Fl"}
PHRASINGS = (
    'What does the {cmd} command do? The manual says: "{text}"',
    "I am looking for a tool that does this: {summary}. Is {cmd} the right one, and how do I use it?",
    "Can you explain this part of the {cmd} manual in simpler words? {text}",
    "What is {cmd} ({summary}) and when would I use it instead of something else?",
)


@dataclass(frozen=True)
class ManPage:
    command: str
    summary: str  # the name line's description
    text: str  # the description's first sentences


def plain(line: str) -> str:
    """A roff text line without its escapes."""
    for pattern, replacement in ESCAPES:
        line = pattern.sub(replacement, line)
    return line


def parse_man_page(source: str) -> ManPage | None:
    """The command, its one-line summary and the first sentences of its description (at most about
    300 characters), from man(7) or mdoc(7) source; None for a page that lacks one of them."""
    sections: dict[str, list[list[str]]] = defaultdict(lambda: [[]])
    section = ""
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".so ")):
            if line.startswith(".so "):
                return None  # a link to another page
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].partition(" ")
            if macro in ("SH", "Sh"):
                section = args.strip().strip('"').upper()
            elif macro in BREAKS:
                sections[section].append([])
            elif macro in TEXT_MACROS and args:
                dash = "- " if macro == "Nd" else ""  # mdoc's name description
                sections[section][-1].append(dash + plain(args.replace('"', "")))
            continue
        if not line.strip():
            sections[section].append([])
        else:
            sections[section][-1].append(plain(line))
    name = re.match(r"(.+?)\s+-+\s+(.+)", " ".join(" ".join(p) for p in sections.get("NAME", [])))
    paragraphs = [re.sub(r"\s+", " ", " ".join(p)).strip() for p in sections.get("DESCRIPTION", [])]
    text = next((p for p in paragraphs if len(p) >= 60), "")
    if name is None or not text or not text.isascii():
        return None
    command, summary = name.groups()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + len(sentence) > 300:
            break
        kept += " " + sentence
    return ManPage(command.split(",")[0].strip(), summary.strip().rstrip("."), kept[:400])


def man_questions(man_dir: Path, count: int) -> list[str]:
    """`count` questions, one per man page, from the pages of `man_dir` in a fixed pseudo-random
    order (a hash of the file name), one page per family of commands (its first word: a single
    `gcloud ...` page of the thousands there may be)."""
    pages = sorted(man_dir.glob("*.gz"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    questions, seen = [], set()
    for path in pages:
        try:
            page = parse_man_page(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        family = re.split(r"[\s_.-]", page.command)[0].lower() if page else None
        if page is None or family in seen:
            continue
        seen.add(family)
        phrasing = PHRASINGS[len(questions) % len(PHRASINGS)]
        questions.append(phrasing.format(cmd=page.command, summary=page.summary, text=page.text))
        if len(questions) == count:
            return questions
    raise ValueError(f"only {len(questions)} usable man pages in {man_dir}, {count} needed")


# --- serving and watching ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One chat request as the client saw it."""

    draft_version: str | None
    drafted: int
    accepted: int
    tokens: int
    error: str | None = None


def ask(base: str, model: str, questions: list[str], max_tokens: int, concurrency: int) -> list[Answer]:
    """The questions through /v1/chat/completions with the openai client, `concurrency` at a time."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300, max_retries=0)

    def one(question: str) -> Answer:
        try:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens
            )
        except openai.OpenAIError as err:
            return Answer(None, 0, 0, 0, f"{type(err).__name__}: {err}")
        metrics = (response.model_extra or {}).get("metrics") or {}
        return Answer(
            metrics.get("draft_version"), metrics.get("spec_drafted", 0), metrics.get("spec_accepted", 0),
            response.usage.completion_tokens,
        )  # fmt: skip

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, questions))


def served(answers: list[Answer]) -> dict:
    """Served acceptance over the answers, overall and per draft version that served them."""

    def rate(group: list[Answer]) -> dict:
        drafted, accepted = sum(a.drafted for a in group), sum(a.accepted for a in group)
        return {"requests": len(group), "drafted": drafted, "accepted": accepted,
                "acceptance": round(accepted / drafted, 4) if drafted else None}  # fmt: skip

    ok = [a for a in answers if a.error is None]
    versions = sorted({a.draft_version for a in ok if a.draft_version})
    return rate(ok) | {
        "failed": len(answers) - len(ok),
        "tokens": sum(a.tokens for a in ok),
        "by_version": {v: rate([a for a in ok if a.draft_version == v]) for v in versions},
    }


def decisions(registry: Registry) -> list[DraftVersion]:
    """The trainer's gate decisions so far: the versions it added with the gate's numbers."""
    return [v for v in registry.versions(DRAFT) if "gate" in v.extra]


def watch_idle(base: str, registry: Registry, client, since: float, seconds: float, console: Console) -> dict:
    """Once a second for up to `seconds`: the trainer's activity as the dashboard shows it (each
    change, with the idle seconds it came at), until the first gate decision is in the registry and,
    when it published, every replica serves the published version."""
    timeline: list[dict] = []
    first: DraftVersion | None = None
    with console.status("idle: waiting for the trainer's first gate decision") as status:
        while time.time() - since < seconds:
            try:
                data = httpx.get(f"{base}/dashboard/data", params={"range": "5m"}, timeout=10).json()
                trainer = data["trainer"]
            except (httpx.HTTPError, ValueError, KeyError):
                trainer = None
            activity = (trainer or {}).get("activity")
            if activity and (not timeline or timeline[-1]["activity"] != activity):
                timeline.append({"idle_s": round(time.time() - since, 1), "step": trainer.get("step"),
                                 "activity": activity})  # fmt: skip
                status.update(f"idle {time.time() - since:.0f} s: {activity}")
            first = first or next(iter(decisions(registry)), None)
            live = registry.live(DRAFT)
            serving = {load.draft_version for load in read_load(client)}
            if first is not None and live is not None and serving == {live.label}:
                break
            time.sleep(1.0)
    if first is None:
        return {"first_decision_s": None, "published": False, "decision": None, "timeline": timeline}
    gate = first.extra["gate"]
    replay = gate.get("replay")
    return {
        "first_decision_s": round(first.created - since, 1),
        "published": gate["publish"],
        "decision": {
            "version": first.version,
            "train_steps": first.train_steps,
            "reason": gate["reason"],
            "candidate": gate["candidate"],
            "live": gate["live"],
            "positions": gate["positions"],
            "replay_rounds": len(replay["scores"]) - 1 if replay else None,
            "replay_scores": [round(s, 4) for s in replay["scores"]] if replay else None,
            "replay_stop": replay["stop"] if replay else None,
        },
        "timeline": timeline,
    }


# --- offline scores on unseen questions --------------------------------------------------------


def target_answers(target: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[Trace]:
    """The target's own answers (sampled at temperature 1, seed = index) as traces with its top-16."""
    engine = SpecEngine(target, NullProposer(), 0)
    traces = []
    for i, prompt in enumerate(prompts):
        out = engine.generate(prompt, max_tokens, temperature=1.0, seed=i, top_logprobs=16)
        traces.append(trace_of(f"unseen-{i}", "-", "demo-target", ("none",), prompt, out, {"seed": i}))
    return traces


def scores(
    target: torch.nn.Module, draft: torch.nn.Module, traces: list[Trace], max_len: int, max_tokens: int
) -> dict:
    """A draft's expected acceptance on the traces, and the acceptance rate the engine realises with
    it drafting 3 tokens at every step on the same prompts, sampled (with the traces' seeds) and
    greedy."""
    engine = SpecEngine(target, DraftModelProposer(draft), 3)
    realised = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        drafted = accepted = 0
        for i, trace in enumerate(traces):
            prompt = trace.prompt_ids.tolist()
            stats = engine.generate(prompt, max_tokens, temperature=temperature, seed=i).stats
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        realised[name] = round(accepted / drafted, 4)
    return {
        "expected_acceptance": round(mean_acceptance(trace_acceptance(draft, traces, max_len)), 4),
        "engine_acceptance_k3": realised,
    }


# --- the run -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd bench coldstart", description=__doc__.splitlines()[0])
    p.add_argument("--demo", choices=sorted(PRESETS), default="full", help="demo pair preset")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--requests", type=int, default=103, help="chat requests before the idle time")
    p.add_argument("--eval", type=int, default=20, help="unseen questions scored before and after")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=4, help="clients sending the requests")
    p.add_argument("--idle-seconds", type=float, default=300.0, help="the most idle time to wait")
    p.add_argument("--man-dir", type=Path, default=Path("/usr/share/man/man1"))
    p.add_argument("--json", type=Path, help="write the report here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    console = Console()
    preset = PRESETS[args.demo]
    models = build_demo_models(preset, args.cache_dir, console=console)
    questions = man_questions(args.man_dir, args.requests + args.eval)
    traffic, unseen = questions[: args.requests], questions[args.requests :]
    tokenizer = AutoTokenizer.from_pretrained(models.target)  # prompted as the chat endpoint prompts
    prompts = [chat_prompt(tokenizer, [ChatMessage(role="user", content=q)]) for q in unseen]
    target = AutoModelForCausalLM.from_pretrained(models.target).eval()
    with console.status(f"the target's answers to {len(unseen)} unseen questions"):
        unseen_traces = target_answers(target, prompts, args.max_tokens)
    model_name = f"osd-demo-{args.demo}"
    with (
        tempfile.TemporaryDirectory(prefix="osd-coldstart-") as scratch,
        LocalRedis(data_dir=Path(scratch) / "redis") as redis_server,
    ):
        client = redis_server.client()
        registry = Registry(client)
        flags = [
            *("--target", str(models.target), "--draft", str(models.draft), "--model-name", model_name),
            *("--redis-url", redis_server.url, "--trainer-dir", str(Path(scratch) / "trainer")),
        ]  # what `osd serve --demo` resolves to, with a fresh Redis and trainer directory
        with osd_serve(flags, free_port(), Path(scratch) / "serve.log", console) as (_, base):
            started = time.time()
            with Progress(console=console, transient=True) as progress:
                progress.add_task(f"{len(traffic)} chat requests", total=None)
                answers = ask(base, model_name, traffic, args.max_tokens, args.concurrency)
            idle_since = time.time()
            console.print(f"traffic done in {idle_since - started:.0f} s; idle now")
            idle = watch_idle(base, registry, client, idle_since, args.idle_seconds, console)
            live = registry.live(DRAFT)
            after_answers = ask(base, model_name, unseen, args.max_tokens, args.concurrency)
        live_weights = registry.load(live)
    starting = AutoModelForCausalLM.from_pretrained(models.draft).eval()
    after = AutoModelForCausalLM.from_pretrained(models.draft).eval()
    after.load_state_dict(live_weights)
    with console.status("scoring the starting draft and the live one on the unseen questions"):
        context, tokens = preset.target.context, args.max_tokens
        before_scores = scores(target, starting, unseen_traces, context, tokens)
        after_scores = scores(target, after, unseen_traces, context, tokens)
    report = {
        "benchmark": "coldstart",
        "demo": args.demo,
        "workload": {
            "source": f"man pages under {args.man_dir}",
            "endpoint": "/v1/chat/completions",
            "requests": len(traffic),
            "unseen": len(unseen),
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "temperature": 1.0,
            "examples": traffic[:3],
        },
        "traffic_seconds": round(idle_since - started, 1),
        "idle": idle,
        "live_after": live.label,
        "unseen": {"before": before_scores, "after": after_scores},
        "served": {"traffic": served(answers), "unseen_after": served(after_answers)},
        "target_met": idle["first_decision_s"] is not None
        and idle["first_decision_s"] <= TARGET_MET_SECONDS
        and idle["published"]
        and after_scores["expected_acceptance"] > before_scores["expected_acceptance"],
    }
    console.print_json(data={k: report[k] for k in ("idle", "live_after", "unseen", "served", "target_met")})
    if args.json:
        write_report(args.json, report)
    return report
