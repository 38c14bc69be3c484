"""Longformer's copy initialisation of a longer position table (Beltagy et al. 2020, arXiv:2004.05150, section 5:
the pretrained positions repeated), for zoo's Longformer (RoBERTa's table: the rows up to the padding row stay) and
BigBird (no reserved rows): the values are the copies the paper specifies, the model runs past the old table, and
outputs at lengths the old table covered do not change."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM

from tests.models.test_longformer import hf_longformer
from tests.models.tiny_configs import tiny_config
from zoo.models import bigbird, longformer
from zoo.models.longformer.convert_longformer import from_transformers


def build(arch: str):
    """(model, extend, offset): a zoo masked LM with a short table, its extension function, its reserved rows."""
    if arch == "longformer":
        # converted from transformers: RoBERTa's layout, pad_token_id=1, positions from row 2, 80 rows
        model = from_transformers(hf_longformer()).eval()
        return model, longformer.extend_position_embeddings, model.config.pad_token_id + 1
    torch.manual_seed(0)
    model = bigbird.ZooBigBirdForMaskedLM(tiny_config("zoo_bigbird", max_position_embeddings=40)).eval()
    return model, bigbird.extend_position_embeddings, 0


@pytest.mark.parametrize("arch", ["longformer", "bigbird"])
def test_copied_table_runs_longer_and_keeps_short_outputs(arch, tmp_path):
    model, extend, offset = build(arch)
    L = model.config.max_position_embeddings
    new_max = L + 2 * (L - offset) + 5  # two whole copies and part of a third
    old = model.model.embed_positions.weight.detach().clone()
    padding_idx = model.model.embed_positions.padding_idx
    g = torch.Generator().manual_seed(0)
    short = torch.randint(5, 90, (2, L - offset), generator=g)
    long = torch.randint(5, 90, (1, new_max - offset), generator=g)
    with torch.no_grad():
        before = model(short).logits
    with pytest.raises(ValueError, match="extend_position_embeddings"):
        model(long)

    assert extend(model, new_max) is model
    table = model.model.embed_positions.weight.detach()
    assert table.shape == (new_max, old.shape[1])
    assert model.config.max_position_embeddings == new_max
    assert model.model.embed_positions.padding_idx == padding_idx
    assert torch.equal(table[:offset], old[:offset]), "the reserved rows changed"
    rows = torch.arange(offset, new_max)
    assert torch.equal(table[offset:], old[offset + (rows - offset) % (L - offset)]), "not the paper's copies"

    with torch.no_grad():
        assert torch.equal(model(short).logits, before)
        out = model(long).logits
    assert out.shape == (1, new_max - offset, model.config.vocab_size) and bool(out.isfinite().all())

    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.max_position_embeddings == new_max
    with torch.no_grad():
        assert torch.equal(loaded(long).logits, out)


def test_bad_extensions_are_value_errors():
    model, extend, _ = build("bigbird")
    with pytest.raises(ValueError, match="new_max=20"):
        extend(model, 20)
    with pytest.raises(ValueError, match="not a zoo BigBird"):
        extend(torch.nn.Linear(2, 2), 100)
    with pytest.raises(ValueError, match="not a zoo Longformer"):
        longformer.extend_position_embeddings(model, 100)
