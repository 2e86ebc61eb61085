"""Mutual TLS on gRPC, restricted admin APIs, the nginx TLS proxy for HTTP: real certificates, real server, real nginx."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cxr.client import PneumoniaClient, RetryPolicy
from cxr.core import contract
from cxr.core.errors import CxrError, RetryableServerError, ServerError
from cxr.core.security import (
    ADMIN_HEADER,
    CONFIG_HEADER,
    TlsClient,
    TlsError,
    TlsServer,
    grpc_header,
    make_dev_pki,
    read_key,
)
from cxr.serving.server import ServerConfig, TritonServer, free_ports
from tests.conftest import REPO, SHIPPED_REPOSITORY

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-" + "a1b2c3d4" * 4
CONFIG_KEY = "config-" + "e5f6a7b8" * 4


def _key_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_pki(tmp_path_factory.mktemp("other_pki"), name="other")


@pytest.fixture(scope="module")
def secure_server(pki, tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("keys")
    h, g, m = free_ports(3)
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, http_port=h, grpc_port=g, metrics_port=m,
                       models=("pneumonia",), tls=TlsServer(pki["server_cert"], pki["server_key"], pki["ca"]),
                       admin_key_file=_key_file(d / "admin.key", ADMIN_KEY),
                       config_key_file=_key_file(d / "config.key", CONFIG_KEY), startup_timeout_s=120)
    server = TritonServer(cfg).start()
    try:
        yield server
    finally:
        server.stop()


def _client(server, tls: TlsClient | None, **kw):  # type: ignore[no-untyped-def]
    return PneumoniaClient(server.config.grpc_url, protocol="grpc", tls=tls, retry=RetryPolicy(attempts=1), timeout_s=10,
                           **kw)


def test_mutual_tls_client_with_a_good_certificate_gets_predictions(secure_server, pki) -> None:  # type: ignore[no-untyped-def]
    tls = TlsClient(pki["ca"], pki["client_cert"], pki["client_key"])
    with _client(secure_server, tls, config_key=CONFIG_KEY) as c:
        scores = c.infer_scores(np.zeros((3, *contract.IMAGE_SHAPE), np.uint8))
        assert scores.probability.shape == (3,) and scores.ood_score is not None
        assert c.info.ood_threshold is not None and c.ready()


def test_client_without_a_certificate_is_refused(secure_server, pki) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TlsError, match="requires a client certificate|closed the connection"):
        _client(secure_server, TlsClient(pki["ca"]), config_key=CONFIG_KEY)


def test_client_certificate_from_another_ca_is_refused(secure_server, pki, other_pki) -> None:  # type: ignore[no-untyped-def]
    tls = TlsClient(pki["ca"], other_pki["client_cert"], other_pki["client_key"])
    with pytest.raises(TlsError, match="refused the client certificate"):
        _client(secure_server, tls, config_key=CONFIG_KEY)


def test_server_certificate_that_does_not_verify_is_named(secure_server, other_pki) -> None:  # type: ignore[no-untyped-def]
    tls = TlsClient(other_pki["ca"], other_pki["client_cert"], other_pki["client_key"])
    with pytest.raises(TlsError, match="server's certificate does not verify"):
        _client(secure_server, tls, config_key=CONFIG_KEY)


def test_plaintext_client_is_refused(secure_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RetryableServerError, match="UNAVAILABLE"):
        _client(secure_server, None, config_key=CONFIG_KEY)


def test_model_config_needs_the_config_key(secure_server, pki) -> None:  # type: ignore[no-untyped-def]
    tls = TlsClient(pki["ca"], pki["client_cert"], pki["client_key"])
    with pytest.raises(ServerError, match="restricted"):
        _client(secure_server, tls)  # no config key: the threshold cannot be read


def test_unload_needs_the_admin_key_over_grpc(secure_server, pki) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(secure_server.config.grpc_url,
                                              **TlsClient(pki["ca"], pki["client_cert"], pki["client_key"]).grpc_kwargs())
    try:
        key = grpc_header(ADMIN_HEADER)
        for headers in (None, {key: "wrong-key-0000000000"}, {ADMIN_HEADER: ADMIN_KEY}):  # the HTTP name is not enough
            with pytest.raises(InferenceServerException) as info:
                client.unload_model("pneumonia", headers=headers)
            assert "restricted" in str(info.value).lower()
            with pytest.raises(InferenceServerException):
                client.get_inference_statistics("pneumonia", headers=headers)
        assert client.is_model_ready("pneumonia")  # inference and health stay open to authenticated clients
        client.unload_model("pneumonia", headers={key: ADMIN_KEY})
        assert not client.is_model_ready("pneumonia")
        client.load_model("pneumonia", headers={key: ADMIN_KEY})
        assert client.is_model_ready("pneumonia")
        stats = client.get_inference_statistics("pneumonia", headers={key: ADMIN_KEY}, as_json=True)
        assert stats["model_stats"]
    finally:
        client.close()


def _http(server, method: str, path: str, headers: dict | None = None) -> int:  # type: ignore[no-untyped-def]
    req = urllib.request.Request(f"http://{server.config.http_url}{path}", method=method, headers=headers or {},
                                 data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unload_needs_the_admin_key_over_http(secure_server) -> None:  # type: ignore[no-untyped-def]
    assert secure_server.config.http_url.startswith("127.0.0.1:")  # HTTP has no TLS: loopback only
    assert _http(secure_server, "POST", "/v2/repository/models/pneumonia/unload") == 403
    assert _http(secure_server, "GET", "/v2/models/pneumonia/stats") == 403
    assert _http(secure_server, "GET", "/v2/models/pneumonia/config") == 403
    assert _http(secure_server, "GET", "/v2/models/pneumonia/config", {CONFIG_HEADER: CONFIG_KEY}) == 200
    assert _http(secure_server, "GET", "/v2/health/ready") == 200
    assert _http(secure_server, "POST", "/v2/repository/models/pneumonia/unload", {ADMIN_HEADER: ADMIN_KEY}) == 200
    assert _http(secure_server, "POST", "/v2/repository/models/pneumonia/load", {ADMIN_HEADER: ADMIN_KEY}) == 200
    assert _http(secure_server, "GET", "/v2/models/pneumonia/ready") == 200


def test_keys_never_reach_the_log(secure_server) -> None:  # type: ignore[no-untyped-def]
    text = secure_server.log_tail(400)
    assert ADMIN_KEY not in text and CONFIG_KEY not in text


def test_nginx_terminates_tls_for_http_with_client_certificates(secure_server, triton_server, pki, other_pki) -> None:  # type: ignore[no-untyped-def]
    from cxr.serving.proxy import NginxProxy, ProxyConfig

    https_port, grpcs_port = free_ports(2)
    cfg = ProxyConfig(https_port=https_port, triton_http=secure_server.config.http_url, cert=pki["server_cert"],
                      key=pki["server_key"], client_ca=pki["ca"], grpc_port=grpcs_port,
                      triton_grpc=triton_server.config.grpc_url)  # a plaintext loopback gRPC behind the TLS front
    with NginxProxy(cfg):
        tls = TlsClient(pki["ca"], pki["client_cert"], pki["client_key"])
        with PneumoniaClient(f"127.0.0.1:{https_port}", protocol="http", tls=tls, config_key=CONFIG_KEY,
                             retry=RetryPolicy(attempts=1)) as c:
            p = c.infer_scores(np.zeros((2, *contract.IMAGE_SHAPE), np.uint8))
            assert p.probability.shape == (2,)
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))  # HTTPS without a client certificate: refused
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"https://127.0.0.1:{https_port}/v2/health/ready", context=ctx, timeout=10)
        assert info.value.code == 400  # nginx: "No required SSL certificate was sent"
        other = ssl.create_default_context(cafile=str(pki["ca"]))
        other.load_cert_chain(str(other_pki["client_cert"]), str(other_pki["client_key"]))
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"https://127.0.0.1:{https_port}/v2/health/ready", context=other, timeout=10)
        assert info.value.code == 400
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{https_port}/v2/health/ready", timeout=10).read()
        # gRPC over TLS through nginx too (for sites that want one TLS front)
        with PneumoniaClient(f"127.0.0.1:{grpcs_port}", protocol="grpc", tls=tls, config_key=CONFIG_KEY,
                             retry=RetryPolicy(attempts=1)) as c:
            assert c.infer_scores(np.zeros((1, *contract.IMAGE_SHAPE), np.uint8)).probability.shape == (1,)


def test_locust_users_speak_mutual_tls(secure_server, pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import csv
    import subprocess
    import sys

    from cxr.loadtest.capacity import LOCUSTFILE

    key = _key_file(tmp_path / "config.key", CONFIG_KEY)
    prefix = tmp_path / "run"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "TritonGrpcUser", "--headless", "-u", "2", "-r", "2",
           "-t", "4s", "--host", secure_server.config.grpc_url, "--csv", str(prefix), "--only-summary",
           "--max-images", "4",  # decoded before users spawn: a few films keep the preload out of the short run
           "--stop-timeout", "5", "--triton-tls-ca", str(pki["ca"]), "--triton-tls-cert", str(pki["client_cert"]),
           "--triton-tls-key", str(pki["client_key"]), "--triton-config-key-file", str(key)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        agg = {row["Name"]: row for row in csv.DictReader(f)}["Aggregated"]
    assert int(agg["Request Count"]) > 0 and int(agg["Failure Count"]) == 0


def test_server_refuses_plaintext_on_a_network_address() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        ServerConfig(model_repository=SHIPPED_REPOSITORY, host="192.0.2.10")  # never started: nothing binds
    tls_cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, host="192.0.2.10", allow_insecure=True)
    assert tls_cfg.http_url.startswith("192.0.2.10")


def test_with_tls_http_and_metrics_stay_on_loopback(pki) -> None:  # type: ignore[no-untyped-def]
    cfg = ServerConfig(model_repository=SHIPPED_REPOSITORY, host="192.0.2.10",
                       tls=TlsServer(pki["server_cert"], pki["server_key"], pki["ca"]))
    assert cfg.grpc_url.startswith("192.0.2.10:") and cfg.http_url.startswith("127.0.0.1:")
    assert cfg.metrics_url.startswith("http://127.0.0.1:")
    cmd = TritonServer(cfg).command(Path("/backends"))
    assert "--http-address=127.0.0.1" in cmd and "--metrics-address=127.0.0.1" in cmd
    assert "--grpc-use-ssl-mutual=true" in cmd and "--grpc-address=192.0.2.10" in cmd


def test_key_files_must_be_private_and_well_formed(tmp_path: Path) -> None:
    good = _key_file(tmp_path / "k", ADMIN_KEY)
    assert read_key(good) == ADMIN_KEY
    os.chmod(good, 0o644)
    with pytest.raises(CxrError, match="readable by others"):
        read_key(good)
    for bad in ("short", "has space in it 1234567", "a:b=c,d-0123456789abcdef"):
        with pytest.raises(CxrError, match="one token"):
            read_key(_key_file(tmp_path / "b", bad))


def test_ui_refuses_a_network_address_without_login_and_https(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    from cxr.ui import UiConfig, hash_password

    with pytest.raises(ValueError, match="without a login and HTTPS"):
        UiConfig(host="192.0.2.10")
    creds = tmp_path / "users"
    creds.write_text(f"reader:{hash_password('correct horse')}\n")
    os.chmod(creds, 0o600)
    with pytest.raises(ValueError, match="without a login and HTTPS"):
        UiConfig(host="192.0.2.10", auth_file=creds)
    UiConfig(host="192.0.2.10", auth_file=creds, https_cert=pki["server_cert"], https_key=pki["server_key"])
    with pytest.raises(ValueError, match="share link"):
        UiConfig(share=True)


def test_bench_records_tls_cost_keys() -> None:
    from cxr.loadtest.bench import REQUIRED_KEYS

    assert "tls_vs_plaintext" in REQUIRED_KEYS
    report = json.loads((REPO / "bench" / "results.json").read_text())
    assert "tls_vs_plaintext" in report
