"""The training time budget: the learning-rate shape, the stop rule, and a real budgeted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr.train.trainer import FINAL_LR, WARMUP_START, BudgetClock, TrainConfig, lr_at, stop_reason


def test_lr_at_matches_keras_cosine_decay_with_warmup() -> None:
    import keras

    steps, epochs, peak = 10, 4, 2e-3
    keras_schedule = keras.optimizers.schedules.CosineDecay(
        peak * WARMUP_START, decay_steps=steps * epochs - steps, alpha=FINAL_LR, warmup_target=peak, warmup_steps=steps,
    )
    for step in range(steps * epochs + 1):
        ours = lr_at(step / (steps * epochs), peak=peak, warmup=1 / epochs)
        assert ours == pytest.approx(float(keras_schedule(step)), rel=1e-5), step


def test_lr_at_ends_and_clamps() -> None:
    assert lr_at(0.0, peak=1.0, warmup=0.25) == pytest.approx(WARMUP_START)
    assert lr_at(0.25, peak=1.0, warmup=0.25) == pytest.approx(1.0)
    assert lr_at(1.0, peak=1.0, warmup=0.25) == pytest.approx(FINAL_LR)
    assert lr_at(7.0, peak=1.0, warmup=0.25) == pytest.approx(FINAL_LR)
    after = [lr_at(p, peak=1.0, warmup=0.25) for p in np.linspace(0.25, 1.0, 20)]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))


def _clock(**kw: object) -> BudgetClock:
    args: dict = {"t0": 1000.0, "budget_s": 100.0, "total_steps": 1000, "batch_size": 10, "n_eval_images": 30}
    args.update(kw)
    return BudgetClock(**args)


def test_budget_clock_keeps_room_for_the_last_validation() -> None:
    clock = _clock()
    clock.step_seconds = [5.0, 1.0, 1.0, 1.0]  # first step built the graph
    clock.steps_done = 4
    # estimated evaluation: 30 images * 1 s / 10 per step / 3 + 5 s (graph) = 6 s; margin 2 s; next step 1 s
    assert clock.reserve_s() == pytest.approx(8.0)
    assert clock.may_continue(1000.0 + 91.0)
    assert not clock.may_continue(1000.0 + 91.5)
    clock.eval_seconds = 20.0  # measured after an epoch: 1.2 x 20 s + 2 s margin
    assert clock.reserve_s() == pytest.approx(26.0)
    assert clock.may_continue(1000.0 + 73.0)
    assert not clock.may_continue(1000.0 + 73.5)


def test_budget_clock_progress_is_the_further_of_steps_and_time() -> None:
    clock = _clock()
    clock.step_seconds = [1.0, 1.0]
    clock.eval_seconds = 0.0
    clock.steps_done = 500
    assert clock.progress(1000.0 + 10.0) == pytest.approx(0.5)  # steps ahead of time
    assert clock.progress(1000.0 + 73.5) == pytest.approx(0.75)  # time ahead: 73.5 of 98 s available
    assert clock.progress(1000.0 + 500.0) == 1.0


def test_stop_reason() -> None:
    # the last epoch ended with no time for another step: every step still ran, so the epochs ended it
    assert stop_reason(417, 417, budget_stopped=True) == "epochs"
    assert stop_reason(300, 417, budget_stopped=True) == "time_budget"
    assert stop_reason(278, 417, budget_stopped=False) == "early_stopping"


def test_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(data_dir=tmp_path, out_dir=tmp_path, time_budget_s=0)
    with pytest.raises(ValueError, match="budget_s > 0"):
        _clock(budget_s=-1.0)


@pytest.mark.slow
def test_a_budgeted_run_stops_within_its_budget(train_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    budget_min = 0.75
    r = subprocess.run(
        [sys.executable, "-m", "cxr.cli", "train", "--data", str(train_data), "--out", str(run), "--epochs", "200",
         "--limit-per-class", "40", "--batch-size", "16", "--val-fraction", "0.25", "--patience", "200",
         "--time-budget", str(budget_min), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    hist = json.loads((run / "history.json").read_text())
    assert hist["stopped_by"] == "time_budget"
    assert hist["time_budget_s"] == budget_min * 60
    assert hist["seconds"] <= budget_min * 60, hist["seconds"]
    assert 0 < hist["steps"] < 200 * hist["steps_per_epoch"]
    assert len(hist["history"]["val_auc"]) >= 1 and (run / "model.keras").exists()


def test_epochs_done_from_old_and_new_histories() -> None:
    from cxr.train.trainer import epochs_done

    assert epochs_done({"epochs_done": 2.5, "history": {"loss": [1, 2, 3]}}) == 2.5  # a budget cut the third
    assert epochs_done({"history": {"loss": [1.0] * 14}}) == 14.0  # runs from before the field
    assert epochs_done({}) is None
