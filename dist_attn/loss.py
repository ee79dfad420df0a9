"""Cross-entropy of a language-model head without the logits: ``linear_cross_entropy``.

Why: the logits of a long sequence do not fit (1M tokens x 128K vocab in bf16 is 256 GB). The loss is computed
in (token chunk x vocab chunk) tiles of ``hidden @ weight.T``: the forward keeps an online logsumexp per row
(running max and sum, float32) and saves one float32 LSE per row; the backward recomputes every tile. Extra
memory is one tile plus a float32 (vocab x hidden_dim) gradient accumulator, never (tokens x vocab).

Contract: every row of ``hidden`` (a rank's own tokens of a sequence sharded over ``group``) has its own target
in ``labels`` (already shifted over the full sequence, ``dist_attn.integrations.hf.shard_inputs``) or
``ignore_index``. The result is this rank's share ``sum(CE of its valid rows) / N``, N the number of valid
targets of the whole batch (``num_items_in_batch``; None: counted with one all-reduce over ``group``). The
shares of the group sum to the global mean loss (``hf.reduce_loss``); backward on each rank's share gives that
rank's part of the gradients, whose sum over the group (``hf.all_reduce_gradients``) is the single-process
gradient. No valid target anywhere: 0.0 and zero gradients.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from dist_attn.comm import as_group

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_cross_entropy(hidden, weight, labels, *, bias=None, num_items_in_batch=None, group=None,
                         ignore_index=-100, chunk_tokens=1024, chunk_vocab=8192):
    """This rank's share of the global mean cross-entropy of logits = hidden @ weight.T (+ bias) against
    labels, never materialising (tokens x vocab).

    hidden: (..., hidden_dim) float16/bfloat16/float32; weight: (vocab, hidden_dim) and bias: (vocab,) or None,
    of hidden's dtype; labels: integers of shape hidden.shape[:-1], each in [0, vocab) or ``ignore_index``.
    Returns a 0-dim float32 tensor: the sum of the CE of the valid rows divided by ``num_items_in_batch`` (the
    valid targets of the whole batch, int or tensor; None: the valid labels counted over ``group``, a
    ProcessGroup, a 1-D DeviceMesh or None for the default group, with one all-reduce when the group has more
    than one rank). ``chunk_tokens`` x ``chunk_vocab`` is the tile of logits computed at a time (float32).
    """
    group = as_group(group)
    _check(hidden, weight, labels, bias, num_items_in_batch, ignore_index, chunk_tokens, chunk_vocab)
    if num_items_in_batch is None:
        num_items_in_batch = (labels != ignore_index).sum()  # int64
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(num_items_in_batch, group=group)
    count = torch.as_tensor(num_items_in_batch).to(device=hidden.device, dtype=torch.float32).reshape(())
    rows = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(rows, weight, bias, labels.reshape(-1).long(), count, ignore_index, chunk_tokens,
                                     chunk_vocab)


def _check(hidden, weight, labels, bias, num_items_in_batch, ignore_index, chunk_tokens, chunk_vocab):
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden: expected dtype float16, bfloat16 or float32, got {hidden.dtype}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected the dtype of hidden ({hidden.dtype}), got {value.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (..., hidden_dim), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (vocab, hidden_dim={hidden.shape[-1]}) (hidden_dim: the last "
                         f"dim of hidden), got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden's shape without its last "
                         f"dim), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (vocab), got {tuple(bias.shape)}")
    devices = {"hidden": hidden.device, "weight": weight.device, "labels": labels.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got "
                         f"{', '.join(f'{name} on {device}' for name, device in devices.items())}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool:
                raise ValueError(f"num_items_in_batch: expected a number or a one-element numeric tensor, got a "
                                 f"{num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}")
        elif not isinstance(num_items_in_batch, numbers.Real) or isinstance(num_items_in_batch, bool):
            raise TypeError(f"num_items_in_batch: expected an int, a tensor or None, got "
                            f"{type(num_items_in_batch).__name__}")
        elif num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch: expected the number of valid targets (>= 0), got "
                             f"{num_items_in_batch}")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        value = labels[bad][0].item()
        raise ValueError(f"labels: got {value}, expected values in [0, {vocab}) (vocab size {vocab}) or "
                         f"ignore_index={ignore_index}")


def _tile(h, weight, bias, v0, v1):
    """float32 logits of the rows ``h`` (float32) against vocab entries v0..v1-1 (one new tile)."""
    logits = h @ weight[v0:v1].float().T
    return logits if bias is None else logits.add_(bias[v0:v1].float())


class _LinearCrossEntropy(torch.autograd.Function):
    """rows (tokens, hidden_dim), weight, bias, labels (tokens,), count (0-dim float32) -> 0-dim float32 loss.

    One float32 tile of logits is alive at a time (its softmax is computed in place). The backward accumulates
    in float32 the smaller of the two gradients, grad_rows (tokens x dim) or grad_weight (vocab x dim), over the
    whole loop, and the other one chunk by chunk: with vocab chunks outside when tokens <= vocab, token chunks
    outside otherwise."""

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, count, ignore_index, chunk_tokens, chunk_vocab):
        vocab = weight.shape[0]
        lse = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for t0 in range(0, rows.shape[0], chunk_tokens):
            h, lab = rows[t0:t0 + chunk_tokens].float(), labels[t0:t0 + chunk_tokens]
            valid = lab != ignore_index
            running_max = torch.full(lab.shape, float("-inf"), dtype=torch.float32, device=rows.device)
            running_sum = torch.zeros_like(running_max)
            target = torch.zeros_like(running_max)
            for v0 in range(0, vocab, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab)
                logits = _tile(h, weight, bias, v0, v1)
                here = valid & (lab >= v0) & (lab < v1)
                picked = logits.gather(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0]
                target += torch.where(here, picked, 0.0)
                new_max = torch.maximum(running_max, logits.amax(dim=1))
                running_sum = running_sum * torch.exp(running_max - new_max) + \
                    logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                running_max = new_max
                del logits  # before the next tile is made
            row_lse = running_max + torch.log(running_sum)
            lse[t0:t0 + chunk_tokens] = row_lse
            total += torch.where(valid, row_lse - target, 0.0).sum()
        count = torch.where(count > 0, count, 1.0)  # no valid target anywhere: total is 0, so is the loss
        ctx.save_for_backward(rows, weight, bias, labels, lse, count)
        ctx.settings = ignore_index, chunk_tokens, chunk_vocab
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rows, weight, bias, labels, lse, count = ctx.saved_tensors
        ignore_index, chunk_tokens, chunk_vocab = ctx.settings
        want_rows, want_weight, want_bias = ctx.needs_input_grad[:3]
        tokens, vocab = rows.shape[0], weight.shape[0]
        scale = grad_output.float() / count
        f32 = dict(dtype=torch.float32, device=rows.device)
        vocab_outside = tokens <= vocab  # then grad_rows is the float32 accumulator, else grad_weight
        grad_rows = (torch.zeros(rows.shape, **f32) if vocab_outside else torch.empty_like(rows)) if want_rows else None
        grad_weight = (torch.empty_like(weight) if vocab_outside else torch.zeros(weight.shape, **f32)) \
            if want_weight else None
        grad_bias = torch.zeros(vocab, **f32) if want_bias else None
        token_chunks = [(t0, min(t0 + chunk_tokens, tokens)) for t0 in range(0, tokens, chunk_tokens)]
        vocab_chunks = [(v0, min(v0 + chunk_vocab, vocab)) for v0 in range(0, vocab, chunk_vocab)]
        outer, inner = (vocab_chunks, token_chunks) if vocab_outside else (token_chunks, vocab_chunks)
        for a0, a1 in outer:
            part = None  # the float32 gradient of this outer chunk: of weight[v0:v1], or of rows[t0:t1]
            for b0, b1 in inner:
                (t0, t1), (v0, v1) = ((b0, b1), (a0, a1)) if vocab_outside else ((a0, a1), (b0, b1))
                h, lab = rows[t0:t1].float(), labels[t0:t1]
                valid = lab != ignore_index
                grad_logits = _tile(h, weight, bias, v0, v1).sub_(lse[t0:t1, None]).exp_()  # softmax
                here = (valid & (lab >= v0) & (lab < v1)).float()[:, None]
                grad_logits.scatter_add_(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None], -here)  # - onehot
                grad_logits.mul_(torch.where(valid, scale, 0.0)[:, None])  # d loss / d CE of the row; 0 if ignored
                if want_rows:
                    rows_part = grad_rows[t0:t1] if vocab_outside else part
                    if rows_part is None:
                        part = rows_part = torch.zeros((t1 - t0, rows.shape[1]), **f32)
                    rows_part.addmm_(grad_logits, weight[v0:v1].float())
                if want_weight:
                    weight_part = part if vocab_outside else grad_weight[v0:v1]
                    if weight_part is None:
                        part = weight_part = torch.zeros((v1 - v0, weight.shape[1]), **f32)
                    weight_part.addmm_(grad_logits.T, h)
                if want_bias:
                    grad_bias[v0:v1] += grad_logits.sum(dim=0)
                del grad_logits  # before the next tile is made
            if part is not None:  # the outer chunk is complete: cast it once
                (grad_weight if vocab_outside else grad_rows)[a0:a1] = part
        if vocab_outside and want_rows:
            grad_rows = grad_rows.to(rows.dtype)
        if not vocab_outside and want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if want_bias else None
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None
