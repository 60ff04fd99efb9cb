"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`): the Serve replicas on one, the
trainer on the other, placed by custom resources; a publish reaches every replica, and a replica
that dies comes back on the live version."""

from __future__ import annotations

import httpx
import ray
from polling import PATIENCE, wait_for
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from transformers import AutoModelForCausalLM

from deploy.demo.build import build_demo_models
from deploy.ray_serve import NAMESPACE, TRAINER_NAME, ServiceConfig, build
from store.load import read_load
from store.redis_server import free_port
from store.registry import Registry
from tiny_models import TINY_DEMO


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


def test_replicas_on_one_node_the_trainer_on_another_and_a_publish_reaches_all(
    tiny_demo, redis_server, redis_client, tmp_path, monkeypatch
):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    # Loopback only: without this the driver swaps 127.0.0.1 for the machine's address to reach GCS.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    serving_node = cluster.add_node(num_cpus=2, resources={"osd_replica": 2}, node_ip_address="127.0.0.1")
    training_node = cluster.add_node(num_cpus=1, resources={"osd_trainer": 1}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        config = ServiceConfig(
            target=str(models.target), draft=str(models.draft), served_model_names=("demo",), k=2,
            redis_url=redis_server.url,
            replicas=2, replica_cpus=0.5, replica_resources={"osd_replica": 1}, torch_threads=1,
            trainer_resources={"osd_trainer": 1}, trainer_dir=str(tmp_path / "trainer"),
        )  # fmt: skip
        serve.run(build(config), name="osd", route_prefix="/")
        trainer = ray.get_actor(TRAINER_NAME, namespace=NAMESPACE)
        replicas = [
            ray.get_actor(name["name"], namespace="serve")
            for name in ray.util.list_named_actors(all_namespaces=True)
            if name["name"].startswith("SERVE_REPLICA::osd#OSDServer")
        ]
        assert len(replicas) == 2
        assert {node_of(r) for r in replicas} == {serving_node.node_id}
        assert node_of(trainer) == training_node.node_id

        def versions() -> set[str]:
            return {load.draft_version for load in read_load(redis_client)}

        wait_for(lambda: versions() == {"draft:v1"})  # the trainer's starting draft
        weights = AutoModelForCausalLM.from_pretrained(models.draft).state_dict()
        Registry(redis_client).publish("draft", {n: t * 1.01 for n, t in weights.items()})
        wait_for(lambda: versions() == {"draft:v2"} and len(read_load(redis_client)) == 2)
        body = {"model": "demo", "prompt": "def f():", "max_tokens": 8, "temperature": 0}
        for _ in range(4):
            out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=PATIENCE).json()
            assert out["metrics"]["draft_version"] == "draft:v2"

        # A replica that dies is replaced by Serve, and the new one starts on the live version.
        before = {load.replica for load in read_load(redis_client)}
        ray.kill(replicas[0])
        replaced = wait_for(lambda: [load for load in read_load(redis_client) if load.replica not in before])
        assert [load.draft_version for load in replaced] == ["draft:v2"]
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
