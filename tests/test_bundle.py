"""The typed bundle description (BundleMeta) and the weights check: a bundle refuses weights it did not record."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.ml.bundle import WEIGHTS_FILE, BundleError, BundleMeta, load_bundle, read_meta, save_weights, weights_sha256
from core.ml.network import build_network
from core.settings import DEFAULT_TARGET_SENSITIVITY
from tests.conftest import make_bundle

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "default"


def test_the_shipped_bundle_reads_into_typed_fields_and_writes_back_unchanged(tmp_path):
    raw = read_meta(SHIPPED)
    meta = BundleMeta.read(SHIPPED)
    assert meta.weights_sha256 == weights_sha256(SHIPPED / WEIGHTS_FILE) == raw["weights_sha256"]
    assert meta.version == raw["version"] and meta.threshold == raw["threshold"]
    assert meta.calibration["version"] == raw["calibration"]["version"] and meta.ood["file"] == "ood.safetensors"
    assert meta.target_sensitivity == DEFAULT_TARGET_SENSITIVITY and meta.input_size == 224
    assert "metrics" in meta.extra and "version" not in meta.extra  # figures stay untyped, fields are not doubled
    meta.write(tmp_path)
    assert read_meta(tmp_path) == raw  # every key and value kept, none added


def test_a_bundle_description_without_its_essentials_is_refused():
    with pytest.raises(BundleError, match="lacks threshold"):
        BundleMeta.from_dict({"version": "v", "calibration": {"kind": "temperature"}})


@pytest.fixture(scope="module")
def test_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"), seed=4)


def test_the_test_bundle_records_its_weights_and_loads(test_bundle):
    meta = BundleMeta.read(test_bundle)
    assert meta.weights_sha256 == weights_sha256(test_bundle / WEIGHTS_FILE)
    assert load_bundle(test_bundle, device="cpu", mode="fp32").version == meta.version


def test_weights_other_than_the_recorded_ones_are_refused(test_bundle, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(test_bundle, swapped)
    torch.manual_seed(5)
    other = save_weights(build_network("none"), swapped)  # same architecture, other weights
    assert other != BundleMeta.read(swapped).weights_sha256
    with pytest.raises(BundleError, match=r"model\.safetensors does not match bundle\.json.*weights_sha256"):
        load_bundle(swapped, device="cpu", mode="fp32")


def test_a_bundle_from_before_the_weights_hash_loads_unchecked(test_bundle, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(test_bundle, legacy)
    replace(BundleMeta.read(legacy), weights_sha256=None).write(legacy)
    assert "weights_sha256" not in read_meta(legacy)
    assert load_bundle(legacy, device="cpu", mode="fp32").threshold == pytest.approx(0.5)
