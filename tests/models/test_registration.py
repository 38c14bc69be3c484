"""Registering zoo with the Auto classes adds zoo's model types and leaves transformers' own ones alone."""

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import zoo
from zoo.models.registry import register


def test_zoo_types_do_not_collide_with_transformers():
    for model_type in zoo.REGISTRY:
        assert model_type not in CONFIG_MAPPING_NAMES
        assert model_type.startswith("zoo_")


@pytest.mark.parametrize(
    "model_type,config_name,model_module",
    [
        ("mamba", "MambaConfig", "transformers.models.mamba"),
        ("rwkv", "RwkvConfig", "transformers.models.rwkv"),
        ("longformer", "LongformerConfig", "transformers.models.longformer"),
        ("big_bird", "BigBirdConfig", "transformers.models.big_bird"),
        ("reformer", "ReformerConfig", "transformers.models.reformer"),
        ("llama", "LlamaConfig", "transformers.models.llama"),
    ],
)
def test_transformers_builtins_still_resolve_to_transformers(model_type, config_name, model_module):
    config = AutoConfig.for_model(model_type)
    assert type(config).__name__ == config_name
    assert type(config).__module__.startswith(model_module)
    model_cls = AutoModel._model_mapping[type(config)]
    assert model_cls.__module__.startswith(model_module)
    if model_type in ("mamba", "rwkv", "llama"):
        assert AutoModelForCausalLM._model_mapping[type(config)].__module__.startswith(model_module)


def test_registering_a_transformers_type_is_refused():
    from transformers import MambaConfig

    with pytest.raises(ValueError, match="mamba"):
        register(MambaConfig, model=AutoModel)


def test_unknown_model_type_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="zoo_nope"):
        AutoConfig.for_model("zoo_nope")
    (tmp_path / "config.json").write_text('{"model_type": "zoo_nope", "hidden_size": 8}')
    with pytest.raises(ValueError, match="zoo_nope"):
        AutoConfig.from_pretrained(tmp_path)
