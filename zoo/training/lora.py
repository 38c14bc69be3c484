"""LoRA fine-tuning with peft (Hu et al., 2021, arXiv:2106.09685): wrap, and merge for the final save.

Default target modules: zoo architectures register theirs (``zoo.models.default_lora_targets``); for the
transformers architectures in peft's own table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) peft
chooses; anything else gets peft's ``"all-linear"``.
"""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from zoo.training.recipe import FinetuneConfig, RecipeError

logger = logging.getLogger(__name__)


def default_target_modules(model) -> list[str] | str | None:
    """The modules to adapt when ``finetune.target_modules`` is null; None leaves the choice to peft."""
    model_type = model.config.model_type
    try:
        from zoo.models import default_lora_targets

        return default_lora_targets(model_type)
    except (ImportError, ValueError):
        pass
    return None if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING else "all-linear"


def apply_lora(model, cfg: FinetuneConfig) -> PeftModel:
    targets = cfg.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        key = "finetune.target_modules" if "target modules" in str(err).lower() else "finetune"
        raise RecipeError(f"{key}: peft refused the LoRA settings: {err}") from None
    logger.info("LoRA on %s", peft_model.peft_config["default"].target_modules)
    return peft_model


def merged_copy(peft_model: PeftModel):
    """The base model with the adapter folded into its weights (the PeftModel itself is left intact)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
