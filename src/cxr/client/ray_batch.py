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

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from cxr.core import contract

logger = logging.getLogger(__name__)


def _preprocess(batch: dict, eligibility=None) -> dict:
    """Ray Data CPU task: decode and apply the eligibility and pixel rules (no model involved), exactly as the
    client does (:func:`cxr.client.client.prepare`)."""
    from cxr.client.client import prepare

    blank = np.zeros(int(np.prod(contract.IMAGE_SHAPE)), np.uint8)
    pres = [prepare(str(path), eligibility) for path in batch["path"]]
    return {
        "path": batch["path"], "sha256": batch["sha256"],
        "image": np.stack([blank if p.array is None else p.array.reshape(-1) for p in pres]),
        "status": np.array([PENDING if p.status is None else p.status.value for p in pres]),
        "reason": np.array([p.reason or "" for p in pres]),
        "refusal": np.array([_refusal_json(p.refusal) for p in pres]),
        "sop_instance_uid": np.array([p.uid or "" for p in pres]),
        "age_years": np.array([np.nan if p.age_years is None else p.age_years for p in pres], float),
    }


PENDING = "pending"  # decoded, waiting for the model


def _refusal_json(refusal: contract.Refusal | None) -> str:
    return "" if refusal is None else json.dumps(dataclasses.asdict(refusal))


def _refusal_of(text: str) -> contract.Refusal | None:
    return contract.Refusal(**json.loads(text)) if text else None


class _Screener:
    """Ray Data actor: one client per actor (Triton fleet or embedded), the contract's rules on its answers."""

    def __init__(self, url: str | None, protocol: str, model: str, timeout_s: float, tls=None,
                 config_key: str | None = None, eligibility=None, operating_point: str | None = None) -> None:
        from cxr.client import PneumoniaClient

        # TLS files are read on the worker: they must be mounted at the same paths on every node.
        self.client = PneumoniaClient(url, protocol=protocol, model=model, timeout_s=timeout_s, tls=tls,
                                      config_key=config_key, eligibility=eligibility, operating_point=operating_point)

    def __call__(self, batch: dict) -> dict:
        from cxr.client.client import Prepared
        from cxr.client.results import to_row
        from cxr.core.errors import CxrError

        n = len(batch["path"])
        names = [str(p) for p in batch["path"]]
        uids = [str(u) or None for u in batch["sop_instance_uid"]]
        ages = [None if not np.isfinite(a) else float(a) for a in batch["age_years"]]
        preds: list = [None] * n
        todo = [i for i in range(n) if batch["status"][i] == PENDING]
        if todo:
            x = np.stack([batch["image"][i].reshape(contract.IMAGE_SHAPE) for i in todo])
            try:
                scores = self.client.infer_scores(x)
                for k, i in enumerate(todo):
                    ood = None if scores.ood_score is None else float(scores.ood_score[k])
                    preds[i] = self.client.judge(names[i], uids[i], float(scores.probability[k]), ood,
                                                 age_years=ages[i])
            except CxrError as exc:  # the batch's images are errors, retryable when transient
                for i in todo:
                    preds[i] = self.client.failure(names[i], uids[i], exc, ages[i])
        for i in range(n):
            if preds[i] is None:
                preds[i] = self.client.refusal(Prepared(names[i], None, None, contract.Status(batch["status"][i]),
                                                        str(batch["reason"][i]), _refusal_of(str(batch["refusal"][i])),
                                                        age_years=ages[i]))
        rows = [to_row(p, str(batch["sha256"][i])) for i, p in enumerate(preds)]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def screen(address: str, todo: list[tuple[Path, str]], *, url: str | None, protocol: str, model: str,
           timeout_s: float, chunk: int, on_rows, tls=None, config_key: str | None = None,
           eligibility=None, operating_point: str | None = None) -> None:
    """Run the job on the cluster at ``address`` and hand result rows to ``on_rows`` in chunks (for the journal).

    ``eligibility`` overrides the served DICOM rules; without it the driver reads the served ones once, so that
    the preprocessing tasks refuse exactly what a local run would."""
    import ray

    from cxr.client import PneumoniaClient

    if eligibility is None:
        with PneumoniaClient(url, protocol=protocol, model=model, timeout_s=timeout_s, tls=tls,
                             config_key=config_key) as probe:
            eligibility = probe.eligibility

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
        pre = source.map_batches(_preprocess, fn_kwargs={"eligibility": eligibility}, batch_size=8, num_cpus=0.5,
                                 max_retries=-1)
        ds = pre.map_batches(_Screener, fn_constructor_args=(url, protocol, model, timeout_s, tls, config_key, eligibility,
                                                                       operating_point),
                             batch_size=32,
                             num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(nodes))),
                             max_restarts=-1, max_task_retries=-1)
        for batch in ds.iter_batches(batch_size=chunk, batch_format="numpy"):
            keys = list(batch)
            on_rows([{k: str(batch[k][i]) for k in keys} for i in range(len(batch[keys[0]]))])
    finally:
        ray.shutdown()
