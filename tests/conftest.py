"""Shared fixtures. Every test model is built with from_config and saved to disk, so tests load
it through the real loading path (a local directory). No process the suite starts may outlive it
(`no_process_outlives_the_session`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying a hub
# Every process the suite starts inherits this mark, even one that leaves its parent's session.
os.environ["OSD_TEST_SESSION"] = f"{os.getpid()}-{os.urandom(4).hex()}"

import psutil
import pytest
import torch
from polling import wait_for
from transformers.utils import logging as hf_logging

from deploy.demo.build import build_demo_models
from deploy.serve import carrying
from store.redis_server import LocalRedis
from tiny_models import ARCHS, TINY_DEMO, build, perturbed

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # tiny models: one thread beats two on this 2-core machine


def started_by_the_suite() -> list[psutil.Process]:
    """Processes that carry this session's mark, other than Python's multiprocessing resource
    tracker (vLLM starts one), which exits with the test process."""
    found = []
    for process in carrying("OSD_TEST_SESSION", os.environ["OSD_TEST_SESSION"]):
        with contextlib.suppress(psutil.Error):
            if "multiprocessing.resource_tracker" not in " ".join(process.cmdline()):
                found.append(process)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """Set up first, torn down last: after every other fixture has stopped what it started, no
    redis-server, Ray process, `osd` child or browser of this session may still run. Processes
    that are shutting down get a generous grace period; what is left then is killed and fails the
    run, named."""
    yield
    try:
        wait_for(lambda: not started_by_the_suite(), timeout=60, every=0.5)
    except AssertionError:
        names = []
        for process in started_by_the_suite():
            with contextlib.suppress(psutil.Error):
                names.append(f"{process.pid}: {' '.join(process.cmdline()[:4])}")
                process.kill()
        pytest.fail(f"{len(names)} process(es) started by the tests outlived them: {names}")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: target, a near draft (perturbed target), a small independent draft."""
    root = tmp_path_factory.mktemp("models")
    dirs: dict[str, dict[str, Path]] = {}
    for i, arch in enumerate(ARCHS):
        target = build(arch, layers=2, hidden=64, seed=10 + i)
        models = {
            "target": target,
            "near": perturbed(target, 0.5, seed=20 + i),
            "small": build(arch, 1, 32, 30 + i),
        }
        dirs[arch] = {}
        for name, model in models.items():
            path = root / f"{arch}-{name}"
            model.save_pretrained(path)
            dirs[arch][name] = path
    return dirs


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session, on a free loopback port with a temporary data dir."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server, monkeypatch):
    """A client to the session's server, with the database emptied for each test. A replica the
    test opened and left open (it failed before closing it) is closed after it, so that its
    heartbeat does not beat into the next tests' database."""
    from serving.replica import Replica

    opened: list[Replica] = []
    init = Replica.__init__
    monkeypatch.setattr(
        Replica, "__init__", lambda self, *a, **kw: init(self, *a, **kw) or opened.append(self)
    )
    client = redis_server.client()
    client.flushdb()
    yield client
    for replica in opened:
        if not replica._closed:
            replica.close()
    client.close()


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for the test module, with its CPUs pinned (modules that build their
    own cluster, as test_cluster does, start after this one has shut down)."""
    import ray

    ray.init(
        address="local",  # its own, whatever a killed run left in /tmp/ray
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",  # loopback only
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The tiny demo build, made once per session; returns its cache directory. Tests that also
    start Ray list this fixture first, so the build never runs beside a live Ray instance."""
    cache = tmp_path_factory.mktemp("demo-cache")
    build_demo_models(TINY_DEMO, cache)
    return cache


@pytest.fixture
def tiny_replica(tiny_demo, redis_client):
    """`make(name, **overrides)`: a serving replica of the tiny demo pair (k = 2) with stream and
    metric keys of its own, closed after the test; yields (make, the demo models)."""
    from serving.replica import Replica, ReplicaConfig
    from store.metrics import MetricsConfig
    from store.traces import StreamConfig

    models = build_demo_models(TINY_DEMO, tiny_demo)
    made: list[Replica] = []

    def make(name: str, **overrides) -> Replica:
        settings = dict(
            target=str(models.target), draft=str(models.draft), num_speculative_tokens=2, poll_seconds=0.1,
            stream=StreamConfig(stream=f"t:{name}"),
            metrics=MetricsConfig(prefix=f"t:{name}:metrics", flush_seconds=0.05),
            adaptive_k=False,  # every step drafts, so acceptance is always counted
            engine_process=False,  # tests reach into the engine (test_engine_process serves from a process)
        )  # fmt: skip
        made.append(Replica(ReplicaConfig(**settings | overrides), redis_client))
        return made[-1]

    yield make, models
    for replica in made:
        replica.close()
