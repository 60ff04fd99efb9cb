"""Offline distillation of the demo draft on one domain: the "offline upper bound" of the OSD paper.

The target greedily continues prompts cut from the domain's *training* files; the draft is then
trained with forward KL towards the target's full distribution at every output position. The
result is saved beside the demo pair as `draft-distilled-<domain>/`, with its held-out numbers.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from deploy.demo.build import DemoModels, DemoPreset, progress_bars
from deploy.demo.corpus import build_corpus
from deploy.demo.pretrain import evaluate, sample_batch, target_continuations, token_streams
from distill.losses import forward_kl


@dataclass(frozen=True)
class DistillSpec:
    domain: str
    prompts: int = 256
    prompt_tokens: int = 48
    new_tokens: int = 64
    epochs: int = 6
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0


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


def distill_demo_draft(
    models: DemoModels, preset: DemoPreset, spec: DistillSpec, console: Console | None = None
) -> Path:
    """Distill the demo draft on spec.domain's training prompts; save and return its directory."""
    console = console or Console(stderr=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    target = AutoModelForCausalLM.from_pretrained(models.target).eval()
    draft = AutoModelForCausalLM.from_pretrained(models.draft)
    corpus = build_corpus(preset.corpus)
    if spec.domain not in corpus.train:
        raise ValueError(f"domain {spec.domain!r} is not in the demo corpus, which has {corpus.domains}")
    train_stream = token_streams({spec.domain: corpus.train[spec.domain]}, tokenizer)[spec.domain]
    held_out = token_streams(models.held_out_corpus().held_out, tokenizer)
    block = preset.target_train.block
    before = models.manifest["held_out"]  # the build evaluated the initial draft the same way

    with progress_bars(console) as progress:
        task = progress.add_task(f"target outputs ({spec.domain})", total=1, note=f"{spec.prompts} prompts")
        prompts = sample_batch(
            [train_stream], spec.prompts, spec.prompt_tokens - 1, torch.Generator().manual_seed(0)
        )
        sequences = target_continuations(target, prompts, spec.new_tokens)
        progress.update(task, completed=1)
        steps_per_epoch = -(-spec.prompts // spec.batch)
        task = progress.add_task(
            "distilling draft (forward KL)", total=spec.epochs * steps_per_epoch, note=""
        )

        def on_step(epoch: int, step: int, loss: float) -> None:
            progress.update(task, completed=epoch * steps_per_epoch + step + 1, note=f"loss {loss:.3f}")

        final_loss = distill(draft, target, sequences, spec, on_step)
        after = evaluate(target, draft, held_out, preset.eval_windows, block)

    out = models.root / f"draft-distilled-{spec.domain}"
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
    (out / "distilled.json").write_text(json.dumps(report, indent=2) + "\n")
    return out
