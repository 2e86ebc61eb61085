"""The Keras callbacks of ``cxr train``: per-source validation AUC, and the time budget.

Imported only by :func:`cxr.train.trainer.train` (this module imports Keras at its top).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import keras
import numpy as np

from cxr.train import data as data_mod
from cxr.train.metrics import roc_auc

logger = logging.getLogger("cxr.train.trainer")


class SourceMonitor(keras.callbacks.Callback):
    """At each epoch end: the validation AUC of every source (``val_auc_<source>``) and their mean
    (``val_auc_sources``) when there are several sources, and the AUC on a separate monitor set
    (``monitor_auc``) when one is given. The pooled ``val_auc`` mixes the sources' shifts; these do not."""

    def __init__(self, x_val: np.ndarray, val: list[data_mod.Sample], n_sources: int,
                 source_aucs: Callable[[list[data_mod.Sample], np.ndarray], dict[str, float]],
                 monitor: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        self.x_val, self.val, self.n_sources, self.monitor = x_val, val, n_sources, monitor
        self.source_aucs = source_aucs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        if self.n_sources > 1:
            p_va = self.model.predict(self.x_val.astype(np.float32), batch_size=64, verbose=0).ravel()
            aucs = self.source_aucs(self.val, np.clip(p_va, 0, 1))
            for name, auc in aucs.items():
                logs[f"val_auc_{name}"] = auc
            logs["val_auc_sources"] = float(np.mean(list(aucs.values())))
            logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in logs.items() if k.startswith("val_auc_")})
        if self.monitor is None:
            return
        p = self.model.predict(self.monitor[0].astype(np.float32), batch_size=64, verbose=0).ravel()
        logs["monitor_auc"] = roc_auc(self.monitor[1], np.clip(p, 0, 1))
        logger.info("epoch %d: monitor_auc %.4f", epoch + 1, logs["monitor_auc"])


class TimeBudget(keras.callbacks.Callback):
    """Sets the learning rate from the run's progress and stops training in time (placed after the other
    callbacks, so that the validation and checkpoint it measures are the whole epoch end).

    ``clock`` is a :class:`cxr.train.trainer.BudgetClock`; ``lr_at(progress)`` the schedule; ``now`` the time
    source (``time.time``; a test passes a fake one)."""

    def __init__(self, clock, lr_at: Callable[[float], float],
                 now: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.clock, self.lr_at, self.now = clock, lr_at, now
        self.stopped = False
        self._last = now()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._last = self.now()
        self.model.optimizer.learning_rate.assign(self.lr_at(self.clock.progress(self._last)))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = self.now()
        self.clock.steps_done += 1
        self.clock.step_seconds.append(now - self._last)
        self._last = now
        if not self.clock.may_continue(now):
            self.stopped = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = self.now()
        spent = now - self._last
        self.clock.eval_seconds = max(spent, self.clock.eval_seconds or 0.0)
        if not self.clock.may_continue(now):
            self.stopped = True
            self.model.stop_training = True
        logger.info("epoch %d: %d steps, %.0f s of %.0f s budget, epoch end took %.0f s",
                    epoch + 1, self.clock.steps_done, now - self.clock.t0, self.clock.budget_s, spent)
