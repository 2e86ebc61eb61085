"""Build hook: the wheel carries the shipped model repository as ``cxr/model_repository``.

The checkout keeps it at the top (``model_repository/``, the design card's place); ``cxr.core.paths`` finds it
there in a checkout and inside the package once installed from a wheel. Every model folder of the checkout's
``model_repository/`` travels (it holds the shipped models only: experiments go to ``runs/``), never Python caches;
the folder itself is the one list of what ships (``MANIFEST.in`` grafts it whole for the sdist).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = tuple(sorted(p.parent.name for p in (ROOT / "model_repository").glob("*/config.pbtxt")))


class BuildWithModel(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's model_repository/ in place
            return
        dest = Path(self.build_lib) / "cxr" / "model_repository"
        if "pneumonia" not in SHIPPED:
            raise SystemExit("setup.py: model_repository/pneumonia is missing (a wheel without a model cannot run)")
        for name in SHIPPED:
            src = ROOT / "model_repository" / name
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithModel})
