"""Default locations and names shared by the library, the CLI and the UI (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

#: The repository checkout (the package is installed in editable mode from it).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The shipped Triton model repository.
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
#: The shipped model's name.
DEFAULT_MODEL = "pneumonia"
#: Decoded-image cache of the training and evaluation tools.
DEFAULT_CACHE = REPO_ROOT / ".cache"
