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


class _FakeOptimizer:
    def __init__(self) -> None:
        self.assigned: list[float] = []
        self.learning_rate = self

    def assign(self, value: float) -> None:
        self.assigned.append(float(value))


class _FakeModel:
    """What TimeBudget touches of a Keras model: the optimizer's learning rate and ``stop_training``."""

    def __init__(self) -> None:
        self.optimizer = _FakeOptimizer()
        self.stop_training = False


def _run_on_a_fake_clock(clock: BudgetClock, *, steps_per_epoch: int, epochs: int, step_s, eval_s) -> dict:  # type: ignore[no-untyped-def]
    """Drive the trainer's own :class:`cxr.train.callbacks.TimeBudget` callback as Keras's fit loop calls it, on a
    fake time source: batch begin, the step, batch end (a stop requested there ends the epoch's steps), then the
    epoch's validation and checkpoint (which Keras runs even after a stop mid-epoch) and epoch end. ``step_s(i)``
    and ``eval_s(epoch)`` give the durations. The learning-rate schedule is the identity, so the rates the callback
    assigns are the progress it read. Returns what the run did."""
    from cxr.train.callbacks import TimeBudget

    t = [clock.t0]
    budget = TimeBudget(clock, lambda progress: progress, now=lambda: t[0])
    model = _FakeModel()
    budget.set_model(model)
    epoch = 0
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            budget.on_train_batch_begin(step)
            t[0] += step_s(clock.steps_done)
            budget.on_train_batch_end(step)
            if model.stop_training:
                break
        t[0] += eval_s(epoch)
        budget.on_epoch_end(epoch)
        if model.stop_training:
            break
    return {"end": t[0], "stopped": budget.stopped, "progress": model.optimizer.assigned, "epochs": epoch + 1,
            "stopped_by": stop_reason(clock.steps_done, clock.total_steps, budget_stopped=budget.stopped)}


@pytest.mark.parametrize(("first_step_s", "step_s", "eval_s"), [
    (5.0, 1.0, 3.0),    # a graph build on the first step, steady steps, validation near its estimate
    (1.0, 1.0, 0.2),    # validation far cheaper than estimated
    (20.0, 0.5, 8.0),   # a slow build, a long validation per epoch
])
def test_a_budgeted_run_stops_in_time_on_a_fake_clock(first_step_s: float, step_s: float, eval_s: float) -> None:
    """The budget's promise without a wall clock: with steps and validations as long as the clock has seen, the
    run (last validation included) ends inside its budget, leaving the writing margin, and the budget ended it."""
    from cxr.train.trainer import BUDGET_MARGIN

    clock = _clock(budget_s=300.0, total_steps=200 * 25, batch_size=16, n_eval_images=40)
    run = _run_on_a_fake_clock(clock, steps_per_epoch=25, epochs=200,
                               step_s=lambda i: first_step_s if i == 0 else step_s, eval_s=lambda e: eval_s)
    assert run["stopped"] and run["stopped_by"] == "time_budget"
    assert 25 < clock.steps_done < clock.total_steps  # more than an epoch, far from every step
    assert run["end"] - clock.t0 <= clock.budget_s * (1 - BUDGET_MARGIN) + 1e-9  # room left to write the run
    # and the budget was used: stopping earlier would have left at least one more step's time unused
    assert run["end"] - clock.t0 + step_s + 1.2 * eval_s + BUDGET_MARGIN * clock.budget_s > clock.budget_s
    # the learning-rate schedule ran through: progress never goes back (from the third step: the first step's time,
    # a graph build, stands for the typical step until a second is measured, so the estimate of the time available
    # can grow once and the time share dip; the trainer's own arithmetic) and nearly reached its end
    assert run["progress"][2:] == sorted(run["progress"][2:]) and run["progress"][0] == 0.0
    assert run["progress"][-1] > 0.9


def test_a_budget_that_fits_every_step_lets_the_epochs_end_the_run() -> None:
    clock = _clock(budget_s=1000.0, total_steps=3 * 10, batch_size=16, n_eval_images=40)
    run = _run_on_a_fake_clock(clock, steps_per_epoch=10, epochs=3, step_s=lambda i: 1.0, eval_s=lambda e: 2.0)
    assert not run["stopped"] and run["stopped_by"] == "epochs" and clock.steps_done == 30 and run["epochs"] == 3
    assert run["progress"][-1] == pytest.approx(29 / 30)  # steps, not time, were ahead


def test_a_budget_stop_mid_epoch_comes_before_the_step_that_would_not_fit() -> None:
    """Steps slow down mid-run (another job took the cores): the clock follows the typical step time, so the
    run stops early enough that the epoch's validation still fits."""
    clock = _clock(budget_s=120.0, total_steps=100 * 20, batch_size=16, n_eval_images=32)
    run = _run_on_a_fake_clock(clock, steps_per_epoch=20, epochs=100, step_s=lambda i: 0.5 if i < 60 else 1.5,
                               eval_s=lambda e: 1.0)
    assert run["stopped_by"] == "time_budget" and clock.steps_done % 20 != 0  # cut inside an epoch
    assert run["end"] - clock.t0 <= clock.budget_s


@pytest.mark.slow
def test_a_real_budgeted_run_is_stopped_by_its_budget(train_data: Path, tmp_path: Path) -> None:
    """One real run: the budget, not the epochs or early stopping, ended it, and it left a whole run directory.
    How many seconds it took depends on the machine's load; the arithmetic of the stop is tested above."""
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
    assert 0 < hist["steps"] < 200 * hist["steps_per_epoch"]
    assert hist["epochs_done"] == round(hist["steps"] / hist["steps_per_epoch"], 3)
    assert len(hist["history"]["val_auc"]) >= 1 and (run / "model.keras").exists()


def test_epochs_done_from_old_and_new_histories() -> None:
    from cxr.train.trainer import epochs_done

    assert epochs_done({"epochs_done": 2.5, "history": {"loss": [1, 2, 3]}}) == 2.5  # a budget cut the third
    assert epochs_done({"history": {"loss": [1.0] * 14}}) == 14.0  # runs from before the field
    assert epochs_done({}) is None


def test_the_trainer_s_budget_callback_stops_on_a_fake_clock() -> None:
    """The callback `cxr train` uses (not a copy of its arithmetic), driven batch by batch on a fake clock: it sets
    the schedule's learning rate from the clock's progress and stops the model once another step and the last
    validation no longer fit."""
    from types import SimpleNamespace

    from cxr.train.callbacks import TimeBudget

    now = [1000.0]  # the clock's t0

    class Rate:
        def __init__(self) -> None:
            self.values: list[float] = []

        def assign(self, v: float) -> None:
            self.values.append(float(v))

    model = SimpleNamespace(optimizer=SimpleNamespace(learning_rate=Rate()), stop_training=False)
    clock = _clock(budget_s=100.0, total_steps=50 * 10, batch_size=16, n_eval_images=32)
    cb = TimeBudget(clock, lambda p: lr_at(p, peak=1e-3, warmup=0.1), now=lambda: now[0])
    cb.set_model(model)
    epochs = 0
    while not model.stop_training and epochs < 50:
        for b in range(10):
            cb.on_train_batch_begin(b)
            now[0] += 1.0
            cb.on_train_batch_end(b)
            if model.stop_training:
                break
        else:
            now[0] += 2.0  # the epoch's validation
            cb.on_epoch_end(epochs)
            epochs += 1
    assert model.stop_training and cb.stopped
    assert 10 < clock.steps_done < 500 and now[0] - clock.t0 <= clock.budget_s
    rates = model.optimizer.learning_rate.values
    assert len(rates) == clock.steps_done and rates[0] == pytest.approx(1e-3 * WARMUP_START)
    assert max(rates) == pytest.approx(1e-3, rel=0.05) and rates[-1] < 0.2e-3  # warmed up, then decayed
