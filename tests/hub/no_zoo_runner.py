"""Load exported zoo models where zoo cannot be imported; run by tests/hub/test_export.py as
``python -I no_zoo_runner.py SPEC.json RESULTS.pt``.

``SPEC.json``: ``{"folders": {case: exported folder}, "new_tokens": n}``; each folder holds ``ids.pt``. Writes, per
case, the logits over ``ids``, the greedy generation from ``ids[:1, :7]``, the module of the loaded class and
whether zoo got imported.
"""

import json
import sys


def forbid_zoo() -> None:
    """Remove the editable install's finder and the repository from the import path; check ``import zoo``
    fails."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if p and not __import__("os").path.isdir(f"{p}/zoo")]
    try:
        import zoo  # noqa: F401
    except ImportError:
        return
    raise SystemExit(
        f"zoo is importable here (from {sys.modules['zoo'].__file__}); the check would prove nothing"
    )


def main(spec_path: str, results_path: str) -> None:
    forbid_zoo()
    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(open(spec_path).read())
    results = {}
    for case, folder in spec["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.load(f"{folder}/ids.pt")
        n = spec["new_tokens"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(ids[:1, :7], max_new_tokens=n, min_new_tokens=n, do_sample=False)
        results[case] = {
            "logits": logits,
            "generated": generated,
            "class_module": type(model).__module__,
            "zoo_imported": any(name == "zoo" or name.startswith("zoo.") for name in sys.modules),
        }
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
