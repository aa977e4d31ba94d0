"""Shared fixtures: real fixture films, a small model bundle, service URLs that must not silently skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from core.ml.bundle import BundleMeta, save_weights
from core.ml.network import build_network
from core.settings import DEFAULT_TARGET_SENSITIVITY

pytest_plugins = ["tests.migrated_db"]  # db_url / pg_template: a migrated database per test, both backends

FIXTURES = Path(__file__).parent / "fixtures"
POSTGRES_URL = os.environ.get("CHESTAID_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHESTAID_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("CHESTAID_REQUIRE_SERVICES") == "1"


def fixture_images() -> list[Path]:
    """Returns the committed real films, normal first."""
    return sorted(FIXTURES.glob("*.jpeg"))


def make_bundle(directory: Path, seed: int = 0, threshold: float = 0.5, temperature: float = 1.0) -> Path:
    """Writes a randomly initialised but complete model bundle (tests only; not a trained model)."""
    torch.manual_seed(seed)
    net = build_network("none")
    sha = save_weights(net, directory)
    BundleMeta(version=f"test-{sha[:8]}", input_size=224, channels=3,
               normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, weights_sha256=sha,
               calibration={"kind": "temperature", "params": {"temperature": temperature},
                            "version": f"temperature-test{seed}"},
               threshold=threshold, target_sensitivity=DEFAULT_TARGET_SENSITIVITY,
               bf16_check={"use_bf16": True}).write(directory)
    return directory


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def service_available(check) -> bool:
    """Runs a connectivity check; when services are required (CI), a failure fails instead of skipping."""
    try:
        check()
        return True
    except Exception as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"required service unavailable: {exc}")
        return False


@pytest.fixture(scope="session")
def postgres_url() -> str:
    from sqlalchemy import create_engine, text

    def check():
        with create_engine(POSTGRES_URL).connect() as c:
            c.execute(text("SELECT 1"))
    if not service_available(check):
        pytest.skip("PostgreSQL not reachable")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    if not service_available(lambda: redis.Redis.from_url(REDIS_URL).ping()):
        pytest.skip("Redis not reachable")
    return REDIS_URL
