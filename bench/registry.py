"""The benchmark entries: one per architecture (or variant), each declared in its own module of ``bench/entries/``.

An :class:`Entry` names a zoo model (built through ``zoo.models.registry.sized_config(model_type, hidden,
layers)`` with the entry's keyword overrides, or by the entry's own ``build``), the FLOP-counter family of
:mod:`bench.flops`, the sequence-mixing modules the profile attributes time to, the workloads that apply, and
optionally a :class:`Reference`: what a user would otherwise run. A reference is either transformers' own class
of the same architecture holding the same weights (converted with zoo's converters; ``same_weights=True``, and
the suite checks equal logits in the same run before timing) or the zoo baseline transformer of the same width
and depth (``same_weights=False``).

Declaring an entry: a module ``bench/entries/<arch>.py`` defining ``ENTRIES = [Entry(...), ...]``. Every module of
that package is imported by :func:`load_entries`; nothing else changes. ``PENDING`` lists registered model types
whose entry is being written elsewhere; ``tests/bench/test_bench_suite.py`` fails for a registered model type that
has neither an entry nor a pending line, and for a pending line whose entry has landed.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WORKLOADS = ("train", "prefill", "decode", "memory")
BASELINE_MAX_POSITIONS = 65536
OBJECTIVES = ("causal_lm", "masked_lm")

# Registered model types whose entry is being written in another module (see the module docstring).
PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Reference:
    """What a user would otherwise run, built from the zoo model of the same entry.

    ``build(zoo_model) -> model``: transformers' class holding the zoo model's weights (``same_weights=True``:
    logits must agree to ``tolerance``, relative, in the same run), or an independent baseline of the same width
    and depth (``same_weights=False``). ``max_length``: the longest T the reference is timed at (slow paths, such
    as transformers' Mamba-1 CPU loop over time); None: every length.
    """

    name: str
    build: Callable[[torch.nn.Module], torch.nn.Module]
    same_weights: bool
    tolerance: float = 1e-4
    max_length: int | None = None


@dataclass(frozen=True)
class Entry:
    """One architecture (or variant) of the benchmark.

    name: the entry's key in tables and JSON (``--entries`` selects by it).
    model_type: the zoo ``model_type`` it benchmarks (the coverage test checks every registered one has an entry).
    family: key of :data:`bench.flops.FAMILIES`, the FLOP counter of its sequence mixing.
    config: keyword overrides of ``sized_config(model_type, hidden, layers, ...)``.
    build: ``(hidden, layers, max_len) -> model`` instead of the registered causal LM of ``sized_config``.
    reference: see :class:`Reference`.
    workloads: the subset of :data:`WORKLOADS` that applies (encoders do not decode).
    objective: ``causal_lm`` (labels = inputs) or ``masked_lm`` (an encoder's MLM loss on every token).
    forward_kwargs: ``(input_ids) -> dict`` of extra keyword arguments for the forward of both models.
    prepare_decode: ``(model, longest_context) -> dict`` run once before decoding (Hyena's distillation); what it
        returns is recorded.
    mixers: class names of the sequence-mixing modules (the profile's "mixing" share).
    lengths: the training lengths its issue names (the full run's default for this entry).
    """

    name: str
    model_type: str
    family: str
    config: dict = field(default_factory=dict)
    build: Callable[[int, int, int], torch.nn.Module] | None = None
    reference: Reference | None = None
    workloads: tuple[str, ...] = WORKLOADS
    objective: str = "causal_lm"
    forward_kwargs: Callable[[torch.Tensor], dict] | None = None
    prepare_decode: Callable[[torch.nn.Module, int], dict] | None = None
    mixers: tuple[str, ...] = ()
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(
                f"entry {self.name!r}: unknown workloads {sorted(unknown)}; expected {WORKLOADS}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"entry {self.name!r}: objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        if self.objective == "masked_lm" and "decode" in self.workloads:
            raise ValueError(f"entry {self.name!r}: a masked-LM encoder does not decode")

    def make(self, hidden_size: int, layers: int, max_len: int) -> torch.nn.Module:
        """The zoo model at this width and depth, with positions for ``max_len`` tokens where it has them."""
        if self.build is not None:
            return self.build(hidden_size, layers, max_len)
        return causal_lm(self.model_type, hidden_size, layers, max_len, **self.config)


def sized(model_type: str, hidden_size: int, layers: int, max_len: int, **overrides):
    """``sized_config`` with learned or tabled positions long enough for ``max_len`` tokens."""
    from zoo.models.registry import sized_config

    config = sized_config(model_type, hidden_size, layers, **overrides)
    needed = max_len + 8
    current = getattr(config, "max_position_embeddings", None)
    if current is not None and current < needed and "max_position_embeddings" not in overrides:
        config = sized_config(model_type, hidden_size, layers, max_position_embeddings=needed, **overrides)
    return config


def causal_lm(model_type: str, hidden_size: int, layers: int, max_len: int, **overrides) -> torch.nn.Module:
    import zoo  # noqa: F401  (registers the architectures)
    from zoo.models.registry import REGISTRY

    return REGISTRY[model_type].causal_lm(sized(model_type, hidden_size, layers, max_len, **overrides))


def baseline_transformer(zoo_model: torch.nn.Module) -> torch.nn.Module:
    """The zoo baseline transformer (Llama-style, SDPA) at the zoo model's width and depth (a wrapper's, such as
    RMT's, from its backbone), with rotary positions for any length the suite runs (up to 64K)."""
    config = getattr(zoo_model.config, "backbone", None) or zoo_model.config
    return causal_lm(
        "zoo_transformer",
        config.hidden_size,
        config.num_hidden_layers,
        BASELINE_MAX_POSITIONS,
        vocab_size=zoo_model.config.vocab_size,
    )


BASELINE = Reference(
    name="zoo_transformer (same width and depth)", build=baseline_transformer, same_weights=False
)


def load_entries() -> dict[str, Entry]:
    """Every entry declared in ``bench/entries/*.py``, by name (names must be unique)."""
    import bench.entries as package

    entries: dict[str, Entry] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for entry in getattr(module, "ENTRIES", ()):
            if entry.name in entries:
                raise ValueError(f"bench entry {entry.name!r} is declared twice (in {info.name})")
            entries[entry.name] = entry
    return entries


def coverage(entries: dict[str, Entry] | None = None) -> dict[str, list[str]]:
    """Registered model types without an entry (``missing``, not pending) and pending lines whose entry has
    landed (``stale``)."""
    import zoo  # noqa: F401
    from zoo.models.registry import REGISTRY

    covered = {e.model_type for e in (entries or load_entries()).values()}
    return {
        "missing": sorted(set(REGISTRY) - covered - set(PENDING)),
        "stale": sorted(covered & set(PENDING)),
    }


__all__ = ["BASELINE", "Entry", "PENDING", "Reference", "WORKLOADS", "coverage", "load_entries", "sized"]
