"""Model commands: train, score, evaluate, recalibrate, calibration (imports stay lazy)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli._common import cli_actor, load_settings

DEFAULT_DATA = "../shared/data/chest_xray"


def _bundle(model: str | None):
    from core.ml.bundle import BundleError, load_bundle
    from core.ml.precision import PrecisionError
    path = Path(model) if model else load_settings().model_dir
    try:
        bundle = load_bundle(path, mode=load_settings().precision)
    except (BundleError, PrecisionError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model {bundle.version} on {bundle.choice.label} ({bundle.choice.reason})", err=True)
    return bundle


@click.command()
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="Kaggle-layout root (<root>/train/NORMAL…).")
@click.option("--run-dir", default="runs/default", show_default=True, help="Checkpoints, split, logs (resumable).")
@click.option("--bundle", "bundle_dir", default="models/default", show_default=True, help="Where to write the bundle.")
@click.option("--init", default="none", show_default=True, help="none | imagenet | PATH to local weights.")
@click.option("--schedule", default="128:16,224:8", show_default=True, help="Progressive resizing, px:epochs,….")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--patience", default=5, show_default=True,
              help="Early stopping: epochs without a better shift-suite mean ROC-AUC (clean validation breaks ties).")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", default=0, help="Use only N images per split (smoke runs).")
@click.option("--augment", default="robust", show_default=True,
              help="robust (crop,affine,gamma,contrast,blur,noise), basic (the old recipe), none, or a comma list.")
@click.option("--label-smoothing", default=0.05, show_default=True, help="Binary label smoothing (0: off).")
@click.option("--ema", default=0.998, show_default=True, help="EMA decay of the weights kept and shipped (0: off).")
@click.option("--shift-films", default=200, show_default=True,
              help="Validation films (seeded, stratified subset) the per-epoch shift suite runs on; 0: all.")
@click.option("--precision", "train_precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: fp32 on a CPU without native bf16, bf16 where native, bf16/fp16 AMP on CUDA.")
@click.option("--threads", default=0, help="Torch CPU threads (0: torch's default).")
@click.option("--target-sensitivity", default=None, type=float, help="Operating point (default: settings).")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from the run dir's checkpoint.")
def train(data, run_dir, bundle_dir, init, schedule, batch_size, lr, patience, seed, limit, augment, label_smoothing,
          ema, shift_films, train_precision, threads, target_sensitivity, resume):
    """Trains DenseNet-121, calibrates it on validation data and writes a model bundle."""
    from core.ml.network import InitWeightsError
    from training.finalize import finalize
    from training.train import TrainConfig, main as train_main

    run = Path(run_dir)
    if not resume and (run / "checkpoint.pt").exists():
        raise click.ClickException(f"{run} already holds a run; use --resume or another --run-dir")
    try:  # options that cannot work are refused before any data is read
        import torch
        from training import augment as augment_pieces
        from training.train import training_precision
        augment_pieces.parse(augment)
        training_precision(torch.device("cuda" if torch.cuda.is_available() else "cpu"), train_precision)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        train_main(TrainConfig(data=data, out=str(run), init=init, schedule=schedule, batch_size=batch_size, lr=lr,
                               patience=patience, seed=seed, limit=limit, augment=augment,
                               label_smoothing=label_smoothing, ema=ema, shift_films=shift_films,
                               precision=train_precision, threads=threads))
    except InitWeightsError as exc:
        raise click.ClickException(str(exc)) from exc
    meta = finalize(run, Path(data), Path(bundle_dir), target_sensitivity or load_settings().target_sensitivity,
                    ood_per_family=8 if limit else 60)  # a smoke run measures the guard on a small OOD set
    m = meta.extra["metrics"]["report_half"]
    click.echo(f"bundle {meta.version} written to {bundle_dir}: report-half ROC-AUC {m['roc_auc']:.4f}, "
               f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", default=None, help="Bundle folder (default: settings model_dir).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--batch-size", default=16, show_default=True)
def score(paths, model, as_json, batch_size):
    """Scores image files or folders without the service (same code path as the worker)."""
    from training.evaluate import expand_paths, score_files

    bundle = _bundle(model)
    failures = 0
    for fs in score_files(bundle, expand_paths(list(paths)), batch_size=batch_size,
                          max_pixels=load_settings().max_image_pixels):
        if fs.result is None:
            failures += 1
            line = {"path": str(fs.path), "error": fs.error}
            click.echo(json.dumps(line) if as_json else f"{fs.path}\tREFUSED: {fs.error}")
            continue
        r = fs.result
        if r.refusal is not None:  # the OOD guard: no risk is printed for a film the model cannot judge
            failures += 1
            line = {"path": str(fs.path), "refused": r.refusal, "ood_score": r.ood_score, "orientation": r.orientation}
            click.echo(json.dumps(line) if as_json else f"{fs.path}\tREFUSED: {r.refusal}")
            continue
        if as_json:
            click.echo(json.dumps({"path": str(fs.path), "logit": r.logit, "probability": r.probability,
                                   "score": r.score, "threshold": r.threshold, "flagged": r.flagged,
                                   "ood_score": r.ood_score, "orientation": r.orientation}))
        else:
            click.echo(f"{fs.path}\trisk {r.score:.3f}\t{'FLAGGED' if r.flagged else 'not flagged'}"
                       f" (threshold {r.threshold:.3f})")
    sys.exit(1 if failures else 0)


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--model", default=None, help="Bundle folder (default: settings model_dir).")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Report folder (default: runs/eval-SPLIT).")
@click.option("--ood", is_flag=True, help="Evaluate the out-of-distribution guard instead: the bundle's validation "
              "films vs a synthesised OOD set (never downloaded).")
@click.option("--per-family", default=60, show_default=True, help="With --ood: synthetic images per family.")
@click.option("--shift", is_flag=True, help="Run the shift suite instead: ROC-AUC of the bundle's validation films "
              "under each perturbation of training.shift, the mean and the worst.")
@click.option("--limit", default=0, show_default=True, help="With --shift: a seeded, stratified subset of N films.")
@click.option("--seed", default=0, show_default=True, help="With --shift: seed of the perturbations and the subset.")
@click.option("--record", is_flag=True, help="With --shift: write the report into the bundle's report/ folder and "
              "its figures into bundle.json (key shift_suite).")
@click.option("--threads", default=0, help="Torch CPU threads (0: torch's default).")
def evaluate(data, split, model, out, ood, per_family, shift, limit, seed, record, threads):
    """Evaluates the bundle on a labelled Kaggle-layout split: JSON + Markdown report and plots."""
    from training.evaluate import evaluate as run_evaluate

    if shift and ood:
        raise click.UsageError("--shift and --ood are separate reports; give one")
    if record and not shift:
        raise click.UsageError("--record only applies to --shift")
    if threads:
        import torch
        torch.set_num_threads(threads)
    bundle = _bundle(model)
    if shift:
        _evaluate_shift(bundle, data, out, limit, seed, record)
        return
    if ood:
        from training.ood_eval import evaluate_ood
        out = out or Path("runs") / "eval-ood"
        try:
            r = evaluate_ood(bundle, data, out, n_per_family=per_family)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        for name, f in r["families"].items():
            click.echo(f"{name}: refused {f['refused']:.1%} of {f['n']}")
        for name, f in r["false_refusal"].items():
            click.echo(f"validation {name}: false refusals {f['refused']:.2%} of {f['n']}")
        click.echo(f"AUROC of the OOD score {r['auroc_ood_score']:.4f}; report in {out}")
        return
    out = out or Path("runs") / f"eval-{split}"
    result = run_evaluate(bundle, data, split, out)
    m = result["metrics_at_bundle_threshold"]
    click.echo(f"{split}: n={m['n']} ROC-AUC {m['roc_auc']:.4f} PR-AUC {m['pr_auc']:.4f} "
               f"sensitivity {m['sensitivity']:.3f} specificity {m['specificity']:.3f} "
               f"ECE {m['ece_uncalibrated']:.3f}→{m['ece_calibrated']:.3f}; report in {out}")


def _evaluate_shift(bundle, data, out, limit, seed, record):
    """Prints and writes the shift suite's per-perturbation table (and records it in the bundle if asked)."""
    from training.evaluate import evaluate_shift, record_shift_in_bundle
    from training.shift import markdown_table

    out = out or (bundle.directory / "report" if record else Path("runs") / "eval-shift")
    try:
        r = evaluate_shift(bundle, data, out, limit=limit, seed=seed,
                           progress=lambda name, auc: click.echo(f"{name}: ROC-AUC {auc:.4f}", err=True))
        if record:
            record_shift_in_bundle(bundle.directory, r)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(markdown_table(r))
    click.echo(f"shift suite on {r['n']} films: mean ROC-AUC {r['mean_roc_auc']:.4f}, "
               f"worst {r['worst']['roc_auc']:.4f} ({r['worst']['perturbation']}), "
               f"clean {r['clean_roc_auc']:.4f}; report in {out}")


@click.command()
@click.argument("feedback_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Bundle to recalibrate (default: settings model_dir).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the new bundle.")
@click.option("--target-sensitivity", default=None, type=float)
def recalibrate(feedback_csv, model, out, target_sensitivity):
    """Fits a local calibration and threshold from the worklist's feedback.csv into a new bundle."""
    import warnings

    from core.feedback import FeedbackFormatError
    from training.recalibrate import RecalibrationRefused, recalibrate as run_recalibrate

    model_dir = Path(model) if model else load_settings().model_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            meta = run_recalibrate(feedback_csv, model_dir, out, target_sensitivity=target_sensitivity)
        except (RecalibrationRefused, FeedbackFormatError) as exc:
            raise click.ClickException(f"recalibration refused: {exc}") from exc
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    r = meta.extra["recalibration"]
    click.echo(f"new calibration {meta.calibration['version']} ({r['chosen']}, threshold {meta.threshold:.4f}) "
               f"in {out}: cross-validated ECE {r['before']['ece']:.4f} → {r['after_cross_validated']['ece']:.4f}. "
               f"Activate it with: chestaid calibration activate {out}")


@click.group()
def calibration():
    """Lists and activates calibrations (re-scores existing studies from their stored logits)."""


@calibration.command("list")
def calibration_list():
    """Lists known calibrations, oldest first; * marks the active one."""
    from core import calibrations
    from core.db import session_scope

    with session_scope(load_settings().database_url) as session:
        for cal in reversed(calibrations.list_all(session)):
            click.echo(f"{'*' if cal.active else ' '} {cal.version}\t{cal.kind}\tthreshold {cal.threshold:.4f}\t"
                       f"model {cal.model_version}\t{cal.source}")


@calibration.command("activate")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--version", "version", default=None, help="Re-activate an already registered calibration.")
def calibration_activate(bundle, version):
    """Makes a bundle's calibration (or a registered version) active and re-scores existing studies."""
    from core import calibrations
    from core.db import session_scope
    from core.ml.bundle import BundleError, read_meta

    if (bundle is None) == (version is None):
        raise click.UsageError("give either a BUNDLE folder or --version")
    settings = load_settings()
    actor = cli_actor()
    with session_scope(settings.database_url) as session:
        try:
            if bundle is not None:
                meta, running = read_meta(bundle), read_meta(settings.model_dir)
                version = calibrations.register_bundle(session, meta=meta, running_model_version=running["version"],
                                                       source=str(bundle), actor=actor).version
            n = calibrations.activate(session, version=version, actor=actor)
        except (BundleError, calibrations.CalibrationError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"calibration {version} is active; {n} studies re-scored from their stored logits")


@click.command("compare-runs")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--recipe", required=True, help="How RUNS were trained, in words (goes into the report).")
@click.option("--control", "controls", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run of another recipe to show beside them (repeatable).")
@click.option("--control-recipe", default="", help="How the control runs were trained, in words.")
@click.option("--model", default=None, help="The default bundle to compare with (default: settings model_dir).")
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="Kaggle-layout root of the bundle's split.")
@click.option("--out", default=None, help="Folder for variance.json/.md/.png (default: <first run>/compare).")
@click.option("--limit", default=0, show_default=True, help="Quick runs: a seeded, stratified subset of N films.")
@click.option("--record", is_flag=True, help="Also write the comparison into the bundle's report and bundle.json.")
def compare_runs(runs, recipe, controls, control_recipe, model, data, out, limit, record):
    """Scores training runs (seeds of one recipe) against the default bundle: seed variance and the ship rule."""
    from training import variance

    bundle_dir = Path(model or load_settings().model_dir)
    try:
        result = variance.compare(bundle_dir, Path(data), list(runs), list(controls), recipe=recipe,
                                  control=control_recipe or "none", limit=limit)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    variance.write(result, Path(out) if out else runs[0] / "compare")
    if record:
        variance.record(result, bundle_dir)
    click.echo(variance.markdown(result))


MODEL_COMMANDS = [train, score, evaluate, recalibrate, calibration, compare_runs]
