"""Issue 33's monitor checks on one hospital's labelled films, with a given model, each a fresh `cxr monitor` run.

    .venv/bin/python scripts/monitor_checks.py FOLDER OUT --repository R --model NAME [--operating-point adult]
        [--seed 0] [--prevalence 0.15] [--batch 500] [--baseline-films 400] [--control-films 300]

FOLDER is a labelled folder ({NORMAL,PNEUMONIA}/, MANIFEST.csv with a patient column; `scripts/split_side.py` makes
one from a locked split). Its patients are halved at random (``--seed``); both halves are screened with
``cxr predict --protocol embedded`` at ``--operating-point`` (each batch's rows then put in a random order, as a
site's stream mixes its classes), and the second half once more after gamma 1.6 (a
scanner's new window: every pixel v -> 255 (v/255)^1.6). Then, each with a fresh CUSUM state and ``--images``:

* ``halves``: the second half against the first as baseline (nothing should alarm);
* ``gamma``: the second half with gamma 1.6 against the first (should alarm);
* ``same prevalence``: a batch of ``--control-films`` films at ``--prevalence`` against a disjoint baseline of
  ``--baseline-films`` at the same prevalence (nothing should alarm; 0 films: not run, and the summary says so);
* ``doubled prevalence``: a batch of ``--batch`` films at twice ``--prevalence`` against that baseline (should alarm).
  The prevalence sets are drawn ``--draws`` times (whole patients; each draw's sets disjoint): the summary counts
  the draws that alarmed and names what the first draw's alarms named.

The prevalence sets are drawn from both halves by film (a patient's films stay in one set). Writes OUT/summary.md
and OUT/summary.json (exit codes and what each alarm named), the predictions and the monitors' reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CXR = [sys.executable, "-m", "cxr.cli"]
GAMMA = 1.6


def read_manifest(folder: Path) -> list[tuple[Path, str, str]]:
    """(film, label folder, patient) for every film of the folder."""
    with (folder / "MANIFEST.csv").open(newline="") as fh:
        return [(folder / r["label"] / r["file_name"], r["label"], r["patient"]) for r in csv.DictReader(fh)]


def lay_out(films: list[tuple[Path, str, str]], out: Path, gamma: float | None = None) -> None:
    for path, label, _ in films:
        d = out / label
        d.mkdir(parents=True, exist_ok=True)
        if gamma is None:
            (d / path.name).symlink_to(path.resolve())
        else:
            a = np.asarray(Image.open(path).convert("L"), np.float64) / 255.0
            Image.fromarray(np.round(255.0 * a**gamma).astype(np.uint8)).save(d / (path.stem + ".png"))


def predict(folder: Path, csv_out: Path, a: argparse.Namespace) -> list[dict]:
    if not csv_out.exists():
        subprocess.run([*CXR, "predict", str(folder), "--protocol", "embedded", "--url", str(a.repository),
                        "--model", a.model, "--operating-point", a.operating_point, "--format", "csv",
                        "--out", str(csv_out)], check=True, stdout=subprocess.DEVNULL)
    with csv_out.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def monitor(name: str, batch: Path, baseline: Path, out: Path, a: argparse.Namespace) -> dict:
    state = out / f"{name}.state.json"
    state.unlink(missing_ok=True)
    r = subprocess.run([*CXR, "monitor", str(batch), "--baseline", str(baseline), "--model-repository",
                        str(a.repository), "--images", "--state", str(state), "--out", str(out / f"{name}.md")],
                       capture_output=True, text=True)
    if r.returncode not in (0, 3):
        raise SystemExit(f"cxr monitor ({name}) exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    report = json.loads((out / f"{name}.json").read_text())
    seq = report.get("sequential", {})
    return {"exit": r.returncode, "report": f"{name}.md", "alarms": [x["text"] for x in seq.get("alarms", [])],
            "moved": [c["name"] for c in report["checks"] if c["moved"]] if not report["too_small"] else []}


def exit_text(v: dict) -> str:
    if v["exit"] is None:
        return "not run"
    if isinstance(v["exit"], list):
        return f"3 in {v['alarmed']} of {len(v['exit'])} draws"
    return str(v["exit"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--operating-point", default="adult")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prevalence", type=float, default=0.15)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--baseline-films", type=int, default=400)
    p.add_argument("--control-films", type=int, default=300)
    p.add_argument("--draws", type=int, default=5, help="prevalence sets drawn (each a fresh monitor run)")
    a = p.parse_args()
    films = read_manifest(a.folder)
    patients = sorted({f[2] for f in films})
    rng = random.Random(a.seed)
    rng.shuffle(patients)
    first = set(patients[: len(patients) // 2])
    halves = {"A": [f for f in films if f[2] in first], "B": [f for f in films if f[2] not in first]}
    a.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    for name, part, gamma in (("A", halves["A"], None), ("B", halves["B"], None), ("B_gamma", halves["B"], GAMMA)):
        folder = a.out / "films" / name
        if not folder.exists():
            lay_out(part, folder, gamma)
        rows[name] = predict(folder, a.out / f"predictions_{name}.csv", a)
    # `cxr predict` answers a folder in file order (NORMAL/ before PNEUMONIA/): a site's stream comes in time order,
    # its classes mixed, so the batch's rows are put in one random order (the same for B and B_gamma, film by film)
    order = {stem: i for i, stem in enumerate(rng.sample(sorted(Path(r["path"]).stem for r in rows["B"]),
                                                         len(rows["B"])))}
    for name in ("B", "B_gamma"):
        write_rows(sorted(rows[name], key=lambda r: order[Path(r["path"]).stem]), a.out / f"stream_{name}.csv")
    results = {"halves": monitor("halves", a.out / "stream_B.csv", a.out / "predictions_A.csv", a.out, a),
               "gamma": monitor("gamma", a.out / "stream_B_gamma.csv", a.out / "predictions_A.csv", a.out, a)}
    # prevalence: whole patients, by class, from both halves (their ungammaed rows), drawn --draws times
    by_patient: dict[tuple[str, str], list[dict]] = {}
    label_of = {str(a.out / "films" / h / lab / f.name): (lab, pat) for h in ("A", "B") for f, lab, pat in halves[h]}
    for r in rows["A"] + rows["B"]:
        by_patient.setdefault(label_of[r["path"]], []).append(r)
    q, n = a.prevalence, a.batch
    n_base, n_same = a.baseline_films, a.control_films
    draws: dict[str, list[dict]] = {"same prevalence": [], "doubled prevalence": []}
    sizes = {"halves": (len(rows["A"]), len(rows["B"])), "gamma": (len(rows["A"]), len(rows["B_gamma"])),
             "same prevalence": (n_base, n_same), "doubled prevalence": (n_base, n)}
    for d in range(a.draws):
        drng = random.Random(f"{a.seed}-prevalence-{d}")
        by_class: dict[str, list[list[dict]]] = {"NORMAL": [], "PNEUMONIA": []}
        for (lab, _), rs in sorted(by_patient.items()):
            by_class[lab].append(rs)
        for group in by_class.values():
            drng.shuffle(group)

        def take(label: str, k: int, by_class=by_class) -> list[dict]:
            got: list[dict] = []
            while len(got) < k:
                if not by_class[label]:
                    raise SystemExit(f"not enough {label} films for the prevalence sets")
                got += by_class[label].pop()
            return got

        base = take("PNEUMONIA", round(q * n_base)) + take("NORMAL", round((1 - q) * n_base))
        double = take("PNEUMONIA", round(2 * q * n)) + take("NORMAL", round((1 - 2 * q) * n))
        same = take("PNEUMONIA", round(q * n_same)) + take("NORMAL", round((1 - q) * n_same)) if n_same else []
        for rs in (base, same, double):
            drng.shuffle(rs)
        write_rows(base, a.out / f"prevalence_baseline_{d}.csv")
        write_rows(double, a.out / f"prevalence_double_{d}.csv")
        draws["doubled prevalence"].append(monitor(f"double_{d}", a.out / f"prevalence_double_{d}.csv",
                                                   a.out / f"prevalence_baseline_{d}.csv", a.out, a))
        if same:
            write_rows(same, a.out / f"prevalence_same_{d}.csv")
            draws["same prevalence"].append(monitor(f"same_{d}", a.out / f"prevalence_same_{d}.csv",
                                                    a.out / f"prevalence_baseline_{d}.csv", a.out, a))
    for k, runs in draws.items():
        results[k] = {"draws": runs, "exit": [r["exit"] for r in runs], "alarms": [], "moved": [],
                      "alarmed": sum(r["exit"] == 3 for r in runs)} if runs else \
            {"exit": None, "alarms": [], "moved": [], "not_run": "--control-films 0"}
        if runs:  # what the first draw's alarms named
            results[k]["alarms"], results[k]["moved"] = runs[0]["alarms"], runs[0]["moved"]
    expect = {"halves": 0, "gamma": 3, "same prevalence": 0, "doubled prevalence": 3}
    summary = {"folder": a.folder.name, "model": a.model, "operating_point": a.operating_point, "seed": a.seed,
               "prevalence": q, "scenarios": {k: {**v, "films": sizes[k], "expected_exit": expect[k]}
                                              for k, v in results.items()}}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Monitor checks: {a.folder.name}, model {a.model} at {a.operating_point} (seed {a.seed})", "",
             "| scenario | baseline films | batch films | expected | exit | what alarmed or moved |",
             "|---|---|---|---|---|---|"]
    for k, v in summary["scenarios"].items():
        more = f" (+{len(v['alarms']) - 2} more alarms)" if len(v["alarms"]) > 2 else ""
        what = "; ".join([*(f"alarm: {t}" for t in v["alarms"][:2]), *(f"batch test moved: {m}" for m in v["moved"])])
        what += more
        lines.append(f"| {k} | {v['films'][0]} | {v['films'][1]} | {v['expected_exit']} | {exit_text(v)} | {what or 'nothing'} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
