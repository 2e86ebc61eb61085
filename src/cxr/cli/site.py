"""A site's onboarding and watch: audit the served model on the hospital's own films, adapt it, watch its answers
drift, and check the audit trail (``site-audit``, ``adapt``, ``monitor``, ``audit-log``)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from cxr.cli import options
from cxr.core.errors import CxrError, ExitCode
from cxr.core.model_dir import ModelDir
from cxr.core.paths import DEFAULT_MODEL, DEFAULT_REPOSITORY, REPORTS_DIR

TITLE = "a site's onboarding and watch"


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
            "with the patients per class it needs, before anything is screened; --plan answers that before anything "
            "is labelled. A confidence below 0.95 never goes. Writes audit.md, audit.json and PNGs, and records the "
            "run in the --out folder's attempts.jsonl (the report lists earlier attempts on the same sample). Exit 0: "
            "go; 3: no-go; 2: bad or insufficient input.", 79),
    )
    p.add_argument("sample", type=Path, nargs="?", help="labelled folder {NORMAL,PNEUMONIA}/ (MANIFEST.csv with a "
                   "patient column recommended)")
    options.add_client_args(p)
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="the served model's folder is read from here for its card, provenance and reference (its "
                   "sha256 must match)")
    p.add_argument("--plan", action="store_true",
                   help="only say how many patients per class the targets need (no sample, no server)")
    p.add_argument("--targets", nargs="+", metavar="NAME=VALUE", default=(),
                   help="override the card's targets (sensitivity, specificity, roc_auc, flagged), e.g. sensitivity=0.95")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="one-sided confidence of the bounds the decision reads (default 0.95)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "site-audit", help="report folder")
    options.add_operating_point(p)
    p.set_defaults(func=_cmd_site_audit)


def _cmd_site_audit(a: argparse.Namespace) -> int:
    from cxr.client import PneumoniaClient
    from cxr.site import site_audit as audit

    model_dir = a.model_repository / a.model
    if a.plan:
        print(audit.plan_text(audit.targets_from(ModelDir(model_dir).card(), a.targets), a.confidence))
        return 0
    if a.sample is None:
        raise CxrError("give SAMPLE (or --plan)")
    security = options.client_security(a)
    opts = options.typed(audit.SiteAuditOptions,
        sample=a.sample, model_dir=model_dir, out=a.out, targets=tuple(a.targets), confidence=a.confidence,
        operating_point=a.operating_point,
        # embedded without --url: the model in service is --model-repository's (any folder, e.g. a model that never
        # saw the site's source), not the default repository's
        connect=lambda: PneumoniaClient(a.url or (str(a.model_repository) if a.protocol == "embedded" else None),
                                        protocol=a.protocol, model=a.model, timeout_s=a.timeout_s, **security))
    result = audit.site_audit(opts, progress=sys.stderr.isatty())
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
            "Split SAMPLE by patient into three parts: adapt (fine-tunes the classifier head, distilling the "
            "shipped model's answers on its replay set, and the last convolutions with it), calibrate (chooses what "
            "adapts and how far, sets the threshold at the card's sensitivity target and refits the "
            "out-of-distribution reference) and audit (fixed by a hash of the patient ids, whatever the seed; judges "
            "the result and chooses nothing). A model passes when, on the audit part, it beats the model in "
            "service on the same patients (one-sided bound of the paired AUC difference above 0, sensitivity bound "
            "not lower) and meets the targets (the card's, or --targets) at their bounds, at --confidence >= 0.95. "
            "Every run is recorded in the report folder's attempts.jsonl and the report lists the earlier ones on "
            "the same sample. Films the model's provenance lists are set aside and counted. A passing model is "
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
    p.add_argument("--report", type=Path, help=f"report folder (default: {REPORTS_DIR / 'adapt' / 'NAME'})")
    p.add_argument("--calibrate-fraction", type=float, default=0.3, help="share of the films for the calibrate part")
    p.add_argument("--audit-fraction", type=float, default=0.3, help="share of the films kept for the audit")
    p.add_argument("--targets", nargs="+", metavar="NAME=VALUE", default=(),
                   help="override the card's targets (sensitivity, specificity, roc_auc, flagged)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="one-sided confidence of the audit's bounds (below 0.95 the model is never published)")
    p.add_argument("--population", choices=["adult", "pediatric"], default="adult", help="who the site's films are")
    p.add_argument("--site-mass", type=float, default=0.5,
                   help="share of the refitted out-of-distribution reference given to the site's films (default 0.5)")
    p.add_argument("--features", choices=["auto", "head", "whole"], default="auto",
                   help="auto: also fine-tune the last 2 or 4 convolutions with the head and keep what does best on "
                   "the calibrate part; head: the head only; whole: auto, and also every convolution on augmented "
                   "films (more forgetting of the populations the model served before: see docs/onboarding.md)")
    p.add_argument("--adapt-limit", type=int, help="use only this many films of the adapt part (a learning curve)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(a: argparse.Namespace) -> int:
    from cxr.site.adapt import AdaptConfig, adapt
    from cxr.site.site_audit import summary, targets_from, targets_source

    name = a.name or f"{a.model}_site"
    targets = targets_from(ModelDir(a.model_repository / a.model).card(), a.targets)
    try:
        cfg = AdaptConfig(sample=a.sample, model_dir=a.model_repository / a.model, out_repository=a.out_repository,
                          name=name, report_dir=a.report or REPORTS_DIR / "adapt" / name,
                          calibrate_fraction=a.calibrate_fraction, audit_fraction=a.audit_fraction, targets=targets,
                          confidence=a.confidence, population=a.population, site_mass=a.site_mass, seed=a.seed,
                          features=a.features, adapt_limit=a.adapt_limit, targets_from=targets_source(a.targets))
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
          f"(sensitivity_lcb at {info['calibration']['target']:.3f} on the calibrate part: the aim for the sensitivity "
          f"target {info['calibration']['sensitivity_target']})")
    for e in info["attempts"]:
        print(f"earlier attempt on this sample: {e['time']} {e['command']}: {e['outcome']}")
    print(summary({**info["audit"], "go": info["audit"]["go"]}))
    print(f"{'published ' + str(a.out_repository / name) if rc == 0 else 'NOT published'} in {info['seconds']:.0f} s; "
          f"report in {cfg.report_dir}")
    return rc


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="drift check: a batch's answers against a baseline or the model's reference at your prevalence",
        description=textwrap.fill(
            "Compare a predictions CSV (cxr predict --format csv, cxr listen --out) with a previous period of the "
            "site's own films (--baseline: every check), or with the model's claims at the site's share of "
            "Pneumonia (--prevalence: the positive rate, each row at the operating point and threshold it was "
            "answered at). The flagged rate and ood_score are judged only against a baseline (the model's own "
            "reference is its pooled validation films, not this site). Two rules: each batch's tests, and a CUSUM "
            "across batches (--state keeps it between runs) on the positive rate, P(pneumonia), the flagged rate, "
            "ood_score and, with --images, the films' intensity histogram, contrast and sharpness; an alarm names "
            "what moved, by how much and since which film. --follow watches a growing CSV; --metrics writes the state "
            "as Prometheus text. The model is the one whose sha256 the CSV names (found in --model-repository). Films "
            "refused by a DICOM header rule are counted apart and never alarm. Exit 3 with a report naming what "
            "moved or alarmed, 0 when nothing did, 2 on bad input.", 79),
    )
    p.add_argument("predictions", type=Path, help="predictions CSV")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model folder whose reference applies when the CSV names no model sha256 (older CSVs)")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="repository searched for the model whose sha256 the CSV names")
    p.add_argument("--baseline", type=Path,
                   help="compare with a previous period: a predictions CSV, cxr predict's JSON, or a reference JSON")
    p.add_argument("--prevalence", type=float,
                   help="the site's share of Pneumonia among its films: the expected positive rate is "
                   "prevalence x sensitivity + (1 - prevalence) x (1 - specificity) from the model's claims at each "
                   "row's operating point (without --baseline)")
    p.add_argument("--claims-source", metavar="SOURCE",
                   help="the claim (source) whose sensitivity and specificity --prevalence uses (default: the "
                   "operating point's own population, most films); when the model's reference.json holds SOURCE's "
                   "select films of both classes, the flagged rate, P(pneumonia) and ood_score are judged too, "
                   "against those films mixed at --prevalence")
    p.add_argument("--alpha", type=float, default=0.001, help="significance level of each check (default 0.001)")
    p.add_argument("--out", type=Path, help="also write the report (.md and .json beside it)")
    p.add_argument("--state", type=Path, help="the CUSUM state file, kept between batches (created when missing)")
    p.add_argument("--images", action="store_true", help="read the films the CSVs name for image statistics "
                   "(intensity histogram, contrast, sharpness)")
    p.add_argument("--relative", type=float, default=1.25,
                   help="the relative change of the positive rate the CUSUM is tuned to (default 1.25: a quarter)")
    p.add_argument("--limit", type=float, default=10.0,
                   help="the CUSUM's alarm limit in log-likelihood units (default 10)")
    p.add_argument("--metrics", type=Path, help="write the state as Prometheus text here (a node-exporter textfile)")
    p.add_argument("--follow", action="store_true", help="watch the CSV as it grows (until interrupted)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between reads with --follow (default 5)")
    p.set_defaults(func=_cmd_monitor)


def _cmd_monitor(a: argparse.Namespace) -> int:
    import threading

    from cxr.site.monitor import MonitorOptions, SequentialRule, follow, monitor

    opts = options.typed(MonitorOptions, predictions=a.predictions, repository=a.model_repository, model=a.model,
                          baseline=a.baseline, prevalence=a.prevalence, alpha=a.alpha, out=a.out, state=a.state,
                          images=a.images, rule=SequentialRule(relative=a.relative, limit=a.limit), metrics=a.metrics,
                          claims_source=a.claims_source)
    if a.follow:
        stop = threading.Event()
        seen = [0]

        def show(state) -> None:
            for alarm in state.alarms[seen[0]:]:
                print(f"ALARM: {alarm.text()}", flush=True)
            seen[0] = len(state.alarms)

        try:
            state = follow(opts, stop, poll_s=a.poll, on_update=show)
        except KeyboardInterrupt:
            return ExitCode.CHECK_FAILED if seen[0] else ExitCode.OK
        return ExitCode.CHECK_FAILED if state.alarms else ExitCode.OK
    result, text = monitor(opts)
    print(text)
    return ExitCode.CHECK_FAILED if result["moved"] else ExitCode.OK


def _add_audit_log(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit-log",
        help="verify the audit trail's hash chain, or export it as FHIR AuditEvents",
        description="The audit trail that predict, listen, serve and ui append to with --audit-log is a file of JSON "
        "lines, each carrying its own sha256 and the previous record's. `verify` walks the chain: exit 0 when it "
        "holds (and prints the record count and the last hash, to file elsewhere), 3 at the first edited, inserted, "
        "reordered or deleted line (named) and on an empty file, 2 when the file cannot be read. `export` writes the records as a FHIR "
        "R4 Bundle of AuditEvent resources (after verifying the chain).",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True, help="verify or export")
    v = verbs.add_parser("verify", help="check the hash chain (exit 3 when broken)",
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
        return ExitCode.CHECK_FAILED
    if v.ok:
        print(f"{a.file}: chain holds: {v.records} records, last hash {v.last_hash}")
        return 0
    where = f" at line {v.broken_at}" if v.broken_at else ""
    print(f"{a.file}: chain broken{where}: {v.why} ({v.records} records hold before it)", file=sys.stderr)
    return ExitCode.CHECK_FAILED


def _cmd_audit_export(a: argparse.Namespace) -> int:
    import json

    from cxr.core.audit_trail import read
    from cxr.core.durable import write_durably
    from cxr.doors.fhir import audit_events

    bundle = audit_events(read(a.file))
    write_durably(a.fhir_out, (json.dumps(bundle, indent=1) + "\n").encode())
    print(f"{len(bundle['entry'])} AuditEvents written to {a.fhir_out}")
    return 0


COMMANDS = [_add_site_audit, _add_adapt, _add_monitor, _add_audit_log]
