"""``cxr serve`` as a function: start the embedded Triton, keep its served models on the audit trail, and stop
cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from cxr.core.audit_trail import AuditLog, default_actor
from cxr.core.errors import ServerError
from cxr.core.lifecycle import serve_until_signal
from cxr.core.model_dir import ModelDir
from cxr.serving.server import ServerConfig, TritonServer

logger = logging.getLogger(__name__)


class ServedModelsAudit:
    """The served models on an audit trail: :meth:`start` records the start and every served model (with its card's
    sha256); :meth:`alive`, polled while serving, records each change of the repository index (a model loaded,
    unloaded or replaced through the admin API) at most every ``every_s`` seconds, and says whether the server
    still runs.

    Args:
        server: The running server (``config``, ``model_states()``, ``running()``).
        audit: The trail written to.
        actor: Who serves (recorded as the actor of the start and of each model change).
        repository: The model repository, where each model's card gives its sha256.
        every_s: Least seconds between two reads of the repository index.
        clock: Monotonic seconds (a fake one in tests).
    """

    def __init__(self, server: TritonServer, audit: AuditLog, actor: str, repository: Path, *, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.server, self.audit, self.actor, self.repository = server, audit, actor, Path(repository)
        self.every_s, self.clock = every_s, clock
        self._seen: dict[str, tuple[str, str]] = {}
        self._last_read = clock()

    def _sha256(self, name: str) -> str:
        folder = ModelDir(self.repository / name)
        return folder.card().sha256 if folder.has_card() else ""

    def _model_changed(self, name: str, version: str, state: str) -> None:
        self.audit.event("model_changed", actor=self.actor, model_sha256=self._sha256(name), model=name,
                         version=version, state=state)

    def start(self) -> None:
        """Record the start and each served model (before anyone is told the server is ready)."""
        cfg = self.server.config
        self.audit.event("started", actor=self.actor, http=cfg.http_url, grpc=cfg.grpc_url)
        self._seen = self.server.model_states()
        for name, (version, state) in sorted(self._seen.items()):
            self._model_changed(name, version, state)
        self._last_read = self.clock()

    def alive(self) -> bool:
        """Record what changed in the repository index since it was last read (when ``every_s`` has passed); True
        while the server runs."""
        if self.clock() - self._last_read >= self.every_s:
            now = self.server.model_states()
            self._last_read = self.clock()
            if now and now != self._seen:  # an empty index is a failed read, not every model unloaded
                via = "api:admin-key" if self.server.config.admin_key_file else "api:repository"
                for name in sorted(set(now) | set(self._seen)):
                    if now.get(name) != self._seen.get(name):
                        version, state = now.get(name, ("", "UNLOADED"))
                        self.audit.event("admin_api", actor=via, model=name,
                                         change=f"{self._seen.get(name)} -> {(version, state)}")
                        self._model_changed(name, version, state)
                self._seen = now
        return self.server.running()


def serve(cfg: ServerConfig, *, audit_log: Path | None = None,
          on_ready: Callable[[TritonServer], None] = lambda server: None) -> None:
    """Serve the model repository of ``cfg`` until SIGTERM or Ctrl-C.

    Starts tritonserver (the model sha256s are checked against their cards first), records the start and the
    served models on ``audit_log`` when given, calls ``on_ready`` once the server is ready, then blocks. The stop
    is recorded too, however serving ends.

    Raises:
        ServerError: tritonserver did not become ready, or exited while serving (its log tail in the message).
    """
    audit = AuditLog(audit_log, component="cxr serve") if audit_log is not None else None
    actor = default_actor()
    try:
        with TritonServer(cfg) as server:
            alive = server.running
            if audit is not None:
                watch = ServedModelsAudit(server, audit, actor, cfg.model_repository)
                watch.start()
                alive = watch.alive
            on_ready(server)
            serve_until_signal(alive)
            if not server.running():
                raise ServerError(f"tritonserver exited:\n{server.log_tail()}")
            logger.info("stopping tritonserver")
    finally:
        if audit is not None:
            audit.event("stopped", actor=actor)
            audit.close()
