"""The hospital's doors and site tools: everything a hospital connects to, or runs on its own films.

The network doors (results go where the hospital reads them):

* :mod:`cxr.hospital.dicom`: ``cxr listen``, the DICOM listener: a Storage SCP that screens what the PACS sends it
  and sends DICOM SR results back (and to DICOMweb and FHIR), durable across crashes; split by role (SCP, spool,
  screening worker, result builders, outbox and senders, telemetry), the map is in its docstring;
* :mod:`cxr.hospital.dicomweb`: DICOMweb (QIDO-RS, WADO-RS, STOW-RS): ``cxr predict --dicomweb`` reads studies
  from a server (:class:`~cxr.hospital.dicomweb.DicomWebSource`), ``cxr listen --stow-url`` stores results there;
* :mod:`cxr.hospital.fhir`: FHIR R4 results (Observation, DiagnosticReport, transaction Bundle) for
  ``cxr predict --fhir-*`` (:class:`~cxr.hospital.fhir.FhirDelivery`) and ``cxr listen --fhir-*``, and the audit
  trail as FHIR AuditEvents (``cxr audit-log export``).

The site tools (what a hospital runs on its own labelled films or its own answers):

* :mod:`cxr.hospital.site_audit`: ``cxr site-audit``, the go/no-go of the served model on the site's sample, on
  bounds against the model card's targets;
* :mod:`cxr.hospital.adapt`: ``cxr adapt``, the served model adapted to the site offline (head fine-tune, OOD
  reference, recalibration), then audited as above; only a passing model is published;
* :mod:`cxr.hospital.monitor`: ``cxr monitor``, drift of a batch of answers against the model's reference.

Layers (``pyproject.toml`` holds the contract): ``adapt`` > ``site_audit`` | ``dicom`` > ``fhir`` | ``dicomweb`` |
``monitor``; the whole folder sits above ``export/`` and below ``cli``. TensorFlow never enters the doors (they
run on a hospital's screening machine); pynetdicom only enters ``dicom/``.
"""
