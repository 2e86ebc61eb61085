"""``cxr predict --ray ADDRESS``: the same batch screening, spread over a Ray cluster with Ray Data.

* Reading and preprocessing (decode, DICOM eligibility, pixel rules, resize)
  run as CPU tasks across the cluster's nodes: decoding full-resolution JPEGs is
  the client's bottleneck (about 100 images/s per core), so it is what scales.
* Inference runs in an actor pool: each actor holds a
  :class:`~cxr.client.PneumoniaClient`, either to the Triton fleet
  (``--url A,B,C``) or embedded onnxruntime (``--protocol embedded``). Actors
  apply the served OOD threshold and decision rule like every client.
* Results stream back to the driver, which writes them through the same journal
  and CSV contract as a local run: exactly one row per input, resumable.

Ray retries tasks whose node died and restarts actors, so killing a worker node
mid-job still ends with every row once. The input files must be readable at the
same paths from every node (shared storage).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cxr import contract

logger = logging.getLogger(__name__)


def _preprocess(batch: dict) -> dict:
    """Ray Data CPU task: decode and apply the eligibility and pixel rules (no model involved)."""
    from cxr.errors import InvalidInputError, NotAssessableError

    images, status, reason, rule, uid = [], [], [], [], []
    for path in batch["path"]:
        try:
            arr, meta = contract.preprocess_with_meta(str(path), name=str(path))
            images.append(arr.reshape(-1))
            status.append("pending")
            reason.append("")
            rule.append("")
            uid.append(meta.get("sop_instance_uid", ""))
        except NotAssessableError as exc:
            images.append(np.zeros(int(np.prod(contract.IMAGE_SHAPE)), np.uint8))
            status.append(contract.Status.NOT_ASSESSABLE.value)
            reason.append(str(exc).splitlines()[0])
            rule.append(exc.rule)
            uid.append("")
        except (InvalidInputError, Exception) as exc:  # noqa: BLE001 - one bad file must not sink the job
            images.append(np.zeros(int(np.prod(contract.IMAGE_SHAPE)), np.uint8))
            status.append(contract.Status.ERROR.value)
            msg = str(exc) if isinstance(exc, InvalidInputError) else f"{path}: unexpected error ({type(exc).__name__})"
            reason.append(msg.splitlines()[0])
            rule.append("")
            uid.append("")
    return {"path": batch["path"], "sha256": batch["sha256"], "image": np.stack(images), "status": np.array(status),
            "reason": np.array(reason), "rule": np.array(rule), "sop_instance_uid": np.array(uid)}


class _Screener:
    """Ray Data actor: one client per actor (Triton fleet or embedded), the contract's rules on its answers."""

    def __init__(self, url: str | None, protocol: str, model: str, timeout_s: float, tls=None,  # type: ignore[no-untyped-def]
                 config_key: str | None = None) -> None:
        from cxr.client import PneumoniaClient

        # TLS files are read on the worker: they must be mounted at the same paths on every node.
        self.client = PneumoniaClient(url, protocol=protocol, model=model, timeout_s=timeout_s, tls=tls,
                                      config_key=config_key)

    def __call__(self, batch: dict) -> dict:
        from cxr.client.batch import _row
        from cxr.client.client import Prediction
        from cxr.errors import CxrError, InvalidInputError

        info = self.client.info
        n = len(batch["path"])
        preds: list = [None] * n
        todo = [i for i in range(n) if batch["status"][i] == "pending"]
        if todo:
            x = np.stack([batch["image"][i].reshape(contract.IMAGE_SHAPE) for i in todo])
            try:
                scores = self.client.infer_scores(x)
                for k, i in enumerate(todo):
                    ood = None if scores.ood_score is None else float(scores.ood_score[k])
                    preds[i] = self.client._judge(str(batch["path"][i]), batch["sop_instance_uid"][i] or None,
                                                  float(scores.probability[k]), ood)
            except CxrError as exc:  # the batch's images are transient errors (a rerun retries them)
                retryable = not isinstance(exc, InvalidInputError)
                for i in todo:
                    preds[i] = Prediction(str(batch["path"][i]), contract.Status.ERROR, None, None, info.threshold,
                                          info.name, info.version, f"{batch['path'][i]}: inference failed: {exc}"
                                          .splitlines()[0], ood_threshold=info.ood_threshold, retryable=retryable)
        for i in range(n):
            if preds[i] is None:
                st = contract.Status(batch["status"][i])
                preds[i] = Prediction(str(batch["path"][i]), st, None, None, info.threshold, info.name, info.version,
                                      str(batch["reason"][i]), ood_threshold=info.ood_threshold,
                                      rule=str(batch["rule"][i]) or None)
        rows = [_row(p, str(batch["sha256"][i])) for i, p in enumerate(preds)]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def screen(address: str, todo: list[tuple[Path, str]], *, url: str | None, protocol: str, model: str,
           timeout_s: float, chunk: int, on_rows, tls=None, config_key: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Run the job on the cluster at ``address`` and hand result rows to ``on_rows`` in chunks (for the journal)."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = int(sum(n.get("Resources", {}).get("CPU", 0) for n in nodes))
        logger.info("Ray cluster at %s: %d nodes, %d CPUs", address, len(nodes), cpus)
        items = [{"path": str(p), "sha256": sha} for p, sha in todo]
        source = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 8 or 1, 4 * max(cpus, 1))))
        # Half a CPU per preprocessing task and per actor: a node left alone with one CPU (after the others died)
        # can still run both stages, instead of the actor's share starving every decoding task.
        pre = source.map_batches(_preprocess, batch_size=8, num_cpus=0.5, max_retries=-1)
        ds = pre.map_batches(_Screener, fn_constructor_args=(url, protocol, model, timeout_s, tls, config_key), batch_size=32,
                             num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(nodes))),
                             max_restarts=-1, max_task_retries=-1)
        for batch in ds.iter_batches(batch_size=chunk, batch_format="numpy"):
            keys = list(batch)
            on_rows([{k: str(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))])
    finally:
        ray.shutdown()
