"""Task heads shared by every zoo architecture: the causal LM and sequence classification heads over a
backbone, and last-token pooling. The losses are transformers' own (``loss_function``,
``ForSequenceClassificationLoss``)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.loss.loss_utils import ForMaskedLMLoss, ForSequenceClassificationLoss
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutputWithPast,
)

from zoo.models.utils import model_forward, output_cache, with_cache
from zoo.modules.mlp import activation


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


class BackboneHead:
    """A task head over ``self.model``, an instance of ``backbone_class`` whose embedding is ``embed_tokens``."""

    backbone_class: type

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value


class EncoderLMHead(nn.Module):
    """BERT's and RoBERTa's language-model head, ``decoder(norm(act(dense(h))))``: a dense layer, the activation
    (``config.hidden_act``) and a LayerNorm (``config.layer_norm_eps``), then the decoder (tied to the token
    embedding with ``tie_word_embeddings``) with a bias per token. The encoders' masked language models use it, and
    their causal variants too (a post-norm encoder's last LayerNorm read by a bare tied projection collapses in
    training; see ``ZooLongformerForCausalLM``)."""

    def __init__(self, config):
        super().__init__()
        C = config.hidden_size
        self.dense = nn.Linear(C, C)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(C, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden_states))))  # (B, T, vocab)


class MaskedLMHead(BackboneHead):
    """Masked language modelling over an encoder backbone through :class:`EncoderLMHead`.

    ``class XForMaskedLM(MaskedLMHead, XPreTrainedModel)`` with ``backbone_class = XModel``; its ``forward`` names
    the backbone's own inputs and returns ``self.masked_lm_output(labels, **those inputs)``. ``lm_head_class``: a
    head with a ``decoder`` projection (tied to the token embedding), :class:`EncoderLMHead` by default.
    """

    backbone_class: type
    lm_head_class: type = EncoderLMHead
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = self.lm_head_class(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, value):
        self.lm_head.decoder = value

    def masked_lm_output(self, labels: torch.LongTensor | None, **backbone_inputs) -> MaskedLMOutput:
        """``labels``: the original ids at masked positions, -100 elsewhere."""
        out = self.model(use_cache=False, **backbone_inputs)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = ForMaskedLMLoss(logits, labels, vocab_size=self.config.vocab_size)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class CausalLMHead(BackboneHead):
    """Language-model head over a backbone ``self.model``, shared by every zoo architecture.

    A model's causal LM is ``class XForCausalLM(CausalLMHead, XPreTrainedModel, GenerationMixin)`` with
    ``backbone_class = XModel``. The backbone must expose ``embed_tokens`` and return ``last_hidden_state``,
    its cache and ``hidden_states``. ``backbone_keeps_last = True``: the backbone takes ``keep_last`` and then
    returns the hidden states of the last ``keep_last`` positions only, and an int ``logits_to_keep`` is passed on
    as that (``generate()`` asks for 1), so that a long prompt's prefill need not hold every position's hidden
    state (Infini-attention's streaming prefill).
    """

    backbone_class: type
    backbone_keeps_last: bool = False
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.LongTensor | None = None,
    ) -> CausalLMOutputWithPast:
        """``labels`` are the input ids (shifted inside), or pass ``shift_labels`` already shifted; -100 marks
        positions without a target. ``num_items_in_batch``: the target count over all accumulated micro-batches
        (transformers' loss then sums instead of averaging per micro-batch)."""
        keep_last = {}
        if self.backbone_keeps_last and isinstance(logits_to_keep, int):
            keep_last["keep_last"] = logits_to_keep
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **keep_last,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )
        return with_cache(
            CausalLMOutputWithPast,
            output_cache(outputs),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
        )


class EncoderCausalLMHead(CausalLMHead):
    """The causal variant of an encoder architecture: :class:`CausalLMHead`'s language modelling and
    ``generate()``, through the encoder's own LM head (``lm_head_class``, :class:`EncoderLMHead` by default) rather
    than a bare projection: with the decoder reading a post-norm encoder's last LayerNorm directly, the hidden states
    of all tokens collapsed onto one vector within a few dozen steps at learning rates of 1e-3 and above (zoo's
    Longformer), as transformers' ``RobertaForCausalLM`` also avoids.

    The model is causal whatever the config says: a copy of the config with ``causal_flag`` set is kept (and
    saved), so that the backbone of a saved causal model loads causal.
    """

    backbone_class: type
    lm_head_class: type = EncoderLMHead
    causal_flag: str = "causal"
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        if not getattr(config, self.causal_flag):
            config = copy.deepcopy(config)
            setattr(config, self.causal_flag, True)
        # CausalLMHead's __init__ builds a bare projection: skip it
        super(CausalLMHead, self).__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = self.lm_head_class(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, value):
        self.lm_head.decoder = value


class SequenceClassificationHead(BackboneHead):
    """Scores the last real token of each sequence with a linear ``score`` head over ``self.model``.

    Kept instead of transformers' ``GenericForSequenceClassification``, which finds the last token from
    ``pad_token_id`` only (wrong where the pad id is also a real token, as with byte tokenizers) and scores every
    position: this head reads the attention mask when given and scores one position per row. The loss is
    transformers' ``ForSequenceClassificationLoss``.

    ``class XForSequenceClassification(SequenceClassificationHead, XPreTrainedModel)`` with
    ``backbone_class = XModel``.
    """

    backbone_class: type

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.backbone_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @model_forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
        )
        return classify_last_token(
            self.score, self.config, outputs, attention_mask, input_ids, self.config.pad_token_id, labels
        )


def classify_last_token(
    score: nn.Module, config, outputs, attention_mask, input_ids, pad_token_id, labels
) -> SequenceClassifierOutputWithPast:
    """``score`` of each row's last real token (``last_token_index``) in ``outputs.last_hidden_state``, with the
    classification loss when ``labels`` are given."""
    hidden_states = outputs.last_hidden_state
    B, T, _ = hidden_states.shape
    idx = last_token_index(
        B,
        T,
        attention_mask=attention_mask,
        input_ids=input_ids,
        pad_token_id=pad_token_id,
        device=hidden_states.device,
    )
    logits = score(hidden_states[torch.arange(B, device=hidden_states.device), idx])
    loss = None
    if labels is not None:
        loss = ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=config)
    return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
