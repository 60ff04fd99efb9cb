"""GPU placement through real Ray and Serve on a CPU machine: a local Ray instance that declares
three GPUs it does not have assigns GPU ids all the same. Two replicas with a whole GPU each and
the trainer with half of one each get GPUs of their own, and what a replica's CUDA would see is
exactly its assignment. `device: cpu` keeps the models on the CPU, so no CUDA is touched."""

from __future__ import annotations

import ray
from polling import wait_for
from ray import serve

from deploy.demo.build import build_demo_models
from deploy.ray_serve import NAMESPACE, TRAINER_NAME, ServiceConfig, build
from store.redis_server import free_port
from tiny_models import TINY_DEMO


def test_each_replica_and_the_trainer_get_gpus_of_their_own(tiny_demo, redis_server, redis_client, tmp_path):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    ray.init(
        address="local", num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False,
        configure_logging=False, _node_ip_address="127.0.0.1",
    )  # fmt: skip
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()}, logging_config={"log_level": "WARNING"}
        )
        config = ServiceConfig(
            target=str(models.target), draft=str(models.draft), k=2, redis_url=redis_server.url,
            replicas=2, replica_cpus=0.5, replica_gpus=1, trainer_gpus=0.5, device="cpu", torch_threads=1,
            trainer_dir=str(tmp_path / "trainer"),
        )  # fmt: skip
        serve.run(build(config), name="osd", route_prefix="/")
        handle = serve.get_app_handle("osd")
        placements: dict[str, dict] = {}

        def both_replicas_answered() -> bool:  # Serve picks the replica: ask until each has answered
            placement = handle.placement.remote().result()
            placements[placement["replica_id"]] = placement
            return len(placements) == 2

        wait_for(both_replicas_answered)
        replica_gpus = [placement["gpus"] for placement in placements.values()]
        assert all(len(gpus) == 1 for gpus in replica_gpus)
        assert replica_gpus[0] != replica_gpus[1]
        for placement in placements.values():  # nothing overrides what Ray set, and no CUDA is touched
            assert placement["cuda_visible_devices"] == ",".join(placement["gpus"])
            assert placement["device"] == "cpu"
        trainer = ray.get_actor(TRAINER_NAME, namespace=NAMESPACE)
        trainer_gpus = ray.get(trainer.status.remote())["accelerators"]
        assert len(trainer_gpus) == 1 and trainer_gpus not in replica_gpus
        handle.check_health.remote().result()  # a replica whose decode loop runs is healthy
    finally:
        serve.shutdown()
        ray.shutdown()
