"""Training data: from a recipe's ``data`` section to packed blocks, and which blocks each step reads.

1. :func:`load_text_splits` turns a source spec into ``datasets.Dataset`` objects with a text column:
   ``default`` (zoo's embedded corpus), ``synthetic:<task>``, a local text/json/jsonl/parquet file or folder, or a
   Hub dataset name.
2. :func:`packed_dataset` tokenises and packs them with ``zoo.data.packing.make_packed_dataset`` (rows of
   ``block_size`` tokens, ``position_ids`` restarting at every document, ``labels`` -100 at document starts;
   documents end to end, or each starting a new row with ``data.packing: per_document``; with
   ``data.loss: answer_only``, labels only on each document's answer), and caches the result on disk keyed by the
   data, the tokenizer, the block size and the packing. :func:`check_curriculum_targets` makes sure no curriculum
   stage cuts every target out of a block.
3. :class:`BlockSampler` decides which rows every process reads at every micro-step as a pure function of
   (seed, step), so that a resumed run continues with exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch

from zoo.training.recipe import DataConfig, RecipeError, is_local_path

logger = logging.getLogger(__name__)

BATCH_COLUMNS = ("input_ids", "position_ids", "labels", "attention_mask")
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_files(path: Path, cfg: DataConfig, where: str) -> datasets.Dataset:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS)
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) != 1:
        raise RecipeError(f"{where}: folder {str(path)!r} mixes file types {sorted(builders)}; use one kind")
    builder = builders.pop()
    kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    except Exception as err:
        raise RecipeError(f"{where}: could not read {str(path)!r}: {err}") from None


def _load_source(spec: str, cfg: DataConfig, seed: int, where: str) -> datasets.DatasetDict:
    """A DatasetDict with at least ``train``; ``validation`` when the source has one."""
    if spec == "default":
        from zoo.data.corpus import default_corpus_dataset

        return default_corpus_dataset()
    if spec.startswith("synthetic:"):
        from zoo.data.synthetic import synthetic_dataset

        kwargs = dict(cfg.synthetic)
        n = kwargs.pop("n", 2000)
        n_val = kwargs.pop("n_validation", max(n // 20, 16))
        name = spec.split(":", 1)[1]
        kwargs["answer_spans"] = cfg.loss == "answer_only"
        return datasets.DatasetDict(
            train=synthetic_dataset(name, n=n, seed=seed, **kwargs),
            validation=synthetic_dataset(name, n=n_val, seed=seed + 1_000_003, **kwargs),
        )
    path = Path(spec).expanduser()
    if path.exists():
        return datasets.DatasetDict(train=_load_files(path, cfg, where))
    if not spec.startswith("hf:") and is_local_path(spec, Path(".")):
        raise RecipeError(f"{where}: no such file or folder {spec!r} (a Hub dataset is written hf:<name>)")
    name = spec.removeprefix("hf:")
    try:
        loaded = datasets.load_dataset(name, cfg.hf_config)
    except Exception as err:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: only cached Hub datasets load)" if offline else ""
        raise RecipeError(f"{where}: could not load Hub dataset {name!r}{hint}: {err}") from None
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise RecipeError(f"{where}: Hub dataset {name!r} has no train split")
    return loaded


def load_text_splits(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and validation text datasets of a recipe."""
    source = _load_source(cfg.train, cfg, seed, "data.train")
    train = source["train"]
    if cfg.validation is not None:
        other = _load_source(cfg.validation, cfg, seed, "data.validation")
        validation = other["validation"] if "validation" in other else other["train"]
    elif "validation" in source:
        validation = source["validation"]
    else:
        if len(train) < 2:
            raise RecipeError(
                f"data.train: {cfg.train!r} has {len(train)} document(s); need 2+ to hold one out"
            )
        split = train.train_test_split(test_size=cfg.validation_fraction, seed=seed, shuffle=True)
        train, validation = split["train"], split["test"]
    for where, ds in (("data.train", train), ("data.validation", validation)):
        if cfg.text_column not in ds.column_names:
            raise RecipeError(
                f"data.text_column: {cfg.text_column!r} is not a column of {where} (columns: {ds.column_names})"
            )
    return train, validation


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, special]).encode()).hexdigest()


def _cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return Path(datasets.config.HF_DATASETS_CACHE) / "zoo-packed"


def packed_dataset(
    text: datasets.Dataset,
    tokenizer,
    block_size: int,
    cfg: DataConfig,
    label: str,
    attention_mask: bool = False,
):
    """Tokenise and pack ``text`` into rows of ``block_size`` tokens, from the on-disk cache when possible;
    ``cfg.packing: per_document`` starts every document in a new row (a right-padded row, which always has the
    ``attention_mask`` column); ``attention_mask`` adds that column (0 on padding) to any packing, for encoders.

    Call on the main process first (``accelerator.main_process_first()``) so the others read the cache.
    """
    from zoo.data import packing

    key_parts = {
        "data": text._fingerprint,
        "rows": len(text),
        "column": cfg.text_column,
        "tokenizer": _tokenizer_digest(tokenizer),
        "block_size": block_size,
        "one_per_block": cfg.packing == "per_document",
        "attention_mask": attention_mask,
        "answer_only": cfg.loss == "answer_only",
        "packing": hashlib.sha256(inspect.getsource(packing).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = _cache_root(cfg) / f"{label}-{key}"
    if (path / "dataset_info.json").exists():
        try:
            return datasets.load_from_disk(str(path))
        except Exception as err:  # a corrupt cache is rebuilt, never fatal
            logger.warning("packed-data cache %s unreadable (%s); rebuilding", path, err)
            shutil.rmtree(path, ignore_errors=True)
    try:
        packed = packing.make_packed_dataset(
            text,
            tokenizer,
            block_size,
            text_column=cfg.text_column,
            one_per_block=cfg.packing == "per_document",
            attention_mask=attention_mask,
            answer_only=cfg.loss == "answer_only",
        )
    except ValueError as err:
        if cfg.loss != "answer_only":
            raise
        raise RecipeError(f"data.loss: answer_only: {err}") from None
    packed = packed.select_columns([c for c in BATCH_COLUMNS if c in packed.column_names])
    if len(packed) == 0:
        raise RecipeError(f"data: the {label} split packs into 0 blocks of {block_size} tokens; add data")
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        datasets.disable_progress_bars()
        try:
            packed.save_to_disk(str(tmp))
        finally:
            datasets.enable_progress_bars()
        try:
            tmp.rename(path)
        except OSError:  # another run filled the same cache entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(path))
    except OSError as err:
        logger.warning("could not cache packed data at %s (%s); continuing uncached", path, err)
        shutil.rmtree(tmp, ignore_errors=True)
        return packed


def check_curriculum_targets(dataset: datasets.Dataset, training, cfg: DataConfig) -> None:
    """With ``data.loss: answer_only`` a block's targets can all lie past a curriculum stage's length, and a batch
    of such blocks has no loss at all: refuse a stage that cuts every target out of any training block."""
    if cfg.loss != "answer_only" or not training.curriculum:
        return
    shortest = min(length for _, length in training.curriculum)
    labels = torch.as_tensor(np.asarray(dataset.with_format("numpy")["labels"]))
    first = (labels != -100).long().argmax(-1)  # every block has a target (the others were dropped)
    cut = int((first >= shortest).sum())
    if cut:
        raise RecipeError(
            f"training.curriculum: a stage of {shortest} tokens cuts every answer out of {cut} of {len(labels)}"
            f" training blocks (data.loss: answer_only; the latest answer starts at token {int(first.max())}),"
            f" leaving them nothing to learn; make the documents shorter than {shortest} tokens or start the"
            " curriculum longer"
        )


class BlockSampler:
    """Row indices for (optimizer step, micro-step, process) — deterministic, so resuming needs only the step.

    The rows form an endless stream: epoch ``e`` is a permutation of all rows drawn from ``seed`` and ``e``.
    Optimizer step ``s`` consumes ``batch_size * grad_accum * num_processes`` consecutive stream positions;
    within it, micro-step ``m`` of process ``r`` reads slot ``m * num_processes + r``. One process with
    ``grad_accum=2`` therefore reads exactly what two processes with ``grad_accum=1`` read together.
    """

    def __init__(self, num_rows: int, batch_size: int, grad_accum: int, num_processes: int, seed: int):
        self.num_rows, self.batch_size, self.grad_accum = num_rows, batch_size, grad_accum
        self.num_processes, self.seed = num_processes, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=generator)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        slot = (step * self.grad_accum + micro) * self.num_processes + rank
        start = slot * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(int(self._permutation(pos // self.num_rows)[pos % self.num_rows]))
        return out

    def epoch(self, step: int) -> float:
        return step * self.batch_size * self.grad_accum * self.num_processes / self.num_rows


def get_batch(dataset: datasets.Dataset, indices: list[int], device) -> dict[str, torch.Tensor]:
    rows = dataset[indices]
    return {k: torch.as_tensor(rows[k], dtype=torch.long).to(device) for k in BATCH_COLUMNS if k in rows}


def eval_batches(num_rows: int, batch_size: int, max_batches: int, num_processes: int, rank: int):
    """Row indices of this process's validation batches: the first ``max_batches`` batches (0 = all), in
    order, dealt round-robin; every process gets the same number (wrapping around) so collectives line up."""
    available = max((num_rows + batch_size - 1) // batch_size, 1)
    n = available if max_batches == 0 else min(max_batches, available)
    n = max(n // num_processes, 1) * num_processes
    for b in range(rank, n, num_processes):
        start = (b % available) * batch_size
        yield [i % num_rows for i in range(start, min(start + batch_size, num_rows))]
