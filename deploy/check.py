"""`osd check --target T [--draft D]`: the preflight. Will this pair serve, and how fast can it be?

It loads the models as the engine does (`serving.engine.models.load_causal_lm`) and reports, one line
each, with ok, note (serves, but worth knowing) or FAIL (cannot serve):
- architecture: each model loads as a causal LM;
- tokenizer: the target's, which the API needs to encode prompts and decode outputs;
- vocabulary: the draft's against the target's (`serving.engine.vocab`): the same token on every
  shared id, and output rows beyond the tokens only padding;
- chat template: the tokenizer's; without one, chat prompts become "<role>: <content>" lines;
- trees: whether the target verifies token trees exactly (draft heads' tree mode);
- context: each model's, against `--max-model-len` (default: the target's);
- memory: the replica's memory plan (`serving.engine.memory`): weights, and KV caches for `--max-batch`
  slots of `--max-model-len` + 64 lookahead positions (default: the target's context, reduced to
  what fits), within `--gpu-memory-utilization` of a device of `--memory-gib` (default: this
  one's, and what it has free), beside the trainer's `--trainer-share`; FAIL, with what would
  fit, when it cannot fit;
- cost ratio c: a draft decoding step's time over a target decoding step's, measured here (eager,
  batch 1);

then the speedup bound S(alpha, k, c) of DESIGN.md at the best k for a few alpha. It exits with
status 1, the reasons printed, when the pair cannot serve; `--json PATH` writes the findings too.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from serving.engine.device import SERVING_MEMORY_FRACTION
from serving.engine.hf import cost_ratio
from serving.engine.memory import GIB, MemoryPlan, gib, model_size, plan_memory
from serving.engine.models import (
    context_length,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    tree_support,
    vocab_size,
)
from serving.engine.speculation import speedup_bound
from serving.engine.vocab import SharedVocabulary, load_tokenizer, shared_vocabulary, token_list
from serving.errors import IncompatibleDraftError, ModelLoadError
from trainer.config import TrainerConfig

ALPHAS = (0.5, 0.6, 0.7, 0.8)  # acceptance rates the speedup bound is shown for
MAX_K = 8  # the best k is searched in 1..MAX_K
MAX_BATCH = 8  # deploy.ray_serve.ServiceConfig.max_batch (not imported: that module imports Ray)
K = 3  # deploy.ray_serve.ServiceConfig.k
COST_PROMPT, COST_TOKENS = 32, 48  # the decode that times c: prompt tokens, new tokens
STYLE = {"ok": "green", "note": "yellow", "fail": "bold red"}


@dataclass(frozen=True)
class Finding:
    item: str  # what was checked: "architecture", "vocabulary", ...
    status: str  # "ok", "note" (serves, but worth knowing) or "fail" (cannot serve)
    detail: str


@dataclass(frozen=True)
class SpeedupBound:
    alpha: float
    best_k: int
    speedup: float  # S(alpha, best_k, c)


@dataclass
class Report:
    """Everything `osd check` found, in the order it checked."""

    target: str
    draft: str | None
    device: str
    dtype: str
    findings: list[Finding] = field(default_factory=list)
    memory: dict | None = None  # the MemoryPlan's numbers, when it fits
    memory_plan: list[str] = field(default_factory=list)  # MemoryPlan.render's lines
    cost_ratio_c: float | None = None
    speedup: list[SpeedupBound] = field(default_factory=list)

    def add(self, item: str, status: str, detail: str) -> None:
        self.findings.append(Finding(item, status, detail))

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd check", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="target model: a local directory or hub id")
    p.add_argument("--draft", help="draft model: a local directory or hub id (default: none)")
    p.add_argument(
        "--max-batch", type=int, default=MAX_BATCH,
        help=f"sequences decoded together: the memory plan's slots (default {MAX_BATCH})",
    )  # fmt: skip
    p.add_argument(
        "--max-model-len", type=int,
        help="tokens per sequence, for the memory plan (default: the target's context, reduced to what fits)",
    )  # fmt: skip
    p.add_argument(
        "--k", type=int, default=K,
        help=f"speculative tokens per step; a slot's lookahead is k + 1 when above 64 (default {K})",
    )  # fmt: skip
    p.add_argument(
        "--memory-gib", type=float,
        help="plan for a device of this many GiB (default: this one, within what it has free)",
    )  # fmt: skip
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=SERVING_MEMORY_FRACTION,
        help=f"the replica's share of the device (default {SERVING_MEMORY_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--trainer-share", type=float, default=TrainerConfig.gpu_memory_fraction,
        help="the trainer's share of the same device, when it trains there; with the replica's at most 1 "
        f"(default {TrainerConfig.gpu_memory_fraction})",
    )  # fmt: skip
    p.add_argument(
        "--device", help="where the models load and c is measured: cpu or cuda (default: cuda when available)"
    )
    p.add_argument("--dtype", help="float32, bfloat16, ... (default: by device); also the memory plan's")
    p.add_argument("--json", type=Path, help="write the findings here as JSON too")
    return p


def parameters(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def load(
    name: str, role: str, device: torch.device, dtype: torch.dtype, report: Report
) -> PreTrainedModel | None:
    """The model at `name`, loaded as the engine loads it; None, with the reason reported, if not."""
    path = Path(name).expanduser()
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        report.add("architecture", "fail", f"{role}: no such directory: {name}")
        return None
    try:
        model = load_causal_lm(name, device, dtype)
    except ModelLoadError as err:
        report.add("architecture", "fail", f"{role}: {str(err).splitlines()[0]}")
        return None
    layers = model.config.get_text_config().num_hidden_layers
    count = sum(p.numel() for p in model.parameters())
    report.add(
        "architecture", "ok",
        f"{role}: {type(model).__name__}, {layers} layer{'s' * (layers != 1)}, "
        f"{parameters(count)} parameters",
    )  # fmt: skip
    return model


def check_tokenizer(report: Report, tokenizer: PreTrainedTokenizerBase | None, rows: int) -> None:
    if tokenizer is None:
        report.add(
            "tokenizer", "fail", "the target has none: the API needs it to encode prompts and decode outputs"
        )
        return
    try:
        tokens = token_list(tokenizer)
        shared_vocabulary(rows, rows, tokens, tokens)  # every token has an output row
    except IncompatibleDraftError as err:
        report.add("tokenizer", "fail", str(err))
        return
    report.add("tokenizer", "ok", f"{type(tokenizer).__name__}, {len(tokenizer)} tokens, {rows} output rows")
    if tokenizer.chat_template:
        report.add("chat template", "ok", "the tokenizer has one")
    else:
        report.add(
            "chat template", "note",
            'none: chat prompts become "<role>: <content>" lines followed by "assistant:"',
        )  # fmt: skip


def check_vocabulary(
    report: Report,
    target_tokenizer: PreTrainedTokenizerBase | None,
    draft_tokenizer: PreTrainedTokenizerBase | None,
    target_rows: int,
    draft_rows: int,
) -> SharedVocabulary | None:
    """The pair's shared vocabulary (serving.engine.vocab), reported; None when there is none."""
    tokens = [None if t is None else token_list(t) for t in (target_tokenizer, draft_tokenizer)]
    try:
        shared = shared_vocabulary(target_rows, draft_rows, *tokens)
    except IncompatibleDraftError as err:
        report.add("vocabulary", "fail", str(err))
        return None
    if shared.checked_tokens == 0:
        report.add(
            "vocabulary", "note",
            f"{shared.rows} output rows each; without both tokenizers the tokens cannot be compared",
        )  # fmt: skip
    elif shared.padded:
        report.add(
            "vocabulary", "ok",
            f"padded: the target has {target_rows} output rows, the draft {draft_rows}; the tokenizers agree "
            f"on all {shared.checked_tokens} tokens, and the draft proposes ids below {shared.rows}",
        )  # fmt: skip
    else:
        report.add(
            "vocabulary", "ok",
            f"{shared.rows} output rows each; the tokenizers agree on all {shared.checked_tokens} tokens",
        )  # fmt: skip
    return shared


def check_context(
    report: Report, target: PreTrainedModel, draft: PreTrainedModel | None, max_model_len: int | None
) -> bool:
    """Whether memory can be planned: for --max-model-len tokens a sequence, else the target's context."""
    target_context = context_length(target)
    draft_context = None if draft is None else context_length(draft)
    known = f"target {target_context or 'not stated'}" + (
        "" if draft is None else f", draft {draft_context or 'not stated'}"
    )
    length = max_model_len or target_context
    if length is None:
        report.add("context", "note", f"{known}: give --max-model-len for the memory plan")
        return False
    if target_context is not None and length > target_context:
        report.add("context", "fail", f"{known}: --max-model-len {length} is beyond the target's context")
        return False
    if draft_context is not None and draft_context < length:
        report.add(
            "context", "note",
            f"{known}; serving up to {length} tokens, the draft drafts nothing past its {draft_context}",
        )  # fmt: skip
    else:
        report.add("context", "ok", f"{known}; serving up to {length} tokens a sequence")
    return True


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of `device` now: the GPU's, else the machine's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def check_memory(
    report: Report,
    target: PreTrainedModel,
    draft: PreTrainedModel | None,
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
) -> None:
    """The memory plan: for a device of --memory-gib, else this one (within what it has free now,
    the models loaded); weights estimated from the configs, as before they load."""
    try:
        sizes = [None if m is None else model_size(m.config, dtype) for m in (target, draft)]
    except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        report.add("memory", "note", f"no plan: {type(err).__name__}: {err}")  # shapes the names miss
        return
    free, total = (None, round(args.memory_gib * GIB)) if args.memory_gib else device_memory(device)
    try:
        plan = plan_memory(
            *sizes, device_bytes=total, max_batch=args.max_batch, k=args.k, max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, trainer_share=args.trainer_share,
            free_bytes=free,
        )  # fmt: skip
    except ValueError as err:  # MemoryPlanError: it does not fit; else a knob out of range
        report.add("memory", "fail", str(err))
        return
    report.memory = asdict(plan) | {"total": plan.total, "headroom": plan.headroom}
    report.memory_plan = plan.render().splitlines()
    report.add(*memory_finding(plan))


def memory_finding(plan: MemoryPlan) -> tuple[str, str, str]:
    """(item, status, detail): ok when it fits as asked; a note when the context was reduced."""
    fits = (
        f"{gib(plan.total)} of the replica's {gib(plan.available)} for {plan.slots} x "
        f"{plan.max_model_len} tokens ({gib(plan.headroom)} to spare)"
    )
    if plan.reduced:
        return "memory", "note", (
            f"the target's context {plan.context} does not fit {plan.slots} slots: planned for "
            f"{plan.max_model_len} tokens a sequence, {fits}"
        )  # fmt: skip
    return "memory", "ok", fits


def speedup_bounds(c: float) -> list[SpeedupBound]:
    """S(alpha, k, c) (DESIGN.md) at the best k in 1..MAX_K, for each alpha in ALPHAS."""
    bounds = []
    for alpha in ALPHAS:
        k = max(range(1, MAX_K + 1), key=lambda k: speedup_bound(alpha, k, c))
        bounds.append(SpeedupBound(alpha, k, round(speedup_bound(alpha, k, c), 3)))
    return bounds


def run(args: argparse.Namespace, console: Console) -> Report:
    """Every check, in order, with progress on `console`; the report says what passed."""
    report = Report(args.target, args.draft, args.device or "default device", args.dtype or "default dtype")
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except (RuntimeError, ValueError) as err:  # an unknown device or dtype
        report.add("arguments", "fail", str(err))
        return report
    report.device, report.dtype = str(device), str(dtype).removeprefix("torch.")
    if args.max_batch < 1 or (args.max_model_len is not None and args.max_model_len < 1):
        report.add("arguments", "fail", "--max-batch and --max-model-len must be at least 1")
        return report
    with console.status(f"loading the target {escape(args.target)}"):
        target = load(args.target, "target", device, dtype, report)
    if target is None:
        return report
    draft = None
    if args.draft:
        with console.status(f"loading the draft {escape(args.draft)}"):
            draft = load(args.draft, "draft", device, dtype, report)
    with console.status("loading the tokenizers"):
        target_tokenizer = load_tokenizer(args.target)
        draft_tokenizer = load_tokenizer(args.draft) if draft is not None else None
    check_tokenizer(report, target_tokenizer, vocab_size(target))
    shared = None
    if draft is not None:
        shared = check_vocabulary(
            report, target_tokenizer, draft_tokenizer, vocab_size(target), vocab_size(draft)
        )
    with console.status("checking tree verification"):
        reason = tree_support(target)
    if reason is None:
        report.add("trees", "ok", "the target verifies token trees (draft heads' tree mode)")
    else:
        report.add("trees", "note", f"no: {reason}; draft heads draft chains")
    if check_context(report, target, draft, args.max_model_len):
        with console.status("planning memory"):
            check_memory(report, target, draft, dtype, device, args)
    if draft is not None and shared is not None and not report.failures:  # c only for a pair that serves
        with console.status(f"measuring c on {device}: the draft's and the target's decoding steps"):
            measure_speed(report, target, draft, shared)
    return report


def measure_speed(
    report: Report, target: PreTrainedModel, draft: PreTrainedModel, shared: SharedVocabulary
) -> None:
    """c, timed on a prompt of shared ids that fits both contexts, and the speedup bounds from it."""
    room = min(n for n in (context_length(target), context_length(draft), 4 * COST_PROMPT) if n)
    prompt = [i % shared.rows for i in range(1, room // 4 + 1)]
    c = cost_ratio(target, draft, prompt, tokens=min(COST_TOKENS, room // 2))
    report.cost_ratio_c = round(c, 4)
    report.add(
        "cost ratio", "ok",
        f"c = {c:.3f}: a draft decoding step over a target decoding step on {report.device} "
        "(eager, batch 1)",
    )  # fmt: skip
    report.speedup = speedup_bounds(c)


def print_report(report: Report, console: Console) -> None:
    pair = report.target + ("" if report.draft is None else f" with draft {report.draft}")
    console.print(f"[bold]osd check[/bold]: {escape(pair)} ({report.device}, {report.dtype})", soft_wrap=True)
    for f in report.findings:
        mark = "FAIL" if f.status == "fail" else f.status
        console.print(
            f"[{STYLE[f.status]}]{mark:<4}[/] {f.item:<13} {escape(f.detail)}",
            soft_wrap=True,
            highlight=False,
        )
    if report.memory_plan:
        console.print("memory plan:", soft_wrap=True)
        for line in report.memory_plan:
            console.print(f"  {escape(line)}", soft_wrap=True, highlight=False)
    if report.speedup:
        console.print(
            f"speedup bound S(α, k, c) = (1 - α^(k+1)) / ((1 - α)(k·c + 1)) at c = "
            f"{report.cost_ratio_c:.3f}, the best k in 1..{MAX_K}:", soft_wrap=True,
        )  # fmt: skip
        table = Table()
        for column in ("acceptance α", "best k", "S"):
            table.add_column(column, justify="right")
        for bound in report.speedup:
            table.add_row(f"{bound.alpha:.1f}", str(bound.best_k), f"{bound.speedup:.2f}")
        console.print(table)
        if any(round(bound.speedup, 2) < 1 for bound in report.speedup):
            console.print(
                "S < 1: plain decoding is faster at that α (the engine then drafts k = 0)", soft_wrap=True
            )
    if report.failures:
        console.print(f"[bold red]cannot serve[/]: {len(report.failures)} problem(s)", soft_wrap=True)
        for f in report.failures:
            console.print(f"  {f.item}: {escape(f.detail)}", soft_wrap=True, highlight=False)
    else:
        draft = "" if report.draft is None else f" --draft {report.draft}"
        console.print(
            f"[bold green]ready to serve[/]: osd serve --target {escape(report.target + draft)}",
            soft_wrap=True,
        )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    console = Console()
    report = run(args, console)
    print_report(report, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report) | {"ready": not report.failures}, indent=2) + "\n")
    if report.failures:
        raise SystemExit(1)
