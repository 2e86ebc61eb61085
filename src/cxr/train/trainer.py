"""``cxr train``: Keras training on the Kaggle layout (plus any other labelled sources) with a patient-grouped
validation split inside each source and sampling that keeps source and class apart."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import DataError
from cxr.core.model_dir import write_provenance
from cxr.train import data as data_mod
from cxr.train import run_log
from cxr.train.augment import AugmentConfig

logger = logging.getLogger(__name__)

SELECT_ON = ("val", "monitor", "sources")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (written to ``train_config.json``).

    Attributes:
        data_dir: Kaggle-layout root holding ``train/`` (and optionally ``val/``).
        out_dir: Run directory for the model, split, history and figures.
        arch: Architecture name (``compact``, ``efficientnet_lite0`` or ``inception_v3``).
        epochs: Maximum epochs.
        batch_size: Mini-batch size.
        learning_rate: Peak Adam learning rate (cosine-decayed over the run).
        seed: Seed for the split, shuffling, augmentation and initialisation.
        val_fraction: Share of train images (by patient) held out for validation.
        patience: Early-stopping patience in epochs on the selection metric.
        augment: Augmentation ranges (``None`` disables augmentation).
        weights: Local weights file: the InceptionV3 base's, or the EfficientNet-Lite0 ImageNet weights converted
            by ``cxr import-weights`` (their conversion record, with the source file's sha256, is copied into
            ``train_config.json``).
        monitor_dir: Optional labelled external folder (``NORMAL``/``PNEUMONIA``)
            scored every epoch (``monitor_auc`` in the history).
        select_on: ``val`` (pooled train-validation AUC), ``monitor`` (external
            AUC) or ``sources`` (the mean of the per-source validation AUCs, so
            that the large Kaggle validation side does not outvote the others)
            for the best checkpoint and early stopping.
        limit_per_class: Use at most this many train images per class (tiny runs).
        cache_dir: Where decoded image arrays are cached.
        width: Width multiplier of the compact CNN.
        train_from_block: EfficientNet-Lite0 with weights: the first block that trains (the stem and the blocks
            before it stay frozen).
        teacher: A trained ``model.keras`` to distil from: every training film's target becomes
            ``(1 - teacher_weight) * label + teacher_weight * teacher probability`` (the teacher's raw sigmoid on
            the film as decoded, before augmentation). Selection still uses the labels of the select side.
        teacher_weight: The teacher's share of each target, in [0, 1].
        time_budget_s: Optional wall-clock cap on the whole run, in seconds
            (setup, decoding, training and validation). Training stops in time
            for the last validation and checkpoint, and the learning rate
            anneals over whichever ends first, the epochs or the budget.
        sources: Further labelled sources beside the Kaggle ``train/``
            (e.g. adult films from other hospitals), each split by patient.
        source_val_fraction: Validation share of patients in each further
            source (small sources need more than ``val_fraction`` to validate on).
        split_file: A locked split (``cxr lock-split``): its train side trains, its select side chooses the
            checkpoint, and its test side is never read. ``data_dir`` and ``sources`` are then not used to split.
        leave_out: Sources of the locked split left out of training and selection (leave-one-source-out runs
            and ablations).
        command: The command line that asked for the run, recorded in the run's ``commands.txt`` once the run
            is written (empty: nothing recorded).
    """

    data_dir: Path
    out_dir: Path
    arch: str = "compact"
    epochs: int = 14
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = 0
    val_fraction: float = 0.15
    patience: int = 5
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    weights: Path | None = None
    monitor_dir: Path | None = None
    select_on: str = "val"
    limit_per_class: int | None = None
    cache_dir: Path | None = None
    width: int = 16
    train_from_block: int = 6
    teacher: Path | None = None
    teacher_weight: float = 0.5
    time_budget_s: float | None = None
    sources: tuple[data_mod.Source, ...] = ()
    source_val_fraction: float = 0.3
    split_file: Path | None = None
    leave_out: tuple[str, ...] = ()
    command: str = ""

    def __post_init__(self) -> None:
        if self.split_file is not None and (self.monitor_dir is not None or self.sources):
            raise ValueError("a locked split names its sources and holds the site sample's select patients: "
                             "give no --source or --monitor with it")
        if self.leave_out and self.split_file is None:
            raise ValueError("leave_out needs a locked split")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.select_on == "monitor" and self.monitor_dir is None:
            raise ValueError("select_on='monitor' needs monitor_dir")
        if self.select_on == "sources" and not (self.sources or self.split_file):
            raise ValueError("select_on='sources' needs further sources")
        if self.limit_per_class is not None and self.limit_per_class < 2:
            raise ValueError("limit_per_class must be >= 2")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        names = [data_mod.KAGGLE, *(s.name for s in self.sources)]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (and not {data_mod.KAGGLE!r}): {names}")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")
        if not 0.0 < self.source_val_fraction < 1.0:
            raise ValueError(f"source_val_fraction must be in (0, 1), got {self.source_val_fraction}")


@dataclass(frozen=True)
class TrainResult:
    """Paths and summary of a finished run."""

    run_dir: Path
    model_path: Path
    best_epoch: int
    best_score: float
    seconds: float


def _limit(samples: list[data_mod.Sample], k: int, seed: int) -> list[data_mod.Sample]:
    rng = random.Random(seed)
    out: list[data_mod.Sample] = []
    for label in (0, 1):
        group = [s for s in samples if s.label == label]
        if not group:
            continue
        rng.shuffle(group)
        out.extend(group[:k])
    return sorted(out, key=lambda s: str(s.path))


WARMUP_START = 0.1  # the warm-up starts at this share of the peak learning rate
FINAL_LR = 0.02  # the cosine decay ends at this share of the peak
BUDGET_MARGIN = 0.02  # share of a time budget kept free for writing the run directory


def lr_at(progress: float, *, peak: float, warmup: float) -> float:
    """Learning rate at ``progress`` (0..1) of a run: linear warm-up from
    ``WARMUP_START * peak`` to ``peak`` over the first ``warmup`` share, then
    cosine decay to ``FINAL_LR * peak`` (Keras's ``CosineDecay`` with warm-up,
    as a function of progress instead of steps)."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return peak * (WARMUP_START + (1 - WARMUP_START) * p / warmup)
    q = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return peak * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + np.cos(np.pi * q)))


def budget_warmup(epochs: int) -> float:
    """Warm-up share of a budgeted run: one epoch's worth of progress, at most a tenth of the run
    (with few epochs the budget, not the epoch count, sets the run's length)."""
    return min(1 / epochs, 0.1)


@dataclass
class BudgetClock:
    """Decides, step by step, whether a time-budgeted run may take another
    training step, and how far through the run it is.

    The time left must cover the next step plus ``reserve_s``: the last
    validation pass and checkpoint (measured after the first epoch, estimated
    from the step time before that) and a margin for writing the run directory.
    Pure arithmetic on the times it is given, so it is tested without Keras.
    """

    t0: float
    budget_s: float
    total_steps: int
    batch_size: int
    n_eval_images: int
    steps_done: int = 0
    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.total_steps < 1 or self.batch_size < 1 or self.n_eval_images < 0:
            raise ValueError(
                f"BudgetClock needs budget_s > 0, total_steps >= 1, batch_size >= 1 and n_eval_images >= 0, got "
                f"{self.budget_s}, {self.total_steps}, {self.batch_size}, {self.n_eval_images}"
            )

    def step_time(self) -> float:
        """Typical seconds per training step (the first, which compiles, left out when others exist)."""
        times = self.step_seconds[1:] or self.step_seconds
        return float(np.median(times)) if times else 0.0

    def reserve_s(self) -> float:
        if self.eval_seconds is not None:
            evaluation = 1.2 * self.eval_seconds
        else:  # inference runs about three times faster per image than a training step; the first
            # evaluation also builds its graph, allowed for with the first step's time (which built the training graph)
            first = self.step_seconds[0] if self.step_seconds else 0.0
            evaluation = self.n_eval_images * self.step_time() / max(1, self.batch_size) / 3 + first
        return evaluation + BUDGET_MARGIN * self.budget_s

    def progress(self, now: float) -> float:
        """Share of the run done: steps over all steps, or time over the time
        available for training, whichever is further."""
        by_steps = self.steps_done / max(1, self.total_steps)
        available = self.budget_s - self.reserve_s()
        by_time = (now - self.t0) / available if available > 0 else 1.0
        return min(1.0, max(by_steps, by_time))

    def may_continue(self, now: float) -> bool:
        """Whether one more step and the reserve still fit in the budget."""
        return now - self.t0 + self.step_time() + self.reserve_s() <= self.budget_s


def stop_reason(steps_done: int, total_steps: int, *, budget_stopped: bool) -> str:
    """Why a run ended: ``epochs`` (every step ran, even when the budget would not have allowed one more),
    ``time_budget`` or ``early_stopping``."""
    if steps_done >= total_steps:
        return "epochs"
    return "time_budget" if budget_stopped else "early_stopping"


def epochs_done(history: dict) -> float | None:
    """Epochs a run completed, from its ``history.json``: recorded since budgeted runs (fractional when a
    budget cut the last epoch), else the number of epochs in the per-epoch history."""
    if history.get("epochs_done") is not None:
        return float(history["epochs_done"])
    per_epoch = history.get("history", {}).get("loss", [])
    return float(len(per_epoch)) if per_epoch else None


def _labels(samples: list[data_mod.Sample]) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.float32)


def source_aucs(samples: list[data_mod.Sample], p: np.ndarray) -> dict[str, float]:
    """Validation AUC per source that has both classes.

    A one-class source (COVID-19 inpatients, all Pneumonia, one hospital) is not scored against another
    source's Normal films: that AUC rewards telling the hospitals apart (the shortcut of DeGrave et al., 2021),
    not pneumonia."""
    from cxr.train.metrics import roc_auc

    y = np.array([s.label for s in samples])
    src = np.array([s.source for s in samples])
    out: dict[str, float] = {}
    for name in sorted(set(src)):
        m = src == name
        if len(set(y[m])) == 2:
            out[name] = roc_auc(y[m], p[m])
    return out


@dataclass(frozen=True)
class _Sides:
    """What a run trains on (``train``) and chooses on (``val``), with the sources they come from."""

    split: data_mod.Split
    train: list[data_mod.Sample]
    val: list[data_mod.Sample]
    sources: list[data_mod.Source]


def _sides(cfg: TrainConfig) -> _Sides:
    """The run's split: the locked split's train and select sides (less ``--leave-out``), or a patient-grouped
    split made from the Kaggle layout and the extra sources."""
    if cfg.split_file is not None:
        split = data_mod.Split.load(cfg.split_file)
        if not split.locked:
            raise DataError(f"{cfg.split_file}: not a locked split (no test side); make one with `cxr lock-split`")
        unknown = set(cfg.leave_out) - set(split.sources())
        if unknown:
            raise DataError(f"--leave-out {sorted(unknown)}: the split has {sorted(split.sources())}")
        tr = [s for s in split.samples("train") if s.source not in cfg.leave_out]
        va = [s for s in split.samples("val") if s.source not in cfg.leave_out]
        if cfg.limit_per_class:
            tr = _limit(tr, cfg.limit_per_class, cfg.seed)
        sources = [data_mod.Source(n, r) for n, r in sorted(split.sources().items()) if n not in cfg.leave_out]
        if cfg.leave_out:  # the run's split: what this model trained and chose on, and the test side it may claim on
            from dataclasses import replace

            def kept(entries: tuple[str, ...]) -> tuple[str, ...]:
                return tuple(e for e in entries if e.split("/", 1)[0] not in cfg.leave_out)

            split = replace(split, train=kept(split.train), val=kept(split.val), test=kept(split.test),
                            roots=tuple(r for r in split.roots if r[0] not in cfg.leave_out),
                            val_fractions=tuple(v for v in split.val_fractions if v[0] not in cfg.leave_out))
    else:
        sources = [data_mod.Source(data_mod.KAGGLE, data_mod.split_dir(cfg.data_dir, "train")), *cfg.sources]
        per_source = []
        for src in sources:
            samples = data_mod.source_samples(src)
            if cfg.limit_per_class:
                samples = _limit(samples, cfg.limit_per_class, cfg.seed)
            per_source.append((src, samples))
        split = data_mod.make_source_split(
            per_source, val_fraction=cfg.val_fraction, seed=cfg.seed,
            val_fractions={src.name: cfg.source_val_fraction for src in cfg.sources},
        )
        tr, va = split.samples("train"), split.samples("val")
    if not va or len({s.label for s in va}) < 2:
        raise DataError("validation split needs both classes; use more data or a larger val_fraction")
    for src in sources:
        t = [s for s in tr if s.source == src.name]
        v = [s for s in va if s.source == src.name]
        logger.info("%s: train %d images (%d patients), val %d images (%d patients)", src.name,
                    len(t), len({s.patient for s in t}), len(v), len({s.patient for s in v}))
    return _Sides(split, tr, va, sources)


def _write_inputs(cfg: TrainConfig, sides: _Sides, out: Path) -> None:
    """The run folder's record of its inputs: ``split.json``, ``provenance.csv`` (every film's role) and
    ``train_config.json``."""
    from cxr.core.paths import relative

    sides.split.save(out / "split.json")
    chose = "select" if sides.split.locked else "validation"
    write_provenance(out / "provenance.csv", data_mod.provenance_rows("train", sides.train)
                     + data_mod.provenance_rows(chose, sides.val), replace_roles=("train", chose))
    config_payload = {k: (relative(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config_payload["sources"] = {src.name: relative(src.root) for src in cfg.sources}
    if cfg.weights is not None:
        from cxr.train.pretrained import record_of

        config_payload["weights_record"] = record_of(cfg.weights)
    (out / "train_config.json").write_text(json.dumps(config_payload, indent=1, default=str) + "\n")


def _training_stream(cfg: TrainConfig, tr: list[data_mod.Sample], x_tr: np.ndarray, y_tr: np.ndarray,
                     masses: dict):
    """One endless, shuffled stream per (source, class) cell, drawn by its mass: every class half of each batch
    on average, and no source's own class balance to learn. An epoch is as many draws as training images."""
    import tensorflow as tf

    from cxr.train.augment import augment_batch

    aug_cfg = cfg.augment

    def _augment(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(x, tf.float32)
        if aug_cfg is not None:
            x = augment_batch(x, aug_cfg)
        return x, y

    cells = sorted(masses)
    streams = []
    for c in cells:
        idx = np.array([i for i, s in enumerate(tr) if (s.source, s.label) == c])
        streams.append(tf.data.Dataset.from_tensor_slices((x_tr[idx], y_tr[idx][:, None]))
                       .shuffle(len(idx), seed=cfg.seed, reshuffle_each_iteration=True).repeat())
    return (
        tf.data.Dataset.sample_from_datasets(streams, weights=[masses[c] for c in cells], seed=cfg.seed)
        .batch(cfg.batch_size)
        .map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def _compiled_model(cfg: TrainConfig, steps: int, clock: BudgetClock | None):
    """The architecture, compiled with Adam on a warm-up + cosine schedule: by steps (Keras's ``CosineDecay``),
    or, under a time budget, set batch by batch from the clock's progress (the ``TimeBudget`` callback)."""
    import keras

    from cxr.train import models

    kwargs: dict[str, object] = {}
    if cfg.arch == "compact":
        kwargs["width"] = cfg.width
    if cfg.arch in ("inception_v3", "efficientnet_lite0") and cfg.weights is not None:
        kwargs["weights"] = cfg.weights
    if cfg.arch == "efficientnet_lite0":
        kwargs["train_from_block"] = cfg.train_from_block
    model = models.build(cfg.arch, **kwargs)
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
    if clock is None:
        learning_rate = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate * WARMUP_START, decay_steps=max(1, steps * cfg.epochs - steps), alpha=FINAL_LR,
            warmup_target=cfg.learning_rate, warmup_steps=steps,
        )
    else:
        learning_rate = cfg.learning_rate * WARMUP_START
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return model


def _refusal_record(by_side: dict[str, list[dict]]) -> dict:
    """The films the pixel rules refused, per side: counts per source and each film (repository-relative path,
    status, rule, reason), for ``history.json``."""
    from cxr.core.paths import relative

    out: dict = {}
    for side, rows in by_side.items():
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["source"]] = counts.get(r["source"], 0) + 1
        out[side] = {"per_source": counts, "films": [
            {"path": relative(r["path"]), "source": r["source"], "status": r["status"], "rule": r["rule"],
             "reason": r["reason"]} for r in rows]}
    return out


def _distilled_targets(cfg: TrainConfig, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Soft targets for distillation: the labels mixed with the teacher's probabilities on the same films."""
    from cxr.train.scoring import KerasScorer

    if cfg.teacher is None or not Path(cfg.teacher).is_file():
        raise DataError(f"teacher model not found: {cfg.teacher}")
    logits = KerasScorer(Path(cfg.teacher)).logits(x).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    logger.info("distilling from %s: teacher weight %.2f, teacher mean probability %.3f on %d films", cfg.teacher,
                cfg.teacher_weight, float(p.mean()), len(p))
    return ((1 - cfg.teacher_weight) * y + cfg.teacher_weight * p).astype(np.float32)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model and write the run directory.

    Writes ``model.keras`` (best checkpoint), ``split.json``, ``provenance.csv``,
    ``train_config.json``, ``history.json``, ``history.csv``, ``accuracy.png`` ("Model
    accuracy") and ``loss.png`` ("Model loss").
    """
    import keras
    import tensorflow as tf

    from cxr.core.paths import relative
    from cxr.train import plots
    from cxr.train.callbacks import SourceMonitor, TimeBudget

    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    sides = _sides(cfg)
    _write_inputs(cfg, sides, out)
    tr, va = sides.train, sides.val

    x_tr, tr, refused_tr = data_mod.load_samples(tr, cache_dir=cfg.cache_dir, progress=True, what="train")
    x_va, va, refused_va = data_mod.load_samples(va, cache_dir=cfg.cache_dir, progress=True, what="select")
    refused = _refusal_record({"train": refused_tr, "select": refused_va})
    y_tr, y_va = _labels(tr), _labels(va)
    if cfg.teacher is not None:
        y_tr = _distilled_targets(cfg, x_tr, y_tr)
    masses = data_mod.cell_masses(tr)
    logger.info("sampling mass per (source, class): %s", masses)
    monitor: tuple[np.ndarray, np.ndarray] | None = None
    if cfg.monitor_dir is not None:
        mon = data_mod.list_samples(cfg.monitor_dir)
        monitor = (data_mod.load_images([s.path for s in mon], cache_dir=cfg.cache_dir), _labels(mon))

    ds = _training_stream(cfg, tr, x_tr, y_tr, masses)
    val_ds = tf.data.Dataset.from_tensor_slices((x_va.astype(np.float32), y_va[:, None])).batch(64)
    steps = int(np.ceil(len(x_tr) / cfg.batch_size))
    clock: BudgetClock | None = None
    if cfg.time_budget_s is not None:  # the same shape of schedule, driven by progress through steps or time
        n_eval = len(x_va) + (len(monitor[0]) if monitor is not None else 0)
        clock = BudgetClock(t0, cfg.time_budget_s, steps * cfg.epochs, cfg.batch_size, n_eval)
    model = _compiled_model(cfg, steps, clock)

    select_key = {"val": "val_auc", "monitor": "monitor_auc", "sources": "val_auc_sources"}[cfg.select_on]
    model_path = out / "model.keras"
    callbacks = [
        SourceMonitor(x_va, va, len(sides.sources), source_aucs, monitor),
        keras.callbacks.ModelCheckpoint(str(model_path), monitor=select_key, mode="max", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=select_key, mode="max", patience=cfg.patience, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(out / "history.csv")),
    ]
    budget = None
    if clock is not None:
        budget = TimeBudget(clock, lambda progress: lr_at(progress, peak=cfg.learning_rate,
                                                          warmup=budget_warmup(cfg.epochs)))
        callbacks.append(budget)
    history = model.fit(
        ds,
        steps_per_epoch=steps,
        validation_data=val_ds,
        epochs=cfg.epochs,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    scores = hist[select_key]
    best_epoch = int(np.nanargmax(scores)) + 1
    steps_done = clock.steps_done if clock is not None else steps * len(scores)
    stopped_by = stop_reason(steps_done, steps * cfg.epochs, budget_stopped=budget is not None and budget.stopped)
    seconds = time.time() - t0
    (out / "history.json").write_text(
        json.dumps(
            {"history": hist, "select_on": select_key, "best_epoch": best_epoch, "best_score": scores[best_epoch - 1],
             "seconds": seconds, "sampling_mass": {f"{k[0]}/{contract.CLASS_DIRS[k[1]]}": v for k, v in masses.items()},
             "sources": {src.name: relative(src.root) for src in sides.sources}, "n_train": len(tr), "n_val": len(va),
             "input_shape": list(contract.IMAGE_SHAPE), "cpu_count": os.cpu_count(),
             "time_budget_s": cfg.time_budget_s, "stopped_by": stopped_by, "steps": steps_done,
             "steps_per_epoch": steps, "epochs_done": round(steps_done / steps, 3), "refused": refused},
            indent=1,
        ) + "\n"
    )
    plots.training_curves(hist, out)
    logger.info("best epoch %d (%s %.4f); %.0f s; model at %s", best_epoch, select_key, scores[best_epoch - 1], seconds, model_path)
    run_log.record(out, cfg.command)
    return TrainResult(out, model_path, best_epoch, float(scores[best_epoch - 1]), seconds)
