"""Task heads shared by every zoo architecture: last-token pooling and the classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(
    batch_size: int,
    seq_len: int,
    *,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    pad_token_id: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Index of the rightmost real token of each row, from the attention mask, else from padding ids."""
    positions = torch.arange(seq_len, device=device)
    if attention_mask is not None:
        real = attention_mask[:, -seq_len:].to(device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    # Rows with no real token fall back to the last position.
    idx = torch.where(real, positions, -1).amax(-1)
    return torch.where(idx < 0, seq_len - 1, idx)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Regression (one label), single-label or multi-label classification, chosen as transformers does."""
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
