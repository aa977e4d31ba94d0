"""Seed variance of a training recipe, and the rule that decides whether it replaces the shipped default.

Every model is scored the same way as the bundle it would replace: weights rounded to float16 as a bundle stores
them, the bundle's own validation films (a run must have trained on the bundle's split.csv, or its validation
films could have been training films), the training precision of this hardware, and the full shift suite
(training.shift) at seed 0. The figures per run, their mean ± sd over seeds, and the decision are written as
`variance.json` / `variance.md` / `variance.png`, and with `record` into the bundle's report and bundle.json.

The rule, fixed before any candidate was trained (issue "a model that holds up at a hospital it has never
seen"): a recipe replaces the default only if its mean over seeds beats the default's shift-suite mean by
SHIP_SHIFT_MARGIN and loses at most SHIP_MAX_CLEAN_DROP of clean report-half ROC-AUC; the shipped network is
then the seed with the best shift mean, and it must still pass finalize's bf16 check.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core.films.imaging import load_grayscale
from core.ml.bundle import load_network
from core.ml.network import build_network
from training import shift
from training.data import read_split_file
from training.ood_eval import SECTION as OOD_SECTION
from training.report import plt
from training.selection import EpochScore, should_stop
from training.train import cache_images, phases, predict_logits, training_precision

SHIP_SHIFT_MARGIN = 0.003
SHIP_MAX_CLEAN_DROP = 0.003
SECTION = "## Seed variance and the default"
FIGURES = ("clean_report_auc", "clean_val_auc", "shift_mean", "shift_held_out_mean", "shift_worst")


def hardware() -> str:
    """Names the CPU the figures were measured on, with what decides its precision, and the thread count."""
    from core.ml.precision import describe_cpu
    return f"{describe_cpu()}, {torch.get_num_threads()} threads"


class Films:
    """The bundle's validation films, clean and under every perturbation, decoded and perturbed once."""

    def __init__(self, bundle_dir: Path, data_root: Path, seed: int = 0, limit: int = 0):
        self.split_sha = hashlib.sha256((bundle_dir / "split.csv").read_bytes()).hexdigest()
        splits = read_split_file(bundle_dir / "split.csv", data_root)
        cal, rep = splits["calibration"], splits["report"]
        if limit:  # quick runs: a seeded, class-stratified subset of each half
            cal, rep = ([half[i] for i in shift.seeded_subset([it.label for it in half], limit // 2, seed)]
                        for half in (cal, rep))
        items = cal + rep
        self.n_cal = len(cal)
        self.y = np.array([it.label for it in items])
        films = [load_grayscale(it.path) for it in items]
        self.clean = shift.perturbed_arrays(None, films, seed=seed)
        self.perturbed = shift.suite_arrays(films, seed=seed)
        self.seed = seed


def fp16_rounded(net: torch.nn.Module) -> torch.nn.Module:
    """The network as a bundle would ship it: float weights stored as float16, run in float32."""
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.half().float())
    return net.eval()


def score_network(net: torch.nn.Module, films: Films, mode: str) -> dict:
    """Clean validation and report-half ROC-AUC and the shift suite's figures of one network."""
    predict = lambda a: predict_logits(net, a, mode=mode)  # noqa: E731
    z = predict(films.clean)
    suite = shift.summarize_arrays(predict, films.perturbed, films.y, roc_auc_score(films.y, z))
    return {"clean_val_auc": float(roc_auc_score(films.y, z)),
            "clean_report_auc": float(roc_auc_score(films.y[films.n_cal:], z[films.n_cal:])),
            "shift_mean": suite["mean_roc_auc"], "shift_held_out_mean": suite["mean_held_out"],
            "shift_worst": suite["worst"]["roc_auc"], "worst_perturbation": suite["worst"]["perturbation"],
            "per_perturbation": {k: v["roc_auc"] for k, v in suite["per_perturbation"].items()}}


def run_network(run_dir: Path, films: Films) -> torch.nn.Module:
    """Loads a run's selected weights, refusing a run trained on another split than the bundle's."""
    sha = hashlib.sha256((run_dir / "split.csv").read_bytes()).hexdigest()
    if sha != films.split_sha:
        raise ValueError(f"{run_dir} was trained on another split than the bundle's: its validation films are "
                         "not the bundle's, so the two cannot be compared (and some may be its training films)")
    net = build_network("none")
    net.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    return fp16_rounded(net)


def describe_run(run_dir: Path) -> str:
    """How a run was trained, in words, from its own train_config.json and train_log.jsonl.

    A run that ended before its schedule did either stopped early (training.selection's rule holds on its last
    phase) or was interrupted; the two are told apart, since an interrupted run is not the recipe's result.
    """
    cfg = json.loads((run_dir / "train_config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    planned = sum(n for _, n in phases(cfg["schedule"]))
    last = [EpochScore(r["epoch"], r["shift_mean_roc_auc"], r["val_roc_auc"]) for r in log if r["res"] == log[-1]["res"]]
    ended = ("" if len(log) >= planned else " (early stop)" if should_stop(last, patience=cfg["patience"])
             else " (interrupted)")
    start = "from scratch" if cfg["init"] == "none" else f"fine-tuned from {cfg['init']}"
    return (f"{start}, {cfg['augment']} augmentation, label smoothing {cfg['label_smoothing']}, EMA {cfg['ema']}, "
            f"lr {cfg['lr']}, schedule {cfg['schedule']}: {len(log)} of {planned} epochs{ended}, kept epoch "
            f"{log[-1]['best']}; trained on {cfg.get('device', '?')} in {cfg.get('precision_mode', '?')}")


def spread(rows: list[dict]) -> dict:
    """Mean and sample standard deviation of each figure over runs."""
    out = {}
    for key in FIGURES:
        v = np.array([r[key] for r in rows], dtype=float)
        out[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out


def decide(default: dict, recipe: dict) -> dict:
    """The shipping rule (module docstring) on the default's figures and the recipe's mean over seeds."""
    gain = recipe["shift_mean"]["mean"] - default["shift_mean"]
    drop = default["clean_report_auc"] - recipe["clean_report_auc"]["mean"]
    ship = gain >= SHIP_SHIFT_MARGIN and drop <= SHIP_MAX_CLEAN_DROP
    return {"ship": bool(ship), "shift_gain": float(gain), "clean_report_drop": float(drop),
            "margin": SHIP_SHIFT_MARGIN, "max_clean_drop": SHIP_MAX_CLEAN_DROP,
            "reason": (f"shift-suite mean {'+' if gain >= 0 else ''}{gain:.4f} against the default (needs "
                       f"≥ +{SHIP_SHIFT_MARGIN}); clean report-half ROC-AUC {-drop:+.4f} (may fall by at most "
                       f"{SHIP_MAX_CLEAN_DROP})")}


def compare(bundle_dir: Path, data_root: Path, recipe_runs: list[Path], control_runs: list[Path], *,
            recipe: str, control: str, limit: int = 0) -> dict:
    """Scores the default and every run; returns the figures, the spread over the recipe's seeds and the decision."""
    mode, _ = training_precision(torch.device("cpu"))
    films = Films(bundle_dir, data_root, limit=limit)
    default = score_network(load_network(bundle_dir).eval(), films, mode)

    def runs(dirs):
        out = []
        for d in dirs:
            cfg = json.loads((d / "train_config.json").read_text())
            net = run_network(d, films)  # refuses a run of another split first
            out.append({"run": d.name, "seed": cfg["seed"], "trained": describe_run(d),
                        **score_network(net, films, mode)})
        return out

    rec, ctl = runs(recipe_runs), runs(control_runs)
    return {"bundle": json.loads((bundle_dir / "bundle.json").read_text())["version"], "precision": mode,
            "hardware": hardware(), "films": {"n": int(len(films.y)), "n_pneumonia": int(films.y.sum()),
                                            "report_half": int(len(films.y) - films.n_cal), "seed": films.seed},
            "recipe": recipe, "control": control, "default": default, "recipe_runs": rec, "control_runs": ctl,
            "recipe_spread": spread(rec) if rec else None, "decision": decide(default, spread(rec)) if rec else None}


def markdown(result: dict) -> str:
    """The seed-variance table, the per-run rows and the decision, as the report section."""
    def row(name, r):
        return (f"| {name} | {r['clean_report_auc']:.4f} | {r['clean_val_auc']:.4f} | {r['shift_mean']:.4f} | "
                f"{r['shift_held_out_mean']:.4f} | {r['shift_worst']:.4f} |")
    head = ["| model | clean report-half AUC | clean validation AUC | shift mean | shift held-out mean | "
            "shift worst |", "|---|---|---|---|---|---|", row(f"default `{result['bundle']}`", result["default"])]
    head += [row(f"recipe, seed {r['seed']} (`{r['run']}`)", r) for r in result["recipe_runs"]]
    s = result["recipe_spread"]
    if s:
        head.append("| **recipe, mean ± sd** | " + " | ".join(
            f"**{s[k]['mean']:.4f} ± {s[k]['sd']:.4f}**" for k in FIGURES) + " |")
    head += [row(f"control, seed {r['seed']} (`{r['run']}`)", r) for r in result["control_runs"]]
    trained = [f"- `{r['run']}`: {r['trained']}" for r in result["recipe_runs"] + result["control_runs"]
               if r.get("trained")]
    d = result["decision"]
    verdict = ("**Shipped**: the recipe met the rule." if d and d["ship"] else
               "**Not shipped**: the default stays, because the recipe did not meet the rule.") if d else ""
    return "\n".join([
        SECTION, "",
        f"Recipe: {result['recipe']}. Control: {result['control']}.",
        f"All models scored alike on the default's {result['films']['n']} validation films "
        f"({result['films']['report_half']} in the report half), {result['precision']}, weights rounded to "
        f"float16 as shipped, shift suite seed {result['films']['seed']}; {result['hardware']}.", "",
        *head, "", *trained, *([""] if trained else []),
        f"Rule, fixed before training: ship only if the recipe's mean shift-suite ROC-AUC beats the default's by "
        f"≥ {SHIP_SHIFT_MARGIN} and its clean report-half ROC-AUC is at most {SHIP_MAX_CLEAN_DROP} lower.",
        f"Result: {d['reason']}. {verdict}" if d else "", "",
        "![Per-perturbation ROC-AUC](variance.png)", ""])


def plot(result: dict, path: Path) -> None:
    """Per-perturbation ROC-AUC: the default, the recipe's mean ± sd over seeds, and the control."""
    names = list(result["default"]["per_perturbation"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(12, 4.4))
    ax.plot(x, [result["default"]["per_perturbation"][n] for n in names], "ko", label="default")
    if result["recipe_runs"]:
        v = np.array([[r["per_perturbation"][n] for n in names] for r in result["recipe_runs"]])
        ax.errorbar(x + 0.15, v.mean(0), yerr=v.std(0, ddof=1) if len(v) > 1 else None, fmt="s", color="tab:blue",
                    capsize=3, label=f"recipe, mean ± sd of {len(v)} seeds")
    markers = "^v<>Dph*"
    for i, r in enumerate(result["control_runs"]):  # each control run its own marker: they may be other recipes
        ax.plot(x - 0.15, [r["per_perturbation"][n] for n in names], markers[i % len(markers)], ms=5,
                color=plt.cm.tab10(i + 1), label=f"control {r['run']} (seed {r['seed']})")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="ROC-AUC", title="Shift suite on the validation films")
    ax.grid(axis="y", lw=0.4)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> None:
    """Writes variance.json, variance.md and variance.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "variance.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "variance.md").write_text(markdown(result))
    plot(result, out_dir / "variance.png")


def record(result: dict, bundle_dir: Path) -> None:
    """Puts the comparison into the shipped bundle: report/variance.*, a README section and bundle.json."""
    report = bundle_dir / "report"
    write(result, report)
    readme = report / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if SECTION in text:  # replace the earlier section, up to the next one
        before, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = before + (rest[nxt + 1:] if nxt >= 0 else "")
    # Before the OOD section: training.ood_eval.replace_section rewrites everything after that heading.
    head, ood, tail = text.partition(OOD_SECTION)
    readme.write_text(head.rstrip() + "\n\n" + markdown(result) + ("\n" + ood + tail if ood else ""))
    meta_file = bundle_dir / "bundle.json"
    meta = json.loads(meta_file.read_text())
    meta["seed_variance"] = {k: result[k] for k in ("recipe", "control", "precision", "hardware", "films",
                                                    "recipe_spread", "decision")}
    keep = ("run", "seed", "trained", *FIGURES)
    meta["seed_variance"]["runs"] = [{k: r[k] for k in keep if k in r} for r in result["recipe_runs"]]
    meta["seed_variance"]["control_runs"] = [{k: r[k] for k in keep if k in r} for r in result["control_runs"]]
    meta["seed_variance"]["report"] = "report/variance.md"
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
