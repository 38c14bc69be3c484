"""``python -m bench.mamba``: zoo's Mamba (or, with ``--arch mamba2``, Mamba-2; with ``--arch bamba``, the
Mamba-2/attention hybrid) against transformers' ``MambaForCausalLM`` (``Mamba2ForCausalLM``,
``BambaForCausalLM``) on the same weights.

Both models hold the same weights (transformers' model converted with ``zoo.convert``'s converter), and
the run first checks that their logits agree (relative error < 1e-4): a ratio between models that compute
different things would mean nothing. Then, in one process and interleaved (A B, B A, ...):

* **training step** (forward + backward of the causal-LM loss, batch 1) at each ``--lengths`` T; the ratio is
  transformers' time over zoo's, per adjacent pair, median over pairs. transformers' Mamba-1 CPU path is a
  Python loop over time steps (its Mamba-2 path is chunked); ``--reference-max-length`` skips it beyond a length (zoo alone is still timed there, for the
  scaling exponent: a least-squares fit of log time against log T).
``--arch bamba`` builds a Bamba-style stack (Mamba-2 layers, one attention layer in the middle, an MLP after
each) and defaults to T = 4096 for both models.

* **chunk length**: zoo's Mamba-2 scan picks its chunk from the head sizes (``chunk_size`` None); transformers
  runs at ``--reference-chunk-size``: ``zoo`` (the default) gives it the same chunk as zoo's scan, so the ratio
  compares implementations on the same chunking; a number (transformers' default is 256) times it as configured.

* **decoding**: ms per token with the cache after prefills of ``--decode-contexts`` tokens (zoo only; the ratio
  of the longest to the shortest context says whether decoding is O(1) in the context).

    python -m bench.mamba                                        # T = 2048 pair, zoo to 16K, decode 1K / 16K
    python -m bench.mamba --quick                                # tiny, seconds
    python -m bench.mamba --arch mamba2 --lengths 2048 --reference-max-length 2048
    python -m bench.mamba --arch bamba                           # T = 4096 pair, decode 1K / 16K
    python -m bench.mamba --arch mamba2 --lengths 2048 --reference-chunk-size 256   # transformers' default chunk
    python -m bench.mamba --lengths 2048 --repeats 3 --out bench/results/mamba_cpu2.json
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm

from bench.harness import (
    REPO_ROOT,
    _gc_paused,
    _pair_order,
    linear_fit,
    machine_info,
    median,
    random_ids,
    train_step,
    write_json,
)
from zoo.models.utils import CACHE_NAME, output_cache

QUICK = dict(
    hidden_size=32, layers=2, lengths=[64, 128], repeats=2, decode_contexts=[32, 128], decode_steps=4
)


# Each arch's default training lengths and the longest one transformers is timed at.
DEFAULT_LENGTHS = {"mamba": [2048, 4096, 8192, 16384], "mamba2": [2048, 4096, 8192, 16384], "bamba": [4096]}
DEFAULT_REFERENCE_MAX = {"mamba": 2048, "mamba2": 2048, "bamba": 4096}


def build_models(arch: str, hidden_size: int, layers: int, state_size: int, seed: int = 0):
    """transformers' Mamba (Mamba-2, Bamba) with random weights, and zoo's converted from it."""
    import transformers

    torch.manual_seed(seed)
    if arch == "bamba":
        from zoo.models.hybrid.convert_bamba import from_transformers

        head_dim = min(64, 2 * hidden_size)
        config = transformers.BambaConfig(
            vocab_size=259,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=max(2, hidden_size // 64),
            num_key_value_heads=max(2, hidden_size // 64),
            attn_layer_indices=[layers // 2],
            mamba_n_heads=2 * hidden_size // head_dim,
            mamba_d_head=head_dim,
            mamba_d_state=state_size,
            mamba_n_groups=1,
            mamba_chunk_size=64,
        )
        reference = transformers.BambaForCausalLM(config)
        return from_transformers(reference).train(), reference.train()
    sizes = dict(vocab_size=259, hidden_size=hidden_size, num_hidden_layers=layers, state_size=state_size)
    if arch == "mamba":
        from zoo.models.mamba.convert_mamba import from_transformers

        reference = transformers.MambaForCausalLM(transformers.MambaConfig(**sizes))
    else:
        from zoo.models.mamba2.convert_mamba2 import from_transformers

        head_dim = min(64, 2 * hidden_size)
        config = transformers.Mamba2Config(
            **sizes, head_dim=head_dim, num_heads=2 * hidden_size // head_dim, n_groups=1, chunk_size=64
        )
        reference = transformers.Mamba2ForCausalLM(config)
    return from_transformers(reference).train(), reference.train()


def set_reference_chunk_size(reference, zoo_model, chunk: str | int):
    """transformers' Mamba-2 mixers at ``chunk``: ``"zoo"`` (zoo's scan's chunk on this device) or a number."""
    from bench.entries.mamba import same_chunk_size, set_chunk_size

    if str(chunk) == "zoo":
        return same_chunk_size(reference, zoo_model)
    if not str(chunk).isdigit() or int(chunk) < 1:
        raise SystemExit(f"--reference-chunk-size must be 'zoo' or a positive integer, got {chunk!r}")
    return set_chunk_size(reference, int(chunk))


@torch.no_grad()
def logits_agree(zoo_model, reference, length: int = 128) -> float:
    ids = random_ids(259, length, seed=1)
    ours, theirs = zoo_model(ids, use_cache=False).logits, reference(ids).logits
    return ((ours - theirs).norm() / theirs.norm()).item()


def time_training(models: dict, lengths, repeats: int, reference_max_length: int, bar) -> list[dict]:
    rows = []
    for length in lengths:
        ids = random_ids(259, length, seed=length)
        names = [n for n in models if n == "zoo" or length <= reference_max_length]
        for name in names:  # one untimed step each
            train_step(models[name], ids)
        times = {n: [] for n in names}
        for r in range(repeats):
            for name in _pair_order(r, names):
                bar.set_postfix_str(f"train {name} T={length} ({r + 1}/{repeats})")
                with _gc_paused():
                    start = time.perf_counter()
                    train_step(models[name], ids)
                    times[name].append(time.perf_counter() - start)
                bar.update()
        row = {"seq_len": length, **{f"{n}_step_s": t for n, t in times.items()}}
        if "transformers" in times:
            paired = [t / z for t, z in zip(times["transformers"], times["zoo"])]
            row["speedup_paired"], row["speedup_median"] = paired, median(paired)
        rows.append(row)
    return rows


@torch.inference_mode()
def time_decoding(model, contexts, steps: int, bar) -> list[dict]:
    out = []
    model.eval()
    for context in contexts:
        bar.set_postfix_str(f"decode zoo @ {context}")
        prefill = model(input_ids=random_ids(259, context, seed=context), use_cache=True)
        cache, token = output_cache(prefill), prefill.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            step = model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})
            times.append(time.perf_counter() - start)
            cache, token = output_cache(step), step.logits[:, -1:].argmax(-1)
        out.append({"context": context, "ms_per_token_median": 1e3 * median(times[2:])})
        bar.update()
    model.train()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mamba", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("mamba", "mamba2", "bamba"), default="mamba")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state-size", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 2K to 16K (bamba: 4K)")
    p.add_argument(
        "--reference-max-length",
        type=int,
        default=None,
        help="time transformers up to this T (default 2K; bamba 4K)",
    )
    p.add_argument(
        "--reference-chunk-size",
        default="zoo",
        help="transformers' Mamba-2 chunk length: 'zoo' (the same as zoo's scan, default) or a number",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = DEFAULT_LENGTHS[args.arch]
    if args.reference_max_length is None:
        args.reference_max_length = DEFAULT_REFERENCE_MAX[args.arch]
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.reference_max_length = max(args.lengths)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo_model, reference = build_models(args.arch, args.hidden_size, args.layers, args.state_size)
    if args.arch != "mamba":
        set_reference_chunk_size(reference, zoo_model, args.reference_chunk_size)
    error = logits_agree(zoo_model, reference)
    if not error < 1e-4:
        raise SystemExit(
            f"zoo and transformers {args.arch} disagree (relative logit error {error:.2e}): not timing"
        )
    n_ref = sum(1 for t in args.lengths if t <= args.reference_max_length)
    total = args.repeats * (len(args.lengths) + n_ref) + len(args.decode_contexts)
    started = time.time()
    with tqdm(total=total, desc="bench.mamba", unit="step", disable=args.no_progress) as bar:
        training = time_training(
            {"zoo": zoo_model, "transformers": reference},
            args.lengths,
            args.repeats,
            args.reference_max_length,
            bar,
        )
        decoding = time_decoding(zoo_model, args.decode_contexts, args.decode_steps, bar)
    zoo_times = [median(r["zoo_step_s"]) for r in training]
    fit = (
        linear_fit([math.log(t) for t in args.lengths], [math.log(s) for s in zoo_times])
        if len(training) > 1
        else None
    )
    result = {
        "command": "python -m bench.mamba " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "config": vars(args),
        "params": sum(p.numel() for p in zoo_model.parameters()),
        "logits_relative_error": error,
        "training": training,
        "zoo_time_exponent": fit["slope"] if fit else None,
        "decoding": decoding,
        "wall_time_s": time.time() - started,
    }
    chunks = sorted({m.chunk_size for m in reference.modules() if type(m).__name__.endswith("Mixer")
                     and hasattr(m, "chunk_size")})  # fmt: skip
    result["reference_chunk_size"] = chunks[0] if len(chunks) == 1 else None
    lines = [
        f"zoo vs transformers {args.arch} ({result['params']:,} parameters, logits agree to {error:.1e})"
        + (f", transformers' chunk {chunks[0]}" if len(chunks) == 1 else "")
    ]
    for row in training:
        ratio = f"{row['speedup_median']:.1f}x" if "speedup_median" in row else "(zoo only)"
        lines.append(f"  train T={row['seq_len']}: zoo {median(row['zoo_step_s']):.3f} s/step  ratio {ratio}")
    if fit:
        lines.append(f"  zoo training time ~ T^{fit['slope']:.2f}")
    for d in decoding:
        lines.append(f"  decode @ {d['context']}: {d['ms_per_token_median']:.2f} ms/token")
    print("\n".join(lines))
    out = args.out or REPO_ROOT / "bench" / "results" / f"{args.arch}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    print("wrote", write_json(result, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
