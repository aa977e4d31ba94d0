"""Patient-grouped splits, a two-epoch training run that `chestaid score` can load, evaluation."""
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from training.data import list_split, make_splits, patient_id
from tests.conftest import fixture_images

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


@pytest.fixture(scope="module")
def data_root() -> Path:
    if not (DATA / "train").is_dir():
        if os.environ.get("CHESTAID_REQUIRE_SERVICES") == "1":
            pytest.fail(f"shared data set missing at {DATA}")
        pytest.skip("shared data set not present")
    return DATA


@pytest.mark.parametrize("name,patient", [
    ("person1430_bacteria_3695.jpeg", "person1430"), ("person100_virus_184.jpeg", "person100"),
    ("IM-0115-0001.jpeg", "im-0115"), ("NORMAL2-IM-1427-0001.jpeg", "normal2-im-1427"),
])
def test_patient_id_from_file_names(name, patient):
    assert patient_id(name) == patient


def test_split_is_patient_grouped_stratified_and_reproducible(data_root):
    splits = make_splits(data_root, seed=0)
    patients = {k: {it.patient for it in v} for k, v in splits.items()}
    assert not patients["train"] & patients["calibration"]
    assert not patients["train"] & patients["report"]
    assert not patients["calibration"] & patients["report"]
    n_all = len(list_split(data_root, "train"))
    assert sum(len(v) for v in splits.values()) == n_all
    val_share = (len(splits["calibration"]) + len(splits["report"])) / n_all
    assert 0.12 < val_share < 0.18  # ≈ the reference's 782/5216
    for items in splits.values():  # stratified: ≈ 74% pneumonia everywhere
        assert 0.68 < sum(it.label for it in items) / len(items) < 0.80
    again = make_splits(data_root, seed=0)
    assert [it.path for it in again["report"]] == [it.path for it in splits["report"]]


def test_two_epoch_training_produces_a_bundle_that_score_loads(data_root, tmp_path, monkeypatch):
    import core.ml.precision
    import torch

    # A CPU without native bf16 must train in fp32 (emulated bf16 is ~5x slower), and say so.
    monkeypatch.setattr(core.ml.precision, "native_bf16", lambda: False)
    runner = CliRunner()
    bundle = tmp_path / "bundle"
    threads = torch.get_num_threads()
    result = runner.invoke(main, ["train", "--data", str(data_root), "--run-dir", str(tmp_path / "run"),
                                  "--bundle", str(bundle), "--schedule", "64:1,96:2", "--limit", "24",
                                  "--batch-size", "8", "--shift-films", "16", "--threads", "1"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "training precision: cpu fp32 (CPU without native bf16" in result.output
    meta = json.loads((bundle / "bundle.json").read_text())
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["res"] for r in log] == [64, 96, 96]
    assert meta["training"]["precision_mode"] == "fp32" and {r["precision"] for r in log} == {"fp32"}
    assert meta["training"]["shift_films_n"] == 16 and meta["training"]["ema"] > 0
    for r in log:  # every epoch is scored on the shift suite
        assert 0.0 <= r["shift_mean_roc_auc"] <= 1.0 and r["shift_worst"]["roc_auc"] <= r["shift_mean_roc_auc"]
    # The kept epoch of the last phase is the one training.selection picks from its shift and clean scores.
    from training.selection import EpochScore, best_of
    last = [EpochScore(r["epoch"], r["shift_mean_roc_auc"], r["val_roc_auc"]) for r in log[1:]]
    assert log[-1]["best"] == best_of(last).epoch
    assert meta["training"]["best_epoch"] == log[-1]["best"]  # the bundle names the weights it ships
    kept = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    from core.ml.bundle import load_network
    shipped = load_network(bundle).state_dict()
    assert torch.allclose(kept["classifier.weight"].half().float(), shipped["classifier.weight"])
    assert meta["training"]["epochs_run"] == 3 and meta["architecture"] == "densenet121"
    assert meta["calibration"]["kind"] in ("temperature", "platt", "isotonic")
    assert 0.0 <= meta["threshold"] <= 1.0
    assert set(meta["bf16_check"]) >= {"val_roc_auc_fp32", "val_roc_auc_bf16", "use_bf16"}
    assert (bundle / "report" / "README.md").exists() and (bundle / "report" / "roc.png").exists()
    # finalize fits the OOD guard too: statistics file, threshold, figures per family, report section.
    assert (bundle / meta["ood"]["file"]).is_file() and len(meta["ood"]["evaluation"]["families"]) == 12
    from training.shift import PERTURBATIONS
    assert set(meta["ood"]["evaluation"]["shift_false_refusal"]) == {p.name for p in PERTURBATIONS}
    assert "## Out-of-distribution guard" in (bundle / "report" / "README.md").read_text()

    # The run compared with the bundle made from it: one seed, so sd 0, and no gain, so nothing to ship.
    threads = torch.get_num_threads()
    compared = runner.invoke(main, ["compare-runs", str(tmp_path / "run"), "--recipe", "smoke", "--model", str(bundle),
                                    "--data", str(data_root), "--limit", "8", "--record"])
    torch.set_num_threads(threads)
    assert compared.exit_code == 0, compared.output + repr(compared.exception)
    variance = json.loads((tmp_path / "run" / "compare" / "variance.json").read_text())
    run, default = variance["recipe_runs"][0], variance["default"]
    assert run["shift_mean"] == pytest.approx(default["shift_mean"], abs=1e-9)  # the same weights, scored alike
    assert variance["recipe_spread"]["shift_mean"]["sd"] == 0.0 and variance["decision"]["ship"] is False
    assert variance["films"]["n"] == 8 and (bundle / "report" / "variance.png").is_file()
    readme = (bundle / "report" / "README.md").read_text()
    assert readme.index("## Seed variance and the default") < readme.index("## Out-of-distribution guard")
    assert f"- `run`: {run['trained']}" in readme and run["trained"].startswith("from scratch, ")
    assert json.loads((bundle / "bundle.json").read_text())["seed_variance"]["decision"]["ship"] is False
    other = tmp_path / "other-split"  # a run trained on another split cannot be compared
    other.mkdir()
    for name in ("best.pt", "train_config.json"):
        (other / name).write_bytes((tmp_path / "run" / name).read_bytes())
    (other / "split.csv").write_text((tmp_path / "run" / "split.csv").read_text().replace("calibration,", "train,", 1))
    refused = runner.invoke(main, ["compare-runs", str(other), "--recipe", "x", "--model", str(bundle),
                                   "--data", str(data_root), "--limit", "8"])
    assert refused.exit_code != 0 and "another split than the bundle's" in refused.output

    films = [str(p) for p in fixture_images()[:2]]
    scored = runner.invoke(main, ["score", "--model", str(bundle), "--json", *films])
    assert scored.exit_code == 0, scored.output
    rows = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [r["path"] for r in rows] == films
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and r["flagged"] == (r["score"] >= r["threshold"])
        assert r["threshold"] == pytest.approx(meta["threshold"])


def test_score_prints_the_reason_for_a_refused_file(bundle_dir, tmp_path):
    bad = tmp_path / "note.png"
    bad.write_text("not an image")
    result = CliRunner().invoke(main, ["score", "--model", str(bundle_dir), "--json", str(bad),
                                       str(fixture_images()[0])])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1
    assert rows[0] == {"path": str(bad), "error": "not a PNG, JPEG or DICOM file"}
    assert "score" in rows[1]


def test_evaluate_writes_reports_on_a_labelled_folder(bundle_dir, tmp_path):
    root = tmp_path / "kaggle"
    for p in fixture_images():
        label = "NORMAL" if p.name.startswith("normal") else "PNEUMONIA"
        (root / "test" / label).mkdir(parents=True, exist_ok=True)
        (root / "test" / label / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["evaluate", "--data", str(root), "--split", "test", "--model",
                                       str(bundle_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    m = report["metrics_at_bundle_threshold"]
    assert (m["n"], m["n_pneumonia"], m["n_normal"]) == (6, 3, 3)
    assert m["tp"] + m["fn"] == 3 and m["tn"] + m["fp"] == 3
    assert "not an operating point" in report["threshold_for_target_sensitivity_on_this_data"]["note"]
    for name in ("evaluation.md", "roc.png", "pr.png", "reliability.png"):
        assert (out / name).stat().st_size > 0


def test_init_from_a_local_weights_file_and_clear_errors(data_root, tmp_path):
    import torch
    from safetensors.torch import save_file

    from core.ml.network import InitWeightsError, build_network

    torch.manual_seed(3)
    source = build_network("none")
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    net = build_network(str(path))
    assert torch.equal(net.features.conv0.weight, source.features.conv0.weight)
    with pytest.raises(InitWeightsError, match="not found"):
        build_network(str(tmp_path / "missing.safetensors"))
    result = CliRunner().invoke(main, ["train", "--init", str(tmp_path / "missing.safetensors"), "--limit", "8",
                                       "--run-dir", str(tmp_path / "run"), "--data", str(data_root)])
    assert result.exit_code == 1 and "initial weights file not found" in result.output


def test_training_resumes_with_its_weight_average_and_selection_history(data_root, tmp_path, capsys):
    import torch

    from training.train import TrainConfig, main as train_main

    threads = torch.get_num_threads()
    cfg = dict(data=str(data_root), out=str(tmp_path / "run"), limit=12, batch_size=8, shift_films=8, threads=1,
               precision="fp32")
    try:
        train_main(TrainConfig(schedule="64:1", **cfg))
        first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        train_main(TrainConfig(schedule="64:2", **cfg))
    finally:
        torch.set_num_threads(threads)
    assert "resumed after epoch 1" in capsys.readouterr().out
    second = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    steps = int(first["ema"]["n_averaged"])
    assert steps == 2  # 12 training films in batches of 8: the average counts every optimiser step
    assert int(second["ema"]["n_averaged"]) == 2 * steps  # resumed, not restarted from the raw weights
    assert [h["epoch"] for h in second["state"]["history"]] == [1, 2]
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["precision"] == "fp32" for r in log)


def test_train_refuses_unknown_augmentation_and_unavailable_precision(tmp_path):
    import torch

    bad = CliRunner().invoke(main, ["train", "--augment", "crop,jpeg", "--run-dir", str(tmp_path / "r"),
                                    "--data", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown augmentation 'jpeg'" in bad.output
    if not torch.cuda.is_available():
        fp16 = CliRunner().invoke(main, ["train", "--precision", "fp16", "--run-dir", str(tmp_path / "r"),
                                         "--data", str(tmp_path)])
        assert fp16.exit_code == 2 and "'fp16' is not available on cpu" in fp16.output
    assert not (tmp_path / "r").exists()  # refused before any work


def test_seed_spread_and_the_ship_rule_golden_values():
    from training.variance import decide, spread

    figures = ("clean_report_auc", "clean_val_auc", "shift_mean", "shift_held_out_mean", "shift_worst")
    runs = [{k: v for k in figures} for v in (0.990, 0.994, 0.998)]
    s = spread(runs)
    assert s["shift_mean"]["mean"] == pytest.approx(0.994) and s["shift_mean"]["sd"] == pytest.approx(0.004)
    default = {"shift_mean": 0.990, "clean_report_auc": 0.998}
    gain = {k: {"mean": 0.994, "sd": 0.0} for k in figures}
    assert decide(default, {**gain, "clean_report_auc": {"mean": 0.9955, "sd": 0.0}})["ship"] is True
    assert decide(default, {**gain, "clean_report_auc": {"mean": 0.9945, "sd": 0.0}})["ship"] is False  # clean fell
    short = {**gain, "shift_mean": {"mean": 0.9925, "sd": 0.0}, "clean_report_auc": {"mean": 0.999, "sd": 0.0}}
    verdict = decide(default, short)
    assert verdict["ship"] is False and verdict["shift_gain"] == pytest.approx(0.0025)


def _run_dir(path: Path, schedule: str, shift_means: list[float], patience: int = 2) -> Path:
    path.mkdir()
    (path / "train_config.json").write_text(json.dumps({
        "init": "models/default/model.safetensors", "augment": "robust", "label_smoothing": 0.05, "ema": 0.998,
        "lr": 1e-4, "schedule": schedule, "patience": patience, "seed": 1, "device": "cuda",
        "precision_mode": "bf16"}))
    best = max(range(len(shift_means)), key=lambda i: shift_means[i]) + 1
    (path / "train_log.jsonl").write_text("".join(json.dumps(
        {"epoch": i + 1, "res": 224, "shift_mean_roc_auc": m, "val_roc_auc": 0.99, "best": best}) + "\n"
        for i, m in enumerate(shift_means)))
    return path


def test_a_run_is_described_from_its_own_config_and_log(tmp_path):
    from training.variance import describe_run

    stopped = describe_run(_run_dir(tmp_path / "a", "224:5", [0.995, 0.994, 0.993]))
    assert stopped == ("fine-tuned from models/default/model.safetensors, robust augmentation, label smoothing "
                       "0.05, EMA 0.998, lr 0.0001, schedule 224:5: 3 of 5 epochs (early stop), kept epoch 1; "
                       "trained on cuda in bf16")
    # Still improving when it ended: cut off, not stopped by the rule.
    assert "3 of 5 epochs (interrupted), kept epoch 3;" in describe_run(
        _run_dir(tmp_path / "b", "224:5", [0.990, 0.992, 0.994]))
    assert "2 of 2 epochs, kept epoch 2;" in describe_run(_run_dir(tmp_path / "c", "224:2", [0.990, 0.992]))


def test_a_pack_keeps_each_films_path_and_the_services_resize(data_root, tmp_path):
    import numpy as np

    from core.films.imaging import load_grayscale
    from core.ml.preprocess import resize_gray
    from training.data import read_split_file
    from training.pack import pack

    split = tmp_path / "split.csv"
    items = list_split(data_root, "train")
    chosen = items[:2] + items[-2:]  # both classes
    split.write_text("split,label,relpath,patient\n" + "".join(
        f"{name},{it.label},{it.path.relative_to(data_root).as_posix()},{it.patient}\n"
        for name, it in zip(("train", "train", "calibration", "report"), chosen)))
    done = pack(split, data_root, tmp_path / "pack")
    assert done["films"] == 4 and 0 < done["bytes"] < 4 * 20_000  # 224 px JPEG q85: a few kB each
    packed = read_split_file(tmp_path / "pack" / "split.csv", tmp_path / "pack")
    for original, item in zip(chosen, [it for v in packed.values() for it in v]):
        assert item.path.relative_to(tmp_path / "pack") == original.path.relative_to(data_root)
        film = load_grayscale(item.path)
        assert film.size == (224, 224) and np.array_equal(resize_gray(film), np.asarray(film))  # resizing: identity
        diff = np.abs(np.asarray(film).astype(int) - resize_gray(load_grayscale(original.path)).astype(int))
        assert diff.mean() < 2.0  # JPEG q85 of the service's resize
