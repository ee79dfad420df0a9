"""Per-rank attention work under flexible masks: the layouts against mask-aware balanced dispatch.

For each mask family (``dist_attn.masks``: documents, prefix-LM, shared prompt, block-sparse, and causal as the
control) and world size, every rank's work is the exact number of visible (query, key) pairs of the query rows
it holds (``masks.rank_work``; no GPU, no timing). Layouts: contiguous, zigzag, striped, and ``balanced``
(``masks.balanced_dispatch``: equal chunks, largest first onto the least-loaded rank). The table gives max/mean
of that work (1.00 is perfect balance) and, as the communication side, the number of K/V blocks (ranks' key
shards) a rank needs at most (a block none of its queries sees need not reach it) and the blocks every rank
receives in the ring's plan (``ring.plan_for_distances``: the ring relays, so a needed block three hops away
costs three messages); bytes per rank are those blocks times a rank's K/V shard. Striped layouts balance the
work but need every block; contiguous ones skip blocks but pile the work up.

    python -m benchmarks.mask_balance
    python -m benchmarks.mask_balance --seqlen 16384 --worlds 8 64
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from benchmarks.common import RESULTS_DIR, md_row, progress, versions, write_result
from dist_attn import masks
from dist_attn.ring import plan_for_distances

# K/V bytes per token of the bytes-per-rank column: Llama-3-8B-like, 8 KV heads x 128 dims, K and V, bf16
KV_BYTES_PER_TOKEN = 8 * 128 * 2 * 2

LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")


def families(seqlen, seed=0):
    """The masks compared, all over ``seqlen`` tokens (a multiple of 1024): uneven documents, prefix-LM documents
    with long and short prefixes, one prompt with four responses, a 15%-dense block-sparse pattern, causal."""
    q = seqlen // 16
    gen = torch.Generator().manual_seed(seed)
    blocks = seqlen // 128
    return {
        "documents": masks.documents([0, 8 * q, 10 * q, 11 * q, 16 * q]),
        "prefix_lm": masks.prefix_lm([6 * q, q // 2, 2 * q], [0, 8 * q, 12 * q, 16 * q]),
        "shared_prompt": masks.shared_prompt(4 * q, [3 * q] * 4),
        "block_sparse": masks.block_sparse(torch.rand(blocks, blocks, generator=gen) < 0.15, 128),
        "causal": masks.causal(seqlen),
    }


def rank_positions(mask, layout, world_size, chunks_per_rank):
    if layout == "balanced":
        dispatch = masks.balanced_dispatch(mask, world_size, chunks_per_rank)
        return dispatch, [dispatch.positions(r) for r in range(world_size)]
    from dist_attn.layouts import global_positions
    return layout, [global_positions(layout, r, world_size, mask.seqlen // world_size) for r in range(world_size)]


def blocks_needed(visible, positions):
    """Max over ranks of the number of ranks whose keys some of its queries see (its own included)."""
    owner = torch.empty(visible.shape[1], dtype=torch.int64)
    for rank, theirs in enumerate(positions):
        owner[theirs] = rank
    return max(int(owner[visible[mine].any(0)].unique().numel()) for mine in positions)


def ring_hops(visible, positions):
    """Blocks every rank receives per forward pass under the ring's plan for this placement."""
    world_size = len(positions)
    seen = [visible[mine].any(0) for mine in positions]  # the keys some query of rank r sees
    needed = [d for d in range(1, world_size)
              if any(seen[r][positions[(r - d) % world_size]].any() for r in range(world_size))]
    return sum(plan_for_distances(needed, world_size))


def measure(seqlen, worlds, chunks_per_rank):
    rows = []
    cases = [(name, mask, w) for name, mask in families(seqlen).items() for w in worlds]
    for name, mask, w in progress(cases, "mask balance"):
        visible = mask.dense()
        for layout in LAYOUTS:
            placement, positions = rank_positions(mask, layout, w, chunks_per_rank)
            work = masks.rank_work(mask, placement, w)
            hops = ring_hops(visible, positions)
            rows.append(dict(mask=name, world=w, layout=layout, imbalance=masks.imbalance(work),
                             max_pairs=max(work), blocks=blocks_needed(visible, positions), hops=hops,
                             mib_per_rank=hops * seqlen // w * KV_BYTES_PER_TOKEN / 2 ** 20))
    return rows


def markdown(rows, command, seqlen, chunks_per_rank):
    lines = ["# Attention work per rank under flexible masks", "",
             f"Command: `{command}`  ", f"Versions: {versions()}  ",
             f"Sequence of {seqlen} tokens; `balanced` = `dist_attn.masks.balanced_dispatch` with {chunks_per_rank} "
             "chunks per rank. Exact pair counts (no timing): work max/mean per layout (1.00 = balanced) and, in "
             "brackets, the most K/V blocks one rank needs (of w) / the blocks every rank receives per forward "
             "pass under the ring's plan.", ""]
    worlds = sorted({r["world"] for r in rows})
    lines += [md_row(["mask", "w", *LAYOUTS]), md_row(["---"] * (2 + len(LAYOUTS)))]
    for name in dict.fromkeys(r["mask"] for r in rows):
        for w in worlds:
            cells = {r["layout"]: f"{r['imbalance']:.3f} [{r['blocks']}/{r['hops']}]" for r in rows
                     if r["mask"] == name and r["world"] == w}
            lines.append(md_row([name, w, *(cells[layout] for layout in LAYOUTS)]))
    lines += ["", f"Bytes each rank receives per forward pass (MiB, {KV_BYTES_PER_TOKEN} K/V bytes per token: 8 KV "
              "heads x 128 dims, bf16; the backward sends the same blocks again plus their dK/dV):", "",
              md_row(["mask", "w", *LAYOUTS]), md_row(["---"] * (2 + len(LAYOUTS)))]
    for name in dict.fromkeys(r["mask"] for r in rows):
        for w in worlds:
            cells = {r["layout"]: f"{r['mib_per_rank']:.1f}" for r in rows if r["mask"] == name and r["world"] == w}
            lines.append(md_row([name, w, *(cells[layout] for layout in LAYOUTS)]))
    return "\n".join(lines) + "\n"


def plot(rows):
    """Work max/mean (top) and K/V MiB each rank receives per forward pass (bottom), per mask family."""
    def draw(plt, path):
        names = list(dict.fromkeys(r["mask"] for r in rows))
        fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.0), sharex=True, squeeze=False)
        for column, name in enumerate(names):
            for layout in LAYOUTS:
                mine = [r for r in rows if r["mask"] == name and r["layout"] == layout]
                worlds = [r["world"] for r in mine]
                axes[0, column].plot(worlds, [r["imbalance"] for r in mine], marker="o", label=layout)
                axes[1, column].plot(worlds, [r["mib_per_rank"] for r in mine], marker="o", label=layout)
            axes[0, column].set(title=name, ylim=(0.95, None))
            axes[0, column].axhline(1.05, color="grey", lw=0.8, ls="--")
            axes[1, column].set(xlabel="ranks")
            for ax in axes[:, column]:
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("work max / mean")
        axes[1, 0].set_ylabel("K/V MiB received per rank")
        axes[0, -1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.mask_balance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=8192, help="a multiple of 1024 and of w x chunks per rank")
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--chunks-per-rank", type=int, default=8)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.seqlen % 1024 or any(args.seqlen % (w * args.chunks_per_rank) for w in args.worlds):
        p.error(f"--seqlen {args.seqlen} must be a multiple of 1024 and of every world x --chunks-per-rank")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = measure(args.seqlen, args.worlds, args.chunks_per_rank)
    command = "python -m benchmarks.mask_balance " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_result(args.out_dir, "mask_balance", markdown(rows, command.strip(), args.seqlen, args.chunks_per_rank),
                 plot(rows))
    return rows


if __name__ == "__main__":
    main()
