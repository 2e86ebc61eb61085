"""Build hook: the wheel carries the shipped model repository as ``cxr/model_repository``.

The checkout keeps it at the top (``model_repository/``, the design card's place); ``cxr.core.paths`` finds it
there in a checkout and inside the package once installed from a wheel. Only the models named in
``SHIPPED`` travel (not a developer's local experiments), and never Python caches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("pneumonia", "pneumonia_int8")


class BuildWithModel(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's model_repository/ in place
            return
        dest = Path(self.build_lib) / "cxr" / "model_repository"
        for name in SHIPPED:
            src = ROOT / "model_repository" / name
            if not (src / "config.pbtxt").is_file():
                raise SystemExit(f"setup.py: the shipped model {src} is missing (a wheel without a model cannot run)")
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithModel})
