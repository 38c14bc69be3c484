"""The final save of a run: a folder that ``AutoModelForCausalLM.from_pretrained`` loads after ``import zoo``.

``output_dir/`` receives ``config.json`` + ``model.safetensors`` (for LoRA runs: the merged model, and the adapter
alone under ``adapter/``), the tokenizer files, ``recipe.yaml``, ``metrics.json`` and a model card ``README.md``.
Everything is written to a staging folder first and moved into place file by file, so an interrupted final save
never leaves a half-written ``model.safetensors`` over a good one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from zoo.training.recipe import Recipe

logger = logging.getLogger(__name__)


def write_card(folder: Path, recipe: Recipe, metrics: dict) -> None:
    """``zoo.hub.card.write_model_card`` when the hub package provides it, else a minimal card."""
    try:
        from zoo.hub.card import write_model_card

        write_model_card(folder, recipe, metrics)
        return
    except ImportError:
        pass
    except Exception as err:
        logger.warning("zoo.hub.card.write_model_card failed (%s); writing a minimal card", err)
    from huggingface_hub import ModelCard, ModelCardData

    model = recipe.model.get("type") or recipe.model.get("pretrained")
    data = ModelCardData(library_name="transformers", tags=["zoo", "text-generation", str(model)])
    lines = [
        f"# {recipe.hub.repo_id or Path(recipe.training.output_dir).name}",
        "",
        f"A `{model}` model trained with zoo's `train.py` ({metrics.get('steps', '?')} steps on"
        f" `{recipe.data.train}`). Load it with:",
        "",
        "```python",
        "import zoo",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
        "## Results",
        "",
        *[
            f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in metrics.items()
        ],
        "",
        "The full training recipe is in `recipe.yaml`.",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(folder / "README.md")


def save_final(accelerator, model, tokenizer, recipe: Recipe, metrics: dict) -> Path:
    """Save the trained model with its tokenizer, recipe, metrics and card into ``recipe.training.output_dir``;
    call on every process (sharded models gather their weights)."""
    output_dir = Path(recipe.training.output_dir)
    state_dict = accelerator.get_state_dict(model)
    # A torch.compile'd model names its weights `_orig_mod.<name>`; the saved model must not.
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        stage = output_dir / ".tmp-final"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if recipe.finetune.method == "lora":
            from zoo.training.lora import merged_copy

            unwrapped.save_pretrained(stage / "adapter", state_dict=state_dict)
            if recipe.finetune.merge:
                merged_copy(unwrapped).save_pretrained(stage)
        else:
            unwrapped.save_pretrained(stage, state_dict=state_dict)
        tokenizer.save_pretrained(stage)
        recipe.save(stage / "recipe.yaml")
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
        try:
            write_card(stage, recipe, metrics)
        except Exception as err:  # a card is documentation; its failure must not lose the model
            logger.warning("could not write the model card: %s", err)
        for item in stage.iterdir():
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        stage.rmdir()
    accelerator.wait_for_everyone()
    return output_dir
