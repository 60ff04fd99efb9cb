"""Ray Serve: N server replicas behind one HTTP address, and the trainer actor beside them.

`build` is a Ray Serve application builder. `serve run deploy/serve.yaml` calls it with the
YAML's `args`, and `osd serve` with its flags; both go through `ServiceConfig`. Each Serve
replica is a Ray actor that loads the target and draft, opens its own Redis connection and serves
the FastAPI app of `serving.api` (`@serve.ingress`, the app built once the replica has loaded).
Serve's proxy spreads requests over the replicas; each replica's own queue (`max_queue`) is the
back-pressure, so Serve lets that many requests through to it.

The trainer is one named, detached Ray actor (`osd-trainer` in namespace `osd`), created by the
builder when missing and found by name by each replica's admin routes. Placement is by Ray
resources: `replica_cpus`/`replica_gpus`/`replica_resources` and the `trainer_*` ones; fractional
GPUs let a replica and the trainer share one card. Secrets stay out of the config: the admin token
is read by each replica from the environment variable named by `admin_token_env`, and a Redis URL
with a password can come from `$OSD_REDIS_URL` instead of `redis_url`.
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
from serving.api import MAX_LOGPROBS, create_app
from serving.engine import ProposerName
from serving.server import Replica, ReplicaConfig
from store.redis_server import open_redis
from store.traces import StreamConfig
from trainer.actor import TrainerActor
from trainer.config import AdapterPolicy, TrainerConfig

TRAINER_NAME, NAMESPACE = "osd-trainer", "osd"
PATHS = ("target", "draft", "trainer_dir", "registry_dir")  # settings that may start with ~


@dataclass(frozen=True)
class ServiceConfig:
    """One deployment: the models, where Redis is, how many replicas, and where things run."""

    target: str  # local directory (on every node that runs a replica) or hub id
    draft: str | None = None
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
    device: str | None = None
    dtype: str | None = None
    max_queue: int = 64  # per replica; beyond it, 503
    max_batch: int = 8  # requests each replica decodes together (continuous batching)
    adaptive_k: bool = True  # k per step from the load and acceptance, up to k (else always k)
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
        if problem := combination_problem(self.draft, self.proposer, self.heads_tree, self.adapters):
            raise ValueError(problem)
        fixed = {"checkpoint_dir", "registry_dir", "lora", "heads", "adapters"}  # set by fields here
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


@serve.deployment
@serve.ingress()
class OSDServer:
    """One Serve replica: a `serving.server.Replica` and its HTTP app."""

    def __init__(self, config: ServiceConfig):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        replica = ReplicaConfig(
            target=config.target, draft=config.draft, proposer=config.proposer,
            num_speculative_tokens=config.k, device=config.device, dtype=config.dtype,
            max_queue=config.max_queue, max_batch=config.max_batch, adaptive_k=config.adaptive_k,
            hidden_fraction=config.traced_hidden,
            heads_tree=tuple(config.heads_tree) if config.heads_tree else None, adapters=config.adapters,
            registry_dir=config.registry_dir, stream=config.stream,
            replica_id=f"replica-{serve.get_replica_context().replica_tag}",
        )  # fmt: skip
        self.replica = Replica(replica, open_redis(config.redis))
        self.tokenizer = AutoTokenizer.from_pretrained(config.target)

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
    """The trainer's settings: its directory, the target's context as the longest trace it trains
    on, then `trainer_settings`."""
    context = getattr(AutoConfig.from_pretrained(config.target), "max_position_embeddings", None)
    settings = ({"max_seq_len": context} if context else {}) | config.trainer_settings
    adapters = AdapterPolicy(min_traces=config.adapter_min_traces) if config.adapters else None
    registry_dir = Path(config.registry_dir) if config.registry_dir else None
    return TrainerConfig(
        checkpoint_dir=Path(config.trainer_dir), registry_dir=registry_dir, heads=config.heads,
        adapters=adapters, **settings,
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
