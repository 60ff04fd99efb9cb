"""The deployment files: Serve config, KubeRay RayService and cluster launcher YAML are valid for
Ray's own schemas and name settings that `deploy.ray_serve.ServiceConfig` accepts. And the
settings themselves: what `osd serve`'s flags make, what each replica and the trainer are given
(device, GPU memory), GPU settings refused in one line, GPU shares packed as Ray packs them, and
the HAProxy ingress's environment (its own files and ports, restored after; a missing HAProxy named),
and the sweep that kills what a stopped stack's Ray left running, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from polling import wait_for
from ray.serve.schema import ServeDeploySchema
from rich.console import Console
from transformers import AutoConfig

from deploy.demo.build import build_demo_models
from deploy.ray_serve import ServiceConfig, build, gpu_shortfall, trainer_config
from deploy.serve import (
    SCRATCH_MARK,
    carrying,
    environ,
    ingress_env,
    ingress_problem,
    kill_leftovers,
    service_config,
)
from deploy.serve import parser as serve_parser
from distill.heads import HeadsSpec
from tiny_models import TINY_DEMO
from trainer.config import TrainerConfig

DEPLOY = Path(__file__).parent.parent / "deploy"


def check_serve_config(config: dict) -> ServiceConfig:
    schema = (
        ServeDeploySchema.model_validate(config)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(config)
    )
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert (module, name) == ("deploy.ray_serve", build.__name__)
    return ServiceConfig.from_args(app.args)


def test_serve_yaml_serves_the_quick_demo_pair_on_loopback():
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    service = check_serve_config(config)
    assert service.target == str(Path.home() / ".cache/osd/demo/quick/target")  # ~ expanded
    assert service.replicas == 2 and service.learns
    assert service.replica_device == service.trainer_device == "cpu"


def test_the_rayservice_manifest_shares_a_gpu_between_a_replica_and_the_trainer():
    manifest = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    service = check_serve_config(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert service.replica_gpus + service.trainer_gpus == 1.0 and service.redis_url is None  # from the Secret
    assert service.replica_config("r").gpu_memory_utilization <= service.replica_gpus  # within its share
    assert service.trainer_device == "cuda"
    env = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "env"
    ]
    assert {e["name"] for e in env} == {"OSD_REDIS_URL", "OSD_ADMIN_TOKEN"}


def test_the_cluster_launcher_yaml_fits_rays_schema():
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((DEPLOY / "cluster.yaml").read_text()), schema)


def test_service_config_refuses_unknown_or_missing_settings():
    with pytest.raises(ValueError, match="unknown settings \\['replica'\\]"):
        ServiceConfig.from_args({"target": "t", "replica": 2})
    with pytest.raises(ValueError, match="target"):
        ServiceConfig.from_args({"draft": "d"})
    with pytest.raises(ValueError, match="replicas"):
        ServiceConfig.from_args({"target": "t", "replicas": 0})
    with pytest.raises(ValueError, match="unknown trainer_settings \\['gate'\\]"):
        ServiceConfig.from_args({"target": "t", "trainer_settings": {"gate": 1}})
    with pytest.raises(ValueError, match="held_out_fraction"):
        ServiceConfig.from_args({"target": "t", "held_out_fraction": 1.5})


def test_trainer_settings_override_the_trainer_config(tiny_demo, tmp_path):
    target = str(build_demo_models(TINY_DEMO, tiny_demo).target)
    context = AutoConfig.from_pretrained(target).max_position_embeddings
    assert trainer_config(ServiceConfig(target=target)).max_seq_len == min(context, TrainerConfig.max_seq_len)
    settings = {"gate_every": 7, "max_seq_len": 64}
    trainer = trainer_config(ServiceConfig(target, trainer_dir=str(tmp_path), trainer_settings=settings))
    assert (trainer.gate_every, trainer.max_seq_len, trainer.checkpoint_dir) == (7, 64, tmp_path)
    assert trainer.heads is None
    heads = ServiceConfig(target, proposer="hydra", k=4)  # draft heads: trained on the target's hidden states
    assert heads.learns and heads.traced_hidden == 0.25
    assert trainer_config(heads).heads == HeadsSpec("hydra", 4)


def test_osd_serve_flags_and_config_files_make_the_service_config(tmp_path):
    flags = ["--target", "t", "--draft", "d", "--replicas", "2", "--k", "4", "--no-trainer"]
    config = service_config(serve_parser().parse_args([*flags, "--trainer-dir", str(tmp_path)]), Console())
    assert (config.target, config.draft, config.replicas, config.k) == ("t", "d", 2, 4)
    assert not config.learns and config.trainer_dir == str(tmp_path)
    assert config.replica_cpus * config.replicas <= os.cpu_count()
    assert (config.device, config.replica_gpus, config.trainer_gpus) == (None, 0.0, 0.0)
    gpu_flags = [
        "--device", "cuda", "--dtype", "bfloat16", "--replica-gpus", "1", "--trainer-gpus", "0.25",
        "--max-model-len", "512", "--gpu-memory-utilization", "0.7", "--request-timeout", "30",
    ]  # fmt: skip
    on_gpus = service_config(serve_parser().parse_args([*flags[:4], *gpu_flags]), Console())
    assert (on_gpus.replica_gpus, on_gpus.trainer_gpus, on_gpus.trainer_device) == (1.0, 0.25, "cuda")
    replica = on_gpus.replica_config("r")
    assert (replica.device, replica.dtype, replica.max_model_len) == ("cuda", "bfloat16", 512)
    assert (replica.gpu_memory_utilization, replica.request_timeout) == (0.7, 30.0)
    vllm_flags = ["--engine", "vllm", "--replica-gpus", "2", "--tensor-parallel-size", "2"]
    vllm_args = serve_parser().parse_args([*flags[:4], *vllm_flags, "--no-enable-prefix-caching"])
    on_vllm = service_config(vllm_args, Console()).replica_config("r")
    assert on_vllm.engine == "vllm" and on_vllm.vllm.tensor_parallel_size == 2
    assert on_vllm.vllm.enable_prefix_caching is False and on_vllm.vllm.max_logprobs == 20
    from_yaml = service_config(serve_parser().parse_args(["--config", str(DEPLOY / "serve.yaml")]), Console())
    assert from_yaml == check_serve_config(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))


def test_the_trainer_trains_on_cuda_within_its_gpu_share(tiny_demo):
    target = str(build_demo_models(TINY_DEMO, tiny_demo).target)
    assert trainer_config(ServiceConfig(target)).device == "cpu"
    quarter = trainer_config(ServiceConfig(target, trainer_gpus=0.25))
    assert (quarter.device, quarter.gpu_memory_fraction) == ("cuda", 0.25)
    whole = trainer_config(ServiceConfig(target, trainer_gpus=1))
    assert (whole.device, whole.gpu_memory_fraction) == ("cuda", 1.0)
    assert trainer_config(ServiceConfig(target, trainer_gpus=1, device="cpu")).device == "cpu"
    with pytest.raises(ValueError, match="unknown trainer_settings \\['device'\\]"):  # trainer_gpus says
        ServiceConfig(target, trainer_settings={"device": "cuda"})


def test_each_replica_runs_where_its_gpu_share_says():
    cpu = ServiceConfig("t").replica_config("r")
    assert (cpu.device, cpu.replica_id) == ("cpu", "r")
    whole = ServiceConfig("t", replica_gpus=1, dtype="bfloat16").replica_config("r")
    assert (whole.device, whole.dtype, whole.gpu_memory_utilization) == ("cuda", "bfloat16", 0.8)
    assert ServiceConfig("t", replica_gpus=0.5).replica_config("r").gpu_memory_utilization == 0.5
    assert ServiceConfig("t", replica_gpus=1, device="cpu").replica_config("r").device == "cpu"
    settings = {"max_model_len": 512, "gpu_memory_utilization": 0.45, "request_timeout": 30.0}
    given = ServiceConfig("t", replica_gpus=0.5, **settings).replica_config("r")
    assert {name: getattr(given, name) for name in settings} == settings
    heads = ServiceConfig.from_args({"target": "t", "proposer": "hydra", "heads_tree": [3, 2]})  # YAML list
    assert heads.replica_config("r").heads_tree == (3, 2)


@pytest.mark.parametrize(
    "settings,reason",
    [
        ({"device": "cuda"}, "--device cuda needs --replica-gpus > 0"),
        ({"device": "cuda:1", "replica_gpus": 1}, "Ray picks the GPU"),
        ({"dtype": "bf16"}, "unknown --dtype 'bf16'"),
        ({"replica_gpus": 1.5}, "--replica-gpus must be a fraction of one GPU or a whole number"),
        ({"trainer_gpus": -1}, "--trainer-gpus must be"),
        ({"replica_gpus": 0.5, "gpu_memory_utilization": 0.6}, "more than the replica's share"),
        ({"replica_gpus": 1, "gpu_memory_utilization": 1.5}, "gpu_memory_utilization must lie in"),
        ({"max_model_len": 1}, "max_model_len must be >= 2"),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        ({"engine": "tgi"}, "engine must be one of ('hf', 'vllm')"),
        ({"engine": "vllm", "proposer": "hydra"}, "cannot serve draft heads"),
        ({"engine": "vllm", "suffix": True}, "not suffix speculation: use --engine hf"),
        ({"engine": "vllm", "draft": "d", "adapters": True}, "serves one draft, not per-domain adapters"),
        ({"tensor_parallel_size": 2, "replica_gpus": 2}, "needs --engine vllm"),
        ({"engine": "vllm", "tensor_parallel_size": 2, "replica_gpus": 1}, "--replica-gpus >= 2"),
    ],
)
def test_gpu_and_limit_settings_are_refused_in_one_line(settings, reason):
    with pytest.raises(ValueError) as raised:
        ServiceConfig("t", **settings)
    assert reason in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "settings,gpus,fits",
    [
        ({}, 0, True),  # on the CPU
        ({"replicas": 2, "replica_gpus": 1, "trainer_gpus": 0.25}, 3, True),
        ({"replicas": 2, "replica_gpus": 1, "trainer_gpus": 0.25}, 2, False),
        ({"replicas": 1, "replica_gpus": 0.75, "trainer_gpus": 0.25}, 1, True),  # one GPU, shared
        ({"replicas": 4, "replica_gpus": 0.75, "trainer_gpus": 0.25}, 4, True),  # the trainer beside one
        ({"replicas": 2, "replica_gpus": 0.75, "trainer_gpus": 0.5}, 2, False),
        ({"replicas": 3, "replica_gpus": 0.6, "trainer": False}, 2, False),  # 1.8 GPUs, but in 0.6 pieces
        ({"replicas": 2, "replica_gpus": 2, "trainer_gpus": 0.5, "trainer": False}, 4, True),
        ({"replicas": 1, "replica_gpus": 1, "trainer_gpus": 1}, 1, False),
    ],
)
def test_gpu_shares_are_packed_as_ray_packs_them(settings, gpus, fits):
    problem = gpu_shortfall(ServiceConfig("t", draft="d", **settings), gpus)
    assert (problem is None) == fits
    assert fits or f"this machine's {gpus} GPU(s)" in problem


def test_the_haproxy_ingress_keeps_its_files_and_ports_to_itself(tmp_path):
    assert ingress_env("proxy", tmp_path) == {}
    env = ingress_env("haproxy", tmp_path)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all(Path(p).parent == tmp_path or Path(p) == tmp_path for p in paths)
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2  # two free ports, not HAProxy's fixed 8404 and 9101
    with pytest.raises(ValueError, match="ingress must be one of"):
        ingress_env("nginx", tmp_path)


def test_the_ingress_environment_is_restored_after_the_stack(monkeypatch):
    monkeypatch.setenv("OSD_TEST_KEPT", "before")
    monkeypatch.delenv("OSD_TEST_ADDED", raising=False)
    with environ({"OSD_TEST_KEPT": "during", "OSD_TEST_ADDED": "during"}):
        assert os.environ["OSD_TEST_KEPT"] == os.environ["OSD_TEST_ADDED"] == "during"
    assert os.environ["OSD_TEST_KEPT"] == "before" and "OSD_TEST_ADDED" not in os.environ


def test_what_a_stack_leaves_running_is_killed_and_nothing_else(tmp_path):
    marked = os.environ | {SCRATCH_MARK: str(tmp_path)}
    subprocess.run(["sh", "-c", "sleep 600 &"], env=marked, check=True)  # an orphan, as HAProxy was
    child = subprocess.Popen(["sleep", "600"], env=marked)
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        # the orphan may still be in exec, whose new image shows no environment until it is set up
        wait_for(lambda: len(carrying(SCRATCH_MARK, str(tmp_path))) == 2)
        kill_leftovers(tmp_path)
        assert carrying(SCRATCH_MARK, str(tmp_path)) == []
        child.wait(10)  # gone (the sweep reaped it), not still sleeping
        assert bystander.poll() is None
    finally:
        kill_leftovers(tmp_path)  # what a failure above left
        bystander.kill()
        bystander.wait()


def test_a_missing_haproxy_is_named_before_anything_starts(monkeypatch):
    assert ingress_problem("haproxy") is None  # ray[serve] bundles one here
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "needs HAProxy" in ingress_problem("haproxy") and ingress_problem("proxy") is None
