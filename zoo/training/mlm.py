"""The masked-language-modelling objective (``training.objective: mlm``) for encoders: BERT's masking (Devlin et al.,
2019, arXiv:1810.04805) of a packed block.

Of the tokens that are neither special (pad, eos, bos, mask, ...) nor padding, each is chosen with probability
``training.mlm_probability`` (15%); a chosen token becomes the mask token 80% of the time, a random token 10%, and
stays itself 10%. The labels are the original ids at the chosen positions and -100 elsewhere, with no shift: the
model predicts each chosen token from the whole block, both sides. The draw is transformers'
``DataCollatorForLanguageModeling``; zoo gives it a generator seeded from (seed, step, micro-step, process) for every
batch, so that a resumed run masks exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling

from zoo.training.recipe import RecipeError

MASK_TOKEN = "<mask>"


def ensure_mask_token(tokenizer) -> int:
    """The tokenizer's mask token id, adding ``<mask>`` as a new special token when it has none: it takes the next
    free id (259 for zoo's byte tokenizer), so every existing id keeps its meaning."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer.mask_token_id


class Masker:
    """Masks batches of packed blocks for the MLM objective; see the module docstring."""

    def __init__(self, tokenizer, probability: float):
        if tokenizer.mask_token is None:
            raise RecipeError(
                "training.objective: mlm needs a tokenizer with a mask token (see ensure_mask_token)"
            )
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` / ``labels`` of a masked batch, drawn from ``seed`` only."""
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = input_ids.cpu()
        keep = torch.isin(ids, self.special_ids) | (attention_mask.cpu() == 0)
        self.collator.generator = torch.Generator().manual_seed(seed)
        inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=keep)
        device = input_ids.device
        return {"input_ids": inputs.to(device), "attention_mask": attention_mask, "labels": labels.to(device)}


def batch_seed(*parts: int) -> int:
    """A generator seed from integers (Python hashes tuples of ints the same in every process and run)."""
    return hash(tuple(parts)) % (2**63)
