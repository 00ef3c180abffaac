import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_cfg():
    from fedtune.presets import resolve

    return resolve("tiny")


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need the identity a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@pytest.fixture(scope="session", autouse=True)
def one_ray_per_session():
    """One Ray for every in-process simulation of the session. Flower's Ray backend starts Ray
    when none is running and shuts it down after each ``run_simulation`` (about 5 s of CPU per
    run, ~25 runs in the suite); here its ``terminate`` ends the run's actors only, so every run
    still gets fresh actors (fresh worker processes, nothing cached), and Ray stops at the end."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend.terminate

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    raybackend.RayBackend.terminate = terminate
    try:
        yield
    finally:
        raybackend.RayBackend.terminate = original
        import ray

        if ray.is_initialized():
            ray.shutdown()
