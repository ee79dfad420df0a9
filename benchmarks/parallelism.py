"""MODELLED cost of one training step of a Llama-3-8B-like transformer over pipeline x tensor x context x data
parallelism (pp x tp x cp x dp GPUs).

Nothing here is measured: every number is an output of the formulas below, with inputs that are ASSUMED or
taken from spec sheets. Attention time comes from the ring model of ``benchmarks/scaling.py`` (``model``);
every other term is defined here.

Notation: layout (P, t, c, d) = (pp, tp, cp, dp), P*t*c*d = GPUs; N tokens per sequence; G sequences per step
(global batch); b sequences per micro-batch; m = G / (d*b) micro-batches per data-parallel replica per step;
L = N / c tokens per rank; n = layers / P layers per stage; h model dim, H / Hk query / K/V heads, D head dim,
f MLP hidden size (SwiGLU), V vocabulary, e bytes per element (bf16: 2). A link is (alpha s, beta bytes/s),
T(x) = alpha + x / beta (0 for x = 0) and AR_t(x) = 2(t-1) alpha + 2(t-1)/t * x / beta is a ring all-reduce of
x bytes on t ranks (0 for t = 1).

Placement (Megatron's default rank order tp-cp-dp-pp, tp fastest): a group spanning s consecutive GPUs runs on
NVLink when s <= GPUs per node, else at the InfiniBand rate (its slowest hop, as in scaling.py). Spans: TP t
(t must divide the GPUs per node); CP ring c*t (gpus_per_node / t ring ranks per node); DP x CP group (gradient
reduction) c*d*t; the pipeline chain P*c*d*t = every GPU, so with more than one node its boundary is InfiniBand.

Parameters: per layer W = 2hHD + 2hHkD + 3hf matrix parameters (Wq, Wo, Wk, Wv, gate, up, down) + 2h RMSNorm
weights; embedding V*h on the first stage; untied LM head V*h + final norm h on the last (8.03e9 in all).
Matrices and the vocabulary are split over TP (vocab-parallel embedding and head), norms are replicated.

One "slot" = forward + backward of one micro-batch on one GPU of a stage (Megatron TP, no sequence parallelism):
  matmul     n * 6 W b L / t / F_mm           (+ 6 V h b L / t / F_mm for the LM head on the last stage)
  attention  n * (fwd + bwd) of scaling.model(strategy, Shape(b, H/t, Hk/t, D, causal), hw', N, c), hw' with
             gpus_per_node / t ring ranks per node; strategy "ring-hierarchical" when the ring spans several nodes
             of several ring ranks (as dist_attn's topology="auto"), else "ring-zigzag". Whether its K/V hops hide
             behind the kernel is scaling.py's per-step max(compute, transfer).
  TP         n * 4 AR_t(b L h e): Megatron's 2 all-reduces forward (after attention, after the MLP) and 2 backward
             (the gradients of their inputs), on NVLink; + AR_t(b L h e) on the first stage (vocab-parallel
             embedding, forward) and on the last (LM head input gradient, backward). Not overlapped.
  p2p        T(forward bytes) unless last stage + T(backward bytes) unless first stage, the bytes of
             ``stage_boundary_bytes(b, L, h, e)`` (every TP rank sends its full replicated hidden; no
             scatter-gather optimisation) over the pipeline link. Not overlapped.
  slot = max over stages of (matmul + attention + TP + p2p): the slowest stage sets the pace.

Step (1F1B, Megatron's non-interleaved schedule): time = ideal * (1 + bubble), ideal = m * slot,
bubble = ``pipeline_bubble(P, m)`` = (P-1)/m (i.e. (m + P - 1) slots), plus the gradient reduction after the
pipeline flush (not overlapped): grad = 2(g-1) alpha + (g-1)/g * S * (4 + e) / beta over the DP x CP link,
g = c*d (context-parallel ranks hold the same weights): ZeRO-1 reduce-scatter of fp32 gradients, then all-gather
of the updated bf16 parameters; S = parameters per GPU of the largest stage. Not modelled (0 s): optimizer
step, norms, RoPE, SwiGLU and other elementwise work, softmax/loss, data loading, kernel launch gaps.

tokens/s per GPU = G N / (time * GPUs). MFU = model FLOPs / (time * GPUs * peak), model FLOPs per step =
G * (6 (layers W + V h) N + layers * 3 * 4 D H * N(N+1)/2): causal attention forward + 2x backward without
recomputation (the attention *time* uses scaling.py's flash-attention convention, backward 2.5x forward).

Memory per GPU = max over stages i = 0..P-1 of
  states       S_i (e + 4 + 12 / (c d)): bf16 weights, fp32 gradient accumulators, ZeRO-1 optimizer state
               (fp32 master weights, Adam m and v) sharded over the DP x CP ranks (Megatron's distributed
               optimizer: 6 + 12/d bytes per parameter)
  activations  min(P - i, m) micro-batches in flight (1F1B: stage 0 holds up to P) * n * b L * A_t,
               A_t = e (4h + (2HD + 2HkD + 4f) / t) + 4H / t bytes per token and layer: the inputs and outputs of
               both RMSNorms (replicated over TP), q, k, v, attention output, fp32 log-sum-exp, gate, up,
               silu(gate) and its product with up; no activation recomputation
  + on the last stage b L (2he + 6V/t): final norm input and output, logits in bf16 and fp32 for the loss.
fits = memory <= GPU memory (80 GB = 80e9 bytes); no allowance for temporaries, ring K/V buffers, NCCL buffers
or allocator fragmentation, so "fits" is optimistic.

    python -m benchmarks.parallelism         # writes benchmarks/results/parallelism_llama8b_128k.md and .png
    python -m benchmarks.parallelism --gpus 128 --tokens 262144 --global-batch 128 --out /tmp/x
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from dataclasses import dataclass

from benchmarks import scaling as sc
from benchmarks.common import RESULTS_DIR, md_row, write_result
from benchmarks.ring_sim import full_count

MATMUL_TFLOPS_ASSUMED = 600.0      # effective dense bf16 matmul throughput of an H100 SXM (ASSUMED, ~60% of peak)
PEAK_TFLOPS = 989.0                # H100 SXM dense bf16 peak (spec sheet), the MFU denominator
GPU_MEMORY_GB = 80.0
GRAD_BYTES = 4                     # fp32 gradient accumulators
OPTIMIZER_BYTES = 12               # fp32 master weights + Adam m and v, sharded by ZeRO-1
LSE_BYTES = 4
LOGIT_BYTES = 2 + 4                # bf16 logits + their fp32 copy for the loss


def _int_at_least(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def stage_boundary_bytes(micro_batch: int, tokens_per_rank: int, dim: int, dtype_bytes: int,
                         position_bytes: int = 8) -> dict[str, int]:
    """Bytes one rank sends to its neighbour stage per micro-batch in DeepSpeed's pipeline engine, where stages
    pass ``(hidden, positions)``: hidden (micro_batch, tokens_per_rank, dim) in the activation dtype, positions
    (tokens_per_rank,) int64 without a gradient. "forward": both tensors to the next stage; "backward": the
    gradient of hidden to the previous stage."""
    for name, value in (("micro_batch", micro_batch), ("tokens_per_rank", tokens_per_rank), ("dim", dim),
                        ("dtype_bytes", dtype_bytes)):
        _int_at_least(name, value)
    _int_at_least("position_bytes", position_bytes, 0)
    hidden = micro_batch * tokens_per_rank * dim * dtype_bytes
    return {"forward": hidden + tokens_per_rank * position_bytes, "backward": hidden}


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """(p - 1) / m: the idle fraction of Megatron's 1F1B schedule relative to the ideal time, in the convention
    time = ideal * (1 + (p - 1) / m), ideal = m micro-batch slots (p - 1 extra slots to fill and drain)."""
    _int_at_least("stages", stages)
    _int_at_least("micro_batches", micro_batches)
    return (stages - 1) / micro_batches


@dataclass(frozen=True)
class Transformer:
    """A dense decoder: GQA attention, SwiGLU MLP, RMSNorm, untied embedding and LM head (Llama-3-8B defaults)."""
    layers: int = 32
    dim: int = 4096
    heads: int = 32
    kv_heads: int = 8
    headdim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    dtype: str = "bfloat16"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "dtype":
                _int_at_least(f.name, getattr(self, f.name))
        sc.Shape(1, self.heads, self.kv_heads, self.headdim, self.dtype)   # heads % kv_heads, known dtype

    @property
    def e(self) -> int:
        return sc.ELEM_BYTES[self.dtype]

    @property
    def layer_matrix_params(self) -> int:
        h, qd, kvd = self.dim, self.heads * self.headdim, self.kv_heads * self.headdim
        return 2 * h * qd + 2 * h * kvd + 3 * h * self.ffn

    @property
    def params(self) -> int:
        return self.layers * (self.layer_matrix_params + 2 * self.dim) + 2 * self.vocab * self.dim + self.dim

    def activation_bytes_per_token(self, tp: int) -> float:
        """A_t: bytes one layer keeps per token for its backward (module docstring)."""
        sharded = 2 * self.heads * self.headdim + 2 * self.kv_heads * self.headdim + 4 * self.ffn
        return self.e * (4 * self.dim + sharded / tp) + LSE_BYTES * self.heads / tp


@dataclass(frozen=True)
class Cluster:
    """``hw``: attention kernel throughput, links, GPUs per node and ring-step overhead (scaling.py's Hardware)."""
    hw: sc.Hardware
    matmul_flops_per_s: float = MATMUL_TFLOPS_ASSUMED * 1e12
    peak_flops_per_s: float = PEAK_TFLOPS * 1e12
    memory_bytes: float = GPU_MEMORY_GB * 1e9


@dataclass(frozen=True)
class Layout:
    pp: int
    tp: int
    cp: int
    dp: int

    @property
    def gpus(self) -> int:
        return self.pp * self.tp * self.cp * self.dp

    def __str__(self):
        return f"pp{self.pp} tp{self.tp} cp{self.cp} dp{self.dp}"


def infeasible(layout: Layout, model: Transformer, tokens: int, global_batch: int, micro_batch: int = 1,
               gpus_per_node: int = 8) -> str:
    """'' when the layout can train this model, else why not."""
    if gpus_per_node % layout.tp:
        return f"tp {layout.tp} does not divide the {gpus_per_node} GPUs per node (TP all-reduces on NVLink)"
    if model.kv_heads % layout.tp:
        return f"tp {layout.tp} does not divide the {model.kv_heads} KV heads"
    if model.layers % layout.pp:
        return f"pp {layout.pp} does not divide the {model.layers} layers"
    if global_batch % (layout.dp * micro_batch):
        return f"dp x micro-batch ({layout.dp} x {micro_batch}) does not divide the global batch {global_batch}"
    if tokens % (2 * layout.cp):
        return f"tokens {tokens} is not a multiple of 2 * cp (zigzag layout)"
    return ""


def configurations(gpus: int, model: Transformer, tokens: int, global_batch: int, micro_batch: int = 1,
                   gpus_per_node: int = 8) -> list[Layout]:
    """Every feasible (pp, tp, cp, dp) with pp * tp * cp * dp = gpus."""
    divisors = [k for k in range(1, gpus + 1) if gpus % k == 0]
    layouts = [Layout(pp, tp, cp, gpus // (pp * tp * cp)) for pp in divisors for tp in divisors for cp in divisors
               if gpus % (pp * tp * cp) == 0]
    return [x for x in layouts if not infeasible(x, model, tokens, global_batch, micro_batch, gpus_per_node)]


def all_reduce_time(nbytes: float, ranks: int, link: sc.Link) -> float:
    return 2 * (ranks - 1) * link.alpha_s + 2 * (ranks - 1) / ranks * nbytes / link.beta_bytes_per_s


def attention_time(model: Transformer, hw: sc.Hardware, tp: int, cp: int, tokens: int, micro_batch: int):
    """(fwd + bwd s of one attention layer, ring strategy) from scaling.py's model, H/t heads per GPU."""
    shape = sc.Shape(micro_batch, model.heads // tp, model.kv_heads // tp, model.headdim, model.dtype, True)
    ring_hw = dataclasses.replace(hw, gpus_per_node=max(1, hw.gpus_per_node // tp))
    g = ring_hw.gpus_per_node
    strategy = "ring-hierarchical" if cp > g > 1 and cp % g == 0 else "ring-zigzag"
    return sc.model(strategy, shape, ring_hw, tokens, cp)["total"], strategy


def step(model: Transformer, cluster: Cluster, layout: Layout, tokens: int, global_batch: int,
         micro_batch: int = 1) -> dict:
    """The modelled training step of one layout (module docstring): time, its terms, throughput, memory."""
    hw = cluster.hw
    why = infeasible(layout, model, tokens, global_batch, micro_batch, hw.gpus_per_node)
    if why:
        raise ValueError(why)
    P, t, c, d = layout.pp, layout.tp, layout.cp, layout.dp
    m, L, n, e = global_batch // (d * micro_batch), tokens // c, model.layers // P, model.e
    tok = micro_batch * L                                       # tokens of one micro-batch on one GPU
    hidden_ar = all_reduce_time(tok * model.dim * e, t, hw.link(t))
    layer_mm = 6 * model.layer_matrix_params * tok / t / cluster.matmul_flops_per_s
    head_mm = 6 * model.vocab * model.dim * tok / t / cluster.matmul_flops_per_s
    attn, strategy = attention_time(model, hw, t, c, tokens, micro_batch)
    boundary = stage_boundary_bytes(micro_batch, L, model.dim, e)
    pp_link = hw.link(layout.gpus)
    vocab_shard = model.vocab * model.dim / t
    stages, params = [], []
    for i in range(P):
        first, last = i == 0, i == P - 1
        stages.append(dict(matmul=n * layer_mm + last * head_mm, attention=n * attn,
                           tp=(4 * n + first + last) * hidden_ar,
                           p2p=(not last) * pp_link.time(boundary["forward"])
                           + (not first) * pp_link.time(boundary["backward"])))
        params.append(n * (model.layer_matrix_params / t + 2 * model.dim) + first * vocab_shard
                      + last * (vocab_shard + model.dim))
    slowest = max(stages, key=lambda terms: sum(terms.values()))
    slot, bubble = sum(slowest.values()), pipeline_bubble(P, m)
    g, dp_link = c * d, hw.link(c * d * t)                      # the DP x CP group spans c*d*t GPUs
    grad = 0.0 if g == 1 else (2 * (g - 1) * dp_link.alpha_s
                               + (g - 1) / g * max(params) * (GRAD_BYTES + e) / dp_link.beta_bytes_per_s)
    time = m * slot * (1 + bubble) + grad
    act = model.activation_bytes_per_token(t)
    memory = max(params[i] * (e + GRAD_BYTES + OPTIMIZER_BYTES / g) + min(P - i, m) * n * tok * act
                 + (i == P - 1) * tok * (2 * model.dim * e + LOGIT_BYTES * model.vocab / t) for i in range(P))
    flops = global_batch * (6 * (model.layers * model.layer_matrix_params + model.vocab * model.dim) * tokens
                            + model.layers * 3 * sc.FWD_FLOPS_PER_PAIR * model.headdim * model.heads
                            * full_count(tokens, True))
    return dict(layout=layout, m=m, bubble=bubble, time=time, attention=strategy, memory=memory,
                fits=memory <= cluster.memory_bytes, tokens_per_s_gpu=global_batch * tokens / time / layout.gpus,
                mfu=flops / (time * layout.gpus * cluster.peak_flops_per_s),
                terms={**{k: m * v for k, v in slowest.items()}, "bubble": m * slot * bubble, "grad": grad})


def sweep(model: Transformer, cluster: Cluster, gpus: int, tokens: int, global_batch: int,
          micro_batch: int = 1) -> list[dict]:
    """``step`` of every feasible layout, best first: those that fit, by modelled tokens/s per GPU."""
    rows = [step(model, cluster, x, tokens, global_batch, micro_batch)
            for x in configurations(gpus, model, tokens, global_batch, micro_batch, cluster.hw.gpus_per_node)]
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s_gpu"]))


def default_cluster() -> tuple[Cluster, str]:
    """H100-like cluster; the attention kernel throughput from a committed GPU kernel result when one exists
    (scaling.gpu_kernel_result), else scaling.py's ASSUMED placeholder. Returns (cluster, its label)."""
    kernel = sc.gpu_kernel_result(RESULTS_DIR)
    if kernel:
        fwd, bwd, label = kernel[0], kernel[1], f"attention kernel {kernel[0]:g}/{kernel[1]:g} TFLOP/s fwd/bwd " \
                                                f"(measured, {kernel[2]})"
    else:
        fwd, bwd = sc.GPU_FWD_TFLOPS_ASSUMED, sc.GPU_BWD_TFLOPS_ASSUMED
        label = f"attention kernel {fwd:g}/{bwd:g} TFLOP/s fwd/bwd (ASSUMED: GPU kernel result pending)"
    hw = sc.Hardware("H100-like", fwd * 1e12, bwd * 1e12, sc.NVLINK, sc.INFINIBAND, 8,
                     sc.ScalingConfig.gpu_overhead_us * 1e-6, label)
    return Cluster(hw), label


def _tag(tokens, gpus):
    size = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
    return f"parallelism_llama8b_{size}" + ("" if gpus == 64 else f"_{gpus}gpu")


def report(rows, model, cluster, label, args, argv) -> str:
    hw, now = cluster.hw, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fit = sum(r["fits"] for r in rows)
    lines = [f"# Pipeline x tensor x context x data parallelism: Llama-3-8B-like, {args.tokens:,} tokens per "
             f"sequence, {args.gpus} GPUs (MODELLED)", "",
             "**MODELLED**: nothing here is measured. Every number is an output of the cost model in "
             "`benchmarks/parallelism.py` (every formula in its docstring); attention time from the ring model of "
             "`benchmarks/scaling.py`.", "",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.parallelism", *argv]) + f"` ({now})",
             f"- model: {model.layers} layers, dim {model.dim}, {model.heads} query / {model.kv_heads} KV heads of "
             f"{model.headdim}, SwiGLU MLP {model.ffn}, vocab {model.vocab} (untied head), {model.dtype}; "
             f"{model.params / 1e9:.2f}e9 parameters",
             f"- step: global batch {args.global_batch} sequences of {args.tokens:,} tokens "
             f"({args.global_batch * args.tokens / 1e6:.1f}M tokens), micro-batch {args.micro_batch} sequence(s), "
             "m = global batch / (dp x micro-batch) micro-batches per replica; 1F1B pipeline; Megatron TP without "
             "sequence parallelism; ZeRO-1 over the DP x CP ranks; no activation recomputation",
             f"- GPU (H100-like): dense matmul {cluster.matmul_flops_per_s / 1e12:g} TFLOP/s effective bf16 (ASSUMED); "
             f"{label}; MFU against {cluster.peak_flops_per_s / 1e12:g} TFLOP/s peak; {cluster.memory_bytes / 1e9:g} "
             f"GB memory; ring-step overhead {hw.overhead_s * 1e6:g} us (ASSUMED)",
             f"- links: {hw.gpus_per_node} GPUs per node on {hw.intra.name} {hw.intra.beta_bytes_per_s / 1e9:g} GB/s "
             f"({hw.intra.source}); {hw.inter.name} {hw.inter.beta_bytes_per_s / 1e9:g} GB/s per GPU "
             f"({hw.inter.source}); rank order tp-cp-dp-pp (tp fastest): a group spanning more than "
             f"{hw.gpus_per_node} GPUs runs at the InfiniBand rate",
             "- not modelled: optimizer step, elementwise work, loss, launch gaps, overlap of TP / pipeline / "
             "gradient communication with compute, temporary buffers (so `fits` is optimistic)",
             f"- {len(rows)} feasible layouts (tp divides {hw.gpus_per_node} and the {model.kv_heads} KV heads, pp "
             f"divides the layers, dp divides the global batch), {fit} fit in memory", "",
             "## Every layout, best first (MODELLED)", "",
             "bubble = (pp-1)/m; the time columns split the step: the slowest stage's m slots (matmul, attention, "
             "TP all-reduces, stage-boundary p2p), the pipeline bubble and the gradient reduction; CP ring: the ring "
             "attention model used (scaling.py), - for cp 1", ""]
    head = ["#", "pp", "tp", "cp", "dp", "m", "bubble", "step s", "tokens/s/GPU", "MFU", "memory GB/GPU", "fits",
            "matmul s", "attention s", "TP s", "p2p s", "bubble s", "grad s", "CP ring"]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for i, r in enumerate(rows, 1):
        x, t = r["layout"], r["terms"]
        lines.append(md_row([i, x.pp, x.tp, x.cp, x.dp, r["m"], f"{r['bubble']:.3f}", f"{r['time']:.2f}",
                             f"{r['tokens_per_s_gpu']:,.0f}", f"{r['mfu']:.1%}", f"{r['memory'] / 1e9:.1f}",
                             "yes" if r["fits"] else "no"]
                            + [f"{t[k]:.2f}" for k in ("matmul", "attention", "tp", "p2p", "bubble", "grad")]
                            + ["-" if x.cp == 1 else r["attention"].removeprefix("ring-")]))
    return "\n".join(lines) + "\n"


def plot(rows, args, cluster, plt, path):
    names = [str(r["layout"]) for r in rows]
    colors = ["C0" if r["fits"] else "lightgray" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 2 + 0.2 * len(rows)), sharey=True)
    axes[0].barh(names, [r["tokens_per_s_gpu"] for r in rows], color=colors)
    axes[0].set(xlabel="tokens/s per GPU (MODELLED)", title="throughput (MODELLED; grey: does not fit in memory)")
    axes[1].barh(names, [r["memory"] / 1e9 for r in rows], color=colors)
    axes[1].axvline(cluster.memory_bytes / 1e9, color="C3", ls="--", lw=1, label=f"{cluster.memory_bytes / 1e9:g} GB")
    axes[1].set(xlabel="memory per GPU, GB (MODELLED; log scale)", title="memory per GPU (MODELLED; max over stages)",
                xscale="log")
    axes[1].legend(fontsize=8)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=7)
        ax.title.set_fontsize(9)
    fig.suptitle(f"MODELLED: Llama-3-8B-like training step, {args.tokens:,} tokens/sequence, global batch "
                 f"{args.global_batch}, {args.gpus} H100-like GPUs, every pp x tp x cp x dp layout (best first)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2 + 0.2 * len(rows))))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallelism", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the .md and .png")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--tokens", type=int, default=131072, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, default=64, help="sequences per step")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    args = p.parse_args(argv)
    model = Transformer()
    cluster, label = default_cluster()
    try:
        for name in ("gpus", "tokens", "global_batch", "micro_batch"):
            _int_at_least(name, getattr(args, name))
        rows = sweep(model, cluster, args.gpus, args.tokens, args.global_batch, args.micro_batch)
    except ValueError as err:
        p.error(str(err))
    if not rows:
        p.error("no feasible layout")
    return write_result(args.out, _tag(args.tokens, args.gpus), report(rows, model, cluster, label, args, argv),
                        lambda plt, path: plot(rows, args, cluster, plt, path))


if __name__ == "__main__":
    main()
