"""Mask descriptions (``dist_attn.masks``) against boolean matrices written out from each mask's definition,
their validation, and balanced dispatch against the layouts (exact pair counts)."""

from __future__ import annotations

import pytest
import torch

from dist_attn import masks
from mask_checks import (expected_block_sparse, expected_documents, expected_prefix_lm, expected_shared_prompt,
                         grid)


BLOCKS = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
CASES = {
    "causal": (lambda: masks.causal(37), lambda: torch.tril(torch.ones(37, 37, dtype=torch.bool))),
    "window": (lambda: masks.window(40, 5, 2), lambda: (lambda qp, kp: (kp >= qp - 5) & (kp <= qp + 2))(*grid(40))),
    "window_open_left": (lambda: masks.window(30, None, 0), lambda: torch.tril(torch.ones(30, 30, dtype=torch.bool))),
    "documents": (lambda: masks.documents([0, 5, 5, 17, 18, 40]), lambda: expected_documents([0, 5, 5, 17, 18, 40],
                                                                                             True, None)),
    "documents_bidirectional": (lambda: masks.documents([0, 9, 30], causal=False),
                                lambda: expected_documents([0, 9, 30], False, None)),
    "documents_window": (lambda: masks.documents([0, 20, 33], window=(4, None)),
                         lambda: expected_documents([0, 20, 33], True, (4, None))),
    "prefix_lm": (lambda: masks.prefix_lm([3, 0, 7], [0, 10, 14, 21]),
                  lambda: expected_prefix_lm([3, 0, 7], [0, 10, 14, 21])),
    "prefix_lm_all_prefix": (lambda: masks.prefix_lm([6], [0, 6]), lambda: torch.ones(6, 6, dtype=torch.bool)),
    "shared_prompt": (lambda: masks.shared_prompt(6, [4, 1, 5]), lambda: expected_shared_prompt(6, [4, 1, 5])),
    "block_sparse": (lambda: masks.block_sparse(BLOCKS, 8, seqlen=29), lambda: expected_block_sparse(BLOCKS, 8, 29)),
}


@pytest.mark.parametrize("name", CASES)
def test_constructors_match_their_definitions(name):
    build, expected = CASES[name]
    mask, reference = build(), expected()
    assert torch.equal(mask.dense(), reference)
    assert torch.equal(mask.row_counts(), reference.sum(1))
    assert mask.pairs() == int(reference.sum())


def test_block_sparse_runs_become_one_slice_each():
    assert len(masks.block_sparse(BLOCKS, 8).slices) == 6  # rows: 1+1, 1, 1 (three blocks), 1+1 (two blocks)


@pytest.mark.parametrize("call,exc,message", [
    (lambda: masks.Mask(10, [(0, 10, 0, 10, None, 0), (5, 8, 0, 3, None, None)]), ValueError, "slices overlap"),
    (lambda: masks.Mask(10, [(0, 11, 0, 10, None, 0)]), ValueError, r"inside \[0, 10\)"),
    (lambda: masks.Mask(10, [(3, 3, 0, 10, None, 0)]), ValueError, "non-empty"),
    (lambda: masks.Mask(10, [(0, 5, 6, 10, None, 0)]), ValueError, "leaves no visible pair"),
    (lambda: masks.Mask(10, [(0, 5.0, 0, 10, None, 0)]), TypeError, "ranges must be ints"),
    (lambda: masks.Mask(10, [(0, 5, 0)]), TypeError, r"slices\[0\] must be a MaskSlice"),
    (lambda: masks.Mask(0, []), ValueError, "seqlen must be an int >= 1"),
    (lambda: masks.documents([0, 5, 3]), ValueError, "non-decreasing"),
    (lambda: masks.prefix_lm([3], [0, 5, 9]), ValueError, "one entry per document"),
    (lambda: masks.prefix_lm([6], [0, 5]), ValueError, r"prefix_lens\[0\] must be an int between 0"),
    (lambda: masks.shared_prompt(0, [3]), ValueError, "prompt_len"),
    (lambda: masks.shared_prompt(4, []), ValueError, "response_lens"),
    (lambda: masks.block_sparse(BLOCKS.int(), 8), TypeError, "torch.bool"),
    (lambda: masks.block_sparse(BLOCKS[:3], 8), ValueError, "square"),
    (lambda: masks.block_sparse(BLOCKS, 8, seqlen=40), ValueError, r"seqlen must lie in \(24, 32\]"),
    (lambda: masks.balanced_dispatch(masks.causal(100), 4, 8), ValueError, "multiple of world_size x chunks"),
    (lambda: masks.rank_work(masks.causal(100), "zigzag", 8), ValueError, "multiple of 16 for layout='zigzag'"),
])
def test_bad_masks_raise(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_rank_work_sums_the_rows_each_layout_places():
    mask = masks.prefix_lm([40, 3], [0, 64, 128])
    counts = mask.dense().sum(1)
    for layout in ("contiguous", "zigzag", "striped"):
        work = masks.rank_work(mask, layout, 4)
        assert sum(work) == mask.pairs()
    assert masks.rank_work(mask, "contiguous", 4) == [int(counts[i * 32:(i + 1) * 32].sum()) for i in range(4)]


def test_dispatch_gives_every_chunk_to_one_rank_and_equal_shares():
    """Also when one chunk outweighs all the others (its rank still takes its share of the rows)."""
    heavy_first_row = torch.eye(32, dtype=torch.bool)
    heavy_first_row[0] = True
    for mask in (masks.documents([0, 900, 1000, 1024]), masks.block_sparse(heavy_first_row, 32)):
        dispatch = masks.balanced_dispatch(mask, 4, 8)
        assert dispatch.chunk_size == 32
        assert sorted(c for chunks in dispatch.chunks for c in chunks) == list(range(32))
        assert all(len(chunks) == 8 for chunks in dispatch.chunks), dispatch.chunks
        assert torch.equal(torch.cat([dispatch.positions(r) for r in range(4)]).sort().values, torch.arange(1024))


@pytest.mark.parametrize("world_size", [4, 8, 16, 64])
def test_balanced_dispatch_meets_the_target_where_zigzag_does_not(world_size):
    """Uneven documents, a prompt with four responses and a block-sparse pattern: zigzag's work max/mean is above
    1.2 (block-sparse from 16 ranks on), balanced dispatch's at most 1.05; prefix-LM documents stay within 1.05."""
    from benchmarks.mask_balance import families

    found = {}
    for name, mask in families(8192).items():
        zigzag = masks.imbalance(masks.rank_work(mask, "zigzag", world_size))
        balanced = masks.imbalance(masks.rank_work(mask, masks.balanced_dispatch(mask, world_size, 8), world_size))
        found[name] = (round(zigzag, 3), round(balanced, 3))
        assert balanced <= 1.05, found
    assert found["documents"][0] > 1.2 and found["shared_prompt"][0] > 1.2, found
    assert found["block_sparse"][0] > 1.2 or world_size < 16, found


def test_benchmark_writes_its_table_and_plot(tmp_path):
    from benchmarks import mask_balance

    rows = mask_balance.main(["--seqlen", "2048", "--worlds", "4", "8", "--chunks-per-rank", "4",
                              "--out-dir", str(tmp_path)])
    assert {(r["mask"], r["world"], r["layout"]) for r in rows} == {
        (m, w, layout) for m in mask_balance.families(2048) for w in (4, 8) for layout in mask_balance.LAYOUTS}
    text = (tmp_path / "mask_balance.md").read_text()
    assert "| documents | 4 |" in text and (tmp_path / "mask_balance.png").stat().st_size > 0
    causal_striped = next(r for r in rows if r["mask"] == "causal" and r["layout"] == "striped" and r["world"] == 8)
    assert causal_striped["blocks"] == 8 and causal_striped["hops"] == 7  # striped causal: every block, 7 hops
    # the ring hops the benchmark derives from the boolean matrix are those of the library's plan, from the slices
    from dist_attn.ring import ring_plan

    families = mask_balance.families(2048)
    for r in rows:
        if r["world"] == 4 and r["layout"] != "balanced":  # (the benchmark's dispatch has its own chunk count)
            assert r["hops"] == sum(ring_plan(r["layout"], 4, 512, False, None, None, families[r["mask"]])), r
    assert "Bytes each rank receives per forward pass" in text
