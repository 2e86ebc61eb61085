"""The DICOM doors: ``cxr listen``, a DICOM Storage SCP that screens what it receives and sends DICOM SR results
back to the PACS (and, optionally, to a DICOMweb server and a FHIR server).

By role (each module imports only from the lines below it; ``pyproject.toml`` holds the contract):

* :mod:`~cxr.doors.dicom.listener`: :class:`~cxr.doors.dicom.listener.Listener`, the composition of the
  parts below that ``cxr listen`` starts and stops;
* :mod:`~cxr.doors.dicom.scp`: the Storage SCP (pynetdicom): associations, C-ECHO, C-STORE into the spool;
  :mod:`~cxr.doors.dicom.worker`: the screening worker, one result per instance or per study;
  :mod:`~cxr.doors.dicom.outbox`: one sender per destination (C-STORE to the PACS, STOW-RS, FHIR POST) with
  retries and a dead letter per destination;
* :mod:`~cxr.doors.dicom.results`: the results of an answer: SR, Grad-CAM Secondary Capture, FHIR Bundle, CSV
  row;
* :mod:`~cxr.doors.dicom.config`: what ``cxr listen`` does (:class:`~cxr.doors.dicom.config.ListenConfig`);
  :mod:`~cxr.doors.dicom.spool`: the durable state folder; :mod:`~cxr.doors.dicom.telemetry`: counters,
  Prometheus metrics and the audit trail;
* :mod:`~cxr.doors.dicom.intake`: which instances are screened, which studies are urgent;
  :mod:`~cxr.doors.dicom.sr`: the result objects with highdicom (a Comprehensive SR, TID 1500, per instance or
  study; the Grad-CAM overlay as a Secondary Capture); :mod:`~cxr.doors.dicom.study`: one answer per study.

Durable by design; the spool folder holds every state, so a restart finishes whatever was in flight and never
drops or duplicates a result:

* ``incoming/<SOP Instance UID>.dcm``: written to a temporary file, fsynced and renamed (and the folder fsynced)
  *before* C-STORE answers success;
* ``screened/<SOP Instance UID>.json``: the answer, recorded durably as soon as the model gave it, with its key
  (SOP Instance UID, model sha256, operating point) and its time; a restart finishes the instance from it and never
  screens it again. Each later step happens once per key however often a crash interrupts it: the CSV row (the
  rows already in the file are read at start), the ``screened`` and ``result_delivered`` audit records (their keys
  are read back from the trail at start), the results (named by their UIDs, which derive from the key, and dated
  with the answer's time, so a result made again is the same bytes);
* ``done/<SOP Instance UID>``: a marker once the instance's result is in the outbox and the CSV; a second copy of
  the same instance is acknowledged and skipped (deduplication by SOP Instance UID);
* ``delivered/<destination>/<result>``: a marker once the destination confirmed a result (written before the
  result leaves the outbox); a result already delivered is never queued or sent again. Only a crash between the
  destination's confirmation and this marker sends a result twice, and then it is the same SOP Instance with the
  same bytes: the PACS keeps one;
* ``outbox/<UID>.dcm`` (C-STORE, ``--send-to``), ``outbox-stow/<UID>.dcm`` (STOW-RS, ``--stow-url``) and
  ``outbox-fhir/<UID>.json`` (a FHIR transaction Bundle, ``--fhir-url``): results waiting for their destination;
  each has a sender that retries with exponential backoff and removes a file only after the destination confirmed
  it. Result UIDs are derived from the source UID and the model's sha256, so a resend after a crash replaces
  rather than duplicates.
* ``incoming/<UID>.urgent``: an urgent study's marker (Requested Procedure Priority STAT or HIGH, or a site rule
  such as the emergency department's Station Name): urgent instances are screened first, at Triton's urgent level.
* ``studies/<Study UID>/``: with ``--study-quiet-s``, screened instances waiting for the rest of their study;
* ``answered/<Study UID>/``: with ``--study-quiet-s``, what each study was answered with (a later film amends it);
* markers in ``done/`` and ``delivered/`` and folders in ``answered/`` are removed after ``--retention-days``; every
  file is readable by its owner only (0600, folders 0700);
* ``dead-letter/`` (instances that cannot be answered) and ``dead-letter-<destination>/`` (results refused for
  good), each file beside its ``.why``.

Screening runs asynchronously (one worker, in batches). A transient inference failure leaves the instance in
``incoming`` for a retry; an unreadable instance gets an error row and no SR.
"""
