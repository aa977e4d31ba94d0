"""Precision chosen by measurement: forced modes are honoured, bf16 only where the bundle allows it."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from core.films.imaging import load_grayscale
from core.ml import precision
from core.ml.bundle import BundleMeta, load_bundle
from core.ml.preprocess import preprocess
from core.ml.scoring import score_images
from tests.conftest import fixture_images


@pytest.fixture
def no_bf16_bundle(bundle_dir, tmp_path):
    """The test bundle with a recorded check that forbids bf16 (its accuracy dropped too much)."""
    out = tmp_path / "nobf16"
    shutil.copytree(bundle_dir, out)
    replace(BundleMeta.read(out), bf16_check={"use_bf16": False}).write(out)
    return out


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    precision._PROBE_CACHE.clear()
    yield
    precision._PROBE_CACHE.clear()


def test_forced_modes_are_honoured(bundle_dir):
    for mode in ("fp32", "bf16"):
        bundle = load_bundle(bundle_dir, device="cpu", mode=mode)
        assert bundle.mode == mode and bundle.choice.reason.startswith("forced")
        assert bundle.use_bf16 == (mode == "bf16")


def test_bf16_is_never_used_when_the_bundle_check_forbids_it(no_bf16_bundle, monkeypatch):
    # Even on a machine where bf16 would be the faster mode, the accuracy check wins.
    monkeypatch.setattr(precision, "_probe", lambda net, dev, arms, size, rounds: {
        (m, b): 1000.0 if m == "bf16" else 1.0 for m, b in arms})
    bundle = load_bundle(no_bf16_bundle, device="cpu")
    assert bundle.mode == "fp32" and bundle.choice.reason == "the only mode allowed"
    with pytest.raises(precision.PrecisionError, match="accuracy check"):
        load_bundle(no_bf16_bundle, device="cpu", mode="bf16")


def test_cuda_modes_are_refused_on_the_cpu(bundle_dir):
    with pytest.raises(precision.PrecisionError, match="cpu runs fp32, bf16"):
        load_bundle(bundle_dir, device="cpu", mode="fp16")


@pytest.mark.parametrize("fast", ["fp32", "bf16"])
def test_auto_keeps_the_mode_the_probe_measured_fastest(bundle_dir, monkeypatch, fast):
    # An AVX2-only CPU emulates bf16 (slower); one with AVX512-BF16/AMX runs it natively (faster).
    timed = []

    def fake_probe(net, dev, arms, size, rounds):
        timed.extend(m for m, _ in arms)
        return {(m, b): 50.0 if m == fast else 10.0 for m, b in arms}
    monkeypatch.setattr(precision, "_probe", fake_probe)
    bundle = load_bundle(bundle_dir, device="cpu")
    assert bundle.mode == fast
    assert bundle.choice.images_per_s == {fast: 50.0, ({"fp32", "bf16"} - {fast}).pop(): 10.0}
    assert bundle.choice.label == f"cpu {fast} 50 img/s"
    # The probe is about the hardware: a second load in this process does not time again.
    load_bundle(bundle_dir, device="cpu")
    assert sorted(timed) == ["bf16", "fp32"]


def test_a_near_tie_keeps_fp32():
    # Within the margin, a faster-looking bf16 is noise: fp32, the reference, stays.
    assert precision._pick({"fp32": 10.0, "bf16": 10.5}) == "fp32"
    assert precision._pick({"fp32": 10.0, "bf16": 12.0}) == "bf16"
    assert precision._pick({"fp32": 10.0, "tf32": 10.9, "fp16": 30.0}) == "fp16"


def test_a_busy_neighbour_during_part_of_the_probe_does_not_flip_the_choice(bundle_dir, monkeypatch):
    # An AVX2 CPU: fp32 takes 0.1 s a pass, emulated bf16 0.5 s. Another process hogs the cores for the first
    # half of the timed passes, making every pass then 15x slower. Timed one mode after the other, all of
    # fp32's passes fell in the busy half and emulated bf16 won; interleaved rounds keep fp32.
    true_seconds = {"fp32": 0.1, "bf16": 0.5}
    calls = []
    total = 2 * 3  # two modes, three rounds

    def fake_pass(net, dev, mode, x):
        calls.append(mode)
        busy = len(calls) <= total // 2
        return true_seconds[mode] * (15 if busy else 1)
    monkeypatch.setattr(precision, "_timed_pass", fake_pass)
    monkeypatch.setattr(precision, "run", lambda net, x, dev, mode: None)  # warm-up passes: not timed
    bundle = load_bundle(bundle_dir, device="cpu")
    assert len(calls) == total and calls[:2] == ["fp32", "bf16"]  # interleaved
    assert bundle.mode == "fp32"
    assert bundle.choice.images_per_s["fp32"] == pytest.approx(precision.PROBE_BATCH["cpu"] / 0.1)


def test_the_real_probe_measures_both_cpu_modes(bundle_dir):
    bundle = load_bundle(bundle_dir, device="cpu")
    assert set(bundle.choice.images_per_s) == {"fp32", "bf16"}
    assert all(v > 0 for v in bundle.choice.images_per_s.values())
    assert bundle.mode == max(bundle.choice.images_per_s, key=bundle.choice.images_per_s.get)


def test_modes_agree_on_scores(bundle_dir):
    films = [load_grayscale(f) for f in fixture_images()[:3]]
    fp32 = score_images(load_bundle(bundle_dir, device="cpu", mode="fp32"), films)
    bf16 = score_images(load_bundle(bundle_dir, device="cpu", mode="bf16"), films)
    for a, b in zip(fp32, bf16):
        assert abs(a.probability - b.probability) < 0.02
        assert a.cam.shape == b.cam.shape == (7, 7)
    assert torch.get_default_dtype() == torch.float32


def test_a_cpu_is_named_by_model_family_and_the_flags_that_decide_precision():
    from core.ml.precision import describe_cpu

    first = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
             "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx_vnni sha_ni\n")
    second = first.replace("processor\t: 0", "processor\t: 1").replace("AMD EPYC", "another name")
    named = describe_cpu(first + "\n" + second)
    assert named.startswith("AMD EPYC (family 26 model 2), flags avx2 avx512f avx512_bf16 avx_vnni, torch capability ")
    assert describe_cpu("model name\t: Some CPU\nflags\t: sse\n").startswith(
        "Some CPU, flags none of avx2/avx512f/avx512_bf16/amx_bf16/avx512_fp16/avx_vnni, ")


def test_gpu_passes_are_padded_to_a_power_of_two_and_cpu_passes_are_not():
    assert [precision.padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 200, 256)] == [1, 2, 4, 8, 8, 16, 256, 256]
    assert precision.pads_passes(torch.device("cuda")) and not precision.pads_passes(torch.device("cpu"))


def _seen_batches(net) -> list[int]:
    seen: list[int] = []
    net.features.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    return seen


def test_a_padded_pass_returns_only_the_films_with_their_unpadded_values(bundle_dir, monkeypatch):
    # cuDNN times its algorithms for each new batch size (seconds a pass on an H100), so a GPU pass runs at a
    # power of two. The padding is checked on the CPU: the blank images must not change the films' results.
    bundle = load_bundle(bundle_dir, device="cpu", mode="fp32")
    x = preprocess([load_grayscale(p) for p in fixture_images()[:5]], 224)
    plain = bundle.forward(x)
    seen = _seen_batches(bundle.net)
    monkeypatch.setattr(precision, "pads_passes", lambda device: True)
    padded = bundle.forward(x)
    assert seen == [8]
    for a, b in zip(plain, padded):
        assert b.shape == a.shape and a.shape[0] == 5
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_warm_up_runs_every_padded_size_up_to_the_burst_batch_once_and_nothing_on_a_cpu(bundle_dir, monkeypatch):
    bundle = load_bundle(bundle_dir, device="cpu", mode="fp32")
    seen = _seen_batches(bundle.net)
    assert precision.warm_up(bundle.net, bundle.device, "fp32", 6) == [] and seen == []
    monkeypatch.setattr(precision, "pads_passes", lambda device: True)
    assert precision.warm_up(bundle.net, bundle.device, "fp32", 6) == [1, 2, 4, 8]
    assert seen == [1, 2, 4, 8]


def test_a_worker_warms_up_its_padded_sizes_once_its_burst_batch_is_known(bundle_dir, tmp_path, monkeypatch):
    from core.settings import Settings
    from worker import tasks
    monkeypatch.setattr(precision, "pads_passes", lambda device: True)
    ran: list[int] = []
    real_run = precision.run
    monkeypatch.setattr(precision, "run", lambda net, x, device, mode: ran.append(x.shape[0])
                        or real_run(net, x, device, mode))
    settings = Settings(data_dir=tmp_path / "var", model_dir=bundle_dir, precision="fp32", score_batch_size=3)
    model = tasks._Model()
    assert model._load(settings) is not None and model.batch_size == 3
    assert ran == [1, 2, 4]
