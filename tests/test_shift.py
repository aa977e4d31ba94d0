"""The shift suite (training.shift), shift-aware selection (training.selection), augmentation pieces, training
precision by hardware, and `chestaid evaluate --shift` on real films with a small random bundle."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from core.films.imaging import load_grayscale
from core.ml.bundle import weights_sha256
from core.ml.preprocess import normalize, preprocess, resize_gray
from tests.conftest import fixture_images, make_bundle
from training import augment, shift
from training.selection import EpochScore, best_of, is_better, should_stop
from training.train import make_batch, training_precision

RANDOMISED = {"noise_12", "corner_crop_0.85", "translate_0.08", "collimation", "text_markers"}


@pytest.fixture(scope="module")
def film() -> Image.Image:
    return load_grayscale(fixture_images()[3])  # a real pneumonia film, decoded as the service decodes it


def test_suite_covers_the_issue_families_and_holds_two_out():
    assert set(shift.FAMILIES) == {p.family for p in shift.PERTURBATIONS}
    assert {"contrast", "brightness", "blur", "sharpen", "noise", "jpeg", "resample", "geometry", "borders",
            "text"} == set(shift.FAMILIES)
    assert len(shift.HELD_OUT_FAMILIES) >= 2
    assert len({p.name for p in shift.PERTURBATIONS}) == len(shift.PERTURBATIONS)


@pytest.mark.parametrize("p", shift.PERTURBATIONS, ids=lambda p: p.name)
def test_each_perturbation_is_deterministic_and_label_preserving(p, film):
    before = np.array(film)
    a = shift.apply(p, film, seed=7, index=3)
    b = shift.apply(p, film, seed=7, index=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # same seed and film: same output
    assert np.array_equal(np.array(film), before)  # the input film is not modified
    assert a.mode == "L" and np.asarray(a).dtype == np.uint8
    if p.family == "borders" and p.name.startswith("pad"):
        w, h = film.size
        assert a.size == (w + 2 * round(w * 0.12), h + 2 * round(h * 0.12))
    else:
        assert a.size == film.size
    out, orig = np.asarray(a, dtype=np.float64), before.astype(np.float64)
    assert 10 < out.mean() < 245 and out.std() > 10  # still a film, not a blank or saturated frame
    if a.size == film.size:
        assert np.abs(out - orig).mean() > 0.5  # it does change the film
    if p.family != "geometry" and a.size == film.size:  # label-preserving: the chest is where it was
        centre = (slice(34, 190), slice(34, 190))  # inside any border; only acquisition and storage differ there
        r = np.corrcoef(resize_gray(a)[centre].ravel(), resize_gray(film)[centre].ravel())[0, 1]
        assert r > 0.75, r
    if p.name in RANDOMISED:  # the seed (and the film's index) drive the random part
        others = [np.asarray(shift.apply(p, film, seed=s, index=3)) for s in range(8)]
        assert any(not np.array_equal(o, np.asarray(a)) for o in others)
    else:
        assert np.array_equal(np.asarray(shift.apply(p, film, seed=99, index=0)), np.asarray(a))


def test_exact_effects_of_borders_translation_text_and_curves(film):
    orig = np.asarray(film)
    h, w = orig.shape
    pad = np.asarray(shift.apply(shift.BY_NAME["pad_0.12"], film, seed=0, index=0))
    px, py = round(w * 0.12), round(h * 0.12)
    assert np.array_equal(pad[py:py + h, px:px + w], orig) and pad[:py].max() == 0 and pad[:, :px].max() == 0
    col = np.asarray(shift.apply(shift.BY_NAME["collimation"], film, seed=0, index=0))
    assert col[0, 0] >= 215 and col[h // 2, w // 2] == orig[h // 2, w // 2]
    text = np.asarray(shift.apply(shift.BY_NAME["text_markers"], film, seed=0, index=0))
    changed = text != orig
    # white, anti-aliased text: only a few pixels change, each only brighter, the strokes' cores pure white
    assert (text[changed] > orig[changed]).all() and (text == 255).sum() > 30 and changed.mean() < 0.1
    moved = np.asarray(shift.apply(shift.BY_NAME["translate_0.08"], film, seed=0, index=0))
    dx, dy = round(w * 0.08), round(h * 0.08)
    windows = [(moved[dy:, dx:], orig[:h - dy, :w - dx]), (moved[dy:, :w - dx], orig[:h - dy, dx:]),
               (moved[:h - dy, dx:], orig[dy:, :w - dx]), (moved[:h - dy, :w - dx], orig[dy:, dx:])]
    assert sum(np.array_equal(m, o) for m, o in windows) == 1  # a pure shift in one of four directions
    for name in ("gamma_0.6", "gamma_1.6", "contrast_0.6", "brightness_+40"):  # monotone grey-level curves
        out = np.asarray(shift.apply(shift.BY_NAME[name], film, seed=0, index=0)).ravel()
        order = np.argsort(orig.ravel(), kind="stable")
        assert (np.diff(out[order].astype(int)) >= 0).all()


def test_perturbations_refuse_anything_but_an_8bit_grayscale_film(film):
    with pytest.raises(ValueError, match="mode L"):
        shift.apply(shift.PERTURBATIONS[0], film.convert("RGB"), seed=0, index=0)


def test_suite_arrays_are_the_service_resize_of_the_perturbed_films():
    films = [load_grayscale(p) for p in fixture_images()]
    clean = shift.perturbed_arrays(None, films, seed=0)
    assert clean.dtype == np.uint8 and clean.shape == (len(films), 224, 224)
    assert np.array_equal(clean, np.stack([resize_gray(f) for f in films]))
    jpeg = shift.BY_NAME["jpeg_q20"]
    assert np.array_equal(shift.perturbed_arrays(jpeg, films, seed=0)[2],
                          resize_gray(shift.apply(jpeg, films[2], seed=0, index=2)))


def test_seeded_subset_is_fixed_stratified_and_complete_when_asked():
    y = np.array([0] * 30 + [1] * 70)
    a, b = shift.seeded_subset(y, 20, seed=1), shift.seeded_subset(y, 20, seed=1)
    assert np.array_equal(a, b) and len(a) == 20 and (y[a] == 0).sum() == 6
    assert not np.array_equal(a, shift.seeded_subset(y, 20, seed=2))
    assert np.array_equal(shift.seeded_subset(y, 0, seed=1), np.arange(100))


def test_summary_mean_worst_and_held_out_split():
    aucs = {p.name: 0.9 for p in shift.PERTURBATIONS}
    aucs["jpeg_q20"], aucs["gamma_0.6"] = 0.6, 0.8
    s = shift.summarize(0.99, aucs)
    n = len(aucs)
    assert s["mean_roc_auc"] == pytest.approx((0.9 * (n - 2) + 0.6 + 0.8) / n)
    assert s["worst"] == {"perturbation": "jpeg_q20", "roc_auc": 0.6}
    held = [k for k in aucs if shift.BY_NAME[k].held_out]
    assert s["mean_held_out"] == pytest.approx((0.9 * (len(held) - 1) + 0.6) / len(held))
    assert s["per_perturbation"]["gamma_0.6"]["delta_vs_clean"] == pytest.approx(-0.19)


def test_selection_prefers_the_shift_mean_and_breaks_ties_on_clean_auc():
    a = EpochScore(1, shift_mean=0.90, clean_auc=0.999)
    b = EpochScore(2, shift_mean=0.93, clean_auc=0.990)
    assert is_better(b, a)  # better under shift wins although clean validation is lower
    assert not is_better(a, b)
    tie_lower = EpochScore(3, shift_mean=0.9302, clean_auc=0.985)
    tie_higher = EpochScore(4, shift_mean=0.9298, clean_auc=0.995)
    assert not is_better(tie_lower, b)  # same shift mean within the tie: clean AUC decides
    assert is_better(tie_higher, b)
    assert best_of([a, b, tie_lower, tie_higher]) == tie_higher
    assert is_better(a, None)
    with pytest.raises(ValueError):
        best_of([])


def test_early_stopping_counts_epochs_without_a_better_shift_score():
    hist = [EpochScore(1, 0.90, 0.99), EpochScore(2, 0.92, 0.99), EpochScore(3, 0.91, 0.9999),
            EpochScore(4, 0.915, 0.9999)]
    assert best_of(hist).epoch == 2  # clean validation alone would have picked epoch 3
    assert not should_stop(hist, patience=3)
    assert should_stop(hist, patience=2)
    assert should_stop(hist + [EpochScore(5, 0.90, 1.0)], patience=3)
    assert not should_stop(hist + [EpochScore(5, 0.95, 0.9)], patience=1)
    assert not should_stop([], patience=0)


def test_training_batches_are_the_service_preprocessing():
    films = [load_grayscale(p) for p in fixture_images()]
    cache = np.stack([resize_gray(f) for f in films])
    assert torch.equal(make_batch(cache, slice(0, len(films)), 224), preprocess(films))


def test_normalisation_golden_values_and_layout():
    grey = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)  # [1,2,2]
    x = normalize(grey)
    assert x.shape == (1, 3, 2, 2) and x.is_contiguous(memory_format=torch.channels_last)
    # (g/255 − mean)/std per ImageNet channel: black, white and mid-grey, to float32 rounding.
    assert x[0, :, 0, 0].tolist() == pytest.approx([-2.117904, -2.035714, -1.804444], abs=1e-6)
    assert x[0, :, 0, 1].tolist() == pytest.approx([2.248908, 2.428571, 2.64], abs=1e-6)
    assert x[0, 0, 1, 0].item() == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-6)
    # Float input in 0..1 [N,1,H,W] (training's augmented batches) gives the same numbers.
    assert torch.equal(normalize(grey.unsqueeze(1).float().div_(255.0)), x)


def test_augmentation_pieces_are_seeded_bounded_and_switchable():
    assert augment.parse("robust") == augment.ROBUST and augment.parse("none") == ()
    assert not set(augment.ROBUST) & set(shift.HELD_OUT_FAMILIES)  # held-out shifts stay unseen in training
    assert augment.parse("crop, noise") == ("crop", "noise") and augment.build((), 224) is None
    with pytest.raises(ValueError, match="unknown augmentation 'jpeg'"):
        augment.parse("crop,jpeg")
    cache = np.stack([resize_gray(load_grayscale(p)) for p in fixture_images()])
    x = torch.from_numpy(cache[:1]).float().div(255.0)  # [1,224,224]: one film
    for names in (augment.ROBUST, ("gamma",), ("noise",), ("basic",)):
        aug = augment.build(names, 224)
        torch.manual_seed(5)
        outs = [aug(x.clone()) for _ in range(6)]
        torch.manual_seed(5)
        again = [aug(x.clone()) for _ in range(6)]
        assert all(torch.equal(o, g) for o, g in zip(outs, again))
        assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
        assert any(not torch.equal(o, x) for o in outs)
    assert augment.smooth_labels(torch.tensor([0.0, 1.0]), 0.1).tolist() == pytest.approx([0.05, 0.95])


def test_training_precision_follows_the_hardware(monkeypatch):
    import core.ml.precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(core.ml.precision, "native_bf16", lambda: False)
    mode, why = training_precision(cpu)
    assert mode == "fp32" and "without native bf16" in why
    monkeypatch.setattr(core.ml.precision, "native_bf16", lambda: True)
    assert training_precision(cpu)[0] == "bf16"
    assert training_precision(cpu, "fp32") == ("fp32", "forced by --precision")
    with pytest.raises(ValueError, match="not available on cpu"):
        training_precision(cpu, "fp16")


@pytest.fixture()
def shift_data(tmp_path):
    """A Kaggle-layout root with the fixture films and a bundle whose split.csv lists them as validation."""
    root = tmp_path / "kaggle"
    rows = []
    for k, p in enumerate(fixture_images()):
        label = "NORMAL" if p.name.startswith("normal") else "PNEUMONIA"
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "train" / label / p.name)
        rows.append(["calibration" if k % 2 else "report", int(label == "PNEUMONIA"), f"train/{label}/{p.name}",
                     f"{label}/{p.stem}"])
    bundle = make_bundle(tmp_path / "bundle", seed=2)
    with open(bundle / "split.csv", "w", newline="") as f:
        csv.writer(f).writerows([["split", "label", "relpath", "patient"], *rows])
    return root, bundle


def test_evaluate_shift_prints_the_table_and_records_it_in_the_bundle(shift_data, tmp_path):
    root, bundle = shift_data
    sha = weights_sha256(bundle / "model.safetensors")
    threads = torch.get_num_threads()
    result = CliRunner().invoke(main, ["evaluate", "--shift", "--record", "--threads", "1", "--data", str(root),
                                       "--model", str(bundle)])
    torch.set_num_threads(threads)  # one thread keeps the run quick on a shared CPU; later tests get theirs back
    assert result.exit_code == 0, result.output + repr(result.exception)
    for p in shift.PERTURBATIONS:
        assert f"| {p.name} | {p.family} |" in result.stdout
    report = json.loads((bundle / "report" / "shift.json").read_text())
    assert (report["n"], report["n_pneumonia"], report["n_normal"]) == (6, 3, 3)
    aucs = {k: v["roc_auc"] for k, v in report["per_perturbation"].items()}
    assert list(aucs) == [p.name for p in shift.PERTURBATIONS] and all(0 <= v <= 1 for v in aucs.values())
    assert report["mean_roc_auc"] == pytest.approx(np.mean(list(aucs.values())))
    assert report["worst"]["roc_auc"] == min(aucs.values())
    assert f"mean ROC-AUC {report['mean_roc_auc']:.4f}" in result.stdout
    assert "| perturbation |" in (bundle / "report" / "shift.md").read_text()
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["shift_suite"]["mean_roc_auc"] == pytest.approx(report["mean_roc_auc"])
    assert meta["shift_suite"]["per_perturbation"]["jpeg_q20"] == pytest.approx(aucs["jpeg_q20"], abs=1e-6)
    assert weights_sha256(bundle / "model.safetensors") == sha == meta["weights_sha256"]


def test_evaluate_shift_needs_the_bundles_validation_split(tmp_path):
    bundle = make_bundle(tmp_path / "bare")
    result = CliRunner().invoke(main, ["evaluate", "--shift", "--data", str(tmp_path), "--model", str(bundle),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "has no split.csv" in result.output
    both = CliRunner().invoke(main, ["evaluate", "--shift", "--ood", "--data", str(tmp_path), "--model", str(bundle)])
    assert both.exit_code == 2 and "give one" in both.output
