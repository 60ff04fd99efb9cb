"""Ray Serve: N server replicas behind one HTTP address, and the trainer actor beside them.

`build` is a Ray Serve application builder. `serve run deploy/serve.yaml` calls it with the
YAML's `args`, and `osd serve` with its flags; both go through `ServiceConfig`. Each Serve
replica is a Ray actor that loads the target and draft, opens its own Redis connection and serves
the FastAPI app of `serving.http.api` (`@serve.ingress`, the app built once the replica has loaded).
Serve's proxy (or HAProxy, by least connections, with `osd serve --ingress haproxy`) spreads
requests over the replicas; each replica's own queue (`max_queue`) is the back-pressure, so Serve
lets that many requests through to it.

The trainer is one named, detached Ray actor (`osd-trainer` in namespace `osd`), created by the
builder when missing and found by name by each replica's admin routes. Placement is by Ray
resources: `replica_cpus`/`replica_gpus`/`replica_resources` and the `trainer_*` ones. Ray sets
`CUDA_VISIBLE_DEVICES` for an actor with GPUs, so `cuda` in a replica or the trainer is the GPU Ray
assigned it; nothing here names a device index. A replica runs on CUDA when it has a GPU share
(`device` None) and on the CPU otherwise; the trainer trains on CUDA when `trainer_gpus` > 0,
capped at its share of the card. Fractional GPUs let processes share a card; the rule that keeps
them within it: on a fractional share, a process's GPU memory stays within that share (the
replica's `gpu_memory_utilization` <= `replica_gpus`, the trainer's cap = `trainer_gpus`), and Ray
never packs shares past one GPU. Secrets stay out of the config: the admin token is read by each
replica from the environment variable named by `admin_token_env`, and a Redis URL with a password
can come from `$OSD_REDIS_URL` instead of `redis_url`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from transformers import AutoConfig, AutoTokenizer

from distill.heads import HeadsSpec, heads_spec
from serving.engine.hf import ProposerName
from serving.engine.vllm import VLLMSettings
from serving.http.api import MAX_LOGPROBS, create_app
from serving.replica import EngineName, Replica, ReplicaConfig
from store.redis_server import open_redis
from store.traces import StreamConfig
from trainer.actor import TrainerActor
from trainer.config import AdapterPolicy, TrainerConfig

TRAINER_NAME, NAMESPACE = "osd-trainer", "osd"
PATHS = ("target", "draft", "trainer_dir", "registry_dir")  # settings that may start with ~
DEVICES = ("cpu", "cuda")  # no index: Ray picks the GPU (CUDA_VISIBLE_DEVICES)
GPU_UNITS = 10_000  # Ray counts GPU shares in units of 1e-4


@dataclass(frozen=True)
class ServiceConfig:
    """One deployment: the models, where Redis is, how many replicas, and where things run."""

    target: str  # local directory (on every node that runs a replica) or hub id
    draft: str | None = None
    engine: EngineName = "hf"  # hf: this project's engine; vllm: vLLM's (needs the vllm extra)
    tensor_parallel_size: int = 1  # vllm: GPUs each replica's model is split over
    enable_prefix_caching: bool | None = (
        None  # vllm: reuse the KV of shared prompt prefixes (default: vLLM's)
    )
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vllm: any other AsyncEngineArgs field
    proposer: ProposerName | None = None
    k: int = 3  # speculative tokens per step
    served_model_names: tuple[str, ...] = ()  # aliases clients may ask for, beside the target's id
    max_logprobs: int = MAX_LOGPROBS  # the most top log-probs a request may ask for
    redis_url: str | None = None  # default: $OSD_REDIS_URL, else redis://127.0.0.1:6379/0
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    replica_resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int | None = None  # per replica; default: Ray's (the replica's CPUs)
    device: str | None = None  # cpu or cuda; default: cuda where Ray gives a GPU share, else cpu
    dtype: str | None = None  # default: by device (bfloat16 on CUDA, float32 on the CPU)
    max_model_len: int | None = None  # prompt plus output, per request; default: the target's context
    gpu_memory_utilization: float | None = None  # a replica's cap; default: 0.8, or its share if less
    request_timeout: float | None = None  # seconds from arrival before a request fails; default: none
    max_queue: int = 64  # per replica; beyond it, 503
    max_batch: int = 8  # requests each replica decodes together (continuous batching)
    adaptive_k: bool = True  # the per-step controller plans each step from the load (else always k)
    suffix: bool = False  # suffix speculation beside the proposer, under the controller (engine hf)
    trainer: bool = True  # learn online (needs a draft)
    trainer_cpus: float = 0.0  # it runs at idle priority and yields to serving
    trainer_gpus: float = 0.0
    trainer_resources: dict[str, float] = field(default_factory=dict)
    trainer_dir: str = str(Path.home() / ".cache" / "osd" / "trainer")
    registry_dir: str | None = None  # drafts too large for Redis (over 256 MB) go here, on shared disk
    trainer_settings: dict[str, Any] = field(default_factory=dict)  # TrainerConfig fields to override
    held_out_fraction: float = StreamConfig.held_out_fraction  # traces the trainer's gate keeps apart
    trace_max_len: int = StreamConfig.max_len  # the trace stream's cap, in entries (oldest trimmed)
    hidden_fraction: float | None = None  # traces that log hidden states: default 0.25 with heads, else 0
    heads_tree: tuple[int, ...] | None = None  # heads: a static tree's branching (greedy requests)
    adapters: bool = False  # a LoRA adapter per busy domain over the draft, and a router to pick them
    adapter_min_traces: int = AdapterPolicy.min_traces  # traces naming a domain before its adapter
    admin_token_env: str = "OSD_ADMIN_TOKEN"

    def __post_init__(self):
        if (
            self.replicas < 1
            or self.k < 0
            or self.max_queue < 1
            or self.max_batch < 1
            or self.max_logprobs < 0
        ):
            raise ValueError(
                "need replicas >= 1, k >= 0, max_queue >= 1, max_batch >= 1 and max_logprobs >= 0"
            )
        object.__setattr__(self, "served_model_names", tuple(self.served_model_names))  # YAML gives lists
        if self.heads_tree is not None:
            object.__setattr__(self, "heads_tree", tuple(self.heads_tree))
        if problem := combination_problem(self.draft, self.proposer, self.heads_tree, self.adapters):
            raise ValueError(problem)
        if problem := placement_problem(self):
            raise ValueError(problem)
        _ = self.replica_config("-")  # ReplicaConfig checks its own settings
        fixed = {"checkpoint_dir", "registry_dir", "lora", "heads", "adapters"}  # set by fields here
        fixed |= {"device", "gpu_memory_fraction"}  # set by trainer_gpus and device
        settable = {f.name for f in dataclasses.fields(TrainerConfig)} - fixed
        if unknown := sorted(set(self.trainer_settings) - settable):
            raise ValueError(f"unknown trainer_settings {unknown}; known: {sorted(settable)}")
        _ = self.stream  # StreamConfig checks its own settings
        if self.hidden_fraction is not None and not 0.0 <= self.hidden_fraction <= 1.0:
            raise ValueError(f"hidden_fraction must lie in [0, 1], got {self.hidden_fraction}")

    @classmethod
    def from_args(cls, args: Mapping) -> ServiceConfig:
        """From a mapping such as serve.yaml's `args`; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(args) - known):
            raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
        if "target" not in args:
            raise ValueError("`target` is required: a model directory or hub id")
        paths = {k: os.path.expanduser(args[k]) for k in PATHS if args.get(k)}
        return cls(**{**args, **paths})

    @property
    def redis(self) -> str:
        return self.redis_url or os.environ.get("OSD_REDIS_URL") or "redis://127.0.0.1:6379/0"

    @property
    def stream(self) -> StreamConfig:
        return StreamConfig(held_out_fraction=self.held_out_fraction, max_len=self.trace_max_len)

    @property
    def served_names(self) -> tuple[str, ...]:
        """The ids /v1/models lists: the target as given, then the aliases."""
        return (self.target, *self.served_model_names)

    @property
    def served_model(self) -> str:
        """The id to tell clients: the first alias, else the target as given."""
        return (self.served_model_names or (self.target,))[0]

    @property
    def heads(self) -> HeadsSpec | None:
        """The draft heads served and trained (proposer medusa or hydra, one head per draft token)."""
        return heads_spec(self.proposer, self.k)

    @property
    def traced_hidden(self) -> float:
        return self.hidden_fraction if self.hidden_fraction is not None else 0.25 if self.heads else 0.0

    @property
    def learns(self) -> bool:
        return self.trainer and (self.draft is not None or self.heads is not None)

    @property
    def replica_device(self) -> str:
        """`device`, else CUDA when Ray gives each replica a GPU share, else the CPU."""
        return self.device or ("cuda" if self.replica_gpus > 0 else "cpu")

    @property
    def trainer_device(self) -> str:
        """CUDA with a GPU share, unless `device` is cpu (everything on the CPU, shares reserved)."""
        return "cuda" if self.trainer_gpus > 0 and self.device != "cpu" else "cpu"

    def replica_config(self, replica_id: str) -> ReplicaConfig:
        """What each replica serves, and how."""
        memory = self.gpu_memory_utilization
        if memory is None:  # the default, or the replica's share of a GPU when that is less
            memory = min(ReplicaConfig.gpu_memory_utilization, self.replica_gpus or 1.0)
        shares_a_gpu = 0 < self.replica_gpus < 1 and 0 < self.trainer_gpus < 1  # Ray may pack them on one
        return ReplicaConfig(
            target=self.target, draft=self.draft, proposer=self.proposer, num_speculative_tokens=self.k,
            device=self.replica_device, dtype=self.dtype, max_queue=self.max_queue,
            max_batch=self.max_batch, max_model_len=self.max_model_len, gpu_memory_utilization=memory,
            trainer_gpu_share=self.trainer_gpus if shares_a_gpu else 0.0,
            request_timeout=self.request_timeout, adaptive_k=self.adaptive_k, suffix=self.suffix,
            hidden_fraction=self.traced_hidden, heads_tree=self.heads_tree, adapters=self.adapters,
            registry_dir=self.registry_dir, stream=self.stream, replica_id=replica_id, engine=self.engine,
            vllm=self.vllm_settings,
        )  # fmt: skip

    @property
    def vllm_settings(self) -> VLLMSettings:
        """vLLM's engine arguments, with engine vllm: the ones set here, then `vllm_args`."""
        return VLLMSettings(
            tensor_parallel_size=self.tensor_parallel_size,
            enable_prefix_caching=self.enable_prefix_caching,
            max_logprobs=max(self.max_logprobs, ReplicaConfig.trace_top_k),
            extra=self.vllm_args,
        )


@serve.deployment
@serve.ingress()
class OSDServer:
    """One Serve replica: a `serving.replica.Replica` and its HTTP app."""

    def __init__(self, config: ServiceConfig):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        replica = config.replica_config(f"replica-{serve.get_replica_context().replica_tag}")
        self.gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])  # Ray's assignment
        self.replica = Replica(replica, open_redis(config.redis))
        self.tokenizer = AutoTokenizer.from_pretrained(config.target)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose decode loop is gone is replaced."""
        self.replica.check_health()

    def placement(self) -> dict:
        """Where this replica runs: the GPU ids Ray assigned it, what CUDA sees, the engine's device."""
        return {
            "replica_id": self.replica.config.replica_id,
            "gpus": self.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.replica.engine.device),
        }

    def __serve_build_asgi_app__(self):
        config = self.config
        trainer = ActorControl(TRAINER_NAME, NAMESPACE) if config.learns else None
        token = os.environ.get(config.admin_token_env)
        return create_app(
            self.replica, self.tokenizer, config.served_names, token, trainer, config.max_logprobs
        )

    def __del__(self):
        self.replica.close()


def combination_problem(
    draft: str | None, proposer: ProposerName | None, heads_tree: tuple[int, ...] | None, adapters: bool
) -> str | None:
    """Why these settings cannot serve together, in one line; None when they can."""
    proposer = proposer or ("draft" if draft else "none")
    if proposer == "draft" and draft is None:
        return "proposer 'draft' needs a draft model (--draft)"
    if proposer != "draft" and draft is not None:
        return (
            f"a draft model is used by proposer 'draft' only, not {proposer!r}: drop --draft or the proposer"
        )
    if heads_tree and proposer not in ("medusa", "hydra"):
        return f"a heads tree is verified for proposers 'medusa' and 'hydra' only, not {proposer!r}"
    if adapters and proposer != "draft":
        return "adapters are LoRA adapters over a draft model: they need proposer 'draft' and --draft"
    return None


def placement_problem(config: ServiceConfig) -> str | None:
    """Why the device and GPU settings cannot work, in one line; None when they can."""
    if config.device not in (None, *DEVICES):
        return f"--device must be one of {DEVICES} (Ray picks the GPU), got {config.device!r}"
    if config.dtype is not None and not isinstance(getattr(torch, config.dtype, None), torch.dtype):
        return f"unknown --dtype {config.dtype!r}; use e.g. float32, bfloat16 or float16"
    for name, share in (("replica-gpus", config.replica_gpus), ("trainer-gpus", config.trainer_gpus)):
        if share < 0 or (share > 1 and share != int(share)):
            return f"--{name} must be a fraction of one GPU or a whole number of GPUs, got {share}"
    tp = config.tensor_parallel_size
    if tp != 1 and (config.engine != "vllm" or tp < 1 or config.replica_gpus < tp):
        return f"--tensor-parallel-size {tp} needs --engine vllm and --replica-gpus >= {tp} (a GPU per part)"
    if config.device == "cuda" and config.replica_gpus == 0:
        return "--device cuda needs --replica-gpus > 0 so that Ray gives each replica its own GPU share"
    memory, share = config.gpu_memory_utilization, config.replica_gpus
    if memory is not None and config.replica_device == "cuda" and share < 1 and memory > share:
        return (
            f"--gpu-memory-utilization {memory} is more than the replica's share of its GPU "
            f"(--replica-gpus {config.replica_gpus}): on a shared GPU each process stays within its share"
        )
    return None


def gpu_shortfall(config: ServiceConfig, gpus: int) -> str | None:
    """Why Ray on a machine with `gpus` GPUs could not place the trainer (started first) and every
    replica, assigning GPUs as Ray does: a whole share takes the first free GPUs, a fraction the
    fullest GPU it fits on. None when it can."""
    trainer = f" and the trainer's {config.trainer_gpus}" if config.learns else ""
    problem = (
        f"{config.replicas} replica(s) at --replica-gpus {config.replica_gpus}{trainer} "
        f"do not fit on this machine's {gpus} GPU(s)"
    )
    free = [GPU_UNITS] * gpus  # what is left of each GPU
    shares = ([config.trainer_gpus] if config.learns else []) + [config.replica_gpus] * config.replicas
    for share in (share for share in shares if share > 0):
        if share >= 1:
            taken = [i for i, left in enumerate(free) if left == GPU_UNITS][: int(share)]
            if len(taken) < share:
                return problem
            for i in taken:
                free[i] = 0
        else:
            units = round(share * GPU_UNITS)
            fitting = [i for i, left in enumerate(free) if left >= units]
            if not fitting:
                return problem
            free[min(fitting, key=free.__getitem__)] -= units
    return None


def build(args: Mapping | ServiceConfig) -> serve.Application:
    """The Serve application (the trainer actor is started here when missing)."""
    config = args if isinstance(args, ServiceConfig) else ServiceConfig.from_args(args)
    if config.learns:
        start_trainer(config)
    actor_options = {
        "num_cpus": config.replica_cpus,
        "num_gpus": config.replica_gpus,
        "resources": config.replica_resources,
    }
    return OSDServer.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_queue + config.max_batch,
        ray_actor_options=actor_options,
    ).bind(config)


def trainer_config(config: ServiceConfig) -> TrainerConfig:
    """The trainer's settings: its directory, its device and GPU memory cap (its share of the
    card), the target's context as the longest trace it trains on unless TrainerConfig's default is
    shorter, then `trainer_settings`."""
    context = getattr(AutoConfig.from_pretrained(config.target), "max_position_embeddings", None)
    longest = {"max_seq_len": min(context, TrainerConfig.max_seq_len)} if context else {}
    settings = longest | config.trainer_settings
    on_gpu = {"gpu_memory_fraction": min(1.0, config.trainer_gpus)} if config.trainer_device == "cuda" else {}
    adapters = AdapterPolicy(min_traces=config.adapter_min_traces) if config.adapters else None
    registry_dir = Path(config.registry_dir) if config.registry_dir else None
    return TrainerConfig(
        checkpoint_dir=Path(config.trainer_dir), registry_dir=registry_dir, heads=config.heads,
        adapters=adapters, device=config.trainer_device, **on_gpu, **settings,
    )  # fmt: skip


def start_trainer(config: ServiceConfig):
    """The named trainer actor, created unless it runs already; returns once it has started."""
    options = TrainerActor.options(
        name=TRAINER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=config.trainer_cpus,
        num_gpus=config.trainer_gpus,
        resources=config.trainer_resources,
    )
    base = config.target if config.heads else config.draft  # heads read the target's hidden states
    actor = options.remote(trainer_config(config), base, config.redis, stream=config.stream)
    ray.get(actor.status.remote())  # started: its starting draft is in the registry
    return actor


class ActorControl:
    """The named trainer actor's methods as plain calls, for the admin API and the demo."""

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace

    def _call(self, method: str, *args):
        actor = ray.get_actor(self.name, namespace=self.namespace)
        return ray.get(getattr(actor, method).remote(*args))

    def status(self) -> dict:
        return self._call("status")

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")

    def train(self, steps: int) -> dict:
        return self._call("train", steps)
