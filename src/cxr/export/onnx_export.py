"""``cxr export``: Keras -> ONNX (tf2onnx) with parity validation, INT8 QDQ, model repository and card.

Parity follows optimum's export validation: first tensor names, then shapes,
then values within a tolerance, then identical thresholded labels; every
failure is collected before one :class:`ExportValidationError` is raised.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr.core import contract
from cxr.core.errors import CxrError, ExportValidationError
from cxr.core.integrity import sha256_file
from cxr.core.model_dir import ModelCard
from cxr.core.paths import relative
from cxr.export import repository
from cxr.export.card import write_card
from cxr.train import metrics
from cxr.train.scoring import Calibration, KerasScorer, OnnxScorer
from cxr.train.trainer import epochs_done

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
VALUE_TOLERANCE = 1e-5
#: INT8 is refused when its validation AUC drops more than this below FP32.
INT8_MAX_AUC_DROP = 0.005
#: Size budget of an exported ONNX per architecture (``arch`` in train_config.json): the compact default must
#: stay small; the report's InceptionV3 is about 84 MiB in FP32. Unknown architectures get the compact budget.
MAX_MODEL_BYTES = {"compact": 10 * 1024 * 1024, "efficientnet_lite0": 24 * 1024 * 1024,
                   "inception_v3": 128 * 1024 * 1024}


def max_model_bytes(model_path: Path) -> int:
    """The size budget for the model trained in ``model_path``'s run directory."""
    cfg_file = Path(model_path).parent / "train_config.json"
    arch = json.loads(cfg_file.read_text()).get("arch", "compact") if cfg_file.exists() else "compact"
    return MAX_MODEL_BYTES.get(arch, MAX_MODEL_BYTES["compact"])


@dataclass(frozen=True)
class ParityReport:
    """Outcome of one parity check (reference vs candidate)."""

    candidate: str
    n_images: int
    max_abs_diff: float
    mean_abs_diff: float
    label_agreement: float
    threshold: float
    failures: tuple[str, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def _rename_value(graph, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _convert(head, onnx_path: Path, output_name: str, *, opset: int, doc: str) -> Path:
    """Convert ``head`` (float32 pixels -> tensor) behind the contract's uint8 ``image`` input to ONNX.

    (Grad-CAM needs no separate export: :mod:`cxr.client.explain` works on this graph.)

    The input is named ``image`` with batch dimension ``batch``; the single output is ``output_name``.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *contract.IMAGE_SHAPE), tf.uint8, name=contract.INPUT_NAME),)

    @tf.function(input_signature=spec)
    def graph_fn(image: tf.Tensor) -> tf.Tensor:
        return tf.identity(head(tf.cast(image, tf.float32)), name=output_name)

    proto, _ = tf2onnx.convert.from_function(graph_fn, input_signature=spec, opset=opset)
    graph = proto.graph
    _rename_value(graph, graph.input[0].name, contract.INPUT_NAME)
    _rename_value(graph, graph.output[0].name, output_name)
    for vi in (graph.input[0], graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = contract.BATCH_DIM
    proto.doc_string = doc
    onnx.checker.check_model(proto)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(onnx_path))
    return onnx_path


def to_onnx(keras_model_path: Path, onnx_path: Path, calibration: Calibration, *, opset: int = DEFAULT_OPSET) -> Path:
    """Convert a ``.keras`` model to ONNX with the contract's I/O and the calibration baked in.

    The graph takes ``image`` (uint8, ``[batch, 224, 224, 1]``) and returns
    ``probability`` (float32, ``[batch, 1]``) = ``sigmoid(scale * logit + bias)``.
    """
    import keras
    import tensorflow as tf

    from cxr.train import models

    model = keras.models.load_model(str(keras_model_path), compile=False)
    logit_model = models.logit_model(model)
    scale, bias = float(calibration.scale), float(calibration.bias)  # Python floats become graph constants
    return _convert(
        lambda x: tf.sigmoid(logit_model([x], training=False) * scale + bias), onnx_path, contract.OUTPUT_NAME,
        opset=opset, doc=f"cxr pneumonia model ({model.name}); calibration scale={scale:.6g} bias={bias:.6g}",
    )


#: Films timed per trial by :func:`served_throughput` (after a warm-up batch), and the batch size.
SPEED_FILMS = 256
#: Interleaved rounds of :func:`served_throughput` (the median is reported).
SPEED_ROUNDS = 5
SPEED_BATCH = 16


def served_throughput(keras_model_paths: Sequence[Path], *, films: int = SPEED_FILMS, batch: int = SPEED_BATCH,
                      rounds: int = SPEED_ROUNDS) -> list[float]:
    """Films per second of trained models as they would be served, side by side: each converted to ONNX (the
    contract's uint8 input) in a temporary folder and run by ONNX Runtime on every core of this CPU after one
    warm-up batch; then ``rounds`` rounds in which every model in turn screens ``films`` films in batches of
    ``batch``. Each model's figure is the median of its rounds, so a load that comes and goes during the run falls on
    every model alike. Compare the models of one call (the CPU differs between machines and runs)."""
    import tempfile
    import time

    from cxr.core.ort_session import make_session

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(batch, *contract.IMAGE_SHAPE), dtype=np.uint8)
    feed = {contract.INPUT_NAME: x}
    per_round = max(1, films // batch)
    with tempfile.TemporaryDirectory(prefix="cxr-speed-") as tmp:
        sessions = []
        for i, keras_path in enumerate(keras_model_paths):
            sess = make_session(to_onnx(Path(keras_path), Path(tmp) / f"model{i}.onnx", Calibration()))
            sess.run(None, feed)
            sessions.append(sess)
        rates: list[list[float]] = [[] for _ in sessions]
        for _ in range(rounds):
            for k, sess in enumerate(sessions):
                t0 = time.perf_counter()
                for _ in range(per_round):
                    sess.run(None, feed)
                rates[k].append(per_round * batch / (time.perf_counter() - t0))
        return [float(np.median(r)) for r in rates]


class _Reader:
    """onnxruntime calibration data reader over contract batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self._it: Iterator[np.ndarray] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {contract.INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights, uint8 activations), calibrated on training images.

    The intensity standardisation, the stem convolution, the final logit and
    the sigmoid stay in float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    int8_path.parent.mkdir(parents=True, exist_ok=True)
    pre = int8_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    nodes = list(onnx.load(str(pre)).graph.node)
    # Stay in float: the in-graph intensity standardisation and the stem convolution (8-bit steps of a
    # standardised image cost 0.016 validation AUC; keeping them in float costs nothing measurable),
    # and the logit MatMul and sigmoid, so probabilities keep their resolution.
    first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    exclude = [n.name for n in nodes[: first_conv + 1]]
    exclude += [n.name for n in nodes if n.op_type in ("MatMul", "Gemm")][-1:]
    exclude += [n.name for n in nodes if n.op_type == "Sigmoid"]

    class Reader(_Reader, CalibrationDataReader):
        pass

    quantize_static(
        str(pre), str(int8_path), Reader(calibration_images), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    pre.unlink(missing_ok=True)
    return int8_path


def check_parity(
    reference: np.ndarray, candidate_path: Path, images: np.ndarray, *, threshold: float,
    tolerance: float | None = VALUE_TOLERANCE,
) -> ParityReport:
    """Compare an ONNX model against reference probabilities: names, shapes, values, labels.

    ``tolerance=None`` skips the value check (INT8 is judged by its labels and AUC instead).
    """
    from cxr.core.ort_session import make_session

    failures: list[str] = []
    sess = make_session(candidate_path)
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if [i.name for i in ins] != [contract.INPUT_NAME]:
        failures.append(f"input names {[i.name for i in ins]} != ['{contract.INPUT_NAME}']")
    if [o.name for o in outs] not in ([contract.OUTPUT_NAME], list(contract.OUTPUT_NAMES)):
        failures.append(f"output names {[o.name for o in outs]} != {list(contract.OUTPUT_NAMES)} "
                        f"(or ['{contract.OUTPUT_NAME}'] before the OOD head is attached)")
    if ins and ins[0].type != "tensor(uint8)":
        failures.append(f"input type {ins[0].type} != tensor(uint8)")
    if ins and list(ins[0].shape[1:]) != list(contract.IMAGE_SHAPE):
        failures.append(f"input shape {ins[0].shape} != [batch, {', '.join(map(str, contract.IMAGE_SHAPE))}]")
    if ins and ins[0].shape[0] != contract.BATCH_DIM:
        failures.append(f"input batch dimension is {ins[0].shape[0]!r}, expected '{contract.BATCH_DIM}'")
    if failures:  # values cannot be compared when the interface is wrong
        return ParityReport(relative(candidate_path), len(images), float("nan"), float("nan"), 0.0, threshold, tuple(failures))
    out = np.concatenate(
        [sess.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: images[i : i + 64]})[0] for i in range(0, len(images), 64)]
    )
    if out.shape != (len(images), *contract.OUTPUT_SHAPE):
        failures.append(f"output shape {out.shape} != ({len(images)}, {', '.join(map(str, contract.OUTPUT_SHAPE))})")
    cand = out.reshape(-1).astype(np.float64)
    ref = reference.reshape(-1).astype(np.float64)
    if not np.isfinite(cand).all():
        failures.append("candidate output holds NaN or Inf")
    diff = np.abs(cand - ref)
    max_diff, mean_diff = float(diff.max()), float(diff.mean())
    if tolerance is not None and max_diff > tolerance:
        worst = int(diff.argmax())
        failures.append(f"max |dp| {max_diff:.3g} > {tolerance:g} (image {worst}: ref {ref[worst]:.6f}, onnx {cand[worst]:.6f})")
    agree = float(np.mean(contract.is_positive(cand, threshold) == contract.is_positive(ref, threshold)))
    if tolerance is not None and agree < 1.0:
        failures.append(f"thresholded labels differ on {int(round((1 - agree) * len(ref)))} of {len(ref)} images")
    return ParityReport(relative(candidate_path), len(images), max_diff, mean_diff, agree, threshold, tuple(failures))


def int8_gate(fp32_auc: float, int8_auc: float, *, max_drop: float = INT8_MAX_AUC_DROP) -> list[str]:
    """The INT8 acceptance rule: refuse when validation AUC drops more than ``max_drop`` below FP32."""
    if np.isfinite(int8_auc) and np.isfinite(fp32_auc) and fp32_auc - int8_auc > max_drop:
        return [f"int8: validation AUC {int8_auc:.4f} is {fp32_auc - int8_auc:.4f} below FP32 {fp32_auc:.4f} (limit {max_drop})"]
    return []


@dataclass(frozen=True)
class ExportConfig:
    """What ``cxr export`` does.

    Attributes:
        model_path: The trained ``.keras`` (its ``calibration.json`` and ``split.json`` beside it).
        data_dir: Kaggle-layout root (its train split gives parity and INT8 calibration images).
        repository: Triton model repository to write into.
        model_name: Model folder name for FP32 (INT8 goes to ``<name>_int8``).
        version: Model version folder.
        opset: ONNX opset (>= 17).
        int8: Also produce the INT8 QDQ model.
        parity_images: Validation images used for parity (at most).
        command: The command line recorded in the card.
        cache_dir: Decoded-image cache (``None``: no cache).
        site_dir: Labelled site sample; the OOD threshold keeps 99.5% of it (and of train-validation).
        non_chest_dir: Radiographs of other body parts for the body-part check (:mod:`cxr.export.body_part`).
        split_file: The model's split (default: ``split.json`` beside the model); give the committed copy so that
            the card names a file a clone has.
    """

    model_path: Path
    data_dir: Path | None
    repository: Path
    model_name: str = "pneumonia"
    version: int = 1
    opset: int = DEFAULT_OPSET
    int8: bool = True
    parity_images: int = 256
    command: str = ""
    cache_dir: Path | None = None
    site_dir: Path | None = None
    non_chest_dir: Path | None = None
    split_file: Path | None = None

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17, got {self.opset}")
        if self.version < 1:
            raise ValueError("version must be >= 1")
        if self.parity_images < 1:
            raise ValueError("parity_images must be >= 1")


def _validation_images(cfg: ExportConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val images, val labels, calibration images from the train side) of the model's own split."""
    from cxr.train import data as data_mod
    from cxr.train.data import Split

    split_file = cfg.split_file or Path(cfg.model_path).parent / "split.json"
    if cfg.data_dir is None or not split_file.exists():
        logger.warning("no data or split.json: parity on generated images only")
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, *contract.IMAGE_SHAPE), dtype=np.uint8)
        return x, np.zeros(len(x), dtype=int), x
    split = Split.load(split_file)
    x, val, _ = data_mod.load_samples(split.samples("val", cfg.data_dir), cache_dir=cfg.cache_dir, what="parity")
    y = np.array([s.label for s in val])
    train = split.samples("train", cfg.data_dir)
    rng = np.random.default_rng(0)
    calib = [train[i] for i in sorted(rng.permutation(len(train))[:256])]
    x_cal, _, _ = data_mod.load_samples(calib, cache_dir=cfg.cache_dir, what="INT8 calibration")
    return x, y, x_cal


def export(cfg: ExportConfig) -> dict:
    """Export FP32 (and INT8) ONNX into the repository, validate parity, write configs and the model card.

    Raises:
        ExportValidationError: A parity check failed (every failure listed), or
            INT8 lost more than :data:`INT8_MAX_AUC_DROP` validation AUC.
    """
    model_path = Path(cfg.model_path)
    if model_path.suffix != ".keras" or not model_path.exists():
        raise CxrError(f"expected an existing .keras model, got {model_path}")
    calibration = Calibration.beside(model_path)
    if calibration.rule == "fixed":
        logger.warning("no calibration.json beside %s: threshold 0.5, no scaling (run `cxr calibrate`)", model_path)
    x_val, y_val, x_cal = _validation_images(cfg)
    x_par = x_val[: cfg.parity_images] if len(x_val) > cfg.parity_images else x_val
    keras_scorer = KerasScorer(model_path, calibration)
    ref_val = keras_scorer(x_val)
    ref_par = ref_val[: len(x_par)]

    model_dir = Path(cfg.repository) / cfg.model_name
    fp32 = to_onnx(model_path, model_dir / str(cfg.version) / "model.onnx", calibration, opset=cfg.opset)
    budget = max_model_bytes(model_path)
    failures: list[str] = []
    fp32_parity = check_parity(ref_par, fp32, x_par, threshold=calibration.threshold)
    failures += [f"fp32: {f}" for f in fp32_parity.failures]
    if fp32.stat().st_size > budget:
        failures.append(f"fp32: {fp32.stat().st_size} bytes > {budget}")
    results: dict = {"fp32": {"path": relative(fp32), "parity": asdict(fp32_parity)}}

    if failures:  # the interface is wrong: nothing further can be measured
        raise ExportValidationError(failures)
    fp32_auc = metrics.roc_auc(y_val, OnnxScorer(fp32)(x_val)) if y_val.any() and not y_val.all() else float("nan")
    results["fp32"]["val_auc"] = fp32_auc

    int8_dir = Path(cfg.repository) / f"{cfg.model_name}_int8"
    if cfg.int8:
        int8 = quantize_int8(fp32, int8_dir / str(cfg.version) / "model.onnx", x_cal)
        int8_parity = check_parity(ref_par, int8, x_par, threshold=calibration.threshold, tolerance=None)
        failures += [f"int8: {f}" for f in int8_parity.failures]
        int8_auc = metrics.roc_auc(y_val, OnnxScorer(int8)(x_val)) if y_val.any() and not y_val.all() else float("nan")
        results["int8"] = {"path": relative(int8), "parity": asdict(int8_parity), "val_auc": int8_auc,
                           "auc_drop_vs_fp32": fp32_auc - int8_auc}
        failures += int8_gate(fp32_auc, int8_auc)
        if int8.stat().st_size > budget:
            failures.append(f"int8: {int8.stat().st_size} bytes > {budget}")
    if failures:
        (model_dir / "export_failures.json").write_text(json.dumps(failures, indent=1) + "\n")
        raise ExportValidationError(failures)

    write_python_model(model_dir, cfg.version)
    dirs = [(model_dir, "fp32")] + ([(int8_dir, "int8")] if cfg.int8 else [])
    for d, precision in dirs:
        onnx_file = d / str(cfg.version) / "model.onnx"
        card = model_card(cfg, calibration, results, sha256=sha256_file(onnx_file), precision=precision)
        write_card(d, card.replace(bytes=onnx_file.stat().st_size,
                                   serving={"targets": list(repository.TARGETS[precision])}))
        if precision == "int8":
            write_python_model(d, cfg.version)
    # The second output, ood_score, fitted on this model's own training split (each precision on its own features).
    split_file = cfg.split_file or Path(cfg.model_path).parent / "split.json"
    if cfg.data_dir is not None and split_file.exists():
        for d, _ in dirs:
            results.setdefault("ood", {})[d.name] = repository.refit_ood(
                d, data_dir=cfg.data_dir, split_file=split_file, site_dir=cfg.site_dir, cache_dir=cfg.cache_dir,
                non_chest_dir=cfg.non_chest_dir)
    else:
        logger.warning("no training data or split.json: the model is exported without an ood_score output")
        for d, _ in dirs:
            repository.write_configs(d)
    return results


PYTHON_MODEL_STUB = '''"""Triton Python-backend entry point (embedded CPU server); the logic lives in cxr.serving."""

from cxr.serving.python_model import TritonPythonModel  # noqa: F401
'''


def write_python_model(model_dir: Path, version: int) -> None:
    (model_dir / str(version) / "model.py").write_text(PYTHON_MODEL_STUB)


def model_card(cfg: ExportConfig, calibration: Calibration, results: dict, *, sha256: str,
               precision: str) -> ModelCard:
    """Machine-readable model card (``model_card.json``)."""
    run_dir = Path(cfg.model_path).parent
    read = lambda name: json.loads((run_dir / name).read_text()) if (run_dir / name).exists() else None  # noqa: E731
    train_cfg = read("train_config.json") or {}
    history = read("history.json") or {}
    evaluations = {}
    for sub in sorted(run_dir.glob("eval_*/report.json")):
        evaluations[sub.parent.name.removeprefix("eval_")] = json.loads(sub.read_text())
    return ModelCard({
        "model": cfg.model_name if precision == "fp32" else f"{cfg.model_name}_int8",
        "version": cfg.version,
        "precision": precision,
        "file": f"{cfg.version}/model.onnx",
        "sha256": sha256,
        "architecture": train_cfg.get("arch", "unknown"),
        "contract": {
            "input": {"name": contract.INPUT_NAME, "dtype": str(contract.INPUT_DTYPE), "shape": ["batch", *contract.IMAGE_SHAPE]},
            "output": {"name": contract.OUTPUT_NAME, "dtype": str(contract.OUTPUT_DTYPE), "shape": ["batch", *contract.OUTPUT_SHAPE]},
            "labels": list(contract.LABELS),
            "preprocessing": "cxr.core.imaging.preprocess: decode, grayscale (ITU-R 601 luma), bilinear resize to 224x224 "
            "(aspect not kept); intensity scaling and per-image standardisation inside the graph",
        },
        "training": {
            "data": train_cfg.get("data_dir"),
            "sources": ((read("split.json") or {}).get("roots") if (read("split.json") or {}).get("test") else
                        {"kaggle": train_cfg.get("data_dir"), **(train_cfg.get("sources") or {})}),
            "sampling_mass": history.get("sampling_mass"),
            "config": train_cfg,
            "best_epoch": history.get("best_epoch"),
            "selected_on": history.get("select_on"),
            "seconds": history.get("seconds"),
            "epochs_done": epochs_done(history),
            "stopped_by": history.get("stopped_by"),
            "n_train": history.get("n_train"),
            "n_val": history.get("n_val"),
            "split": ("locked: every source's patients on one side of train, select and test; select chose the "
                      "checkpoint, the calibration, the operating points and the OOD fit; test is read only by "
                      "`cxr claims`; split.json in the run directory" if (read("split.json") or {}).get("test") else
                      "patient-grouped within each source, stratified by source and class, seeded; split.json in "
                      "the run directory"),
        },
        "calibration": asdict(calibration),
        "export": {
            "opset": cfg.opset,
            "parity": results,
            "tf2onnx_route": "tf2onnx.convert.from_function on a tf.function with an explicit uint8 input signature",
        },
        "evaluations": evaluations,
        "evaluations_of": "the calibrated Keras model (= the FP32 ONNX within the parity tolerance)"
        + ("; this INT8 model's own validation AUC is under export.parity.int8" if precision == "int8" else ""),
        "commands": _commands(run_dir, cfg.command),
        "environment": {"python": sys.version.split()[0], "platform": platform.platform()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })


def _commands(run_dir: Path, current: str) -> list[str]:
    """The run's recorded commands (train, calibrate), then this export."""
    from cxr.train import run_log

    done = [c for c in run_log.recorded(run_dir) if not c.startswith("cxr export")]  # logs of older versions
    return list(dict.fromkeys(done + ([current] if current else [])))


def command_line() -> str:
    """The current command line, shell-quoted, for the card."""
    return " ".join(shlex.quote(a) for a in ["cxr", *sys.argv[1:]])
