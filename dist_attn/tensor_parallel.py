"""Megatron-style tensor parallelism: column- and row-parallel linear layers over a tensor group.

A transformer layer splits as Megatron-LM does: q/k/v and the MLP's first projection are column-parallel
(each of the t ranks holds 1/t of the output features: its heads, its MLP columns), the attention output
and the MLP's second projection are row-parallel (each rank holds the matching 1/t of the input features
and the partial products are all-reduced). One all-reduce per row-parallel layer forward and one per
column-parallel layer backward; every rank of the group ends each layer with the same activations, so
layers that are not split (norms, embeddings) stay replicated and get equal gradients on every rank.

Under dist-attn each tensor rank runs the ring (or Ulysses x ring) over its own heads: attention splits by
heads, so nothing else changes. The layers are built from full ``nn.Linear`` layers (``from_linear``), so
a model initialised once (same seed on every rank) is sliced, and equals the unsplit model.

Split parameters carry DeepSpeed's and Megatron's marks (``tensor_model_parallel = True``,
``partition_dim``, ``partition_stride``): DeepSpeed's gradient norm then sums them over the tensor ranks and
counts the replicated ones once (on tensor rank 0).

We do not use ``torch.distributed.tensor.parallel`` (not tried): its parameters are DTensors, while
DeepSpeed's ZeRO-1 flattens plain parameter tensors into its fp32 partitions and its pipeline engine sends
plain tensors between stages; these layers keep plain tensors. megatron-core's layers need CUDA for their
RNG tracker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class _CopyToTensorGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward: the input of a column-parallel layer,
    which every rank uses for its own slice of the outputs."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: the partial products of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mark(param, partition_dim):
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1


def _shard_rows(weight, parts, rank, size, name):
    """Rows of ``weight`` for tensor rank ``rank``: of each of ``parts`` equal row blocks (e.g. k and v of a
    fused k/v projection), the rank's 1/size."""
    rows = weight.shape[0]
    if rows % (parts * size):
        raise ValueError(f"{name}: {rows} output features in {parts} part(s) do not split over {size} tensor ranks")
    blocks = weight.reshape(parts, size, rows // (parts * size), weight.shape[1])
    return blocks[:, rank].reshape(-1, weight.shape[1])


class _SplitLinear(nn.Module):
    """A bias-free linear layer holding this rank's shard of the weight, split along ``partition_dim``."""

    partition_dim: int

    def __init__(self, weight_shard, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight_shard)
        _mark(self.weight, self.partition_dim)

    @classmethod
    def _rows(cls, weight, group, parts=1):
        """``_shard_rows`` of ``weight`` for this rank of ``group``."""
        return _shard_rows(weight, parts, dist.get_rank(group), dist.get_world_size(group), cls.__name__)

    @classmethod
    def _check_bias_free(cls, linear):
        if linear.bias is not None:
            raise ValueError(f"{cls.__name__}.from_linear: linear has a bias; only bias-free layers are supported")


class ColumnParallelLinear(_SplitLinear):
    """``y = x W^T`` with this rank's rows of W (its output features); the output stays split."""

    partition_dim = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, parts=1):
        """This rank's slice of a bias-free ``linear``. ``parts`` > 1 splits each of that many equal row blocks
        (a fused projection such as k/v) separately, so every rank gets whole heads of each part."""
        cls._check_bias_free(linear)
        return cls(cls._rows(linear.weight.detach(), group, parts).clone(), group)

    def forward(self, x):
        return F.linear(_CopyToTensorGroup.apply(x, self.group), self.weight)

    def extra_repr(self):
        return f"in_features={self.weight.shape[1]}, out_features_per_rank={self.weight.shape[0]}"


class RowParallelLinear(_SplitLinear):
    """``y = sum over ranks of x_rank W_rank^T``: x arrives split along its features (a column-parallel
    layer's output), this rank holds the matching columns of W; the output is whole on every rank."""

    partition_dim = 1

    @classmethod
    def from_linear(cls, linear: nn.Linear, group):
        cls._check_bias_free(linear)
        return cls(cls._rows(linear.weight.detach().t(), group).t().contiguous(), group)

    def forward(self, x):
        return _ReduceFromTensorGroup.apply(F.linear(x, self.weight), self.group)

    def extra_repr(self):
        return f"in_features_per_rank={self.weight.shape[1]}, out_features={self.weight.shape[0]}"
