"""Measuring: a model's figures on labelled films (``evaluate``, ``compare``, ``claims``, ``ood-eval``,
``explain-eval``) and the serving stack's speed (``bench``, ``bench-priority``, ``capacity``, ``soak``)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from cxr.cli import options
from cxr.core.errors import CxrError, ExitCode
from cxr.core.paths import DEFAULT_CACHE, DEFAULT_MODEL, DEFAULT_REPOSITORY, REPORTS_DIR

TITLE = "measuring: a model's figures, the server's speed"


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
    p.add_argument("--out", type=Path, help="report folder (default: eval_<data name> beside a training run's "
                   "model.keras, where `cxr export` puts it on the card; for an exported model, "
                   f"{REPORTS_DIR / 'evaluate'}/eval_<data name>)")
    p.add_argument("--threshold", type=float, help="override the stored threshold")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--split", type=Path, help="a run's split.json: evaluate its validation side (DATA is the Kaggle root)")
    p.add_argument("--source", help="with --split: only this source's validation films (e.g. nih)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from cxr.train.evaluate import evaluate, report_dir, summary_lines

    if a.source and not a.split:
        raise CxrError("--source needs --split")
    out = a.out or report_dir(a.model, a.data, split_file=a.split, source=a.source)
    rep = evaluate(a.model, a.data, out, threshold=a.threshold, n_boot=a.n_boot, cache_dir=DEFAULT_CACHE,
                   split_file=a.split, source=a.source)
    print("\n".join(summary_lines(rep, title=rep["title"])))
    for r in rep["refused"]:
        print(f"refused ({r['label']}): {r['reason']}")
    print(f"reports and plots in {out}")
    return ExitCode.OK if rep["n"] else ExitCode.USAGE  # no film could be evaluated


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
        epilog="example:\n  cxr compare --data SITE_SAMPLE --out docs/model/comparison \\\n"
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
    compare(entries, a.data, a.out, quoted=[options.typed(parse_quoted, q) for q in a.quoted], notes=a.note, n_boot=a.n_boot,
            cache_dir=DEFAULT_CACHE)
    print((a.out / "comparison.md").read_text())
    return 0


def _add_claims(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "claims",
        help="measure claims.json on the locked test patients (read once)",
        description="Read the locked split's test side once, score it with the served graph and write the model "
        "folder's claims.json: every source at every operating point, 95%% intervals from a patient bootstrap. "
        "The test films are recorded in provenance.csv with the role test; nothing measured here chooses anything. "
        "Writes into the model folder: --repository is required, and --overwrite.",
    )
    options.add_model_folder(p, writes=True)
    p.add_argument("--split", type=Path, required=True, help="the locked split (`cxr lock-split`)")
    p.add_argument("--population", action="append", required=True, metavar="SOURCE=POPULATION",
                   help="who a test source's patients are (kaggle_site=pediatric); repeatable")
    p.set_defaults(func=_cmd_claims)


def _cmd_claims(a: argparse.Namespace) -> int:
    options.writable_model_folders([a.repository / a.name], overwrite=a.overwrite)  # (before any import or work)
    from cxr.export.claims_render import claims_markdown
    from cxr.export.claims_report import measure_claims

    populations = {}
    for t in a.population:
        k, sep, v = t.partition("=")
        if not sep or not k or not v:
            raise CxrError(f"--population {t!r}: expected SOURCE=POPULATION")
        populations[k] = v
    claims = measure_claims(a.repository / a.name, a.split, populations, cache_dir=DEFAULT_CACHE,
                            command=a.command_line)
    print(claims_markdown(claims, own_population_only=False))
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
    options.add_model_folder(p)
    p.add_argument("--real", type=Path, nargs="*", default=[], help="folders of real chest X-rays (flag rate)")
    p.add_argument("--split", type=Path, help="a run's split.json: its validation side under --data is a real set")
    p.add_argument("--data", type=Path, help="Kaggle-layout root for --split")
    p.add_argument("--xrays", type=Path, help="labelled chest X-ray folder to invert and rotate")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "ood-eval",
                   help="report folder (the committed one: docs/model)")
    p.set_defaults(func=_cmd_ood_eval)


def _cmd_ood_eval(a: argparse.Namespace) -> int:
    from cxr.export.ood_eval import OodEvalConfig, run

    rep = run(options.typed(OodEvalConfig, repository=a.repository, model=a.name, real_dirs=tuple(a.real), split_file=a.split,
                            data_dir=a.data, xray_folder=a.xrays, out_dir=a.out, cache_dir=DEFAULT_CACHE))
    print((a.out / "ood.md").read_text())
    return ExitCode.OK if rep["meets_targets"] else ExitCode.CHECK_FAILED


def _add_explain_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain-eval",
        help="measure which Grad-CAM stage explains the served model best (docs/model/gradcam.md)",
        description="On films the served model answers Pneumonia, compare Grad-CAM at each stage (and a random "
        "map) by deletion: grey out the top 5/10/20%% of pixels by the map and measure the fall of P(pneumonia). "
        "Also reports the model-randomisation sanity check and where the peaks fall.",
    )
    options.add_model_folder(p)
    p.add_argument("--data", type=Path, required=True, help="labelled folder {NORMAL,PNEUMONIA}/")
    p.add_argument("--limit", type=int, default=60, help="films used at most")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "explain-eval",
                   help="report folder (the committed one: docs/model)")
    p.set_defaults(func=_cmd_explain_eval)


def _cmd_explain_eval(a: argparse.Namespace) -> int:
    from cxr.train.explain_eval import ExplainEvalConfig, run

    run(options.typed(ExplainEvalConfig, repository=a.repository, model=a.name, data=a.data, out_dir=a.out, limit=a.limit))
    print((a.out / "gradcam.md").read_text())
    return 0


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
    p.add_argument("--images-dir", type=Path,
                   help="a folder of full-resolution X-rays (JPEG/PNG) for the preprocessing rate and the Ray job "
                   "(default: generated films)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench" / "results.json",
                   help="result file, with its .md beside it (the committed one: bench/results.json)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each timed window")
    p.add_argument("--no-inception", action="store_true", help="skip the InceptionV3 baseline (needs TensorFlow)")
    p.add_argument("--tail-seconds", type=float, default=25.0,
                   help="length of each tail-latency probe (1-image requests at concurrency 1 and 8)")
    p.add_argument("--ray-images", type=int, default=256, help="files in the Ray scaling job (one node, then two)")
    p.add_argument("--perf-analyzer-root", type=Path, default=DEFAULT_CACHE / "perf_analyzer",
                   help="a root file system holding NVIDIA's perf_analyzer, run with chroot (default: perf_analyzer in "
                   "the tools' cache; that comparison is skipped, and said so, when it is missing)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(a: argparse.Namespace) -> int:
    from cxr.loadtest.bench import BenchConfig, run_bench, table

    res = run_bench(options.typed(BenchConfig, repository=a.model_repository, model=a.model, images_dir=a.images_dir, out=a.out,
                                seconds=a.seconds, inception=not a.no_inception, tail_seconds=a.tail_seconds,
                                perf_analyzer_root=a.perf_analyzer_root, ray_images=a.ray_images))
    print(table(res))
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
    p.add_argument("--images-dir", type=Path,
                   help="a folder of X-rays (JPEG/PNG/DICOM) the users send, preprocessed once (default: generated films)")
    p.add_argument("--slo-p95-ms", type=float, default=500.0, help="latency objective on p95")
    p.add_argument("--images-per-study", type=int, default=1, help="images per study (PA + lateral = 2)")
    p.add_argument("--target-studies-per-hour", type=float, default=10_000.0, help="planning target")
    p.add_argument("--headroom", type=float, default=0.3, help="fraction of capacity kept free")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "capacity", help="report folder")
    p.set_defaults(func=_cmd_capacity)


def _cmd_capacity(a: argparse.Namespace) -> int:
    from cxr.core.security import read_key
    from cxr.loadtest.capacity import CapacityConfig, sweep

    admin_key = read_key(a.admin_key_file, "admin key") if a.admin_key_file else None
    res = sweep(options.typed(CapacityConfig, grpc_url=a.grpc_url, http_url=a.http_url, metrics_url=a.metrics_url, admin_key=admin_key,
                               model=a.model,
                               users=tuple(a.users),
                               step_seconds=a.step_seconds, images_per_request=a.images_per_request,
                               images_dir=a.images_dir, slo_p95_ms=a.slo_p95_ms, images_per_study=a.images_per_study,
                               target_studies_per_hour=a.target_studies_per_hour, headroom=a.headroom,
                               protocol=a.protocol, out_dir=a.out))
    print((a.out / "capacity.md").read_text())
    return ExitCode.OK if res["plan"]["meets_slo"] else ExitCode.CHECK_FAILED


def _add_soak(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="bounded soak at a fraction of measured saturation, with memory readings",
        description="Measure saturation, then offer --fraction of it (open loop) for --duration-s seconds; report "
        "failures, latency percentiles and the RSS of the server (with --server-pid) and of the client at start "
        "and end. Exit 3 if any request failed.",
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--server-pid", type=int, help="tritonserver pid, to report its memory")
    p.add_argument("--duration-s", type=float, default=120.0, help="soak length (bounded)")
    p.add_argument("--fraction", type=float, default=0.8, help="offered load as a fraction of measured saturation")
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "soak.json", help="result file")
    p.set_defaults(func=_cmd_soak)


def _cmd_soak(a: argparse.Namespace) -> int:
    import json

    from cxr.loadtest.soak import SoakConfig, soak

    rep = soak(options.typed(SoakConfig, grpc_url=a.url, server_pid=a.server_pid, model=a.model, duration_s=a.duration_s,
                          fraction=a.fraction, out=a.out))
    print(json.dumps(rep, indent=1))
    return ExitCode.CHECK_FAILED if rep["failed"] else ExitCode.OK


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
    p.add_argument("--out", type=Path, default=REPORTS_DIR / "bench-priority",
                   help="report folder (the committed one: docs/capacity/priority)")
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


COMMANDS = [_add_evaluate, _add_compare, _add_claims, _add_ood_eval, _add_explain_eval, _add_bench, _add_bench_priority,
            _add_capacity, _add_soak]
