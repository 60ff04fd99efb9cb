"""The deployment files: Serve config, KubeRay RayService and cluster launcher YAML are valid for
Ray's own schemas and name settings that `deploy.ray_serve.ServiceConfig` accepts."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from rich.console import Console
from transformers import AutoConfig

from deploy.demo.build import build_demo_models
from deploy.ray_serve import ServiceConfig, build, trainer_config
from deploy.serve import parser as serve_parser
from deploy.serve import service_config
from distill.heads import HeadsSpec
from tiny_models import TINY_DEMO

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


def test_the_rayservice_manifest_shares_a_gpu_between_a_replica_and_the_trainer():
    manifest = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    service = check_serve_config(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert service.replica_gpus + service.trainer_gpus == 1.0 and service.redis_url is None  # from the Secret
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
    assert trainer_config(ServiceConfig(target=target)).max_seq_len == context
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
    from_yaml = service_config(serve_parser().parse_args(["--config", str(DEPLOY / "serve.yaml")]), Console())
    assert from_yaml == check_serve_config(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
