"""Run exported zoo models where zoo cannot be imported: ``python -I no_zoo_runner.py COMMAND SPEC.json OUT``.

``load``: ``SPEC.json`` is ``{"folders": {case: exported folder}, "new_tokens": n}``; each folder holds ``ids.pt``.
Writes (``torch.save``), per case, the logits over ``ids``, the greedy generation from ``ids[:1, :7]``, the module
of the loaded class and whether zoo got imported.

``lm_eval``: ``SPEC.json`` is ``{"folder": exported folder, "tasks_dir": ..., "tasks": [...], "model_args": ...}``;
runs ``lm_eval.simple_evaluate(model="hf", pretrained=folder, trust_remote_code=True, ...)`` and writes (JSON) each
sample's arguments and responses, and every forward of the loaded model: the tokens it was given, during which
``generate`` call, and the number of elements of the cache it returned.

The tests call :func:`load_without_zoo` and :func:`lm_eval_without_zoo`, which start this file in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def forbid_zoo() -> None:
    """Remove the editable install's finder and the repository from the import path; check ``import zoo``
    fails."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    sys.path[:] = [p for p in sys.path if p and not os.path.isdir(f"{p}/zoo")]
    try:
        import zoo  # noqa: F401
    except ImportError:
        return
    raise SystemExit(
        f"zoo is importable here (from {sys.modules['zoo'].__file__}); the check would prove nothing"
    )


def zoo_imported() -> bool:
    return any(name == "zoo" or name.startswith("zoo.") for name in sys.modules)


def load(spec: dict, results_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

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
            "zoo_imported": zoo_imported(),
        }
    torch.save(results, results_path)


def _numel(obj, depth: int = 0) -> int:
    """Elements of every tensor reachable from ``obj`` (a cache: its dicts, lists and attributes)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if depth > 4 or obj is None or isinstance(obj, (int, float, str, bool)):
        return 0
    if isinstance(obj, dict):
        return sum(_numel(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_numel(v, depth + 1) for v in obj)
    return sum(_numel(v, depth + 1) for v in getattr(obj, "__dict__", {}).values())


def _instrument(model, forwards: list) -> None:
    """Record every forward of ``model`` (input length, ``generate`` call, size of the cache it returned)."""
    calls = {"count": 0, "current": None}
    generate = model.generate

    def counted_generate(*args, **kwargs):
        calls["current"] = calls["count"]
        calls["count"] += 1
        try:
            return generate(*args, **kwargs)
        finally:
            calls["current"] = None

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = getattr(output, "past_key_values", None)
        forwards.append(
            {
                "generate_call": calls["current"],
                "length": ids.shape[1],
                "cache_class": type(cache).__name__,
                "cache_numel": _numel(cache),
            }
        )

    model.generate = counted_generate
    model.register_forward_hook(hook, with_kwargs=True)


def run_lm_eval(spec: dict, results_path: str) -> None:
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    forwards, loaded = [], []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def instrumented(*args, **kwargs):
        model = from_pretrained(*args, **kwargs)
        loaded.append(type(model).__module__)
        _instrument(model, forwards)
        return model

    transformers.AutoModelForCausalLM.from_pretrained = instrumented
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={spec['folder']},trust_remote_code=True,{spec['model_args']}",
        tasks=spec["tasks"],
        device="cpu",
        batch_size=spec.get("batch_size", 2),
        task_manager=TaskManager(include_path=spec["tasks_dir"], include_defaults=False),
        log_samples=True,
    )
    samples = {
        task: [{"arguments": s["arguments"], "filtered_resps": s["filtered_resps"]} for s in task_samples]
        for task, task_samples in results["samples"].items()
    }
    out = {
        "tasks": sorted(results["results"]),
        "samples": samples,
        "forwards": forwards,
        "class_modules": loaded,
        "zoo_imported": zoo_imported(),
    }
    Path(results_path).write_text(json.dumps(out, default=str))


def _run(command: str, spec: dict, workdir: Path, results: Path) -> None:
    """This file in a fresh interpreter (``-I``: no PYTHONPATH, no user site), offline."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_MODULES_CACHE=str(workdir / "modules"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    done = subprocess.run(
        [sys.executable, "-I", __file__, command, str(workdir / "spec.json"), str(results)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def load_without_zoo(folders: dict, workdir: Path, new_tokens: int) -> dict:
    """:func:`load` of ``folders`` ({case: exported folder holding ids.pt}) in a zoo-free subprocess."""
    import torch

    workdir = Path(workdir)
    spec = {"folders": {case: str(folder) for case, folder in folders.items()}, "new_tokens": new_tokens}
    _run("load", spec, workdir, workdir / "results.pt")
    return torch.load(workdir / "results.pt")


def lm_eval_without_zoo(folder, tasks_dir, tasks: list[str], workdir: Path, model_args: str = "") -> dict:
    """:func:`run_lm_eval` on the exported ``folder`` in a zoo-free subprocess."""
    workdir = Path(workdir)
    spec = {"folder": str(folder), "tasks_dir": str(tasks_dir), "tasks": tasks, "model_args": model_args}
    _run("lm_eval", spec, workdir, workdir / "lm_eval.json")
    return json.loads((workdir / "lm_eval.json").read_text())


if __name__ == "__main__":
    command, spec_path, results_path = sys.argv[1:]
    forbid_zoo()
    spec = json.loads(Path(spec_path).read_text())
    {"load": load, "lm_eval": run_lm_eval}[command](spec, results_path)
