"""Offline distillation on one domain: the "offline upper bound" of the OSD paper, for the demo
draft and for draft heads over the demo target.

The target greedily continues prompts cut from the domain's *training* files. The draft is then
trained with forward KL towards the target's full distribution at every output position, and
saved beside the demo pair as `draft-distilled-<domain>/` with its held-out numbers. Heads are
trained on the target's hidden state at every output position against its top-16 at the positions
each head guesses (`distill.heads.heads_loss`, as the online trainer does), and saved as
safetensors in `heads-distilled-<domain>-<kind>-k<K>/`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from deploy.demo.build import DemoModels, DemoPreset, progress_bars
from deploy.demo.corpus import build_corpus
from deploy.demo.pretrain import evaluate, sample_batch, target_continuations, token_streams
from distill.heads import DraftHeads, HeadsBatch, HeadsSpec, heads_acceptance, heads_loss
from distill.losses import forward_kl

HEADS_TOP_K = 16  # the target's logged top-k that heads are trained against, as a replica's traces


@dataclass(frozen=True)
class DistillSpec:
    domain: str
    prompts: int = 256
    prompt_tokens: int = 48
    new_tokens: int = 64
    epochs: int = 6
    batch: int = 16  # training examples per step: sequences for a draft, positions for heads
    lr: float = 1e-3
    seed: int = 0


def heads_distill_spec(domain: str) -> DistillSpec:
    """The offline heads' recipe: shorter continuations, more positions per step, a higher rate."""
    return DistillSpec(domain, new_tokens=48, epochs=4, batch=256, lr=3e-3)


def distill(
    draft: PreTrainedModel, target: PreTrainedModel, sequences: torch.Tensor, spec: DistillSpec, on_step=None
) -> float:
    """Forward-KL training of the draft on the output positions of sequences [n, L + new]; last loss."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=spec.lr, weight_decay=0.0)
    outputs = torch.zeros(sequences.shape[1] - 1, dtype=torch.bool)
    outputs[spec.prompt_tokens - 1 :] = True  # positions whose next token is an output token
    draft.train()
    loss = torch.tensor(float("nan"))
    for epoch in range(spec.epochs):
        for step, rows in enumerate(
            torch.randperm(sequences.shape[0], generator=generator).split(spec.batch)
        ):
            ids = sequences[rows, :-1]  # [batch, L + new - 1]
            with torch.no_grad():
                teacher = target(input_ids=ids).logits
            loss = forward_kl(teacher, draft(input_ids=ids).logits, outputs.expand(ids.shape))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step:
                on_step(epoch, step, loss.item())
    draft.eval()
    return loss.item()


def domain_continuations(
    models: DemoModels, preset: DemoPreset, spec: DistillSpec, target: PreTrainedModel
) -> torch.Tensor:
    """The target's greedy continuations of spec.prompts prompts cut from spec.domain's training
    files -> sequences [prompts, prompt_tokens + new_tokens]."""
    corpus = build_corpus(preset.corpus)
    if spec.domain not in corpus.train:
        raise ValueError(f"domain {spec.domain!r} is not in the demo corpus, which has {corpus.domains}")
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    stream = token_streams({spec.domain: corpus.train[spec.domain]}, tokenizer)[spec.domain]
    prompts = sample_batch([stream], spec.prompts, spec.prompt_tokens - 1, torch.Generator().manual_seed(0))
    return target_continuations(target, prompts, spec.new_tokens)


def distill_demo_draft(
    models: DemoModels, preset: DemoPreset, spec: DistillSpec, console: Console | None = None
) -> Path:
    """Distill the demo draft on spec.domain's training prompts; save and return its directory.
    A draft already distilled there with the same spec is reused."""
    out = models.root / f"draft-distilled-{spec.domain}"
    report_path = out / "distilled.json"
    if report_path.exists() and json.loads(report_path.read_text())["spec"] == dataclasses.asdict(spec):
        return out
    console = console or Console(stderr=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    target = AutoModelForCausalLM.from_pretrained(models.target).eval()
    draft = AutoModelForCausalLM.from_pretrained(models.draft)
    held_out = token_streams(models.held_out_corpus().held_out, tokenizer)
    block = preset.target_train.block
    before = models.manifest["held_out"]  # the build evaluated the initial draft the same way

    with progress_bars(console) as progress:
        task = progress.add_task(f"target outputs ({spec.domain})", total=1, note=f"{spec.prompts} prompts")
        sequences = domain_continuations(models, preset, spec, target)
        progress.update(task, completed=1)
        steps_per_epoch = -(-spec.prompts // spec.batch)
        task = progress.add_task(
            "distilling draft (forward KL)", total=spec.epochs * steps_per_epoch, note=""
        )

        def on_step(epoch: int, step: int, loss: float) -> None:
            progress.update(task, completed=epoch * steps_per_epoch + step + 1, note=f"loss {loss:.3f}")

        final_loss = distill(draft, target, sequences, spec, on_step)
        after = evaluate(target, draft, held_out, preset.eval_windows, block)

    shutil.rmtree(out, ignore_errors=True)
    draft.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "spec": dataclasses.asdict(spec),
        "final_loss": round(final_loss, 4),
        "expected_acceptance_before": before["expected_acceptance"],
        "expected_acceptance_after": after.expected_acceptance,
        "greedy_agreement_before": before["greedy_agreement"],
        "greedy_agreement_after": after.greedy_agreement,
        "seconds": round(time.perf_counter() - start, 1),
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return out


@torch.no_grad()
def heads_rows(target: PreTrainedModel, sequences: torch.Tensor, prompt_tokens: int, k: int) -> HeadsBatch:
    """HeadsBatch rows from full greedy sequences [n, L]: every output position with k more after it."""
    hidden = target.base_model(input_ids=sequences[:, :-1]).last_hidden_state  # [n, L-1, H]
    top = torch.log_softmax(target.get_output_embeddings()(hidden).float(), -1).topk(HEADS_TOP_K)
    starts = range(prompt_tokens - 1, sequences.shape[1] - 1 - k)  # the hidden state giving token t+1
    rows = [
        (hidden[:, t], sequences[:, t + 1 : t + 1 + k], sequences[:, t + 2 : t + 2 + k],
         top.indices[:, t + 1 : t + 1 + k], top.values[:, t + 1 : t + 1 + k])
        for t in starts
    ]  # fmt: skip
    return HeadsBatch(*(torch.cat(parts) for parts in zip(*rows, strict=True)))


def train_heads(heads: DraftHeads, rows: HeadsBatch, spec: DistillSpec, on_epoch=None) -> float:
    """spec.epochs passes over the rows in shuffled batches of spec.batch; the last loss."""
    optimizer = torch.optim.AdamW(heads.parameters(), lr=spec.lr)
    generator, loss = torch.Generator().manual_seed(spec.seed), torch.tensor(float("nan"))
    for epoch in range(spec.epochs):
        for index in torch.randperm(rows.hidden.shape[0], generator=generator).split(spec.batch):
            part = HeadsBatch(*(getattr(rows, f)[index] for f in HeadsBatch.__dataclass_fields__))
            loss = heads_loss(heads, part)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if on_epoch:
            on_epoch(epoch, loss.item())
    return loss.item()


def distill_demo_heads(
    models: DemoModels,
    preset: DemoPreset,
    spec: DistillSpec,
    heads: HeadsSpec,
    console: Console | None = None,
) -> Path:
    """Train heads of `heads`' shape over the demo target on spec.domain's training prompts; save
    and return their directory. Heads already trained there with the same spec are reused."""
    out = models.root / f"heads-distilled-{spec.domain}-{heads.kind}-k{heads.num_heads}"
    report_path = out / "distilled.json"
    if report_path.exists() and json.loads(report_path.read_text())["spec"] == dataclasses.asdict(spec):
        return out
    console = console or Console(stderr=True)
    start = time.perf_counter()
    target = AutoModelForCausalLM.from_pretrained(models.target).eval().requires_grad_(False)
    module = DraftHeads.for_target(heads, target)
    with progress_bars(console) as progress:
        task = progress.add_task(f"target outputs ({spec.domain})", total=1, note=f"{spec.prompts} prompts")
        sequences = domain_continuations(models, preset, spec, target)
        rows = heads_rows(target, sequences, spec.prompt_tokens, heads.num_heads)
        progress.update(task, completed=1)
        task = progress.add_task(f"training {heads.kind} heads", total=spec.epochs, note="")

        def on_epoch(epoch: int, loss: float) -> None:
            progress.update(task, completed=epoch + 1, note=f"loss {loss:.3f}")

        before = heads_acceptance(module, rows).tolist()
        final_loss = train_heads(module, rows, spec, on_epoch)
        after = heads_acceptance(module, rows).tolist()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file(module.state_dict(), out / "heads.safetensors")
    report = {
        "spec": dataclasses.asdict(spec),
        "heads": dataclasses.asdict(heads),
        "positions": rows.hidden.shape[0],
        "final_loss": round(final_loss, 4),
        "expected_acceptance_per_head": {"before": before, "after": after},  # on the training rows
        "seconds": round(time.perf_counter() - start, 1),
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return out


def load_demo_heads(path: Path, target: PreTrainedModel) -> DraftHeads:
    """Heads saved by distill_demo_heads, over `target`."""
    report = json.loads((path / "distilled.json").read_text())
    heads = DraftHeads.for_target(HeadsSpec(**report["heads"]), target)
    heads.load_state_dict(load_file(path / "heads.safetensors"))
    return heads.eval()
