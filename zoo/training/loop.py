"""The training loop: a recipe in, a trained model folder out, on one process or many under ``accelerate launch``.

Plain code, top to bottom, in :func:`train`:

1. check, writing nothing: the output folder can be made, ``Accelerator``, seed, tokenizer, model (vocabulary,
   position limits, LoRA), the greedy-sample prompt, the packed data and the checkpoint to resume from; any
   problem stops the run here, before the output folder or ``recipe.yaml`` exists;
2. set up: output folder, ``recipe.yaml``, optimizer and schedule, ``accelerator.prepare``, trackers; resume from
   the newest complete checkpoint (``checkpointing.resume: auto``), restoring weights, optimizer, schedule, RNG
   states and the step; the data order is a pure function of the step (:class:`BlockSampler`);
3. loop over optimizer steps: ``grad_accum`` micro-batches under ``Accelerator.accumulate`` (cut to the length of
   the ``training.curriculum`` stage; masked for ``training.objective: mlm``), a finite-loss check before every
   backward, clipping, logging, periodic evaluation and atomic checkpoints;
4. evaluate, save the final model, print a greedy sample (causal models; every process takes part when the
   parameters are sharded), the validation loss and a summary; push to the Hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed, str_to_bool
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from zoo.training.allocator import keep_freed_memory
from zoo.training.checkpoint import CheckpointManager
from zoo.training.data import (
    BlockSampler,
    check_curriculum_targets,
    eval_batches,
    get_batch,
    load_text_splits,
    packed_dataset,
)
from zoo.training.export import save_final
from zoo.training.mlm import Masker, batch_seed
from zoo.training.modeling import build_model, build_tokenizer, count_parameters
from zoo.training.optim import build_optimizer, build_scheduler
from zoo.training.recipe import Recipe, RecipeError, curriculum_length

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainState:
    """What a checkpoint needs beyond model/optimizer/scheduler/RNG: the position in the data stream."""

    step: int = 0
    tokens: int = 0
    num_rows: int = 0
    seed: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.num_rows, self.seed = state.get("num_rows", 0), state.get("seed", 0)


@dataclass
class Hooks:
    """Test and debugging hooks. ``on_loss(step, micro, loss) -> loss`` may replace a micro-batch's loss (fault
    injection); ``on_step_end(step)`` runs after every optimizer step, after any checkpoint."""

    on_loss: Callable | None = None
    on_step_end: Callable | None = None


def resolve_mixed_precision(value: str) -> str | None:
    """``auto``: what ``accelerate launch`` was configured with if anything but ``no``, else bf16 on GPUs that
    support it, fp16 on other GPUs and fp32 on CPU."""
    if value != "auto":
        return value
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return None
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def check_output_dir(path: Path) -> None:
    """Fail, creating nothing, when ``path`` cannot become a writable folder: its nearest existing ancestor
    must be a writable folder."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{str(existing)!r} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{str(existing)!r} is not writable"
    else:
        return
    raise RecipeError(f"training.output_dir: cannot write to {str(path)!r}: {problem}")


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RecipeError(f"training.output_dir: cannot write to {str(path)!r}: {err}") from None


def enable_fsdp_on_cpu() -> None:
    """Let an FSDP2 launch (``configs/accelerate/fsdp_cpu.yaml``) shard on a machine without an accelerator.

    accelerate turns ``distributed_type: FSDP`` into FSDP only on accelerator devices; on a CPU its torchrun
    workers become a plain gloo group (MULTI_CPU) and would train unsharded, as DDP. torch's FSDP2 (``fully_shard``)
    runs over gloo, so the group is relabelled as multi-device before the ``Accelerator`` reads it, which makes
    accelerate shard the model. FSDP1 is left to accelerate (it trains data-parallel), with a warning.
    """
    if torch.accelerator.is_available() or not str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        logger.warning("FSDP1 does not shard on a CPU; training data-parallel. Use fsdp_version: 2 to shard.")
        return
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def params_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the parameters, so that every forward is a collective."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


def _flat_hparams(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, name + "/"))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def unigram_entropy(dataset, max_rows: int = 4096) -> float:
    """Entropy (nats/token) of the predicted tokens (labels) of the training data: the loss of a model that
    ignores context, which a model that learned anything beats."""
    rows = dataset.with_format("numpy")[: min(len(dataset), max_rows)]["labels"]
    labels = np.asarray(rows).reshape(-1)
    counts = np.bincount(labels[labels >= 0]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def evaluate(
    accelerator,
    model,
    dataset,
    batch_size: int,
    max_batches: int,
    masker: Masker | None = None,
    seed: int = 0,
) -> dict:
    """Token-weighted mean validation loss over the first ``max_batches`` batches, and its perplexity. With a
    ``masker`` (the MLM objective) each batch is masked the same way at every evaluation (drawn from ``seed`` and
    its first row), and the loss is over the masked tokens."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    batches = eval_batches(
        len(dataset), batch_size, max_batches, accelerator.num_processes, accelerator.process_index
    )
    for indices in batches:
        batch = get_batch(dataset, indices, accelerator.device)
        if masker is not None:
            batch = masker(batch, batch_seed(seed, -1, indices[0]))
        loss = model(**batch).loss
        # causal models shift the labels inside; masked LMs predict every labelled position
        n = (batch["labels"][:, 1:] != -100).sum() if masker is None else (batch["labels"] != -100).sum()
        totals += torch.stack([loss.double() * n, n.double()])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    val_loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


def check_sample_prompt(recipe: Recipe, tokenizer, config) -> None:
    """The final greedy sample must be able to run: a prompt of at least one token, and for a learned position
    table, prompt plus new tokens within ``max_position_embeddings``."""
    prompt, new_tokens = recipe.logging.sample_prompt, recipe.logging.sample_tokens
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n == 0:
        raise RecipeError(
            f"logging.sample_prompt: {prompt!r} encodes to no tokens; give some text, e.g. 'The '"
        )
    if getattr(config, "position_embedding_type", None) == "learned":
        limit = config.max_position_embeddings
        if n + new_tokens > limit:
            raise RecipeError(
                f"logging.sample_tokens: the prompt {prompt!r} ({n} tokens) plus {new_tokens} new tokens"
                f" need {n + new_tokens} positions, past model.max_position_embeddings = {limit} of the learned"
                f" position table; use logging.sample_tokens <= {limit - n}"
            )


def greedy_sample(accelerator, model, tokenizer, prompt: str, new_tokens: int) -> str:
    """The greedy continuation of ``prompt``. With sharded parameters call it on every process: each forward
    gathers the weights from all of them, and ``synced_gpus`` keeps them stepping until the longest is done."""
    sharded = params_sharded(accelerator)
    model = accelerator.unwrap_model(model, keep_torch_compile=False)
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=sharded,
        )
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def _check_finite(accelerator, value: torch.Tensor, what: str, step: int, ckpt: CheckpointManager) -> None:
    finite = torch.isfinite(value.detach().float()).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite).all().reshape(1)
    if not bool(finite):
        last = ckpt.latest()
        raise TrainingDiverged(
            f"{what} is not finite ({value.item()}) at step {step + 1}; stopping without saving."
            f" Last good checkpoint: {str(last) if last else 'none'}."
            " Try a lower optim.lr, more schedule.warmup_steps or optim.max_grad_norm."
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from, so no step appears twice."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def randomized_batch_positions(position_ids, max_position, seed, step, micro, rank, attention_mask=None):
    """Randomized positions for one micro-batch, a pure function of (seed, step, micro-step, rank) so that a
    resumed run draws the same ones. With an ``attention_mask`` (per-document blocks: a document, then padding)
    each document's positions are drawn for its own tokens, and the padding goes on from the last of them."""
    from zoo.positional import randomize_packed_positions

    generator = torch.Generator().manual_seed(hash((seed, step, micro, rank)) % (2**63))
    positions = position_ids.cpu()
    if attention_mask is None:
        out = randomize_packed_positions(positions, max_position, generator=generator)
        return out.to(position_ids.device)
    real = attention_mask.cpu().bool()
    after = (~real).long().cumsum(-1)  # 1, 2, ... along the padding
    # drawn with the padding as a document of its own, so that it does not stretch the document before it
    drawn = torch.where(real, positions, after - 1)
    drawn = randomize_packed_positions(drawn, max_position, generator=generator)
    last = drawn.masked_fill(~real, 0).amax(-1, keepdim=True)
    cap = max(max_position, positions.shape[-1]) - 1
    out = torch.where(real, drawn, (last + after).clamp(max=cap))
    return out.to(position_ids.device)


def train(recipe: Recipe, hooks: Hooks | None = None) -> dict:
    """Run ``recipe`` to the end and return its final metrics."""
    hooks = hooks or Hooks()
    cfg = recipe.training
    output_dir = Path(cfg.output_dir)

    # 1. check: every problem with the recipe or its inputs stops the run here, before anything is written
    check_output_dir(output_dir)
    enable_fsdp_on_cpu()
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            log_with="tensorboard" if recipe.logging.tensorboard else None,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
            ),
            step_scheduler_with_optimizer=False,
            # Without an accelerator, processes started by torchrun (accelerate's multi-process launcher)
            # must still form a gloo group on the CPU rather than each training alone.
            cpu=not torch.accelerator.is_available(),
        )
    except ValueError as err:
        raise RecipeError(f"training.mixed_precision: {err}") from None
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    # The MLM objective masks every batch; an encoder has no greedy sample to print at the end.
    masker = Masker(tokenizer, cfg.mlm_probability) if cfg.objective == "mlm" else None
    if masker is None:
        check_sample_prompt(recipe, tokenizer, model.config)
    arch = type(model).__name__
    total_params, trainable_params = count_parameters(model)
    with accelerator.main_process_first():
        train_text, val_text = load_text_splits(recipe.data, cfg.seed)
        mlm = masker is not None
        train_data = packed_dataset(train_text, tokenizer, cfg.block_size, recipe.data, "train", mlm)
        val_data = packed_dataset(val_text, tokenizer, cfg.block_size, recipe.data, "validation", mlm)
    check_curriculum_targets(train_data, cfg, recipe.data)
    ckpt = CheckpointManager(output_dir / "checkpoints", recipe.checkpointing.keep_last)
    try:
        resume_from = ckpt.resolve_resume(recipe.checkpointing.resume)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if recipe.checkpointing.resume == "none" and ckpt.latest() is not None:
        raise RecipeError(
            f"checkpointing.resume: none, but {str(ckpt.root)!r} holds checkpoints of an earlier run;"
            " use resume=auto to continue it or another --output_dir"
        )

    # 2. set up, and resume
    if cfg.keep_freed_memory and keep_freed_memory() is None:
        accelerator.print("training.keep_freed_memory: this C library has no mallopt; the allocator is left as is")
    prepare_output_dir(output_dir)
    if main:
        recipe.save(output_dir / "recipe.yaml")
    if cfg.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, cfg.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState(num_rows=len(train_data), seed=cfg.seed)
    accelerator.register_for_checkpointing(state)
    if recipe.logging.tensorboard:
        accelerator.init_trackers("zoo", config=_flat_hparams(recipe.to_dict()))
    if main:
        ckpt.remove_incomplete()
    accelerator.wait_for_everyone()
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if state.num_rows != len(train_data) or state.seed != cfg.seed:
            logger.warning(
                "the training data or seed changed since %s; the data order will differ", resume_from
            )
            state.num_rows, state.seed = len(train_data), cfg.seed
        accelerator.print(f"resumed from {resume_from} at step {state.step}")

    accelerator.print(
        f"model: {arch}, {total_params / 1e6:.2f}M parameters"
        f" ({trainable_params / 1e6:.2f}M trainable); data: {len(train_data)} train / {len(val_data)} validation"
        f" blocks of {cfg.block_size} tokens; {accelerator.num_processes} process(es) on {accelerator.device}"
    )

    # 3. train
    sampler = BlockSampler(
        len(train_data), cfg.batch_size, cfg.grad_accum, accelerator.num_processes, cfg.seed
    )
    eval_batch_size = recipe.eval.batch_size or cfg.batch_size
    metrics_file = output_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_file, state.step)
    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        disable=not (main and recipe.logging.progress_bar),
        desc="train",
        dynamic_ncols=True,
    )
    window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    run_start, start_step = time.perf_counter(), state.step
    last_log: dict = {}
    model.train()
    while state.step < cfg.max_steps:
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        grad_norm = None
        length = curriculum_length(cfg, state.step)
        for micro in range(cfg.grad_accum):
            batch = get_batch(
                train_data, sampler.indices(state.step, micro, accelerator.process_index), accelerator.device
            )
            if length < cfg.block_size:
                batch = {key: value[:, :length] for key, value in batch.items()}
            if masker is not None:
                batch = masker(batch, batch_seed(cfg.seed, state.step, micro, accelerator.process_index))
            elif cfg.randomized_positions:
                batch["position_ids"] = randomized_batch_positions(
                    batch["position_ids"],
                    cfg.randomized_positions,
                    cfg.seed,
                    state.step,
                    micro,
                    accelerator.process_index,
                    batch.get("attention_mask"),
                )
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if hooks.on_loss is not None:
                    loss = hooks.on_loss(state.step, micro, loss)
                _check_finite(accelerator, loss, "the training loss", state.step, ckpt)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.optim.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.max_grad_norm)
                    # FSDP2 reports the norm as a DTensor; every process takes part in making it a plain one.
                    if isinstance(grad_norm, DTensor):
                        grad_norm = grad_norm.full_tensor()
                    # DeepSpeed clips inside its engine and reports no norm.
                    if grad_norm is not None:
                        _check_finite(accelerator, grad_norm, "the gradient norm", state.step, ckpt)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().double() / cfg.grad_accum
            window_tokens += batch["input_ids"].numel() * accelerator.num_processes
        state.step += 1
        state.tokens += cfg.batch_size * length * cfg.grad_accum * accelerator.num_processes
        window_loss += step_loss
        window_steps += 1
        bar.update(1)

        if state.step % recipe.logging.every == 0 or state.step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            last_log = {
                "train/loss": (accelerator.reduce(window_loss, reduction="mean") / window_steps).item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": window_tokens / max(elapsed, 1e-9),
                "train/epoch": sampler.epoch(state.step),
            }
            if grad_norm is not None:
                last_log["train/grad_norm"] = float(grad_norm)
            accelerator.log(last_log, step=state.step)
            if main:
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps({"step": state.step, **last_log}) + "\n")
            bar.set_postfix(
                loss=f"{last_log['train/loss']:.4f}",
                lr=f"{last_log['train/lr']:.2e}",
                tok_s=f"{last_log['train/tokens_per_s']:.0f}",
            )
            window_loss.zero_()
            window_steps, window_tokens, window_start = 0, 0, time.perf_counter()

        if recipe.eval.every and state.step % recipe.eval.every == 0 and state.step < cfg.max_steps:
            result = evaluate(
                accelerator, model, val_data, eval_batch_size, recipe.eval.max_batches, masker, cfg.seed
            )
            accelerator.log(
                {"eval/loss": result["val_loss"], "eval/perplexity": result["val_perplexity"]},
                step=state.step,
            )
            if main:
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps({"step": state.step, **result}) + "\n")
            bar.write(
                f"step {state.step}: val_loss {result['val_loss']:.4f}, perplexity {result['val_perplexity']:.2f}"
            )

        if recipe.checkpointing.every and state.step % recipe.checkpointing.every == 0:
            ckpt.save(accelerator, state.step, {"tokens": state.tokens})
        if hooks.on_step_end is not None:
            hooks.on_step_end(state.step)
    bar.close()

    # 4. finish
    result = evaluate(
        accelerator, model, val_data, eval_batch_size, recipe.eval.max_batches, masker, cfg.seed
    )
    accelerator.log(
        {"eval/loss": result["val_loss"], "eval/perplexity": result["val_perplexity"]}, step=state.step
    )
    seconds = time.perf_counter() - run_start
    metrics = {
        "steps": state.step,
        "tokens": state.tokens,
        "train_loss": last_log.get("train/loss", float("nan")),
        **result,
        "unigram_entropy": unigram_entropy(train_data),
        "train_seconds": seconds,
        "num_processes": accelerator.num_processes,
        "parameters": total_params,
    }
    save_final(accelerator, model, tokenizer, recipe, metrics)
    if masker is None and (main or params_sharded(accelerator)):
        sample = greedy_sample(
            accelerator, model, tokenizer, recipe.logging.sample_prompt, recipe.logging.sample_tokens
        )
    if main:
        steps_run = state.step - start_step
        if masker is None:
            print(f"sample (greedy): {recipe.logging.sample_prompt!r} -> {sample!r}")
        print(
            f"validation loss {metrics['val_loss']:.4f} nats/token (perplexity {metrics['val_perplexity']:.2f});"
            f" unigram entropy of the training tokens {metrics['unigram_entropy']:.4f} nats/token"
        )
        print(
            f"done: {state.step} steps ({steps_run} this run) in {seconds:.1f}s,"
            f" {state.tokens / 1e6:.2f}M tokens, train loss {metrics['train_loss']:.4f},"
            f" val loss {metrics['val_loss']:.4f}; model saved to {output_dir}"
        )
    if recipe.hub.push and main:
        from zoo.training.push import push_folder

        print(f"pushed to {push_folder(output_dir, recipe.hub)}")
    # Last: besides closing the trackers this tears down the process group.
    accelerator.end_training()
    return metrics
