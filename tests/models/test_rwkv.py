"""RWKV against two independent implementations with the same weights.

- RWKV-4 against transformers' ``RwkvForCausalLM`` (through ``zoo.convert``): logits, greedy generation, the
  conversion back, in-place rescaled weights, the command-line entry point.
- RWKV-4, -6 and -7 against BlinkDL's ``rwkv`` package (0.8.x, ``strategy="cpu fp32"``) on tiny random checkpoints
  in BlinkDL's ``.pth`` layout, built here from the official key names and shapes: logits of a full forward, the
  package's prefix + token-by-token decoding, and packed documents against the package's separate runs. The
  package picks RWKV-7 only when ``RWKV_V7_ON=1`` is set before it is imported, so RWKV-7 runs in one subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, RwkvConfig
from transformers import RwkvForCausalLM as HFRwkvForCausalLM

import zoo  # noqa: F401
from tests.models.decoding import full_and_incremental_logits
from zoo.convert import convert
from zoo.models.rwkv import ZooRwkvConfig, ZooRwkvForCausalLM
from zoo.models.rwkv.convert_rwkv import (
    blink_version,
    from_blink,
    from_transformers,
    to_blink,
    to_transformers,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
SEQ = [5, 17, 3, 42, 8, 60, 11, 29, 33, 7, 50, 21]  # one sequence, decoded after PREFIX tokens
PREFIX = 5
DOCS = [[9, 14, 3, 27, 40, 12], [33, 8, 61, 5, 19, 44, 2, 38, 10], [25, 6, 57, 31]]  # packed documents


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- RWKV-4 against transformers -----------------------------------------------------------------------------------


def hf_rwkv(**overrides):
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64, bos_token_id=1,
                 eos_token_id=2)  # fmt: skip
    model = HFRwkvForCausalLM(RwkvConfig(**{**sizes, **overrides})).eval()
    # random weights away from initialisation, so that every parameter matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}])
def test_equal_logits_to_transformers(overrides):
    hf = hf_rwkv(**overrides)
    ours = from_transformers(hf).eval()
    assert isinstance(ours, ZooRwkvForCausalLM) and ours.config.version == 4
    ids = torch.randint(3, VOCAB, (2, 23))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, use_cache=False).logits
    assert rel_err(got, expected) < 1e-4, rel_err(got, expected)


def test_greedy_generation_equals_transformers():
    hf = hf_rwkv(eos_token_id=None)  # no row stops early
    ours = from_transformers(hf).eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, **kw)
    # transformers' RWKV carries its state wrongly across a batch in generate(): one row at a time, and greedy
    # decoding by full forwards for the batch
    for row in range(2):
        torch.testing.assert_close(got[row : row + 1], hf.generate(ids[row : row + 1], **kw), rtol=0, atol=0)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, hf(seq).logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(got, seq, rtol=0, atol=0)


def test_weights_rescaled_in_place_by_transformers_are_read_at_their_trained_scale():
    hf = hf_rwkv(num_hidden_layers=3, rescale_every=1)
    trained = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        hf(torch.tensor([[4, 5]]))  # eval mode: divides blocks i's output weights by 2**i in place
    assert hf.rwkv.layers_are_rescaled
    assert not torch.equal(
        hf.rwkv.blocks[2].attention.output.weight, trained["rwkv.blocks.2.attention.output.weight"]
    )
    ours = from_transformers(hf)
    for i in range(3):
        layer = ours.model.layers[i]
        torch.testing.assert_close(
            layer.attn.o_proj.weight, trained[f"rwkv.blocks.{i}.attention.output.weight"]
        )
        torch.testing.assert_close(
            layer.ffn.value.weight, trained[f"rwkv.blocks.{i}.feed_forward.value.weight"]
        )


def test_conversion_back_to_transformers():
    ours = from_transformers(hf_rwkv()).eval()
    back = to_transformers(ours).eval()
    ids = torch.randint(3, VOCAB, (1, 21))
    with torch.no_grad():
        assert rel_err(back(ids).logits, ours(ids, use_cache=False).logits) < 1e-5
    with pytest.raises(ValueError, match="version=7"):
        to_transformers(
            ZooRwkvForCausalLM(ZooRwkvConfig(version=7, hidden_size=32, num_hidden_layers=1, head_size=8))
        )


def test_convert_entry_point_with_transformers(tmp_path):
    hf = hf_rwkv()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is ZooRwkvForCausalLM
    convert(tmp_path / "zoo", tmp_path / "back")
    back = HFRwkvForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, VOCAB, (1, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(ours(ids, use_cache=False).logits, expected) < 1e-4
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)


# -- RWKV-4, -6, -7 against BlinkDL's rwkv package -----------------------------------------------------------------


def blink_checkpoint(version: int, *, C=32, L=2, N=8, F=64, D=4, seed=0) -> dict[str, torch.Tensor]:
    """A random checkpoint with the key names and shapes of BlinkDL's official weights (head size N, low ranks D;
    RWKV-7's first layer holds the value-residual
    weights it does not use, as published checkpoints may)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def mix():
        return torch.rand(1, 1, C, generator=g)

    def lin(out_features, in_features):
        return rnd(out_features, in_features, scale=in_features**-0.5)

    def norm(prefix, n=C):
        return {prefix + ".weight": rnd(n, scale=0.1, shift=1.0), prefix + ".bias": rnd(n, scale=0.1)}

    H = C // N
    sd = {"emb.weight": rnd(VOCAB, C), **norm("blocks.0.ln0")}
    for i in range(L):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        sd.update({**norm(f"blocks.{i}.ln1"), **norm(f"blocks.{i}.ln2")})
        A = C  # the package needs the time mixing as wide as the residual stream
        projections = ["key", "value", "receptance"] + (["gate"] if version == 6 else [])
        sd.update({a + n + ".weight": lin(A, C) for n in projections})
        sd[a + "output.weight"] = lin(C, A)
        if version == 4:
            sd.update({a + "time_decay": rnd(A, scale=0.5), a + "time_first": rnd(A, scale=0.5)})
            sd.update({a + "time_mix_" + n: mix() for n in "kvr"})
            sd.update({f + "time_mix_k": mix(), f + "time_mix_r": mix()})
        elif version == 6:
            sd.update({a + "time_maa_" + n: mix() for n in "xwkvrg"})
            sd[a + "time_maa_w1"], sd[a + "time_maa_w2"] = rnd(C, 5 * D, scale=0.3), rnd(5, D, C, scale=0.3)
            sd[a + "time_decay"] = rnd(1, 1, A, scale=0.5, shift=-1.0)
            sd[a + "time_decay_w1"], sd[a + "time_decay_w2"] = (
                rnd(C, 2 * D, scale=0.3),
                rnd(2 * D, A, scale=0.3),
            )
            sd[a + "time_faaaa"] = rnd(A // N, N, scale=0.5)
            sd.update(norm(a + "ln_x", A))
            sd.update({f + "time_maa_k": mix(), f + "time_maa_r": mix()})
        else:
            sd.update({a + "x_" + n: mix() for n in "rwkvag"})
            for n in "wavg":
                if n != "g":
                    sd[a + n + "0"] = rnd(1, 1, C, scale=0.5)
                sd[a + n + "1"], sd[a + n + "2"] = rnd(C, D, scale=0.3), rnd(D, C, scale=0.3)
            sd.update(
                {
                    a + "k_k": rnd(1, 1, C, scale=0.2, shift=1.0),
                    a + "k_a": mix(),
                    a + "r_k": rnd(H, N, scale=0.5),
                }
            )
            sd.update(norm(a + "ln_x"))
            sd[f + "x_k"] = mix()
        sd[f + "key.weight"], sd[f + "value.weight"] = lin(F, C), lin(C, F)
        if version != 7:
            sd[f + "receptance.weight"] = lin(C, C)
    sd.update({**norm("ln_out"), "head.weight": lin(VOCAB, C)})
    return sd


def run_package(RWKV, path: str) -> dict[str, torch.Tensor]:
    """The package's logits on SEQ (one forward), on SEQ decoded token by token after PREFIX, and on each of DOCS
    alone. ``RWKV`` is ``rwkv.model.RWKV`` (the RWKV-7 class when the package was imported with RWKV_V7_ON=1)."""
    is_v7 = RWKV.__name__ == "RWKV_x070"
    model = RWKV(path[: -len(".pth")], "cpu fp32") if is_v7 else RWKV(path, "cpu fp32", verbose=False)
    full, _ = model.forward(SEQ, None, full_output=True)
    logits, state = model.forward(SEQ[:PREFIX], None, full_output=True)
    steps = [logits]
    for token in SEQ[PREFIX:]:
        logits, state = model.forward([token], state)
        steps.append(logits[None])
    docs = [model.forward(doc, None, full_output=True)[0] for doc in DOCS]
    return {"full": full, "steps": torch.cat(steps), "docs": torch.cat(docs)}


def _package_env(version: int) -> dict[str, str]:
    env = {"RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
    if version == 7:
        env.update(RWKV_V7_ON="1", RWKV_JIT_ON="1")  # RWKV-7 is TorchScript whatever RWKV_JIT_ON says
    return env


@pytest.fixture
def package_rwkv(monkeypatch):
    """``rwkv.model.RWKV`` for versions 4 and 6; the package reads its environment at import and when loading."""
    for name, value in _package_env(4).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RWKV_V7_ON", raising=False)
    import rwkv.model

    assert rwkv.model.RWKV.__name__ == "RWKV", "rwkv.model was imported with RWKV_V7_ON=1"
    return rwkv.model.RWKV


def package_outputs(version: int, path: Path, package_rwkv) -> dict[str, torch.Tensor]:
    if version != 7:
        return run_package(package_rwkv, str(path))
    out = path.with_suffix(".out.pt")
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from rwkv.model import RWKV\n"
        "from tests.models.test_rwkv import run_package\n"
        f"torch.save(run_package(RWKV, {str(path)!r}), {str(out)!r})\n"
    )
    env = {**os.environ, **_package_env(7)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("version", [4, 6, 7])
def test_equal_logits_to_the_rwkv_package(version, tmp_path, package_rwkv):
    sd = blink_checkpoint(version)
    path = tmp_path / f"rwkv{version}.pth"
    torch.save(sd, path)
    expected = package_outputs(version, path, package_rwkv)

    assert blink_version(sd) == version
    ours = from_blink(sd).eval()
    assert ours.config.version == version
    ids = torch.tensor([SEQ])
    full, incremental, _ = full_and_incremental_logits(ours, ids, prefix=PREFIX)
    # one forward, and the package's own decoding (prefix, then one token at a time) against zoo's both ways
    assert rel_err(full[0], expected["full"]) < 1e-4, rel_err(full[0], expected["full"])
    assert rel_err(full[0], expected["steps"]) < 1e-4, rel_err(full[0], expected["steps"])
    assert rel_err(incremental[0], expected["steps"]) < 1e-4, rel_err(incremental[0], expected["steps"])
    # packed documents (position ids restarting at 0) against the package's separate runs
    packed = torch.tensor([sum(DOCS, [])])
    position_ids = torch.cat([torch.arange(len(d)) for d in DOCS])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=position_ids).logits[0]
    assert rel_err(got, expected["docs"]) < 1e-4, rel_err(got, expected["docs"])

    # back to BlinkDL's layout: every key and shape, every value exact (RWKV-7's unused first-layer value
    # residual dropped)
    back = to_blink(ours)
    unused = {f"blocks.0.att.v{i}" for i in range(3)} if version == 7 else set()
    kept = {k: v for k, v in sd.items() if k not in unused}
    assert back.keys() == kept.keys()
    for key, value in kept.items():
        assert back[key].shape == value.shape, key
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


def test_convert_entry_point_with_blink_checkpoints(tmp_path):
    sd = blink_checkpoint(6)
    torch.save(sd, tmp_path / "rwkv6.pth")
    convert(tmp_path / "rwkv6.pth", tmp_path / "zoo")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert type(ours) is ZooRwkvForCausalLM and ours.config.version == 6
    convert(tmp_path / "zoo", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="transformers has RWKV-4 only"):
        convert(tmp_path / "zoo", tmp_path / "hf")


def test_unsupported_checkpoints_and_configs_are_value_errors():
    v5 = {k: v for k, v in blink_checkpoint(6, L=1).items() if "time_maa" not in k}
    with pytest.raises(ValueError, match="RWKV-5"):
        blink_version(v5)
    with pytest.raises(ValueError, match="version"):
        ZooRwkvConfig(version=5)
    with pytest.raises(ValueError, match="head_size"):
        ZooRwkvConfig(version=6, hidden_size=32, head_size=12)
    with pytest.raises(ValueError, match="attention_hidden_size"):
        ZooRwkvConfig(version=7, hidden_size=32, attention_hidden_size=64, head_size=8)
