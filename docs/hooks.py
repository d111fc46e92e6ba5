"""mkdocs hooks: the pages that are generated from the code, so that they cannot drift.

- ``reference/yaml.md``: every key of a pipeline YAML, with its type, default and
  meaning, read from the typed configs in ``cmsmlkit/config.py``.
- ``reference/cli.md``: the ``--help`` of every ``cmsml`` command, from ``cmsmlkit.cli``.
- ``notebooks/*.ipynb``: every notebook of the repository, rendered by mkdocs-jupyter
  (not executed) and added to the navigation under "Notebooks"; ``notebooks.md`` lists them.
- ``benchmarks.md``: ``benchmarks/README.md`` (or, before it exists, the list of scripts).

The notebooks live outside ``docs/``; they are added as files of the site here, with
their real path, so a notebook added later shows up without touching the docs.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a fresh clone without `pip install -e .` builds too
    sys.path.insert(0, str(ROOT))

NOTEBOOK_MARK = "<!-- notebooks -->"
FUNCTIONS_MARK = "<!-- expression-functions -->"
DEPLOY_PLACEHOLDER = """# Deploying to CMSSW

Every model bundle holds `model.onnx` (dynamic batch axis, output `probabilities`),
checked equal to the PyTorch model when the bundle is written. CMSSW evaluates it with
`PhysicsTools/ONNXRuntime`; this page is being written.
"""


# --------------------------------------------------------------------------- notebooks


#: Notebooks in the order of the chain; any other notebook follows, by name.
NOTEBOOK_ORDER = ("quickstart", "skim", "convert", "train", "tune", "predict")


def notebooks() -> list[Path]:
    """The notebooks of the repository: those of the chain in its order, then the rest."""
    found = (ROOT / "notebooks").glob("*.ipynb")
    rank = {name: i for i, name in enumerate(NOTEBOOK_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def notebook_title(path: Path) -> str:
    """The first ``# heading`` of the notebook's markdown cells, else its name."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        cells = []
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else source
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return path.stem.replace("_", " ").capitalize()


def notebook_summary(path: Path) -> str:
    """The first plain paragraph line after the title, for the notebook list."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        return ""
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        text = "".join(source) if isinstance(source, list) else source
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "```", "|", "<", "-", "*", ">")):
                # links inside a notebook are relative to it: keep their text only
                return re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", line)
    return ""


# --------------------------------------------------------------------------- YAML reference


def _is_model(tp: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "top"


def _type_text(tp: Any, anchors: dict[type, str]) -> str:
    """A reader's name for a type annotation: ``list of string``, ``integer or null``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a)}`" if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a, anchors) for a in args)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        return "list" + (f" of {_type_text(args[0], anchors)}" if args else "")
    if origin is dict or tp is dict:
        if len(args) == 2:
            return f"mapping {_type_text(args[0], anchors)} → {_type_text(args[1], anchors)}"
        return "mapping"
    if _is_model(tp):
        return f"[{tp.__name__}](#{anchors[tp]})" if tp in anchors else tp.__name__
    names = {str: "string", int: "integer", float: "number", bool: "true/false"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _models_in(tp: Any) -> list[tuple[str, type]]:
    """Models reachable in an annotation, with the YAML path suffix leading to them."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_model(tp):
        return [("", tp)]
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin is dict and len(args) == 2:
        return [(".<name>" + s, m) for s, m in _models_in(args[1])]
    if origin in (list, tuple, set, frozenset) and args:
        return [("[]" + s, m) for s, m in _models_in(args[0])]
    return []


def _constraints(field: Any) -> str:
    words = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{symbol} {value}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"at least {item.min_length} item(s)")
        if getattr(item, "max_length", None) is not None:
            words.append(f"at most {item.max_length} item(s)")
    return ", ".join(words)


def _default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if _is_model(type(value)):
        return "(its defaults)"
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", by_alias=True)
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type) -> str:
    doc = (model.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


def yaml_reference() -> str:
    """The markdown of the YAML reference, walked from :class:`PipelineConfig`."""
    from importlib import resources

    from cmsmlkit.config import PipelineConfig

    # breadth first: each model once, at the first (shortest) YAML path that reaches it
    order: list[tuple[str, type]] = []
    anchors: dict[type, str] = {}
    queue: list[tuple[str, type]] = [("", PipelineConfig)]
    while queue:
        path, model = queue.pop(0)
        if model in anchors:
            continue
        anchors[model] = _anchor(path or "pipeline")
        order.append((path, model))
        for name, field in model.model_fields.items():
            key = field.alias or name
            for suffix, sub in _models_in(field.annotation):
                queue.append((f"{path}.{key}{suffix}".lstrip("."), sub))

    lines = [
        "# YAML reference",
        "",
        "Every key a pipeline YAML may hold, with its type, its default and what it does.",
        "This page is generated from the typed configurations in `cmsmlkit/config.py` each",
        "time the documentation is built, so it always matches the installed code.",
        "",
        "- A section that is absent is not run; a key that is absent takes its default.",
        "- A misspelt key is an error naming the file, the key's full path and the closest",
        "  valid key. Relative paths are taken from the YAML file's directory.",
        "- `<name>` stands for a name you choose (a dataset, a collection).",
        "- The same keys are the keyword arguments of the Python classes: `train:` holds",
        "  the arguments of `cmsmlkit.Trainer`, `skim:` those of `cmsmlkit.Skimmer`, and so on.",
        "",
    ]
    for path, model in order:
        title = f"`{path}:`" if path else "The pipeline file"
        lines += [f"## {title} {{#{anchors[model]}}}", ""]
        lines += [f"{_doc(model)} (`{model.__name__}`)", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            kind = _type_text(field.annotation, anchors)
            limits = _constraints(field)
            if limits:
                kind += f" ({limits})"
            meaning = field.description or ""
            subs = _models_in(field.annotation)
            if not meaning and subs:
                meaning = _doc(subs[0][1])
            lines.append(
                f"| `{key}` | {_cell(kind)} | {_cell(_default_text(field))} | {_cell(meaning)} |"
            )
        lines.append("")

    demo = (resources.files("cmsmlkit") / "resources" / "demo.yaml").read_text()
    lines += [
        "## A complete example {#example}",
        "",
        "The pipeline that `cmsml demo` runs (written to `<out>/pipeline.yaml`):",
        "",
        "```yaml",
        demo.rstrip(),
        "```",
        "",
        "`cmsml init pipeline.yaml --dataset NAME=LABEL:FILES ...` writes a commented",
        "starting point for your own datasets.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI reference


def cli_reference() -> str:
    """The markdown of the command-line reference: every command's ``--help``."""
    from cmsmlkit.cli import build_parser

    parser = build_parser()
    parser.prog = "cmsml"
    lines = [
        "# Command line",
        "",
        "The `cmsml` command runs the same stages as the Python API from a pipeline YAML.",
        "This page is generated from `cmsmlkit/cli.py` when the documentation is built.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        lines += [f"## cmsml {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmarks


def benchmarks_page() -> str:
    """``benchmarks/README.md`` with links to files outside the site made plain text."""
    readme = ROOT / "benchmarks" / "README.md"
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")

        def plain(match: re.Match[str]) -> str:
            label, target = match.group(1), match.group(2)
            if re.match(r"^(https?:|mailto:|#)", target):
                return match.group(0)
            return f"{label} (`benchmarks/{target}`)" if label != f"`{target}`" else label

        return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", plain, text)
    lines = [
        "# Benchmarks",
        "",
        "Each script measures one stage against the bare baseline in the same run and prints",
        "the ratio. Run from the repository root:",
        "",
    ]
    for script in scripts:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        lines.append(f"- `python benchmarks/{script.name}`: {first}")
    if not scripts:
        lines.append("- (no benchmark scripts yet)")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- mkdocs events


def on_config(config: Any) -> Any:
    """Put one navigation entry per notebook under "Notebooks"."""
    entries: list[Any] = [{"Overview": "notebooks.md"}]
    entries += [{notebook_title(p): f"notebooks/{p.name}"} for p in notebooks()]
    nav = config.nav or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and "Notebooks" in item:
            nav[i] = {"Notebooks": entries}
    config.watch = list(config.watch or []) + [str(ROOT / "notebooks"), str(ROOT / "cmsmlkit")]
    return config


@event_priority(100)  # before mkdocs-jupyter wraps the notebook files
def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages and the repository's notebooks to the site."""
    generated = {
        "reference/yaml.md": yaml_reference(),
        "reference/cli.md": cli_reference(),
        "benchmarks.md": benchmarks_page(),
    }
    for uri, content in generated.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=content))
    if files.get_file_from_path("deploy-cmssw.md") is None:
        files.append(File.generated(config, "deploy-cmssw.md", content=DEPLOY_PLACEHOLDER))
    for path in notebooks():
        uri = f"notebooks/{path.name}"
        if files.get_file_from_path(uri) is None:
            # a real file whose source directory is the repository (not File.generated:
            # mkdocs-jupyter's wrapper loses a generated file's source path)
            files.append(
                File(
                    uri,
                    src_dir=str(ROOT),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files


def expression_functions() -> str:
    """The table of the functions a selection expression may call, from ``data/expr.py``."""
    from cmsmlkit.data.expr import FUNCTIONS

    lines = ["| function | arguments | use |", "|---|---|---|"]
    for name, spec in FUNCTIONS.items():
        count = (
            str(spec.min_args)
            if spec.min_args == spec.max_args
            else f"{spec.min_args} to {spec.max_args}"
        )
        lines.append(f"| `{name}` | {count} | {_cell(spec.usage)} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill the generated parts: ``<!-- notebooks -->``, ``<!-- expression-functions -->``."""
    if FUNCTIONS_MARK in markdown:
        markdown = markdown.replace(FUNCTIONS_MARK, expression_functions())
    if NOTEBOOK_MARK not in markdown:
        return markdown
    base = Path(page.file.src_uri).parent
    items = []
    for path in notebooks():
        target = Path("notebooks", path.name)
        rel = Path(*([".."] * len(base.parts)), target) if base.parts else target
        summary = notebook_summary(path)
        items.append(
            f"- [{notebook_title(path)}]({rel.as_posix()}) (`notebooks/{path.name}`)"
            + (f": {summary}" if summary else "")
        )
    return markdown.replace(NOTEBOOK_MARK, "\n".join(items) or "(no notebooks yet)")
