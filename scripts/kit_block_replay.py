"""Add the block replay set to a COPY of a model folder's adapt kit (the measurement in docs/onboarding.md).

    python scripts/kit_block_replay.py model_repository/pneumonia out/with_replay/pneumonia

Takes up to ``adapt_kit.REPLAY_BLOCK_PER_CELL`` training films per (source, class) cell from the model's
``provenance.csv`` (the files must be readable here), and writes the copy's kit with their head replay features,
the shipped model's answers on them, and the input activations of its last ``REPLAY_BLOCK_CONVS`` convolutions.
The source folder is never modified.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from cxr.client.client import prepare
    from cxr.core.eligibility import Eligibility
    from cxr.core.model_dir import ModelDir
    from cxr.core.ort_session import served_outputs
    from cxr.export import adapt_kit, ood_head, repository
    from cxr.train.data import Sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("copy_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.copy_dir.exists():
        print(f"{a.copy_dir} exists; give a new folder", file=sys.stderr)
        return 2
    src = ModelDir(a.model_dir)
    model_path = src.verify()
    kit = adapt_kit.load(a.model_dir)
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in src.provenance():
        if r["role"] == "train":
            cells.setdefault((r["source"], r["label"]), []).append(r)
    rng = np.random.default_rng(a.seed)
    rules = Eligibility.load(repository.ensure_eligibility(a.model_dir))
    samples, xs = [], []
    for _, rows in sorted(cells.items()):
        for r in (rows[i] for i in rng.permutation(len(rows))[: adapt_kit.REPLAY_BLOCK_PER_CELL]):
            pre = prepare(Path(r["path"]), rules)
            if pre.array is not None:
                samples.append(Sample(Path(r["path"]), int(r["label"] == "Pneumonia"), r["patient"], r["source"]))
                xs.append(pre.array)
    x = np.stack(xs)
    extra = adapt_kit.block_arrays(model_path, kit.taps[0], x, np.arange(len(x)), samples)
    if not extra:
        print(f"{a.model_dir}: the graph's last block is not a Conv-ReLU chain; nothing to add", file=sys.stderr)
        return 2
    teacher, _ = served_outputs(model_path, x)
    gap = ood_head.FeatureExtractor(ood_head.strip(model_path), kit.taps[:1], log=False)(x)
    shutil.copytree(a.model_dir, a.copy_dir)
    with np.load(a.model_dir / adapt_kit.FILE_NAME, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(replay_gap=gap.astype(np.float32), replay_label=np.array([s.label for s in samples], np.int8),
                  replay_source=np.array([s.source for s in samples]),
                  replay_teacher=np.asarray(teacher, np.float32).reshape(-1), **extra)
    np.savez_compressed(a.copy_dir / adapt_kit.FILE_NAME, **arrays)
    print(f"{a.copy_dir}: {len(x)} replay films, block input {extra['replay_block'].shape[1:]}, "
          f"kit {(a.copy_dir / adapt_kit.FILE_NAME).stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
