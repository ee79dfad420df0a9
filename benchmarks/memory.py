"""Peak memory per rank of one sequence-parallel training step: a formula (``predict``, MODELLED), MEASURED on CPU.

MEASURED (``benchmarks/results/memory_cpu.md``): the peak CPU tensor memory of step 2 of ``launch.train`` (the
real training loop, ``launch.train.train`` with its ``train_step`` wrapped in marker allocations) on each rank
of a 2-rank gloo world (``launch.spawn.run_world``), float32, torch kernel backend. How: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free of PyTorch's CPU allocator; the running sum of those
events in time order is the tensor memory allocated since tracing began (the method of tests/test_memory.py).
Tracing starts before the model and the optimizer are built, so the traced level at the start of step 2 holds the
parameters, the gradient buffers (``zero_grad(set_to_none=False)`` keeps them) and AdamW's state (made by step
1). One catch: the profiler only sees frees on the thread it traces, and a tensor whose last reference goes on a
gloo thread (launch.train's flat gradient all-reduce buffer, now and then) is freed unseen, which would shift the
level. So the reported peak = that state counted from the tensors (model parameters, ``.grad``, optimizer state)
+ the traced increase of step 2 (forward, backward, all-reduce, clipping, AdamW) over its start; the larger rank.
``gc.collect()`` runs before each traced step (a checkpointed model is a reference cycle). That counts tensor
bytes exactly (no allocator caching on CPU, no Python objects); the process RSS is not what is compared.

MODELLED: ``predict`` (every term below) and everything in ``benchmarks/results/memory_projection.md`` and .png:
the longest sequence that fits on 80 GB / 141 GB GPUs for Llama-3-8B-like and 70B-like shapes. The formula is
validated against the measurements for launch.model (LayerNorm, 4x GELU MLP, untied head, float32, replicated
model state, the CPU torch kernel, a flat ring of 2); the projection uses what was not measured: bf16, a gated
(SwiGLU) MLP, mixed-precision AdamW, model state sharded ZeRO-3 / FSDP-style, the Triton kernel, the
hierarchical ring across nodes. Those parts are NOT validated.

Notation: a rank holds L tokens of each of B sequences, T = B * L; dim C, n layers, H query / Hk K/V heads of
size D, MLP width F (launch.model: F = 4C, not gated), vocab V; e = activation bytes (float32 4, bf16 2). One
hidden state X = T*C*e, q (or the attention output) Q = T*H*D*e, one of k, v K = T*Hk*D*e, an MLP activation
M = T*F*e, the attention LSE S = 4*T*H (float32), LayerNorm statistics N = 8*T (mean, rstd, float32).

Persistent (the whole step), P parameters (``Shape.params``), ``shard`` = the ranks model state is sharded over
(1: replicated, as launch.train):
  parameters      P * param_bytes / shard
  gradients       P * grad_bytes / shard                    (launch.train keeps .grad between steps)
  optimizer       P * (8 + master_bytes) / shard + 4 * tensors  (AdamW exp_avg, exp_avg_sq float32, an fp32 master
                  copy when the parameters are not fp32, and a float32 ``step`` scalar per parameter tensor)
Saved for the backward, per layer (what autograd keeps, read off launch.model):
  plain           X input + X norm1 out + Q roped q + K roped k + 2K the wkv output (v is a view of it, so all of
                  it stays) + Q attention out + S + X residual + X norm2 out + 2M (fc1 out, GELU out; gated:
                  4M: gate, up, act(gate), product) + 2N
  checkpointed    X input (kept by the checkpoint) + Q out + S (dist_attn.checkpoint's cache of the ring)
  + inputs        16T ids and labels, 8L positions, 4*L*D RoPE cos and sin
  + final         X last block output (final norm input) + X final norm output + N
The step's peak is the largest of these moments (each: state + what is alive then):
  fwd attention   the last layer's ring forward: inputs + (n-1) layers + its X, X, Q, K, 2K + ring forward
  loss forward    inputs + n layers + final + loss: logits T*V*e and log-softmax T*V*e, or (fused) 4T LSE rows +
                  one float32 (ct x cv) tile (softmax in place), ct = min(T, 1024), cv = min(V, 8192)
  loss backward   plain: max(4 T*V*e (logits, log-softmax, their two gradients), 2 T*V*e + X + V*C*grad_bytes (the
                  head's backward)); fused, T <= V: 4T + 4*T*C float32 grad_rows (+ its cast) + V*C*grad_bytes
                  grad_weight + 4*cv*C its chunk + 1 tile; T > V: 4T + X grad_rows + 4*V*C float32 grad_weight (+ its
                  cast) + 4*ct*C grad_rows chunk + 1 tile
  bwd MLP         the last layer's MLP backward (recomputed first when checkpointed): inputs + (n-1) layers + a
                  full layer + hold + X dX + M + C*F*grad_bytes (fc2's input gradient and weight gradient; its
                  saved input goes after it; gated: 2M, not validated)
  bwd attention   the last layer's ring backward: inputs + (n-1) layers + its X, X, Q, K, 2K, Q, S, N + hold +
                  X dX + Q dout + ring backward
  optimizer       16T + 8L + hold + max(P * grad_bytes (launch.train's flat all-reduce buffer, shard 1 only),
                  AdamW temporaries: the per-tensor loop (CPU) 4 * max(2*V*C + C, 3*F*C) (a tensor's sqrt(v)
                  and sqrt(v) / c while the last one's denominator lives on), or foreach 4 P / shard)
  hold: train_step keeps ``outputs`` until it returns: the logits T*V*e, or (fused) the final hidden X.
Ring working set (dist_attn/ring.py, flat ring of w = sp ranks, zigzag): forward 4*T*H*D float32 out accumulator
+ S + 2K packed (k, v) messages x ``kv_buffers`` (torch.stack and the receive buffer: 2; 1 for w = 1) + kernel
(step 0: the own block, whose calls cut the causal diagonal); backward 4*T*H*D float32 dq + the K/V buffers +
max(one float32 dK/dV block 8*T*Hk*D + kernel at step 0, ``dkv_buffers`` blocks (the one being filled, the one
in flight, the one arriving: 3) + kernel without masks at a later step). Hierarchical ring (across nodes): +2
K/V and +2 dK/dV blocks (the inter-node send and receive copies, as ``benchmarks/scaling.py``), not validated.
Kernel working set (``kernel_working_set``), per call on one zigzag segment (L/2 queries x L/2 keys):
  torch (CPU)     float32 score tiles of B x H x r x c, r = the backend's query rows per tile (``_tile_rows``:
                  CHUNK = 256, fewer for many heads x batch), c = min(CHUNK, L/2); a cut tile adds its int64
                  position difference and bool mask (9 bytes per tile element). Forward: 1 tile (its math in
                  place) + the call's float32 accumulator 4*B*H*(L/2)*D + row max and sum + acc * rescale and
                  P @ v (2 query chunks) with v broadcast over the query heads, or at its end 3 accumulator-sized
                  tensors; backward: 2 tiles (P and dS) + float32 copies of the chunk's q and dout rows + the LSE's
                  copies. Read off dist_attn/kernels/torch_backend.py (the results record its sha1: the term
                  follows that code)
  triton (GPU)    no score tiles: 0 forward, the float32 delta 4*B*H*(L/2) backward
FSDP / ZeRO-3 (shard > 1, MODELLED only): + the gathered unit (the largest of a layer and the V x C embedding or
head) twice (the one in use and the prefetched one) in param_bytes + its unsharded gradient in grad_bytes.
Not modelled: allocator fragmentation and caching (the CUDA caching allocator), NCCL / CUDA-context buffers,
cuBLAS workspaces (hence the reserve in the projection), communication buffers beyond launch.train's.

    python -m benchmarks.memory                    # measures 16 rows (~2 min on 2 cores), writes benchmarks/results/
                                                   # memory_cpu.md, memory_projection.md and memory_projection.png
    python -m benchmarks.memory --quick            # 3 small rows, into a new temporary directory
    python -m benchmarks.memory --projection-only --out /tmp/x   # no measurement: the MODELLED projection only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_name, md_row, versions, write_result

GB = 1e9
MARKER_BYTES = 777_777          # an allocation of this odd size marks a step boundary in the allocation trace
BACKENDS = ("torch", "triton")
FEATURES = (("plain", False, False), ("checkpointing", True, False), ("fused loss", False, True),
            ("both", True, True))  # (name, checkpoint_layers, fused_loss)
TOLERANCE = 0.10                # the validation's goal: |measured / predicted - 1| <= 10% for every row


# ------------------------------------------------------------------------------------------ the model

def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool; got {value!r}")


@dataclass(frozen=True)
class Shape:
    """A decoder of launch.model's structure: embedding, n blocks (norm, attention wq/wkv/wo, norm, MLP), final norm,
    untied head. ``gated``: a SwiGLU MLP (three F x C matrices) instead of launch.model's 4x GELU (two)."""
    dim: int
    layers: int
    heads: int
    kv_heads: int
    headdim: int
    ffn: int
    vocab: int
    gated: bool = False

    def __post_init__(self):
        for name in ("dim", "layers", "heads", "kv_heads", "headdim", "ffn", "vocab"):
            _check_int(name, getattr(self, name))
        _check_bool("gated", self.gated)
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")

    @property
    def layer_params(self):
        C, HD, KD = self.dim, self.heads * self.headdim, self.kv_heads * self.headdim
        return 2 * C * HD + 2 * C * KD + (3 if self.gated else 2) * C * self.ffn + 2 * C  # wq wo, wkv, MLP, 2 norms

    @property
    def params(self):
        return self.layers * self.layer_params + 2 * self.vocab * self.dim + self.dim  # + embedding, head, norm

    @property
    def tensors(self):
        return self.layers * (8 if self.gated else 7) + 3


def launch_shape(dim, layers, heads, kv_heads, vocab):
    """The Shape of ``launch.model.Transformer(vocab, dim, layers, heads, kv_heads)``."""
    return Shape(dim, layers, heads, kv_heads, dim // heads, 4 * dim, vocab)


LLAMA_8B = Shape(dim=4096, layers=32, heads=32, kv_heads=8, headdim=128, ffn=14336, vocab=128256, gated=True)
LLAMA_70B = Shape(dim=8192, layers=80, heads=64, kv_heads=8, headdim=128, ffn=28672, vocab=128256, gated=True)


def kernel_working_set(backend, batch, segment, heads, kv_heads, headdim, act_bytes, backward, masked):
    """Peak bytes the local kernel allocates in one call on ``segment`` queries x ``segment`` keys; ``masked``: the
    call cuts the causal diagonal (a rank's own block). The ring's float32 accumulators are the caller's."""
    if backend == "triton":
        return 4 * batch * heads * segment if backward else 0  # delta = rowsum(dout * out), float32
    from dist_attn.kernels.torch_backend import CHUNK, _tile_rows
    cq, ck = min(_tile_rows(batch, heads), segment), min(CHUNK, segment)
    tile = 4 * batch * heads * cq * ck                          # one float32 score tile (query rows x keys)
    mask = 9 * cq * ck if masked else 0                         # _tiles' int64 position difference + bool mask
    rows = 4 * batch * heads * cq * headdim                     # one query chunk, float32
    stats = 8 * batch * heads * segment                         # row max and sum, or the LSE's two copies
    casts = 0 if act_bytes == 4 else 2 * rows + 8 * batch * kv_heads * ck * headdim  # float32 copies, not validated
    if backward:  # P and dS (in place), the float32 copies of the query chunk of q and dout
        return 2 * tile + mask + 2 * rows + stats + casts
    block = 4 * batch * heads * segment * headdim               # the call's float32 accumulator
    kv_tile = 4 * batch * heads * ck * headdim                  # a k or v tile broadcast over the query heads
    loop = block + stats + mask + tile + casts + 2 * rows + kv_tile   # acc * rescale, P @ v (with v broadcast)
    return max(loop, 3 * block)                                 # at the end: acc, out = acc / sum, its ungrouping


@dataclass
class Prediction:
    peak: int                       # bytes per rank
    phase: str                      # the moment of the step where the peak is
    terms: dict                     # the peak's breakdown: name -> bytes (they sum to peak)
    phases: dict = field(default_factory=dict)   # every modelled moment -> its total bytes
    per_layer: int = 0              # activation bytes one layer keeps for the backward


def predict(tokens, batch, dim, layers, heads, kv_heads, headdim, ffn, vocab, *, gated=False, act_bytes=4,
            param_bytes=4, grad_bytes=4, master_bytes=0, shard=1, checkpoint_layers=False, fused_loss=False,
            backend="torch", sp=2, hierarchical=False, foreach_optimizer=False, chunk_tokens=1024,
            chunk_vocab=8192) -> Prediction:
    """Peak bytes per rank of one training step (forward, backward, optimizer) of launch.train's model with
    ``tokens`` tokens of each of ``batch`` sequences on the rank: the formulas of the module docstring."""
    for name, value in (("tokens", tokens), ("batch", batch), ("act_bytes", act_bytes), ("param_bytes", param_bytes),
                        ("grad_bytes", grad_bytes), ("shard", shard), ("sp", sp), ("chunk_tokens", chunk_tokens),
                        ("chunk_vocab", chunk_vocab)):
        _check_int(name, value)
    _check_int("master_bytes", master_bytes, 0)
    for name, value in (("checkpoint_layers", checkpoint_layers), ("fused_loss", fused_loss),
                        ("hierarchical", hierarchical), ("foreach_optimizer", foreach_optimizer)):
        _check_bool(name, value)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if tokens % 2:
        raise ValueError(f"tokens must be even (two zigzag segments per rank); got {tokens}")
    shape = Shape(dim, layers, heads, kv_heads, headdim, ffn, vocab, gated)
    e, T, C, V, n = act_bytes, batch * tokens, dim, vocab, layers
    X, Q, K, M = T * C * e, T * heads * headdim * e, T * kv_heads * headdim * e, T * ffn * e
    S, N = 4 * T * heads, 8 * T

    # persistent model state
    P = shape.params
    state = {"parameters": P * param_bytes // shard, "gradients": P * grad_bytes // shard,
             "optimizer state": P * (8 + master_bytes) // shard + 4 * shape.tensors}
    unit = max(shape.layer_params, V * C)                       # FSDP: the largest gathered unit
    fsdp = 0 if shard == 1 else unit * (2 * param_bytes + grad_bytes)

    # saved activations
    full = 4 * X + 2 * Q + 3 * K + S + (4 if gated else 2) * M + 2 * N   # one uncheckpointed layer
    saved = X + Q + S if checkpoint_layers else full
    inputs = 16 * T + 8 * tokens + 4 * tokens * headdim          # ids, labels, positions, RoPE cos and sin
    final = 2 * X + N                                            # last block output, final norm output
    attn_in = 2 * X + 3 * K + Q                                  # input, norm1 out, roped q and k, wkv out
    attn_in_bwd = attn_in + Q + S + N                            # + attention out, LSE, norm1 statistics
    hold = X if fused_loss else T * V * e                        # train_step's ``outputs``

    # ring and kernel working sets
    kv_buffers = (2 if sp > 1 else 1) + (2 if hierarchical else 0)
    dkv_buffers = (3 if sp > 1 else 1) + (2 if hierarchical else 0)
    seg = tokens // 2

    def kernel(bwd, masked):
        return kernel_working_set(backend, batch, seg, heads, kv_heads, headdim, e, bwd, masked)

    # step 0 (the own block: the causal diagonal, one dK/dV block yet) or a later step (no mask, all dK/dV blocks)
    ring_fwd = 4 * T * heads * headdim + S + kv_buffers * 2 * K + kernel(False, True)
    dkv = 8 * T * kv_heads * headdim
    ring_bwd = 4 * T * heads * headdim + kv_buffers * 2 * K + max(dkv + kernel(True, True),
                                                                   dkv_buffers * dkv + kernel(True, False))

    # the loss
    ct, cv = min(T, chunk_tokens), min(V, chunk_vocab)
    tile = 4 * ct * cv
    if fused_loss:  # linear_cross_entropy: one float32 LSE per row; tiles; a float32 (V x C) weight gradient
        casts = (0 if e == 4 else 4 * ct * C) + (0 if param_bytes == 4 else 4 * cv * C)   # .float() copies
        cast_grad = 0 if grad_bytes == 4 else V * C * grad_bytes                      # grad_weight.to(dtype)
        loss_fwd = 4 * T + tile + casts                                  # one tile, its softmax in place
        if T <= V:  # vocab chunks outside: float32 grad_rows (cast at the end), grad_weight chunk by chunk
            final_cast = 0 if e == 4 else T * C * e
            loss_bwd = 4 * T + 4 * T * C + V * C * grad_bytes + 4 * cv * C + tile + casts + final_cast
        else:  # token chunks outside: float32 grad_weight (cast at the end), grad_rows chunk by chunk
            loss_bwd = 4 * T + X + 4 * V * C + 4 * ct * C + tile + casts + cast_grad
    else:  # head logits and log_softmax; backward: their gradients, then the head's dW
        loss_fwd = 2 * T * V * e
        loss_bwd = max(4 * T * V * e, 2 * T * V * e + X + V * C * grad_bytes)
    # fc2's backward makes the gradient of the GELU output (its saved input is freed after it) and dW (C x F)
    mlp_bwd = 2 * M if gated else M + C * ffn * grad_bytes
    # AdamW: foreach makes sqrt(v) of every tensor at once (float32); the per-tensor loop (CPU) makes sqrt(v) and
    # sqrt(v) / c of a tensor while the last tensor's denominator lives on: the worst pairs in launch.model's
    # order are (nothing, embedding), (final norm, head) and (fc1, fc2)
    adam = 4 * P // shard if foreach_optimizer else 4 * max(2 * V * C + C, 3 * ffn * C)
    sync = P * grad_bytes if shard == 1 else 0

    before = inputs + (n - 1) * saved                           # everything below the last layer
    moments = {
        "forward attention": {"activations": before + attn_in, "attention": ring_fwd},
        "loss forward": {"activations": inputs + n * saved + final, "loss": loss_fwd},
        "loss backward": {"activations": inputs + n * saved + final, "loss": loss_bwd},
        "backward MLP": {"activations": before + full + X, "loss": hold, "temporaries": mlp_bwd},
        "backward attention": {"activations": before + attn_in_bwd + X + Q, "loss": hold, "attention": ring_bwd},
        "optimizer": {"activations": 16 * T + 8 * tokens, "loss": hold, "temporaries": max(sync, adam)},
    }
    totals = {name: sum(state.values()) + fsdp + sum(parts.values()) for name, parts in moments.items()}
    phase = max(totals, key=totals.get)
    terms = dict(state)
    for name in ("activations", "attention", "loss", "temporaries"):
        terms[name] = moments[phase].get(name, 0) + (fsdp if name == "temporaries" else 0)
    return Prediction(totals[phase], phase, terms, totals, saved)


def predict_row(row, sp=2):
    """``predict`` for a launch.train configuration (a dict of TrainConfig fields) on ``sp`` ranks, float32."""
    shape = launch_shape(row["dim"], row["layers"], row["heads"], row["kv_heads"], row["vocab"])
    return predict(row["seqlen"] // sp, row["batch"], shape.dim, shape.layers, shape.heads, shape.kv_heads,
                   shape.headdim, shape.ffn, shape.vocab, checkpoint_layers=row.get("checkpoint_layers", False),
                   fused_loss=row.get("fused_loss", False), backend="torch", sp=sp)


# ------------------------------------------------------------------------------------------ the measurement

def allocation_events(fn):
    """[(time ns, signed bytes, top-level op)] of every allocation and free of PyTorch's CPU allocator recorded
    while ``fn()`` runs (torch.profiler, profile_memory=True), in time order; the op is the outermost profiled
    call around it (e.g. "autograd::engine::evaluate_function: RingAttnFuncBackward")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    out, todo = [], [(event, event.name) for event in prof.profiler.kineto_results.experimental_event_tree()]
    while todo:
        event, top = todo.pop()
        size = getattr(event.extra_fields, "alloc_size", None)
        if size is not None:
            out.append((event.start_time_ns, size, top))
        todo.extend((child, top) for child in event.children)
    return sorted(out, key=lambda item: item[0])


# the top-level ops during which predict's moments happen (the largest level over them: the last layer's)
MOMENT_OPS = {"RingAttnFunc": "forward attention", "aten::cross_entropy_loss": "loss forward",
              "_LinearCrossEntropy": "loss forward", "LogSoftmaxBackward0": "loss backward",
              "_LinearCrossEntropyBackward": "loss backward", "GeluBackward0": "backward MLP",
              "RingAttnFuncBackward": "backward attention"}   # "optimizer": after the backward (measure_step)


def _mark():
    import torch
    torch.empty(MARKER_BYTES, dtype=torch.uint8)  # allocated and freed at once


def measure_step(cfg, mesh):
    """dict(peak, at, moments, start, state) of step 2 of ``launch.train.train(cfg)`` (cfg.steps = 2) on this rank:
    peak = the model state counted from the tensors (parameters, .grad, AdamW state) + the traced increase of step 2
    over its start, bytes; at = the top-level op running at the peak; moments = the same for each of predict's
    moments (``MOMENT_OPS``; the largest level during them). Tracing starts before the model is built; the
    traced level at the start of step 2 (``start``) should equal the state, but a tensor whose last reference
    goes on a gloo thread (launch.train's flat all-reduce buffer, sometimes) is freed untraced and would shift it,
    so the baseline is counted from the tensors instead."""
    import torch
    from launch import train as launch_train

    real_step, counted = launch_train.train_step, {}

    def marked_step(cfg, model, optimizer, step, mesh, device):
        gc.collect()  # whatever step 1 left to the cycle collector is freed now, not at a random point of step 2
        _mark()
        loss = real_step(cfg, model, optimizer, step, mesh, device)
        _mark()
        tensors = [*model.parameters(), *(p.grad for p in model.parameters()),
                   *(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
        counted["state"] = sum(t.numel() * t.element_size() for t in tensors)
        return loss

    launch_train.train_step = marked_step
    gc.collect()  # an earlier row's model (checkpoint_layer's forward closure makes it a cycle) goes now, untraced
    try:  # rank=1 for train's logging: silent on every rank (the caller shows the progress)
        events = allocation_events(lambda: launch_train.train(cfg, mesh, torch.device("cpu"), 1))
    finally:
        launch_train.train_step = real_step
    level, marks, levels = 0, [], []
    for _, size, _ in events:
        if size == MARKER_BYTES:
            marks.append(len(levels))
        level += size
        levels.append(level)
    if len(marks) != 4:
        raise RuntimeError(f"expected 4 step markers in the allocation trace, found {len(marks)}")
    start = levels[marks[2]] - MARKER_BYTES           # the level just before step 2's first marker
    step = range(marks[2] + 1, marks[3])
    ops = {i: events[i][2].removeprefix("autograd::engine::evaluate_function: ") for i in step}
    last_backward = max(i for i in step if events[i][2].startswith("autograd::engine"))
    levels = [counted["state"] + level - start for level in levels]   # from here on: bytes incl. the state
    moments = {}
    for i in step:
        if i < last_backward and ops[i] in MOMENT_OPS:
            moments[MOMENT_OPS[ops[i]]] = max(moments.get(MOMENT_OPS[ops[i]], 0), levels[i])
    # optimizer: the flat all-reduce buffer (torch.cat), then AdamW's own increase over the level the backward left
    # (not the traced level at AdamW: the buffer is freed by now, but sometimes untraced, on a gloo thread)
    after = [i for i in step if i > last_backward]
    adam = [i for i in after if ops[i].startswith("Optimizer.step")]
    moments["optimizer"] = max([levels[i] for i in after if ops[i] == "aten::cat"] + [levels[last_backward]] +
                               [levels[last_backward] + levels[i] - levels[adam[0] - 1] for i in adam])
    i = max(step, key=levels.__getitem__)
    return dict(peak=levels[i], at=ops[i], start=start, state=counted["state"], moments=moments)


def _measure_worker(rank, world_size, rows, progress):
    from tqdm import tqdm
    from launch import train as launch_train

    mesh = launch_train.make_mesh(world_size)
    out = []
    for row in tqdm(rows, desc="memory (measured)", unit="row", disable=rank != 0 or not progress):
        cfg = launch_train.TrainConfig(**{"steps": 2, "sp": world_size, "device": "cpu", "log_every": 10**6, **row})
        out.append(measure_step(cfg, mesh))
    return out


def measure(rows, world_size=2, progress=True, timeout=1800):
    """measure_step of every row (a dict of launch.train TrainConfig fields) in one spawned gloo world of
    ``world_size`` ranks (one torch thread each); per row the rank with the larger peak."""
    from launch.spawn import run_world

    per_rank = run_world(world_size, _measure_worker, rows, progress, timeout=timeout)
    return [max(ranks, key=lambda r: r["peak"]) for ranks in zip(*per_rank)]


def _row(dim, layers, heads, kv_heads, seqlen, vocab, batch=1):
    return dict(dim=dim, layers=layers, heads=heads, kv_heads=kv_heads, seqlen=seqlen, vocab=vocab, batch=batch)


# seqlen is the whole sequence: each of the 2 ranks holds seqlen / 2 tokens of it
SHAPES = (_row(64, 2, 4, 2, 512, 32),          # tiny: the ring backward is the peak
          _row(64, 2, 4, 2, 2048, 4096),       # large vocabulary: the loss is the peak
          _row(128, 4, 8, 2, 4096, 256),       # long and deep: the activations and the MLP backward
          _row(128, 3, 4, 4, 1024, 1024, 2))   # batch 2, no GQA
QUICK_ROWS = (dict(SHAPES[0], checkpoint_layers=False, fused_loss=False),                # peak: the ring backward
              dict(_row(64, 2, 4, 2, 512, 512), checkpoint_layers=True, fused_loss=False),  # the loss backward
              dict(_row(64, 2, 4, 2, 512, 512), checkpoint_layers=True, fused_loss=True))   # the ring backward


def validation_rows(quick=False):
    if quick:
        return [dict(row) for row in QUICK_ROWS]
    return [dict(shape, checkpoint_layers=ck, fused_loss=fused) for shape in SHAPES for _, ck, fused in FEATURES]


def feature_name(checkpoint_layers, fused_loss):
    return next(name for name, ck, fused in FEATURES if (ck, fused) == (checkpoint_layers, fused_loss))


def validate(rows, progress=True):
    """[(row, measured dict, Prediction)] for every row."""
    return [(row, measured, predict_row(row)) for row, measured in zip(rows, measure(rows, progress=progress))]


# ------------------------------------------------------------------------------------------ the projection

GPUS = (("80 GB", 80 * GB), ("141 GB", 141 * GB))
SP_SIZES = (8, 32, 64)
MODELS = (("Llama-3-8B-like", LLAMA_8B), ("70B-like", LLAMA_70B))
GPUS_PER_NODE = 8
RESERVE = 0.10                  # of GPU memory left for the CUDA context, NCCL, the caching allocator's slack
TOKEN_STEP = 128                # the projection's granularity (tokens per GPU)


def gpu_setup(sp, checkpoint_layers, fused_loss):
    """predict's settings of the projection: bf16 activations and weights, bf16 gradients, fp32 master weights
    and AdamW moments (16 bytes per parameter, ZeRO's count), all sharded over the sp ranks (ZeRO-3 / FSDP,
    data parallel 1), the Triton kernel, foreach AdamW, the hierarchical ring when sp spans nodes of 8 GPUs."""
    return dict(act_bytes=2, param_bytes=2, grad_bytes=2, master_bytes=4, shard=sp, sp=sp, backend="triton",
                hierarchical=sp > GPUS_PER_NODE, foreach_optimizer=True, checkpoint_layers=checkpoint_layers,
                fused_loss=fused_loss)


def predict_gpu(shape, tokens, sp, checkpoint_layers, fused_loss, batch=1):
    return predict(tokens, batch, shape.dim, shape.layers, shape.heads, shape.kv_heads, shape.headdim, shape.ffn,
                   shape.vocab, gated=shape.gated, **gpu_setup(sp, checkpoint_layers, fused_loss))


def max_tokens(shape, memory_bytes, sp, checkpoint_layers, fused_loss, reserve=RESERVE, step=TOKEN_STEP):
    """The most tokens per GPU (a multiple of ``step``) whose predicted peak fits in (1 - reserve) x memory_bytes;
    0 when not even ``step`` tokens fit. The peak grows with the tokens, so: doubling, then bisection."""
    if not memory_bytes > 0:
        raise ValueError(f"memory_bytes must be > 0; got {memory_bytes!r}")
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1); got {reserve!r}")
    _check_int("step", step)
    budget = (1 - reserve) * memory_bytes

    def fits(units):
        return predict_gpu(shape, units * step, sp, checkpoint_layers, fused_loss).peak <= budget

    if not fits(1):
        return 0
    high = 2
    while fits(high):
        high *= 2
    low = high // 2                                   # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step


def projection(reserve=RESERVE, sp_sizes=SP_SIZES, step=TOKEN_STEP):
    """[dict(model, gpu, sp, feature, tokens, prediction)] over MODELS x GPUS x sp_sizes x FEATURES (MODELLED)."""
    out = []
    for model, shape in MODELS:
        for gpu, memory in GPUS:
            for sp in sp_sizes:
                for feature, ck, fused in FEATURES:
                    tokens = max_tokens(shape, memory, sp, ck, fused, reserve, step)
                    out.append(dict(model=model, gpu=gpu, sp=sp, feature=feature, tokens=tokens,
                                    prediction=predict_gpu(shape, tokens, sp, ck, fused) if tokens else None))
    return out


# ------------------------------------------------------------------------------------------ reports

def _mb(nbytes):
    return f"{nbytes / 2**20:,.2f}"


def _kernel_file_id():
    """sha1 (12 hex digits) of dist_attn/kernels/torch_backend.py as it is now: the kernel term follows its tiles."""
    path = Path(__file__).resolve().parents[1] / "dist_attn" / "kernels" / "torch_backend.py"
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cpu_report(results, command, load):
    worst = max(abs(m["peak"] / p.peak - 1) for _, m, p in results)
    lines = ["# Peak memory per rank of a launch.train step on CPU: MEASURED vs predicted", "",
             "**MEASURED**: the peak CPU tensor memory of step 2 of `launch.train` (forward, backward, gradient "
             "all-reduce, clipping, AdamW) per rank of a 2-rank gloo world, float32, the torch kernel backend, "
             "traced with `torch.profiler` (profile_memory): the model state counted from the tensors (parameters, "
             "`.grad`, AdamW state) + the traced increase of step 2 over its start; the larger rank. **predicted**: "
             "`benchmarks.memory.predict` (MODELLED, the formulas in the module docstring).", "",
             f"- machine: {machine_name()}; {versions()}; {_now()}",
             f"- command: `{command}`",
             f"- 1-minute load average before / after: {load[0]:.2f} / {load[1]:.2f} (memory does not depend on it)",
             f"- kernel: dist_attn/kernels/torch_backend.py sha1 {_kernel_file_id()} (the working tree when run); "
             "model: launch.model (LayerNorm, 4x GELU MLP, untied head), zigzag layout, one torch thread per rank",
             f"- goal: measured / predicted within {TOLERANCE:.0%} on every row; worst here {worst:.2%} "
             f"({'met' if worst <= TOLERANCE else 'NOT met'})", "",
             "## Validation (MEASURED vs MODELLED)", "",
             "tokens: per rank (the sequence is twice that); peak at: the op running at the measured peak / the "
             "moment `predict` puts the peak at", ""]
    head = ["#", "dim", "layers", "heads / kv", "tokens", "batch", "vocab", "features", "measured MiB",
            "predicted MiB", "measured / predicted", "measured peak at", "predicted peak at"]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for i, (row, m, p) in enumerate(results, 1):
        lines.append(md_row([i, row["dim"], row["layers"], f"{row['heads']} / {row['kv_heads']}", row["seqlen"] // 2,
                             row["batch"], row["vocab"], feature_name(row["checkpoint_layers"], row["fused_loss"]),
                             _mb(m["peak"]), _mb(p.peak), f"{m['peak'] / p.peak:.4f}", m["at"], p.phase]))
    names = list(results[0][2].phases)
    lines += ["", "## Every modelled moment of the step: measured / predicted", "",
              "measured: the model state + the largest traced level during the moment's ops (forward attention: "
              "RingAttnFunc; loss forward: cross_entropy_loss or _LinearCrossEntropy; loss backward: "
              "LogSoftmaxBackward0 or _LinearCrossEntropyBackward; backward MLP: GeluBackward0, which comes after "
              "fc2's weight gradient (C x F) is gone; backward attention: RingAttnFuncBackward; optimizer: the flat "
              "all-reduce buffer (torch.cat) or AdamW's own increase over the level the backward left), the largest "
              "over the layers = the last layer's; predicted: the moment's total in `predict`", ""]
    lines += [md_row(["#"] + names), md_row(["---"] * (len(names) + 1))]
    for i, (_, m, p) in enumerate(results, 1):
        lines.append(md_row([i] + [f"{m['moments'][k] / p.phases[k]:.3f}" if k in m["moments"] else "-"
                                   for k in names]))
    worst_moment = max(abs(m["moments"][k] / p.phases[k] - 1) for _, m, p in results for k in m["moments"])
    lines += ["", f"worst moment: {worst_moment:.2%} off", ""]
    lines += ["", "## The predicted peak's terms, MiB (MODELLED)", "",
              "state: parameters + gradients + AdamW state (measured from the tensors: equal on every row); "
              "activations: saved for the backward at that moment (+ batch tensors, RoPE tables); attention: ring "
              "buffers + kernel working set; loss: logits and their gradients, or the fused loss's tiles and "
              "accumulator, or what train_step still holds; per layer: activation bytes one layer keeps", ""]
    head = ["#", "state (measured)", "parameters", "gradients", "optimizer state", "activations", "attention",
            "loss", "temporaries", "per layer"]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for i, (_, m, p) in enumerate(results, 1):
        t = p.terms
        lines.append(md_row([i, _mb(m["state"])] + [_mb(t[k]) for k in ("parameters", "gradients", "optimizer state",
                                                                          "activations", "attention", "loss",
                                                                          "temporaries")] + [_mb(p.per_layer)]))
    return "\n".join(lines) + "\n"


def projection_report(rows, command, reserve):
    lines = ["# Longest sequence that fits per GPU: Llama-3-8B-like and 70B-like (MODELLED)", "",
             "**MODELLED**: nothing here is measured. Outputs of `benchmarks.memory.predict` (formulas in its module "
             "docstring; validated on CPU against launch.train in benchmarks/results/memory_cpu.md for what is "
             "validated there) with the GPU settings below.", "",
             f"- command: `{command}` ({_now()})",
             "- models: Llama-3-8B-like (dim 4096, 32 layers, 32 / 8 heads of 128, SwiGLU MLP 14336, vocab 128256, "
             f"{LLAMA_8B.params / 1e9:.2f}e9 parameters) and 70B-like (dim 8192, 80 layers, 64 / 8 heads of 128, "
             f"SwiGLU 28672, vocab 128256, {LLAMA_70B.params / 1e9:.2f}e9), untied head, launch.model's block "
             "structure (LayerNorm statistics kept as for launch.model's LayerNorm)",
             "- NOT validated: the gated (SwiGLU) MLP (4 saved activations of width F instead of 2), bf16, "
             "FSDP/ZeRO-3 sharding and its gathered buffers, the hierarchical ring's extra buffers, foreach AdamW, "
             "the Triton kernel's working set (the validation ran the CPU torch kernel)",
             "- precision: bf16 activations, weights and gradients; fp32 master weights and AdamW moments: 16 bytes "
             "per parameter (ZeRO's count), sharded over the sp ranks (ZeRO-3 / FSDP, data parallel 1), plus the "
             "largest gathered unit (the 128256 x dim head) twice in bf16 and its bf16 gradient",
             "- attention: ring_attention, zigzag, batch 1, the Triton kernel (no score tiles); flat ring for sp 8, "
             "hierarchical (topology auto, 8 GPUs per node) for sp 32 and 64",
             "- plain loss: the head's bf16 logits and log-softmax, as launch.train computes them (a float32 upcast "
             "for the loss, common elsewhere, would add 8 bytes per token and vocabulary entry)",
             f"- fits: predicted peak <= (1 - {reserve:g}) x GPU memory, GPU memory 80e9 or 141e9 bytes (the labels as "
             f"decimal GB); the {reserve:.0%} reserve is for what is not modelled (CUDA context, NCCL buffers, the "
             f"caching allocator's fragmentation, cuBLAS workspaces); granularity {TOKEN_STEP} tokens",
             "- features: plain; checkpointing = every block under `dist_attn.checkpoint_layer` (the recompute does "
             "not re-run the ring); fused loss = `dist_attn.linear_cross_entropy` (no logits; a float32 "
             "gradient accumulator of the smaller of tokens x dim and vocab x dim instead); both", ""]
    for model, _ in MODELS:
        for gpu, _ in GPUS:
            lines += [f"## {model}, {gpu} GPU: tokens per GPU (sequence = tokens x sp), MODELLED", "",
                      f"`-`: not even {TOKEN_STEP} tokens fit; model state: parameters + gradients + AdamW state "
                      "per GPU", ""]
            head = ["sp", "model state GB"] + [name for name, _, _ in FEATURES]
            lines += [md_row(head), md_row(["---"] * len(head))]
            for sp in sorted({r["sp"] for r in rows}):
                cells = [r for r in rows if (r["model"], r["gpu"], r["sp"]) == (model, gpu, sp)]
                state = predict_gpu(dict(MODELS)[model], TOKEN_STEP, sp, False, False).terms
                state = sum(state[k] for k in ("parameters", "gradients", "optimizer state"))
                lines.append(md_row([sp, f"{state / GB:.1f}"] + [f"{r['tokens']:,} ({r['tokens'] * sp:,})"
                                                                 if r["tokens"] else "-" for r in cells]))
            lines.append("")
    lines += ["## The peak at the longest sequence, GB (MODELLED)", "",
              "terms of `predict` at the tokens per GPU above; peak at: the moment of the step it happens", ""]
    head = ["model", "GPU", "sp", "features", "tokens / GPU", "peak GB", "peak at", "parameters", "gradients",
            "optimizer state", "activations", "attention", "loss", "temporaries"]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for r in rows:
        p = r["prediction"]
        if p is None:
            continue
        lines.append(md_row([r["model"], r["gpu"], r["sp"], r["feature"], f"{r['tokens']:,}", f"{p.peak / GB:.1f}",
                             p.phase] + [f"{p.terms[k] / GB:.2f}" for k in ("parameters", "gradients",
                                                                           "optimizer state", "activations",
                                                                           "attention", "loss", "temporaries")]))
    return "\n".join(lines) + "\n"


def plot_projection(rows, plt, path):
    sps = sorted({r["sp"] for r in rows})
    fig, axes = plt.subplots(len(MODELS), len(GPUS), figsize=(11, 7.5), sharex=True)
    for (i, (model, _)), (j, (gpu, _)) in ((a, b) for a in enumerate(MODELS) for b in enumerate(GPUS)):
        ax = axes[i][j]
        for k, (feature, _, _) in enumerate(FEATURES):
            points = [(r["sp"], r["tokens"]) for r in rows
                      if (r["model"], r["gpu"], r["feature"]) == (model, gpu, feature) and r["tokens"]]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{k}", label=feature)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(sps, [str(s) for s in sps])
        ax.minorticks_off()
        ax.set(title=f"{model}, {gpu} (MODELLED)", xlabel="sp (GPUs of the ring = ZeRO-3 shards)",
               ylabel="max tokens per GPU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(10)
    fig.suptitle("MODELLED: longest sequence per GPU (sequence = tokens x sp); bf16, ZeRO-3 over sp, Triton kernel, "
                 "10% reserve", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"directory for the results (default {RESULTS_DIR}; with --quick "
                                               "a new temporary directory)")
    p.add_argument("--quick", action="store_true", help="3 small measured rows (for tests)")
    p.add_argument("--projection-only", action="store_true", help="no measurement: only the MODELLED projection")
    p.add_argument("--sp", type=int, nargs="+", default=list(SP_SIZES), help="ring sizes of the projection")
    p.add_argument("--reserve", type=float, default=RESERVE, help="fraction of GPU memory kept free (projection)")
    args = p.parse_args(argv)
    if not 0 <= args.reserve < 1:
        raise ValueError(f"--reserve must be in [0, 1); got {args.reserve}")
    for sp in args.sp:
        if sp < 1:
            raise ValueError(f"--sp must be >= 1; got {sp}")
    out = args.out or (tempfile.mkdtemp(prefix="memory_quick_") if args.quick else RESULTS_DIR)
    command = shlex.join(["python", "-m", "benchmarks.memory", *argv])
    written = []
    if not args.projection_only:
        load = [os.getloadavg()[0]]
        results = validate(validation_rows(args.quick))
        load.append(os.getloadavg()[0])
        Path(out).mkdir(parents=True, exist_ok=True)
        md = Path(out) / "memory_cpu.md"
        md.write_text(cpu_report(results, command, load))
        print(md.read_text())
        written.append(md)
    rows = projection(args.reserve, tuple(sorted(set(args.sp))))
    written.append(write_result(out, "memory_projection", projection_report(rows, command, args.reserve),
                                lambda plt, path: plot_projection(rows, plt, path)))
    return written


if __name__ == "__main__":
    main()
