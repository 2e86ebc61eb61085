"""The site tools: what a hospital runs on its own labelled films or its own answers.

* :mod:`cxr.site.site_audit`: ``cxr site-audit``, the go/no-go of the served model on the site's sample, on
  bounds against the model card's targets;
* :mod:`cxr.site.adapt`: ``cxr adapt``, the served model adapted to the site offline (head fine-tune, OOD
  reference, recalibration), then audited as above; only a passing model is published. It builds on the adapt kit
  that ``cxr export`` writes (:mod:`cxr.export.adapt_kit` and :mod:`cxr.export.adapt_features` stay in ``export/``:
  the export writes the kit, and ``export/`` never imports the site tools);
* :mod:`cxr.site.monitor`: ``cxr monitor``, drift of a batch of answers against the model's reference.

Layers (``pyproject.toml`` holds the contract): ``adapt`` > ``site_audit`` | ``monitor``; the whole folder sits
above ``loadtest/`` and ``export/``, beside the screening page, below ``cli``. The monitor runs where TensorFlow is
not installed (a forbidden contract keeps it out); pynetdicom never enters the site tools.
"""
