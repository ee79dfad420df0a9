"""Ring-aware activation checkpointing (``dist_attn.checkpoint``, ``checkpoint_layer``) and the fused LM-head loss
in the Hugging Face adapter.

One world of 2 gloo ranks. A checkpointed model gives bit-identical logits and gradients to the same model
without checkpointing, and its forward + backward sends exactly the same ring messages (counted with
``traffic_meter``); torch's own checkpoint, as a control, sends the forward's K/V messages a second time.
Covered: ``launch.model``'s transformer over a ring of 2 (zigzag, striped), the same under Ulysses 2 (all-to-all,
no ring), packed sequences through ``checkpoint`` directly, and a Hugging Face Llama with
``hf.gradient_checkpointing_enable``; ``hf.fused_causal_lm_loss`` equals HF's own loss and gradients.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from launch.spawn import run_world

WORLD = 2
VOCAB, SEQLEN = 32, 48


def make_model(attention=None):
    from launch.model import Transformer

    torch.manual_seed(0)
    return Transformer(vocab=VOCAB, dim=32, layers=2, heads=4, kv_heads=2, attention=attention)


def run_model(model, layout, group):
    """Forward + backward of ``model`` on this rank's shard: (logits, {name: grad}, bytes of every message sent)."""
    from dist_attn import global_positions, shard
    from dist_attn.comm import traffic_meter

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQLEN), generator=gen)
    dlogits = torch.randn(2, SEQLEN, VOCAB, generator=gen)
    with traffic_meter() as sent:
        logits = model(shard(ids, layout, rank, world), global_positions(layout, rank, world, SEQLEN // world),
                       layout=layout, group=group)
        (logits * shard(dlogits, layout, rank, world)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(sent)


def with_torch_checkpoint(model):
    for block in model.blocks:
        block.forward = functools.partial(torch_checkpoint, block.forward, use_reentrant=False)
    return model


def compare(base, other):
    """(logits equal, every gradient equal, the messages sent) of ``other`` against ``base``."""
    return {"logits_equal": torch.equal(base[0], other[0]),
            "grads_equal": all(torch.equal(base[1][n], other[1][n]) for n in base[1]),
            "grads_close": all(torch.allclose(base[1][n], other[1][n], rtol=1e-5, atol=1e-6) for n in base[1]),
            "sent": other[2]}


def model_cases(group):
    from dist_attn import checkpoint_layer

    out = {}
    for layout in ("zigzag", "striped"):
        base = run_model(make_model(), layout, group)
        ours = make_model()
        for block in ours.blocks:
            checkpoint_layer(block)
        out[layout] = {"base_sent": base[2], "ours": compare(base, run_model(ours, layout, group)),
                       "torch": compare(base, run_model(with_torch_checkpoint(make_model()), layout, group))}
    return out


def ulysses_case(group):
    """Ulysses 2 x ring 1: the all-to-alls are recomputed (they are activations), the results stay bit-identical."""
    from dist_attn import checkpoint_layer, usp_attention

    def attention(q, k, v, layout, _):
        return usp_attention(q, k, v, causal=True, layout=layout, ulysses_group=group, ring_group=None)

    base = run_model(make_model(attention), "contiguous", group)
    ours = make_model(attention)
    for block in ours.blocks:
        checkpoint_layer(block)
    return compare(base, run_model(ours, "contiguous", group))


def packed_case(group):
    """``checkpoint`` around a function of two packed ring_attention calls: the same gradients and messages."""
    from dist_attn import checkpoint, ring_attention, shard
    from dist_attn.comm import traffic_meter

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cu_seqlens = torch.tensor([0, 5, 22, 30], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    full = [torch.randn(30, 4, 8, generator=gen) for _ in range(3)]

    def layer(q, k, v):
        first = ring_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, group=group)
        return ring_attention(first.tanh(), k, v, cu_seqlens=cu_seqlens, group=group) * q

    results = []
    for wrap in (lambda *a: layer(*a), lambda *a: checkpoint(layer, *a)):
        leaves = [shard(x, "zigzag", rank, world, cu_seqlens=cu_seqlens).requires_grad_() for x in full]
        with traffic_meter() as sent:
            wrap(*leaves).square().sum().backward()
        results.append(([x.grad for x in leaves], list(sent)))
    (base_grads, base_sent), (grads, sent) = results
    return {"grads_equal": all(torch.equal(a, b) for a, b in zip(base_grads, grads)),
            "same_messages": sent == base_sent, "messages": len(sent)}


def misuse_cases(group):
    from dist_attn import checkpoint, checkpoint_layer, ring_attention

    calls = []

    def varying(q):  # the recompute calls ring_attention on other queries than the forward did
        calls.append(1)
        q = q if len(calls) == 1 else q[:, :4]
        return ring_attention(q, q, q, group=group)

    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    errors = {}
    try:
        checkpoint(varying, q).sum().backward()
    except RuntimeError as error:
        errors["other_queries"] = str(error)
    for name, call in {"reentrant": lambda: checkpoint(varying, q, use_reentrant=True),
                       "twice": lambda: checkpoint_layer(checkpoint_layer(torch.nn.Linear(2, 2))),
                       "not_a_module": lambda: checkpoint_layer(lambda x: x)}.items():
        try:
            call()
        except (TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    with torch.no_grad():
        errors["no_grad_runs"] = checkpoint(lambda x: x * 2, torch.ones(2)).tolist() == [2.0, 2.0]
    return errors


def hf_cases(group):
    """HF Llama under the ring adapter: gradient checkpointing (ours) vs none, and the fused loss vs HF's loss."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_attn.comm import traffic_meter
    from dist_attn.integrations import hf

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    name = hf.register(layout="zigzag", group=group)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, SEQLEN), generator=gen)
    labels = ids.clone()
    labels[0, 3:9] = -100
    batch = hf.shard_inputs(ids, labels=labels, layout="zigzag", group=group)

    def run(checkpointed, fused=False):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=name).train()
        if checkpointed:
            hf.gradient_checkpointing_enable(model)
        with traffic_meter() as sent:
            if fused:
                hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     use_cache=False).last_hidden_state
                loss = hf.fused_causal_lm_loss(model, hidden, batch["shift_labels"], batch["num_items_in_batch"],
                                               group=group, chunk_tokens=16, chunk_vocab=32)
            else:
                loss = model(**batch, use_cache=False).loss
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, list(sent)

    base, ours, fused = run(False), run(True), run(True, fused=True)
    return {"ckpt_grads_equal": all(torch.equal(base[1][n], ours[1][n]) for n in base[1]),
            "ckpt_same_messages": base[2] == ours[2], "ckpt_loss_equal": torch.equal(base[0], ours[0]),
            "fused_loss_error": (fused[0] - base[0]).abs().item(),
            "fused_grad_error": max((fused[1][n] - base[1][n]).abs().max().item() for n in base[1]),
            "softcap_refused": _softcap_refused(hf, batch)}


def _softcap_refused(hf, batch):
    class Config:
        final_logit_softcapping = 30.0

    class Model:
        config = Config()

    try:
        hf.fused_causal_lm_loss(Model(), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long))
    except ValueError as error:
        return str(error)
    return None


def run_cases(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    return {"model": model_cases(group), "ulysses": ulysses_case(group), "packed": packed_case(group),
            "misuse": misuse_cases(group), "hf": hf_cases(group)}


@functools.lru_cache(maxsize=None)
def world():
    return run_world(WORLD, run_cases, timeout=240)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_checkpointed_layers_are_bit_identical_and_send_no_extra_ring_messages(layout):
    for result in world():
        case = result["model"][layout]
        assert case["ours"]["logits_equal"] and case["ours"]["grads_equal"], case["ours"]
        assert case["ours"]["sent"] == case["base_sent"] and len(case["base_sent"]) > 0
        # the control: torch's checkpoint gives the same gradients but re-runs the forward ring of both layers
        assert case["torch"]["grads_close"], case["torch"]
        forward_messages = len(case["torch"]["sent"]) - len(case["base_sent"])
        assert forward_messages == 2 * (WORLD - 1), (len(case["torch"]["sent"]), len(case["base_sent"]))


def test_ulysses_and_packed_rings_under_checkpoint():
    for result in world():
        assert result["ulysses"]["logits_equal"] and result["ulysses"]["grads_equal"], result["ulysses"]
        assert result["packed"]["grads_equal"] and result["packed"]["same_messages"], result["packed"]
        assert result["packed"]["messages"] > 0


def test_misuse_is_refused():
    for result in world():
        errors = result["misuse"]
        assert "output of shape (1, 4, 2, 8), the forward made (1, 8, 2, 8)" in errors["other_queries"], errors
        assert "use_reentrant=True is not supported" in errors["reentrant"], errors
        assert "already checkpointed" in errors["twice"], errors
        assert errors["not_a_module"].startswith("TypeError") and "torch.nn.Module" in errors["not_a_module"]
        assert errors["no_grad_runs"] is True


def test_hf_gradient_checkpointing_and_fused_loss():
    for result in world():
        hf = result["hf"]
        assert hf["ckpt_grads_equal"] and hf["ckpt_loss_equal"] and hf["ckpt_same_messages"], hf
        assert hf["fused_loss_error"] <= 1e-6 and hf["fused_grad_error"] <= 1e-6, hf
        assert "final_logit_softcapping=30.0" in hf["softcap_refused"], hf
