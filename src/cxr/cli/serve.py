"""Serving: the embedded Triton, TLS in front of it, and what it serves (``serve``, ``proxy``, ``health``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.cli import options
from cxr.core.errors import CxrError, ExitCode
from cxr.core.lifecycle import serve_until_signal
from cxr.core.paths import DEFAULT_REPOSITORY

TITLE = "serving: the model on Triton"


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
    from cxr.serving.service import serve

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

    def ready(server: TritonServer) -> None:
        tls_note = (" (TLS" + (", mutual" if cfg.tls.mutual else "") + ")") if cfg.tls else ""
        print(f"Triton ready (pid {server.pid}):\n  HTTP    http://{cfg.http_url}\n  gRPC    {cfg.grpc_url}{tls_note}\n"
              f"  metrics {cfg.metrics_url}\nCtrl-C to stop.", flush=True)

    serve(cfg, audit_log=a.audit_log, on_ready=ready)
    return 0


def _add_health(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="server and model readiness and metadata",
        description="Ask the server whether it and the model are ready, and print what a client learns from it as "
        "JSON: model name and version, max batch size, decision threshold, labels, outputs, OOD threshold, model "
        "sha256 and the DICOM eligibility rules. Exit code 0 when ready, 75 (try again later) otherwise.",
    )
    options.add_client_args(p)
    p.set_defaults(func=_cmd_health)


def _cmd_health(a: argparse.Namespace) -> int:
    import json

    from cxr.client import PneumoniaClient, RetryPolicy

    with PneumoniaClient(a.url, protocol=a.protocol, model=a.model, timeout_s=a.timeout_s, **options.client_security(a),
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
        return ExitCode.OK if ready else ExitCode.TEMPFAIL  # not ready: ask again later


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


COMMANDS = [_add_serve, _add_proxy, _add_health]
