"""Train a small transformer on multi-query associative recall with sequence x data parallelism.

Every attention layer is ``dist_attn.ring_attention`` over a sequence-parallel (SP) group of ``--sp``
consecutive ranks; the world holds ``world_size / sp`` data-parallel (DP) replicas of the model.

    python -m launch.train                                      # one process, no process group
    torchrun --nproc_per_node 4 -m launch.train --sp 4          # one node: one replica over 4 ranks
    torchrun --nproc_per_node 4 -m launch.train --sp 2          # one node: 2 replicas x 2-rank rings
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 \\
        -m launch.train --sp 8 --seqlen 65536 --batch 8         # each ring inside a node, DP across nodes
    torchrun --nproc_per_node 4 -m launch.train --sp 4 --steps 100 --save ckpt.pt
    torchrun --nproc_per_node 4 -m launch.train --sp 4 --steps 200 --resume ckpt.pt   # steps 101..200

On CUDA each process uses the GPU of its LOCAL_RANK (NCCL, Triton kernels); on CPU (``--device cpu``
or no CUDA) gloo and the PyTorch kernel.

**Task** (generated in code, ``make_sequence``): a sequence of ``seqlen / 2`` (key, value) token pairs.
The first ``pairs`` hold distinct keys with random values (the context); ``pairs`` of the remaining
slots, at random places, repeat every context key once with its value, the rest are filler. The loss
counts only the tokens that follow a repeated key: the model must recall the value it saw with that key
possibly thousands of positions earlier (and on another rank). Values come from the upper half of the
vocabulary: the loss first falls from about log(vocab) to log(vocab / 2) (learning which tokens answer:
3.5 to 2.8 in about 30 steps at the defaults), and below that only by recalling (on CPU at the defaults,
2.5 to 2.65 around step 500: recall is learnt slowly at this size).

**Parallelism.** ``batch`` sequences per step in total; DP replica d takes sequences
``[d * batch / dp, (d + 1) * batch / dp)``, and sequence i of step s depends only on (seed, s, i), so a
run's losses do not depend on how the world is split into DP x SP. Every rank of an SP group shards the
same sequences (ids and labels) with ``dist_attn.shard`` and computes the cross-entropy summed over its
tokens divided by the number of answer tokens in its replica's batch: summed over the SP group that is
the replica's mean loss. Gradients (and the reported loss) are all-reduced with SUM over the whole world
and divided by ``dp``: the SP sum gives each replica's gradient, the division averages the replicas (all
replicas have the same number of answer tokens). One collective, and every rank ends with the same bits.

**Checkpoints** (``--save``, written by rank 0; ``--resume``, read by every rank): model, optimizer, step
and RNG state. Data is a function of the step and the learning rate has no total-step schedule, so a
resumed run continues as the uninterrupted one would, bit for bit on the same world.

**Faults.** A rank that raises, dies, or waits longer than the process group's timeout (10 minutes,
``PROCESS_GROUP_TIMEOUT``; the SP groups inherit it) for a peer makes every other rank fail within that
timeout; under torchrun each rank then prints one line (``launch.train: error: rank R failed: ...``, or
``stopped, as a peer failed``) and exits with code 1. ``DIST_ATTN_FAIL_RANK=R`` (self-test hook) makes rank
R raise in the middle of its first ring forward.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import inspect
import io
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dist_attn import LAYOUTS, checkpoint_layer, global_positions, linear_cross_entropy, shard
from dist_attn.comm import group_timeout_s
from launch.model import Transformer
from launch.spawn import caused_by_peer, inject_ring_fault, one_line

FILLER, IGNORE = 0, -100  # the filler token; the label of tokens that do not count in the loss
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass
class TrainConfig:
    steps: int = 50
    """Optimizer steps in total (a resumed run continues up to this step)."""
    sp: int = 1
    """Sequence-parallel size: consecutive ranks that shard one sequence (must divide the world size)."""
    layout: str = "zigzag"
    """How a sequence is sharded over an SP group: contiguous, zigzag or striped (dist_attn.layouts)."""
    seqlen: int = 256
    """Tokens per sequence (a multiple of 2 * sp for zigzag, of sp otherwise; even)."""
    batch: int = 4
    """Sequences per step over all DP replicas (a multiple of world_size / sp)."""
    pairs: int = 8
    """Key/value pairs to recall per sequence (its answer tokens); seqlen >= 4 * pairs."""
    vocab: int = 32
    """Vocabulary: filler 0, keys 1 .. vocab/2 - 1, values vocab/2 .. vocab - 1."""
    dim: int = 64
    """Model width."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Query heads; head size dim / heads (even, for RoPE)."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than heads; must divide heads)."""
    lr: float = 3e-3
    """AdamW learning rate after warm-up."""
    warmup: int = 5
    """Steps of linear learning-rate warm-up."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value."""
    seed: int = 0
    """Seed of the model's initialisation and of the data."""
    device: str = "auto"
    """cuda (the GPU of LOCAL_RANK, NCCL), cpu (gloo), or auto: cuda when CUDA is available."""
    log_every: int = 10
    """Print loss and tokens/s every this many steps (rank 0)."""
    save: str | None = None
    """Write a checkpoint here at the end (and every save_every steps)."""
    save_every: int = 0
    """Also checkpoint every this many steps (0: only at the end); needs save."""
    resume: str | None = None
    """Start from this checkpoint."""
    checkpoint_layers: bool = False
    """Recompute every block's activations in the backward, not its ring (dist_attn.checkpoint_layer)."""
    fused_loss: bool = False
    """LM head + cross-entropy in tiles, no (tokens x vocab) logits (dist_attn.linear_cross_entropy)."""

    def __post_init__(self):
        for name in ("steps", "sp", "seqlen", "batch", "pairs", "dim", "layers", "heads", "kv_heads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup", "save_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but CUDA is not available")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        multiple = 2 * self.sp if self.layout == "zigzag" else self.sp
        if self.seqlen % multiple:
            rule = "2 * sp for layout 'zigzag'" if self.layout == "zigzag" else "sp"
            raise ValueError(f"seqlen ({self.seqlen}) must be a multiple of {multiple} ({rule}, sp={self.sp})")
        if self.seqlen % 2 or self.seqlen < 4 * self.pairs:
            raise ValueError(f"seqlen ({self.seqlen}) must be even and >= 4 * pairs ({4 * self.pairs}): "
                             f"key/value pairs, a context of pairs and as many queries")
        if self.vocab // 2 - 1 < self.pairs:
            raise ValueError(f"vocab ({self.vocab}) must be >= 2 * pairs + 2 ({2 * self.pairs + 2}): "
                             f"distinct keys for every pair, values and the filler")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.dim % self.heads or (self.dim // self.heads) % 2 or self.dim // self.heads > 256:
            raise ValueError(f"dim ({self.dim}) must be heads ({self.heads}) x an even head size <= 256")
        if self.save_every and not self.save:
            raise ValueError("save_every needs save (a checkpoint path)")

    def check_world(self, world_size):
        """The checks that need the world size (known before any process group is created)."""
        if world_size % self.sp:
            raise ValueError(f"sp ({self.sp}) must divide the world size ({world_size})")
        if self.batch % (world_size // self.sp):
            raise ValueError(f"batch ({self.batch}) must be a multiple of the data-parallel size "
                             f"(world size / sp = {world_size // self.sp})")


# -------------------------------------------------------------------------------------- command line

def field_docs(cls):
    """{field name: the docstring under it} from the class source, for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: d.value.value for a, d in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant)}


def parse_config(argv, rank, world_size) -> TrainConfig:
    """The validated config; a bad one exits (code 2) with one line on rank 0's stderr, silently elsewhere."""
    parser = argparse.ArgumentParser(prog="launch.train", description=__doc__.split("\n\n")[0])
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=docs[field.name])
            continue
        kind = str if field.default is None else type(field.default)
        parser.add_argument(flag, type=kind, default=field.default, help=docs[field.name])
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        args = parser.parse_args(argv)
        try:
            cfg = TrainConfig(**vars(args))
            cfg.check_world(world_size)
        except ValueError as error:
            parser.error(str(error))
    return cfg


# -------------------------------------------------------------------------------------- process groups

def launch_world():
    """(rank, world size) before any process group is created: an initialised default group (the
    tests' launch.spawn), torchrun's environment, or a world of one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def pick_device(name):
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_distributed(device) -> bool:
    """Creates the default group from torchrun's environment when there is none; True if it did."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return True


class Mesh(NamedTuple):
    sp_group: object  # this rank's SP group (None in a world of one)
    sp_rank: int
    dp_rank: int
    dp: int


def make_mesh(sp) -> Mesh:
    """SP groups of ``sp`` consecutive ranks (every rank takes part in creating all of them)."""
    if not dist.is_initialized():
        return Mesh(None, 0, 0, 1)
    timeout = group_timeout_s()  # the default group's (new groups otherwise get the backend's default, 30 min)
    sp_group, _ = dist.new_subgroups(group_size=sp, timeout=datetime.timedelta(seconds=timeout) if timeout else None)
    rank = dist.get_rank()
    return Mesh(sp_group, rank % sp, rank // sp, dist.get_world_size() // sp)


# -------------------------------------------------------------------------------------------- data

def make_sequence(cfg, step, index):
    """Sequence ``index`` of ``step``: ids (T,) and labels (T,), IGNORE except after a repeated key."""
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_003 + index)  # same in every process
    slots, half = cfg.seqlen // 2, cfg.vocab // 2
    keys = torch.randperm(half - 1, generator=gen)[:cfg.pairs] + 1  # (P,) distinct, in [1, half)
    values = torch.randint(half, cfg.vocab, (cfg.pairs,), generator=gen)  # (P,)
    queries = cfg.pairs + torch.randperm(slots - cfg.pairs, generator=gen)[:cfg.pairs]  # (P,) slots after the context
    pairs = torch.full((slots, 2), FILLER)  # (slots, 2): key, value
    pairs[:cfg.pairs, 0], pairs[:cfg.pairs, 1] = keys, values
    pairs[queries, 0], pairs[queries, 1] = keys, values
    labels = torch.full((slots, 2), IGNORE)
    labels[queries, 0] = values  # the token after a repeated key is its value
    return pairs.flatten(), labels.flatten()  # (T,), (T,)


def replica_batch(cfg, step, mesh, device):
    """This rank's shard of its replica's sequences: ids and labels (B, T_local), positions (T_local,),
    and the number of answer tokens in the replica's whole batch."""
    per_replica = cfg.batch // mesh.dp
    first = mesh.dp_rank * per_replica
    ids, labels = map(torch.stack, zip(*(make_sequence(cfg, step, i) for i in range(first, first + per_replica))))
    n_answers = int((labels != IGNORE).sum())
    ids, labels = (shard(x, cfg.layout, mesh.sp_rank, cfg.sp, dim=1).to(device) for x in (ids, labels))  # (B, T/sp)
    positions = global_positions(cfg.layout, mesh.sp_rank, cfg.sp, cfg.seqlen // cfg.sp, device=device)  # (T/sp,)
    return ids, labels, positions, n_answers


# ---------------------------------------------------------------------------------------- training

def sync_gradients(model, loss, mesh):
    """All-reduce (SUM over the world) / dp of every gradient and of the loss in one flat buffer; returns
    the loss (the mean over the global batch's answer tokens)."""
    if not dist.is_initialized():
        return loss.item()
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.flatten() for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= mesh.dp
    *reduced, loss = flat.split([g.numel() for g in grads] + [1])
    for grad, value in zip(grads, reduced):
        grad.copy_(value.view_as(grad))
    return loss.item()


def learning_rate(cfg, step):
    """Linear warm-up over the first ``warmup`` steps, then constant (no dependence on ``steps``)."""
    return cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup else cfg.lr


def loss_share(cfg, model, outputs, labels, n_answers):
    """This rank's share of the mean loss over ``n_answers`` targets: from the logits, or (``fused_loss``) from
    the final hidden states and the head's weight without materialising the logits."""
    if cfg.fused_loss:
        return linear_cross_entropy(outputs, model.head.weight, labels, num_items_in_batch=n_answers,
                                    ignore_index=IGNORE)
    return F.cross_entropy(outputs.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum") / n_answers


def train_step(cfg, model, optimizer, step, mesh, device):
    """Step ``step`` (1-based): forward, backward, gradient sync, AdamW update. Returns the loss."""
    ids, labels, positions, n_answers = replica_batch(cfg, step, mesh, device)
    # (B, T_local, vocab) logits, or the (B, T_local, dim) hidden states for the fused loss
    outputs = model(ids, positions, layout=cfg.layout, group=mesh.sp_group, return_hidden=cfg.fused_loss)
    loss = loss_share(cfg, model, outputs, labels, n_answers)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    loss = sync_gradients(model, loss, mesh)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    optimizer.step()
    return loss


def save_checkpoint(path, cfg, model, optimizer, step):
    """Rank 0 writes model, optimizer, step and RNG state (through a temporary file: never half a file)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
             "config": dataclasses.asdict(cfg)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)


def load_checkpoint(path, model, optimizer):
    """Restores what save_checkpoint wrote (tensors go to the parameters' device; RNG states stay on the
    CPU, where torch wants them); returns the step it was taken at."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


class TrainResult(NamedTuple):
    losses: list[float]  # the loss of every step this run took (the same on every rank)
    checksum: float  # sum of all parameters in float64 (equal on every rank when replicas agree)


def train(cfg, mesh, device, rank) -> TrainResult:
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    model = Transformer(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads).to(device)
    if cfg.checkpoint_layers:
        for block in model.blocks:
            checkpoint_layer(block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = load_checkpoint(cfg.resume, model, optimizer) if cfg.resume else 0
    log = tqdm.write if rank == 0 else (lambda line: None)
    log(f"dp {mesh.dp} x sp {cfg.sp} ({cfg.layout}) on {device}; {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; steps {start + 1}..{cfg.steps}, {cfg.batch} x {cfg.seqlen} tokens each")
    losses, tokens_per_step = [], cfg.batch * cfg.seqlen
    window_start, window_steps = time.perf_counter(), 0
    for step in tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0,
                     desc="train", unit="step"):
        losses.append(train_step(cfg, model, optimizer, step, mesh, device))
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            throughput = window_steps * tokens_per_step / elapsed
            log(f"step {step:>6} | loss {losses[-1]:.4f} | {throughput:,.0f} tok/s (all ranks)")
            window_start, window_steps = time.perf_counter(), 0
        if cfg.save and rank == 0 and (step == cfg.steps or cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(cfg.save, cfg, model, optimizer, step)
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    return TrainResult(losses, checksum)


def main(argv=None) -> TrainResult:
    rank, world_size = launch_world()
    cfg = parse_config(argv, rank, world_size)  # before any process group exists
    device = pick_device(cfg.device)
    created = init_distributed(device)
    mesh = make_mesh(cfg.sp)
    if rank == int(os.environ.get("DIST_ATTN_FAIL_RANK", "-1")):
        inject_ring_fault("forward")
    try:
        return train(cfg, mesh, device, rank)
    except Exception as error:
        if not created:  # the caller's process group (launch.spawn, a test): the caller reports it
            raise
        stopped = "stopped, as a peer failed" if caused_by_peer(error) else "failed"
        print(f"launch.train: error: rank {rank} {stopped}: {one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if mesh.sp_group is not None:
            dist.destroy_process_group(mesh.sp_group)
        if created:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
