"""Training: recipes (``recipe``), the Accelerate loop (``loop``), checkpoints, LoRA, the final save and Hub push.

From Python, ``train(load_recipe("configs/transformer/tiny.yaml", ["training.max_steps=50"]))`` does what
``python train.py --config configs/transformer/tiny.yaml training.max_steps=50`` does.
"""

from zoo.training.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict


def train(recipe: Recipe, hooks=None) -> dict:
    """Run a recipe to the end (see :func:`zoo.training.loop.train`)."""
    from zoo.training.loop import train as _train

    return _train(recipe, hooks)


__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "train"]
