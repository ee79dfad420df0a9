"""Drop-in entry points: ``dist_attn.context_parallel`` (PyTorch SDPA) and ``dist_attn.compat``
(ring-flash-attention's and yunchang's call signatures).

SDPA: a model that calls PyTorch SDPA, run on shards, equals the model on the whole sequence.

One world of 4 ranks (spawned once) holds rings of 2 (two groups side by side) and of 4. The model is
``launch.model``'s transformer with every attention layer calling ``F.scaled_dot_product_attention``
(``is_causal=True, enable_gqa=True``, heads (B, H, S, D)), as torchtitan-style models do; inside the context
manager the ranks run it on their shards (RoPE by global positions). Its gathered logits and its parameter
gradients (summed over the group) equal the same model's on the full sequence without the context manager,
and so does a bare SDPA call (GQA, causal and not, a custom scale, an SDPA bound before the block). The
arguments that cannot be exact across shards are refused with a ValueError naming them.

compat: every ring-flash-attention function (3 layouts x q/k/v, kvpacked, qkvpacked, dense and varlen) and
yunchang's ``LongContextAttention`` (Ulysses 2 x ring 2, its three ring types) on inputs placed the way those
libraries document (their ``extract_local`` helpers, written out here independently of ``dist_attn.shard``):
this rank's output and input gradients equal the same slices of float64 attention on the full sequence.

DeviceMesh and FSDP2: a one-dimensional mesh is taken wherever a group is (the same bits); FSDP2 over the dp
axis of a (dp 2, cp 2) mesh with the ring over the cp axis trains with the losses and gradient norms of one
process.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from attention_checks import reference_with_grads, value_errors
from launch.spawn import run_world

WORLD = 4
LAYOUTS = ("zigzag", "striped", "contiguous")
TOL = 2e-5  # fp32 against fp32 on the full sequence (different summation order)


def sdpa_attention(q, k, v, layout, group):
    """An attention layer that calls PyTorch SDPA (launch.model passes (B, T, H, D); SDPA takes (B, H, T, D))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def model_case(group, layout, seqlen=24):
    """Max errors of the sharded model's logits and parameter gradients against the full-sequence model."""
    from dist_attn import context_parallel, gather, global_positions, shard
    from launch.model import Transformer

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    model = Transformer(vocab=32, dim=32, layers=2, heads=4, kv_heads=2, attention=sdpa_attention)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (2, seqlen), generator=gen)
    dlogits = torch.randn(2, seqlen, 32, generator=gen)

    full = model(ids, torch.arange(seqlen))  # plain SDPA on the whole sequence, no process group involved
    (full * dlogits).sum().backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    local_len = seqlen // world_size
    with context_parallel(group=group, layout=layout):
        logits = model(shard(ids, layout, rank, world_size), global_positions(layout, rank, world_size, local_len))
    (logits * shard(dlogits, layout, rank, world_size)).sum().backward()
    errors = {"logits": (gather(logits.detach(), layout, group) - full.detach()).abs().max().item()}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)  # each rank's share of the gradient
        errors[name] = (p.grad - reference[name]).abs().max().item()
    return errors


def bare_case(group, layout):
    """A direct SDPA call (bound before the block), GQA, causal and not, custom scale: max errors."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_early

    from dist_attn import context_parallel, gather, shard

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 16, 8, generator=gen)
    k, v = (torch.randn(2, 2, 16, 8, generator=gen) for _ in range(2))
    errors = {}
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
        with context_parallel(group=group, layout=layout):
            out = sdpa_bound_early(*(shard(x, layout, rank, world_size, dim=2) for x in (q, k, v)), is_causal=causal,
                                   scale=0.3, enable_gqa=True)
        errors[causal] = (gather(out, layout, group, dim=2) - ref).abs().max().item()
    return errors


def refusals(group):
    from dist_attn import context_parallel

    x, kv = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    calls = {
        "attn_mask": lambda: F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(8, 8, dtype=torch.bool)),
        "dropout_p": lambda: F.scaled_dot_product_attention(x, x, x, dropout_p=0.1),
        "lengths": lambda: F.scaled_dot_product_attention(x, x[:, :, :4], x[:, :, :4]),
        "dims": lambda: F.scaled_dot_product_attention(x[0], x[0], x[0]),
        "enable_gqa": lambda: F.scaled_dot_product_attention(x, kv, kv),
    }
    with context_parallel(group=group):
        messages = value_errors(calls)
    return messages | value_errors({"layout": lambda: context_parallel(group=group, layout="diagonal").__enter__()})


# ------------------------------------------------------------------------------------- dist_attn.compat

def ring_flash_attn_local(x, family, rank, w):
    """This rank's tokens (dim 1) as ring-flash-attention's tests place them."""
    if family == "ring":
        return x.chunk(w, dim=1)[rank]
    if family == "zigzag_ring":
        chunks = x.chunk(2 * w, dim=1)
        return torch.cat([chunks[rank], chunks[2 * w - 1 - rank]], dim=1)
    return x[:, rank::w]  # stripe


def yunchang_local(x, ring_impl, rank, w, ud):
    """This rank's tokens as yunchang's extract_local places them (Ulysses ranks adjacent)."""
    rd, rr, ur = w // ud, rank // ud, rank % ud
    if ring_impl == "basic":
        return x.chunk(w, dim=1)[rank]
    if ring_impl == "zigzag":
        chunks = x.chunk(2 * rd, dim=1)
        return torch.cat([chunks[rr], chunks[2 * rd - 1 - rr]], dim=1).chunk(ud, dim=1)[ur]
    return x[:, rr::rd].chunk(ud, dim=1)[ur]  # strip: ring rank rr's tokens rr::rd, cut into Ulysses pieces


def _errors(outs, grads, refs, place):
    """Max abs error of local results against ``place`` (a local slice) of the float64 references."""
    ref_out, _, *ref_grads = refs
    errors = [(outs - place(ref_out)).abs().max().item()]
    errors += [(g - place(r)).abs().max().item() for g, r in zip(grads, ref_grads)]
    return max(errors)


def ring_flash_attn_cases(rank, w, group):
    from dist_attn import compat

    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 8 * w, h, 8, generator=gen) for h in (4, 2, 2, 4))
    qkv_same = torch.randn(2, 8 * w, 3, 4, 8, generator=gen)
    errors = {}
    for family in ("ring", "zigzag_ring", "stripe"):
        place = functools.partial(ring_flash_attn_local, family=family, rank=rank, w=w)
        for causal in (False, True):
            refs = reference_with_grads(q, k, v, dout, causal)
            leaves = [place(x).clone().requires_grad_() for x in (q, k, v)]
            out = getattr(compat, f"{family}_flash_attn_func")(*leaves, causal=causal, group=group)
            out.backward(place(dout))
            errors[family, "func", causal] = _errors(out.detach(), [x.grad for x in leaves], refs, place)
            kv = torch.stack([place(k), place(v)], dim=2).requires_grad_()
            q_leaf = place(q).clone().requires_grad_()
            out = getattr(compat, f"{family}_flash_attn_kvpacked_func")(q_leaf, kv, causal=causal, group=group)
            out.backward(place(dout))
            errors[family, "kvpacked", causal] = _errors(out.detach(), [q_leaf.grad, kv.grad[:, :, 0], kv.grad[:, :, 1]],
                                                         refs, place)
        qs, ks, vs = qkv_same.unbind(2)
        refs = reference_with_grads(qs, ks, vs, dout, True)
        qkv = place(qkv_same).clone().requires_grad_()
        out = getattr(compat, f"{family}_flash_attn_qkvpacked_func")(qkv, causal=True, window_size=(-1, -1),
                                                                     group=group)
        out.backward(place(dout))
        errors[family, "qkvpacked", True] = _errors(out.detach(), list(qkv.grad.unbind(2)), refs, place)
    return errors


def ring_flash_attn_varlen_cases(rank, w, group):
    """Packed sequences (16, 32, 16 tokens per sequence x w/2), ring-flash-attention's local cu_seqlens."""
    from dist_attn import compat

    lengths = [8 * w, 16 * w, 8 * w]
    gen = torch.Generator().manual_seed(4)
    seqs = [[torch.randn(1, n, h, 8, generator=gen) for h in (4, 2, 2, 4)] for n in lengths]
    local_cu = torch.tensor([0] + list(itertools.accumulate(n // w for n in lengths)), dtype=torch.int32)
    errors = {}
    for family in ("ring", "zigzag_ring", "stripe"):
        place = functools.partial(ring_flash_attn_local, family=family, rank=rank, w=w)
        refs = [reference_with_grads(q, k, v, dout, True) for q, k, v, dout in seqs]
        packed = [torch.cat([place(seq[i])[0] for seq in seqs]) for i in range(4)]  # (local tokens, h, d)
        q, k, v = (x.clone().requires_grad_() for x in packed[:3])
        out = getattr(compat, f"{family}_flash_attn_varlen_func")(q, k, v, local_cu, int(max(lengths) // w),
                                                                  causal=True, group=group)
        out.backward(packed[3])
        got = [out.detach(), q.grad, k.grad, v.grad]
        expected = [torch.cat([place(ref[i])[0] for ref in refs]) for i in (0, 2, 3, 4)]
        errors[family, "varlen"] = max((g - e).abs().max().item() for g, e in zip(got, expected))
    return errors


def yunchang_cases(rank, world_size):
    from dist_attn import compat

    compat.set_seq_parallel_pg(2, world_size // 2, rank, world_size)
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(2, 8 * world_size, h, 8, generator=gen) for h in (4, 2, 2, 4))
    refs = reference_with_grads(q, k, v, dout, True)
    errors = {}
    for ring_impl in ("basic", "zigzag", "strip"):
        place = functools.partial(yunchang_local, ring_impl=ring_impl, rank=rank, w=world_size, ud=2)
        leaves = [place(x).clone().requires_grad_() for x in (q, k, v)]
        out = compat.LongContextAttention(ring_impl_type=ring_impl)(*leaves, causal=True)
        out.backward(place(dout))
        errors[ring_impl] = _errors(out.detach(), [x.grad for x in leaves], refs, place)
    place = functools.partial(yunchang_local, ring_impl="zigzag", rank=rank, w=world_size, ud=2)
    leaves = [place(x).clone().requires_grad_() for x in (q, k, v)]
    out = compat.LongContextAttention(ring_impl_type="zigzag")(*leaves, causal=True, softcap=2.0)
    out.backward(place(dout))
    errors["zigzag-softcap"] = _errors(out.detach(), [x.grad for x in leaves],
                                       reference_with_grads(q, k, v, dout, True, softcap=2.0), place)
    return errors


def compat_refusals():
    from dist_attn import compat

    x = torch.randn(1, 8, 2, 8)
    calls = {
        "dropout_p": lambda: compat.zigzag_ring_flash_attn_func(x, x, x, dropout_p=0.1),
        "alibi_slopes": lambda: compat.ring_flash_attn_func(x, x, x, alibi_slopes=torch.ones(2)),
        "return_attn_probs": lambda: compat.stripe_flash_attn_func(x, x, x, return_attn_probs=True),
        "window_size": lambda: compat.ring_flash_attn_func(x, x, x, window_size=4),
        "softcap": lambda: compat.LongContextAttention()(x, x, x, softcap=-30.0),
        "scatter_idx": lambda: compat.LongContextAttention(scatter_idx=1),
        "ring_impl_type": lambda: compat.LongContextAttention(ring_impl_type="ring"),
        "use_ulysses_low": lambda: compat.set_seq_parallel_pg(2, 2, dist.get_rank(), 4, use_ulysses_low=False),
    }
    return value_errors(calls)


# ------------------------------------------------------------------------------ DeviceMesh and FSDP2

FSDP_STEPS = 3


def device_mesh_cases(rank):
    """A one-dimensional DeviceMesh wherever a group is taken (same bits as its process group); a 2-D one is
    refused."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_attn import gather, ring_attention, usp_attention

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 8, h, 8, generator=gen) for h in (4, 2, 2))
    by_mesh = ring_attention(q, k, v, causal=True, group=mesh["cp"])
    by_group = ring_attention(q, k, v, causal=True, group=mesh["cp"].get_group())
    usp = usp_attention(q, k, v, causal=True, ulysses_group=mesh["dp"], ring_group=mesh["cp"])
    usp_by_group = usp_attention(q, k, v, causal=True, ulysses_group=mesh["dp"].get_group(),
                                 ring_group=mesh["cp"].get_group())
    result = {"ring": torch.equal(by_mesh, by_group), "usp": torch.equal(usp, usp_by_group),
              "gather": torch.equal(gather(by_mesh, "zigzag", mesh["cp"]), gather(by_group, "zigzag",
                                                                                  mesh["cp"].get_group()))}
    try:
        ring_attention(q, k, v, group=mesh)
        result["2d"] = None
    except ValueError as error:
        result["2d"] = str(error)
    return result


def fsdp2_training(rank):
    """launch.train's model and task with FSDP2 (``fully_shard`` over the dp axis) and ring attention over the
    cp axis of a (dp 2, cp 2) DeviceMesh: (losses, gradient norms before clipping) of FSDP_STEPS steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from launch import train
    from launch.model import Transformer

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    cp_group = mesh["cp"].get_group()
    cfg = train.TrainConfig(steps=FSDP_STEPS, sp=2, device="cpu")
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    where = train.Mesh(cp_group, mesh.get_local_rank("cp"), mesh.get_local_rank("dp"), 2)
    losses, norms = [], []
    for step in range(1, FSDP_STEPS + 1):
        ids, labels, positions, n_answers = train.replica_batch(cfg, step, where, torch.device("cpu"))
        logits = model(ids, positions, layout=cfg.layout, group=mesh["cp"])  # the ring over a DeviceMesh dimension
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=train.IGNORE,
                               reduction="sum") / n_answers
        optimizer.zero_grad()
        loss.backward()  # FSDP2 reduce-scatters over dp (the mean of the replicas)
        with torch.no_grad():
            for p in model.parameters():  # the cp ranks' shares of their replica's gradient
                dist.all_reduce(p.grad.to_local(), group=cp_group)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        norms.append(norm.full_tensor().item())
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(cfg, step)
        optimizer.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        losses.append(reported.item() / 2)
    return losses, norms


def run_cases(rank, world_size):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {2: pairs[rank // 2], 4: dist.new_group(list(range(world_size)))}
    return {
        "ring_flash_attn": {w: ring_flash_attn_cases(dist.get_rank(group), w, group) for w, group in groups.items()},
        "ring_flash_attn_varlen": {w: ring_flash_attn_varlen_cases(dist.get_rank(group), w, group)
                                   for w, group in groups.items()},
        "yunchang": yunchang_cases(rank, world_size),
        "compat_refusals": compat_refusals(),
        "device_mesh": device_mesh_cases(rank),
        "fsdp2": fsdp2_training(rank),
        "model": {(w, layout): model_case(group, layout) for w, group in groups.items() for layout in LAYOUTS},
        "bare": {(w, layout): bare_case(group, layout) for w, group in groups.items() for layout in LAYOUTS},
        "refusals": refusals(groups[4]),
        "restored": F.scaled_dot_product_attention(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 3, 2),
                                                   torch.ones(1, 1, 3, 2)).shape == (1, 1, 2, 2),
    }


@functools.lru_cache(maxsize=None)
def world():
    return run_world(WORLD, run_cases, timeout=300)


CASES = [(w, layout) for w in (2, 4) for layout in LAYOUTS]


@pytest.mark.parametrize("w,layout", CASES, ids=[f"w{w}-{layout}" for w, layout in CASES])
def test_sdpa_model_on_shards_equals_the_full_sequence(w, layout):
    for rank, result in enumerate(world()):
        errors = result["model"][w, layout]
        assert max(errors.values()) <= TOL, (rank, {k: e for k, e in errors.items() if e > TOL})
        bare = result["bare"][w, layout]
        assert max(bare.values()) <= TOL, (rank, bare)


@pytest.mark.parametrize("name,words", [
    ("attn_mask", ["attn_mask is not supported", "is_causal=True"]),
    ("dropout_p", ["dropout_p must be 0; got 0.1"]),
    ("lengths", ["lengths 8 and 4", "cross-attention"]),
    ("dims", ["4-D", "3-D"]),
    ("enable_gqa", ["4 heads and key 2", "enable_gqa=True"]),
    ("layout", ["layout", "diagonal"]),
])
def test_what_cannot_be_exact_is_refused(name, words):
    assert_refused("refusals", name, words)


def assert_refused(key, name, words):
    for result in world():
        message = result[key][name]
        assert message is not None, f"{name} was not refused"
        for word in words:
            assert word in message, (word, message)


def test_sdpa_is_itself_again_after_the_block():
    assert all(result["restored"] for result in world())  # a length-2 query against 3 keys: plain SDPA


COMPAT_TOL = 1e-4  # fp32 gradients against float64


@pytest.mark.parametrize("w", [2, 4])
def test_ring_flash_attn_signatures_on_their_layouts(w):
    for rank, result in enumerate(world()):
        errors = result["ring_flash_attn"][w] | result["ring_flash_attn_varlen"][w]
        assert len(errors) == 18, sorted(errors)  # 3 families x (func, kvpacked causal and not, qkvpacked, varlen)
        assert max(errors.values()) <= COMPAT_TOL, (rank, {k: e for k, e in errors.items() if e > COMPAT_TOL})


def test_yunchang_long_context_attention_on_its_layouts():
    for rank, result in enumerate(world()):
        errors = result["yunchang"]
        assert set(errors) == {"basic", "zigzag", "strip", "zigzag-softcap"}, errors
        assert max(errors.values()) <= COMPAT_TOL, (rank, errors)


@pytest.mark.parametrize("name,words", [
    ("dropout_p", ["zigzag_ring_flash_attn", "dropout_p must be 0"]),
    ("alibi_slopes", ["ring_flash_attn", "alibi_slopes"]),
    ("return_attn_probs", ["stripe_flash_attn", "return_attn_probs"]),
    ("window_size", ["window_size must be a pair", "4"]),
    ("softcap", ["softcap must be a positive finite number", "-30.0"]),
    ("scatter_idx", ["scatter_idx=2, gather_idx=1", "1, 1"]),
    ("ring_impl_type", ["ring_impl_type must be one of", "'ring'"]),
    ("use_ulysses_low", ["use_ulysses_low=False"]),
])
def test_compat_refuses_what_it_does_not_support(name, words):
    assert_refused("compat_refusals", name, words)


def test_a_device_mesh_dimension_is_taken_wherever_a_group_is():
    for result in world():
        checks = result["device_mesh"]
        assert checks["ring"] and checks["usp"] and checks["gather"], checks
        assert "2 dimensions ('dp', 'cp')" in checks["2d"] and "mesh['cp']" in checks["2d"], checks["2d"]


def test_fsdp2_with_ring_over_the_context_axis_matches_one_process():
    """Loss and gradient-norm parity (1e-5) with a one-process launch.train run on the same data and weights."""
    from train_checks import assert_close, one_process_run

    single = one_process_run(["--steps", str(FSDP_STEPS), "--log-every", "1000", "--device", "cpu"])
    for rank, result in enumerate(world()):
        losses, norms = result["fsdp2"]
        assert_close(losses, single.losses, 1e-5)
        assert_close(norms, single.grad_norms, 1e-5)
