"""LoRA fine-tuning with peft (Hu et al., 2021, arXiv:2106.09685): wrap, and merge for the final save.

Default target modules come from the architecture: zoo models register theirs (``zoo.models.default_lora_targets``),
transformers' Llama-family names are listed here, and anything else gets peft's ``"all-linear"``.
"""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model

from zoo.training.recipe import FinetuneConfig, RecipeError

logger = logging.getLogger(__name__)

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# model_type -> modules to adapt, for architectures that zoo's registry does not describe.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "zoo_transformer": _LLAMA_STYLE,
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def default_target_modules(model) -> list[str] | str:
    model_type = model.config.model_type
    try:
        from zoo.models import default_lora_targets

        return default_lora_targets(model_type)
    except (ImportError, ValueError):
        pass
    return DEFAULT_TARGETS.get(model_type, "all-linear")


def apply_lora(model, cfg: FinetuneConfig) -> PeftModel:
    targets = cfg.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise RecipeError(f"finetune.target_modules: {err}") from None
    logger.info("LoRA on %s", targets)
    return peft_model


def merged_copy(peft_model: PeftModel):
    """The base model with the adapter folded into its weights (the PeftModel itself is left intact)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
