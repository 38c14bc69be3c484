"""Training recipes: the YAML schema, its validation, and command-line overrides.

A recipe is one YAML file with a fixed set of sections (``model``, ``tokenizer``, ``data``, ``optim``,
``schedule``, ``training``, ``logging``, ``checkpointing``, ``eval``, ``finetune``, ``hub``). Every section except
``model`` is a dataclass below, so the dataclass fields *are* the schema: their names, types and defaults. The
``model`` section is the keyword arguments of a zoo configuration class (``type:`` names its ``model_type``), a
``pretrained:`` path / Hub id with optional config overrides, or both ``type:`` and ``pretrained:`` to continue
pre-training a ``type`` model initialised from another architecture's checkpoint (Infini-attention from the
baseline transformer, RMT around any causal LM: :data:`INIT_FROM_OTHER_ARCHITECTURE`).

Everything is checked in :func:`load_recipe` before any work starts. A problem raises :class:`RecipeError` whose
message starts with the dotted key (``optim.lr: expected a float, got 'fast'``) and, for unknown keys, suggests the
closest valid one. The resolved recipe (defaults filled in, overrides applied) is written next to every run as
``recipe.yaml`` by the training loop.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe (file, override or flag) that cannot be run; the message names the dotted key."""


# PyYAML implements YAML 1.1, where `3e-4` (no dot) is a string; recipes are written by people who expect a float.
class _RecipeLoader(yaml.SafeLoader):
    pass


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: malformed YAML: {err}") from None


@dataclass
class TokenizerConfig:
    """``name``: a local path or Hub id for ``AutoTokenizer``; null = the pretrained model's tokenizer if it has
    one, else zoo's byte-level default (vocab 259)."""

    name: str | None = None


@dataclass
class DataConfig:
    """Where the text comes from.

    ``train`` / ``validation`` accept: ``default`` (zoo's embedded corpus), ``synthetic:<task>`` (a generator from
    ``zoo.data.synthetic``), a local ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` file or a folder of them,
    or a Hub dataset name (``hf:`` prefix optional; needs network). A spec that could not be a Hub id or whose
    first folder exists is a local path, and must exist. Without ``validation`` the source's own
    validation split is used, else ``validation_fraction`` of the training documents is held out.
    """

    train: str = "default"
    validation: str | None = None
    text_column: str = "text"
    hf_config: str | None = None
    # How a .txt file is cut into documents: one per line, per blank-line-separated paragraph, or the whole file.
    sample_by: str = "paragraph"
    validation_fraction: float = 0.05
    # Keyword arguments for synthetic_dataset(name, n, seed, **kw), checked against the task's generator;
    # `n_validation` sizes the held-out set.
    synthetic: dict = field(default_factory=dict)
    # How documents fill the blocks of training.block_size tokens: `concat` lays them end to end, cut at block
    # boundaries; `per_document` starts each in a new block and pads the rest of the one before (padding is
    # masked from the loss), so that a question stays in the block of its context (synthetic:passkey).
    packing: str = "concat"
    # What the causal loss is on: `all` tokens, or `answer_only`, each document's answer (the character span in
    # its `answer_start` / `answer_end` columns; synthetic tasks other than markov mark theirs), -100 elsewhere.
    # Blocks without an answer token are dropped; use it with `packing: per_document` and documents that fit a
    # block, so that every answer shares its block with its question.
    loss: str = "all"
    # Tokenised and packed datasets are cached here (default: the datasets cache, subfolder zoo-packed).
    cache_dir: str | None = None


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (not norms, biases or embeddings)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


@dataclass
class ScheduleConfig:
    """Learning rate over optimizer steps (transformers' schedules, one step ahead so that the first step trains at
    ``lr / warmup_steps``): linear warmup over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio * lr``,
    ``wsd`` (warmup-stable-decay: constant, then linear decay to ``min_lr_ratio * lr`` over the last
    ``decay_ratio`` of steps) or ``constant``."""

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2


@dataclass
class TrainingConfig:
    """The run. ``batch_size`` is per process and micro-step; one optimizer step sees
    ``batch_size * grad_accum * num_processes`` blocks of ``block_size`` tokens."""

    output_dir: str | None = None
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int = 256
    seed: int = 0
    # auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU (or what `accelerate launch` was told).
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    # CPU: keep freed memory in the process (glibc mallopt, zoo.training.allocator) instead of returning it to the
    # OS and faulting it back in on every step; at long T that is up to a third of a step here. RSS stays at the peak.
    keep_freed_memory: bool = False
    # Randomized positional encodings (Ruoss et al., 2023): 0 = off; N = each training document's positions are
    # a sorted random sample from [0, N), so the model meets the positions of inputs up to N tokens long.
    randomized_positions: int = 0
    # `causal`: next-token prediction (AutoModelForCausalLM). `mlm`: masked language modelling for encoders
    # (AutoModelForMaskedLM; zoo.training.mlm): mlm_probability of the tokens chosen, 80% of those replaced by the
    # mask token, 10% by a random token, 10% kept; loss on the chosen tokens, no shift; blocks carry an
    # attention_mask (0 on padding) and no restarting position ids (documents end to end, as RoBERTa's).
    objective: str = "causal"
    mlm_probability: float = 0.15
    # Length curriculum, [[step, length], ...]: from optimizer step `step` on, train on the first `length`
    # tokens of every block (steps increasing from 0, lengths up to block_size); empty = whole blocks always.
    # For segment-recurrent models (RMT, Infini-attention) the number of segments per example grows with it.
    curriculum: list[list[int]] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # Greedy continuation printed at the end of the run: a non-empty prompt, and at least one new token.
    sample_prompt: str = "The "
    sample_tokens: int = 64


@dataclass
class CheckpointingConfig:
    """``every`` optimizer steps (0 = never); ``resume``: ``auto`` (newest complete checkpoint in
    ``output_dir/checkpoints``, if any), ``none``, or a checkpoint folder."""

    every: int = 500
    keep_last: int = 2
    resume: str = "auto"


@dataclass
class EvalConfig:
    """Validation loss and perplexity every ``every`` optimizer steps (0 = only at the end)."""

    every: int = 500
    max_batches: int = 50
    batch_size: int | None = None


@dataclass
class FinetuneConfig:
    """``method: lora`` wraps the model with peft; null ``target_modules`` = the architecture's default."""

    method: str | None = None
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    # Save the merged full model as the final model (the adapter is always saved under adapter/).
    merge: bool = True


@dataclass
class HubConfig:
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    commit_message: str = "Upload model trained with zoo"


@dataclass
class Recipe:
    model: dict
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


# Enumerated fields and their allowed values.
CHOICES = {
    "data.sample_by": ("line", "paragraph", "document"),
    "data.packing": ("concat", "per_document"),
    "data.loss": ("all", "answer_only"),
    "optim.name": ("adamw",),
    "schedule.name": ("cosine", "wsd", "constant"),
    "training.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "training.objective": ("causal", "mlm"),
    "finetune.method": (None, "lora"),
}
DATA_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet")
# Flags named as transformers.TrainingArguments names them, and the recipe keys they set.
FLAG_KEYS = {
    "output_dir": "training.output_dir",
    "max_steps": "training.max_steps",
    "seed": "training.seed",
    "resume": "checkpointing.resume",
}


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid keys: {', '.join(sorted(options))})"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except RecipeError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _build_section(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeError(f"{where}.{key}: unknown key{_closest(str(key), names)}")
        kwargs[key] = _check_type(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 3e-4)`` sets ``d["optim"]["lr"]``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(
                f"{'.'.join(parents[: i + 1])}: is {child!r}, not a section; cannot set {dotted}"
            )
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-4")
    key, text = item.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key or not all(key.split(".")):
        raise RecipeError(f"override {item!r}: the key must be dotted like optim.lr")
    return key, parse_yaml(text, f"override {key}") if text.strip() else ""


def _model_config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    try:
        import zoo  # noqa: F401  registers zoo architectures with the Auto classes
    except ImportError:
        pass
    if model_type not in CONFIG_MAPPING:
        zoo_types = [t for t in CONFIG_MAPPING.keys() if t.startswith("zoo_")]
        raise RecipeError(f"model.type: unknown model_type {model_type!r}{_closest(model_type, zoo_types)}")
    return CONFIG_MAPPING[model_type]


def _config_keys(config_class) -> set[str]:
    """The keyword arguments a configuration class accepts by name, including its base classes'."""
    from transformers import PretrainedConfig

    keys: set[str] = set()
    for cls in config_class.__mro__:
        if cls is object or not issubclass(cls, PretrainedConfig):
            continue
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                keys.add(name)
        # transformers 5 declares config fields as dataclass-style class annotations.
        keys.update(k for k in vars(cls).get("__annotations__", {}) if not k.startswith("_"))
        keys.update(getattr(cls, "attribute_map", None) or {})
    return keys - {"model_type", "transformers_version", "architectures"}


# `type:` and `pretrained:` together: continued pre-training of the `type` architecture from a checkpoint of
# another one, through a classmethod of the target's causal-LM class, called as
# `method(pretrained, **other model keys)`; and the source model_types it accepts (None: any causal LM).
INIT_FROM_OTHER_ARCHITECTURE = {
    "zoo_infini": ("from_baseline", ("zoo_transformer",)),
    "zoo_rmt": ("from_backbone", None),
}


def _check_model_kwargs(model_type: str, config_class, kwargs: dict) -> None:
    """Each key a field of ``config_class``, each number of the type of the field's default."""
    keys = _config_keys(config_class)
    for key, value in kwargs.items():
        if key not in keys:
            raise RecipeError(f"model.{key}: unknown key for {model_type}{_closest(key, keys)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"model.{key}: expected a finite number, got {value}")
        default = getattr(config_class, key, None)
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        if isinstance(value, list | tuple) and value and all(_is_number(v) for v in value):
            continue  # per-layer values (Longformer's attention_window); the config checks the rest
        if not _is_number(value):
            raise RecipeError(f"model.{key}: expected a number like {default!r}, got {value!r}")
        if isinstance(default, int) and isinstance(value, float):
            raise RecipeError(f"model.{key}: expected an integer like {default!r}, got {value!r}")


def _validate_model(model: Any):
    """The checked ``model`` section, and the configuration it builds (None for ``pretrained:``, whose
    configuration is only read when the run starts).

    Three forms: ``type:`` + config keys (from scratch); ``pretrained:`` + config overrides (continue a
    checkpoint); ``type:`` + ``pretrained:`` + config keys (initialise a ``type`` model from a checkpoint of
    another architecture, :data:`INIT_FROM_OTHER_ARCHITECTURE`; the source is read when the run starts).
    """
    if not isinstance(model, dict) or not model:
        raise RecipeError(
            "model: expected a mapping with `type:` (a zoo model_type) or `pretrained:` (path or hub id)"
        )
    model = dict(model)
    if "type" not in model and "pretrained" not in model:
        raise RecipeError(
            "model: give `type:` (train from scratch), `pretrained:` (path or hub id) or both (initialise a"
            " `type` model from a checkpoint of another architecture)"
        )
    if "type" not in model:
        _check_type(model["pretrained"], str, "model.pretrained")
        return model, None
    model_type = _check_type(model["type"], str, "model.type")
    config_class = _model_config_class(model_type)
    kwargs = {k: v for k, v in model.items() if k not in ("type", "pretrained")}
    _check_model_kwargs(model_type, config_class, kwargs)
    if "pretrained" in model:
        _check_type(model["pretrained"], str, "model.pretrained")
        if model_type not in INIT_FROM_OTHER_ARCHITECTURE:
            able = ", ".join(sorted(INIT_FROM_OTHER_ARCHITECTURE))
            raise RecipeError(
                f"model.type: {model_type} has no initialisation from another architecture's checkpoint, so"
                f" `type:` and `pretrained:` cannot go together; give exactly one of them (`pretrained:` alone"
                f" continues a checkpoint of its own architecture), or a type that has one: {able}"
            )
        return model, None
    # The configuration class has the last word on values (ranges, divisibility, enumerations).
    try:
        config = config_class(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"model: {err}") from None
    return model, config


def check_position_limits(config, training: TrainingConfig) -> None:
    """A learned position table has ``max_position_embeddings`` rows: the positions of a block (and randomized
    positions) must index inside it, or the first step fails. Other position encodings have no hard limit."""
    if getattr(config, "position_embedding_type", None) != "learned":
        return
    limit = config.max_position_embeddings
    for key in ("block_size", "randomized_positions"):
        value = getattr(training, key)
        if value > limit:
            raise RecipeError(
                f"training.{key}: {value} is past model.max_position_embeddings = {limit}, the size of the"
                f" learned position table (model.position_embedding_type: learned); use training.{key} <= {limit},"
                " a larger model.max_position_embeddings or another model.position_embedding_type"
            )


def is_local_path(spec: str, base: Path) -> bool:
    """Whether a data spec names a local file or folder rather than a Hub dataset: it has a data-file suffix,
    starts with ``/``, ``.`` or ``~``, could not be a Hub id (``name`` or ``namespace/name``; e.g. ``a/b/c``), or
    exists in part (its first folder exists in the working directory or beside the recipe)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.lower().endswith(DATA_SUFFIXES):
        return True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return True
    first = Path(spec).parts[0]
    return any((root / first).exists() for root in (Path("."), base))


def _validate_data_source(spec: str | None, where: str, base: Path) -> str | None:
    if spec is None or spec == "default" or spec.startswith(("synthetic:", "hf:")):
        if spec and spec.startswith("synthetic:"):
            from zoo.data.synthetic import SYNTHETIC_TASKS

            name = spec.split(":", 1)[1]
            if name not in SYNTHETIC_TASKS:
                raise RecipeError(
                    f"{where}: unknown synthetic task {name!r}{_closest(name, SYNTHETIC_TASKS)}"
                )
        return spec
    if is_local_path(spec, base):
        path = Path(spec).expanduser()
        if not path.is_absolute() and not path.exists() and (base / path).exists():
            path = base / path
        if not path.exists():
            looked = "" if path.is_absolute() else f" (looked in {str(Path.cwd())!r} and {str(base)!r})"
            raise RecipeError(
                f"{where}: no such file or folder {spec!r}{looked}; give an existing"
                f" {'/'.join(DATA_SUFFIXES)} file or a folder of them, or hf:<name> for a Hub dataset"
            )
        if path.is_dir() and not any(
            p.suffix.lower() in DATA_SUFFIXES for p in path.rglob("*") if p.is_file()
        ):
            raise RecipeError(f"{where}: folder {spec!r} holds no {'/'.join(DATA_SUFFIXES)} files")
        if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
            raise RecipeError(f"{where}: {spec!r} is not one of {', '.join(DATA_SUFFIXES)}")
        return str(path)
    return spec


def _validate_synthetic(data: DataConfig) -> None:
    """``data.synthetic`` holds keyword options of the synthetic task(s) in use, plus ``n`` / ``n_validation``;
    each is checked against the generator's signature, and the values by generating one document."""
    from zoo.data.synthetic import SYNTHETIC_TASKS, synthetic_documents

    tasks = [s.split(":", 1)[1] for s in (data.train, data.validation) if s and s.startswith("synthetic:")]
    if data.loss == "answer_only":
        from zoo.data.synthetic import ANSWERED_TASKS

        for name in tasks:
            if name not in ANSWERED_TASKS:
                raise RecipeError(
                    f"data.loss: answer_only, but synthetic:{name} has no answer to mark"
                    f" (tasks with one: {', '.join(sorted(ANSWERED_TASKS))}); use data.loss: all"
                )
    options = dict(data.synthetic)
    for key in ("n", "n_validation"):
        if key in options:
            value = _check_type(options.pop(key), int, f"data.synthetic.{key}")
            if value < 1:
                raise RecipeError(f"data.synthetic.{key}: must be >= 1, got {value}")
    for name in dict.fromkeys(tasks):
        params = inspect.signature(SYNTHETIC_TASKS[name]).parameters
        # `n` and `seed` come from data.synthetic.n and training.seed.
        valid = sorted({p for p in params if p not in ("n", "seed")} | {"n", "n_validation"})
        for key in options:
            if key not in valid:
                match = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
                hint = f" (did you mean {match[0]!r}?)" if match else ""
                raise RecipeError(
                    f"data.synthetic.{key}: not an option of synthetic:{name}{hint}; valid: {', '.join(valid)}"
                )
        try:
            synthetic_documents(name, 1, 0, **options)
        except (ValueError, TypeError) as err:
            raise RecipeError(
                f"data.synthetic: synthetic:{name} rejects these options {options}: {err}"
            ) from None


def _validate_curriculum(training: TrainingConfig) -> None:
    stages = training.curriculum
    for i, stage in enumerate(stages):
        if len(stage) != 2:
            raise RecipeError(f"training.curriculum[{i}]: expected [step, length], got {stage}")
        step, length = stage
        if not 1 <= length <= training.block_size:
            raise RecipeError(
                f"training.curriculum[{i}]: length {length} must be in 1..training.block_size ({training.block_size})"
            )
        if i == 0 and step != 0:
            raise RecipeError(f"training.curriculum[0]: the first stage must start at step 0, got {step}")
        if i > 0 and step <= stages[i - 1][0]:
            raise RecipeError(
                f"training.curriculum[{i}]: steps must increase, got {step} after {stages[i - 1][0]}"
            )


def curriculum_length(training: TrainingConfig, step: int) -> int:
    """The tokens of each block trained on at optimizer step ``step`` (``block_size`` without a curriculum)."""
    length = training.block_size
    for start, stage_length in training.curriculum:
        if step >= start:
            length = stage_length
    return length


def _validate_objective(recipe: Recipe) -> None:
    training = recipe.training
    p = training.mlm_probability
    _require(0 < p < 1, "training.mlm_probability", "in (0, 1)", p)
    if training.objective != "mlm":
        return
    if recipe.data.loss != "all":
        raise RecipeError(
            f"data.loss: {recipe.data.loss} is for the causal objective; training.objective: mlm chooses its own"
            " targets (use data.loss: all)"
        )
    if training.randomized_positions:
        raise RecipeError(
            "training.randomized_positions: not with training.objective: mlm (an encoder reads a block as one"
            " sequence, positions from 0); set it to 0"
        )
    model_type = recipe.model.get("type")
    if model_type is not None:
        from transformers import AutoModelForMaskedLM

        if (
            "pretrained" in recipe.model
            or _model_config_class(model_type) not in AutoModelForMaskedLM._model_mapping
        ):
            able = sorted(
                t for t in _zoo_model_types() if _model_config_class(t) in AutoModelForMaskedLM._model_mapping
            )
            raise RecipeError(
                f"training.objective: mlm needs a masked-language-model head, and {model_type} has none (it is"
                f" causal only); use objective: causal, or an encoder: {', '.join(able)}"
            )


def _zoo_model_types() -> list[str]:
    from transformers import CONFIG_MAPPING

    return [t for t in CONFIG_MAPPING.keys() if t.startswith("zoo_")]


def _require(ok: bool, dotted: str, rule: str, value: Any) -> None:
    if not ok:
        raise RecipeError(f"{dotted}: must be {rule}, got {value!r}")


def _validate(recipe: Recipe, base: Path, model_config=None) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise RecipeError(f"{dotted}: {value!r} is not one of {', '.join(map(str, allowed))}")
    positive = ["training.max_steps", "training.batch_size", "training.grad_accum", "training.block_size"]
    positive += ["logging.every", "logging.sample_tokens", "finetune.r", "finetune.alpha"]
    for dotted in positive:
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        _require(value >= 1, dotted, ">= 1", value)
    non_negative = ["checkpointing.every", "checkpointing.keep_last", "eval.every", "eval.max_batches"]
    non_negative += ["schedule.warmup_steps", "training.seed", "optim.weight_decay"]
    for dotted in non_negative:
        section, key = dotted.split(".")
        value = getattr(getattr(recipe, section), key)
        _require(value >= 0, dotted, ">= 0", value)
    eval_batch = recipe.eval.batch_size
    _require(
        eval_batch is None or eval_batch >= 1,
        "eval.batch_size",
        ">= 1 (or null for training.batch_size)",
        eval_batch,
    )
    rp = recipe.training.randomized_positions
    if rp and rp < recipe.training.block_size:
        raise RecipeError(
            f"training.randomized_positions: must be 0 (off) or >= training.block_size "
            f"({recipe.training.block_size}), got {rp}"
        )
    _validate_curriculum(recipe.training)
    _validate_objective(recipe)
    _require(recipe.optim.lr > 0, "optim.lr", "> 0", recipe.optim.lr)
    _require(recipe.optim.eps > 0, "optim.eps", "> 0", recipe.optim.eps)
    max_norm = recipe.optim.max_grad_norm
    _require(
        max_norm is None or max_norm > 0, "optim.max_grad_norm", "> 0 (or null for no clipping)", max_norm
    )
    if len(recipe.optim.betas) != 2 or not all(0 <= b < 1 for b in recipe.optim.betas):
        raise RecipeError(f"optim.betas: expected two numbers in [0, 1), got {recipe.optim.betas}")
    fraction = recipe.data.validation_fraction
    _require(0 < fraction < 1, "data.validation_fraction", "in (0, 1)", fraction)
    _require(
        0 <= recipe.schedule.decay_ratio <= 1,
        "schedule.decay_ratio",
        "in [0, 1]",
        recipe.schedule.decay_ratio,
    )
    ratio = recipe.schedule.min_lr_ratio
    _require(0 <= ratio <= 1, "schedule.min_lr_ratio", "in [0, 1]", ratio)
    _require(0 <= recipe.finetune.dropout < 1, "finetune.dropout", "in [0, 1)", recipe.finetune.dropout)
    if not recipe.logging.sample_prompt:
        raise RecipeError(
            "logging.sample_prompt: must not be empty (the greedy sample continues it), e.g. 'The '"
        )
    if recipe.hub.push and not recipe.hub.repo_id:
        raise RecipeError("hub.repo_id: required when hub.push is true (e.g. your-name/zoo-tiny)")
    resume = recipe.checkpointing.resume
    if resume not in ("auto", "none") and not Path(resume).expanduser().is_dir():
        raise RecipeError(
            f"checkpointing.resume: {resume!r} is neither auto, none nor an existing checkpoint folder"
        )
    if model_config is not None:
        check_position_limits(model_config, recipe.training)
    recipe.data.train = _validate_data_source(recipe.data.train, "data.train", base)
    recipe.data.validation = _validate_data_source(recipe.data.validation, "data.validation", base)
    _validate_synthetic(recipe.data)


def recipe_from_dict(raw: Any, *, base: str | os.PathLike = ".", name: str = "run") -> Recipe:
    """Build and validate a :class:`Recipe` from a parsed YAML mapping; relative data paths resolve
    against the working directory first, then ``base`` (the recipe file's folder)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Recipe)
    sections = {f.name for f in dataclasses.fields(Recipe)}
    for key in raw:
        if key not in sections:
            raise RecipeError(f"{key}: unknown section{_closest(str(key), sections)}")
    if "model" not in raw:
        raise RecipeError("model: missing; give `type:` (a zoo model_type) or `pretrained:` (path or hub id)")
    model, model_config = _validate_model(raw["model"])
    kwargs = {"model": model}
    for key in sections - {"model"}:
        kwargs[key] = _build_section(hints[key], raw.get(key), key)
    recipe = Recipe(**kwargs)
    if recipe.training.output_dir is None:
        recipe.training.output_dir = str(Path("outputs") / name)
    _validate(recipe, Path(base), model_config)
    return recipe


def load_recipe(
    path: str | os.PathLike | None, overrides: list[str] = (), flags: dict | None = None
) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides, then ``--flag`` values, and validate the result."""
    raw: Any = {}
    base, name = Path("."), "run"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"--config: recipe file {str(path)!r} does not exist")
        raw = parse_yaml(path.read_text(), str(path))
        if raw is None:
            raw = {}
        base, name = path.parent, path.stem
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    for flag, value in (flags or {}).items():
        if value is not None:
            set_dotted(raw, FLAG_KEYS[flag], value)
    return recipe_from_dict(raw, base=base, name=name)
