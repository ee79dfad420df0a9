"""linear_cross_entropy against the float64 cross-entropy of the full logits: values, gradients, bf16, memory, ranks.

The reference is ``F.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum") / n_valid`` on the whole
(tokens x vocab) logits in float64. Shapes leave partial chunks on both axes (37 tokens in chunks of 8, vocab
1000 in chunks of 128).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from attention_checks import max_error
from dist_attn import linear_cross_entropy
from launch.spawn import run_world
from test_memory import allocation_trace

# float32 against float64: float32 has eps 1.2e-7; the per-row logsumexp over 1000 logits and the sums over rows
# and vocab chunks add a few tens of roundings, so 1e-5 relative leaves a ~100x margin (measured: <= 1e-7
# relative on the loss, <= 3e-7 absolute on gradients of size <= 0.85). The 1e-6 absolute term covers gradient
# entries near zero (softmax probabilities of 1e-6 and less scaled by 1/n). A missing row or vocab chunk, or a
# wrong normalisation, is off by more than 1e-2.
RTOL, ATOL = 1e-5, 1e-6
CHUNKS = dict(chunk_tokens=8, chunk_vocab=128)


def make_inputs(shape=(37,), dim=16, vocab=1000, dtype=torch.float32, bias=True, ignored=0.2, seed=0):
    """hidden (*shape, dim), weight (vocab, dim), bias (vocab,) or None, labels (*shape) with ~``ignored`` of
    them -100; the float tensors are leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = -100
    return hidden, weight, b, labels


def leaves(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


def reference(hidden, weight, bias, labels):
    """(loss, grads of hidden, weight[, bias]) of the full-logits cross-entropy in float64."""
    params = [t.detach().double().requires_grad_() for t in leaves(hidden, weight, bias)]
    h, w = params[:2]
    logits = F.linear(h, w, params[2] if bias is not None else None)
    total = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss = total / (labels != -100).sum()
    return loss.detach(), torch.autograd.grad(loss, params)


def ours(hidden, weight, bias, labels, **kwargs):
    """(loss, grads) of linear_cross_entropy."""
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, **{**CHUNKS, **kwargs})
    return loss.detach(), torch.autograd.grad(loss, leaves(hidden, weight, bias))


def assert_matches_reference(inputs, **kwargs):
    loss, grads = ours(*inputs, **kwargs)
    ref_loss, ref_grads = reference(*inputs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=RTOL, atol=ATOL)
    for name, grad, ref, leaf in zip(("hidden", "weight", "bias"), grads, ref_grads, leaves(*inputs[:3])):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        torch.testing.assert_close(grad.double(), ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------- float32 against float64

CASES = {
    "2d_bias": dict(shape=(37,)),
    "2d_no_bias": dict(shape=(37,), bias=False),
    "3d_bias": dict(shape=(2, 37)),
    "3d_no_bias_half_ignored": dict(shape=(3, 21), bias=False, ignored=0.5),
    "one_vocab_chunk_one_token_chunk": dict(shape=(5,), vocab=100),
    # more tokens than vocab entries: token chunks outside, grad_weight the float32 accumulator
    "tokens_over_vocab": dict(shape=(4, 75), vocab=200),
    "tokens_over_vocab_no_bias": dict(shape=(300,), vocab=130, bias=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float32_matches_float64_reference(case):
    """Loss and the gradients of hidden, weight and bias within RTOL/ATOL of the float64 full-logits reference."""
    assert_matches_reference(make_inputs(**case))


def test_chunk_sizes_do_not_change_the_result():
    """Chunks larger than the inputs, of one row or one vocab entry: still the reference."""
    inputs = make_inputs(shape=(2, 9), vocab=50)
    for chunk_tokens, chunk_vocab in ((1024, 8192), (1, 7), (5, 1)):
        assert_matches_reference(inputs, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)


def test_int32_labels_and_float16():
    """int32 labels give the int64 result; float16 inputs give float16 gradients close to the reference."""
    inputs = make_inputs(shape=(2, 13))
    loss, grads = ours(*inputs)
    loss32, grads32 = ours(*inputs[:3], inputs[3].int())
    assert torch.equal(loss32, loss) and all(torch.equal(a, b) for a, b in zip(grads32, grads))
    half = make_inputs(shape=(2, 13), dtype=torch.float16)
    loss16, grads16 = ours(*half)
    ref_loss, ref_grads = reference(*half)
    assert loss16.dtype == torch.float32 and all(g.dtype == torch.float16 for g in grads16)
    torch.testing.assert_close(loss16.double(), ref_loss, rtol=RTOL, atol=ATOL)  # float32 math on fp16 inputs
    for grad, ref in zip(grads16, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-3, atol=1e-5)  # one float16 rounding


# ----------------------------------------------------------------------------- bfloat16: the 2x rule

def test_bfloat16_within_2x_of_pytorch():
    """bf16 inputs: the error against float64 is at most 2x that of plain PyTorch in bf16 (F.linear +
    F.cross_entropy on the same bf16 inputs, autograd in bf16) + 1e-6, for the loss and every gradient."""
    inputs = make_inputs(shape=(2, 37), dim=32, dtype=torch.bfloat16)
    hidden, weight, bias, labels = inputs
    loss, grads = ours(*inputs)
    plain = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, weight.shape[0]), labels.reshape(-1),
                            reduction="sum") / (labels != -100).sum()
    plain_grads = torch.autograd.grad(plain, leaves(*inputs[:3]))
    ref_loss, ref_grads = reference(*inputs)
    report = {}
    for name, mine, theirs, ref in zip(("loss", "hidden", "weight", "bias"), (loss, *grads), (plain, *plain_grads),
                                       (ref_loss, *ref_grads)):
        report[name] = (max_error(mine, ref), max_error(theirs, ref))
        assert report[name][0] <= 2 * report[name][1] + 1e-6, f"{name}: error > 2x PyTorch's bf16 error: {report}"
    assert all(g.dtype == torch.bfloat16 for g in grads) and loss.dtype == torch.float32


# ------------------------------------------------------------------------- no valid target, one, count

def test_all_labels_ignored_gives_zero_loss_and_gradients():
    """Every label -100: loss exactly 0.0 and every gradient exactly zero (no 0/0 NaN)."""
    hidden, weight, bias, labels = make_inputs(shape=(2, 11))
    loss, grads = ours(hidden, weight, bias, torch.full_like(labels, -100))
    assert torch.equal(loss, torch.tensor(0.0))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_exactly_one_valid_target():
    hidden, weight, bias, labels = make_inputs(shape=(2, 11))
    one = torch.full_like(labels, -100)
    one[1, 7] = labels[1, 7] if labels[1, 7] >= 0 else 3
    assert_matches_reference((hidden, weight, bias, one))


def test_num_items_in_batch_scales_loss_and_gradients():
    """num_items_in_batch = 2x the local count (an int, and a 0-dim tensor) halves the loss and every gradient
    (division by a power of two scales exactly, so only the last bit may differ)."""
    inputs = make_inputs(shape=(2, 19))
    count = int((inputs[3] != -100).sum())
    loss, grads = ours(*inputs)
    for given in (2 * count, torch.tensor(2 * count)):
        half_loss, half_grads = ours(*inputs, num_items_in_batch=given)
        torch.testing.assert_close(half_loss, loss / 2, rtol=1e-6, atol=0)
        for grad, half in zip(grads, half_grads):
            torch.testing.assert_close(half, grad / 2, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------- memory

MEM_DIM, MEM_CHUNKS = 64, dict(chunk_tokens=64, chunk_vocab=256)
MEM_SMALL, MEM_LARGE = (256, 1024), (1024, 4096)  # (tokens, vocab): x4 each, so the logits grow 16x
SLACK = 64 * 1024  # bytes: 0-dim scalars, per-chunk row statistics (a few x 64 floats), index tensors


def grad_buffer_bytes(tokens, vocab, dim=MEM_DIM):
    """float32 bytes of what forward + backward must hold that grows with the shapes: the gradients of hidden
    (tokens x dim), weight (vocab x dim; the float32 accumulator is the result for float32 inputs) and bias,
    the saved LSE (4 bytes a row) and the per-row label masks and counts of the checks (<= 16 bytes a row)."""
    return 4 * (tokens * dim + vocab * dim + vocab) + (4 + 16) * tokens


def peak_bytes(tokens, vocab):
    """Peak CPU tensor bytes allocated during one forward + backward (inputs allocated before tracing)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, MEM_DIM, generator=gen).requires_grad_()
    weight = torch.randn(vocab, MEM_DIM, generator=gen).requires_grad_()
    bias = torch.randn(vocab, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)

    def step():
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, **MEM_CHUNKS)
        torch.autograd.grad(loss, (hidden, weight, bias))

    step()  # warm-up
    return allocation_trace(step)[1]


@pytest.fixture
def one_thread():
    """One torch thread: tiles this small gain nothing from more, and on a busy 2-core box spinning OpenMP
    threads made this test 10x slower (0.8 s against 10 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_peak_memory_does_not_grow_with_tokens_times_vocab(one_thread):
    """Tokens and vocab x4 (logits x16), fixed chunks: the peak grows by no more than the gradient buffers and
    per-row state grow (grad_buffer_bytes), far less than the float32 logits would (+15.7 MB), and stays
    within grad buffers + 4 logits tiles + SLACK, well below the full float32 logits at the larger shape.
    Measured: 546,384 bytes at (256, 1024), 1,544,784 at (1024, 4096) (growth 998,400, allowed 1,076,224); with
    chunks covering the whole logits 3,152,144 and 50,357,264 (growth 47 MB): the check fails on that."""
    peaks = {shape: peak_bytes(*shape) for shape in (MEM_SMALL, MEM_LARGE)}
    tile = 4 * MEM_CHUNKS["chunk_tokens"] * MEM_CHUNKS["chunk_vocab"]
    allowance = grad_buffer_bytes(*MEM_LARGE) - grad_buffer_bytes(*MEM_SMALL) + SLACK
    logits_growth = 4 * (MEM_LARGE[0] * MEM_LARGE[1] - MEM_SMALL[0] * MEM_SMALL[1])
    growth = peaks[MEM_LARGE] - peaks[MEM_SMALL]
    assert growth <= allowance, f"peaks {peaks}: grows by {growth} > allowed {allowance}"
    assert allowance < logits_growth / 10  # the check can tell: the logits would grow by 15.7 MB
    for shape, peak in peaks.items():
        bound = grad_buffer_bytes(*shape) + 4 * tile + SLACK
        assert peak <= bound, f"{shape}: peak {peak} > grad buffers + 4 tiles + slack = {bound}"
    full_logits = 4 * MEM_LARGE[0] * MEM_LARGE[1]
    assert peaks[MEM_LARGE] <= full_logits / 8, f"peak {peaks[MEM_LARGE]} vs float32 logits {full_logits}"


# ------------------------------------------------------------------------------------ world of 2 ranks

WORLD_SHAPE = dict(shape=(2, 24), dim=16, vocab=300)


def world_halves(rank, world_size):
    """Each rank: its half of the sequence (dim 1) of the same full batch, default count over the group; also
    the same call with a one-dimensional DeviceMesh as the group."""
    from torch.distributed.device_mesh import init_device_mesh

    hidden, weight, bias, labels = make_inputs(**WORLD_SHAPE, ignored=0.0)
    labels[:, 14:21] = -100  # rank 1's half holds most ignored targets: the local counts differ (12 + 12 vs 12 + 5)
    local = slice(rank * 12, (rank + 1) * 12)
    local_hidden = hidden.detach()[:, local].clone().requires_grad_()
    loss, grads = ours(local_hidden, weight, bias, labels[:, local], group=None)
    summed = loss.clone()
    dist.all_reduce(summed)
    mesh = init_device_mesh("cpu", (world_size,))
    mesh_loss = linear_cross_entropy(local_hidden, weight, labels[:, local], bias=bias, group=mesh, **CHUNKS)
    # numpy arrays travel by value (tensors would be passed as shared-memory handles, gone once the rank exits)
    return dict(summed=summed.numpy(), loss=loss.numpy(), grads=[g.numpy() for g in grads],
                mesh_loss=mesh_loss.detach().numpy())


def test_two_ranks_sum_to_the_full_sequence():
    """World of 2 (gloo), the sequence split in halves: the all-reduced losses are the full-sequence loss, each
    rank's hidden gradient is its rows of the full gradient, the weight and bias gradients sum to the full ones."""
    results = [{name: [torch.from_numpy(g) for g in value] if name == "grads" else torch.from_numpy(value)
                for name, value in result.items()} for result in run_world(2, world_halves, timeout=120)]
    hidden, weight, bias, labels = make_inputs(**WORLD_SHAPE, ignored=0.0)
    labels[:, 14:21] = -100
    ref_loss, (ref_h, ref_w, ref_b) = reference(hidden, weight, bias, labels)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["summed"].double(), ref_loss, rtol=RTOL, atol=ATOL)
        assert torch.equal(result["mesh_loss"], result["loss"]), f"rank {rank}: DeviceMesh group differs"
        torch.testing.assert_close(result["grads"][0].double(), ref_h[:, rank * 12:(rank + 1) * 12], rtol=RTOL,
                                   atol=ATOL)
    for index, ref in ((1, ref_w), (2, ref_b)):
        summed = sum(result["grads"][index].double() for result in results)
        torch.testing.assert_close(summed, ref, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])  # the halves are not symmetric


# --------------------------------------------------------------------------------------------- bad input

H, W, B, LABELS = torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(10), torch.tensor([0, 9, -100, 3])
BAD = {
    "hidden_not_tensor": (dict(hidden=[[0.0] * 8] * 4), TypeError, r"hidden: expected a torch.Tensor"),
    "hidden_float64": (dict(hidden=H.double(), weight=W.double()), TypeError, r"hidden: .*float32, got torch.float64"),
    "weight_dtype": (dict(weight=W.bfloat16()), TypeError, r"weight: expected the dtype of hidden"),
    "bias_dtype": (dict(bias=B.half()), TypeError, r"bias: expected the dtype of hidden"),
    "labels_float": (dict(labels=LABELS.float()), TypeError, r"labels: expected an integer dtype"),
    "labels_bool": (dict(labels=LABELS > 0), TypeError, r"labels: expected an integer dtype"),
    "hidden_dim": (dict(weight=torch.zeros(10, 7)), ValueError, r"weight: expected shape \(vocab, hidden_dim=8\)"),
    "weight_1d": (dict(weight=torch.zeros(10)), ValueError, r"weight: expected shape"),
    "labels_shape": (dict(labels=LABELS[:3]), ValueError, r"labels: expected shape \(4,\).*got \(3,\)"),
    "bias_shape": (dict(bias=torch.zeros(9)), ValueError, r"bias: expected shape \(10,\)"),
    "device": (dict(weight=W.to("meta")), ValueError, r"one device.*weight on meta"),
    "chunk_tokens_zero": (dict(chunk_tokens=0), ValueError, r"chunk_tokens: expected a positive int, got 0"),
    "chunk_vocab_float": (dict(chunk_vocab=2.0), TypeError, r"chunk_vocab: expected a positive int"),
    "chunk_tokens_bool": (dict(chunk_tokens=True), TypeError, r"chunk_tokens: expected a positive int"),
    "label_too_large": (dict(labels=torch.tensor([0, 10, 1, 2])), ValueError, r"labels: got 10.*vocab size 10"),
    "label_negative": (dict(labels=torch.tensor([0, -1, 1, 2])), ValueError, r"labels: got -1.*ignore_index=-100"),
    "num_items_type": (dict(num_items_in_batch="3"), TypeError, r"num_items_in_batch: expected an int"),
    "num_items_negative": (dict(num_items_in_batch=-1), ValueError, r"num_items_in_batch: .*got -1"),
}


@pytest.mark.parametrize("changes, error, words", BAD.values(), ids=BAD.keys())
def test_bad_input_is_refused(changes, error, words):
    """Each check raises TypeError/ValueError naming the argument and what was expected, before any work."""
    args = dict(hidden=H, weight=W, labels=LABELS, bias=B, **CHUNKS) | changes
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=words):
        linear_cross_entropy(hidden, weight, labels, **args)


def test_ignore_index_inside_the_vocab():
    """ignore_index may be a valid vocab id (here 3): those rows are ignored, and other negative labels refused."""
    hidden, weight, bias, labels = make_inputs(shape=(20,), vocab=50, ignored=0.0)
    labels[:6] = 3
    loss, grads = ours(hidden, weight, bias, labels, ignore_index=3)
    kept = slice(6, None)
    ref_loss, ref_grads = reference(hidden[kept], weight, bias, labels[kept])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=RTOL, atol=ATOL)
    assert torch.equal(grads[0][:6], torch.zeros_like(grads[0][:6]))
    torch.testing.assert_close(grads[0][kept].double(), ref_grads[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads[1].double(), ref_grads[1], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"labels: got -100"):
        linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), ignore_index=3)
