"""Default locations and names shared by the library, the CLI and the UI (no heavy imports).

**Where the shipped model is found** (one rule, used by every command's ``--model-repository`` default):

1. ``$CXR_MODEL_REPOSITORY``, when set;
2. in a checkout (an editable install), its ``model_repository/``;
3. installed from a wheel, the copy the wheel carries (``site-packages/cxr/model_repository``).

When none holds the model, the error says so in one line and names ``--model-repository``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The installed ``cxr`` package (``src/cxr`` in a checkout).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: The environment variable that names the model repository, before any default.
REPOSITORY_ENV = "CXR_MODEL_REPOSITORY"


def _checkout(package_root: Path) -> Path | None:
    """The checkout that holds ``package_root`` as ``src/cxr``, or None when the package was installed."""
    root = package_root.parent.parent
    return root if package_root.parent.name == "src" and (root / "pyproject.toml").is_file() else None


#: The repository checkout, or None when cxr runs from an installed wheel.
CHECKOUT = _checkout(PACKAGE_ROOT)
#: Where reports, caches and developer defaults are anchored: the checkout, or the working directory of an
#: installed wheel.
REPO_ROOT = CHECKOUT if CHECKOUT is not None else Path.cwd()


def shipped_repository() -> Path:
    """The shipped Triton model repository, by the rule of this module's docstring."""
    if os.environ.get(REPOSITORY_ENV):
        return Path(os.environ[REPOSITORY_ENV])
    if CHECKOUT is not None:
        return CHECKOUT / "model_repository"
    return PACKAGE_ROOT / "model_repository"


#: The shipped Triton model repository.
DEFAULT_REPOSITORY = shipped_repository()
#: The shipped model's name.
DEFAULT_MODEL = "pneumonia"
#: Decoded-image cache of the training and evaluation tools (the checkout's .cache/, else the user's cache).
DEFAULT_CACHE = (CHECKOUT / ".cache" if CHECKOUT is not None
                 else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr")

#: The one line that says where the shipped model is looked for (appended to "no model folder" errors).
WHERE_MODELS_ARE = (f"models are looked for in ${REPOSITORY_ENV}, then the checkout's model_repository/, then the "
                    "installed package's model_repository/; pass --model-repository DIR")


def relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it or beside it (``../shared/...``), so that
    committed reports never carry a machine's absolute paths; other paths are returned as given."""
    p = Path(path).resolve()
    rel = os.path.relpath(p, REPO_ROOT)
    return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else str(path)
