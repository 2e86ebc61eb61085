"""Locust users for the pneumonia model on Triton: gRPC and HTTP (binary tensors).

Run headless and bounded, against loopback by default::

    locust -f src/cxr/loadtest/locustfile.py TritonGrpcUser --headless -u 16 -r 16 -t 60s \\
        --host 127.0.0.1:8001 --images-dir FOLDER --images-per-request 1

Distributed (more load than one machine makes)::

    locust -f src/cxr/loadtest/locustfile.py TritonGrpcUser --master --headless -u 64 -r 16 -t 5m --expect-workers 4
    locust -f src/cxr/loadtest/locustfile.py TritonGrpcUser --worker --master-host MASTER_IP   # on each load machine

Requests carry real preprocessed X-rays (the contract's preprocess) from
``--images-dir``, or generated images when it is missing. Each request is
reported to Locust's ``request`` event with its latency, so Locust's
statistics are right; clients are closed in ``on_stop`` (a gRPC run can
otherwise hang on exit).
"""

from __future__ import annotations

# gevent must patch gRPC before any gRPC use, or calls run one at a time and no batches form.
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from locust import User, between, events, task  # noqa: E402

from cxr.core import contract, imaging  # noqa: E402
from cxr.core.errors import InvalidInputError, NotAssessableError  # noqa: E402
from cxr.core.security import CONFIG_HEADER, TlsClient, grpc_header, read_key  # noqa: E402

_IMAGES: np.ndarray | None = None
#: Served answers by status: every successful response is an answer, labelled or not assessable.
ANSWERS: Counter[str] = Counter()
_USER_COUNT = [0]
_USER_LOCK = __import__("threading").Lock()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--images-dir", default="", help="X-rays to send (preprocessed once; default: generated images)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images in each request's batch")
    parser.add_argument("--model-name", default="pneumonia", help="served model")
    parser.add_argument("--max-images", type=int, default=64, help="distinct images loaded")
    # (Locust's own --tls-cert/--tls-key are for its web UI: these are Triton's)
    parser.add_argument("--triton-tls-ca", default="", help="CA of Triton's certificate (turns TLS on)")
    parser.add_argument("--triton-tls-cert", default="", help="client certificate, for mutual TLS to Triton")
    parser.add_argument("--triton-tls-key", default="", help="client private key, for mutual TLS to Triton")
    parser.add_argument("--triton-config-key-file", default="", help="key for a Triton that restricts model-config")


def load_images(directory: str, limit: int) -> np.ndarray:
    """Preprocessed contract images from a folder, or generated ones when it has none."""
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in contract.IMAGE_SUFFIXES)[:limit] \
        if directory and Path(directory).is_dir() else []
    imgs = []
    for f in files:
        try:
            imgs.append(imaging.preprocess(f))
        except (InvalidInputError, NotAssessableError):
            continue
    if not imgs:
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, contract.IMAGE_SHAPE, dtype=np.uint8) for _ in range(8)]
    return np.stack(imgs)


@events.test_stop.add_listener
def _report_answers(environment, **_kw) -> None:
    total = sum(ANSWERS.values())
    if total:
        print(f"served answers: {total} images, " + ", ".join(f"{k} {v}" for k, v in sorted(ANSWERS.items())), file=sys.stderr)


@events.quit.add_listener
def _hard_exit(exit_code: int, **_kw) -> None:
    """Exit once Locust has written everything: gRPC's gevent threads can otherwise keep the process alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


@events.test_start.add_listener
def _preload(environment, **_kw) -> None:
    """Decode the images before users spawn, so a short run never stops a user mid-start."""
    if environment.parsed_options is not None:
        _images(environment)


def _images(env) -> np.ndarray:
    global _IMAGES
    if _IMAGES is None:
        opts = env.parsed_options
        _IMAGES = load_images(opts.images_dir, opts.max_images)
    return _IMAGES


class _TritonUser(User):
    abstract = True
    wait_time = between(0, 0)
    protocol = ""
    default_host = ""
    config_kwargs: dict = {}

    def make_client(self, url: str):
        raise NotImplementedError

    @staticmethod
    def config_header(name: str) -> str:
        raise NotImplementedError

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.tls = (TlsClient(Path(opts.triton_tls_ca), Path(opts.triton_tls_cert) if opts.triton_tls_cert else None,
                              Path(opts.triton_tls_key) if opts.triton_tls_key else None) if opts.triton_tls_ca else None)
        self.config_key = (read_key(Path(opts.triton_config_key_file), "config key")
                           if opts.triton_config_key_file else None)
        self.model = opts.model_name
        self.n = max(1, int(opts.images_per_request))
        self.images = _images(self.environment)
        self.rng = np.random.default_rng()
        # A fleet: --host A,B,C spreads the users over the replicas (user i talks to replica i mod n).
        hosts = [h.strip() for h in (self.host or self.default_host).split(",") if h.strip()]
        with _USER_LOCK:
            index = _USER_COUNT[0]
            _USER_COUNT[0] += 1
        self.client = self.make_client(hosts[index % len(hosts)])
        self.ood_threshold = self.read_ood_threshold()

    def read_ood_threshold(self) -> float | None:
        """The served OOD threshold (config parameter), as every client applies it."""
        headers = {self.config_header(CONFIG_HEADER): self.config_key} if self.config_key else None
        cfg = self.client.get_model_config(self.model, headers=headers, **self.config_kwargs)
        cfg = cfg.get("config", cfg)
        value = (cfg.get("parameters") or {}).get(contract.PARAM_OOD_THRESHOLD, {}).get("string_value")
        return float(value) if value else None

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def batch(self) -> np.ndarray:
        idx = self.rng.integers(0, len(self.images), self.n)
        return self.images[idx]

    def fire(self, fn) -> None:
        """Time one request; both outputs must come back. A not-assessable image (ood_score above the
        served threshold) is a served answer like a label: counted in ``ANSWERS``, not as a failure."""
        t0 = time.perf_counter()
        exc = None
        length = 0
        try:
            res = fn()
            prob, ood = res.as_numpy(contract.OUTPUT_NAME), res.as_numpy(contract.OOD_OUTPUT_NAME)
            for name, out in ((contract.OUTPUT_NAME, prob), (contract.OOD_OUTPUT_NAME, ood)):
                if out is None or out.size != self.n:
                    raise RuntimeError(f"expected {self.n} values of {name}, got {None if out is None else out.shape}")
            length = int(prob.nbytes + ood.nbytes)
            refused = int(sum(contract.is_out_of_distribution(float(v), self.ood_threshold) for v in ood.reshape(-1)))
            ANSWERS[contract.Status.NOT_ASSESSABLE.value] += refused
            ANSWERS[contract.Status.OK.value] += self.n - refused
        except Exception as e:  # noqa: BLE001 - reported to Locust
            exc = e
        events.request.fire(
            request_type=self.protocol, name=f"{self.model} x{self.n}", response_time=(time.perf_counter() - t0) * 1000,
            response_length=length, exception=exc, context={},
        )


class TritonGrpcUser(_TritonUser):
    """tritonclient.grpc (gevent-patched)."""

    default_host = "127.0.0.1:8001"
    protocol = "grpc"
    config_kwargs = {"as_json": True}

    @staticmethod
    def config_header(name: str) -> str:
        return grpc_header(name)

    def make_client(self, url: str):
        import tritonclient.grpc as g

        self._mod = g
        return g.InferenceServerClient(url=url, **(self.tls.grpc_kwargs() if self.tls else {}))

    @task
    def infer(self) -> None:
        g = self._mod
        x = self.batch()
        inp = g.InferInput(contract.INPUT_NAME, list(x.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(x)
        outs = [g.InferRequestedOutput(n) for n in contract.OUTPUT_NAMES]
        self.fire(lambda: self.client.infer(self.model, [inp], outputs=outs, client_timeout=30))


class TritonHttpUser(_TritonUser):
    """tritonclient.http with binary tensor data (geventhttpclient)."""

    default_host = "127.0.0.1:8000"
    protocol = "http"

    @staticmethod
    def config_header(name: str) -> str:
        return name

    def make_client(self, url: str):
        import tritonclient.http as h

        self._mod = h
        kw: dict = {}
        if self.tls is not None:  # HTTPS through the TLS proxy (Triton's HTTP has none)
            opts = {"ca_certs": str(self.tls.ca)}
            if self.tls.cert is not None:
                opts.update(certfile=str(self.tls.cert), keyfile=str(self.tls.key))
            kw = {"ssl": True, "ssl_options": opts, "insecure": False}
        return h.InferenceServerClient(url=url.removeprefix("http://").removeprefix("https://"), network_timeout=30, **kw)

    @task
    def infer(self) -> None:
        h = self._mod
        x = self.batch()
        inp = h.InferInput(contract.INPUT_NAME, list(x.shape), contract.INPUT_TRITON_DTYPE)
        inp.set_data_from_numpy(x, binary_data=True)
        outs = [h.InferRequestedOutput(n, binary_data=True) for n in contract.OUTPUT_NAMES]
        self.fire(lambda: self.client.infer(self.model, [inp], outputs=outs))
