"""The whole stack on one GPU, prepared to run in one go on a lent GPU machine (issue 22); never
part of the tests or CI (tests/test_gpu_smoke.py runs it on the CPU with tiny shapes).

Random-init Llama shapes in bf16, a 1B target (Llama-3.2-1B's layers with a 32k vocabulary) and a
68M draft, over a tokenizer of the demo world's kind with its ChatML template (its ids are the
first of the 32k rows). Sections, each saved to the JSON as it ends:
1. memory: the memory plan for the pair on this card (serving.engine.memory), against what the card
   reports once the engine's caches are allocated;
2. steps: the speculative engine's step latency, eager against compiled (CUDA graphs, step widths
   in buckets), on the same batch of requests, whose outputs must be identical;
3. serve: `osd serve` with the replica and the trainer sharing the card (--replica-gpus 0.75
   --trainer-gpus 0.25): chat over HTTP, traces landing in Redis, the trainer training and
   publishing (gate thresholds low, so that a few minutes of traffic are enough),
   then a hot-swap under streaming load: draft versions published into the registry while
   clients stream, with the count of failed requests (it must be 0).
A random-init draft learns the random target's outputs quickly, so the gate passes as it would.

    python -m benchmarks.gpu_smoke --json benchmarks/results/gpu_smoke_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.serve_child import osd_serve
from deploy.demo.tokenizer import add_chat_template, train_tokenizer
from serving.engine.device import DeviceProfile
from serving.engine.hf import SpecEngine
from serving.engine.memory import GIB
from serving.engine.proposers import DraftModelProposer
from store.redis_server import LocalRedis, free_port
from store.registry import Registry
from store.traces import StreamConfig

SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "68m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12),
    "tiny-target": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "tiny-draft": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
}
PAIRS = {"gpu": ("1b", "68m"), "tiny": ("tiny-target", "tiny-draft")}
VOCAB = 32_000  # output rows (Llama-2's); the tokenizer's ids are the first of them
CONTEXT = 4096
K = 3
MAX_BATCH = 8
PROMPT = "def main():\n    for line in open(path):\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the tiny shapes")
    p.add_argument("--new-tokens", type=int, default=64, help="per request, in the step section")
    p.add_argument("--publishes", type=int, default=3, help="versions hot-swapped under load")
    p.add_argument("--clients", type=int, default=8, help="streaming clients during the hot-swaps")
    p.add_argument("--train-minutes", type=float, default=10.0, help="the longest wait for a publish")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_smoke.json"))
    return p


def llama_config(shape: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, **SHAPES[shape])


def build_pair(root: Path, device: str) -> tuple[Path, Path]:
    """The tokenizer (trained on this repository's Python, with ChatML) and the random-init pair,
    saved in the dtype they serve in; returns their directories."""
    texts = [p.read_text() for p in sorted(Path(__file__).parents[1].glob("*/*.py"))]
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    add_chat_template(tokenizer)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dirs = []
    for name, shape in zip(("target", "draft"), PAIRS["gpu" if device == "cuda" else "tiny"], strict=True):
        torch.manual_seed(len(dirs))
        model = LlamaForCausalLM(llama_config(shape)).to(dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_section(target: Path, draft: Path) -> dict:
    """The plan the engine made at load, against the card once the caches exist."""
    engine = SpecEngine.from_pretrained(
        str(target), str(draft), num_speculative_tokens=K, device="cuda", dtype="bfloat16",
        max_batch=MAX_BATCH, gpu_memory_utilization=0.75, trainer_share=0.25,
    )  # fmt: skip
    engine.generate(list(range(1, 33)), 8, stop_token_ids=[])  # every cache allocated
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    plan = engine.memory_plan
    return {
        "plan": plan.render(),
        "plan_max_model_len": plan.max_model_len,
        "planned_gib": round(plan.total / GIB, 2),
        "planned_kv_gib": round((plan.target_kv + plan.draft_kv) / GIB, 2),
        "card_total_gib": round(total / GIB, 2),
        "card_used_gib": round((total - free) / GIB, 2),
        "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
    }


def steps_section(target: Path, draft: Path, device: str, new_tokens: int) -> dict:
    """Median ms per step of a batch of 4 greedy requests, eager against compiled, same outputs."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target_model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    draft_model = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(device).eval()
    prompts = [[(7 * i + j) % 4000 + 1 for j in range(24 + 8 * i)] for i in range(4)]
    out, outputs = {}, []
    for mode in (None, "reduce-overhead" if device == "cuda" else "default"):
        profile = DeviceProfile(
            dtype, static_cache=True, slots=4, capacity=256 + new_tokens + K + 1, compile_mode=mode,
            compile_backend="inductor" if device == "cuda" else "eager",
        )  # fmt: skip
        engine = SpecEngine(target_model, DraftModelProposer(draft_model, profile), K, profile)
        texts, times = [], []
        for repeat in range(3):  # the first captures the graphs
            batch = [engine.add(p, new_tokens, stop_token_ids=[]) for p in prompts]
            finished = {}
            while engine.active:
                synchronize(device)
                began = time.perf_counter()
                events = engine.step()
                synchronize(device)
                if repeat:
                    times.append(time.perf_counter() - began)
                finished |= {id(d): s.generation.token_ids for d, s in events if s.generation}
            texts.append([finished[id(d)] for d in batch])
        out["compiled" if mode else "eager"] = {"ms_per_step": round(1000 * statistics.median(times), 3)}
        outputs.append(texts[-1])
    out["speedup"] = round(out["eager"]["ms_per_step"] / out["compiled"]["ms_per_step"], 2)
    out["identical"] = outputs[0] == outputs[1]
    return out


def serve_config(target: Path, draft: Path, device: str, workdir: Path) -> Path:
    gpu = device == "cuda"
    settings = {
        "target": str(target), "draft": str(draft), "served_model_names": ["smoke"], "k": K,
        "replicas": 1, "max_batch": MAX_BATCH,
        "device": device, "replica_gpus": 0.75 if gpu else 0, "trainer_gpus": 0.25 if gpu else 0,
        "max_model_len": 1024, "request_timeout": 300, "trainer_dir": str(workdir / "trainer"),
        "trainer_settings": {
            "gate_every": 10, "gate_min_positions": 100, "gate_dry_min_positions": 50,
            "checkpoint_every": 10, "max_in_flight": 64,
        },
    }  # fmt: skip
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def chat(http: httpx.Client, text: str, max_tokens: int = 32, stream: bool = False) -> httpx.Response:
    body = {"model": "smoke", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    return http.post("/v1/chat/completions", json=body | {"temperature": 0.8, "stream": stream})


def serve_section(target: Path, draft: Path, device: str, workdir: Path, args) -> dict:
    """osd serve on the card: chat, traces, the trainer publishing, hot-swaps under streaming load."""
    port, token = free_port(), "smoke-token"
    config = serve_config(target, draft, device, workdir)
    out: dict = {}
    with LocalRedis(workdir / "redis").start() as local:  # its own, so that this script can read it
        flags = ["--config", str(config), "--admin-token", token]
        with osd_serve(flags + ["--redis-url", local.url], port, workdir / "serve.log") as (_, base):
            out |= on_the_stack(httpx.Client(base_url=base, timeout=300), local.client(), token, draft, args)
    return out


def on_the_stack(http: httpx.Client, client: redis.Redis, token: str, draft: Path, args) -> dict:
    """Chat, traces, the trainer's first publish, then the hot-swaps under load."""
    reply = chat(http, "Write a loop over the lines of a file.")
    out: dict = {
        "chat_status": reply.status_code,
        "chat_tokens": reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else None,
    }
    for i in range(16):  # traffic for the trainer
        chat(http, f"{PROMPT} # request {i}", max_tokens=48)
    out["traces"] = client.xlen(StreamConfig().stream)
    registry = Registry(client)
    start, deadline = registry.live_version("draft"), time.monotonic() + 60 * args.train_minutes
    while registry.live_version("draft") == start and time.monotonic() < deadline:
        chat(http, f"{PROMPT} # more", max_tokens=48)
    out["trainer_published"] = registry.live_version("draft") != start
    out["trainer"] = http.get("/admin/trainer", headers={"Authorization": f"Bearer {token}"}).json()
    out["hot_swap"] = swaps_under_load(http, registry, draft, args)
    return out


def swaps_under_load(http: httpx.Client, registry: Registry, draft: Path, args) -> dict:
    """Clients stream while `publishes` perturbed copies of the draft are published; each request's
    outcome is counted."""
    weights = AutoModelForCausalLM.from_pretrained(draft).state_dict()
    done, failed, stop = [], [], threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                with http.stream("POST", "/v1/chat/completions", json={
                    "model": "smoke", "messages": [{"role": "user", "content": f"{PROMPT} {i}"}],
                    "max_tokens": 48, "temperature": 0.8, "stream": True,
                }) as response:  # fmt: skip
                    text = "".join(response.iter_text())
                ok = response.status_code == 200 and "[DONE]" in text and '"error"' not in text
                (done if ok else failed).append(response.status_code)
            except httpx.HTTPError as err:
                failed.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    versions = []
    for n in range(args.publishes):
        time.sleep(5)
        scale = 0.01 * (n + 1)
        perturbed = {name: t + scale * torch.randn_like(t.float()).to(t.dtype) for name, t in weights.items()}
        versions.append(registry.publish("draft", perturbed).label)
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join(600)
    status = http.get("/health").json()
    return {
        "published": versions,
        "served_version": status.get("draft_version"),
        "swaps": status.get("swaps"),
        "last_swap_pause_seconds": status.get("last_swap_pause_seconds"),
        "requests": len(done) + len(failed),
        "failed": len(failed),
        "failures": failed[:5],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke needs a CUDA GPU (or --device cpu for the tiny shapes)")
    report: dict = {
        "benchmark": "gpu_smoke",
        "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": PAIRS["gpu" if args.device == "cuda" else "tiny"],
        "sections": {},
    }

    def save(section: str, run) -> None:
        began = time.perf_counter()
        try:
            result = run()
        except Exception as err:  # noqa: BLE001 - a section that fails is recorded, the next runs
            result = {"error": repr(err)}
        report["sections"][section] = result | {"seconds": round(time.perf_counter() - began, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(section, json.dumps(report["sections"][section]), flush=True)

    with tempfile.TemporaryDirectory(prefix="osd-gpu-smoke-") as tmp:
        workdir = Path(tmp)
        target, draft = build_pair(workdir, args.device)
        if args.device == "cuda":
            save("memory", lambda: memory_section(target, draft))
            torch.cuda.empty_cache()
        save("steps", lambda: steps_section(target, draft, args.device, args.new_tokens))
        save("serve", lambda: serve_section(target, draft, args.device, workdir, args))
    return report


if __name__ == "__main__":
    main()
