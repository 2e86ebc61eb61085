"""DICOMweb in and out: find studies with QIDO-RS, read instances with WADO-RS, deliver results with STOW-RS.

``cxr predict --dicomweb URL [--study UID]... [--query KEY=VALUE]...`` searches the archive (QIDO-RS at study
level with the query's filters, e.g. ``ModalitiesInStudy=DX`` or ``StudyDate=20260101-20261231``; or the given
studies), lists every instance of the matching studies, reads each one (WADO-RS, the whole Part 10 instance) into
a private folder (0700, files 0600) and screens the files like any others, in batches as they are read, so
the first answers come within seconds and the disk holds one batch, never the query; instances already final in
the run's journal are not read again; an interrupted run (SIGINT, SIGTERM) saves its rows and leaves no file
behind (:class:`DicomWebSource`, the ``source`` that ``cxr.cli`` gives :func:`cxr.doors.predict.run_predict`);
the CSV's ``path`` is the SOP Instance UID.
``cxr listen --stow-url URL`` stores its SR and Secondary Capture with STOW-RS. Uses ``dicomweb-client``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cxr.core.errors import CxrError, ExitCode, InvalidInputError, RetryableServerError

logger = logging.getLogger(__name__)

#: QIDO-RS query parameters that are not attributes.
QIDO_PARAMETERS = ("fuzzymatching", "includefield", "limit", "offset")
#: DICOM tags of the QIDO-RS answers (hex, as DICOM JSON keys them).
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


class DicomWebError(CxrError):
    """The DICOMweb server refused a request (4xx), or answered something that is not DICOM JSON."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class InstanceRef:
    """One instance the archive holds."""

    study_uid: str
    series_uid: str
    sop_uid: str


def _value(item: Mapping, tag: str) -> str:
    try:
        return str(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return ""


def parse_query(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as QIDO-RS search filters.

    Raises:
        InvalidInputError: A pair without ``=`` or with an empty key.
    """
    import re

    from pydicom.datadict import tag_for_keyword

    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(f"--query {p!r}: expected KEY=VALUE (e.g. ModalitiesInStudy=DX)")
        if key not in QIDO_PARAMETERS and tag_for_keyword(key) is None and not re.fullmatch(r"[0-9A-Fa-f]{8}", key):
            raise InvalidInputError(f"--query {key!r}: not a DICOM keyword or tag, nor a QIDO-RS parameter "
                                    "(e.g. ModalitiesInStudy=DX, StudyDate=20260101-)")
        if key in out and out[key] != value.strip():
            raise InvalidInputError(f"--query {key}: given twice with different values")
        out[key] = value.strip()
    return out


def _classify(exc: BaseException, where: str) -> Exception:
    """Map a requests/HTTP failure: connection problems, 429 and 5xx are retryable; other 4xx are not."""
    import requests

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)) or (status is not None and (status == 429 or status >= 500)):
        return RetryableServerError(f"DICOMweb {where}: {type(exc).__name__}" + (f" (HTTP {status})" if status else ""))
    return DicomWebError(f"DICOMweb {where}: " + (f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"))


class DicomWeb:
    """A DICOMweb server (QIDO, WADO and STOW under one root URL, e.g. ``http://127.0.0.1:8042/dicom-web``).

    Every thread that talks to the server has its own HTTP session (``requests.Session`` is not safe to share
    between threads), each with one kept-alive connection: the searches and stores use the caller's, and
    :meth:`download`'s readers (a pool of ``threads``, kept for the object's life) one each, so the run holds at most
    ``threads + 1`` connections to the archive however many batches it reads. :meth:`close` (or ``with``) closes
    them all; an archive's HTTP threads are not held by idle connections after the run.
    """

    #: Seconds to open a connection (at most; ``timeout_s`` when smaller). The read deadline is ``timeout_s``: a
    #: server silent that long fails the request (retryable), it never waits forever.
    CONNECT_TIMEOUT_S = 10.0

    def __init__(self, url: str, *, timeout_s: float = 30.0, auth=None, threads: int = 4) -> None:
        """``auth``: a :class:`cxr.core.security.HttpAuth` (bearer token, client certificate, CA). ``threads``: the
        readers of :meth:`download`."""
        import threading

        from cxr.core.security import split_url_credentials

        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        bare, credentials = split_url_credentials(url.rstrip("/"))
        self.url = bare  # what messages show: never the credentials
        self._credentials, self._auth = credentials, auth
        self.timeout = (min(self.CONNECT_TIMEOUT_S, timeout_s), timeout_s)
        self.threads = max(1, threads)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def _new_client(self):
        """A DICOMweb client on a session of its own (one pooled connection: a session serves one thread)."""
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter

        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if self._credentials is not None:
            session.auth = self._credentials  # HTTP Basic, in a header
        if self._auth is not None:
            self._auth.apply(session)
        client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # one retry policy, ours (bounded, every 5xx)
        with self._lock:
            if self._closed:
                session.close()
                raise RuntimeError("DicomWeb: closed")
            self._sessions.append(session)
        return client

    @property
    def _client(self):
        """This thread's client (made on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def close(self) -> None:
        """Stop the readers and close every connection: reads not started are cancelled, a read in flight ends with
        its request (no retry, nothing written), so an interrupted run waits for one request at most."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> DicomWeb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, *, studies: Iterable[str] = (), query: Mapping[str, str] | None = None,
             modalities: Iterable[str] = ()) -> list[InstanceRef]:
        """Every instance of the given studies, or of the studies the query matches (sorted, no duplicates).

        Series are filtered before anything is listed or read: only series whose Modality is in ``modalities``,
        or, when none is given, in the query's ``ModalitiesInStudy`` (``DX`` or ``CR\\DX``): a study of a chest DX
        and an MR found by ``ModalitiesInStudy=DX`` yields the DX series only."""
        uids = list(dict.fromkeys(studies))
        wanted = {m.strip().upper() for m in modalities if m.strip()}
        if not wanted and query and query.get("ModalitiesInStudy"):
            wanted = {m.strip().upper() for m in query["ModalitiesInStudy"].replace(",", "\\").split("\\") if m.strip()}
        if not uids:
            found = self._retrying(lambda: self._pages(self._client.search_for_studies, STUDY_UID,
                                                       search_filters=dict(query or {})), "search")
            # one Study Instance UID can answer more than once (Orthanc keys a study by patient and UID: the same
            # UID under several Patient IDs is several studies there); each study's instances are listed once
            uids = list(dict.fromkeys(_value(s, STUDY_UID) for s in found if _value(s, STUDY_UID)))
        refs = []
        for uid in uids:
            if wanted:
                series = self._retrying(lambda uid=uid: self._pages(self._client.search_for_series, SERIES_UID,
                                                                    study_instance_uid=uid), "search")
                chosen = [_value(s, SERIES_UID) for s in series
                          if _value(s, MODALITY).upper() in wanted and _value(s, SERIES_UID)]
            else:
                chosen = [None]  # type: ignore[list-item]
            for series_uid in chosen:
                kw = {"study_instance_uid": uid} | ({"series_instance_uid": series_uid} if series_uid else {})
                items = self._retrying(lambda kw=kw: self._pages(self._client.search_for_instances, SOP_UID, **kw),
                                       "search")
                for item in items:
                    refs.append(InstanceRef(_value(item, STUDY_UID) or uid, _value(item, SERIES_UID) or str(series_uid),
                                            _value(item, SOP_UID)))
        return sorted(set(r for r in refs if r.sop_uid and r.series_uid), key=lambda r: (r.study_uid, r.series_uid, r.sop_uid))

    #: Tries of a request that failed with a retryable error (connection, 429, 5xx), and the first backoff.
    ATTEMPTS, BACKOFF_S = 4, 0.5

    def _retrying(self, call, what: str):
        """``call()`` with bounded retries and exponential backoff on retryable failures (connection refused or
        reset, timeouts, 429 and 5xx); a 4xx fails at once."""
        import time

        for attempt in range(self.ATTEMPTS):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - requests' and dicomweb-client's own errors
                err = _classify(exc, f"{self.url} {what}")
                if not isinstance(err, RetryableServerError) or attempt == self.ATTEMPTS - 1 or self._closed:
                    raise err from None  # closing (the run interrupted): no more tries, the run ends now
                logger.warning("%s; retrying in %.1f s", err, self.BACKOFF_S * 2 ** attempt)
                time.sleep(self.BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _pages(search, key: str, *, page: int = 500, max_pages: int = 10_000, **kw) -> list[dict]:
        """Every match of a QIDO-RS search, page by page (``limit``/``offset``). Stops at a short or empty page, or
        at a page with nothing new: a server that ignores ``offset`` then answers with its one page, never forever."""
        out: list[dict] = []
        seen: set[str] = set()
        for n in range(max_pages):
            items = search(limit=page, offset=n * page, **kw)
            fresh = [i for i in items if _value(i, key) not in seen]
            seen.update(_value(i, key) for i in fresh)
            out += fresh
            if len(items) < page or not fresh:
                break
        return out

    def retrieve(self, ref: InstanceRef) -> bytes:
        """One instance as a DICOM Part 10 file."""
        import pydicom

        ds = self._retrying(lambda: self._client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid),
                            f"instance {ref.sop_uid}")
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        return buf.getvalue()

    def retrieve_header(self, ref: InstanceRef) -> bytes:
        """One instance's header without its pixels (WADO-RS metadata: nothing bulk is read), as a DICOM Part 10
        file.

        Raises:
            DicomWebError: The metadata is not a DICOM data set.
        """
        import pydicom
        from pydicom.dataset import FileMetaDataset

        meta = self._retrying(lambda: self._client.retrieve_instance_metadata(ref.study_uid, ref.series_uid,
                                                                              ref.sop_uid), f"metadata of {ref.sop_uid}")
        try:
            ds = pydicom.Dataset.from_json({k: v for k, v in meta.items()
                                            if not (isinstance(v, dict) and "BulkDataURI" in v)})
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or pydicom.uid.SecondaryCaptureImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(ds.get("SOPInstanceUID") or ref.sop_uid)
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        except Exception as exc:  # noqa: BLE001 - pydicom's many errors for a data set it cannot take
            raise DicomWebError(f"DICOMweb {self.url} metadata of {ref.sop_uid}: not a DICOM data set "
                                f"({type(exc).__name__})") from None
        return buf.getvalue()

    def download(self, refs: list[InstanceRef], folder: Path, *, headers_only: bool = False) -> dict[Path, str]:
        """Read ``refs`` into ``folder`` (one ``<SOP Instance UID>.dcm`` each, readable by the owner only), by
        :attr:`threads` readers at a time; returns file -> SOP Instance UID. ``headers_only``: their headers,
        without pixels (:meth:`retrieve_header`).

        An instance that cannot be read is left out and logged; the caller reports it as an error row. Interrupted,
        the reads not started are cancelled (those in flight finish, each within its deadline).
        """
        import os

        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

        def one(ref: InstanceRef) -> tuple[Path, str] | tuple[None, str]:
            path = folder / f"{ref.sop_uid}.dcm"
            try:
                data = self.retrieve_header(ref) if headers_only else self.retrieve(ref)
                if self._closed:  # interrupted meanwhile: nothing more is written, the folder is about to go
                    return None, ref.sop_uid
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except CxrError as exc:
                logger.error("%s", exc)
                return None, ref.sop_uid
            return path, ref.sop_uid

        with self._lock:
            if self._closed:
                raise RuntimeError("DicomWeb: closed")
            if self._pool is None:  # the readers live as long as this object: their sessions are reused
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="wado")
            pool = self._pool
        futures = [pool.submit(one, ref) for ref in refs]
        try:
            done = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return {p: uid for p, uid in done if p is not None}

    def store(self, datasets: list, *, study_uid: str | None = None) -> None:
        """STOW-RS: store datasets (an SR, a Secondary Capture) in the archive.

        Raises:
            RetryableServerError: The server is unreachable or answered 429/5xx.
            DicomWebError: The server refused them.
        """
        try:
            self._client.store_instances(datasets, study_instance_uid=study_uid)
        except Exception as exc:  # noqa: BLE001
            raise _classify(exc, f"{self.url} store") from None


@dataclass(frozen=True)
class DicomWebSource:
    """``cxr predict --dicomweb URL [--study UID]... [--query KEY=VALUE]...``: the instances of the matching studies,
    read into the run's folder (the ``source`` of :func:`cxr.doors.predict.run_predict`).

    Attributes:
        url: The DICOMweb root.
        studies: These studies (Study Instance UIDs).
        query: QIDO-RS study filters, ``KEY=VALUE``.
        timeout_s: Each request's deadline.
    """

    url: str
    studies: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    timeout_s: float = 30.0
    #: The client and the instances listed (filled by :meth:`find`; not part of the value).
    _state: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("DICOMweb source: give the server's root URL")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        parse_query(self.query)  # unknown or malformed keys refused before anything starts

    @property
    def where(self) -> str:
        return self.url

    @property
    def kind(self) -> str:
        return "dicomweb"

    def _web(self) -> DicomWeb:
        if "web" not in self._state:
            self._state["web"] = DicomWeb(self.url, timeout_s=self.timeout_s)
        return self._state["web"]

    def close(self) -> None:
        """Close the connections to the archive (the readers finish first); ``cxr predict`` does, before it removes
        the run's folder."""
        web = self._state.pop("web", None)
        if web is not None:
            web.close()

    def find(self) -> tuple[tuple[str, str], ...]:
        """QIDO-RS: every instance of the matching studies, ``(Study Instance UID, SOP Instance UID)``; nothing is
        read yet."""
        refs = self._web().find(studies=self.studies, query=parse_query(self.query))
        self._state["refs"] = {r.sop_uid: r for r in refs}
        return tuple((r.study_uid, r.sop_uid) for r in refs)

    def read(self, names: list[str], folder: Path) -> dict[Path, str]:
        """WADO-RS: these instances (found by :meth:`find`) into ``folder``, files named by SOP Instance UID."""
        refs = self._state.get("refs", {})
        return self._web().download([refs[n] for n in names if n in refs], folder)

    def read_headers(self, names: list[str], folder: Path) -> dict[Path, str]:
        """WADO-RS metadata: these instances' headers, without pixels, into ``folder`` (for the FHIR results of
        instances answered by an earlier run, which are not read again)."""
        refs = self._state.get("refs", {})
        return self._web().download([refs[n] for n in names if n in refs], folder, headers_only=True)
