"""The predictor interface the suite scores through, its Hugging Face implementation, and model loading.

A predictor answers two questions, batched:

- ``generate(prompts, max_new_tokens) -> list[str]``: greedy continuations (new text only);
- ``loglikelihood(contexts, continuations) -> list[(logprob, num_tokens)]``: the summed log-probability of each
  continuation after its context, and how many tokens it has.

Tests use doubles (an oracle that reads the answers, a random guesser); ``HFPredictor`` wraps any causal LM of
``transformers`` or zoo. Prompts are encoded without special tokens (the lengths of the suite count those tokens),
with the tokenizer's BOS token in front when it has one.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Protocol

import torch

import zoo  # noqa: F401  (registers zoo's architectures with the Auto classes)
from eval.tasks.base import encode
from zoo.data.tokenizer import default_tokenizer
from zoo.models.utils import CACHE_NAME, output_cache
from zoo.positional import extend_context, rope_parameters_for

logger = logging.getLogger(__name__)

# The prompt of the decoding self-check: ordinary text, so that any tokenizer encodes it.
SELF_CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


class DecodingCheckFailed(RuntimeError):
    """A model's cached decoding disagrees with its full forward: every generated answer would be garbage."""


class Predictor(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...

    def loglikelihood(self, contexts: list[str], continuations: list[str]) -> list[tuple[float, int]]: ...


class HFPredictor:
    """Batched greedy generation and log-likelihoods with a ``transformers`` causal LM.

    Generation pads on the left (as ``generate`` expects); log-likelihoods pad on the right, which leaves a causal
    model's logits at the real positions untouched, and ask only for the logits they score when the model accepts
    ``logits_to_keep``.
    """

    def __init__(self, model, tokenizer, batch_size: int = 4, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        add_bos = getattr(tokenizer, "add_bos_token", True)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and add_bos else []
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._caches = bool(getattr(model.config, "use_cache", False))

    def _context_ids(self, text: str) -> list[int]:
        return self.bos + encode(self.tokenizer, text)

    @torch.inference_mode()
    def check_decoding(
        self, prompt: str = SELF_CHECK_PROMPT, new_tokens: int = 8, rtol: float = 1e-3
    ) -> dict:
        """Checks, before anything is scored, that the paths the suite scores through agree with the full forward.

        On a short prompt: greedy ``generate()`` with the cache gives the tokens of greedy decoding by full
        forwards without one, and the logits of a cached prefill followed by one-token steps (the path of the
        multiple-choice scorer) are within ``rtol`` (relative, over all logits) of the full forward's. Raises
        :class:`DecodingCheckFailed` naming what differs; returns what was measured, for the results record.
        """
        if not self._caches:
            return {"checked": False, "reason": "the model's config has use_cache=False"}
        prompt_ids = torch.tensor([self._context_ids(prompt)], device=self.device)
        full_ids = prompt_ids
        for _ in range(new_tokens):
            logits = self.model(input_ids=full_ids, use_cache=False).logits[:, -1]
            full_ids = torch.cat([full_ids, logits.argmax(-1, keepdim=True)], dim=1)
        full_logits = self.model(input_ids=full_ids, use_cache=False).logits.float()
        generated = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.pad_id,
        )
        split = prompt_ids.shape[1]
        out = self.model(input_ids=full_ids[:, :split], use_cache=True)
        pieces, cache = [out.logits], output_cache(out)
        for t in range(split, full_ids.shape[1]):
            out = self.model(input_ids=full_ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache})
            pieces.append(out.logits)
            cache = output_cache(out)
        stepped = torch.cat(pieces, dim=1).float()
        error = ((stepped - full_logits).norm() / full_logits.norm().clamp_min(1e-30)).item()
        tokens_equal = generated.shape == full_ids.shape and bool((generated == full_ids).all())
        record = {"checked": True, "tokens_equal": tokens_equal, "logits_relative_error": error}
        if not tokens_equal or not error <= rtol:
            raise DecodingCheckFailed(
                f"{type(self.model).__name__}: cached decoding disagrees with the full forward "
                f"(generate() with the cache {'matches' if tokens_equal else 'differs from'} greedy full-forward "
                f"decoding: {generated[0, split:].tolist()} vs {full_ids[0, split:].tolist()}; logits of cached "
                f"one-token steps differ by {error:.2e} relative, limit {rtol:.0e}). Scores would reflect a "
                "broken decoding path, not the model; nothing was scored. Check that the model accepts the "
                f"cache as {CACHE_NAME!r} (the installed transformers' name)."
            )
        return record

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        encoded = [self._context_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            generated = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
            for row, i in enumerate(batch):
                new = generated[row, width:].tolist()
                outputs[i] = self.tokenizer.decode(new, skip_special_tokens=True)
        return outputs

    @torch.inference_mode()
    def loglikelihood(self, contexts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        requests = self._requests(contexts, continuations)
        results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
        # Several continuations of one long context (multiple choice): read the context once, then score every
        # continuation from a copy of the model's cache.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if cont:
                groups.setdefault(tuple(ctx), []).append(i)
        rest = []
        for members in groups.values():
            if len(members) > 1 and self._caches:
                for i, value in zip(members, self._shared_context([requests[i] for i in members])):
                    results[i] = value
            else:
                rest.extend(members)
        for i, value in zip(rest, self._independent([requests[i] for i in rest])):
            results[i] = value
        return results

    def _requests(self, contexts, continuations):
        requests = []
        for context, continuation in zip(contexts, continuations, strict=True):
            ctx, cont = self._context_ids(context), encode(self.tokenizer, continuation)
            if not ctx:  # nothing to condition the first token on: use the pad token as a stand-in
                ctx = [self.pad_id]
            requests.append((ctx, cont))
        return requests

    def _shared_context(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        ctx = requests[0][0]
        kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(input_ids=torch.tensor([ctx], device=self.device), use_cache=True, **kwargs)
        first = torch.log_softmax(
            out.logits[0, -1].float(), dim=-1
        )  # predicts each continuation's first token
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            cache = copy.deepcopy(output_cache(out))
            cache.batch_repeat_interleave(len(batch))
            width = max(len(cont) - 1 for _, cont in batch)
            logprobs = None
            if width > 0:
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), len(ctx) + width), dtype=torch.long)
                mask[:, : len(ctx)] = 1
                for row, (_, cont) in enumerate(batch):
                    ids[row, : len(cont) - 1] = torch.tensor(cont[:-1])
                    mask[row, len(ctx) : len(ctx) + len(cont) - 1] = 1
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=True,
                    **{CACHE_NAME: cache},
                ).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, width, V)
            for row, (_, cont) in enumerate(batch):
                total = first[cont[0]].item()
                if len(cont) > 1:
                    positions = torch.arange(len(cont) - 1, device=self.device)
                    targets = torch.tensor(cont[1:], device=self.device)
                    total += logprobs[row, positions, targets].sum().item()
                results.append((total, len(cont)))
        return results

    def _independent(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        for start in range(0, len(order), self.batch_size):
            batch = [i for i in order[start : start + self.batch_size] if requests[i][1]]
            if not batch:
                continue
            # inputs are context + continuation minus its last token; position t predicts token t + 1
            inputs = [requests[i][0] + requests[i][1][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            first = min(len(requests[i][0]) - 1 for i in batch)
            kwargs = {}
            if self._keeps_logits:
                kwargs["logits_to_keep"] = torch.arange(first, width, device=self.device)
            else:
                first = 0
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, kept positions, V)
            for row, i in enumerate(batch):
                ctx, cont = requests[i]
                positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont)) - first
                targets = torch.tensor(cont)
                total = logprobs[row, positions.to(self.device), targets.to(self.device)].sum().item()
                results[i] = (total, len(cont))
        return results


def parse_rope_scaling(spec: str) -> tuple[str, float]:
    """``"yarn:4"`` -> ("yarn", 4.0)."""
    method, sep, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = float("nan")
    if not sep or not method or not value > 0:
        raise ValueError(f"--rope-scaling={spec!r} must look like METHOD:FACTOR with FACTOR > 0, e.g. yarn:4")
    return method.lower(), value


def load_tokenizer(path: str):
    """The model's tokenizer; for a checkpoint saved without one, zoo's default byte-level tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("No tokenizer at %s (%s); using zoo's default byte-level tokenizer", path, err)
    return default_tokenizer()


def load_model(path: str, device: str = "cpu", rope_scaling: str | None = None):
    """``(model, tokenizer)`` for any zoo or transformers causal LM, RoPE rescaled if ``rope_scaling`` is given.

    The scaling goes through ``zoo.positional.extend_context`` when the model has zoo's rotary modules;
    otherwise (a transformers model) the model is loaded with the equivalent ``rope_parameters``
    (``zoo.positional.rope_parameters_for``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if rope_scaling:
        method, factor = parse_rope_scaling(rope_scaling)
        try:
            model = extend_context(model, method, factor) or model
        except ValueError as err:
            logger.info("extend_context does not apply (%s); loading with rope_parameters instead", err)
            params = rope_parameters_for(AutoConfig.from_pretrained(path), method, factor)
            model = AutoModelForCausalLM.from_pretrained(path, rope_parameters=params)
    return model.to(device).eval(), tokenizer
