"""``python -m bench.generate``: decoding cost per token through ``model.generate()``, after short and long prompts.

The suite's decode workload steps a model's forward by hand with its cache; this one runs what users run: greedy
``generate()`` over a random prompt of each context length (the prompt prefilled by ``generate()`` itself), with
a stopping criterion that only records the time at which each new token arrives. An entry's ``prepare_decode``
runs first, as in the suite (Hyena's filters distilled into recurrences). The seconds between consecutive
tokens, after the first (which includes the prefill), are the per-token decoding cost with everything
``generate()`` adds (input preparation, the attention mask it grows, logits processing, the cache update). A model
whose cache is O(1) per token (RWKV, Mamba, RetNet, ...) should show the same cost at every context length; the
ratio of the longest context's median to the shortest's is the figure of merit (the target of issues 13 and 14:
within 1.2x from 1K to 16K).

    python -m bench.generate --entries rwkv4 rwkv6 rwkv7 mamba mamba2 hyena --contexts 1024 16384 --new-tokens 32
    python -m bench.generate --entries rwkv7 --contexts 64 256 --new-tokens 8 --hidden-size 64 --layers 2  # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bench.harness import machine_info, median, random_ids
from bench.registry import load_entries

TARGET_RATIO = 1.2  # per-token cost at the longest context over the shortest


class TokenClock(StoppingCriteria):
    """Records ``time.perf_counter()`` each time ``generate()`` has produced a token; never stops anything."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def time_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict:
    """One greedy ``generate()`` of ``new_tokens`` tokens after ``ids``: the prefill (prompt to first token) and
    the seconds between consecutive later tokens."""
    clock = TokenClock()
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    if out.shape[1] != ids.shape[1] + new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(
            f"generate() made {out.shape[1] - ids.shape[1]} tokens ({len(clock.stamps)} stamps), "
            f"expected {new_tokens}"
        )
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"prefill_s": clock.stamps[0] - start, "step_s": gaps}


def run(
    entries: list[str], contexts: list[int], new_tokens: int, hidden_size: int, layers: int, seed: int = 0
):
    """Per entry: ms per token through ``generate()`` at each context, and the longest over the shortest."""
    if new_tokens < 3:
        raise ValueError(
            f"--new-tokens must be at least 3 (the first token includes the prefill), got {new_tokens}"
        )
    if sorted(contexts) != contexts or len(set(contexts)) != len(contexts):
        raise ValueError(f"--contexts must be increasing, got {contexts}")
    known = load_entries()
    unknown = [name for name in entries if name not in known]
    if unknown:
        raise ValueError(f"unknown entries {unknown}; known: {sorted(known)}")
    not_causal = [name for name in entries if known[name].objective != "causal_lm"]
    if not_causal:
        raise ValueError(f"entries without generate() (not causal LMs): {not_causal}")
    results = {}
    for name in entries:
        torch.manual_seed(seed)
        entry = known[name]
        model = entry.make(hidden_size, layers, contexts[-1] + new_tokens).eval()
        # what the entry does before decoding (Hyena: its filters distilled into recurrences), as the suite does
        prepared = entry.prepare_decode(model, contexts[-1]) if entry.prepare_decode is not None else None
        per_context = []
        for ctx in contexts:
            ids = random_ids(model.config.vocab_size, ctx, seed + ctx)
            timed = time_generate(model, ids, new_tokens)
            per_context.append(
                {
                    "context": ctx,
                    "prefill_s": timed["prefill_s"],
                    "ms_per_token_median": 1e3 * median(timed["step_s"]),
                    "ms_per_token": [1e3 * s for s in timed["step_s"]],
                }
            )
            print(f"{name} context {ctx}: {per_context[-1]['ms_per_token_median']:.2f} ms/token", flush=True)
            gc.collect()
        ratio = per_context[-1]["ms_per_token_median"] / per_context[0]["ms_per_token_median"]
        results[name] = {
            "per_context": per_context,
            "ratio_longest_over_shortest": ratio,
            "prepared": prepared,
        }
        del model
        gc.collect()
    return results


def table(results: dict, contexts: list[int]) -> str:
    head = "| entry | " + " | ".join(f"ms/token @ {c}" for c in contexts) + " | longest / shortest |"
    lines = [head, "|---|" + "---:|" * (len(contexts) + 1)]
    for name, res in results.items():
        cells = [f"{row['ms_per_token_median']:.2f}" for row in res["per_context"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res['ratio_longest_over_shortest']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entries", nargs="+", default=["rwkv4", "rwkv6", "rwkv7"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, help="write result.json and table.md here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.entries, args.contexts, args.new_tokens, args.hidden_size, args.layers)
    text = table(results, args.contexts)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        command = "python -m bench.generate " + " ".join(
            argv if argv is not None else __import__("sys").argv[1:]
        )
        payload = {
            "command": command,
            "machine": machine_info(),
            "threads": torch.get_num_threads(),
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "new_tokens": args.new_tokens,
            "target_ratio": TARGET_RATIO,
            "results": results,
        }
        (args.out_dir / "result.json").write_text(json.dumps(payload, indent=1))
        (args.out_dir / "table.md").write_text(f"Command: `{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
