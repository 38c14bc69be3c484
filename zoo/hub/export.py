"""Self-contained export: a model folder that loads with ``trust_remote_code=True`` where zoo is not installed.

``python -m zoo.hub export MODEL_DIR OUT_DIR`` copies the weights (safetensors), tokenizer and card of a saved
zoo model (a run's ``output_dir``, or any folder written by ``save_pretrained``) and writes beside them the
modeling code the architecture reaches, flattened into the folder the way the Hub's remote code expects (one
directory, relative imports only; see transformers' ``dynamic_module_utils``):

- the import graph is walked with ``ast`` from the modules of the architecture's registered classes (config,
  backbone, causal LM, sequence classification), through every ``zoo`` import, module-level or inside a
  function; a model that nests another zoo architecture through ``AutoConfig`` (RMT's backbone) adds that
  architecture's classes too;
- each module is written as one file named after its dotted path (``zoo.ops.retention.chunk`` ->
  ``zoo_ops_retention_chunk.py``) and every ``zoo`` import is rewritten as a relative import of the flattened
  module. Names re-exported by a package's ``__init__`` are imported from the module that defines them, so that
  model packages' ``__init__`` (which registers the architecture with the Auto classes) is never part of an
  export. transformers' loader copies the files named by ``from .x import`` lines only; a module imported as an
  object (``from zoo.ops.retention import naive``) becomes ``from . import zoo_ops_retention_naive as naive``,
  listed once more at the end of the file in a block that never runs, so that the loader finds it;
- module-level ``triton`` imports are wrapped in ``try``: the Triton kernels ship with the export and are
  imported only where the op's dispatch chooses them (CUDA and triton present), and the loader's import check
  (which skips ``try`` blocks) does not require triton elsewhere;
- one entry module, ``modeling_<model_type>.py``, imports the classes named in ``config.json``'s ``auto_map``, so
  that config and model come from the same copy of the code; ``auto_map`` names the registered classes and any
  other Auto class the architecture registers itself with (the encoders' ``AutoModelForMaskedLM``, ...);
- ``requirements.txt`` pins torch and transformers to the ranges zoo supports (read from zoo's own requirements)
  and names triton as optional, for CUDA GPUs only.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zoo

ZOO_SOURCE = Path(zoo.__file__).resolve().parent
# Modules whose import registers architectures with transformers' Auto classes: never part of an export.
REGISTERING = {"zoo", "zoo.models", "zoo.models.registry"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)
EXTRA_FILES = ("generation_config.json", "recipe.yaml", "metrics.json", "model.safetensors.index.json")
AUTO_CLASSES = {
    "AutoConfig": "config",
    "AutoModel": "model",
    "AutoModelForCausalLM": "causal_lm",
    "AutoModelForSequenceClassification": "sequence_classification",
}
# Auto classes an architecture may register itself with beyond the registry's (encoders: masked LM and task heads)
EXTRA_AUTO_CLASSES = (
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForTokenClassification",
)
OPTIONAL_PACKAGES = ("triton",)
# What the exported code imports at load time; the optional packages are listed as such in requirements.txt.
REQUIRED_PACKAGES = ("torch", "transformers")


class ExportError(ValueError):
    """A model or a module that cannot be exported as self-contained code; the message says which and why."""


def flat_name(module: str) -> str:
    """The file stem of ``module`` in an export: ``zoo.ops.retention.chunk`` -> ``zoo_ops_retention_chunk``."""
    return module.replace(".", "_")


def module_path(module: str) -> Path | None:
    """The source file of the zoo module ``module`` (a package's ``__init__.py``), or None if there is none."""
    if module != "zoo" and not module.startswith("zoo."):
        return None
    base = ZOO_SOURCE.parent.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_zoo(module: str | None) -> bool:
    return module is not None and (module == "zoo" or module.startswith("zoo."))


@dataclass
class _Source:
    name: str
    path: Path
    text: str
    tree: ast.Module = field(repr=False)

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


_SOURCES: dict[str, _Source] = {}


def _source(module: str) -> _Source:
    path = module_path(module)
    if path is None:
        raise ExportError(f"zoo module {module!r} has no source file under {ZOO_SOURCE}")
    cached = _SOURCES.get(module)
    if cached is None or cached.path != path or cached.text != path.read_text():
        text = path.read_text()
        cached = _SOURCES[module] = _Source(module, path, text, ast.parse(text, filename=str(path)))
    return cached


def _absolute(source: _Source, node: ast.ImportFrom) -> str | None:
    """The absolute module an ``ImportFrom`` in ``source`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = source.name if source.is_package else source.name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise ExportError(f"{source.path}:{node.lineno}: relative import beyond the zoo package")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _defining_import(source: _Source, name: str) -> tuple[str, str] | None:
    """If ``source`` binds ``name`` at module level by importing it from another zoo module (a re-export),
    the (module, name) it comes from; None where ``source`` defines ``name`` itself."""
    for node in source.tree.body:
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(source, node)
            if not _is_zoo(origin):
                continue
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return origin, alias.name
    return None


def resolve(module: str, name: str) -> tuple[str, str | None]:
    """Where ``from module import name`` really comes from: ``(submodule, None)`` for a module object,
    ``(defining_module, name)`` for anything else, following re-exports through packages' ``__init__``."""
    seen = set()
    while True:
        if (module, name) in seen:
            raise ExportError(f"import cycle resolving {name!r} from {module!r}")
        seen.add((module, name))
        if module_path(f"{module}.{name}") is not None:
            return f"{module}.{name}", None
        origin = _defining_import(_source(module), name)
        if origin is None:
            return module, name
        module, name = origin


@dataclass
class _Rewrite:
    """The statements that replace one zoo import, and the modules it needs."""

    statements: list[str]
    modules: set[str]
    module_objects: set[str]


def _rewrite_import(source: _Source, node: ast.Import | ast.ImportFrom) -> _Rewrite | None:
    """The relative-import statements replacing ``node``, or None when it imports nothing from zoo."""
    if isinstance(node, ast.Import):
        names = [a for a in node.names if _is_zoo(a.name)]
        if not names:
            return None
        if len(names) != len(node.names) or any(a.asname is None for a in names):
            raise ExportError(
                f"{source.path}:{node.lineno}: `import zoo...` without `as` (or mixed with other modules) cannot "
                "be flattened; write `from zoo.x import y` instead"
            )
        modules = {a.name for a in names}
        statements = [f"from . import {flat_name(a.name)} as {a.asname}" for a in names]
        return _Rewrite(statements, modules, set(modules))
    origin = _absolute(source, node)
    if not _is_zoo(origin):
        return None
    attributes: dict[str, list[str]] = {}
    objects: list[tuple[str, str]] = []
    for alias in node.names:
        if alias.name == "*":
            raise ExportError(f"{source.path}:{node.lineno}: `from {origin} import *` cannot be flattened")
        target, name = resolve(origin, alias.name)
        bound = alias.asname or alias.name
        if name is None:
            objects.append((target, bound))
        else:
            attributes.setdefault(target, []).append(name if name == bound else f"{name} as {bound}")
    statements = [f"from .{flat_name(m)} import {', '.join(names)}" for m, names in attributes.items()]
    statements += [f"from . import {flat_name(m)} as {bound}" for m, bound in objects]
    module_objects = {m for m, _ in objects}
    return _Rewrite(statements, set(attributes) | module_objects, module_objects)


def _top_package(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    return {node.module.split(".")[0]} if node.level == 0 and node.module else set()


def _replace_lines(
    lines: list[str], node: ast.stmt, new: list[str], path: Path
) -> tuple[int, int, list[str]]:
    """``new`` statements at the indentation of ``node``, as a replacement of its lines."""
    first = lines[node.lineno - 1]
    indent = first[: len(first) - len(first.lstrip())]
    last = lines[node.end_lineno - 1]
    rest = last[node.end_col_offset :].strip()
    if node.col_offset != len(indent) or (rest and not rest.startswith("#")):
        raise ExportError(f"{path}:{node.lineno}: put this import on lines of its own to export it")
    return node.lineno - 1, node.end_lineno, [indent + s for s in new]


def flatten(module: str) -> tuple[str, set[str]]:
    """The text of ``module`` as a flattened file, and the zoo modules it imports."""
    source = _source(module)
    lines = source.text.splitlines()
    edits, needed, objects = [], set(), set()
    for node in ast.walk(source.tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        rewrite = _rewrite_import(source, node)
        if rewrite is not None:
            edits.append(_replace_lines(lines, node, rewrite.statements, source.path))
            needed |= rewrite.modules
            objects |= rewrite.module_objects
        elif node in source.tree.body and _top_package(node) & set(OPTIONAL_PACKAGES):
            (statement,) = _replace_lines(
                lines, node, [ast.get_source_segment(source.text, node)], source.path
            )[2]
            guarded = [
                "try:",
                "    " + statement,
                "except ImportError:  # used only where it is installed",
                "    pass",
            ]
            edits.append((node.lineno - 1, node.end_lineno, guarded))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    header = [f"# `{module}` of zoo, flattened by `python -m zoo.hub export`: relative imports only."]
    footer = []
    if objects:
        footer = [
            "",
            "",
            "# transformers' remote-code loader copies the modules named in `from .x import` lines; the modules",
            "# imported above as objects are named here (this block never runs).",
            "if False:",
            *[f"    from .{flat_name(m)} import *  # noqa: F403" for m in sorted(objects)],
        ]
    return "\n".join(header + lines + footer) + "\n", needed


def import_graph(roots: list[str]) -> dict[str, str]:
    """Every zoo module reachable from ``roots`` (module names), flattened: ``{module: text}``."""
    texts: dict[str, str] = {}
    parents: dict[str, str] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in texts:
            continue
        if module in REGISTERING or _registers(module):
            chain = [module]
            while chain[-1] in parents:
                chain.append(parents[chain[-1]])
            raise ExportError(
                f"{module!r} registers architectures when imported and cannot be exported; it is reached by "
                f"{' <- '.join(chain)}: import the classes from their own modules instead"
            )
        texts[module], needed = flatten(module)
        for dependency in sorted(needed):
            parents.setdefault(dependency, module)
            todo.append(dependency)
    names = {}
    for module in texts:
        if flat_name(module) in names:
            raise ExportError(f"{module!r} and {names[flat_name(module)]!r} flatten to the same file name")
        names[flat_name(module)] = module
    return texts


def _registers(module: str) -> bool:
    """True for a module that calls ``register(...)`` at module level (a model package's ``__init__``)."""
    for node in _source(module).tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func
            if getattr(func, "id", getattr(func, "attr", None)) == "register":
                return True
    return False


def _nested_architectures(config) -> list:
    """The zoo configs nested in ``config`` through ``AutoConfig`` (RMT's backbone), recursively."""
    from transformers import AutoConfig

    found = []
    for key, kind in (getattr(config, "sub_configs", None) or {}).items():
        value = getattr(config, key, None)
        if kind is AutoConfig and getattr(value, "model_type", None) in zoo.REGISTRY:
            found += [value, *_nested_architectures(value)]
    return found


def auto_classes(model_type: str) -> dict[str, type]:
    """``{Auto class name: zoo class}`` for the zoo architecture ``model_type``: the registered classes, then those
    of :data:`EXTRA_AUTO_CLASSES` it registered itself with (the encoders' masked LM, ...)."""
    import transformers

    entry = zoo.REGISTRY[model_type]
    found = {
        auto: getattr(entry, attr) for auto, attr in AUTO_CLASSES.items() if getattr(entry, attr) is not None
    }
    for auto in EXTRA_AUTO_CLASSES:
        try:
            found[auto] = getattr(transformers, auto)._model_mapping[entry.config]
        except KeyError:
            continue
    return found


def entry_module(model_type: str, nested: list[str]) -> str:
    """The text of ``modeling_<model_type>.py``: the classes of ``auto_map``, and the nested architectures
    registered with the Auto classes (where they are not already)."""
    lines = [
        f'"""Entry point of this folder\'s remote code for `{model_type}` (the classes named in config.json\'s',
        '`auto_map`), exported from zoo by `python -m zoo.hub export`."""',
        "",
    ]
    by_module: dict[str, list[str]] = {}
    for cls in _unique(auto_classes(model_type).values()):
        by_module.setdefault(cls.__module__, []).append(cls.__name__)
    lines += [f"from .{flat_name(m)} import {', '.join(names)}" for m, names in by_module.items()]
    if nested:
        lines[3:3] = [
            "from transformers import AutoConfig, AutoModelForCausalLM",
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING",
            "",
        ]
        lines.append("")
        lines.append("# architectures nested in this one's config through AutoConfig, known here without zoo")
        for nested_type in nested:
            classes = auto_classes(nested_type)
            config, causal_lm = classes["AutoConfig"], classes["AutoModelForCausalLM"]
            lines += [
                f"from .{flat_name(config.__module__)} import {config.__name__} as _{nested_type}_config",
                f"from .{flat_name(causal_lm.__module__)} import {causal_lm.__name__} as _{nested_type}_causal_lm",
                "",
                f'if "{nested_type}" not in CONFIG_MAPPING:',
                f'    AutoConfig.register("{nested_type}", _{nested_type}_config)',
                f"    AutoModelForCausalLM.register(_{nested_type}_config, _{nested_type}_causal_lm)",
            ]
    return "\n".join(lines) + "\n"


def _unique(classes) -> list[type]:
    return list(dict.fromkeys(classes))


def export_code(config, out_dir: str | Path) -> dict[str, str]:
    """Write the flattened modeling code of ``config``'s architecture into ``out_dir``; return its ``auto_map``."""
    model_type = config.model_type
    if model_type not in zoo.REGISTRY:
        raise ExportError(
            f"model_type {model_type!r} is not a zoo architecture; registered: {sorted(zoo.REGISTRY)}"
        )
    nested = list(dict.fromkeys(c.model_type for c in _nested_architectures(config)))
    roots = [cls.__module__ for t in (model_type, *nested) for cls in auto_classes(t).values()]
    texts = import_graph(roots)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for module, text in texts.items():
        (out_dir / f"{flat_name(module)}.py").write_text(text)
    entry = f"modeling_{model_type}"
    (out_dir / f"{entry}.py").write_text(entry_module(model_type, nested))
    return {auto: f"{entry}.{cls.__name__}" for auto, cls in auto_classes(model_type).items()}


def _zoo_requirements() -> list[str]:
    """zoo's own ``install_requires``: from ``setup.cfg`` beside the source tree (a checkout), else from the
    installed distribution's metadata."""
    import configparser

    setup_cfg = ZOO_SOURCE.parent / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(setup_cfg)
        if parser.has_option("options", "install_requires"):
            lines = parser.get("options", "install_requires").splitlines()
            return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [r for r in importlib.metadata.requires("zoo") or [] if "extra ==" not in r]


def requirements_text() -> str:
    """``requirements.txt`` of an export: torch and transformers in the ranges zoo supports; triton (the Triton
    kernels, CUDA GPUs only) commented out, as optional."""
    from packaging.requirements import Requirement

    specs = {}
    for line in _zoo_requirements():
        requirement = Requirement(line)
        specs[requirement.name.lower()] = requirement
    missing = [name for name in (*REQUIRED_PACKAGES, *OPTIONAL_PACKAGES) if name not in specs]
    if missing:
        raise ExportError(f"zoo's install_requires names no {missing}; cannot write requirements.txt")

    def pin(name):
        # lower bounds first: transformers>=5.24,<5.25
        bounds = sorted(specs[name].specifier, key=lambda s: (not s.operator.startswith(">"), str(s)))
        return name + ",".join(str(s) for s in bounds)

    lines = [
        "# What this folder's remote code needs (trust_remote_code=True); zoo itself is not needed.",
        *[pin(name) for name in REQUIRED_PACKAGES],
        "# Optional, CUDA GPUs only: the ops' Triton kernels (shipped here, used when triton is installed); without",
        "# it the ops run their PyTorch path on any device.",
        *[f"# {pin(name)}" for name in OPTIONAL_PACKAGES],
    ]
    return "\n".join(lines) + "\n"


def export(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Export the saved zoo model in ``model_dir`` into ``out_dir`` (see the module docstring)."""
    from transformers import AutoConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(
            f"{model_dir} has no config.json: give a model folder (a finished run's output_dir, or a folder "
            "written by save_pretrained)"
        )
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ExportError(f"{model_dir} has no *.safetensors weights (zoo saves safetensors only)")
    if out_dir.resolve() == model_dir.resolve():
        raise ExportError(f"OUT_DIR must differ from the model folder ({model_dir})")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to write into it"
        )
    raw = json.loads(config_path.read_text())
    config = AutoConfig.from_pretrained(model_dir)
    auto_map = export_code(config, out_dir)
    raw["auto_map"] = auto_map
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    for path in weights:
        shutil.copy2(path, out_dir / path.name)
    for name in TOKENIZER_FILES + EXTRA_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    (out_dir / "requirements.txt").write_text(requirements_text())
    from zoo.hub.card import export_card

    export_card(model_dir, config, out_dir)
    return out_dir
