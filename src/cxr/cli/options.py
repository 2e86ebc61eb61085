"""Options shared by several commands (the client's connection and transport security, the operating point, the
result doors), and how they become the library's typed arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cxr.core.errors import CxrError
from cxr.core.model_dir import PREVIOUS_SUFFIX, keep_previous
from cxr.core.paths import DEFAULT_MODEL, DEFAULT_REPOSITORY

T = TypeVar("T")


def typed(factory: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``factory(*args, **kwargs)`` (a typed option's constructor or parser) with its ``ValueError`` as a usage
    error: a bad option is the user's (exit 2); a ``ValueError`` anywhere else is a bug (exit 1)."""
    try:
        return factory(*args, **kwargs)
    except ValueError as exc:
        raise CxrError(str(exc)) from None


def add_client_args(p: argparse.ArgumentParser) -> None:
    """``--url``, ``--protocol``, ``--model``, ``--timeout-s`` and the client's transport security."""
    p.add_argument("--url", help="server host:port (default 127.0.0.1:8001 gRPC / :8000 HTTP); for embedded, the repository")
    p.add_argument("--protocol", choices=["grpc", "http", "embedded"], default="grpc", help="grpc, http, or embedded (in-process onnxruntime, no server)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline")
    add_tls_client_args(p)


def add_tls_client_args(p: argparse.ArgumentParser) -> None:
    """The client's TLS files and config key."""
    g = p.add_argument_group("transport security")
    g.add_argument("--tls-ca", type=Path, help="CA bundle the server's certificate must verify against (turns TLS on)")
    g.add_argument("--tls-cert", type=Path, help="this client's certificate, for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="this client's private key, for mutual TLS")
    g.add_argument("--config-key-file", type=Path, help="key for a server that restricts model-config (header config-key)")


def client_security(a: argparse.Namespace) -> dict[str, Any]:
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


def add_operating_point(p: argparse.ArgumentParser) -> None:
    """``--operating-point NAME``."""
    p.add_argument("--operating-point", metavar="NAME",
                   help="answer at this served operating point (e.g. pediatric, adult; `cxr health` lists them); "
                   "default: a DICOM input's patient age chooses its population's point, any other input gets the "
                   "model's default point")


def add_result_doors(p: argparse.ArgumentParser) -> None:
    """FHIR results and the audit trail: the same flags on predict and listen."""
    p.add_argument("--fhir-out", type=Path, metavar="FILE",
                   help="write the FHIR R4 results (DiagnosticReport, Observation, Device): predict writes one "
                   "transaction Bundle; listen appends NDJSON, one transaction Bundle per screened instance a line")
    p.add_argument("--fhir-url", metavar="URL", help="POST the FHIR results to this FHIR server's base URL")
    p.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append every event (received, screened, delivered, failed) to this hash-chained audit trail "
                   "(verify it with `cxr audit-log verify FILE`)")


def add_model_folder(p: argparse.ArgumentParser, *, writes: bool = False) -> None:
    """``--repository`` and ``--name``: the model folder a command builds or measures.

    A command that writes the folder (``writes``) has no default repository: its destination is always named, and
    ``--overwrite`` (see :func:`add_overwrite`) is needed to write into a folder that exists. Only reading commands
    default to the shipped model.
    """
    if writes:
        p.add_argument("--repository", type=Path, required=True,
                       help="Triton model repository to write into (no default: name it; the shipped model is "
                       f"{DEFAULT_REPOSITORY})")
    else:
        p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    p.add_argument("--name", default=DEFAULT_MODEL, help="model folder in the repository")
    if writes:
        add_overwrite(p)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: allow writing into an existing model folder (its previous version is copied aside first)."""
    p.add_argument("--overwrite", action="store_true",
                   help="write into a model folder that exists; its previous version is first copied to "
                   f"<repository>{PREVIOUS_SUFFIX}/<name>-<UTC time> (one line says where)")


def writable_model_folders(folders: Sequence[Path], *, overwrite: bool) -> list[Path]:
    """Check, before any work, that a command may write ``folders``; with ``overwrite``, copy the existing ones aside.

    Returns the copies (each reported in one line on stdout).

    Raises:
        CxrError: A folder exists and ``overwrite`` is false (nothing was written).
    """
    existing = [Path(f) for f in folders if Path(f).exists()]
    if existing and not overwrite:
        raise CxrError(f"{', '.join(map(str, existing))} exists: pass --overwrite to write into it (its previous "
                       "version is copied aside first), or name another --repository/--name")
    kept = []
    for folder in existing:
        kept.append(keep_previous(folder))
        print(f"previous {folder} kept in {kept[-1]} (move it back to restore it)")
    return kept
