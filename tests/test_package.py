"""The package installs like one: one tree with no links, and a wheel that runs outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from cxr.core import paths
from tests.conftest import REPO


def test_the_tree_holds_no_symbolic_link() -> None:
    """git records a link as mode 120000: none may be committed (a checkout without link support would break)."""
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000 ")]
    assert listing.strip(), "git ls-files listed nothing: not a checkout"
    assert links == []


def test_the_package_is_the_src_tree() -> None:
    import cxr

    assert Path(cxr.__file__).resolve().parent == REPO / "src" / "cxr"
    assert paths.CHECKOUT == REPO and paths.DEFAULT_REPOSITORY == REPO / "model_repository"


def test_the_model_repository_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$CXR_MODEL_REPOSITORY first, then the checkout's model_repository/, then the installed package's."""
    monkeypatch.setenv(paths.REPOSITORY_ENV, str(tmp_path))
    assert paths.shipped_repository() == tmp_path
    monkeypatch.delenv(paths.REPOSITORY_ENV)
    assert paths.shipped_repository() == REPO / "model_repository"
    monkeypatch.setattr(paths, "CHECKOUT", None)
    assert paths.shipped_repository() == paths.PACKAGE_ROOT / "model_repository"
    # an installed package (site-packages/cxr) is no checkout; src/cxr beside a pyproject.toml is
    (tmp_path / "site-packages" / "cxr").mkdir(parents=True)
    assert paths._checkout(tmp_path / "site-packages" / "cxr") is None
    (tmp_path / "src" / "cxr").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    assert paths._checkout(tmp_path / "src" / "cxr") == tmp_path


def test_the_version_is_written_once_and_printed() -> None:
    """pyproject.toml reads the version from cxr.__version__ (written nowhere else); `cxr --version` prints it."""
    import re

    import cxr

    text = (REPO / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M) and re.search(r'^dynamic = \["version"\]', project, re.M)
    assert 'version = {attr = "cxr.__version__"}' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", cxr.__version__)
    r = subprocess.run([sys.executable, "-m", "cxr.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"cxr {cxr.__version__}", r.stdout + r.stderr


def test_one_file_hash() -> None:
    """sha256 of a file's bytes is computed in one place, cxr.core.integrity.sha256_file."""
    import re

    pattern = re.compile(r"sha256\([^)]*read_bytes\(\)|iter\(lambda: \w+\.read\(")
    found = sorted(str(f.relative_to(REPO)) for f in [*(REPO / "src").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]
                   if pattern.search(f.read_text()))
    assert found == ["src/cxr/core/integrity.py"], found


def test_the_file_hash(tmp_path: Path) -> None:
    import hashlib

    from cxr.core.integrity import sha256_file

    (tmp_path / "f").write_bytes(b"x" * (3 << 20))
    assert sha256_file(tmp_path / "f") == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    with pytest.raises(OSError):
        sha256_file(tmp_path / "missing")


#: What a client-only install (`pip install 'cxr-triton[client]'`) must not pull.
NOT_IN_THE_CLIENT = ("scipy", "matplotlib", "tensorflow", "keras", "tf2onnx", "fhir", "dicomweb_client",
                     "prometheus_client", "pynetdicom", "highdicom", "gradio", "pytest", "mypy", "playwright")


def _extras() -> dict[str, list[str]]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the 3.10 floor
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _closure(extras: dict[str, list[str]], name: str) -> list[str]:
    """The requirements of an extra, with the extras it names (cxr-triton[a,b]) expanded."""
    out = []
    for req in extras[name]:
        if req.startswith("cxr-triton["):
            for inner in req[len("cxr-triton["):].rstrip("]").split(","):
                out += _closure(extras, inner)
        else:
            out.append(req)
    return out


def test_the_extras() -> None:
    """client is slim; hospital holds the doors; all holds no development tool; dev is apart."""
    import re

    extras = _extras()

    def names(extra: str) -> set[str]:
        return {re.split(r"[\[<>=;! ]", r, maxsplit=1)[0].lower().replace("-", "_").replace(".", "_")
                for r in _closure(extras, extra)}
    client = names("client")
    assert {"tritonclient", "onnxruntime", "pydicom", "pylibjpeg"} <= client
    assert not client & {n.replace(".", "_") for n in NOT_IN_THE_CLIENT} and "fhir_resources" not in client
    assert {"pynetdicom", "highdicom", "dicomweb_client", "fhir_resources", "prometheus_client", "scipy"} <= names("hospital")
    assert not names("all") & {"pytest", "pytest_timeout", "ruff", "mypy", "playwright", "mutmut", "import_linter"}
    assert names("dev") >= {"pytest", "ruff", "mypy"}
    assert "'.[all,dev]'" in (REPO / "scripts" / "test.sh").read_text()  # the test command still installs everything


def test_a_client_only_install_screens_the_examples(tmp_path: Path) -> None:
    """With every package outside the client extra made unimportable, `cxr predict` answers the ten examples
    in-process (and `cxr health` reads the model): the client layer imports none of them, not even lazily."""
    blocked = [n.split(".")[0] for n in NOT_IN_THE_CLIENT]
    code = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from cxr.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n"
        "sys.exit(rc)\n")
    out = tmp_path / "answers.json"
    r = subprocess.run([sys.executable, "-c", code, "predict", str(REPO / "examples"), "--protocol", "embedded",
                        "--format", "json", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 10 and all(row["status"] in ("ok", "not_assessable") for row in rows)
    r = subprocess.run([sys.executable, "-c", code, "health", "--protocol", "embedded"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["ready"] is True, r.stderr[-3000:]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_the_wheel_answers_the_examples_outside_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it with [client,serve] into a fresh venv (no access to the checkout's code), and
    screen the example films from another directory with the shipped model it carries."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=600, capture_output=True)
    (wheel,) = wheels.glob("cxr_triton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any("/model_repository/pneumonia/" in n for n in names)
    assert not [n for n in names if "validation" in n or "without_siim" in n]  # evidence, not the product
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", paths.REPOSITORY_ENV, "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[client,serve]"], env=clean,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # the client and serving extras pull no training stack, no statistics or plotting, no FHIR or DICOMweb library
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], env=clean, capture_output=True,
                            text=True, timeout=300, check=True).stdout
    installed_names = {d["name"].lower().replace("_", "-") for d in json.loads(listed)}
    assert not installed_names & {"scipy", "matplotlib", "tensorflow", "tensorflow-cpu", "keras", "tf2onnx",
                                  "fhir.resources", "fhir-resources", "dicomweb-client", "prometheus-client",
                                  "pynetdicom", "highdicom", "gradio", "pytest", "mypy", "playwright"}, installed_names
    work = tmp_path / "elsewhere"
    work.mkdir()
    shipped = next((env_dir / "lib").glob("python3*/site-packages/cxr/model_repository"))
    installed = _snapshot(shipped)
    films = sorted((REPO / "examples").glob("*/*.jpeg")) + sorted((REPO / "examples").glob("*/*.png"))
    r = subprocess.run([str(env_dir / "bin" / "cxr"), "predict", *map(str, films), "--protocol", "embedded",
                        "--format", "json"], cwd=work, env=clean, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {Path(row["path"]).name: row for row in json.loads(r.stdout)}
    # the wheel's interpreter loaded its own copy of cxr and of the model, not the checkout's
    where = subprocess.run([str(py), "-c", "import cxr, cxr.core.paths as p; print(cxr.__file__); "
                            "print(p.CHECKOUT); print(p.DEFAULT_REPOSITORY)"], cwd=work, env=clean,
                           capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    assert str(env_dir) in where[0] and where[1] == "None" and where[2].startswith(str(env_dir))
    card = json.loads((REPO / "model_repository" / "pneumonia" / "model_card.json").read_text())
    assert {row["model_sha256"] for row in rows.values()} == {card["sha256"]}
    assert rows["camera.png"]["status"] == "not_assessable"
    answered = [row for name, row in rows.items() if name != "camera.png"]
    assert len(answered) == len(films) - 1 and all(row["status"] == "ok" for row in answered)
    # the same answers as the checkout's own client on the same files
    from cxr.client.client import PneumoniaClient

    with PneumoniaClient(protocol="embedded") as client:
        for film in films:
            (pred,) = client.predict([film])
            row = rows[film.name]
            assert row["status"] == pred.status.value
            if pred.probability is not None:
                assert row["probability"] == pytest.approx(pred.probability, abs=1e-6)
    # and the wheel serves its model on the embedded Triton (the Python backend imports the installed cxr)
    from cxr.serving.server import free_ports
    from tests.conftest import READY_DEADLINE_S, wait_for_line

    h, g, m = free_ports(3)
    server = subprocess.Popen([str(env_dir / "bin" / "cxr"), "serve", "--http-port", str(h), "--grpc-port", str(g),
                               "--metrics-port", str(m), "--models", "pneumonia"], cwd=work, env=clean,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_line(server, "Triton ready", deadline_s=READY_DEADLINE_S), "the wheel's cxr serve never got ready"
        r = subprocess.run([str(env_dir / "bin" / "cxr"), "predict", *map(str, films), "--url", f"127.0.0.1:{g}",
                            "--format", "json"], cwd=work, env=clean, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        served = {Path(row["path"]).name: row for row in json.loads(r.stdout)}
        assert {n: row["status"] for n, row in served.items()} == {n: row["status"] for n, row in rows.items()}
        for name, row in served.items():
            if row["probability"] is not None:
                assert row["probability"] == pytest.approx(rows[name]["probability"], abs=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    # screening and serving wrote nothing into the installed model folders
    assert _snapshot(Path(where[2])) == installed
