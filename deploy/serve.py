"""`osd serve`: the whole system on one machine, from flags.

It connects to Redis (`--redis-url`) or starts the embedded redis-server (data under
`--redis-dir`), loads one replica of the target and draft, starts the trainer as a Ray actor on
a local Ray instance (unless `--no-trainer`), and serves the OpenAI-compatible API with uvicorn,
on loopback unless `--host` says otherwise. `--demo quick|full` serves the demo pair, building it
first when it is missing. Ctrl-C stops everything; the trainer's checkpoint and Redis's AOF keep
what was learnt and logged for the next start.

Ray Serve deployments (several replicas, a cluster) come with issue 6; until then this serves
one replica in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import ray
import uvicorn
from rich.console import Console
from transformers import AutoTokenizer

from serving.api import create_app
from serving.server import Replica, ReplicaConfig
from store.redis_server import RedisConfig, connect
from trainer.actor import TrainerActor
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osd serve", description=__doc__.splitlines()[0])
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--target", help="target model: a local directory or hub id")
    models.add_argument("--demo", choices=["quick", "full"], help="serve the demo pair (built if missing)")
    p.add_argument("--draft", help="draft model (same vocabulary); without it, --proposer ngram or none")
    p.add_argument("--proposer", choices=["draft", "ngram", "none"])
    p.add_argument("--k", type=int, default=3, help="speculative tokens per step")
    p.add_argument("--model-name", help="the model id clients ask for (default: the target's directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis-url", help="an existing Redis (redis:// or rediss://); default: start one")
    p.add_argument("--redis-dir", type=Path, default=RedisConfig.data_dir, help="the embedded Redis's data")
    p.add_argument("--no-trainer", action="store_true", help="serve without learning online")
    p.add_argument(
        "--admin-token",
        default=os.environ.get("OSD_ADMIN_TOKEN"),
        help="bearer token for /admin (default: $OSD_ADMIN_TOKEN; without one, no admin routes)",
    )
    p.add_argument("--trainer-dir", type=Path, default=Path.home() / ".cache" / "osd" / "trainer")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    console = Console()
    target, draft = args.target, args.draft
    if args.demo:
        from deploy.demo.build import PRESETS, build_demo_models

        models = build_demo_models(PRESETS[args.demo], console=console)
        target, draft = str(models.target), str(models.draft)
    client, local_redis = connect(RedisConfig(args.redis_url, args.redis_dir))
    redis_url = args.redis_url or local_redis.url
    config = ReplicaConfig(target=target, draft=draft, proposer=args.proposer, num_speculative_tokens=args.k)
    with console.status("loading the models"):
        replica = Replica(config, client)
    model_name = args.model_name or (f"osd-demo-{args.demo}" if args.demo else replica.target_id)
    trainer = None
    try:
        if draft is not None and not args.no_trainer:
            trainer = start_trainer(draft, redis_url, replica.context, args.trainer_dir, console)
        control = None if trainer is None else ActorControl(trainer)
        app = create_app(
            replica, AutoTokenizer.from_pretrained(target), model_name, args.admin_token, control
        )
        console.print(
            f"[bold]OSD Serve[/bold]: {model_name!r} at http://{args.host}:{args.port}/v1 "
            f"(health: /health; admin: {'/admin' if args.admin_token else 'off'}; redis: {redis_url}; "
            f"trainer: {'on' if trainer else 'off'}; Ctrl-C stops)"
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        replica.close()
        if trainer is not None:
            ray.get(trainer.stop.remote())
            ray.shutdown()
        if local_redis is not None:
            local_redis.stop()


class ActorControl:
    """The trainer actor's status, pause and resume as plain calls, for the admin API."""

    def __init__(self, actor):
        self.actor = actor

    def status(self) -> dict:
        return ray.get(self.actor.status.remote())

    def pause(self) -> None:
        ray.get(self.actor.pause.remote())

    def resume(self) -> None:
        ray.get(self.actor.resume.remote())


def start_trainer(draft: str, redis_url: str, context: int, checkpoint_dir: Path, console: Console):
    """The trainer actor on a local Ray instance bound to loopback."""
    with console.status("starting Ray and the trainer"):
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        config = TrainerConfig(checkpoint_dir=checkpoint_dir, max_seq_len=context)
        actor = TrainerActor.remote(config, draft, redis_url)
        ray.get(actor.status.remote())  # started: its starting draft is in the registry
    return actor
