"""Hugging Face transformers adapter (``dist_attn.integrations.hf``) over real gloo worlds of 2 and 4 ranks.

Tiny causal LMs built from configs with random weights (no download), float32, GQA (4 query heads, 2 KV
heads): Llama, and Qwen2 with its second layer a sliding-window layer (window 10, which crosses shard
boundaries); and the families whose attention needs more (zigzag and striped, both worlds, dense and packed):
Gemma 2 (logit softcap 2, alternating sliding layers), gpt-oss (attention sinks, alternating sliding layers,
MoE) and DeepSeek-V3 (MLA: q/k head dim 24, v 8; MoE). For every layout the sequence-parallel model (``attn_implementation="dist_attn_ring"``, inputs
from ``shard_inputs``) gives the gathered logits, the loss (HF's own loss through ``shift_labels`` and
``num_items_in_batch``, and ``causal_lm_loss``) and, after ``all_reduce_gradients``, the parameter gradients
of the one-process model with ``attn_implementation="eager"`` on the full sequence. Bad inputs raise
ValueError with a clear message; ``launch.train_hf`` gives the same losses on 2 and 4 ranks as in one process.

Packed sequences (``shard_inputs(..., cu_seqlens=...)``): documents of lengths 5, 17, 1 and 26 in one row
(no length divides anything; the 1-token document has no target) give, zigzag and striped, the gathered
logits, the loss (sum of every document's CE over the valid targets of the whole batch) and the summed
gradients of the one-process eager model run on each document separately; ``launch.train_hf --packed``
gives the one-process losses too. One world per size runs every case (a rank start costs seconds).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from launch import train_hf  # noqa: E402
from launch.spawn import run_world  # noqa: E402

TOL = 1e-5  # fp32: |got - expected| <= TOL * (1 + max |expected|) for logits, losses and gradients
SEQLEN, BATCH, VOCAB, WINDOW = 48, 2, 97, 10
LAYOUTS = ("zigzag", "contiguous", "striped")
MODELS = ("llama", "qwen2_sliding")
# Models whose attention needs more than a causal band: Gemma 2 (logit softcap, sliding layers), gpt-oss (sinks,
# sliding layers, MoE), DeepSeek-V3 (MLA: q/k head dim 24, v 8; MoE)
FEATURE_MODELS = ("gemma2", "gpt_oss", "deepseek_v3")
TRAIN_ARGV = ["--steps", "2", "--device", "cpu", "--seqlen", "32"]
DOC_LENS = (5, 17, 1, 26)  # packed documents


def make_config(kind):
    from transformers import DeepseekV3Config, Gemma2Config, GptOssConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, attention_dropout=0.0)
    alternating = dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "gemma2":  # a softcap of 2 bites: the tiny model's scores reach several units
        return Gemma2Config(**common, **alternating, attn_logit_softcapping=2.0, query_pre_attn_scalar=16)
    if kind == "gpt_oss":
        return GptOssConfig(**common, **alternating, num_local_experts=4, num_experts_per_tok=2,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if kind == "deepseek_v3":
        return DeepseekV3Config(**dict(common, num_key_value_heads=4), moe_intermediate_size=32, n_routed_experts=4,
                                num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                                qk_rope_head_dim=8, v_head_dim=8)
    cfg = Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
    return cfg


def make_models(kind, name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config(kind), attn_implementation="eager")
    sp = AutoModelForCausalLM.from_config(make_config(kind), attn_implementation=name)
    sp.load_state_dict(ref.state_dict())
    return ref, sp


def make_data(kind):
    gen = torch.Generator().manual_seed(len(kind))
    ids = torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=gen)
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored targets, some of them at shard borders
    labels[1, 23:27] = -100
    return ids, labels


def rel_error(got, expected):
    return ((got - expected).abs().max() / (1 + expected.abs().max())).item()


def run_case(rank, kind, layout):
    """SP forward/backward on this rank's shard; rank 0 returns the errors against the one-process model."""
    import torch.distributed as dist

    from dist_attn.integrations import hf

    name = hf.register(layout=layout)
    ref, sp = make_models(kind, name)
    ids, labels = make_data(kind)
    batch = hf.shard_inputs(ids, labels=labels, layout=layout)
    out = sp(**batch, use_cache=False)
    out.loss.backward()
    hf.all_reduce_gradients(sp)
    logits = hf.gather_logits(out.logits.detach(), layout=layout)
    loss = hf.reduce_loss(out.loss)
    own_loss = hf.reduce_loss(hf.causal_lm_loss(out.logits, batch["shift_labels"]))  # counts with an all-reduce
    grads = {n: p.grad for n, p in sp.named_parameters()}
    # every rank ends with the same gradients
    norms = torch.stack([g.norm() for g in grads.values()])
    everyone = [torch.empty_like(norms) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, norms)
    if rank != 0:
        return None
    ref_out = ref(input_ids=ids, labels=labels, use_cache=False)
    ref_out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    return {
        "logits": rel_error(logits, ref_out.logits.detach()),
        "loss": rel_error(loss, ref_out.loss.detach()),
        "own_loss": rel_error(own_loss, ref_out.loss.detach()),
        "grads": max(rel_error(grads[n], ref_grads[n]) for n in ref_grads),
        "missing_grads": sorted(n for n, g in grads.items() if g is None),
        "ranks_agree": all(torch.equal(e, everyone[0]) for e in everyone),
    }


def make_mask(name):
    """(dist_attn mask, its boolean matrix written out independently) over SEQLEN tokens."""
    from mask_checks import expected_prefix_lm, expected_shared_prompt

    from dist_attn import masks

    if name == "prefix_lm":  # two documents in a row, prefixes of 7 and 10 tokens
        return masks.prefix_lm([7, 10], [0, 20, SEQLEN]), expected_prefix_lm([7, 10], [0, 20, SEQLEN])
    return masks.shared_prompt(12, [20, 16]), expected_shared_prompt(12, [20, 16])


def run_mask_case(rank, mask_name, layout):
    """SP forward/backward of Llama with a mask (``shard_inputs(..., mask=)``); rank 0 compares with the one-process
    eager model given the mask's boolean matrix as a 4-D additive attention mask."""
    from dist_attn.integrations import hf

    name = hf.register(layout=layout)
    ref, sp = make_models("llama", name)
    ids, labels = make_data(mask_name)
    mask, visible = make_mask(mask_name)
    batch = hf.shard_inputs(ids, labels=labels, layout=layout, mask=mask)
    out = sp(**batch, use_cache=False)
    out.loss.backward()
    hf.all_reduce_gradients(sp)
    logits = hf.gather_logits(out.logits.detach(), layout=layout, mask=mask)
    loss = hf.reduce_loss(out.loss)
    if rank != 0:
        return None
    additive = torch.zeros(BATCH, 1, SEQLEN, SEQLEN).masked_fill(~visible, torch.finfo(torch.float32).min)
    ref_out = ref(input_ids=ids, labels=labels, attention_mask=additive, use_cache=False)
    ref_out.loss.backward()
    ref_norms = {n: p.grad.norm() for n, p in ref.named_parameters()}
    return {"logits": rel_error(logits, ref_out.logits.detach()), "loss": rel_error(loss, ref_out.loss.detach()),
            "grads": max(rel_error(p.grad, dict(ref.named_parameters())[n].grad) for n, p in sp.named_parameters()),
            "grad_norms": max(rel_error(p.grad.norm(), ref_norms[n]) for n, p in sp.named_parameters()),
            # the mask matters: the causal model's logits differ
            "causal_logits": rel_error(logits, ref(input_ids=ids, use_cache=False).logits.detach())}


def make_packed_data(kind):
    """One packed row of DOC_LENS documents: ids, labels (some -100, one at a document border), cu_seqlens."""
    gen = torch.Generator().manual_seed(7 + len(kind))
    cu_seqlens = torch.tensor([0, *torch.tensor(DOC_LENS).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (1, int(cu_seqlens[-1])), generator=gen)
    labels = ids.clone()
    labels[0, 3:4] = -100
    labels[0, 21:25] = -100  # the last token of document 1 is 21; document 2 is the single token 22
    return ids, labels, cu_seqlens


def run_packed_case(rank, kind, layout):
    """Packed SP forward/backward; rank 0 compares with the one-process eager model on every document alone."""
    from dist_attn.integrations import hf

    name = hf.register(layout=layout)
    ref, sp = make_models(kind, name)
    ids, labels, cu_seqlens = make_packed_data(kind)
    position_ids = torch.cat([torch.arange(n) for n in DOC_LENS])[None]  # DataCollatorWithFlattening's
    batch = hf.shard_inputs(ids, labels=labels, position_ids=position_ids, layout=layout, cu_seqlens=cu_seqlens)
    out = sp(**batch, use_cache=False)
    out.loss.backward()
    hf.all_reduce_gradients(sp)
    logits = hf.gather_logits(out.logits.detach(), layout=layout, cu_seqlens=cu_seqlens)
    loss = hf.reduce_loss(out.loss)
    own_loss = hf.reduce_loss(hf.causal_lm_loss(out.logits, batch["shift_labels"]))
    grads = {n: p.grad for n, p in sp.named_parameters()}
    if rank != 0:
        return None
    bounds = cu_seqlens.tolist()
    ref_logits, ce_sum = [], 0.0
    for start, end in zip(bounds, bounds[1:]):
        doc_logits = ref(input_ids=ids[:, start:end], use_cache=False).logits
        ref_logits.append(doc_logits.detach())
        targets = labels[0, start + 1:end]
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(doc_logits[0, :-1], targets, ignore_index=-100,
                                                            reduction="sum")
    valid = sum(int((labels[0, start + 1:end] != -100).sum()) for start, end in zip(bounds, bounds[1:]))
    ref_loss = ce_sum / valid
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    return {
        "logits": rel_error(logits, torch.cat(ref_logits, dim=1)),
        "loss": rel_error(loss, ref_loss.detach()),
        "own_loss": rel_error(own_loss, ref_loss.detach()),
        "grads": max(rel_error(grads[n], ref_grads[n]) for n in ref_grads),
        "missing_grads": sorted(n for n, g in grads.items() if g is None),
        "num_items": int(batch["num_items_in_batch"]) == valid,
        "local_rows": batch["input_ids"].shape[1],
    }


def error_of(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def run_bad_inputs(rank, world_size):
    """Errors raised before any collective of the ring (every rank raises the same)."""
    from dist_attn.integrations import hf

    name = hf.register(layout="zigzag")
    _, sp = make_models("llama", name)
    ids, _ = make_data("llama")
    batch = hf.shard_inputs(ids)
    padding = torch.ones_like(batch["input_ids"])
    padding[0, 0] = 0
    dropout_model = make_models("llama", name)[1].train()
    for module in dropout_model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    return {
        "padding": error_of(lambda: sp(**batch, attention_mask=padding, use_cache=False)),
        "ones_mask_ok": error_of(lambda: sp(**batch, attention_mask=torch.ones_like(padding), use_cache=False)),
        "seqlen": error_of(lambda: hf.shard_inputs(ids[:, :SEQLEN - 2])),
        "dropout": error_of(lambda: dropout_model(**batch, use_cache=False)),
        "local_positions": error_of(lambda: sp(input_ids=batch["input_ids"], use_cache=False)),  # HF's arange
        "other_layout": error_of(lambda: sp(**hf.shard_inputs(ids, layout="striped"), use_cache=False)),
        "layout": error_of(lambda: hf.register(layout="diagonal")),
        "position_bias": error_of(lambda: sp(**batch, use_cache=False, position_bias=torch.zeros(1))),
        "sdpa_under_context_parallel": error_of(lambda: sdpa_model_under_context_parallel(
            hf.shard_inputs(ids, layout="striped"), "striped")),
        **run_bad_packed_inputs(sp),
        **run_bad_mask_inputs(ids),
    }


def run_bad_mask_inputs(ids):
    from dist_attn.integrations import hf

    mask, _ = make_mask("prefix_lm")
    name = hf.register("dist_attn_masked_sliding", layout="zigzag")
    _, sliding = make_models("qwen2_sliding", name)
    cu_seqlens = torch.tensor([0, SEQLEN], dtype=torch.int32)
    return {
        "mask_sliding": error_of(lambda: sliding(**hf.shard_inputs(ids, mask=mask), use_cache=False)),
        "mask_and_cu_seqlens": error_of(lambda: hf.shard_inputs(ids[:1], mask=mask, cu_seqlens=cu_seqlens)),
        "mask_length": error_of(lambda: hf.shard_inputs(ids[:, :SEQLEN - 4], mask=mask)),
        "balanced_without_mask": error_of(lambda: hf.shard_inputs(ids, layout="balanced")),
    }


def sdpa_model_under_context_parallel(batch, layout):
    """HF's own SDPA path inside ``dist_attn.context_parallel``. transformers passes ``is_causal=True`` and no mask
    only where a rank's position_ids are consecutive (every rank of the contiguous layout); elsewhere it builds an
    attn_mask (it reads the jumps as packed-sequence boundaries), which the context manager refuses."""
    from transformers import AutoModelForCausalLM

    from dist_attn import context_parallel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama"), attn_implementation="sdpa")
    with context_parallel(layout=layout):
        return model, model(**batch, use_cache=False)


def run_sdpa_contiguous(rank):
    """HF Llama with attn_implementation="sdpa" under context_parallel, contiguous layout: rank 0's errors of the
    gathered logits and the summed gradients against the one-process eager model."""
    from dist_attn.integrations import hf

    ids, labels = make_data("llama")
    model, out = sdpa_model_under_context_parallel(hf.shard_inputs(ids, labels=labels, layout="contiguous"),
                                                   "contiguous")
    out.loss.backward()
    hf.all_reduce_gradients(model)
    logits = hf.gather_logits(out.logits.detach(), layout="contiguous")
    ref, _ = make_models("llama", "eager")
    ref_out = ref(input_ids=ids, labels=labels, use_cache=False)
    ref_out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    return {"logits": rel_error(logits, ref_out.logits.detach()),
            "loss": rel_error(hf.reduce_loss(out.loss), ref_out.loss.detach()),
            "grads": max(rel_error(p.grad, ref_grads[n].grad) for n, p in model.named_parameters())}


def run_bad_packed_inputs(sp):
    from dist_attn.integrations import hf

    ids, labels, cu_seqlens = make_packed_data("llama")
    batch = hf.shard_inputs(ids, labels=labels, cu_seqlens=cu_seqlens)
    no_cu = {k: v for k, v in batch.items() if k != hf.CU_SEQLENS_KWARG}
    local_cu = torch.tensor([0, batch["input_ids"].shape[1]], dtype=torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=local_cu, cu_seq_lens_k=local_cu, max_length_q=8, max_length_k=8)
    return {
        "hf_varlen": error_of(lambda: sp(**batch, **flash_kwargs, use_cache=False)),
        "packed_no_cu": error_of(lambda: sp(**no_cu, use_cache=False)),
        "packed_batch": error_of(lambda: hf.shard_inputs(ids.expand(2, -1), cu_seqlens=cu_seqlens)),
        "packed_total": error_of(lambda: hf.shard_inputs(ids[:, :-1], cu_seqlens=cu_seqlens)),
        "packed_positions": error_of(lambda: hf.shard_inputs(ids, position_ids=torch.arange(ids.shape[1])[None],
                                                             cu_seqlens=cu_seqlens)),
    }


def run_everything(rank, world_size, cases):
    from dist_attn.integrations import hf

    results = {"cases": {f"{kind}-{layout}": run_case(rank, kind, layout) for kind, layout in cases}}
    results["packed"] = {f"{kind}-{layout}": run_packed_case(rank, kind, layout)
                         for kind, layout in packed_cases(world_size)}
    results["masks"] = {f"{name}-{layout}": run_mask_case(rank, name, layout) for name, layout in mask_cases(world_size)}
    results["bad"] = run_bad_inputs(rank, world_size)
    results["sdpa_contiguous"] = run_sdpa_contiguous(rank)
    hf.register()  # back to the defaults for the example (idempotent)
    results["registered"] = hf.registered()["layout"]
    results["train"] = train_hf.main(TRAIN_ARGV)
    results["train_packed"] = train_hf.main(TRAIN_ARGV + ["--packed"])
    return results


FEATURE_CASES = [(kind, layout) for kind in FEATURE_MODELS for layout in ("zigzag", "striped")]


def world_cases(world_size):
    if world_size == 2:
        return [(kind, layout) for kind in MODELS for layout in LAYOUTS] + FEATURE_CASES
    return [("llama", "zigzag"), ("qwen2_sliding", "zigzag"), ("llama", "striped")] + FEATURE_CASES


def packed_cases(world_size):
    if world_size == 2:
        return [("llama", "zigzag"), ("qwen2_sliding", "zigzag"), ("llama", "striped")] + FEATURE_CASES
    return [("llama", "zigzag"), ("qwen2_sliding", "zigzag")] + FEATURE_CASES


def mask_cases(world_size):
    if world_size == 2:
        return [("prefix_lm", "balanced"), ("prefix_lm", "zigzag"), ("shared_prompt", "balanced")]
    return [("shared_prompt", "balanced")]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request):
    return request.param, run_world(request.param, run_everything, world_cases(request.param), timeout=300)


@pytest.fixture(scope="module")
def single_train():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_hf.main(TRAIN_ARGV), train_hf.main(TRAIN_ARGV + ["--packed"])
    finally:
        torch.set_num_threads(threads)


def test_sp_model_matches_one_process_eager(world):
    world_size, results = world
    errors = results[0]["cases"]
    assert set(errors) == {f"{k}-{layout}" for k, layout in world_cases(world_size)}
    for case, err in errors.items():
        print(f"world {world_size} {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()
                                                         if isinstance(v, float)))
        assert err["missing_grads"] == [] and err["ranks_agree"], (case, err)
        assert max(err["logits"], err["loss"], err["own_loss"], err["grads"]) <= TOL, (case, err)


def test_packed_sp_model_matches_one_process_per_document(world):
    world_size, results = world
    errors = results[0]["packed"]
    assert set(errors) == {f"{k}-{layout}" for k, layout in packed_cases(world_size)}
    for case, err in errors.items():
        print(f"world {world_size} packed {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()
                                                                if isinstance(v, float)))
        assert err["missing_grads"] == [] and err["num_items"], (case, err)
        multiple = world_size * (2 if case.endswith("zigzag") else 1)
        assert err["local_rows"] * world_size == sum(-(-n // multiple) * multiple for n in DOC_LENS), (case, err)
        assert max(err["logits"], err["loss"], err["own_loss"], err["grads"]) <= TOL, (case, err)


def test_masked_sp_model_matches_one_process_eager_with_the_mask(world):
    """Prefix-LM and shared-prompt masks through ``shard_inputs(..., mask=)``, balanced and plain layouts."""
    world_size, results = world
    errors = results[0]["masks"]
    assert set(errors) == {f"{name}-{layout}" for name, layout in mask_cases(world_size)}
    for case, err in errors.items():
        print(f"world {world_size} mask {case}: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
        assert max(err["logits"], err["loss"], err["grads"], err["grad_norms"]) <= TOL, (case, err)
        assert err["causal_logits"] > 100 * TOL, (case, err)


def test_bad_inputs_raise_clear_errors(world):
    world_size, results = world
    for rank, result in enumerate(results):
        bad = result["bad"]
        assert "padding attention masks" in bad["padding"], bad
        assert bad["ones_mask_ok"] is None, bad
        assert "input_ids" in bad["seqlen"] and f"multiple of 2 * world_size = {2 * world_size}" in bad["seqlen"], bad
        assert "dropout" in bad["dropout"], bad
        if rank > 0:  # rank 0's contiguous half starts at 0 like HF's arange
            assert "position_ids must be the global positions" in bad["local_positions"], bad
        assert "position_ids must be the global positions" in bad["other_layout"], bad
        assert "layout" in bad["layout"], bad
        assert "does not support ['position_bias']" in bad["position_bias"], bad
        assert "attn_mask is not supported" in bad["sdpa_under_context_parallel"], bad
        assert "dist_attn.integrations.hf.register()" in bad["sdpa_under_context_parallel"], bad
        assert result["registered"] == "zigzag"
        assert "cu_seq_lens_q" in bad["hf_varlen"] and "shard_inputs(input_ids, ..., cu_seqlens=" in bad["hf_varlen"], bad
        assert "position_ids must be the global positions" in bad["packed_no_cu"], bad
        assert "dist_attn_cu_seqlens" in bad["packed_no_cu"], bad
        assert "one packed row" in bad["packed_batch"] and "one packed row" in bad["packed_total"], bad
        assert "restart at 0" in bad["packed_positions"], bad
        assert "sliding-window layer" in bad["mask_sliding"] and "build the window into the mask" in bad["mask_sliding"]
        assert "pass cu_seqlens or mask, not both" in bad["mask_and_cu_seqlens"], bad
        assert f"must be (batch, {SEQLEN}), the mask's length" in bad["mask_length"], bad
        assert "pass mask=" in bad["balanced_without_mask"], bad


def test_hf_sdpa_under_context_parallel_matches_eager_with_the_contiguous_layout(world):
    _, results = world
    for result in results:
        assert max(result["sdpa_contiguous"].values()) <= TOL, result["sdpa_contiguous"]


def test_train_example_sequence_parallel_matches_one_process(world, single_train):
    world_size, results = world
    dense, packed = single_train
    for losses in (dense, packed):
        assert len(losses) == 2 and all(loss == loss for loss in losses)
    for result in results:
        assert result["train"] == pytest.approx(dense, rel=1e-5, abs=0)
        assert result["train_packed"] == pytest.approx(packed, rel=1e-5, abs=0)


def test_train_example_help():
    with pytest.raises(SystemExit) as exit:
        train_hf.main(["--help"])
    assert exit.value.code == 0
