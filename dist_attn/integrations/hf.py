"""Hugging Face transformers adapter: ring attention as a registered ``attn_implementation``.

``register()`` adds an attention function (``transformers.AttentionInterface``) and a mask function
(``transformers.AttentionMaskInterface``) under one name; a model built with that
``attn_implementation`` then runs every attention layer as ``dist_attn.ring_attention`` over ``group``,
each rank holding its ``layout`` shard of the sequence::

    from transformers import AutoModelForCausalLM
    from dist_attn.integrations import hf

    name = hf.register(layout="zigzag", group=None)                  # "dist_attn_ring"; every rank, once
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    batch = hf.shard_inputs(input_ids, labels=input_ids, layout="zigzag", group=None)
    out = model(**batch, use_cache=False)      # out.loss: this rank's share of the global mean loss
    out.loss.backward()
    hf.all_reduce_gradients(model, group=None)                       # SUM over the sequence-parallel group
    print(hf.reduce_loss(out.loss, group=None))                      # the global mean loss (for logging)
    logits = hf.gather_logits(out.logits, layout="zigzag", group=None)  # (B, T, vocab), every rank

**Packed sequences.** Documents packed back to back into one row (``DataCollatorWithFlattening`` style:
``input_ids`` (1, total), ``position_ids`` restarting at 0 per document) run sequence-parallel with the
*global* cumulative lengths ``cu_seqlens`` (int32, ``(docs + 1,)``, the same on every rank)::

    batch = hf.shard_inputs(input_ids, labels=input_ids, layout="zigzag", cu_seqlens=cu_seqlens)
    out = model(**batch, use_cache=False)
    logits = hf.gather_logits(out.logits, layout="zigzag", cu_seqlens=cu_seqlens)  # (1, total, vocab)

``shard_inputs`` shards every document by ``dist_attn.shard(..., cu_seqlens=...)`` (each one padded at its
end to a multiple of w, 2w for zigzag: no length needs to divide anything), returns the per-document
positions of the local rows as ``position_ids``, shifts the labels *within* each document (a document's
last token has no target; padding rows get -100) and adds ``dist_attn_cu_seqlens`` to the batch: a keyword
the model forwards untouched through ``**kwargs`` to every attention call (``TransformersKwargs``), where
it selects ``ring_attention(..., cu_seqlens=...)``. No token attends to another document. HF's own
flash-attention kwargs ``cu_seq_lens_q`` ... (the unsharded packing of one process) are refused.

**Masks.** Prefix-LM (a bidirectional prefix, e.g. an image or a prompt, then causal text), shared-prompt,
block-sparse or your own ``dist_attn.masks.Mask`` over each row of the batch: pass it to ``shard_inputs(...,
mask=mask)``. The dict then carries it as ``dist_attn_mask`` to every attention call, which runs
``ring_attention(..., mask=mask)`` in place of the model's causal mask; register with ``layout="balanced"`` to
place the chunks by the mask's work. ``position_ids`` are yours to choose there (default 0..seqlen-1, sharded like
the tokens) and are not checked; sliding-window layers are refused (build the window into the mask).

**Configuration.** ``register(name, layout, group, backend)`` binds the layout and process group to the
name; calling it again with the same name rebinds them (idempotent for the same arguments). Different
names can carry different groups. Importing this module does not import transformers; ``register``
does (the ``hf`` extra).

**Inputs.** Every rank passes its ``dist_attn.shard`` of ``input_ids`` and, as ``position_ids``, the
*global* positions of its tokens (RoPE must rotate by global position; for packed documents, the
positions inside each document); ``shard_inputs`` returns both. The attention function checks, at the
first layer, that ``position_ids`` are exactly those positions: a model called without them (HF would use
``arange(local_len)``), with another layout's or with packed positions but no ``dist_attn_cu_seqlens``
fails instead of computing something silently wrong.

**Labels and loss.** HF's causal-LM loss shifts ``labels`` by one inside the model, which is wrong on a
shard (the target of a rank's last token lives on another rank). ``shard_inputs`` shifts the labels of
the full sequence first (``shift_labels[t] = labels[t + 1]``, -100 at the end), then shards them, and
returns them as ``shift_labels`` (HF's loss then skips its own shift) together with
``num_items_in_batch``, the number of valid (non -100) targets of the whole batch (computed from the full
labels, no communication). HF's loss then returns ``sum(local CE) / num_items_in_batch``: this rank's
share; the shares of the group sum to the global mean loss. ``causal_lm_loss`` computes the same share
from logits and shifted labels yourself.

**Gradients.** Each rank backpropagates its own share; ring attention's backward routes the K/V
gradients to the ranks that own them, so rank r's parameter gradients are d(global loss)/d(params)
through rank r's tokens. The single-process gradient is their SUM over the sequence-parallel group:
``all_reduce_gradients(model, group)`` (all-reduce SUM). Under data parallelism on top (DDP or FSDP over
all dp * sp ranks, which *average*), multiply the loss by the SP degree, or reduce SUM over SP and MEAN
over the replicas yourself.

**Not supported** (each raises ValueError): padding attention masks (any masked-out token; pack the
sequences instead: ``shard_inputs(..., cu_seqlens=...)``), HF's flash-attention packing kwargs
(``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``: use ``cu_seqlens`` above), attention
dropout > 0 in training, a KV cache holding earlier tokens (generation), and T5-style ``position_bias``.
Sliding-window layers (``sliding_window=W`` from Mistral/Qwen2/Gemma 2/gpt-oss configs: a query sees itself and
the W-1 tokens before it) run as ``window=(W - 1, 0)``. Attention logit softcapping (Gemma 2's ``softcap``
kwarg) and attention sinks (gpt-oss's ``s_aux``, the module's learned ``sinks``) pass to ``ring_attention``;
MLA (DeepSeek-V2/V3: value head dim below the query/key head dim) needs nothing: the value's own head dim is
kept end to end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_attn.comm import as_group
from dist_attn.layouts import MASK_LAYOUTS, chunks_per_rank, check_layout, gather, global_positions, shard
from dist_attn.masks import Mask
from dist_attn.ring import _world, ring_attention

DEFAULT_NAME = "dist_attn_ring"
IGNORE_INDEX = -100
_CONFIGS: dict[str, dict] = {}  # name -> {"layout", "group", "backend"}
CU_SEQLENS_KWARG = "dist_attn_cu_seqlens"  # the model kwarg carrying the GLOBAL packing to the attention calls
MASK_KWARG = "dist_attn_mask"  # the model kwarg carrying a dist_attn.masks.Mask to the attention calls
_UNSUPPORTED_KWARGS = ("position_bias",)
_SINK_KWARGS = ("s_aux", "sinks")  # gpt-oss passes its module's sinks as s_aux
_HF_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
PADDING_ERROR = ("dist_attn ring attention does not support padding attention masks (got a mask with masked-out "
                 "tokens); pass attention_mask=None, or pack the variable-length sequences into one row and use "
                 "dist_attn.integrations.hf.shard_inputs(..., cu_seqlens=...)")
HF_VARLEN_ERROR = ("dist_attn ring attention does not take transformers' flash-attention packing kwargs {given} (they "
                   "describe the unsharded packing of one process); for packed sequences pass the GLOBAL cumulative "
                   "lengths to dist_attn.integrations.hf.shard_inputs(input_ids, ..., cu_seqlens=cu_seqlens) and call "
                   "the model with its dict (it carries them as " + CU_SEQLENS_KWARG + "), without cu_seq_lens_q/"
                   "cu_seq_lens_k/max_length_q/max_length_k")


def register(name: str = DEFAULT_NAME, layout: str = "zigzag", group=None, backend=None) -> str:
    """Registers ring attention under ``name`` in transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` and binds ``layout``, ``group`` (None: the default group) and ``backend``
    (passed to ``ring_attention``) to it. Call on every rank before the model's first forward; calling again
    rebinds. Returns ``name``, to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if layout not in MASK_LAYOUTS:  # "balanced" needs the mask each batch brings (shard_inputs(..., mask=))
        check_layout(layout)
    if not isinstance(name, str) or not name or "flash" in name or name in ("eager", "sdpa", "flex_attention"):
        raise ValueError(f"name must be a new attn_implementation name (not eager/sdpa/flash*/flex); got {name!r}")
    _CONFIGS[name] = {"layout": layout, "group": as_group(group), "backend": backend}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return _ring_attention_forward(name, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
        return _no_mask(attention_mask)

    attention.__name__ = mask.__name__ = f"{name}_forward"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def registered(name: str = DEFAULT_NAME) -> dict:
    """The {"layout", "group", "backend"} bound to ``name`` by ``register``."""
    if name not in _CONFIGS:
        raise KeyError(f"{name!r} is not registered; call dist_attn.integrations.hf.register({name!r}, ...) first")
    return dict(_CONFIGS[name])


def _no_mask(attention_mask):
    """The mask function: ring attention masks by global positions, so the 2D padding mask is only checked
    (all ones or None) and no (S, S) mask is built."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(PADDING_ERROR)
    return None


def _check_positions(position_ids, layout, rank, world_size, local_len, cu_seqlens=None):
    if cu_seqlens is None:
        expected = global_positions(layout, rank, world_size, local_len, device=position_ids.device)
        what = "global positions"
    else:
        expected = global_positions(layout, rank, world_size, device=position_ids.device, cu_seqlens=cu_seqlens)
        what = "positions inside their packed sequences"
    if position_ids.shape[-1] != local_len or not bool((position_ids == expected).all()):
        shown = position_ids.reshape(-1, position_ids.shape[-1])[0, :8].tolist()
        hint = ("" if cu_seqlens is not None else "; for packed sequences pass cu_seqlens to shard_inputs and the "
                f"model its whole dict (with {CU_SEQLENS_KWARG})")
        raise ValueError(
            f"position_ids must be the {what} of this rank's tokens (layout={layout!r}, rank {rank} of "
            f"{world_size}: {expected[:8].tolist()}...); got {shown}...: pass position_ids from "
            f"dist_attn.integrations.hf.shard_inputs (RoPE needs global positions){hint}")


def _ring_attention_forward(name, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """query (B, H, S_local, D), key (B, H_kv, S_local, D), value (B, H_kv, S_local, D_v) -> ((B, S_local, H, D_v),
    None)."""
    config = _CONFIGS[name]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            _no_mask(attention_mask)
        else:
            raise ValueError(f"dist_attn ring attention builds its causal mask on global positions and takes no "
                             f"{attention_mask.dim()}-D attention_mask (padding masks are not supported); pass "
                             f"attention_mask=None")
    if dropout:
        raise ValueError(f"dist_attn ring attention does not support attention dropout (got dropout={dropout} in "
                         f"training mode); set the config's attention_dropout to 0")
    given = [k for k in _HF_VARLEN_KWARGS if kwargs.get(k) is not None]
    if given:
        raise ValueError(HF_VARLEN_ERROR.format(given=given))
    given = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if given:
        raise ValueError(f"dist_attn ring attention does not support {given} (an additive attention bias, as in T5, "
                         f"is not implemented)")
    sinks = [kwargs[k] for k in _SINK_KWARGS if kwargs.get(k) is not None]
    if len(sinks) > 1:
        raise ValueError(f"dist_attn ring attention got attention sinks twice ({_SINK_KWARGS}); pass one")
    cu_seqlens, mask = kwargs.get(CU_SEQLENS_KWARG), kwargs.get(MASK_KWARG)
    if mask is not None:
        return _masked_attention(config, module, query, key, value, scaling, mask, cu_seqlens, sinks, **kwargs), None
    if cu_seqlens is not None and query.shape[0] != 1:
        raise ValueError(f"packed sequences ({CU_SEQLENS_KWARG}) need a batch of one packed row; got batch "
                         f"{query.shape[0]}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"dist_attn ring attention needs as many keys as queries (got {key.shape[2]} keys for "
                         f"{query.shape[2]} queries: a KV cache?); call the model with use_cache=False "
                         f"(generation is not supported)")
    layout, group = config["layout"], config["group"]
    rank, world_size = _world(group)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and getattr(module, "layer_idx", 0) == 0:  # once per forward
        _check_positions(position_ids, layout, rank, world_size, query.shape[2], cu_seqlens)
    sliding_window = kwargs.get("sliding_window")
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)  # HF: kv_idx > q_idx - W
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if cu_seqlens is not None:  # (1, H, S, D) -> packed (S, H, D)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    else:
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
    out = ring_attention(q, k, v, causal=bool(causal), softmax_scale=scaling, layout=layout, group=group,
                         window=window if causal else None, softcap=kwargs.get("softcap"),
                         sinks=sinks[0] if sinks else None, cu_seqlens=cu_seqlens, backend=config["backend"])
    return (out if cu_seqlens is None else out[None]), None


def _masked_attention(config, module, query, key, value, scaling, mask, cu_seqlens, sinks, **kwargs):
    """The attention call under a ``MASK_KWARG`` mask: (B, S_local, H, D_v)."""
    if cu_seqlens is not None:
        raise ValueError(f"got both {MASK_KWARG} and {CU_SEQLENS_KWARG}: describe the documents in the mask "
                         "(dist_attn.masks.documents, prefix_lm) and pass only mask= to shard_inputs")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} is a sliding-window layer and got a "
                         f"{MASK_KWARG}: build the window into the mask (dist_attn.masks.window, documents(window=))")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
    return ring_attention(q, k, v, softmax_scale=scaling, layout=config["layout"], group=config["group"],
                          softcap=kwargs.get("softcap"), sinks=sinks[0] if sinks else None, mask=mask,
                          backend=config["backend"])


def _check_seqlen(name, x, layout, world_size):
    multiple = world_size * chunks_per_rank(layout)
    if x.dim() != 2:
        raise ValueError(f"{name} must be (batch, seqlen); got shape {tuple(x.shape)}")
    if x.shape[1] % multiple:
        need = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(f"{name}: sequence length {x.shape[1]} must be a multiple of {need} = {multiple} for "
                         f"layout={layout!r} with world_size={world_size}")


def shift_labels(labels, ignore_index=IGNORE_INDEX):
    """``labels[:, 1:]`` padded with ``ignore_index``: the target of every token of the full sequence."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shard_inputs(input_ids, labels=None, position_ids=None, layout="zigzag", group=None,
                 ignore_index=IGNORE_INDEX, cu_seqlens=None, mask=None) -> dict:
    """This rank's part of a batch of full sequences, ready for ``model(**batch)``.

    input_ids, labels: (batch, seqlen) full sequences (identical on every rank of ``group``); seqlen a multiple of
    the group size (``2 * world_size`` for zigzag). position_ids: (batch or 1, seqlen) or None (0..seqlen-1).
    Returns {"input_ids", "position_ids"} (the global positions of the local tokens, (1, local_len) unless given)
    and, with labels, {"labels", "shift_labels", "num_items_in_batch"}: the labels shifted over the full
    sequence and then sharded (passed as both ``labels``, which makes HF compute a loss, and ``shift_labels``,
    which makes it skip its own shift) and the number of valid targets in the whole batch. Pure slicing.

    Packed sequences: ``cu_seqlens``, the GLOBAL cumulative lengths (int32, ``(docs + 1,)``, the same on every
    rank), and input_ids/labels/position_ids of shape (1, total) holding the documents back to back (any
    lengths). Each document is sharded by ``dist_attn.shard(..., cu_seqlens=...)`` (padded at its end to a
    multiple of w, 2w for zigzag); ``position_ids`` (if given, they must restart at 0 at every document) become
    the positions of the local rows inside their documents; labels are shifted within each document (its last
    token gets ``ignore_index``) and padding rows get ``ignore_index``. The dict also carries
    ``dist_attn_cu_seqlens`` (``cu_seqlens`` on the CPU), which the model forwards to the attention calls.

    ``mask``: a ``dist_attn.masks.Mask`` over every row (length seqlen), which the attention then uses in place
    of the causal mask (carried as ``dist_attn_mask``); with it ``layout`` may be "balanced".
    """
    rank, world_size = _world(as_group(group))
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be a dist_attn.masks.Mask; got {type(mask).__name__}")
    check_layout(layout, mask)
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("pass cu_seqlens or mask, not both (dist_attn.masks.documents describes packed "
                             "documents as a mask)")
        return _shard_packed(input_ids, labels, position_ids, layout, rank, world_size, ignore_index, cu_seqlens)
    if mask is not None:
        if input_ids.dim() != 2 or input_ids.shape[1] != mask.seqlen:
            raise ValueError(f"input_ids must be (batch, {mask.seqlen}), the mask's length; got {tuple(input_ids.shape)}")
    if layout not in MASK_LAYOUTS:
        _check_seqlen("input_ids", input_ids, layout, world_size)
    seqlen = input_ids.shape[1]
    local = lambda x: shard(x, layout, rank, world_size, dim=1, mask=mask)  # noqa: E731
    out = {"input_ids": local(input_ids)}
    if position_ids is None:
        out["position_ids"] = global_positions(layout, rank, world_size, seqlen // world_size,
                                               device=input_ids.device, mask=mask)[None]
    else:
        if position_ids.dim() != 2 or position_ids.shape[1] != seqlen:
            raise ValueError(f"position_ids must be (batch or 1, {seqlen}) like input_ids; got {tuple(position_ids.shape)}")
        out["position_ids"] = local(position_ids)
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
        shifted = shift_labels(labels, ignore_index)
        out["labels"] = out["shift_labels"] = local(shifted)
        out["num_items_in_batch"] = (shifted != ignore_index).sum()
    if mask is not None:
        out[MASK_KWARG] = mask
    return out


def _shard_packed(input_ids, labels, position_ids, layout, rank, world_size, ignore_index, cu_seqlens):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of dtype int32; got {type(cu_seqlens).__name__}")
    cu_seqlens = cu_seqlens.cpu()
    bounds = _packed_bounds(cu_seqlens)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] != bounds[-1]:
        raise ValueError(f"input_ids must be one packed row (1, cu_seqlens[-1]) = (1, {bounds[-1]}) with cu_seqlens; "
                         f"got shape {tuple(input_ids.shape)}")
    local = lambda x: shard(x, layout, rank, world_size, dim=1, cu_seqlens=cu_seqlens)  # noqa: E731
    out = {"input_ids": local(input_ids)}
    if position_ids is not None:
        expected = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).to(position_ids.device)
        if position_ids.shape != input_ids.shape or not bool((position_ids[0] == expected).all()):
            raise ValueError(f"position_ids of packed sequences must be (1, {bounds[-1]}) and restart at 0 at every "
                             f"sequence of cu_seqlens (or be None); got shape {tuple(position_ids.shape)}, "
                             f"{position_ids.reshape(-1)[:8].tolist()}...")
    out["position_ids"] = global_positions(layout, rank, world_size, device=input_ids.device,
                                           cu_seqlens=cu_seqlens)[None]
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
        shifted = shift_labels(labels, ignore_index)
        ends = torch.tensor([b - 1 for a, b in zip(bounds, bounds[1:]) if b > a], dtype=torch.long)
        shifted[:, ends.to(shifted.device)] = ignore_index  # no target across a document boundary
        valid = local(torch.ones_like(shifted, dtype=torch.bool))  # False on padding rows
        local_labels = torch.where(valid, local(shifted), torch.full_like(valid, ignore_index, dtype=shifted.dtype))
        out["labels"] = out["shift_labels"] = local_labels
        out["num_items_in_batch"] = (shifted != ignore_index).sum()
    out[CU_SEQLENS_KWARG] = cu_seqlens
    return out


def _packed_bounds(cu_seqlens):
    from dist_attn.kernels.varlen import check_cu_seqlens

    return check_cu_seqlens("cu_seqlens", cu_seqlens, None)


def causal_lm_loss(local_logits, local_shift_labels, num_items_in_batch=None, group=None, ignore_index=IGNORE_INDEX):
    """This rank's share of the global mean cross-entropy: ``sum(CE over local valid targets) / N``, N the number
    of valid targets of the whole sequence (``num_items_in_batch`` from ``shard_inputs``; None: counted with one
    all-reduce over ``group``). The shares of the group sum to the global mean loss (``reduce_loss``);
    backward on the share, then ``all_reduce_gradients``, gives the single-process gradients."""
    group = as_group(group)
    vocab = local_logits.shape[-1]
    total = torch.nn.functional.cross_entropy(local_logits.float().reshape(-1, vocab), local_shift_labels.reshape(-1),
                                              ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        count = (local_shift_labels != ignore_index).sum().to(local_logits.device)
        if _world(group)[1] > 1:
            dist.all_reduce(count, group=group)
        num_items_in_batch = count
    return total / num_items_in_batch


# config attributes that change the logits after the LM head: a fused head + loss would silently skip them
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_causal_lm_loss(model, hidden_states, local_shift_labels, num_items_in_batch=None, group=None,
                         ignore_index=IGNORE_INDEX, **chunks):
    """``causal_lm_loss`` from the final hidden states and the model's LM head, without the (tokens x vocab) logits
    (``dist_attn.linear_cross_entropy``): ``hidden_states`` (B, T_local, hidden) from the base model, e.g.
    ``model.model(input_ids=..., position_ids=..., use_cache=False).last_hidden_state``. Models that transform
    their logits after the head (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``) are refused.
    ``chunks``: ``chunk_tokens`` / ``chunk_vocab`` of ``linear_cross_entropy``."""
    from dist_attn.loss import linear_cross_entropy

    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"fused_causal_lm_loss: the model's config sets {name}={value!r}, which changes the "
                             f"logits after the LM head; compute the logits and use causal_lm_loss instead")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused_causal_lm_loss: the model's output embeddings must be a torch.nn.Linear; got "
                         f"{type(head).__name__}")
    return linear_cross_entropy(hidden_states, head.weight, local_shift_labels, bias=head.bias,
                                num_items_in_batch=num_items_in_batch, group=group, ignore_index=ignore_index,
                                **chunks)


def gradient_checkpointing_enable(model):
    """Hugging Face's gradient checkpointing with ``dist_attn.checkpoint`` as its function: every decoder layer's
    activations are recomputed in the backward, its ring attention is not (the output and LSE of the forward are
    kept). The model must be in training mode, as for ``model.gradient_checkpointing_enable()``."""
    from dist_attn.checkpointing import checkpoint

    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint)


def reduce_loss(local_loss, group=None):
    """The global loss from every rank's share (all-reduce SUM of the detached value; a collective)."""
    group = as_group(group)
    loss = local_loss.detach().clone()
    if _world(group)[1] > 1:
        dist.all_reduce(loss, group=group)
    return loss


@torch.no_grad()
def all_reduce_gradients(model, group=None):
    """Sums every parameter's ``.grad`` over the sequence-parallel ``group`` (one flat all-reduce per dtype and
    device), which turns each rank's gradients into the single-process gradients. A collective."""
    group = as_group(group)
    if _world(group)[1] == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def gather_logits(local_logits, layout="zigzag", group=None, cu_seqlens=None, mask=None):
    """The logits of the full sequence, (batch, seqlen, vocab), on every rank (``dist_attn.gather`` along dim 1;
    a collective, not differentiable). With ``cu_seqlens`` (packed sequences, as given to ``shard_inputs``):
    (1, total, vocab), the padding rows dropped. ``mask``: the one given to ``shard_inputs`` (layout="balanced")."""
    return gather(local_logits, layout, group, dim=1, cu_seqlens=cu_seqlens, mask=mask)
