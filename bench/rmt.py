"""``python -m bench.rmt``: the Recurrent Memory Transformer (Bulatov et al., 2022, arXiv:2207.06881) over the
baseline transformer, against the number of segments: training tokens/s and the bytes autograd keeps for the
backward (counted by a saved-tensor hook, so the same on every device), with full BPTT, truncated BPTT
(``--bptt-depth``), per-segment gradient checkpointing, and truncated BPTT with the loss on the last
``--answer-tokens`` tokens only (an answer at the end, as in passkey and bAbI training: the segments before the
truncation then keep no graph at all); and decoding ms per token after prompts of 1 and of all segments (flat if
the inference cost does not grow with the input).

    python -m bench.rmt --quick                       # tiny, seconds
    python -m bench.rmt --segments 1 2 4 8 16 --out bench/results/rmt_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.harness import machine_info, median, random_ids, write_json
from zoo.models.registry import sized_config
from zoo.models.rmt import RMTForCausalLM
from zoo.models.utils import CACHE_NAME, output_cache


def saved_bytes_and_time(model, ids, answer_tokens: int | None = None) -> tuple[int, float]:
    """Bytes saved for the backward and seconds of one training step; the loss on every token, or on the last
    ``answer_tokens`` only."""
    labels = ids
    if answer_tokens is not None:
        labels = torch.full_like(ids, -100)
        labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total, time.perf_counter() - start


@torch.no_grad()
def decode_ms(model, ids, steps: int) -> float:
    out = model(ids, use_cache=True)
    times = []
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        out = model(nxt, use_cache=True, **{CACHE_NAME: output_cache(out)})
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.rmt", description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--segment-length", type=int, default=128)
    p.add_argument("--num-mem-tokens", type=int, default=16)
    p.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--bptt-depth", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=8, help="the answer-loss setting's labelled tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden_size, args.layers, args.segment_length, args.num_mem_tokens = 32, 2, 16, 4
        args.segments, args.repeats, args.decode_steps = [1, 2, 4], 1, 2
    settings = {
        "full": {},
        f"bptt_depth={args.bptt_depth}": {"bptt_depth": args.bptt_depth},
        "checkpointed": {},
        f"bptt_depth={args.bptt_depth}, answer loss": {"bptt_depth": args.bptt_depth},
    }
    rows = []
    for name, extra in settings.items():
        torch.manual_seed(0)
        config = sized_config("zoo_rmt", args.hidden_size, args.layers, **extra)
        config.num_mem_tokens, config.segment_length = args.num_mem_tokens, args.segment_length
        model = RMTForCausalLM(config).train()
        if name == "checkpointed":
            model.activation_checkpointing_enable()
        for n in args.segments:
            ids = random_ids(config.vocab_size, n * args.segment_length, seed=n)
            answer = args.answer_tokens if name.endswith("answer loss") else None
            runs = [saved_bytes_and_time(model, ids, answer) for _ in range(args.repeats)]
            seconds = median([t for _, t in runs])
            rows.append(
                {
                    "setting": name,
                    "segments": n,
                    "tokens_per_s": ids.numel() / seconds,
                    "saved_mb": runs[0][0] / 2**20,
                }
            )
            print(
                f"{name:>26}  segments {n:>3}  {rows[-1]['tokens_per_s']:9.0f} tok/s  {rows[-1]['saved_mb']:8.1f} MB saved"
            )
    model.eval()
    decode = {}
    for n in (args.segments[0], args.segments[-1]):
        decode[n] = decode_ms(
            model, random_ids(config.vocab_size, n * args.segment_length, seed=n), args.decode_steps
        )
        print(f"decode after {n} segments: {decode[n]:.2f} ms/token")
    if args.out:
        write_json({"machine": machine_info(), "args": vars(args), "training": rows, "decode_ms": decode}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
