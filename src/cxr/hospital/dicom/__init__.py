"""Hospital integration: DICOM over the network in (a Storage SCP), DICOM SR results back into the PACS.

* :mod:`cxr.hospital.dicom.sr` builds the result objects with highdicom: a Comprehensive
  SR (TID 1500 measurement report) per input, and optionally a Secondary
  Capture of the Grad-CAM overlay.
* :mod:`cxr.hospital.dicom.listener` is ``cxr listen``: pynetdicom C-ECHO and C-STORE,
  a durable spool, asynchronous screening, and a durable outbox that sends the
  results to the PACS with retries.
"""
