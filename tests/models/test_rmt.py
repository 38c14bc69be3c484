"""Recurrent Memory Transformer (Bulatov et al., 2022, arXiv:2207.06881): the wrapper against its backbone, against
a segment loop written here from the paper, and against the authors' RecurrentWrapper forward re-implemented
here over a transformers GPT-2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import zoo  # noqa: F401
from tests.models.tiny_configs import TINY, tiny_config
from zoo.models.rmt import RMTConfig, RMTForCausalLM

BACKBONE = TINY["zoo_rmt"]["backbone"]


def rmt(**overrides) -> RMTForCausalLM:
    torch.manual_seed(0)
    return RMTForCausalLM(tiny_config("zoo_rmt", **overrides)).eval()


def tokens(batch, length, seed=0):
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def test_no_memory_one_segment_is_the_backbone():
    model = rmt(num_mem_tokens=0, segment_length=16)
    ids = tokens(2, 16)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            got = model(ids, use_cache=False, **kw).logits
            ref = model.model.backbone(ids, use_cache=False, **kw).logits
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def paper_loop(model, ids):
    """RMT as the paper describes it, with the backbone as a black box: segment tau is [mem, H_tau, mem]; the
    outputs at the first memory positions are dropped, the tokens' outputs are the segment's, and the outputs at
    the last memory positions are the next memory; the loss is next-token cross-entropy over all segments."""
    backbone, M, S = model.model.backbone, model.config.num_mem_tokens, model.config.segment_length
    mem = model.model.memory.unsqueeze(0).repeat(ids.shape[0], 1, 1)
    emb = backbone.get_input_embeddings()
    all_logits = []
    for start in range(0, ids.shape[1], S):
        h = emb(ids[:, start : start + S])
        out = backbone(inputs_embeds=torch.cat([mem, h, mem], 1), output_hidden_states=True, use_cache=False)
        all_logits.append(out.logits[:, M : M + h.shape[1]])
        mem = out.hidden_states[-1][:, M + h.shape[1] :]
    logits = torch.cat(all_logits, 1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return logits, loss, mem


def test_segment_loop_equals_the_papers_description():
    model = rmt(num_mem_tokens=3, segment_length=5).train()
    ids = tokens(2, 23)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    got_grad = model.model.memory.grad.clone()
    model.zero_grad()
    logits, loss, mem = paper_loop(model, ids)
    loss.backward()
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.memory_state, mem, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, model.model.memory.grad, rtol=1e-4, atol=1e-6)
    assert got_grad.abs().sum() > 0


def residual_loop(model, ids, norm_owner):
    """``memory_source="residual"`` written out with the backbone as a black box: the tokens' logits come from the
    backbone as it is, the next memory from a copy of it whose final norm is an identity (``norm_owner(copy)``
    gives the module holding the norm and its attribute name), so that the copy's last hidden states are the
    residual stream at the write positions."""
    backbone, M, S = model.model.backbone, model.config.num_mem_tokens, model.config.segment_length
    bare = copy.deepcopy(backbone)
    owner, name = norm_owner(bare)
    setattr(owner, name, nn.Identity())
    mem = model.model.memory.unsqueeze(0).repeat(ids.shape[0], 1, 1)
    all_logits = []
    for start in range(0, ids.shape[1], S):
        h = backbone.get_input_embeddings()(ids[:, start : start + S])
        x = torch.cat([mem, h, mem], 1)
        all_logits.append(backbone(inputs_embeds=x, use_cache=False).logits[:, M : M + h.shape[1]])
        mem = bare(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states[-1][:, M + h.shape[1] :]
    return torch.cat(all_logits, 1), mem


def test_residual_memory_is_the_stream_entering_the_final_norm():
    model = rmt(num_mem_tokens=3, segment_length=5, memory_source="residual").train()
    ids = tokens(2, 23)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert model.model.memory.grad.abs().sum() > 0
    with torch.no_grad():
        logits, mem = residual_loop(model, ids, lambda m: (m.model, "norm"))
        # the same weights with the authors' memory: another memory, so other logits after the first segment
        other = rmt(num_mem_tokens=3, segment_length=5)(ids, use_cache=False)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.memory_state, mem, rtol=1e-5, atol=1e-5)
    assert (out.memory_state - other.memory_state).abs().max() > 1e-2
    torch.testing.assert_close(out.logits[:, :5], other.logits[:, :5], rtol=1e-5, atol=1e-5)
    assert (out.logits[:, 5:] - other.logits[:, 5:]).abs().max() > 1e-3


def test_residual_memory_over_gpt2_and_a_backbone_without_a_known_norm():
    gpt2 = tiny_gpt2()
    model = RMTForCausalLM.from_backbone(
        gpt2, num_mem_tokens=2, segment_length=6, memory_source="residual"
    ).eval()
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        out = model(ids, use_cache=False)
        logits, mem = residual_loop(model, ids, lambda m: (m.transformer, "ln_f"))
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.memory_state, mem, rtol=1e-5, atol=1e-5)
    gpt2 = tiny_gpt2()
    gpt2.transformer.ln_f = None
    with pytest.raises(ValueError, match="memory_source='residual' needs the backbone's final norm"):
        RMTForCausalLM.from_backbone(gpt2, num_mem_tokens=2, segment_length=6, memory_source="residual")
    # a final norm that the backbone applies other than by calling the module: an error, not the normed states
    model.model._final_norm = lambda: nn.LayerNorm(32)  # a norm the forward never calls
    with pytest.raises(RuntimeError, match="was not called as a module"):
        model(ids, use_cache=False)


def test_gated_memory_update_is_the_convex_mix_written_out(tmp_path):
    model = rmt(num_mem_tokens=3, segment_length=5, memory_update="gated").train()
    with torch.no_grad():  # gates away from 1/2, so that a wrong mix shows
        model.model.memory_gate.bias.copy_(torch.linspace(-3, 3, 32))
    ids = tokens(2, 23)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert model.model.memory_gate.weight.grad.abs().sum() > 0
    backbone, M, S = model.model.backbone, 3, 5
    W, b = model.model.memory_gate.weight, model.model.memory_gate.bias
    mem = model.model.memory.unsqueeze(0).repeat(2, 1, 1)
    all_logits = []
    with torch.no_grad():
        for start in range(0, 23, S):
            h = backbone.get_input_embeddings()(ids[:, start : start + S])
            o = backbone(inputs_embeds=torch.cat([mem, h, mem], 1), output_hidden_states=True, use_cache=False)
            all_logits.append(o.logits[:, M : M + h.shape[1]])
            written = o.hidden_states[-1][:, M + h.shape[1] :]
            g = 1 / (1 + torch.exp(-(written @ W.T + b)))
            mem = (1 - g) * mem + g * written
    torch.testing.assert_close(out.logits, torch.cat(all_logits, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.memory_state, mem, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, out.logits, rtol=0, atol=0)


def test_gates_start_at_their_configured_bias():
    model = rmt(memory_update="gated", memory_gate_bias=-3.0)
    assert (model.model.memory_gate.bias == -3.0).all()
    wrapped = RMTForCausalLM.from_backbone(
        tiny_gpt2(), num_mem_tokens=2, segment_length=6, memory_update="gated", memory_gate_bias=-3.0
    )
    assert (wrapped.model.memory_gate.bias == -3.0).all()
    with torch.no_grad():  # a segment writes about sigmoid(-3) = 4.7% of the memory, whatever it holds
        g = torch.sigmoid(wrapped.model.memory_gate(torch.randn(64, 32)))
    assert 0.03 < g.mean() < 0.07 and g.max() < 0.2
    assert rmt().model.memory_gate is None  # the authors' update has no gate


@pytest.mark.parametrize("memory_source", ["output", "residual"])
def test_a_backbone_whose_states_are_wider_than_its_embeddings_is_a_clear_error(memory_source):
    """zoo's Reformer hands on its two reversible streams side by side (twice the embeddings' width): nothing it
    writes can be read back as memory tokens, which is said before any output; without memory it wraps fine."""
    torch.manual_seed(0)
    reformer = AutoModelForCausalLM.from_config(tiny_config("zoo_reformer")).eval()
    model = RMTForCausalLM.from_backbone(reformer, num_mem_tokens=2, segment_length=8, memory_source=memory_source)
    with pytest.raises(ValueError, match="64 wide, not the memory's 32"):
        model(tokens(1, 20), use_cache=False)
    plain = RMTForCausalLM.from_backbone(reformer, num_mem_tokens=0, segment_length=8)
    assert plain(tokens(1, 20), use_cache=False).logits.shape == (1, 20, 259)


SOURCES_AND_UPDATES = [("output", "replace"), ("residual", "replace"), ("output", "gated"), ("residual", "gated")]


@pytest.mark.parametrize("memory_source, memory_update", SOURCES_AND_UPDATES)
def test_streaming_segments_equals_one_call(memory_source, memory_update):
    model = rmt(memory_source=memory_source, memory_update=memory_update)
    ids = tokens(2, 14)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        first = model(ids[:, :8], use_cache=False)
        second = model(ids[:, 8:], memory_state=first.memory_state, use_cache=False)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.memory_state, full.memory_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_truncated_bptt_cuts_the_gradient_beyond_its_depth(depth):
    model = rmt(bptt_depth=depth).train()
    S, n = model.config.segment_length, 4
    embeds = model.get_input_embeddings()(tokens(1, S * n)).detach().requires_grad_()
    model(inputs_embeds=embeds, use_cache=False).logits[:, -S:].square().sum().backward()
    per_segment = embeds.grad.abs().sum(-1).view(n, S).sum(-1)
    assert (per_segment[: n - depth] == 0).all(), per_segment
    assert (per_segment[n - depth :] > 0).all(), per_segment
    # without truncation the gradient reaches every segment
    embeds.grad = None
    rmt().train()(inputs_embeds=embeds, use_cache=False).logits[:, -S:].square().sum().backward()
    assert (embeds.grad.abs().sum(-1).view(n, S).sum(-1) > 0).all()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_truncated_segments_without_targets_keep_no_graph(depth, padded):
    """With labels only in the last segment (an answer-only loss), the segments before the truncation run without
    autograd: the loss and every parameter's gradient are those of the full graph with the same loss written out,
    and the graph saves less for the backward."""
    model = rmt(bptt_depth=depth).train()
    S, n = model.config.segment_length, 4
    ids = tokens(2, S * n)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -3:] = 0  # right padding: left alignment moves nothing, the labels' positions stay
    labels = torch.full_like(ids, -100)
    labels[:, -S + 1 : -3] = ids[:, -S + 1 : -3]

    def saved_numel(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, total[0]

    out, routed = saved_numel(lambda: model(ids, attention_mask=mask, labels=labels, use_cache=False))
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref, full = saved_numel(lambda: model(ids, attention_mask=mask, use_cache=False))
    loss = F.cross_entropy(ref.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=0)
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert p.grad is None or not p.grad.any(), k
    assert routed < 0.75 * full, (routed, full)


@pytest.mark.parametrize("memory_source, memory_update", SOURCES_AND_UPDATES)
def test_generate_crosses_segment_boundaries_with_memory(memory_source, memory_update):
    model = rmt(segment_length=3, memory_source=memory_source, memory_update=memory_update)
    ids = tokens(2, 5)
    out = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(9):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(out, seq, rtol=0, atol=0)


@pytest.mark.parametrize("memory_source, memory_update", SOURCES_AND_UPDATES)
def test_cache_memory_after_a_full_segment_equals_the_streamed_memory(memory_source, memory_update):
    model = rmt(memory_source=memory_source, memory_update=memory_update)
    ids = tokens(2, 8)
    with torch.no_grad():
        cached = model(ids, use_cache=True)
        plain = model(ids, use_cache=False)
    torch.testing.assert_close(cached.memory_state, plain.memory_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.logits, plain.logits, rtol=1e-5, atol=1e-5)


def test_right_alignment_and_padding():
    model = rmt(segment_alignment="right")
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, counted from the row's own end: the boundaries of the 6 real tokens
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 3:]).logits
        out = model.generate(ids[1:], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        seq = ids[1:]
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(batched[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, seq, rtol=0, atol=0)


def test_wraps_a_transformers_gpt2_and_round_trips(tmp_path):
    gpt2 = tiny_gpt2()
    model = RMTForCausalLM.from_backbone(gpt2, num_mem_tokens=2, segment_length=6).eval()
    assert model.model.backbone is gpt2
    ids = torch.randint(0, 97, (2, 15))
    out = model(ids, labels=ids, use_cache=False)
    assert out.logits.shape == (2, 15, 97) and torch.isfinite(out.loss)
    _, loss, _ = paper_loop(model, ids)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RMTForCausalLM and type(loaded.model.backbone) is GPT2LMHeadModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        gen = model.generate(ids[:, :7], max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq = ids[:, :7]
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(gen, seq, rtol=0, atol=0)


def authors_forward(state_dict, backbone, ids, mask, num_mem_tokens, segment_size, alignment):
    """The forward of the authors' RecurrentWrapper / MemoryCell (booydar/recurrent-memory-transformer), written
    here from their conventions: split the batch tensor into segments by alignment; per segment, embed, put the
    memory before and after, pad the attention mask with ones at the memory; the logits between the memory
    positions are the segment's and the last-layer hidden states at the write positions the next memory."""
    M = num_mem_tokens
    backbone.load_state_dict(
        {k[len("memory_cell.model.") :]: v for k, v in state_dict.items() if "model." in k}
    )
    T = ids.shape[1]
    if alignment == "left":
        cuts = list(range(0, T, segment_size)) + [T]
    elif alignment == "right":
        cuts = (list(range(T, 0, -segment_size)) + [0])[::-1]
    else:
        cuts = [c[0] for c in torch.arange(T).chunk(math.ceil(T / segment_size))] + [T]
    memory = state_dict["memory_cell.memory"].repeat(ids.shape[0], 1, 1)
    logits = []
    for a, b in zip(cuts, cuts[1:]):
        x = torch.cat([memory, backbone.get_input_embeddings()(ids[:, a:b]), memory], 1)
        m = None
        if mask is not None:
            m = torch.ones(x.shape[:2], dtype=torch.int64)
            m[:, M:-M] = mask[:, a:b]
        out = backbone(inputs_embeds=x, attention_mask=m, output_hidden_states=True)
        memory = out.hidden_states[-1][:, -M:]
        logits.append(out.logits[:, M:-M])
    return torch.cat(logits, 1)


@pytest.mark.parametrize("alignment", ["left", "right", "center"])
def test_from_booydar_gives_the_authors_logits(alignment):
    gpt2 = tiny_gpt2()
    torch.manual_seed(2)
    state_dict = {f"memory_cell.model.{k}": v.clone() for k, v in gpt2.state_dict().items()}
    state_dict["memory_cell.memory"] = torch.randn(3, 32) * 0.02
    ids = torch.randint(0, 97, (2, 17))
    mask = None
    if alignment == "left":  # the authors' default: right padding
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
    with torch.no_grad():
        model = RMTForCausalLM.from_booydar(
            state_dict, gpt2.config, num_mem_tokens=3, segment_length=5, segment_alignment=alignment
        ).eval()
        got = model(ids, attention_mask=mask, use_cache=False).logits
        ref = authors_forward(state_dict, tiny_gpt2(), ids, mask, 3, 5, alignment)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert got.abs().sum() > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_mem_tokens"):
        RMTConfig(num_mem_tokens=-1)
    with pytest.raises(ValueError, match="segment_length"):
        RMTConfig(segment_length=0)
    with pytest.raises(ValueError, match="bptt_depth"):
        RMTConfig(bptt_depth=0)
    with pytest.raises(ValueError, match="memory_source"):
        RMTConfig(memory_source="input")
    with pytest.raises(ValueError, match="memory_update"):
        RMTConfig(memory_update="add")
    model = rmt()
    with pytest.raises(ValueError, match="memory_state has shape"):
        model(tokens(1, 4), memory_state=torch.zeros(1, 5, 32), use_cache=False)
    gpt2 = tiny_gpt2()
    sd = {f"memory_cell.model.{k}": v for k, v in gpt2.state_dict().items()}
    sd["memory_cell.memory"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="num_mem_tokens=4"):
        RMTForCausalLM.from_booydar(sd, gpt2.config, num_mem_tokens=4, segment_length=5)
    with pytest.raises(ValueError, match="no row has a real token"):
        model(tokens(2, 6), attention_mask=torch.zeros(2, 6, dtype=torch.long), use_cache=True)


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("alignment, num_mem_tokens", [("left", 2), ("left", 0), ("right", 2), ("center", 2)])
def test_left_padded_batch_generates_each_prompt_as_alone(alignment, num_mem_tokens):
    """Prompts of 3, 6 and 9 tokens (segments of 4: one to three segments, each row at another place in its
    segment), left-padded into one batch: greedy decoding (with the cache for left alignment; right and center
    decode without) gives every row the tokens and the logits of its prompt decoded alone, across the segment
    boundaries each row crosses at its own steps."""
    model = rmt(segment_length=4, num_mem_tokens=num_mem_tokens, segment_alignment=alignment)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 6, 9)]
    ids, mask = _left_padded(prompts)
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    torch.testing.assert_close(uncached.sequences, batched.sequences, rtol=0, atol=0)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        torch.testing.assert_close(
            batched.sequences[b, ids.shape[1] - len(prompt) :], alone.sequences[0], rtol=0, atol=0
        )
        for step_batched, step_alone in zip(batched.logits, alone.logits):
            # right alignment reads the padding as masked tokens: equal up to float rounding
            torch.testing.assert_close(step_batched[b], step_alone[0], rtol=1e-5, atol=1e-5)


def test_left_padded_beam_search_equals_each_prompt_alone():
    model = rmt(segment_length=4)
    prompts = [tokens(1, n, seed=n)[0] for n in (2, 7)]
    ids, mask = _left_padded(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        torch.testing.assert_close(batched[b, ids.shape[1] - len(prompt) :], alone[0], rtol=0, atol=0)
