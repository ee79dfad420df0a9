"""Train a tiny random Hugging Face causal LM sequence-parallel with ``dist_attn.integrations.hf``.

The model is built from a config (no weights are downloaded) with ``attn_implementation="dist_attn_ring"``;
every rank of the world holds its ``--layout`` shard of every sequence (one sequence-parallel group).

    python -m launch.train_hf --steps 5                          # one process
    torchrun --nproc_per_node 2 -m launch.train_hf --steps 5     # the sequence over 2 ranks
    torchrun --nproc_per_node 4 -m launch.train_hf --model qwen2 --seqlen 256 --layout striped
    torchrun --nproc_per_node 2 -m launch.train_hf --packed      # documents of random lengths in one row

Data: every sequence repeats a random block of ``--period`` tokens, so the loss falls once the model
copies from one period back (an induction head; the copy source is often on another rank). Each rank
gets ``shard_inputs``' local ids, global positions and globally shifted labels; ``out.loss`` is its share
of the global mean loss; ``all_reduce_gradients`` sums the gradients over the group (the single-process
gradients), and the printed loss is ``reduce_loss`` (the global mean). The same seed gives the same
losses for any world size, up to float rounding.

``--packed``: every step packs documents of random lengths (each its own repeated block) back to back
into one row of ``--batch * --seqlen`` tokens, with the global cumulative lengths ``cu_seqlens``, as
``DataCollatorWithFlattening`` does; ``shard_inputs(..., cu_seqlens=cu_seqlens)`` shards every document
(no length needs to divide anything) and the model attends within documents only.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from dist_attn import LAYOUTS
from dist_attn.integrations import hf


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--model", choices=("llama", "qwen2"), default="llama",
                        help="config family (both GQA: 4 query heads, 2 KV heads)")
    parser.add_argument("--layout", choices=LAYOUTS, default="zigzag", help="how a sequence is sharded")
    parser.add_argument("--seqlen", type=int, default=64, help="tokens per sequence (a multiple of 2 * world for zigzag)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--period", type=int, default=8, help="length of the repeated block")
    parser.add_argument("--packed", action="store_true",
                        help="pack documents of random lengths into one row of batch * seqlen tokens (cu_seqlens)")
    parser.add_argument("--vocab", type=int, default=97)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: the GPU of LOCAL_RANK if any")
    return parser.parse_args(argv)


def build_model(kind, vocab, seqlen, name):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max(seqlen, 64), attention_dropout=0.0)
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=name)


def make_batch(step, args):
    """(batch, seqlen) ids: a random block of ``period`` tokens repeated; the same on every rank."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    block = torch.randint(0, args.vocab, (args.batch, args.period), generator=gen)
    return block.repeat(1, -(-args.seqlen // args.period))[:, :args.seqlen]


def make_packed_batch(step, args):
    """(1, batch * seqlen) ids of documents with random lengths in [period + 1, 2 * seqlen), each a random block
    of ``period`` tokens repeated, and their int32 ``cu_seqlens``; the same on every rank."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    total, docs, lengths = args.batch * args.seqlen, [], []
    while sum(lengths) < total:
        length = min(int(torch.randint(args.period + 1, 2 * args.seqlen, (1,), generator=gen)), total - sum(lengths))
        block = torch.randint(0, args.vocab, (args.period,), generator=gen)
        docs.append(block.repeat(-(-length // args.period))[:length])
        lengths.append(length)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.cat(docs)[None], cu_seqlens


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    created = False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:  # torchrun (launch.spawn creates its own group)
        backend = "nccl" if args.device == "auto" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        created = True
    try:
        return train(args)
    finally:
        if created:
            dist.destroy_process_group()


def train(args) -> list[float]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    name = hf.register(layout=args.layout)  # the default group: the whole world is one sequence-parallel group
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args.model, args.vocab, args.seqlen, name).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        if args.packed:
            ids, cu_seqlens = make_packed_batch(step, args)
            ids = ids.to(device)
            batch = hf.shard_inputs(ids, labels=ids, layout=args.layout, cu_seqlens=cu_seqlens)
        else:
            ids = make_batch(step, args).to(device)
            batch = hf.shard_inputs(ids, labels=ids, layout=args.layout)  # ValueError on a bad --seqlen
        out = model(**batch, use_cache=False)
        out.loss.backward()
        hf.all_reduce_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(hf.reduce_loss(out.loss).item())
        if rank == 0:
            print(f"step {step + 1} loss {losses[-1]:.4f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
