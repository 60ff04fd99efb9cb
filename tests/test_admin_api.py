"""The admin API: bearer-token auth, versions, activation, rollback, and the trainer's controls
(the real `trainer.actor.Trainer`, in process)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from polling import wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.demo.build import build_demo_models
from serving.http.api import create_app
from serving.replica import Replica, ReplicaConfig
from store.metrics import MetricsConfig
from store.registry import Registry
from store.traces import StreamConfig
from tiny_models import TINY_DEMO
from trainer.actor import Trainer
from trainer.config import TrainerConfig

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup(tiny_demo, redis_server, redis_client, tmp_path):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    config = ReplicaConfig(
        target=str(models.target), draft=str(models.draft), stream=StreamConfig(stream="t:admin"),
        metrics=MetricsConfig(prefix="t:admin:metrics"), poll_seconds=0.1, adaptive_k=False,
        engine_process=False,  # the routes do not care where the engine decodes; a thread starts sooner
    )  # fmt: skip
    replica = Replica(config, redis_client)
    trainer_config = TrainerConfig(
        checkpoint_dir=tmp_path / "ckpt", torch_threads=torch.get_num_threads(), max_seq_len=replica.context,
        sched_idle=False, niceness=0,  # pause() waits for its step: that must not hang on idle CPU
    )  # fmt: skip
    trainer = Trainer(
        trainer_config, str(models.draft), redis_server.url, "trainer-admin", StreamConfig(stream="t:admin")
    )
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    yield replica, trainer, models, create_app(replica, tokenizer, "demo", TOKEN, trainer)
    trainer.stop()
    replica.close()


def test_admin_routes_need_the_token(setup):
    client = TestClient(setup[3])
    assert client.get("/admin/versions").status_code == 401
    wrong = client.get("/admin/versions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"]["message"] == "wrong admin token"
    assert client.post("/admin/trainer/pause", headers={"Authorization": "Basic x"}).status_code == 401
    assert client.get("/admin/versions", headers=AUTH).status_code == 200


def test_without_a_token_there_are_no_admin_routes(setup):
    replica, _, models, _ = setup
    app = create_app(replica, AutoTokenizer.from_pretrained(models.target), "demo")
    assert TestClient(app).get("/admin/versions", headers=AUTH).status_code == 404


def test_activate_and_roll_back_move_what_the_replica_serves(setup):
    replica, _, models, app = setup
    client = TestClient(app)
    wait_for(lambda: replica.draft_version == "draft:v1")  # the trainer's starting draft
    weights = {
        n: t + 0.01 for n, t in AutoModelForCausalLM.from_pretrained(models.draft).state_dict().items()
    }
    Registry(replica.client).add("draft", weights)  # a candidate, not live
    listed = client.get("/admin/versions", headers=AUTH).json()
    assert listed["live"] == 1 and [v["version"] for v in listed["versions"]] == [1, 2]
    assert client.post("/admin/activate", json={"version": 2}, headers=AUTH).json()["status"] == "live"
    wait_for(lambda: replica.draft_version == "draft:v2")
    back = client.post("/admin/rollback", json={}, headers=AUTH).json()
    assert back["version"] == 1
    wait_for(lambda: replica.draft_version == "draft:v1")
    assert client.post("/admin/activate", json={"version": 99}, headers=AUTH).status_code == 404


def test_the_trainer_pauses_resumes_and_reports(setup):
    client = TestClient(setup[3])
    assert client.post("/admin/trainer/pause", headers=AUTH).json() == {"paused": True}
    wait_for(lambda: client.get("/admin/trainer", headers=AUTH).json()["state"] == "paused")
    assert client.post("/admin/trainer/resume", headers=AUTH).json() == {"paused": False}
    wait_for(lambda: client.get("/admin/trainer", headers=AUTH).json()["state"] != "paused")
