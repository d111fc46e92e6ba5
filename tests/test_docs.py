"""The documentation site (mkdocs.yml, docs/): it builds with --strict, holds the pages a
newcomer needs, its generated pages follow the code, and its Python examples run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

import cmsmlkit.errors
from cmsmlkit.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

#: The guides whose Python examples run one after the other in one empty directory
#: (each page in a fresh interpreter: a page may use the files of the pages before it).
RUNNABLE_PAGES = [
    "guides/source.md",
    "guides/skim.md",
    "guides/convert.md",
    "guides/train.md",
    "guides/tune.md",
    "guides/predict.md",
    "running/mlflow.md",
]


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of a docs page, in order."""
    text = (DOCS / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def load_hooks():
    spec = importlib.util.spec_from_file_location("cmsml_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (ROOT / ".cache").exists()  # mkdocs-jupyter's cache stays off
    return out


PAGES = [
    "index.html",
    "getting-started/index.html",
    "concepts/index.html",
    "guides/source/index.html",
    "guides/skim/index.html",
    "guides/convert/index.html",
    "guides/train/index.html",
    "guides/tune/index.html",
    "guides/predict/index.html",
    "guides/pipeline/index.html",
    "running/lxplus-htcondor/index.html",
    "running/swan/index.html",
    "running/slurm/index.html",
    "running/mlflow/index.html",
    "deploy-cmssw/index.html",
    "reference/yaml/index.html",
    "reference/cli/index.html",
    "reference/doctor/index.html",
    "troubleshooting/index.html",
    "benchmarks/index.html",
    "notebooks/index.html",
]


@pytest.mark.slow
def test_site_builds_strict_with_every_page(site):
    missing = [p for p in PAGES if not (site / p).is_file()]
    assert not missing
    home = (site / "index.html").read_text()
    for page in ("Getting started", "Concepts", "Troubleshooting", "Deploying to CMSSW"):
        assert page in home  # in the navigation


@pytest.mark.slow
def test_every_notebook_is_rendered_and_listed(site):
    assert NOTEBOOKS
    listing = (site / "notebooks" / "index.html").read_text()
    for nb in NOTEBOOKS:
        page = site / "notebooks" / nb.stem / "index.html"
        assert page.is_file(), nb.name
        assert f"notebooks/{nb.name}" in listing
        html = page.read_text()
        # the code of the first code cell is on the page (rendered, not executed)
        import json

        cells = json.loads(nb.read_text())["cells"]
        code = next("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        first_name = re.findall(r"[A-Za-z_]{4,}", code)[0]
        assert first_name in html


@pytest.mark.slow
def test_generated_pages_follow_the_code(site):
    yaml_page = (site / "reference" / "yaml" / "index.html").read_text()
    assert "<code>max_epochs</code>" in yaml_page and "<code>chunksize</code>" in yaml_page
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("demo", "run", "train", "doctor", "init"):
        assert f"cmsml {command}" in cli_page


def _sections(markdown: str) -> dict[str, str]:
    """YAML reference markdown: anchor -> the section's text."""
    parts = re.split(r"^## .*\{#([a-z0-9-]+)\}$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_yaml_reference_has_every_key_type_and_default():
    hooks = load_hooks()
    sections = _sections(hooks.yaml_reference())
    checked = 0

    def walk(model, anchor):
        nonlocal checked
        body = sections[anchor]
        for name, field in model.model_fields.items():
            key = field.alias or name
            row = re.search(rf"^\| `{re.escape(key)}` \| (.*?) \| (.*?) \| (.*?) \|$", body, re.M)
            assert row, f"{anchor}: no row for {key}"
            kind, default, meaning = row.groups()
            assert kind and default, f"{anchor}.{key}"
            if field.description:
                assert " ".join(field.description.split()).replace("|", "\\|") in meaning
            checked += 1

    walk(PipelineConfig, "pipeline")
    for name, field in PipelineConfig.model_fields.items():
        model = [a for a in typing.get_args(field.annotation) if isinstance(a, type)]
        model = model[0] if model else field.annotation
        walk(model, name)
    assert checked > 80
    train = sections["train"]
    assert "| `max_epochs` | integer (≥ 1) | `20` |" in train
    assert "| `inputs` | list of string | `[]` |" in train
    model_anchor = re.search(r"\[ModelConfig\]\(#([a-z-]+)\)", train).group(1)
    assert "| `dropout` | number (≥ 0, < 1) | `0.1` |" in sections[model_anchor]
    assert "| `datasets` | mapping string → [DatasetConfig]" in sections["source"]
    assert "| `label` | string | **required** |" in sections["source-datasets-name"]


def test_troubleshooting_covers_every_error_class():
    text = (DOCS / "troubleshooting.md").read_text()
    classes = [n for n in cmsmlkit.errors.__all__ if n[0].isupper()]
    assert len(classes) >= 8
    for name in classes:
        assert re.search(rf"^## `{name}`", text, re.M), name


def test_no_reference_to_files_users_do_not_have():
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page


def test_python_examples_parse():
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    blocks = [(p, b) for p in pages for b in python_blocks(p)]
    assert len(blocks) > 15
    for page, block in blocks:
        compile(block, page, "exec")


@pytest.mark.slow
def test_python_examples_run(tmp_path):
    """The guides' examples, page after page, in one empty directory, as a reader runs them."""
    for page in RUNNABLE_PAGES:
        blocks = python_blocks(page)
        assert blocks, page
        script = tmp_path / f"page_{Path(page).stem}.py"  # not mlflow.py: that shadows mlflow
        script.write_text("\n\n".join(blocks))
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        assert proc.returncode == 0, f"{page}:\n{proc.stderr[-3000:]}"
        print(f"{page}: {time.monotonic() - start:.1f} s")
    assert (tmp_path / "demo" / "model" / "bundle.json").is_file()
    assert sorted(p.name for p in (tmp_path / "demo" / "predictions").glob("*.h5")) == ["new.h5"]
