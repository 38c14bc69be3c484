"""FLOP counters, one per sequence-mixing family, and the machine's measured matmul peak (for MFU).

A model's forward FLOPs at batch B and length T are

    dense  = 2 * B * T * sum(in * out of every nn.Linear applied per token)   (projections, MLPs, LM head)
    mixing = the family's own terms (below)

and a training step (forward + backward) counts ``3 * forward``: the backward of a product computes two products
of the same size (the gradients of both operands), and the same rule is applied to the mixing terms. A
multiply-add is 2 FLOPs; elementwise work outside the scans (norms, activations, gates, softmax) is not counted,
as is usual for MFU. The counts are *model* FLOPs: the work of the model's own equations, in the form its paper
computes them (the chunked form of retention and SSD computes full chunk-by-chunk blocks; BigBird's attention whole
blocks of its layout), not the waste of one implementation (padding to a block or chunk size, the banded tiles of
a sliding window beyond the window, projections of rows whose result is discarded, recomputation).

Families (forward, per layer that has the mixer; H heads, D head width):

* ``attention``: causal softmax attention, QK^T and PV over the T(T+1)/2 allowed pairs: 4 B H D T(T+1)/2.
* ``sliding_window`` (Longformer): the same over the pairs its window allows. ``attention_window`` w is the whole
  window, as in transformers: bidirectional |i - j| <= w / 2 (w / 2 on each side, w + 1 keys), causal
  0 <= i - j <= w (the w tokens before and the token itself: the same w + 1 keys). With g global tokens per row
  (``global_tokens``, the first g positions; 0 by default, as in the bench's masked-LM step), a local query also
  attends the global keys outside its window, and a global query all T keys; the global query/key/value
  projections (``q_global_proj`` and the others, which ``dense`` leaves out) then cost 2 C^2 for each global
  query and 2 x 2 C^2 for each token's global key and value, per layer. Without global tokens the model does not
  apply them.
* ``block_sparse`` (BigBird): 4 B H D per allowed (query, key) pair of its block layout (blocks of b tokens): the
  window and global blocks (counted once), r random blocks per non-global query block, every (earlier, if causal)
  block for a global query block; a block pair counts its real tokens (a shorter last block: its own size, no
  padding), and in the causal variant a block with itself counts the b (b + 1) / 2 pairs at or before the query.
  ``attention_type="original_full"``, and with ``transformers_compat`` an input of at most (5 + 2 r) b tokens
  (transformers' switch to full attention), count dense attention.
* ``retention`` (RetNet, chunk size c, key width Dk, value width Dv): per head, the intra-chunk products
  2 (Dk + Dv) n_i^2 for each chunk of n_i tokens, and the inter-chunk read-out and state update 4 Dk Dv per token.
* ``ssd`` (Mamba-2): as retention with Dk = state_size, Dv = head_dim, heads = num_heads, plus the causal
  depthwise convolution 2 K per token and channel (d_inner + 2 groups state_size channels).
* ``selective_scan`` (Mamba-1): per token, channel (d_inner) and state (N): 7 FLOPs (Delta A, its exp, the product
  with B Delta x, the state's multiply-add, C h's multiply-add), plus the convolution 2 K per token and channel.
* ``hybrid`` (Mamba-2 / attention stacks): ``ssd`` for its Mamba-2 layers, ``attention`` for its attention layers.
* ``wkv4`` (RWKV-4): 23 FLOPs per token and channel for the WKV recurrence with max tracking (output: 10, state
  update: 13; exponentials count 1).
* ``rwkv6``: per head and token, 7 D^2 + D for the matrix-valued state (decay, outer product and sum: 3 D^2;
  read-out with the bonus: 4 D^2 + D), plus the low-rank data-dependent projections (matrix parameters applied
  per token, 2 per weight).
* ``rwkv7``: 9 D^2 per head and token for the generalised delta rule S (diag(w) + a b^T) + v k^T (7 D^2) and its
  read-out (2 D^2), plus the low-rank projections as for ``rwkv6``.
* ``lsh_attention`` (Reformer, layers cycling through ``attn_layers``): chunks of c tokens (T padded to a multiple),
  each query attending its chunk and ``num_chunks_before`` / ``_after`` neighbours: 4 B H D T c (before + 1 +
  after) for a local layer; an LSH layer does that once per hash round after sorting, plus the hashing's random
  rotation 2 D (buckets / 2) per token, head and round (an unset ``num_buckets``: 2 T / c, as the model picks).
* ``infini`` (Infini-attention, segments of S tokens): causal attention inside each segment, plus per head and
  token the compressive memory's read-out 2 D^2 and update 2 D^2 (``linear``), or 4 D^2 (``delta``: the keys'
  retrieval first).
* ``rmt`` (Recurrent Memory Transformer over a transformer backbone, m memory tokens, segments of S): each segment
  runs as [m memory, S tokens, m memory]: causal attention over S + 2m positions per segment, and the 2m memory
  positions of every segment through the backbone's per-token projections and MLPs (``memory_tokens``: the dense
  per-token FLOPs times 2m per segment; the LM head included, an upper bound where memory logits are dropped).
* ``long_conv`` (Hyena, order N): for each of the N - 1 long convolutions over d channels, FFTs of size n = 2T
  (a real FFT counted 2.5 n log2 n): the input's forward and inverse transform per sequence, the filter's once
  per batch, the complex product 6 (n / 2 + 1); the implicit filter network once per position (T, not B T);
  the short depthwise convolution 2 K per token and each of the (N + 1) d channels.

Papers: Vaswani et al. 2017 (attention); Beltagy et al. 2020, arXiv:2004.05150; Zaheer et al. 2020,
arXiv:2007.14062; Sun et al. 2023, arXiv:2307.08621 (RetNet); Gu and Dao 2023, arXiv:2312.00752; Dao and Gu 2024,
arXiv:2405.21060; Peng et al. 2023, arXiv:2305.13048 (RWKV-4), 2024, arXiv:2404.05892 (RWKV-6), 2025,
arXiv:2503.14456 (RWKV-7); Kitaev et al. 2020, arXiv:2001.04451 (Reformer);
Munkhdalai et al. 2024, arXiv:2404.07143 (Infini-attention); Bulatov et al. 2022, arXiv:2207.06881 (RMT); Poli et al. 2023, arXiv:2302.10866 (Hyena). MFU as in Chowdhery et al. 2022
(PaLM, arXiv:2204.02311, appendix B).
"""

from __future__ import annotations

import inspect
import math
import time

import torch

# nn.Linear modules inside these classes are applied per position, not per token (Hyena's filter network)
PER_POSITION_CLASSES = ("ImplicitFilter",)
RWKV_LOW_RANK_CLASSES = ("RwkvTimeMix",)
# nn.Linear modules applied only to rows with global tokens (Longformer's global projections): their family counts them
GLOBAL_ONLY_LINEARS = {"LongformerSelfAttention": ("q_global_proj", "k_global_proj", "v_global_proj")}
# a family's term counting positions that run through the per-token layers besides the input tokens (RMT's memory)
EXTRA_TOKENS = "extra_tokens"


def causal_pairs(T: int) -> int:
    return T * (T + 1) // 2


def attention_flops(B: int, T: int, heads: int, head_dim: int, pairs: int | None = None) -> int:
    """QK^T and PV over ``pairs`` (query, key) pairs (default: causal)."""
    return 4 * B * heads * head_dim * (causal_pairs(T) if pairs is None else pairs)


def window_pairs(T: int, window: int, causal: bool, global_tokens: int = 0) -> int:
    """(query, key) pairs of Longformer's attention: the window (causal 0 <= i - j <= window; bidirectional
    |i - j| <= window // 2) and, bidirectional, the first ``global_tokens`` tokens as global: every query attends
    them, and they attend every key."""
    if causal:
        if global_tokens:
            raise ValueError("window_pairs: the causal sliding window has no global tokens")
        return sum(min(t + 1, window + 1) for t in range(T))
    half, g = window // 2, min(global_tokens, T)
    local = sum(
        min(t, half) + min(T - 1 - t, half) + 1 + min(g, max(0, t - half))  # window, then globals left of it
        for t in range(g, T)
    )
    return local + g * T


def block_sparse_pairs(
    T: int, block: int, window_blocks: int, global_blocks: int, random_blocks: int, causal: bool
) -> int:
    """(query, key) pairs of BigBird's block layout of ``block``-token blocks over T real tokens (the last block
    holds ``T`` mod ``block`` of them when that is not 0), causal blocks with themselves counting only the pairs at
    or before the query."""
    nb = -(-T // block)

    def size(n: int) -> int:
        return min(block, T - n * block)

    def pairs(n: int, m: int) -> int:
        return size(n) * (size(n) + 1) // 2 if causal and m == n else size(n) * size(m)

    total = 0
    for n in range(nb):
        is_global = n < global_blocks or (not causal and n >= nb - global_blocks)
        reach = n + 1 if causal else nb  # key blocks a query block may see at all
        if is_global:
            total += sum(pairs(n, m) for m in range(reach))
            continue
        if causal:
            window = set(range(max(0, n - window_blocks + 1), n + 1))
            glob = set(range(min(global_blocks, reach)))
        else:
            half = window_blocks // 2
            window = set(range(max(0, n - half), min(nb, n + half + 1)))
            glob = set(range(min(global_blocks, nb))) | set(range(max(0, nb - global_blocks), nb))
        fixed = window | glob
        # random key blocks are whole: the only short block, the last, is global or (causal) the query's own
        total += sum(pairs(n, m) for m in fixed) + min(random_blocks, reach - len(fixed)) * size(n) * block
    return total


def chunked_linear_attention_flops(B: int, T: int, heads: int, dk: int, dv: int, chunk: int) -> int:
    """Chunked linear attention (retention, SSD): intra-chunk blocks and inter-chunk state read/write."""
    full, rest = divmod(T, chunk)
    intra = 2 * (dk + dv) * (full * chunk * chunk + rest * rest)
    inter = 4 * dk * dv * T
    return B * heads * (intra + inter)


def rfft_flops(n: int) -> float:
    """A real FFT of size n: half of a complex radix-2 FFT's 5 n log2 n."""
    return 2.5 * n * math.log2(n)


def _layers(config) -> int:
    return config.num_hidden_layers


def _attention(config, B, T):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"attention": _layers(config) * attention_flops(B, T, heads, head_dim)}


def _sliding_window(config, B, T, global_tokens: int = 0):
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    g = min(global_tokens, T)
    out = {
        "sliding_window_attention": sum(
            attention_flops(B, T, heads, head_dim, window_pairs(T, w, config.causal, g))
            for w in config.attention_window[: _layers(config)]
        )
    }
    if g:
        # q_global_proj on the global tokens; k_global_proj and v_global_proj on every token (the global queries'
        # keys and values)
        out["global_projections"] = _layers(config) * 2 * config.hidden_size**2 * B * (g + 2 * T)
    return out


def _block_sparse(config, B, T):
    heads = config.num_attention_heads
    r, b = config.num_random_blocks, config.block_size
    switch = config.transformers_compat and not config.causal and T <= (5 + 2 * r) * b
    if config.attention_type == "original_full" or switch:
        pairs = causal_pairs(T) if config.causal else T * T
    else:
        pairs = block_sparse_pairs(T, b, config.window_blocks, config.global_blocks, r, config.causal)
    return {
        "block_sparse_attention": _layers(config)
        * attention_flops(B, T, heads, config.hidden_size // heads, pairs)
    }


def _retention(config, B, T):
    flops = chunked_linear_attention_flops(
        B, T, config.num_attention_heads, config.head_dim, config.value_head_dim, config.chunk_size
    )
    return {"retention": _layers(config) * flops}


def _ssd_layer(B, T, hidden, expand, heads, head_dim, state, groups, chunk, kernel) -> dict:
    d_inner = expand * hidden
    return {
        "ssd": chunked_linear_attention_flops(B, T, heads, state, head_dim, chunk),
        "conv": 2 * kernel * (d_inner + 2 * groups * state) * B * T,
    }


def _ssd_chunk(config) -> int:
    """The chunk length of a Mamba-2 mixer's scan: the config's, or (None) what the CPU path picks for its head sizes
    (``zoo.ops.retention.default_chunk_size``; the Triton kernels' 64 changes only the intra-chunk term)."""
    from zoo.ops.retention import default_chunk_size

    if config.chunk_size is not None:
        return config.chunk_size
    return default_chunk_size("torch", config.state_size, config.head_dim)


def _ssd(config, B, T):
    layer = _ssd_layer(
        B, T, config.hidden_size, config.expand, config.num_heads, config.head_dim, config.state_size,
        config.n_groups, _ssd_chunk(config), config.conv_kernel,
    )  # fmt: skip
    return {k: _layers(config) * v for k, v in layer.items()}


def _selective_scan(config, B, T):
    d_inner = config.expand * config.hidden_size
    return {
        "selective_scan": _layers(config) * 7 * B * T * d_inner * config.state_size,
        "conv": _layers(config) * 2 * config.conv_kernel * d_inner * B * T,
    }


def _hybrid(config, B, T):
    out = {"ssd": 0, "conv": 0, "attention": 0}
    for kind in config.layer_types:
        if kind == "attention":
            out["attention"] += attention_flops(B, T, config.num_attention_heads, config.head_dim)
        elif kind == "mamba2":
            m2 = config.mixer_config("mamba2")
            layer = _ssd_layer(
                B, T, config.hidden_size, m2.expand, m2.num_heads, m2.head_dim, m2.state_size, m2.n_groups,
                _ssd_chunk(m2), m2.conv_kernel,
            )  # fmt: skip
            out["ssd"] += layer["ssd"]
            out["conv"] += layer["conv"]
        else:
            raise ValueError(f"hybrid FLOP counter: no count for layer type {kind!r}")
    return out


def _wkv4(config, B, T):
    return {"wkv4": _layers(config) * 23 * B * T * config.attention_hidden_size}


def _rwkv_state(config, B, T, per_head):
    heads = config.attention_hidden_size // config.head_size
    return _layers(config) * B * T * heads * per_head(config.head_size)


def _rwkv6(config, B, T):
    return {"wkv6": _rwkv_state(config, B, T, lambda D: 7 * D * D + D)}


def _rwkv7(config, B, T):
    return {"wkv7": _rwkv_state(config, B, T, lambda D: 9 * D * D)}


def _lsh_attention(config, B, T):
    H, D = config.num_attention_heads, config.attention_head_size
    out = {"local_attention": 0, "lsh_attention": 0, "lsh_hashing": 0}
    for i in range(_layers(config)):
        kind = config.attn_layers[i % len(config.attn_layers)]
        prefix = "local" if kind == "local" else "lsh"
        c = getattr(config, f"{prefix}_attn_chunk_length")
        span = (
            getattr(config, f"{prefix}_num_chunks_before") + 1 + getattr(config, f"{prefix}_num_chunks_after")
        )
        padded = -(-T // c) * c
        pairs = padded * c * span
        if kind == "local":
            out["local_attention"] += attention_flops(B, T, H, D, pairs)
        else:
            rounds = config.num_hashes
            buckets = config.num_buckets or max(2, 2 * padded // c)
            buckets = buckets if isinstance(buckets, int) else math.prod(buckets)
            out["lsh_attention"] += rounds * attention_flops(B, T, H, D, pairs)
            out["lsh_hashing"] += rounds * 2 * D * (buckets // 2) * B * padded * H
    return out


def _segments(T: int, S: int) -> list[int]:
    return [S] * (T // S) + ([T % S] if T % S else [])


def _infini(config, B, T):
    H, D = config.num_attention_heads, config.head_dim
    pairs = sum(causal_pairs(s) for s in _segments(T, config.segment_length))
    memory = (6 if config.memory_update == "delta" else 4) * D * D
    return {
        "segment_attention": _layers(config) * attention_flops(B, T, H, D, pairs),
        "compressive_memory": _layers(config) * B * T * H * memory,
    }


def _rmt(config, B, T):
    backbone, m = config.backbone, config.num_mem_tokens
    H = backbone.num_attention_heads
    D = getattr(backbone, "head_dim", None) or backbone.hidden_size // H
    segments = _segments(T, config.segment_length)
    pairs = sum(causal_pairs(s + 2 * m) for s in segments)
    return {
        "attention": backbone.num_hidden_layers * attention_flops(B, T, H, D, pairs),
        EXTRA_TOKENS: B * 2 * m * len(segments),
    }


def _long_conv(config, B, T):
    d, N, K = config.hidden_size, config.order, config.short_filter_order
    n = 2 * T
    per_channel_seq = 2 * rfft_flops(n) + 6 * (n // 2 + 1)  # input rfft + irfft + complex product
    convs = (N - 1) * d
    return {
        "fft_conv": _layers(config) * convs * (B * per_channel_seq + rfft_flops(n)),
        "short_conv": _layers(config) * 2 * K * (N + 1) * d * B * T,
    }


FAMILIES = {
    "attention": _attention,
    "sliding_window": _sliding_window,
    "block_sparse": _block_sparse,
    "retention": _retention,
    "ssd": _ssd,
    "selective_scan": _selective_scan,
    "hybrid": _hybrid,
    "wkv4": _wkv4,
    "rwkv6": _rwkv6,
    "rwkv7": _rwkv7,
    "lsh_attention": _lsh_attention,
    "infini": _infini,
    "rmt": _rmt,
    "long_conv": _long_conv,
}


def _inside(module_names: dict, name: str, classes: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(type(module_names[".".join(parts[:i])]).__name__ in classes for i in range(len(parts)))


def linear_flops(model: torch.nn.Module, B: int, T: int) -> dict:
    """2 * in * out per token for every nn.Linear (per position for Hyena's filter network; none for Longformer's
    global projections, which its family counts), and for RWKV-6/7's low-rank matrices (parameters of two or more dimensions of the time mixing, each entry one multiply-add per
    token)."""
    modules = dict(model.named_modules())
    per_token = per_position = low_rank = 0
    for name, module in modules.items():
        if isinstance(module, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            if attr in GLOBAL_ONLY_LINEARS.get(type(modules[parent]).__name__, ()):
                continue
            if _inside(modules, name, PER_POSITION_CLASSES):
                per_position += 2 * module.in_features * module.out_features
            else:
                per_token += 2 * module.in_features * module.out_features
        elif type(module).__name__ in RWKV_LOW_RANK_CLASSES:
            for p in module.parameters(recurse=False):
                if p.dim() >= 2 and min(p.shape[-2:]) > 1:
                    low_rank += 2 * p.numel()
    out = {"dense": per_token * B * T}
    if per_position:
        out["filter_network"] = per_position * T
    if low_rank:
        out["low_rank"] = low_rank * B * T
    return out


def forward_flops(model: torch.nn.Module, family: str, B: int, T: int, **options) -> dict:
    """The forward FLOPs of ``model`` at batch B, length T, by term; ``total`` is their sum. ``options`` go to the
    family's counter (``sliding_window``: ``global_tokens`` per row)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown FLOP family {family!r}; expected one of {sorted(FAMILIES)}")
    dense = linear_flops(model, B, T)
    counter = FAMILIES[family]
    accepted = set(inspect.signature(counter).parameters) - {"config", "B", "T"}
    if set(options) - accepted:
        raise ValueError(
            f"FLOP family {family!r} does not take the options {sorted(set(options) - accepted)} "
            f"(it takes {sorted(accepted) or 'none'})"
        )
    mixing = counter(model.config, B, T, **options)
    extra = mixing.pop(EXTRA_TOKENS, 0)
    if extra:
        dense["memory_tokens"] = dense["dense"] // (B * T) * extra
    terms = {**dense, **mixing}
    terms = {k: int(v) for k, v in terms.items()}
    terms["total"] = sum(terms.values())
    return terms


def training_flops(model: torch.nn.Module, family: str, B: int, T: int, **options) -> int:
    """Forward + backward: 3 x forward."""
    return 3 * forward_flops(model, family, B, T, **options)["total"]


def measured_matmul_flops(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> int | None:
    """torch's own count (``torch.utils.flop_counter``) of the matmul, convolution and attention FLOPs of one
    forward: an independent cross-check of :func:`forward_flops` (it does not see FFTs or elementwise scans, nor, on
    the CPU, ``scaled_dot_product_attention``, for which it counts 0: attention through SDPA is missing from it)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # older torch
        return None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, **kwargs)
    return int(counter.get_total_flops())


def peak_matmul_flops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5
) -> dict:
    """The machine's matmul FLOP/s: the best of ``repeats`` timed (size x size) @ (size x size) products (after one
    untimed), 2 size^3 FLOPs each. The best, not the median: the peak is what the hardware can reach."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    inner = 10 if torch.device(device).type == "cuda" else 1
    times = []
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync()
        if i:
            times.append((time.perf_counter() - start) / inner)
    best = min(times)
    return {
        "flops_per_s": 2 * size**3 / best,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "times_s": times,
        "method": f"best of {repeats} ({size} x {size}) @ ({size} x {size}) products, 2 n^3 FLOPs each",
    }


__all__ = [
    "FAMILIES",
    "attention_flops",
    "block_sparse_pairs",
    "chunked_linear_attention_flops",
    "forward_flops",
    "linear_flops",
    "measured_matmul_flops",
    "peak_matmul_flops",
    "training_flops",
    "window_pairs",
]
