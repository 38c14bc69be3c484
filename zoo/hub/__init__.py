"""Sharing zoo models: model cards (``card``), self-contained export for ``trust_remote_code`` (``export``) and
upload to the Hub (``push``); ``python -m zoo.hub export|push`` on the command line."""

from zoo.hub.card import add_eval_results, render_model_card, write_model_card

__all__ = ["add_eval_results", "render_model_card", "write_model_card"]
