"""The network doors: where the hospital's systems send films and read results.

* :mod:`cxr.doors.dicom`: ``cxr listen``, the DICOM listener: a Storage SCP that screens what the PACS sends it
  and sends DICOM SR results back (and to DICOMweb and FHIR), durable across crashes; split by role (SCP, spool,
  screening worker, result builders, outbox and senders, telemetry), the map is in its docstring;
* :mod:`cxr.doors.dicomweb`: DICOMweb (QIDO-RS, WADO-RS, STOW-RS): ``cxr predict --dicomweb`` reads studies
  from a server (:class:`~cxr.doors.dicomweb.DicomWebSource`), ``cxr listen --stow-url`` stores results there;
* :mod:`cxr.doors.fhir`: FHIR R4 results (Observation, DiagnosticReport, transaction Bundle) for
  ``cxr predict --fhir-*`` (:class:`~cxr.doors.fhir.FhirDelivery`) and ``cxr listen --fhir-*``, and the audit
  trail as FHIR AuditEvents (``cxr audit-log export``).

Layers (``pyproject.toml`` holds the contracts): ``dicom`` > ``fhir`` | ``dicomweb``; the whole folder imports only
``core/`` and ``client/`` (it sits just above them, below ``train/`` and ``export/``, and a forbidden contract keeps
``export/``, ``train/``, ``loadtest/`` and ``site/`` out). TensorFlow never enters the doors (they run on a
hospital's screening machine); pynetdicom only enters ``dicom/``.
"""
