"""``python -m zoo.convert SRC DST``: one entry point for every converter of zoo.

The source is recognised, and the conversion dispatched to the architecture's ``convert_<arch>.py``:

- a transformers folder (its ``config.json``): ``llama`` -> ``zoo_transformer``, ``mamba`` and ``falcon_mamba``
  -> ``zoo_mamba``, ``mamba2`` -> ``zoo_mamba2``, ``bamba`` -> ``zoo_hybrid``, ``longformer`` (its
  ``LongformerForMaskedLM``, or the task head its ``architectures`` names) -> ``zoo_longformer``, ``big_bird``
  (``BigBirdForMaskedLM``, or the ``BigBirdForQuestionAnswering`` / ``BigBirdForSequenceClassification`` its
  ``architectures`` names) -> ``zoo_bigbird``,
  ``reformer`` (``ReformerModelWithLMHead`` or ``ReformerForMaskedLM``, by ``is_decoder``) -> ``zoo_reformer``;
- a zoo folder (``model_type: zoo_*``) -> the transformers class of the same architecture, where one exists
  (``zoo_transformer`` -> ``LlamaForCausalLM``, ``zoo_mamba`` -> ``MambaForCausalLM`` or, with
  ``mixer_rms_norm``, ``FalconMambaForCausalLM``, ``zoo_mamba2`` -> ``Mamba2ForCausalLM``, ``zoo_hybrid`` of
  Mamba-2 and attention layers -> ``BambaForCausalLM``, ``zoo_longformer`` -> ``LongformerForMaskedLM`` and
  ``zoo_bigbird`` -> ``BigBirdForMaskedLM``, or the same task head as the folder's ``architectures`` names);
- a checkpoint file (``.pt``) whose keys are torchscale RetNet's -> ``zoo_retnet``, configured by the options the
  checkpoint stores (fairseq ``cfg``/``args``) or, for a bare state dict, by ``--heads`` (required),
  ``--activation``, ``--value-dim``/``--value-factor`` and ``--scale-embedding``; a ``zoo_retnet`` folder ->
  a torchscale checkpoint when DST ends in ``.pt``;
- RWKV: a transformers ``rwkv`` folder <-> ``zoo_rwkv`` (version 4); a BlinkDL ``.pth`` checkpoint (RWKV-4, -6,
  -7, told by its keys) -> ``zoo_rwkv``, and a ``zoo_rwkv`` folder -> BlinkDL ``.pth`` when DST ends in ``.pth``.
- Hyena: a safari ``ConvLMHeadModel`` or HyenaDNA checkpoint file (told by its keys) -> ``zoo_hyena``.

The converted model is saved with ``save_pretrained`` (safetensors), with the source's tokenizer when it has one.
Nothing is written when the source is not recognised.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _to_zoo(model_type: str):
    """transformers model_type -> (transformers class name, converter to zoo)."""
    if model_type == "llama":
        from zoo.models.transformer.convert_transformer import from_llama

        return "LlamaForCausalLM", from_llama
    if model_type == "mamba":
        from zoo.models.mamba.convert_mamba import from_transformers

        return "MambaForCausalLM", from_transformers
    if model_type == "falcon_mamba":
        from zoo.models.mamba.convert_mamba import from_transformers

        return "FalconMambaForCausalLM", from_transformers
    if model_type == "bamba":
        from zoo.models.hybrid.convert_bamba import from_transformers

        return "BambaForCausalLM", from_transformers
    if model_type == "mamba2":
        from zoo.models.mamba2.convert_mamba2 import from_transformers

        return "Mamba2ForCausalLM", from_transformers
    if model_type == "rwkv":
        from zoo.models.rwkv.convert_rwkv import from_transformers

        return "RwkvForCausalLM", from_transformers
    if model_type == "longformer":
        from zoo.models.longformer.convert_longformer import TransformersLongformer, from_transformers

        return TransformersLongformer, from_transformers
    if model_type == "big_bird":
        from zoo.models.bigbird.convert_bigbird import TransformersBigBird, from_transformers

        return TransformersBigBird, from_transformers
    if model_type == "reformer":
        from zoo.models.reformer.convert_reformer import TransformersReformer, from_transformers

        return TransformersReformer, from_transformers
    return None


def _from_zoo(model_type: str):
    """zoo model_type -> converter to transformers."""
    if model_type == "zoo_transformer":
        from zoo.models.transformer.convert_transformer import to_llama

        return to_llama
    if model_type == "zoo_mamba":
        from zoo.models.mamba.convert_mamba import to_transformers

        return to_transformers
    if model_type == "zoo_mamba2":
        from zoo.models.mamba2.convert_mamba2 import to_transformers

        return to_transformers
    if model_type == "zoo_hybrid":
        from zoo.models.hybrid.convert_bamba import to_transformers

        return to_transformers
    if model_type == "zoo_rwkv":
        from zoo.models.rwkv.convert_rwkv import to_transformers

        return to_transformers
    if model_type == "zoo_longformer":
        from zoo.models.longformer.convert_longformer import to_transformers

        return to_transformers
    if model_type == "zoo_bigbird":
        from zoo.models.bigbird.convert_bigbird import to_transformers

        return to_transformers
    return None


def convert(src: str | Path, dst: str | Path, *, heads: int | None = None, **retnet_options):
    """Convert ``src`` into ``dst`` (see the module docstring); returns the converted model.

    ``heads`` and ``retnet_options`` (``activation``, ``value_dim``, ``value_factor``, ``scale_embedding``) describe
    a torchscale RetNet checkpoint that does not store its own options (see ``zoo.models.retnet.convert_retnet``).
    """
    import transformers

    import zoo  # noqa: F401  (registers zoo's architectures)

    src, dst = Path(src), Path(dst)
    if src.is_dir():
        config_path = src / "config.json"
        if not config_path.exists():
            raise ValueError(f"{src} is a folder without config.json: not a transformers or zoo model")
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type == "zoo_rwkv" and dst.suffix == ".pth":
            from zoo.models.rwkv.convert_rwkv import save_blink

            model = transformers.AutoModelForCausalLM.from_pretrained(src)
            save_blink(model, dst)
            return model
        if model_type == "zoo_retnet" and dst.suffix == ".pt":
            from zoo.models.retnet.convert_retnet import save_torchscale

            model = transformers.AutoModelForCausalLM.from_pretrained(src)
            save_torchscale(model, dst)
            return model
        if model_type and model_type.startswith("zoo_"):
            back = _from_zoo(model_type)
            if back is None:
                raise ValueError(f"{model_type!r} has no transformers counterpart to convert to")
            if model_type in ("zoo_longformer", "zoo_bigbird"):
                # an encoder converts from the head its folder holds (``architectures``), by default the masked LM
                from importlib import import_module

                load = import_module(back.__module__).load_zoo
            else:
                load = transformers.AutoModelForCausalLM.from_pretrained
            model = back(load(src))
        else:
            entry = _to_zoo(model_type)
            if entry is None:
                raise ValueError(
                    f"no zoo converter for transformers model_type {model_type!r} (known: llama, mamba, falcon_mamba, mamba2, bamba, rwkv, longformer, big_bird, reformer)"
                )
            class_name, to_zoo = entry
            # a class name, or a loader that picks the class from the config (Reformer: causal or masked LM)
            loader = getattr(transformers, class_name) if isinstance(class_name, str) else class_name
            model = to_zoo(loader.from_pretrained(src))
    elif src.is_file():
        from zoo.models.retnet.convert_retnet import (
            from_torchscale,
            is_torchscale_state_dict,
            load_checkpoint,
        )
        from zoo.models.rwkv.convert_rwkv import from_blink, is_blink_state_dict

        state_dict, stored = load_checkpoint(src)
        if is_blink_state_dict(state_dict):
            model = from_blink(state_dict)
            model.save_pretrained(dst)
            return model
        from zoo.models.hyena.convert_hyena import from_safari, is_safari_state_dict

        lightning = state_dict.get("state_dict")  # HyenaDNA's Lightning checkpoints
        if is_safari_state_dict(lightning if isinstance(lightning, dict) else state_dict):
            model = from_safari(lightning if isinstance(lightning, dict) else state_dict)
            model.save_pretrained(dst)
            return model
        if not is_torchscale_state_dict(state_dict):
            raise ValueError(
                f"{src}: keys are not a torchscale RetNet's (e.g. {next(iter(state_dict), None)!r})"
            )
        model = from_torchscale(state_dict, heads, options=stored, **retnet_options)
    else:
        raise ValueError(f"{src} does not exist")
    model.save_pretrained(dst)
    try:
        transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError, TypeError):
        pass  # sources without a tokenizer (bare checkpoints, tests)
    return model


def main(argv=None) -> int:
    from zoo.models.retnet.convert_retnet import add_arguments as add_retnet_arguments
    from zoo.models.retnet.convert_retnet import options_from_arguments as retnet_options

    parser = argparse.ArgumentParser(
        prog="python -m zoo.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="transformers or zoo folder, or a torchscale RetNet checkpoint file")
    parser.add_argument("dst", help="output folder")
    add_retnet_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = retnet_options(args)
        model = convert(args.src, args.dst, heads=options.pop("num_heads"), **options)
    except ValueError as err:
        parser.error(str(err))
    print(f"{type(model).__name__} -> {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
