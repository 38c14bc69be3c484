"""Train every architecture at one size on one mixture, evaluate them on the same cells, measure what each costs.

The plan, for each architecture (a registered ``model_type``, optionally with config overrides,
``zoo_rwkv:version=4``):

1. **Size**: the reference (the baseline transformer when it is in the list, else the first) is built at
   ``hidden_size`` × ``num_layers`` through the registry's ``sized`` keywords; every other architecture gets the
   width, at the same depth, whose parameter count is nearest the reference's, and must land within
   ``param_tolerance`` of it (a clear error otherwise).
2. **Train** with the same batches (drawn from the mixture by step index, so every model sees the same tokens),
   AdamW and a cosine schedule with warm-up, for the same number of steps. The loss is each sample's mean
   cross-entropy over its targets, averaged over the samples (``mixture_loss``): the mixture's weights are the
   tasks' shares of the loss, not of the target tokens. Learning rates: every rate of the grid
   trains the first ``sweep_fraction`` of the schedule, the one with the lowest held-out loss continues to the end
   (successive halving over one rung; the sweep costs ``(len(lrs) - 1) * sweep_fraction`` of a run more).
   The number of steps comes from ``budget_minutes``: a short throughput probe of each model, then as many steps
   as fit in ``train_share`` of the budget for all of them (or ``steps`` when given).
3. **Evaluate** at ``train_length`` × ``eval_multiples``: recall accuracy (MQAR, ``eval_pairs`` pairs, the gap
   growing with the length), passkey retrieval by depth, text perplexity by context position; then the costs:
   training tokens/s (median step of the run), decoding ms/token after a prefill of the longest length, and the
   bytes a training step saves for backward per token. Rotary models are evaluated again with their context
   extended (position interpolation and YaRN at each of ``extension_factors``).
4. **Save** each model with its tokenizer and model card (``AutoModelForCausalLM.from_pretrained`` after
   ``import zoo``), and the results as JSON; ``eval.leaderboard.report`` writes the report.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.leaderboard.tasks import (
    IGNORE,
    Mixture,
    TaskMaker,
    Vocab,
    collate,
    text_stream,
    tokenizer_for,
    training_batch,
)

logger = logging.getLogger(__name__)

REFERENCE = "zoo_transformer"


@dataclass
class LeaderboardConfig:
    architectures: list[str] | None = None  # None: every registered causal architecture
    hidden_size: int = 64
    num_layers: int = 2
    param_tolerance: float = 0.10
    train_length: int = 64
    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 32
    budget_minutes: float = 20.0
    train_share: float = 0.7  # of the budget, for training (probes and sweep included); the rest evaluates
    steps: int | None = None  # fixed number of steps instead of the budget
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    sweep_fraction: float = 0.25
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    mixture: Mixture = field(default_factory=Mixture)
    num_keys: int = 64
    num_values: int = 64
    eval_pairs: int = 4
    eval_samples: int = 64
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_samples: int = 8  # per depth and length
    perplexity_windows: int = 4
    validation_batches: int = 4  # held-out batches of the mixture that pick the learning rate
    decode_steps: int = 16
    extension_methods: list[str] = field(default_factory=lambda: ["linear", "yarn"])
    extension_factors: list[int] = field(default_factory=lambda: [4, 8])
    eval_batch_size: int = 16
    corpus_max_files: int | None = None
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mixture, dict):
            self.mixture = Mixture(**self.mixture)
        self.mixture.weights()  # validates
        positive = (
            "hidden_size",
            "num_layers",
            "train_length",
            "batch_size",
            "eval_pairs",
            "eval_samples",
            "passkey_samples",
            "perplexity_windows",
            "validation_batches",
            "decode_steps",
            "eval_batch_size",
            "num_keys",
            "num_values",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(f"lrs must be positive finite learning rates, got {self.lrs}")
        if (
            not 0 < self.sweep_fraction <= 1
            or not 0 <= self.warmup_fraction < 1
            or not 0 < self.train_share < 1
        ):
            raise ValueError("need 0 < sweep_fraction <= 1, 0 <= warmup_fraction < 1, 0 < train_share < 1")
        if not self.eval_multiples or any(m < 1 for m in self.eval_multiples):
            raise ValueError(f"eval_multiples must be >= 1, got {self.eval_multiples}")
        self.eval_multiples = sorted(set(self.eval_multiples))
        if 4 * self.eval_pairs > self.train_length:
            raise ValueError(f"eval_pairs={self.eval_pairs} needs train_length >= {4 * self.eval_pairs}")
        if self.eval_pairs > self.num_keys or self.mixture.max_pairs > self.num_keys:
            raise ValueError(f"eval_pairs and mixture.max_pairs must be <= num_keys={self.num_keys}")
        if any(not 0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths must lie in [0, 1], got {self.passkey_depths}")
        from zoo.positional.rope_scaling import METHODS

        bad = [m for m in self.extension_methods if m not in METHODS]
        if bad or any(f <= 1 for f in self.extension_factors):
            raise ValueError(
                f"extension_methods must be among {METHODS} and factors > 1; got {bad or self.extension_factors}"
            )

    @property
    def lengths(self) -> list[int]:
        return [self.train_length * m for m in self.eval_multiples]


# ------------------------------------------------------------------------------------------------ architectures


@dataclass
class Entry:
    """One leaderboard row's model: its name, type, config overrides, and (once sized) its config."""

    name: str
    model_type: str
    overrides: dict
    hidden_size: int | None = None
    config: object = None
    num_parameters: int | None = None


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_architecture(spec: str) -> Entry:
    """``model_type`` or ``model_type:key=value,key=value``."""
    model_type, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(
                f"architecture {spec!r}: expected model_type:key=value[,key=value], got {item!r}"
            )
        overrides[key.strip()] = _parse_value(value.strip())
    return Entry(spec, model_type.strip(), overrides)


def causal_architectures() -> list[str]:
    import zoo  # noqa: F401  registers the architectures

    return [name for name, entry in zoo.REGISTRY.items() if entry.causal_lm is not None]


def _accepts(config_class, name: str) -> bool:
    return name in inspect.signature(config_class.__init__).parameters


def build_config(entry: Entry, hidden_size: int, cfg: LeaderboardConfig, vocab: Vocab):
    from zoo.models.registry import REGISTRY, sized_config

    config_class = REGISTRY[entry.model_type].config
    common = {"vocab_size": vocab.size}
    if _accepts(config_class, "tie_word_embeddings"):
        common["tie_word_embeddings"] = True
    if _accepts(config_class, "max_position_embeddings"):
        if _accepts(config_class, "rope_parameters"):
            # rotary: the trained context, which RoPE scaling extends from (positions beyond it still run)
            common["max_position_embeddings"] = cfg.train_length
        else:
            # a learned table must cover the longest evaluation (rows past the training length stay untrained, as
            # they would in any model trained at that length), plus the decoding measured after it and the
            # rows a padding offset skips
            common["max_position_embeddings"] = cfg.lengths[-1] + cfg.decode_steps + 4
    if _accepts(config_class, "segment_length"):
        # segment-recurrent models (Infini-attention's memory, RMT's memory tokens) read their memory only across
        # a segment boundary: training sequences of one segment would never train it
        common["segment_length"] = cfg.train_length // 2
    return sized_config(entry.model_type, hidden_size, cfg.num_layers, **{**common, **entry.overrides})


def count_parameters(config) -> int:
    from zoo.models.registry import REGISTRY

    with torch.device("meta"):
        model = REGISTRY[config.model_type].causal_lm(config)
    return sum(p.numel() for p in model.parameters())


def size_architectures(entries: list[Entry], cfg: LeaderboardConfig, vocab: Vocab) -> None:
    """Give every entry the width whose parameter count is nearest the reference's (same depth)."""
    ref = next((e for e in entries if e.model_type == REFERENCE and not e.overrides), entries[0])
    ref.hidden_size = cfg.hidden_size
    ref.config = build_config(ref, cfg.hidden_size, cfg, vocab)
    ref.num_parameters = target = count_parameters(ref.config)
    for entry in entries:
        if entry is ref:
            continue
        best = None
        for width in range(8, 4 * cfg.hidden_size + 1, 4):
            try:
                config = build_config(entry, width, cfg, vocab)
            except (ValueError, TypeError):
                continue  # a width this architecture cannot take (head sizes, groups)
            n = count_parameters(config)
            if best is None or abs(n - target) < abs(best[2] - target):
                best = (width, config, n)
        if best is None:
            raise ValueError(f"{entry.name}: no width in 8..{4 * cfg.hidden_size} gives a valid config")
        entry.hidden_size, entry.config, entry.num_parameters = best
        off = entry.num_parameters / target - 1
        if abs(off) > cfg.param_tolerance:
            raise ValueError(
                f"{entry.name}: the nearest width ({entry.hidden_size}) gives {entry.num_parameters:,} parameters, "
                f"{off:+.0%} from the reference {ref.name}'s {target:,} (tolerance {cfg.param_tolerance:.0%})"
            )


# ------------------------------------------------------------------------------------------------ training


def build_model(entry: Entry, seed: int) -> torch.nn.Module:
    from zoo.models.registry import REGISTRY

    torch.manual_seed(seed)
    return REGISTRY[entry.model_type].causal_lm(entry.config)


def make_optimizer(model: torch.nn.Module, lr: float, cfg: LeaderboardConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    from zoo.training.optim import decay_parameter_names

    decay = decay_parameter_names(model)
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    warmup = int(cfg.warmup_fraction * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


@dataclass
class Run:
    lr: float
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    validation_loss: float | None = None


def batch_for_step(maker: TaskMaker, cfg: LeaderboardConfig, step: int):
    rng = random.Random(f"train-{cfg.seed}-{step}")
    return training_batch(maker, cfg.mixture, rng, cfg.batch_size, cfg.train_length)


def mixture_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each sample's targets, then over the samples that have targets.

    Every sample weighs the same whatever its number of targets, so the mixture's weights are the tasks' shares of
    the loss. Averaged over tokens instead, a 64-token text sample outweighs a recall sample (1-4 targets) or a
    passkey (3) by ~20x, and retrieval barely trains: the baseline transformer, 800 steps of 32 x 64, mixture
    1/2/1, lr 3e-3, recalls 3.9% at 64 tokens with a per-token mean and 89.8% with this one.
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1)
    has = counts > 0
    if not bool(has.any()):
        raise ValueError("the batch has no targets")
    return (nll.sum(dim=1)[has] / counts[has]).mean()


def train_steps(run: Run, maker: TaskMaker, cfg: LeaderboardConfig, until: int, bar=None) -> None:
    run.model.train()
    while run.step < until:
        ids, labels = batch_for_step(maker, cfg, run.step)
        start = time.perf_counter()
        loss = mixture_loss(run.model, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step_times.append(time.perf_counter() - start)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {run.step} (lr {run.lr})")
        run.losses.append(value)
        run.step += 1
        if bar is not None:
            bar.update(1)


@torch.inference_mode()
def validation_loss(model: torch.nn.Module, maker: TaskMaker, cfg: LeaderboardConfig) -> float:
    model.eval()
    losses = []
    for b in range(cfg.validation_batches):
        rng = random.Random(f"validation-{cfg.seed}-{b}")
        ids, labels = training_batch(maker, cfg.mixture, rng, cfg.batch_size, cfg.train_length)
        losses.append(mixture_loss(model, ids, labels).item())
    return statistics.mean(losses)


def probe_step_time(entry: Entry, maker: TaskMaker, cfg: LeaderboardConfig) -> float:
    """Seconds per training step of ``entry`` (median of 3 after one warm-up step)."""
    model = build_model(entry, cfg.seed)
    optimizer, scheduler = make_optimizer(model, cfg.lrs[0], cfg, 100)
    run = Run(cfg.lrs[0], model, optimizer, scheduler)
    train_steps(run, maker, cfg, 4)
    return statistics.median(run.step_times[1:])


def train_entry(
    entry: Entry, maker_train: TaskMaker, maker_val: TaskMaker, cfg: LeaderboardConfig, steps: int, bar=None
) -> tuple[Run, list[dict]]:
    """The learning-rate sweep, then the best rate to the end; returns its run and every rate's record."""
    rung = max(1, round(cfg.sweep_fraction * steps))
    runs = []
    for lr in cfg.lrs:
        model = build_model(entry, cfg.seed)
        optimizer, scheduler = make_optimizer(model, lr, cfg, steps)
        run = Run(lr, model, optimizer, scheduler)
        if bar is not None:
            bar.set_description_str(f"train {entry.name} lr {lr:g}", refresh=True)
        try:
            train_steps(run, maker_train, cfg, rung if len(cfg.lrs) > 1 else steps, bar)
            run.validation_loss = validation_loss(model, maker_val, cfg)
        except FloatingPointError as err:
            logger.warning("%s: %s", entry.name, err)
            run.validation_loss = math.inf
        runs.append(run)
    best = min(runs, key=lambda r: r.validation_loss)
    if not math.isfinite(best.validation_loss):
        raise FloatingPointError(f"{entry.name}: every learning rate of {cfg.lrs} diverged")
    sweep = [{"lr": r.lr, "steps": r.step, "validation_loss": r.validation_loss} for r in runs]
    for r in runs:
        if r is not best:
            del r.model, r.optimizer
    if bar is not None:
        bar.set_description_str(f"train {entry.name} lr {best.lr:g} (best)", refresh=True)
    train_steps(best, maker_train, cfg, steps, bar)
    best.validation_loss = validation_loss(best.model, maker_val, cfg)
    return best, sweep


# ------------------------------------------------------------------------------------------------ evaluation


def _teacher_forced_hits(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per target token: was the argmax of the logits before it the target? Boolean of labels' shape (False
    where there is no target)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    hits = torch.zeros_like(labels, dtype=torch.bool)
    hits[:, 1:] = (logits.argmax(-1) == targets) & (targets != IGNORE)
    return hits


@torch.inference_mode()
def evaluate_recall(model, maker: TaskMaker, cfg: LeaderboardConfig, length: int) -> float:
    correct = total = 0
    for start in range(0, cfg.eval_samples, cfg.eval_batch_size):
        n = min(cfg.eval_batch_size, cfg.eval_samples - start)
        samples = [
            maker.recall(random.Random(f"recall-{cfg.seed}-{length}-{start + i}"), length, cfg.eval_pairs)
            for i in range(n)
        ]
        ids, labels = collate(samples)
        hits = _teacher_forced_hits(model, ids, labels)
        correct += int(hits.sum())
        total += int((labels[:, 1:] != IGNORE).sum())
    return correct / total


@torch.inference_mode()
def evaluate_passkey(model, maker: TaskMaker, cfg: LeaderboardConfig, length: int) -> dict[str, float]:
    """Exact retrieval rate per depth (all PASSKEY_DIGITS tokens right)."""
    out = {}
    for depth in cfg.passkey_depths:
        samples = [
            maker.passkey(random.Random(f"passkey-{cfg.seed}-{length}-{depth}-{i}"), length, depth)
            for i in range(cfg.passkey_samples)
        ]
        retrieved = 0
        for start in range(0, len(samples), cfg.eval_batch_size):
            ids, labels = collate(samples[start : start + cfg.eval_batch_size])
            hits = _teacher_forced_hits(model, ids, labels)
            wanted = labels != IGNORE
            retrieved += int(((hits | ~wanted).all(dim=1)).sum())
        out[f"{depth:g}"] = retrieved / len(samples)
    return out


@torch.inference_mode()
def evaluate_perplexity(model, stream: torch.Tensor, cfg: LeaderboardConfig) -> dict[int, float]:
    """Perplexity of held-out text at each evaluated length ℓ: over the positions (ℓ/2, ℓ] of windows of the
    longest length (positions [0, ℓ] for the shortest)."""
    longest = cfg.lengths[-1]
    if stream.numel() < longest + 1:
        raise ValueError(f"the held-out text has {stream.numel()} tokens, {longest + 1} needed")
    starts = torch.linspace(0, stream.numel() - longest - 1, cfg.perplexity_windows).long().tolist()
    nll = torch.zeros(longest - 1, dtype=torch.float64)
    for s in starts:
        ids = stream[s : s + longest][None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    nll /= len(starts)
    out, lo = {}, 0
    for length in cfg.lengths:
        hi = length - 1  # predictions of tokens 1..length-1
        out[length] = math.exp(nll[lo:hi].mean().item())
        lo = hi
    return out


@torch.inference_mode()
def decode_ms_per_token(model, maker: TaskMaker, cfg: LeaderboardConfig) -> float:
    from zoo.models.utils import CACHE_NAME, output_cache

    model.eval()
    context = cfg.lengths[-1]
    ids = torch.tensor([maker.filler(random.Random(f"decode-{cfg.seed}"), context)])
    out = model(input_ids=ids, use_cache=True)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(cfg.decode_steps + 2):
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
        times.append(time.perf_counter() - start)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    return 1e3 * statistics.median(times[2:])


def saved_bytes_per_token(model, maker: TaskMaker, cfg: LeaderboardConfig) -> float:
    """Bytes of the distinct storages autograd saves for backward in one training forward at the training
    length (batch 1, parameters excluded), per token: the activation memory of training."""
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids, labels = collate([maker.text_sample(random.Random(f"memory-{cfg.seed}"), cfg.train_length)])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    del loss
    return sum(seen.values()) / cfg.train_length


def evaluate_quality(
    model, maker: TaskMaker, stream: torch.Tensor, cfg: LeaderboardConfig, label: str, bar=None
) -> dict:
    model.eval()
    result: dict = {"recall": {}, "passkey": {}, "passkey_by_depth": {}}
    for length in cfg.lengths:
        if bar is not None:
            bar.set_description_str(f"eval {label} at {length}", refresh=True)
        result["recall"][length] = evaluate_recall(model, maker, cfg, length)
        by_depth = evaluate_passkey(model, maker, cfg, length)
        result["passkey_by_depth"][length] = by_depth
        result["passkey"][length] = statistics.mean(by_depth.values())
        if bar is not None:
            bar.update(1)
    result["perplexity"] = evaluate_perplexity(model, stream, cfg)
    return result


# ------------------------------------------------------------------------------------------------ saving


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def save_model(model, tokenizer, folder: Path, entry: Entry, record: dict, cfg: LeaderboardConfig) -> Path:
    """``save_pretrained`` with the tokenizer and a model card, written beside and moved into place."""
    from zoo.hub.card import render_model_card

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metrics = {f"recall@{n}": v for n, v in record["quality"]["recall"].items()}
        metrics.update({f"passkey@{n}": v for n, v in record["quality"]["passkey"].items()})
        metrics.update({f"perplexity@{n}": v for n, v in record["quality"]["perplexity"].items()})
        metrics["train_tokens_per_s"] = record["cost"]["train_tokens_per_s"]
        training = (
            f"Trained by `python -m eval.leaderboard` for {record['steps']} steps of {cfg.batch_size} x "
            f"{cfg.train_length} tokens on the leaderboard mixture (text, MQAR, passkey), AdamW at lr "
            f"{record['lr']:g} (best of {cfg.lrs}), cosine schedule; see leaderboard.json beside the models."
        )
        card = render_model_card(
            entry.config,
            name=entry.name,
            num_parameters=entry.num_parameters,
            training=training,
            metrics=metrics,
        )
        card.save(tmp / "README.md")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------------ the whole run


def plan_steps(entries: list[Entry], maker: TaskMaker, cfg: LeaderboardConfig, bar=None) -> tuple[int, dict]:
    probes = {}
    for entry in entries:
        if bar is not None:
            bar.set_description_str(f"probe {entry.name}", refresh=True)
        probes[entry.name] = probe_step_time(entry, maker, cfg)
    if cfg.steps is not None:
        return cfg.steps, probes
    per_step = sum(probes.values()) * (1 + (len(cfg.lrs) - 1) * cfg.sweep_fraction)
    seconds = cfg.budget_minutes * 60 * cfg.train_share - 4 * sum(probes.values())
    return max(2, int(seconds / per_step)), probes


def run_leaderboard(
    cfg: LeaderboardConfig, out_dir: str | os.PathLike, argv: list[str] | None = None
) -> dict:
    import zoo  # noqa: F401
    from zoo.data.corpus import default_corpus
    from zoo.positional.rope_scaling import extend_context

    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = cfg.architectures or causal_architectures()
    entries = [parse_architecture(spec) for spec in names]
    causal = causal_architectures()
    unknown = [e.name for e in entries if e.model_type not in causal]
    if unknown:
        raise ValueError(f"not registered causal architectures: {unknown}; registered: {causal}")
    if len({e.name for e in entries}) != len(entries):
        raise ValueError(f"architectures listed twice: {names}")
    vocab = Vocab(cfg.num_keys, cfg.num_values)
    size_architectures(entries, cfg, vocab)  # config errors surface before anything is written
    from zoo.hub.card import render_model_card

    for entry in entries:  # and card templates, before any training
        render_model_card(entry.config, name=entry.name, num_parameters=entry.num_parameters)

    out = Path(out_dir)
    longest = cfg.lengths[-1]
    train_text = text_stream(default_corpus("train", max_files=cfg.corpus_max_files), 4 * longest)
    held_out = text_stream(
        default_corpus("validation", max_files=cfg.corpus_max_files)
        + default_corpus("test", max_files=cfg.corpus_max_files),
        2 * longest,
    )
    maker_train, maker_val = TaskMaker(vocab, train_text), TaskMaker(vocab, held_out)
    tokenizer = tokenizer_for(vocab)
    out.mkdir(parents=True, exist_ok=True)

    extensions = [(m, f) for m in cfg.extension_methods for f in cfg.extension_factors]
    result: dict = {
        "command": "python -m eval.leaderboard " + " ".join(argv or []),
        "config": asdict(cfg),
        "lengths": cfg.lengths,
        "vocab_size": vocab.size,
        "torch_threads": torch.get_num_threads(),
        "models": {},
    }
    with tqdm(total=None, disable=not cfg.progress, leave=False, unit="step") as bar:
        steps, probes = plan_steps(entries, maker_train, cfg, bar)
        rung = max(1, round(cfg.sweep_fraction * steps))
        train_total = len(entries) * (steps + (len(cfg.lrs) - 1) * rung if len(cfg.lrs) > 1 else steps)
        eval_total = sum(
            len(cfg.lengths) * (1 + (len(extensions) if _is_rotary(e.config) else 0)) for e in entries
        )
        bar.reset(total=train_total + eval_total)
        result["steps"] = steps
        result["tokens_per_model"] = steps * cfg.batch_size * cfg.train_length
        for entry in entries:
            run, sweep = train_entry(entry, maker_train, maker_val, cfg, steps, bar)
            model = run.model
            step_s = statistics.median(run.step_times[1:] or run.step_times)
            record = {
                "model_type": entry.model_type,
                "overrides": entry.overrides,
                "hidden_size": entry.hidden_size,
                "num_parameters": entry.num_parameters,
                "config": entry.config.to_diff_dict(),
                "lr": run.lr,
                "sweep": sweep,
                "steps": run.step,
                "losses": run.losses,
                "validation_loss": run.validation_loss,
                "probe_step_s": probes[entry.name],
            }
            record["quality"] = evaluate_quality(model, maker_val, held_out, cfg, entry.name, bar)
            bar.set_description_str(f"cost {entry.name}", refresh=True)
            record["cost"] = {
                "train_tokens_per_s": cfg.batch_size * cfg.train_length / step_s,
                "train_step_s_median": step_s,
                "decode_context": longest,
                "decode_ms_per_token": decode_ms_per_token(model, maker_val, cfg),
                "saved_for_backward_bytes_per_token": saved_bytes_per_token(model, maker_val, cfg),
            }
            record["extended"] = {}
            if _is_rotary(entry.config):
                for method, factor in extensions:
                    label = f"{method}x{factor}"
                    extended = extend_context(copy.deepcopy(model), method, factor)
                    record["extended"][label] = evaluate_quality(
                        extended, maker_val, held_out, cfg, f"{entry.name} +{label}", bar
                    )
            record["saved_to"] = str(
                save_model(
                    model, tokenizer, out / "models" / _slug(entry.name), entry, record, cfg
                ).relative_to(out)
            )
            result["models"][entry.name] = record
            _write_json(result, out / "leaderboard.json")
            del model, run
    result["wall_time_s"] = time.perf_counter() - started
    _write_json(result, out / "leaderboard.json")
    return result


def _is_rotary(config) -> bool:
    return getattr(config, "position_embedding_type", None) == "rope" and hasattr(config, "rope_parameters")


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
