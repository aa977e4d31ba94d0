"""training.finalize: the bundle names the epoch the training kept, and its report shows the shift-suite columns."""
from __future__ import annotations

from training.finalize import best_epoch, epoch_table


def row(epoch: int, auc: float, best: int | None, **extra) -> dict:
    r = {"epoch": epoch, "res": 224, "loss": 0.1, "val_roc_auc": auc, "val_pr_auc": 0.99, "lr": 1e-3, "seconds": 10.0}
    if best is not None:
        r["best"] = best
    return {**r, **extra}


def shifted(epoch: int, auc: float, best: int, mean: float) -> dict:
    return row(epoch, auc, best, shift_mean_roc_auc=mean, shift_held_out_mean=mean + 0.001,
               shift_worst={"perturbation": "zoom_0.8", "roc_auc": mean - 0.01})


def test_best_epoch_is_the_one_the_selection_rule_kept_not_the_highest_clean_auc():
    # Epoch 2 has the best clean ROC-AUC, but training kept epoch 3 (better shift-suite mean): best.pt is epoch 3.
    log = [shifted(1, 0.990, 1, 0.970), shifted(2, 0.999, 1, 0.960), shifted(3, 0.995, 3, 0.985),
           shifted(4, 0.996, 3, 0.980)]
    assert best_epoch(log) == 3


def test_best_epoch_of_a_log_without_the_best_key_falls_back_to_clean_auc_at_the_final_resolution():
    log = [row(1, 0.999, None, res=128), row(2, 0.990, None), row(3, 0.995, None)]
    assert best_epoch(log) == 3


def test_epoch_table_has_shift_columns_only_when_the_log_carries_them():
    table = epoch_table([shifted(1, 0.990, 1, 0.970), shifted(2, 0.999, 1, 0.960)])
    header, rule, first, second = table.splitlines()
    assert "shift mean" in header and "shift worst" in header and "shift held-out mean" in header
    assert header.count("|") == rule.count("|") == first.count("|")
    assert "| 0.9700 | 0.9600 (zoom_0.8) | 0.9710 |" in first and second.endswith("| 1 |")
    plain = epoch_table([row(1, 0.99, 1)])
    assert "shift" not in plain and plain.splitlines()[2].startswith("| 1 | 224 | 0.1000 | 0.9900 | 0.9900 |")
