"""Building the demo pair: presets, the cached build with progress, and its manifest.

`build_demo_models(preset)` reads the corpora, trains the tokenizer, pretrains the target on
every domain and the draft on prose only (so it starts poor on code), measures both on held-out
text, and saves them with `save_pretrained` under `<cache_dir>/<preset>/`. A finished build is
reused: the manifest records a hash of the recipe, and a build is written to a temporary
directory and renamed into place, so an interrupted build never looks finished.

Every build ends with a cheap finishing step (`finish_chat`, versioned by `CHAT_VERSION` in the
manifest's `chat` entry): the tokenizer gets the ChatML tokens and template
(`deploy.demo.tokenizer.add_chat_template`), every model of the pair gets an embedding row for
each new token (the mean of its trained rows), and `<|im_end|>` joins `<|endoftext|>` as the
generation config's EOS. A pair cached before that step, or by an older version of it, is
finished in a copy that replaces it: seconds, where the training would take minutes, and the
result is the same files a fresh build writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from deploy.demo.corpus import Corpus, CorpusSpec, Document, build_corpus
from deploy.demo.pretrain import ModelSpec, TrainSpec, evaluate, pretrain, token_streams
from deploy.demo.tokenizer import CHAT_TOKENS, add_chat_template, train_tokenizer
from serving.engine.hf import cost_ratio

RECIPE_VERSION = 1  # bump when the build's code changes what a recipe produces
CHAT_VERSION = 1  # bump when `finish_chat` changes what it makes of a build (cheap: no retraining)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "osd" / "demo"
CODE_AND_PROSE = ("prose", "python", "c")


@dataclass(frozen=True)
class DemoPreset:
    name: str
    corpus: CorpusSpec
    vocab_size: int
    target: ModelSpec
    target_train: TrainSpec
    draft: ModelSpec
    draft_train: TrainSpec
    eval_windows: int = 16


PRESETS = {
    # About 11 minutes on 2 idle CPU cores (target 8.5, draft 1.5): target 4L-256d (5.2M parameters),
    # draft 1L-128d (0.8M).
    "full": DemoPreset(
        name="full",
        corpus=CorpusSpec(),
        vocab_size=4096,
        target=ModelSpec(layers=4, hidden=256, heads=4),
        target_train=TrainSpec(domains=CODE_AND_PROSE, steps=320),
        draft=ModelSpec(layers=1, hidden=128, heads=2),
        draft_train=TrainSpec(domains=("prose",), steps=300),
    ),
    # Under 2 minutes from an empty cache, for tests and `osd demo --quick`.
    "quick": DemoPreset(
        name="quick",
        corpus=CorpusSpec(max_train_chars=600_000, max_held_out_chars=100_000),
        vocab_size=1024,
        target=ModelSpec(layers=2, hidden=128, heads=2, context=256),
        target_train=TrainSpec(domains=CODE_AND_PROSE, steps=250, block=128),
        draft=ModelSpec(layers=1, hidden=64, heads=2, context=256),
        draft_train=TrainSpec(domains=("prose",), steps=200, block=128),
    ),
}


@dataclass(frozen=True)
class DemoModels:
    """A finished build: where the target and draft directories are, and the manifest."""

    root: Path
    manifest: dict

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def draft(self) -> Path:
        return self.root / "draft"

    def held_out_corpus(self) -> Corpus:
        """The corpus's held-out documents (the only source of prompts); no training documents."""
        raw = json.loads((self.root / "held_out.json").read_text())
        held_out = {d: [Document(d, doc["source"], doc["text"]) for doc in docs] for d, docs in raw.items()}
        return Corpus(train={}, held_out=held_out, skipped=self.manifest["corpus"]["skipped"])


def recipe_hash(preset: DemoPreset) -> str:
    recipe = json.dumps([RECIPE_VERSION, dataclasses.asdict(preset)], sort_keys=True, default=str)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def cached(preset: DemoPreset, cache_dir: Path = DEFAULT_CACHE_DIR) -> DemoModels | None:
    """The finished build of this exact recipe, if there is one."""
    root = cache_dir / preset.name
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return DemoModels(root, manifest) if manifest.get("recipe_hash") == recipe_hash(preset) else None


def build_demo_models(
    preset: DemoPreset,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    force: bool = False,
    console: Console | None = None,
) -> DemoModels:
    """Return the cached build of `preset`, building it first when missing (or when forced), and
    finishing it (`finish_chat`) when it was built before the current finishing step."""
    console = console or Console(stderr=True)
    hit = None if force else cached(preset, cache_dir)
    if hit and hit.manifest.get("chat", {}).get("version") == CHAT_VERSION:
        console.print(f"demo models ({preset.name}): reusing {hit.root}")
        return hit
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{preset.name}-building-"))
    try:
        if hit:  # trained already: finish a copy
            shutil.copytree(hit.root, tmp, dirs_exist_ok=True)
            manifest = finish_chat(tmp, hit.manifest)
        else:
            manifest = finish_chat(tmp, _build(preset, tmp, console))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    root = cache_dir / preset.name
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    if hit:
        console.print(f"demo models ({preset.name}): added the ChatML chat template to {root}")
    else:
        console.print(f"demo models ({preset.name}): built in {manifest['build_seconds']:.0f} s -> {root}")
    return DemoModels(root, manifest)


def finish_chat(root: Path, manifest: dict) -> dict:
    """Give the pair saved at `root` the ChatML chat template, in place: the tokenizer's tokens and
    template, an embedding row per new token in every model there (target, draft, distilled drafts),
    and `<|im_end|>` as an EOS of their generation configs. Writes and returns the manifest.

    Idempotent: rows already there are kept. A new row is the mean of the model's trained rows
    (tied embeddings: its input vector and its output row), so the target's next-token
    distribution over the trained vocabulary barely moves and it never picks a chat token
    greedily; raw-text pretraining never taught it to end a reply with `<|im_end|>`.
    """
    tokenizer = AutoTokenizer.from_pretrained(root / "target")
    chat_ids = add_chat_template(tokenizer)
    eos_ids = [tokenizer.eos_token_id, chat_ids[-1]]
    for model_dir in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        grow_embeddings(model, len(tokenizer))
        model.generation_config.eos_token_id = eos_ids
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    manifest = manifest | {
        "vocab_size": len(tokenizer),
        "chat": {
            "version": CHAT_VERSION,
            "template": "chatml",
            "token_ids": dict(zip(CHAT_TOKENS, chat_ids, strict=True)),
            "eos_token_ids": eos_ids,
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@torch.no_grad()
def grow_embeddings(model: PreTrainedModel, rows: int) -> None:
    """Resize `model`'s input and output embeddings to `rows` (never shrinking them); each new row
    is the mean of the old ones. Deterministic, unlike a random initialisation."""
    old = model.get_input_embeddings().weight.shape[0]
    if rows <= old:
        return
    means = [m.weight[:old].mean(0) for m in _embeddings(model)]
    model.resize_token_embeddings(rows, mean_resizing=False)
    for module, mean in zip(_embeddings(model), means, strict=True):
        module.weight[old:] = mean


def _embeddings(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The input embeddings and, unless tied to them, the output ones."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [modules[0]] if modules[1] is None or modules[1].weight is modules[0].weight else modules


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _train(
    progress: Progress, label: str, spec: ModelSpec, train: TrainSpec, tokenizer, streams
) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(train.seed)
    model = LlamaForCausalLM(spec.config(tokenizer))
    task = progress.add_task(label, total=train.steps, note="")
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        progress.update(task, completed=step + 1, note=f"loss {loss:.2f}")

    final_loss = pretrain(model, streams, train, on_step)
    seconds = time.perf_counter() - start
    return model, {
        **dataclasses.asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_domains": list(train.domains),
        "train_steps": train.steps,
        "train_tokens": train.steps * train.batch * train.block,
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(final_loss, 4),
    }


def _corpus_summary(corpus: Corpus, train_tokens: dict, held_out_tokens: dict) -> dict:
    return {
        "fingerprint": corpus.fingerprint(),
        "skipped": corpus.skipped,
        "domains": {
            d: {
                "train_files": len(corpus.train[d]),
                "train_tokens": int(train_tokens[d].numel()),
                "held_out_files": len(corpus.held_out[d]),
                "held_out_tokens": int(held_out_tokens[d].numel()),
            }
            for d in corpus.domains
        },
    }


def _build(preset: DemoPreset, out: Path, console: Console) -> dict:
    start = time.perf_counter()
    with progress_bars(console) as progress:
        step = progress.add_task("corpora and tokenizer", total=3, note="reading sources")
        corpus = build_corpus(preset.corpus)
        for reason in corpus.skipped.values():
            progress.console.print(f"[yellow]{reason}")
        progress.update(step, advance=1, note="training BPE")
        tokenizer = train_tokenizer(
            (d.text for docs in corpus.train.values() for d in docs), preset.vocab_size
        )
        progress.update(step, advance=1, note="tokenizing")
        train_streams = token_streams(corpus.train, tokenizer)
        held_out_streams = token_streams(corpus.held_out, tokenizer)
        progress.update(step, advance=1, note="done")

        target_domains = tuple(d for d in preset.target_train.domains if d in corpus.train)
        target_train = dataclasses.replace(preset.target_train, domains=target_domains)
        target, target_info = _train(
            progress, "target (all domains)", preset.target, target_train, tokenizer, train_streams
        )
        draft, draft_info = _train(
            progress, "draft (prose only)", preset.draft, preset.draft_train, tokenizer, train_streams
        )
        evaluation = progress.add_task("held-out evaluation", total=2, note="")
        report = evaluate(target, draft, held_out_streams, preset.eval_windows, preset.target_train.block)
        progress.update(evaluation, advance=1, note="cost ratio c")
        prompt = held_out_streams["prose"][:32].tolist()
        c = cost_ratio(target, draft, prompt)
        progress.update(evaluation, advance=1, note="")

    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    held_out = {
        d: [{"source": doc.source, "text": doc.text} for doc in docs] for d, docs in corpus.held_out.items()
    }
    (out / "held_out.json").write_text(json.dumps(held_out))
    manifest = {
        "preset": preset.name,
        "recipe_hash": recipe_hash(preset),
        "recipe": json.loads(json.dumps(dataclasses.asdict(preset), default=str)),
        "corpus": _corpus_summary(corpus, train_streams, held_out_streams),
        "vocab_size": len(tokenizer),
        "target": target_info,
        "draft": draft_info,
        "held_out": dataclasses.asdict(report),
        "cost_ratio_c": round(c, 3),
        "build_seconds": round(time.perf_counter() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return manifest  # written by finish_chat
