"""``cxr``: one command for the whole stack.

Subcommands import their heavy dependencies (TensorFlow, tritonclient,
onnxruntime) lazily, so ``cxr predict`` works in a client-only install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from cxr.core import contract
from cxr.core.durable import write_durably
from cxr.core.errors import CxrError
from cxr.core.lifecycle import serve_until_signal
from cxr.core.model_dir import ModelCard, ModelDir
from cxr.core.paths import DEFAULT_CACHE, DEFAULT_MODEL, DEFAULT_REPOSITORY, REPO_ROOT

logger = logging.getLogger("cxr")

_EPILOG = """\
typical flow:
  cxr train --data ../shared/data/chest_xray --out runs/compact
  cxr evaluate --model runs/compact/model.keras --data ../shared/data/chest_xray_site
  cxr calibrate --model runs/compact/model.keras --data ../shared/data/chest_xray_site
  cxr export --model runs/compact/model.keras --data ../shared/data/chest_xray --site ../shared/data/chest_xray_site
  cxr serve &            # embedded CPU Triton on 127.0.0.1:8000/8001/8002
  cxr predict ../shared/data/chest_xray_fullres --protocol grpc --format csv --out results.csv

every answer has a status: ok (Normal/Pneumonia), not_assessable (no label, a reason naming the
rule: route it to a human reader) or error (unreadable input, or a server failure to retry).
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on the Kaggle layout",
        description="Train on DATA/train/{NORMAL,PNEUMONIA} with a patient-grouped, stratified, seeded "
        "validation split carved from train. Writes model.keras, split.json, history.json, "
        "accuracy.png and loss.png into --out.",
    )
    p.add_argument("--data", type=Path, help="Kaggle-layout root (holds train/); not with --split")
    p.add_argument("--split", type=Path, metavar="SPLIT_JSON",
                   help="a locked split (`cxr lock-split`): its train side trains, its select side chooses the "
                   "checkpoint, its test side is never read")
    p.add_argument("--leave-out", action="append", default=[], metavar="SOURCE",
                   help="with --split: leave this source out of training and selection (repeatable; "
                   "leave-one-source-out runs and ablations)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="a further labelled source {NORMAL,PNEUMONIA}/ (optional MANIFEST.csv with patients), split by "
                   "patient and sampled so that source and class stay apart (repeatable)")
    p.add_argument("--source-val-fraction", type=float, default=0.3,
                   help="share of each further source's patients held out for validation (default 0.3)")
    p.add_argument("--acquisition", action="store_true",
                   help="acquisition augmentation: borders, crops and burned-in markers, wider exposure and gamma")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")
    p.add_argument("--arch", default="compact", choices=["compact", "inception_v3"], help="architecture (default: compact)")
    p.add_argument("--weights", type=Path, help="local InceptionV3 base weights (frozen when given); nothing is downloaded")
    p.add_argument("--epochs", type=int, default=14, help="maximum epochs (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and augmentation")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of patients held out for validation")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs)")
    p.add_argument("--no-augment", action="store_true", help="disable all augmentation")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip (flipping mirrors the heart)")
    p.add_argument("--no-photometric", action="store_true", help="only the report's geometric augmentation")
    p.add_argument("--monitor", type=Path, help="external labelled folder scored each epoch (e.g. the site sample)")
    p.add_argument("--select-on", choices=["val", "monitor", "sources"], default="val",
                   help="checkpoint/early-stop metric: pooled validation AUC, --monitor AUC, or the mean of the "
                   "per-source validation AUCs (with --source)")
    p.add_argument("--limit-per-class", type=int, help="use at most N train images per class (smoke runs)")
    p.add_argument("--width", type=int, default=16, help="compact CNN width multiplier")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="decoded-image cache")
    p.add_argument(
        "--time-budget", type=float, metavar="MINUTES",
        help="wall-clock cap on the whole run; training stops in time for the last validation, and the "
        "learning rate anneals over whichever ends first, the epochs or the budget",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from cxr.train.augment import AugmentConfig
    from cxr.train.data import Source
    from cxr.train.trainer import TrainConfig, train

    augment = None if a.no_augment else AugmentConfig(flip=not a.no_flip, photometric=not a.no_photometric,
                                                      acquisition=a.acquisition)
    if (a.data is None) == (a.split is None):
        raise CxrError("cxr train: give --data (a split is made) or --split (a locked split), one of them")
    if a.split is not None and a.select_on == "val":
        a.select_on = "sources"
    cfg = TrainConfig(
        split_file=a.split, leave_out=tuple(a.leave_out),
        data_dir=a.data or Path("."), out_dir=a.out, arch=a.arch, epochs=a.epochs, batch_size=a.batch_size,
        learning_rate=a.lr, seed=a.seed, val_fraction=a.val_fraction, patience=a.patience,
        augment=augment, weights=a.weights, monitor_dir=a.monitor, select_on=a.select_on,
        limit_per_class=a.limit_per_class, cache_dir=a.cache_dir, width=a.width,
        time_budget_s=None if a.time_budget is None else a.time_budget * 60,
        sources=tuple(Source.parse(t) for t in a.source), source_val_fraction=a.source_val_fraction,
    )
    result = train(cfg)
    print(f"model: {result.model_path}  best epoch {result.best_epoch} (score {result.best_score:.4f})  {result.seconds:.0f} s")
    return 0


def _add_lock_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lock-split",
        help="lock every source's patients into train, select and test",
        description="Split each labelled source by patient (per class) into train, select and test, once. "
        "Select chooses everything (checkpoint, calibration, operating points, the OOD fit); test is read only "
        "by `cxr claims`. A source whose select and test shares reach 1 never trains (a deployment-site sample).",
    )
    p.add_argument("out", type=Path, help="the split file to write (JSON; commit it)")
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH[:SELECT:TEST]",
                   help="a labelled source {NORMAL,PNEUMONIA}/ with optional MANIFEST.csv patients, and its select "
                   "and test shares (default 0.2:0.25); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.set_defaults(func=_cmd_lock_split)


def _cmd_lock_split(a: argparse.Namespace) -> int:
    from cxr.train import data as data_mod

    plan = []
    for text in a.source:
        spec, _, shares = text.partition(":")
        try:
            select, test = (float(v) for v in (shares or "0.2:0.25").split(":"))
            lock = data_mod.LockShares(select, test)
        except ValueError as exc:
            raise CxrError(f"--source {text!r}: shares are SELECT:TEST in [0, 1) ({exc})") from None
        src = data_mod.Source.parse(spec)
        plan.append((src, data_mod.source_samples(src), lock))
    split = data_mod.make_locked_split(plan, seed=a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    split.save(a.out)
    for side in ("train", "select", "test"):
        samples = split.samples(side)
        by_source: dict[str, list] = {}
        for s in samples:
            cell = by_source.setdefault(s.source, [0, 0, set()])
            cell[s.label] += 1
            cell[2].add(s.patient)
        text = ", ".join(f"{k} {v[0]}N/{v[1]}P ({len(v[2])} patients)" for k, v in sorted(by_source.items()))
        print(f"{side:<6} {len(samples):>5} films: {text}")
    print(f"written {a.out}")
    return 0


def _add_operating_points(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "operating-points",
        help="choose a named operating point per population on select patients",
        description="Score the locked split's select side with the served graph and choose one threshold per "
        "population, each on its own population's select patients. The card records each point (rule, sources, "
        "select figures, labelled in-sample) and the configs serve them; `cxr predict --operating-point NAME` "
        "picks one.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder in the repository")
    p.add_argument("--also", action="append", default=[], metavar="NAME",
                   help="another model folder that gets the same points (e.g. the INT8 twin)")
    p.add_argument("--split", type=Path, required=True, help="the locked split (`cxr lock-split`)")
    p.add_argument("--point", action="append", required=True, metavar="NAME=SOURCE[+SOURCE]:RULE[:TARGET]",
                   help="a point and how it is chosen, e.g. pediatric=kaggle_site:sensitivity:0.97 "
                   "(rules: sensitivity, sensitivity_lcb, youden); repeatable")
    p.add_argument("--default", help="the point a client gets when it names none (default: the most sensitive)")
    p.set_defaults(func=_cmd_operating_points)


def _cmd_operating_points(a: argparse.Namespace) -> int:
    from cxr.export.claims_report import PointRule, choose_points
    from cxr.export.onnx_export import command_line

    rules = [PointRule.parse(t) for t in a.point]
    res = choose_points([a.repository / a.name, *(a.repository / n for n in a.also)], a.split, rules,
                        default=a.default, cache_dir=DEFAULT_CACHE, command=command_line())
    for name, pt in res["points"].items():
        f = pt["select_figures_in_sample"]
        print(f"{name:<10} threshold {pt['threshold']:.4f} ({pt['rule']} on select {'+'.join(pt['chosen_on']['sources'])}:"
              f" sensitivity {f['sensitivity']:.3f} ({f['tp']}/{f['n_pos']}), specificity {f['specificity']:.3f} "
              f"({f['tn']}/{f['n_neg']}), in-sample)" + ("  [default]" if name == res["default"] else ""))
    return 0


def _add_claims(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "claims",
        help="measure claims.json on the locked test patients (read once)",
        description="Read the locked split's test side once, score it with the served graph and write the model "
        "folder's claims.json: every source at every operating point, 95%% intervals from a patient bootstrap. "
        "The test films are recorded in provenance.csv with the role test; nothing measured here chooses anything.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder in the repository")
    p.add_argument("--split", type=Path, required=True, help="the locked split (`cxr lock-split`)")
    p.add_argument("--population", action="append", required=True, metavar="SOURCE=POPULATION",
                   help="who a test source's patients are (kaggle_site=pediatric); repeatable")
    p.set_defaults(func=_cmd_claims)


def _cmd_claims(a: argparse.Namespace) -> int:
    from cxr.export.claims_render import claims_markdown
    from cxr.export.claims_report import measure_claims
    from cxr.export.onnx_export import command_line

    populations = {}
    for t in a.population:
        k, sep, v = t.partition("=")
        if not sep or not k or not v:
            raise CxrError(f"--population {t!r}: expected SOURCE=POPULATION")
        populations[k] = v
    claims = measure_claims(a.repository / a.name, a.split, populations, cache_dir=DEFAULT_CACHE,
                            command=command_line())
    print(claims_markdown(claims, own_population_only=False))
    return 0


def _add_trials(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trials",
        help="training runs side by side on a locked split: AUC per source, leave-one-source-out, source probe",
        description="Score each run's Keras model on the locked split's select and test sides (AUC per source with "
        "patient-bootstrap intervals; a source the run left out is marked LOSO), and probe how well the first "
        "run's penultimate features tell the sources apart among Pneumonia films (patient-grouped 5-fold "
        "cross-validation). Writes trials.md and trials.json into --out.",
    )
    p.add_argument("--split", type=Path, required=True, help="the locked split")
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR[:WHAT]",
                   help="a training run to report (repeatable; the first is probed)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "model" / "locked", help="report folder")
    p.set_defaults(func=_cmd_trials)


def _cmd_trials(a: argparse.Namespace) -> int:
    from cxr.train.trials import Trial, run

    trials = []
    for text in a.run:
        name, sep, rest = text.partition("=")
        run_dir, _, what = rest.partition(":")
        if not sep or not run_dir:
            raise CxrError(f"--run {text!r}: expected NAME=RUN_DIR[:WHAT]")
        try:
            trials.append(Trial(name, Path(run_dir), what))
        except FileNotFoundError as exc:
            raise CxrError(str(exc)) from None
    run(trials, a.split, a.out, cache_dir=DEFAULT_CACHE)
    print((a.out / "trials.md").read_text())
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics with bootstrap intervals, plots and reports",
        description="Evaluate a .keras (with its calibration.json) or .onnx model on a labelled folder "
        "({NORMAL,PNEUMONIA}/ or a Kaggle root's test/). Writes report.json, report.md and ROC, PR, "
        "reliability and confusion PNGs.",
    )
    p.add_argument("--model", type=Path, required=True, help="model.keras or model.onnx")
    p.add_argument("--data", type=Path, required=True, help="labelled folder")
    p.add_argument("--out", type=Path, help="report folder (default: eval_<data name> beside the model)")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--split", type=Path, help="a run's split.json: evaluate its validation side (DATA is the Kaggle root)")
    p.add_argument("--source", help="with --split: only this source's validation films (e.g. nih)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from cxr.train.evaluate import evaluate, summary_lines

    if a.source and not a.split:
        raise CxrError("--source needs --split")
    default = (f"eval_val_{a.source}" if a.source else "eval_trainval") if a.split else f"eval_{a.data.resolve().name}"
    out = a.out or a.model.parent / default
    rep = evaluate(a.model, a.data, out, threshold=a.threshold, n_boot=a.n_boot, cache_dir=DEFAULT_CACHE,
                   split_file=a.split, source=a.source)
    print("\n".join(summary_lines(rep, title=rep["title"])))
    for r in rep["refused"]:
        print(f"refused ({r['label']}): {r['reason']}")
    print(f"reports and plots in {out}")
    return 0 if rep["n"] else 1


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="several models side by side on one labelled sample, with their training time",
        description=textwrap.fill(
            "Score every --model on the same labelled folder at its own stored threshold (bootstrap "
            "intervals) and tabulate it beside how it was trained (architecture, parameters, epochs, time budget, "
            "training time). Published figures go in as --quoted rows, labelled as quoted, not measured. Writes "
            "comparison.md, comparison.json and comparison_roc.png.", 79,
        ),
        epilog="example:\n  cxr compare --data ../shared/data/chest_xray_site --out docs/model/comparison \\\n"
        "      --model default=model_repository/pneumonia --model inception=runs/inception/model.keras \\\n"
        "      --quoted 'report, InceptionV3 (ImageNet)=80.9%=its own test split'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a run's model.keras or a model-repository directory (repeat for each model)")
    p.add_argument("--data", type=Path, required=True, help="labelled folder ({NORMAL,PNEUMONIA}/)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--quoted", action="append", default=[], metavar="LABEL=ACCURACY[=SOURCE]",
                   help="a published accuracy, shown as quoted, not measured (repeatable)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the report's reading notes, e.g. the conditions of a run (repeatable)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(a: argparse.Namespace) -> int:
    from cxr.train.compare import compare, parse_quoted

    entries = []
    for item in a.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CxrError(f"--model {item!r}: expected NAME=PATH")
        entries.append((name, Path(path)))
    compare(entries, a.data, a.out, quoted=[parse_quoted(q) for q in a.quoted], notes=a.note, n_boot=a.n_boot,
            cache_dir=DEFAULT_CACHE)
    print((a.out / "comparison.md").read_text())
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the decision threshold (and probability scaling) on a labelled site sample",
        description="What a hospital does before go-live: on a labelled local sample, choose the threshold by a "
        "rule. sensitivity_lcb (default): the highest threshold whose one-sided Clopper-Pearson lower confidence "
        "bound of sensitivity, at --confidence, meets --target, so the promise holds on unseen images of the "
        "same kind, not only in-sample; sensitivity: the point estimate meets --target; youden: Youden's J. "
        "On a training run's model.keras it also fits probability scaling (Platt by default) and stores "
        "calibration.json for `cxr export`. On an exported model folder (<repository>/<model>) it keeps the "
        "scaling baked into the graph, sets the threshold from the served probabilities, and rewrites the "
        "model card and Triton configs (of every --also folder too).",
    )
    p.add_argument("--model", type=Path, required=True, help="model.keras, or an exported model folder")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="labelled site folder {NORMAL,PNEUMONIA}/, or several pooled (e.g. two hospitals' samples)")
    p.add_argument("--rule", choices=["sensitivity_lcb", "sensitivity", "youden"], default="sensitivity_lcb", help="threshold rule (default sensitivity_lcb)")
    p.add_argument("--target", "--target-sensitivity", type=float, default=0.95, dest="target",
                   help="sensitivity target (default 0.95)")
    p.add_argument("--confidence", type=float, default=0.9, help="confidence of the lower bound (default 0.9)")
    p.add_argument("--scaling", choices=["platt", "temperature", "none"], default="platt", help="model.keras only")
    p.add_argument("--also", type=Path, nargs="*", default=[], help="exported folders that share the threshold (INT8)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a: argparse.Namespace) -> int:
    if a.model.is_dir():
        from cxr.export import repository
        from cxr.export.onnx_export import command_line

        r = repository.recalibrate([a.model, *a.also], a.data, rule=a.rule, target=a.target, confidence=a.confidence,
                                   cache_dir=DEFAULT_CACHE, command=command_line())
        print(f"threshold {r['threshold']:.4f} ({a.rule}) on {r['n_used']} site images ({r['n_refused_ood']} refused "
              f"as out of distribution): sensitivity {r['sensitivity']:.3f} ({r['tp']}/{r['n_pos']}, lower bound "
              f"{r['sensitivity_lower_bound']:.3f} at {a.confidence:.0%}), specificity {r['specificity']:.3f}, "
              f"accuracy {r['accuracy']:.3f}, AUC {r['roc_auc']:.3f} (in-sample)")
        print(f"model card and configs rewritten in {', '.join(str(d) for d in [a.model, *a.also])}")
        return 0
    from cxr.train.evaluate import calibrate

    cal = calibrate(a.model, a.data, rule=a.rule, target=a.target, confidence=a.confidence, scaling=a.scaling,
                    cache_dir=DEFAULT_CACHE)
    m = cal.metrics
    print(f"threshold {cal.threshold:.4f} ({cal.rule}), scaling {cal.scaling} (scale {cal.scale:.4f}, bias {cal.bias:.4f})")
    print(f"on {cal.n_images} site images (in-sample): sensitivity {m['sensitivity']:.3f} (lower bound "
          f"{m['sensitivity_lower_bound']:.3f} at {a.confidence:.0%}), specificity {m['specificity']:.3f}, "
          f"accuracy {m['accuracy']:.3f}, AUC {m['roc_auc']:.3f}, ECE {m['ece']:.3f}")
    print(f"written {a.model.parent / 'calibration.json'}")
    return 0


def _add_ood_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ood-fit",
        help="fit the model's ood_score output (out-of-distribution refusal) and its threshold",
        description="Add (or refit) the second output, ood_score, of an exported model: the Mahalanobis distance "
        "of its pooled features from the training images' features, computed in the ONNX graph. The threshold "
        "keeps 99.5%% of the train-validation images and of the site sample. Rewrites the model file, its "
        "sha256, the model card and the Triton configs. No out-of-distribution data is used to fit it.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder")
    p.add_argument("--data", type=Path, required=True, help="Kaggle-layout root the model was trained on")
    p.add_argument("--split", type=Path, required=True, help="the training run's split.json")
    p.add_argument("--site", type=Path, help="labelled site sample (counts towards the threshold)")
    p.add_argument("--not-chest", type=Path, metavar="DIR",
                   help="radiographs of other body parts (DIR/<part>/*) for the body-part check (with the local corpus)")
    p.add_argument("--no-body-part", action="store_true", help="the feature distance alone, no body-part check")
    p.set_defaults(func=_cmd_ood_fit)


def _cmd_ood_fit(a: argparse.Namespace) -> int:
    from cxr.export import repository
    from cxr.export.onnx_export import command_line

    r = repository.refit_ood(a.repository / a.name, data_dir=a.data, split_file=a.split, site_dir=a.site,
                             cache_dir=DEFAULT_CACHE, command=command_line(), non_chest_dir=a.not_chest,
                             body_part=not a.no_body_part)
    print(f"ood_score: {r['features']} features, shrinkage {r['shrinkage']:.3g}, threshold {r['threshold']:.4f}; "
          + ", ".join(f"{k}: {v:.2%} of {r['n'][k]} flagged" for k, v in r["flagged"].items()))
    return 0


def _add_ood_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ood-eval",
        help="refusal rates on non-chest inputs and on real chest X-rays (docs/model/ood.md)",
        description="Run every refusal rule (DICOM header rules, pixel rules, the served ood_score) over a corpus "
        "of inputs that are not frontal chest X-rays (generated blanks, noise, text, screenshots and colour "
        "images; real photographs and other modalities shipped in scikit-image, matplotlib and pydicom-data; "
        "inverted and rotated X-rays from --xrays) and over real chest X-ray folders. Writes Markdown, JSON "
        "and a PNG of score distributions.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder in the repository")
    p.add_argument("--real", type=Path, nargs="*", default=[], help="folders of real chest X-rays (flag rate)")
    p.add_argument("--split", type=Path, help="a run's split.json: its validation side under --data is a real set")
    p.add_argument("--data", type=Path, help="Kaggle-layout root for --split")
    p.add_argument("--xrays", type=Path, help="labelled chest X-ray folder to invert and rotate")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "model", help="report or result file/folder to write")
    p.set_defaults(func=_cmd_ood_eval)


def _cmd_ood_eval(a: argparse.Namespace) -> int:
    from cxr.export.ood_eval import OodEvalConfig, run

    rep = run(OodEvalConfig(repository=a.repository, model=a.name, real_dirs=tuple(a.real), split_file=a.split,
                            data_dir=a.data, xray_folder=a.xrays, out_dir=a.out, cache_dir=DEFAULT_CACHE))
    print((a.out / "ood.md").read_text())
    return 0 if rep["meets_targets"] else 1


def _add_explain_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain-eval",
        help="measure which Grad-CAM stage explains the served model best (docs/model/gradcam.md)",
        description="On films the served model answers Pneumonia, compare Grad-CAM at each stage (and a random "
        "map) by deletion: grey out the top 5/10/20%% of pixels by the map and measure the fall of P(pneumonia). "
        "Also reports the model-randomisation sanity check and where the peaks fall.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder in the repository")
    p.add_argument("--data", type=Path, required=True, help="labelled folder {NORMAL,PNEUMONIA}/")
    p.add_argument("--limit", type=int, default=60, help="films used at most")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "model", help="report or result file/folder to write")
    p.set_defaults(func=_cmd_explain_eval)


def _cmd_explain_eval(a: argparse.Namespace) -> int:
    from cxr.train.explain_eval import ExplainEvalConfig, run

    run(ExplainEvalConfig(repository=a.repository, model=a.name, data=a.data, out_dir=a.out, limit=a.limit))
    print((a.out / "gradcam.md").read_text())
    return 0


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configs",
        help="regenerate a model's Triton configs from its model card and eligibility.json",
        description="Rewrite config.pbtxt and configs/*.pbtxt of exported models from model_card.json (threshold, "
        "operating points, OOD threshold, sha256) and eligibility.json (the DICOM rules a site may edit); "
        "--default-operating-point sets the site's default point first.",
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", nargs="*", help="model folders (default: every model with a card)")
    p.add_argument("--default-operating-point", metavar="NAME",
                   help="a site's default: the operating point an input gets when none is named and its age does "
                   "not choose (one of the card's points; served as threshold)")
    p.set_defaults(func=_cmd_configs)


def _cmd_configs(a: argparse.Namespace) -> int:
    from cxr.export import repository

    names = a.name or sorted(p.parent.name for p in a.repository.glob("*/model_card.json"))
    for n in names:
        if a.default_operating_point:
            repository.set_default_point(a.repository / n, a.default_operating_point)
        for path in repository.write_configs(a.repository / n):
            print(path)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX (FP32 + INT8) or TensorRT with parity checks, into the Triton repository",
        description="Convert model.keras with tf2onnx (uint8 input 'image', output 'probability', dynamic "
        "batch 'batch', calibration baked in), check parity against Keras on validation images (names, "
        "shapes, max |dp| <= 1e-5, identical labels), quantize to INT8 (QDQ, refused if validation AUC "
        "drops > 0.005), and write model files, Triton configs and the model card. --format tensorrt "
        "builds a TensorRT plan from the exported ONNX on a GPU host.",
    )
    p.add_argument("--model", type=Path, help="model.keras (onnx format)")
    p.add_argument("--data", type=Path, help="Kaggle-layout root used for training (parity and INT8 calibration images)")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder name")
    p.add_argument("--site", type=Path, help="labelled site sample; the OOD threshold keeps 99.5%% of it too")
    p.add_argument("--not-chest", type=Path, metavar="DIR",
                   help="radiographs of other body parts (DIR/<part>/*), with the local corpus the fit of the "
                   "body-part check folded into ood_score")
    p.add_argument("--split", type=Path, help="the model's split (default: split.json beside --model)")
    p.add_argument("--version", type=int, default=1, help="model version folder")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 model")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="onnx (default) or a TensorRT plan from the exported ONNX")
    p.add_argument("--fp16", action="store_true", help="TensorRT: build an FP16 engine")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a: argparse.Namespace) -> int:
    if a.format == "tensorrt":
        from cxr.export.tensorrt import build_plan

        onnx_path = a.repository / a.name / str(a.version) / "model.onnx"
        plan = build_plan(onnx_path, onnx_path.with_name("model.plan"), fp16=a.fp16)
        print(f"TensorRT plan: {plan}")
        return 0
    if a.model is None:
        raise CxrError("--model is required for --format onnx")
    from cxr.export.onnx_export import ExportConfig, command_line, export

    cfg = ExportConfig(model_path=a.model, data_dir=a.data, repository=a.repository, model_name=a.name,
                       version=a.version, opset=a.opset, int8=not a.no_int8, command=command_line(),
                       cache_dir=DEFAULT_CACHE, site_dir=a.site, non_chest_dir=a.not_chest, split_file=a.split)
    results = export(cfg)
    for prec, r in results.items():
        if prec == "ood":
            for name, o in r.items():
                print(f"{name}: ood_score threshold {o['threshold']:.4f}, flagged {o['flagged']}")
            continue
        par = r["parity"]
        print(f"{prec}: {r['path']}  max|dp| {par['max_abs_diff']:.2e}  labels agree {par['label_agreement']:.4f}  "
              f"val AUC {r['val_auc']:.4f}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the embedded CPU Triton (real tritonserver from the nvidia-pytriton wheel)",
        description="Start tritonserver on loopback with the model repository, wait until ready, print the "
        "URLs, and stop cleanly on Ctrl-C or SIGTERM. Model sha256s are checked against their model cards "
        "first; a mismatch refuses to serve.",
    )
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--model-config-name", default="cpu", help="configs/<name>.pbtxt per model ('' = config.pbtxt)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--models", nargs="*", default=[], help="load only these models")
    p.add_argument("--timeout-s", type=float, default=120.0, help="readiness deadline")
    g = p.add_argument_group("transport security")
    g.add_argument("--tls-cert", type=Path, help="server certificate (PEM): gRPC speaks TLS; HTTP and metrics stay on loopback")
    g.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    g.add_argument("--tls-client-ca", type=Path, help="CA of accepted client certificates: TLS becomes mutual")
    g.add_argument("--admin-key-file", type=Path,
                   help="restrict model-repository, shared-memory, statistics, trace and logging to header admin-key")
    g.add_argument("--config-key-file", type=Path, help="restrict model-config to header config-key (the clients' key)")
    g.add_argument("--allow-insecure", action="store_true", help="allow a non-loopback --host without TLS (not for patient data)")
    p.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append start, stop, the served models and every change of them (admin API loads and "
                   "unloads) to this hash-chained audit trail")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:

    from cxr.core.security import TlsServer
    from cxr.serving.server import ServerConfig, TritonServer

    if (a.tls_cert is None) != (a.tls_key is None) or (a.tls_client_ca and not a.tls_cert):
        raise CxrError("give --tls-cert and --tls-key together (and --tls-client-ca only with them)")
    try:
        tls = TlsServer(a.tls_cert, a.tls_key, a.tls_client_ca) if a.tls_cert else None
        cfg = ServerConfig(model_repository=a.model_repository, model_config_name=a.model_config_name or None,
                           host=a.host, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                           models=tuple(a.models), startup_timeout_s=a.timeout_s, tls=tls,
                           admin_key_file=a.admin_key_file, config_key_file=a.config_key_file,
                           allow_insecure=a.allow_insecure)
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    audit = None
    if a.audit_log is not None:
        from cxr.core.audit_trail import AuditLog, default_actor

        audit, me = AuditLog(a.audit_log, component="cxr serve"), default_actor()
    try:
        with TritonServer(cfg) as server:
            alive = server.running
            if audit is not None:  # the served models are on record before anyone is told the server is ready
                alive = _audited_serving(server, audit, me, cfg.model_repository)
            tls_note = (" (TLS" + (", mutual" if cfg.tls.mutual else "") + ")") if cfg.tls else ""
            print(f"Triton ready (pid {server.pid}):\n  HTTP    http://{cfg.http_url}\n  gRPC    {cfg.grpc_url}{tls_note}\n"
                  f"  metrics {cfg.metrics_url}\nCtrl-C to stop.", flush=True)
            serve_until_signal(alive)
            if not server.running():
                raise CxrError(f"tritonserver exited:\n{server.log_tail()}")
            print("stopping Triton ...", flush=True)
    finally:
        if audit is not None:
            audit.event("stopped", actor=me)
            audit.close()
    return 0


def _audited_serving(server, audit, me: str, repository: Path, *, every_s: float = 5.0):  # type: ignore[no-untyped-def]
    """Record the start and the served models, and return a liveness check that also records every change of the
    repository index (a model loaded, unloaded or replaced through the admin API) as it is seen."""
    import time

    from cxr.core.model_dir import ModelDir

    def sha_of(name: str) -> str:
        folder = ModelDir(Path(repository) / name)
        return folder.card().sha256 if folder.has_card() else ""

    audit.event("started", actor=me, http=server.config.http_url, grpc=server.config.grpc_url)
    last = server.model_states()
    for name, (version, state) in sorted(last.items()):
        audit.event("model_changed", actor=me, model_sha256=sha_of(name), model=name, version=version, state=state)
    seen = [time.monotonic(), last]

    def alive() -> bool:
        if time.monotonic() - seen[0] >= every_s:
            now = server.model_states()
            seen[0] = time.monotonic()
            if now and now != seen[1]:
                for name in sorted(set(now) | set(seen[1])):
                    if now.get(name) != seen[1].get(name):
                        version, state = now.get(name, ("", "UNLOADED"))
                        audit.event("admin_api", actor="api:admin-key" if server.config.admin_key_file
                                    else "api:repository", model=name, change=f"{seen[1].get(name)} -> {(version, state)}")
                        audit.event("model_changed", actor=me, model_sha256=sha_of(name), model=name, version=version,
                                    state=state)
                seen[1] = now
        return server.running()

    return alive


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server host:port (default 127.0.0.1:8001 gRPC / :8000 HTTP); for embedded, the repository")
    p.add_argument("--protocol", choices=["grpc", "http", "embedded"], default="grpc", help="grpc, http, or embedded (in-process onnxruntime, no server)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline")
    _add_tls_client_args(p)


def _add_tls_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transport security")
    g.add_argument("--tls-ca", type=Path, help="CA bundle the server's certificate must verify against (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate, for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="this client's private key, for mutual TLS")
    g.add_argument("--config-key-file", type=Path, help="key for a server that restricts model-config (header config-key)")


def _client_security(a: argparse.Namespace) -> dict:
    """``tls`` and ``config_key`` keyword arguments for PneumoniaClient from the TLS options."""
    from cxr.core.security import TlsClient, read_key

    if (a.tls_cert or a.tls_key) and not a.tls_ca:
        raise CxrError("--tls-cert/--tls-key need --tls-ca (the CA that signed the server's certificate)")
    try:
        tls = TlsClient(ca=a.tls_ca, cert=a.tls_cert, key=a.tls_key) if a.tls_ca else None
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    key = read_key(a.config_key_file, "config key") if a.config_key_file else None
    return {"tls": tls, "config_key": key}


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files or folders",
        description="Classify JPEG/PNG/DICOM files (folders are walked). Every input gets exactly one answer: "
        "status ok (label Normal/Pneumonia and P(pneumonia)), not_assessable (no label; the reason names the "
        "rule: DICOM header, blank, colour, aspect ratio, or out of distribution) or error (a one-line reason). "
        "Exit code 0 when every input has an answer that is not an error, 1 otherwise. With --format csv "
        "--out results.csv, each chunk is journaled durably beside the CSV; a rerun retries transient "
        "failures (server unavailable, deadline, overload, server error) and changed files, keeps final "
        "answers, and rewrites the CSV atomically with one row per input. With --dicomweb the inputs are the "
        "instances of the studies a DICOMweb server finds (QIDO-RS, then WADO-RS), and the CSV's path is each "
        "instance's SOP Instance UID. --fhir-out/--fhir-url give the EHR a DiagnosticReport and an Observation per "
        "answered input; --priority urgent sends ahead of routine work; --audit-log records every event.",
    )
    p.add_argument("inputs", nargs="*", type=Path, help="files or folders (none with --dicomweb)")
    _add_client_args(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="table (people), json or csv (pipelines)")
    p.add_argument("--out", type=Path, help="write results here (csv: resumable, one row per input)")
    p.add_argument("--chunk", type=int, default=64, help="images preprocessed, sent and journaled per step")
    p.add_argument("--eligibility", type=Path, help="DICOM eligibility rules file (default: the served model's)")
    p.add_argument("--retries", type=int, default=6, help="tries per request before its images are left for a rerun")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster (host:port, or auto): preprocessing as CPU tasks, inference in an actor "
                   "pool (the --url fleet, or embedded onnxruntime); needs the ray extra and shared input paths")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics of the answers on 127.0.0.1:PORT while the run lasts")
    p.add_argument("--metrics-file", type=Path, help="write the metrics (Prometheus text format) here after every chunk")
    p.add_argument("--dicomweb", metavar="URL",
                   help="read the inputs from this DICOMweb root (e.g. http://127.0.0.1:8042/dicom-web): QIDO-RS finds "
                   "the studies, WADO-RS reads every instance")
    p.add_argument("--study", action="append", default=[], metavar="UID",
                   help="with --dicomweb: screen this study (Study Instance UID; repeatable)")
    p.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="with --dicomweb: a QIDO-RS study filter, e.g. ModalitiesInStudy=DX or StudyDate=20261201- "
                   "(repeatable)")
    _add_result_doors(p)
    p.add_argument("--priority", choices=sorted(contract.PRIORITIES), default=contract.DEFAULT_PRIORITY,
                   help="Triton priority level of the requests: urgent is batched before routine work")
    _add_operating_point(p)
    p.set_defaults(func=_cmd_predict)


def _add_operating_point(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operating-point", metavar="NAME",
                   help="answer at this served operating point (e.g. pediatric, adult; `cxr health` lists them); "
                   "default: a DICOM input's patient age chooses its population's point, any other input gets the "
                   "model's default point")


def _add_result_doors(p: argparse.ArgumentParser) -> None:
    """FHIR results and the audit trail: the same flags on predict and listen."""
    p.add_argument("--fhir-out", type=Path, metavar="FILE",
                   help="write the FHIR R4 results (DiagnosticReport, Observation, Device): predict writes one "
                   "transaction Bundle; listen appends NDJSON, one transaction Bundle per screened instance a line")
    p.add_argument("--fhir-url", metavar="URL", help="POST the FHIR results to this FHIR server's base URL")
    p.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append every event (received, screened, delivered, failed) to this hash-chained audit trail "
                   "(verify it with `cxr audit-log verify FILE`)")


def _check_url(value: str | None, flag: str) -> None:
    """An http(s) URL with a host, or a one-line error naming the flag (credentials never echoed)."""
    from urllib.parse import urlsplit

    from cxr.core.security import redact_url

    if value is None:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise CxrError(f"{flag} {redact_url(value)!r}: expected an http:// or https:// URL with a host")


def _check_predict_args(a: argparse.Namespace) -> None:
    """Misuse of ``cxr predict`` refused in one line before anything starts."""
    _check_url(a.dicomweb, "--dicomweb")
    _check_url(a.fhir_url, "--fhir-url")
    if not a.inputs and not a.dicomweb:
        raise CxrError("no input: give files or folders, or --dicomweb URL")
    if a.study and a.query:
        raise CxrError("--study names the studies, --query searches for them: give one or the other")
    if a.query:
        from cxr.hospital.dicomweb import parse_query

        parse_query(a.query)  # unknown or malformed keys refused here
    if a.priority != contract.DEFAULT_PRIORITY and a.protocol == "embedded":
        raise CxrError(f"--priority {a.priority} orders requests in Triton's queue; --protocol embedded has no "
                       "queue: drop --priority or use --protocol grpc/http")


def _cmd_predict(a: argparse.Namespace) -> int:
    from cxr.client.batch import PredictOptions, run_predict
    from cxr.hospital.dicomweb import DicomWebSource
    from cxr.hospital.fhir import FhirDelivery

    _check_predict_args(a)
    try:
        opts = PredictOptions(inputs=tuple(a.inputs), url=a.url, protocol=a.protocol, model=a.model,
                              timeout_s=a.timeout_s, format=a.format, out=a.out, chunk=a.chunk,
                              eligibility=a.eligibility, retries=a.retries, ray=a.ray,
                              metrics_port=a.metrics_port, metrics_file=a.metrics_file,
                              dicomweb=a.dicomweb, studies=tuple(a.study), query=tuple(a.query),
                              priority=a.priority, fhir_out=a.fhir_out, fhir_url=a.fhir_url,
                              audit_log=a.audit_log, operating_point=a.operating_point,
                              **_client_security(a))
    except ValueError as exc:
        raise CxrError(f"--{str(exc)}" if str(exc).startswith(("chunk", "retries")) else str(exc)) from None
    return run_predict(opts, source=DicomWebSource.of(opts), delivery=FhirDelivery.of(opts))


def _add_health(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="server and model readiness and metadata",
        description="Ask the server whether it and the model are ready, and print what a client learns from it as "
        "JSON: model name and version, max batch size, decision threshold, labels, outputs, OOD threshold, model "
        "sha256 and the DICOM eligibility rules. Exit code 0 when ready, 1 otherwise.",
    )
    _add_client_args(p)
    p.set_defaults(func=_cmd_health)


def _cmd_health(a: argparse.Namespace) -> int:
    import json

    from cxr.client import PneumoniaClient, RetryPolicy

    with PneumoniaClient(a.url, protocol=a.protocol, model=a.model, timeout_s=a.timeout_s, **_client_security(a),
                         retry=RetryPolicy(attempts=1)) as c:
        ready = c.ready()
        info = c.info
        print(json.dumps({"ready": ready, "protocol": a.protocol, "model": info.name, "version": info.version,
                          "max_batch_size": info.max_batch_size, "threshold": info.threshold,
                          "labels": list(info.labels), "outputs": list(info.outputs),
                          "operating_points": dict(info.operating_points) or None,
                          "default_operating_point": info.default_operating_point or None,
                          "ood_threshold": info.ood_threshold, "sha256": info.sha256,
                          "eligibility": json.loads(info.eligibility) if info.eligibility else None,
                          "server": c.server_metadata()},
                         indent=1, default=str))
        return 0 if ready else 1


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="serving benchmarks as side-by-side ratios (JSON + table)",
        description="Measure, in one run on this machine: raw onnxruntime throughput, Triton gRPC over it, "
        "dynamic batching gain at 16 concurrent requests (with p99s), tail latency at concurrency 1 and 8 "
        "(p99 over p50, stalls over 250 ms per 1000 requests) for the shipped config and the earlier one side by "
        "side, the project client over NVIDIA's perf_analyzer at the same concurrency, INT8 speed-up, one core's "
        "preprocessing rate over the server's throughput, and the compact model over InceptionV3. Starts its "
        "own embedded Triton servers on free ports. A benchmark, not a test.",
    )
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--images-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "chest_xray_fullres",
                   help="full-resolution X-rays for the preprocessing rate (generated when missing)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results.json", help="report or result file/folder to write")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each timed window")
    p.add_argument("--no-inception", action="store_true", help="skip the InceptionV3 baseline (needs TensorFlow)")
    p.add_argument("--tail-seconds", type=float, default=25.0,
                   help="length of each tail-latency probe (1-image requests at concurrency 1 and 8)")
    p.add_argument("--ray-images", type=int, default=256, help="files in the Ray scaling job (one node, then two)")
    p.add_argument("--perf-analyzer-root", type=Path, default=REPO_ROOT / ".cache" / "perf_analyzer",
                   help="chroot made by ../shared/tools/perf_analyzer_setup.sh (skipped, and said so, when missing)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a: argparse.Namespace) -> int:
    from cxr.loadtest.bench import BenchConfig, run_bench, table

    res = run_bench(BenchConfig(repository=a.model_repository, model=a.model, images_dir=a.images_dir, out=a.out,
                                seconds=a.seconds, inception=not a.no_inception, tail_seconds=a.tail_seconds,
                                perf_analyzer_root=a.perf_analyzer_root, ray_images=a.ray_images))
    text = table(res)
    a.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwritten {a.out} and {a.out.with_suffix('.md')}")
    return 0


def _add_capacity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capacity",
        help="Locust user sweep against a running Triton, with the planning arithmetic",
        description="For each user count, run a bounded headless Locust against the server, record "
        "throughput and p50/p95/p99, and Triton's queue vs compute time and average batch. Finds the highest "
        "throughput meeting the p95 objective and computes studies/hour per server and servers needed for a "
        "target rate with headroom. Writes capacity.md, .csv, .json and PNG plots.",
    )
    p.add_argument("--grpc-url", default="127.0.0.1:8001", help="Triton gRPC host:port the Locust users load")
    p.add_argument("--http-url", default="127.0.0.1:8000", help="for Triton's statistics API")
    p.add_argument("--metrics-url", default="127.0.0.1:8002", help="Triton's metrics port (server-side latency summaries)")
    p.add_argument("--admin-key-file", type=Path, help="admin key for a server that restricts its statistics API")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="grpc, http, or embedded (in-process onnxruntime, no server)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="user counts to sweep")
    p.add_argument("--step-seconds", type=int, default=20, help="length of each step")
    p.add_argument("--images-per-request", type=int, default=1, help="images in each request")
    p.add_argument("--images-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "chest_xray_fullres", help="X-rays the users send (preprocessed once)")
    p.add_argument("--slo-p95-ms", type=float, default=500.0, help="latency objective on p95")
    p.add_argument("--images-per-study", type=int, default=1, help="images per study (PA + lateral = 2)")
    p.add_argument("--target-studies-per-hour", type=float, default=10_000.0, help="planning target")
    p.add_argument("--headroom", type=float, default=0.3, help="fraction of capacity kept free")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "capacity", help="report or result file/folder to write")
    p.set_defaults(func=_cmd_capacity)


def _cmd_capacity(a: argparse.Namespace) -> int:
    from cxr.core.security import read_key
    from cxr.loadtest.capacity import CapacityConfig, sweep

    admin_key = read_key(a.admin_key_file, "admin key") if a.admin_key_file else None
    res = sweep(CapacityConfig(grpc_url=a.grpc_url, http_url=a.http_url, metrics_url=a.metrics_url, admin_key=admin_key,
                               model=a.model,
                               users=tuple(a.users),
                               step_seconds=a.step_seconds, images_per_request=a.images_per_request,
                               images_dir=a.images_dir, slo_p95_ms=a.slo_p95_ms, images_per_study=a.images_per_study,
                               target_studies_per_hour=a.target_studies_per_hour, headroom=a.headroom,
                               protocol=a.protocol, out_dir=a.out))
    print((a.out / "capacity.md").read_text())
    return 0 if res["plan"]["meets_slo"] else 1


def _add_soak(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="bounded soak at a fraction of measured saturation, with memory readings",
        description="Measure saturation, then offer --fraction of it (open loop) for --duration-s seconds; report "
        "failures, latency percentiles and the RSS of the server (with --server-pid) and of the client at start "
        "and end. Exit 1 if any request failed.",
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--server-pid", type=int, help="tritonserver pid, to report its memory")
    p.add_argument("--duration-s", type=float, default=120.0, help="soak length (bounded)")
    p.add_argument("--fraction", type=float, default=0.8, help="offered load as a fraction of measured saturation")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "soak.json", help="report or result file/folder to write")
    p.set_defaults(func=_cmd_soak)


def _cmd_soak(a: argparse.Namespace) -> int:
    import json

    from cxr.loadtest.soak import SoakConfig, soak

    rep = soak(SoakConfig(grpc_url=a.url, server_pid=a.server_pid, model=a.model, duration_s=a.duration_s,
                          fraction=a.fraction, out=a.out))
    print(json.dumps(rep, indent=1))
    return 1 if rep["failed"] else 0


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="the Gradio screening page (Pneumonia Detection using Chest X-Ray)",
        description="Drop or upload X-rays, Submit, read Normal/Pneumonia with P(pneumonia), threshold and model "
        "version, or Not assessable with the reason; a Pneumonia answer gets a Grad-CAM heatmap over the whole "
        "film (when the local model file is the served one); several images give a table with a CSV download. Predictions go "
        "through the project client (the running Triton over gRPC by default). Binds 127.0.0.1; no public "
        "share link unless --share; uploads are deleted after each response.",
    )
    _add_client_args(p)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="for the Grad-CAM files")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; see the README before changing it)")
    p.add_argument("--port", type=int, default=7860, help="port of the page")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--max-file-mb", type=int, default=32, help="upload size limit per file")
    g = p.add_argument_group("access")
    g.add_argument("--auth-file", type=Path, help="credentials file (cxr ui-passwd): the page asks for a login")
    g.add_argument("--https-cert", type=Path, help="certificate for HTTPS (with --https-key)")
    g.add_argument("--https-key", type=Path, help="private key for HTTPS")
    p.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append each upload and answer (the signed-in user, the file's sha256) to this hash-chained "
                   "audit trail")
    _add_operating_point(p)
    p.set_defaults(func=_cmd_ui)


def _cmd_ui(a: argparse.Namespace) -> int:
    from cxr.ui import UiConfig, launch

    try:
        cfg = UiConfig(url=a.url, protocol=a.protocol, model=a.model, repository=a.model_repository, host=a.host,
                       port=a.port, share=a.share, max_file_mb=a.max_file_mb, auth_file=a.auth_file,
                       https_cert=a.https_cert, https_key=a.https_key, audit_log=a.audit_log,
                       operating_point=a.operating_point, **_client_security(a))
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    launch(cfg)
    return 0


def _add_listen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "listen",
        help="DICOM Storage SCP: screen what a PACS or modality sends, send DICOM SR results back",
        description="Answer C-ECHO and C-STORE. CR, DX for presentation and for processing, and Secondary Capture are "
        "screened (--screen-*); every other instance is accepted with C-STORE success (status 0x0000, so a PACS "
        "routing a whole study goes on), counted, audited and dropped. Each instance is written to the spool and fsynced before "
        "C-STORE answers success, screened asynchronously (eligibility rules and not_assessable as everywhere), "
        "and its result goes back to --send-to as a Comprehensive SR in the source's study (with --heatmap, a "
        "Secondary Capture of the Grad-CAM overlay too). Results that cannot be delivered stay queued across "
        "restarts and are retried with backoff; result UIDs derive from the source UID and the model's sha256, "
        "so a resend never duplicates. On start, whatever the spool holds is finished. Ctrl-C or SIGTERM stops. "
        "Results can also (or instead) go by STOW-RS (--stow-url) and to the EHR as FHIR (--fhir-url, --fhir-out); "
        "urgent studies (Requested Procedure Priority STAT/HIGH, or --urgent-if) are screened first at Triton's "
        "urgent level; --audit-log records every event.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port")
    p.add_argument("--ae-title", default="CXR_AI", help="this listener's AE title")
    p.add_argument("--send-to", help="where results go: AET@HOST:PORT (the PACS)")
    p.add_argument("--allow", action="append", default=[], metavar="AET",
                   help="accept associations only from this calling AE title (repeatable; default: any)")
    p.add_argument("--spool", type=Path, default=REPO_ROOT / "out" / "listen-spool", help="durable state folder")
    p.add_argument("--out", type=Path, help="results CSV (the columns of cxr predict, with the SOP Instance UID)")
    p.add_argument("--heatmap", action="store_true", help="also send the Grad-CAM overlay for Pneumonia answers")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="for --heatmap")
    p.add_argument("--url", help="inference server host:port, or the repository for embedded (the default)")
    p.add_argument("--protocol", choices=["grpc", "http", "embedded"], default="embedded",
                   help="how to reach the model: embedded (in-process, the default), grpc or http")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    _add_tls_client_args(p)
    g = p.add_argument_group("DICOM TLS")
    g.add_argument("--dicom-tls-cert", type=Path, help="this listener's certificate: incoming associations use TLS")
    g.add_argument("--dicom-tls-key", type=Path, help="its private key")
    g.add_argument("--dicom-tls-client-ca", type=Path, help="require calling nodes' certificates from this CA (mutual)")
    g.add_argument("--send-tls-ca", type=Path, help="CA of the PACS's certificate: results are sent over TLS")
    g.add_argument("--send-tls-cert", type=Path, help="this listener's client certificate for the PACS (mutual)")
    g.add_argument("--send-tls-key", type=Path, help="its private key")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics of the answers (by status, rule, Manufacturer/StationName; "
                   "ood_score and probability histograms) on 127.0.0.1:PORT")
    p.add_argument("--stow-url", metavar="URL",
                   help="store the SR (and Secondary Capture) with STOW-RS at this DICOMweb root, instead of or "
                   "beside --send-to")
    p.add_argument("--urgent-if", action="append", default=[], metavar="KEYWORD=VALUE[,VALUE]",
                   help="a site rule making a study urgent, e.g. InstitutionalDepartmentName=Emergency (repeatable; "
                   "Requested Procedure Priority STAT or HIGH is urgent anyway)")
    g = p.add_argument_group("what is screened (the rest is accepted with C-STORE success, counted, audited and dropped)")
    g.add_argument("--screen-sop-class", action="append", default=[], metavar="UID",
                   help="a SOP class screened (repeatable; default: CR, DX for presentation and for processing, "
                   "Secondary Capture)")
    g.add_argument("--screen-modality", action="append", default=[], metavar="MODALITY",
                   help="screen only this Modality, e.g. DX (repeatable; default: any)")
    g.add_argument("--screen-body-part", action="append", default=[], metavar="PART",
                   help="screen only this Body Part Examined, e.g. CHEST (repeatable; an instance without one is "
                   "screened; default: any)")
    g = p.add_argument_group("authentication of --stow-url and --fhir-url")
    g.add_argument("--web-token-file", type=Path, metavar="FILE",
                   help="a bearer token (one line, file mode 600) sent as Authorization: Bearer")
    g.add_argument("--web-tls-cert", type=Path, help="this listener's client certificate (mutual TLS)")
    g.add_argument("--web-tls-key", type=Path, help="its private key")
    g.add_argument("--web-tls-ca", type=Path, help="CA bundle the servers' certificates must verify against")
    p.add_argument("--study-quiet-s", type=float, metavar="SECONDS",
                   help="one result per study: answer a study once nothing of it arrived for SECONDS (e.g. 30); its "
                   "frontal films are combined (any Pneumonia -> Pneumonia; all not assessable -> not assessable), "
                   "laterals make no result of their own (default: one result per instance)")
    p.add_argument("--redeliver", action="store_true",
                   help="on start, put the results a destination refused for good (dead-letter-*/) back in their "
                   "outboxes")
    _add_result_doors(p)
    _add_operating_point(p)
    p.set_defaults(func=_cmd_listen)


def _cmd_listen(a: argparse.Namespace) -> int:
    from cxr.core.security import HttpAuth, TlsClient, TlsServer
    from cxr.hospital.dicom.config import Destination, ListenConfig
    from cxr.hospital.dicom.intake import ScreenFilter, UrgentRule
    from cxr.hospital.dicom.listener import Listener

    try:
        dicom_tls = TlsServer(a.dicom_tls_cert, a.dicom_tls_key, a.dicom_tls_client_ca) if a.dicom_tls_cert else None
        send_tls = TlsClient(a.send_tls_ca, a.send_tls_cert, a.send_tls_key) if a.send_tls_ca else None
        cfg = ListenConfig(spool=a.spool, host=a.host, port=a.port, ae_title=a.ae_title,
                           send_to=Destination.parse(a.send_to) if a.send_to else None, allow=tuple(a.allow),
                           out=a.out, url=a.url, protocol=a.protocol, model=a.model, heatmap=a.heatmap,
                           repository=a.model_repository, dicom_tls=dicom_tls, send_tls=send_tls,
                           metrics_port=a.metrics_port, stow_url=a.stow_url, fhir_url=a.fhir_url,
                           fhir_out=a.fhir_out, audit_log=a.audit_log,
                           urgent_if=tuple(UrgentRule.parse(t) for t in a.urgent_if), redeliver=a.redeliver,
                           study_quiet_s=a.study_quiet_s, operating_point=a.operating_point,
                           web_auth=HttpAuth.of(a.web_token_file, a.web_tls_cert, a.web_tls_key, a.web_tls_ca), screen=ScreenFilter.of(tuple(a.screen_sop_class), tuple(a.screen_modality),
                                                  tuple(a.screen_body_part)), **_client_security(a))
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    _check_url(a.stow_url, "--stow-url")
    _check_url(a.fhir_url, "--fhir-url")
    from cxr.core.security import redact_url

    with Listener(cfg) as listener:
        where = [redact_url(w) for w in (a.send_to, a.stow_url and f"STOW-RS {a.stow_url}",
                                         a.fhir_url and f"FHIR {a.fhir_url}") if w]
        print(f"listening: {cfg.ae_title}@{cfg.host}:{cfg.port}" + (f", results to {', '.join(where)}" if where else
              ", results kept in the outbox (no --send-to)") + f"; spool {cfg.spool}; Ctrl-C to stop", flush=True)
        if listener.metrics_port is not None:
            print(f"metrics on http://127.0.0.1:{listener.metrics_port}/metrics", flush=True)
        serve_until_signal()
    return 0


def _add_site_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "site-audit",
        help="go/no-go of the served model on a hospital's own labelled sample, on bounds against the card's targets",
        description=textwrap.fill(
            "Screen every film of SAMPLE/{NORMAL,PNEUMONIA}/ with the served model as in service and score it "
            "against the targets stated in the model card (sensitivity and specificity at the served threshold, ROC "
            "AUC, flagged share). Go means every one-sided bound at --confidence meets its target (lower bounds of "
            "sensitivity, specificity and AUC; upper bound of the flagged share), with patients resampled together. "
            "Films the model refuses or cannot read count as referrals (positive) and are listed; films the model's "
            "provenance.csv lists (it trained, selected or calibrated on them) are set aside and counted. A sample "
            "that cannot show its targets (one class, or too few films for even a perfect result's bound) exits 2 "
            "with the films per class it needs, before anything is screened; --plan answers that before anything is "
            "labelled. Writes audit.md, audit.json and PNGs. Exit 0: go; 3: no-go; 2: bad or insufficient input.", 79),
    )
    p.add_argument("sample", type=Path, nargs="?", help="labelled folder {NORMAL,PNEUMONIA}/ (MANIFEST.csv with a "
                   "patient column recommended)")
    _add_client_args(p)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="the served model's folder is read from here for its card, provenance and reference (its "
                   "sha256 must match)")
    p.add_argument("--plan", action="store_true",
                   help="only say how many films per class the targets need (no sample, no server)")
    p.add_argument("--targets", nargs="+", metavar="NAME=VALUE", default=(),
                   help="override the card's targets (sensitivity, specificity, roc_auc, flagged), e.g. sensitivity=0.95")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="one-sided confidence of the bounds the decision reads (default 0.95)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "site-audit", help="report folder")
    _add_operating_point(p)
    p.set_defaults(func=_cmd_site_audit)


def _site_targets(card: ModelCard, overrides: Sequence[str]):  # type: ignore[no-untyped-def]
    """The card's go-live targets with ``NAME=VALUE`` overrides (one-line errors)."""
    from cxr.hospital.site_audit import Targets

    values = {k: v for k, v in card.go_live_targets.items() if k in Targets.__dataclass_fields__}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in Targets.__dataclass_fields__:
            raise CxrError(f"--targets {item!r}: expected NAME=VALUE with NAME one of {', '.join(Targets.__dataclass_fields__)}")
        try:
            values[name] = float(value)
        except ValueError:
            raise CxrError(f"--targets {item!r}: {value!r} is not a number") from None
    try:
        return Targets(**values)
    except ValueError as exc:
        raise CxrError(str(exc)) from None


def _screen_labelled(a: argparse.Namespace, samples: Sequence):  # type: ignore[no-untyped-def]
    """Screen labelled films with the served model; (films as numbers, the client's model info)."""
    from tqdm import tqdm

    from cxr.client import PneumoniaClient
    from cxr.hospital.site_audit import Screened

    films = []
    with PneumoniaClient(a.url, protocol=a.protocol, model=a.model, timeout_s=a.timeout_s, **_client_security(a)) as c:
        info = c.info
        bar = tqdm(total=len(samples), unit="film", desc="screen", disable=not sys.stderr.isatty())
        for i in range(0, len(samples), 64):
            part = samples[i : i + 64]
            for s, pred in zip(part, c.predict([str(x.path) for x in part])):
                films.append(Screened(str(s.path), s.label, pred.status, pred.probability, pred.ood_score, pred.rule,
                                      s.patient))
            bar.update(len(part))
        bar.close()
    return films, info


def _served_card(repository: Path, model: str, served_sha256: str | None) -> tuple[ModelDir, ModelCard]:
    folder = ModelDir(repository / model)
    card = folder.card()
    if served_sha256 and card.sha256 != served_sha256:
        raise CxrError(f"the served model ({served_sha256[:12]}) is not the one in {folder.path} "
                       f"({card.sha256[:12]}); give --model-repository of the served model")
    return folder, card


def _cmd_site_audit(a: argparse.Namespace) -> int:
    from cxr.core.paths import relative
    from cxr.hospital import site_audit as audit

    if not 0.5 < a.confidence < 1:
        raise CxrError(f"--confidence must be in (0.5, 1), got {a.confidence}")
    folder = ModelDir(a.model_repository / a.model)
    card = folder.card()
    targets = _site_targets(card, a.targets)
    needs = audit.films_needed(targets, a.confidence)
    if a.plan:
        print(f"targets {targets.sensitivity:.2f} sensitivity, {targets.specificity:.2f} specificity, "
              f"{targets.roc_auc:.2f} AUC, <= {targets.flagged:.1%} flagged at {a.confidence:.0%} confidence: label "
              f"{needs.text()}; more where the model errs or patients have several films")
        return 0
    if a.sample is None:
        raise CxrError("give SAMPLE (or --plan)")
    try:
        sample = audit.site_sample(a.sample, folder.provenance())
    except ValueError as exc:
        raise CxrError(f"{a.sample}: {exc}") from None
    if not sample.patients_known:
        print(f"warning: {relative(a.sample)}: {audit.NO_PATIENTS_WARNING}", file=sys.stderr)
    aside = sample.set_aside_by_role(folder.provenance())
    if sample.set_aside:
        print(f"set aside: {len(sample.set_aside)} films the model's provenance lists (as "
              + ", ".join(f"{k} {v}" for k, v in aside.items()) + "); they are not the site's evidence")
    audit.check_sample(sample.n_pos, sample.n_neg, targets, a.confidence)
    films, info = _screen_labelled(a, list(sample.films))
    model_dir, card = _served_card(a.model_repository, a.model, info.sha256)
    point, threshold = info.threshold_for(a.operating_point)
    result = audit.audit(films, threshold=threshold, targets=targets, reference=model_dir.reference(),
                         confidence=a.confidence)
    result["operating_point"] = point
    print(f"operating point {point}: threshold {threshold:.4f}")
    result["set_aside"] = {"films": len(sample.set_aside), "by_role": aside}
    result["needs"] = {"positives": needs.positives, "negatives": needs.negatives, "films": needs.films}
    audit.write(result, films, a.out, model=f"{info.name} v{info.version} ({(info.sha256 or '')[:12]})",
                sample=relative(a.sample))
    print(audit.summary(result))
    for r in result["refused"]:
        print(f"refused ({r['label']}): {r['path']}: {r['status']}" + (f" ({r['rule']})" if r["rule"] else ""))
    print(f"report: {a.out / 'audit.md'}")
    return audit.GO if result["go"] else audit.NO_GO


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt the served model to a hospital from its labelled sample (offline, minutes on a CPU)",
        description=textwrap.fill(
            "Split SAMPLE by patient into three parts: adapt (fine-tunes the classifier head while distilling the "
            "shipped model's answers on its replay set), calibrate (sets the threshold at the card's sensitivity "
            "target and refits the out-of-distribution reference) and audit (judges the result on bounds and "
            "chooses nothing). Films the model's provenance lists are set aside and counted. A passing model is "
            "published as a complete model folder (ONNX with both outputs, configs, card naming the sample, split "
            "and targets, claims.json measured on the audit part, eligibility, provenance) in --out-repository; a "
            "failing one exits 3 and publishes nothing. Exit 2 on bad input or a sample too small for its targets "
            "(with the films per class it needs).", 79),
        epilog="then serve it beside the old one:\n  cxr serve --model-repository DIR\n"
        "  cxr predict FILES --protocol embedded --url DIR --model NAME",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sample", type=Path, help="labelled folder {NORMAL,PNEUMONIA}/ (MANIFEST.csv with a patient column "
                   "recommended)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model folder to adapt")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="repository holding --model")
    p.add_argument("--out-repository", type=Path, required=True, help="repository to publish the adapted model into")
    p.add_argument("--name", help="adapted model's folder name (default: MODEL_site)")
    p.add_argument("--report", type=Path, help="report folder (default: out/adapt/NAME)")
    p.add_argument("--calibrate-fraction", type=float, default=0.3, help="share of the films for the calibrate part")
    p.add_argument("--audit-fraction", type=float, default=0.3, help="share of the films kept for the audit")
    p.add_argument("--targets", nargs="+", metavar="NAME=VALUE", default=(),
                   help="override the card's targets (sensitivity, specificity, roc_auc, flagged)")
    p.add_argument("--confidence", type=float, default=0.95, help="one-sided confidence of the audit's bounds")
    p.add_argument("--population", choices=["adult", "pediatric"], default="adult", help="who the site's films are")
    p.add_argument("--site-mass", type=float, default=0.5,
                   help="share of the refitted out-of-distribution reference given to the site's films (default 0.5)")
    p.add_argument("--features", choices=["auto", "head"], default="auto",
                   help="auto: also fine-tune the last convolutions with the head and keep what does best on the "
                   "calibrate part; head: the head only")
    p.add_argument("--adapt-limit", type=int, help="use only this many films of the adapt part (a learning curve)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(a: argparse.Namespace) -> int:
    from cxr.hospital.adapt import AdaptConfig, adapt
    from cxr.hospital.site_audit import summary

    name = a.name or f"{a.model}_site"
    targets = _site_targets(ModelDir(a.model_repository / a.model).card(), a.targets)
    try:
        cfg = AdaptConfig(sample=a.sample, model_dir=a.model_repository / a.model, out_repository=a.out_repository,
                          name=name, report_dir=a.report or REPO_ROOT / "out" / "adapt" / name,
                          calibrate_fraction=a.calibrate_fraction, audit_fraction=a.audit_fraction, targets=targets,
                          confidence=a.confidence, population=a.population, site_mass=a.site_mass, seed=a.seed,
                          features=a.features, adapt_limit=a.adapt_limit)
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    rc, info = adapt(cfg, progress=sys.stderr.isatty())
    sp = info["split"]
    print("split by patient: " + ", ".join(f"{k} {sp['parts'][k]['films']} films ({sp['parts'][k]['patients']} patients)"
                                           for k in ("adapt", "calibrate", "audit"))
          + f"; set aside {sp['set_aside']} films the model's provenance lists")
    print("adapted: " + "; ".join(f"{t['what']} " + (f"calibrate AUC {t['calibrate_auc']:.3f}" if "calibrate_auc" in t
                                                      else t["skipped"]) for t in info["features"]["tried"])
          + f"; kept: {info['features']['chosen']}")
    print(f"OOD threshold {info['ood']['threshold']:.3f}; threshold {info['calibration']['threshold']:.4f} "
          f"(sensitivity_lcb at {info['calibration']['target']} on the calibrate part)")
    print(summary({**info["audit"], "go": info["audit"]["go"]}))
    print(f"{'published ' + str(a.out_repository / name) if rc == 0 else 'NOT published'} in {info['seconds']:.0f} s; "
          f"report in {cfg.report_dir}")
    return rc


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="drift check: a batch's answers against a baseline or the model's reference at your prevalence",
        description=textwrap.fill(
            "Compare a predictions CSV (cxr predict --format csv, cxr listen --out) with a previous period "
            "(--baseline) or with the model folder's reference: flagged rate, positive rate, and the distributions of "
            "P(pneumonia) and ood_score. The model is the one whose sha256 the CSV names (found in --model-repository), "
            "and its threshold applies. Films refused by a DICOM header rule (laterals, other modalities) are counted "
            "apart and never alarm. The positive rate and P(pneumonia) depend on the case mix: they are judged against "
            "--baseline, or against the reference reweighted to --prevalence, and only shown otherwise. Exit 3 with a "
            "report naming what moved, 0 when nothing did (or the batch is too small to judge, said so), 2 on bad "
            "input.", 79),
    )
    p.add_argument("predictions", type=Path, help="predictions CSV")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder whose reference applies when the CSV names no model sha256 (older CSVs)")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="repository searched for the model whose sha256 the CSV names")
    p.add_argument("--baseline", type=Path,
                   help="compare with a previous period: a predictions CSV, cxr predict's JSON, or a reference JSON")
    p.add_argument("--prevalence", type=float,
                   help="the site's share of Pneumonia among films: the reference's positive and negative parts are "
                   "reweighted to it (without --baseline)")
    p.add_argument("--alpha", type=float, default=0.001, help="significance level of each check (default 0.001)")
    p.add_argument("--out", type=Path, help="also write the report (.md and .json beside it)")
    p.set_defaults(func=_cmd_monitor)


def _monitored_model(repository: Path, sha256: str | None, fallback: str) -> ModelDir:
    """The model folder whose card has ``sha256`` (the one that answered), else ``fallback`` when none is named."""
    from cxr.core.model_dir import model_dirs

    if not sha256:
        return ModelDir(repository / fallback)
    for d in model_dirs(repository):
        try:
            if d.card().sha256 == sha256:
                return d
        except CxrError:
            continue
    raise CxrError(f"no model folder in {repository} has sha256 {sha256[:12]}, the model the CSV names; "
                   "give --model-repository of the model that answered")


def _cmd_monitor(a: argparse.Namespace) -> int:
    import json

    from cxr.core.durable import write_durably
    from cxr.core.eligibility import Eligibility
    from cxr.hospital import monitor

    if not 0 < a.alpha < 1:
        raise CxrError(f"--alpha must be in (0, 1), got {a.alpha}")
    if a.prevalence is not None and not 0 < a.prevalence < 1:
        raise CxrError(f"--prevalence must be in (0, 1), got {a.prevalence}")
    if a.prevalence is not None and a.baseline is not None:
        raise CxrError("give --baseline or --prevalence, not both (a baseline already has the site's case mix)")
    rows = monitor.read_predictions(a.predictions)
    folder = _monitored_model(a.model_repository, monitor.model_sha256(rows, what=str(a.predictions)), a.model)
    card = folder.card()
    threshold = card.threshold
    elig = folder.path / "eligibility.json"
    rules = monitor.header_rules(Eligibility.load(elig) if elig.exists() else None)
    reference: dict | None
    if a.baseline is not None:
        reference = monitor.read_baseline(a.baseline)
        against = f"the baseline {a.baseline}"
    else:
        reference = folder.reference()
        if reference is None:
            raise CxrError(f"{folder.path}: no reference.json (refit its OOD head with `cxr ood-fit` to write one)")
        against = f"{folder.name}'s reference"
        if a.prevalence is not None:
            reference = monitor.at_prevalence(reference, threshold, a.prevalence)
            against += f" reweighted to prevalence {a.prevalence:.3f}"
        else:
            against += " (positive rate and probability not judged: give --baseline or --prevalence)"
    judged, header_refused = monitor.split_header_refusals(rows, rules)
    checks = monitor.compare(judged, reference, threshold, alpha=a.alpha, rules=rules,
                             judge_case_mix=a.baseline is not None or a.prevalence is not None)
    result = monitor.report(checks, batch=str(a.predictions), model=folder.name, n_rows=len(judged),
                            header_refused=header_refused, threshold=threshold, against=against)
    text = monitor.markdown(result)
    print(text)
    if a.out:
        write_durably(a.out.with_suffix(".md"), text.encode())
        write_durably(a.out.with_suffix(".json"), (json.dumps(result, indent=1) + "\n").encode())
    return 3 if result["moved"] else 0


def _add_proxy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy",
        help="TLS in front of Triton's HTTP (and optionally gRPC) with nginx",
        description="Triton's HTTP endpoint has no TLS. Run nginx (Debian's package) terminating HTTPS, with client "
        "certificates when --client-ca is given, and proxying to Triton's loopback HTTP port; optionally a TLS gRPC "
        "listener proxied to Triton's gRPC port. --print writes the nginx.conf and exits, for a site's own nginx.",
    )
    p.add_argument("--listen-host", default="127.0.0.1", help="address nginx listens on")
    p.add_argument("--https-port", type=int, default=8443, help="HTTPS port")
    p.add_argument("--triton-http", default="127.0.0.1:8000", help="Triton's HTTP host:port (loopback)")
    p.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    p.add_argument("--client-ca", type=Path, help="require client certificates from this CA (mutual TLS)")
    p.add_argument("--grpc-port", type=int, help="also a TLS gRPC listener on this port")
    p.add_argument("--triton-grpc", help="Triton's gRPC host:port for --grpc-port")
    p.add_argument("--print", action="store_true", help="print the nginx.conf and exit")
    p.set_defaults(func=_cmd_proxy)


def _cmd_proxy(a: argparse.Namespace) -> int:
    import tempfile

    from cxr.serving.proxy import NginxProxy, ProxyConfig, render_nginx_conf

    try:
        cfg = ProxyConfig(https_port=a.https_port, triton_http=a.triton_http, cert=a.cert, key=a.key,
                          listen_host=a.listen_host, client_ca=a.client_ca, grpc_port=a.grpc_port, triton_grpc=a.triton_grpc)
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    if a.print:
        print(render_nginx_conf(cfg, workdir=Path(tempfile.gettempdir()) / "cxr-nginx"))
        return 0
    with NginxProxy(cfg):
        print(f"nginx: https://{a.listen_host}:{a.https_port} -> http://{a.triton_http}"
              + (f"; grpcs {a.listen_host}:{a.grpc_port} -> {a.triton_grpc}" if a.grpc_port else "") + "; Ctrl-C to stop",
              flush=True)
        serve_until_signal()
    return 0


def _add_ui_passwd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui-passwd",
        help="add or replace a user in the screening page's credentials file",
        description="Read a password (twice, without echo; or one line from standard input when it is not a "
        "terminal) and write USER:scrypt$salt$hash into FILE, created with mode 600. Plain-text passwords never "
        "touch the disk. Use the file with `cxr ui --auth-file FILE`.",
    )
    p.add_argument("file", type=Path, help="credentials file")
    p.add_argument("user", help="user name (letters, digits, '.', '_' or '-')")
    p.set_defaults(func=_cmd_ui_passwd)


def _cmd_ui_passwd(a: argparse.Namespace) -> int:
    import getpass
    import re

    from cxr.ui import hash_password

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", a.user):
        raise CxrError("user names are 1-64 letters, digits, '.', '_' or '-'")
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise CxrError("the passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\n")
    try:
        entry = f"{a.user}:{hash_password(pw)}"
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    lines = [ln for ln in (a.file.read_text().splitlines() if a.file.exists() else []) if not ln.startswith(f"{a.user}:")]
    write_durably(a.file, ("\n".join([*lines, entry]) + "\n").encode(), mode=0o600)
    print(f"{a.user} written to {a.file}")
    return 0


def _add_bench_priority(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-priority",
        help="urgent latency while routine work saturates the server, with and without priority levels",
        description="Start the embedded CPU Triton with the shipped model and time urgent single-film requests on the "
        "idle server, then while routine clients send batches without pause, with the shipped cpu config (priority "
        "levels on), the same config without them, and the cpu_triage config (smaller batches). Routine requests are counted as answered, rejected "
        "(queue full: retried by clients) or failed. Writes priority.json, priority.md and priority.png.",
    )
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="the model repository")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "capacity" / "priority", help="report folder")
    p.add_argument("--urgent-requests", type=int, default=60, help="urgent requests timed per phase")
    p.add_argument("--routine-threads", type=int, default=8, help="closed-loop routine clients")
    p.add_argument("--routine-batch", type=int, default=16, help="films per routine request")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound on each saturated phase")
    p.add_argument("--small-batch", type=int, default=4, help="max_batch_size of the triage phase (the cpu_triage config's: 4)")
    p.set_defaults(func=_cmd_bench_priority)


def _cmd_bench_priority(a: argparse.Namespace) -> int:
    from cxr.loadtest.priority import PriorityConfig, run

    try:
        cfg = PriorityConfig(repository=a.model_repository, model=a.model, out_dir=a.out,
                             urgent_requests=a.urgent_requests, routine_threads=a.routine_threads,
                             routine_batch=a.routine_batch, max_seconds=a.max_seconds, small_batch=a.small_batch)
    except ValueError as exc:
        raise CxrError(str(exc)) from None
    r = run(cfg)
    ph = r["phases"]
    for name, p in ph.items():
        print(f"{name}: urgent p95 idle {p['idle']['p95_ms']:.1f} ms, under routine saturation {p['urgent']['p95_ms']:.1f} ms "
              f"({p['ratio_p95']:.2f}x); routine {p['routine']['films_per_s']:.0f} films/s, {p['routine']['failed']} failed")
    print(f"written to {a.out}")
    return 0


def _add_audit_log(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit-log",
        help="verify the audit trail's hash chain, or export it as FHIR AuditEvents",
        description="The audit trail that predict, listen, serve and ui append to with --audit-log is a file of JSON "
        "lines, each carrying its own sha256 and the previous record's. `verify` walks the chain: exit 0 when it "
        "holds (and prints the record count and the last hash, to file elsewhere), 1 at the first edited, inserted, "
        "reordered or deleted line (named), 2 when the file cannot be read. `export` writes the records as a FHIR "
        "R4 Bundle of AuditEvent resources (after verifying the chain).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True, help="verify or export")
    v = verbs.add_parser("verify", help="check the hash chain (exit 1 when broken)",
                         description="Check every record's hash and its link to the record before it.")
    v.add_argument("file", type=Path, help="the audit trail")
    v.add_argument("--last-hash", help="the last hash filed earlier: a removed or rewritten tail is detected too")
    v.set_defaults(func=_cmd_audit_verify)
    e = verbs.add_parser("export", help="write the records as FHIR AuditEvents",
                         description="Verify the chain, then write a FHIR R4 collection Bundle of AuditEvents.")
    e.add_argument("file", type=Path, help="the audit trail")
    e.add_argument("--fhir-out", type=Path, required=True, help="the Bundle to write")
    e.set_defaults(func=_cmd_audit_export)


def _cmd_audit_verify(a: argparse.Namespace) -> int:
    from cxr.core.audit_trail import verify

    v = verify(a.file, expect_last_hash=a.last_hash)
    if v.ok and v.records == 0:
        print(f"{a.file}: the audit trail is empty: nothing to verify (was --audit-log given to the right "
              "command?)", file=sys.stderr)
        return 1
    if v.ok:
        print(f"{a.file}: chain holds: {v.records} records, last hash {v.last_hash}")
        return 0
    where = f" at line {v.broken_at}" if v.broken_at else ""
    print(f"{a.file}: chain broken{where}: {v.why} ({v.records} records hold before it)", file=sys.stderr)
    return 1


def _cmd_audit_export(a: argparse.Namespace) -> int:
    import json

    from cxr.core.audit_trail import read
    from cxr.hospital.fhir import audit_events

    bundle = audit_events(read(a.file))
    write_durably(a.fhir_out, (json.dumps(bundle, indent=1) + "\n").encode())
    print(f"{len(bundle['entry'])} AuditEvents written to {a.fhir_out}")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_lock_split, _add_train, _add_evaluate, _add_operating_points, _add_claims, _add_trials, _add_compare, _add_calibrate, _add_export, _add_ood_fit, _add_ood_eval, _add_explain_eval, _add_configs, _add_serve,
    _add_predict, _add_site_audit, _add_adapt, _add_monitor, _add_health, _add_bench, _add_capacity, _add_soak, _add_ui, _add_ui_passwd, _add_proxy, _add_listen, _add_audit_log, _add_bench_priority,
]


def _record_command(args: argparse.Namespace) -> tuple[Path, int] | None:
    """Append model-building commands to the run's ``commands.txt`` (the model card lists them); returns the
    file and its size before, so that a failed command can be taken back."""
    import shlex

    run_dir = getattr(args, "out", None) if args.command == "train" else None
    if args.command in ("calibrate", "evaluate", "export") and getattr(args, "model", None) is not None:
        if args.model.is_dir() or args.model.suffix != ".keras":  # an exported model (folder or file): its card
            return None                                               # records what built it; reading it writes nothing
        run_dir = args.model.parent
    if run_dir is None:
        return None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    log = Path(run_dir) / "commands.txt"
    size = log.stat().st_size if log.exists() else 0
    with open(log, "a") as f:
        f.write(" ".join(shlex.quote(a) for a in ["cxr", *sys.argv[1:]]) + "\n")
    return log, size


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cxr",
        description="Chest X-ray pneumonia screening: train, evaluate, calibrate, export, serve on Triton, predict, "
        "load-test.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr`` command."""
    from cxr.core.security import RedactingStream

    streams = sys.stdout, sys.stderr
    if not isinstance(sys.stderr, RedactingStream):  # no URL credentials in anything printed
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: Sequence[str] | None) -> int:
    from cxr.core.security import RedactingFilter

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # no URL credentials in any log line
        handler.addFilter(RedactingFilter())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Recorded before running (an export's card lists the export command itself) and taken back when the
    # command fails: the card lists the commands that built the model, not the attempts.
    recorded = _record_command(args)
    rc = 1
    try:
        rc = int(args.func(args) or 0)
        return rc
    except KeyboardInterrupt:
        rc = 130
        return rc
    except Exception as exc:  # noqa: BLE001 - the one place where every error leaves: one line, a non-zero code
        if args.verbose and not isinstance(exc, CxrError):
            raise
        rc = _error_line(args.command, exc)
        return rc
    finally:
        if recorded is not None and rc != 0:
            log, size = recorded
            with open(log, "r+b") as f:
                f.truncate(size)


#: Exit codes: 2 for a user error (bad arguments, input, configuration), 75 (EX_TEMPFAIL) for an upstream that is
#: unreachable or failing for now (rerun later), 1 for anything unexpected.
EXIT_USAGE, EXIT_TEMPFAIL, EXIT_INTERNAL = 2, 75, 1


def _error_line(command: str, exc: BaseException) -> int:
    """Print one line on stderr for ``exc`` (URL credentials redacted) and return the exit code."""
    from cxr.core.errors import RetryableServerError
    from cxr.core.security import redact_url

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, RetryableServerError):
        rc, what = EXIT_TEMPFAIL, f"{text} (temporary: rerun later)"
    elif isinstance(exc, CxrError):
        rc, what = EXIT_USAGE, str(exc)  # the project's own messages (some list failures on further lines)
    elif isinstance(exc, (OSError, ValueError)):
        rc, what = EXIT_USAGE, f"{type(exc).__name__}: {text}"
    else:
        rc, what = EXIT_INTERNAL, f"unexpected {type(exc).__name__}: {text} (run with -v for the traceback)"
    print(f"cxr {command}: error: {redact_url(what)}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
