"""Model cards and Hub publishing (the push itself lives in ``zoo.training.push``)."""

from zoo.hub.card import add_eval_results, render_model_card, write_model_card

__all__ = ["add_eval_results", "render_model_card", "write_model_card"]
