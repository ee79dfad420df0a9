"""benchmarks/memory.py: predict's terms against a hand computation, the 10% validation on 3 small rows in one
2-rank gloo world, the projection's monotonicity, the command line and its errors."""

import pytest

from benchmarks import memory as mem

# tokens 8, batch 1, dim 4, 1 layer, 2 heads / 1 KV head of 2, MLP 16, vocab 10; float32; the Triton kernel, sp 1
HAND = dict(tokens=8, batch=1, dim=4, layers=1, heads=2, kv_heads=1, headdim=2, ffn=16, vocab=10, backend="triton",
            sp=1)


def test_terms_by_hand():
    p = mem.predict(**HAND)
    # parameters: wq, wo 2*4*4, wkv 2*4*2, MLP 2*4*16, 2 norms 2*4 = 184 per layer; embedding + head 2*10*4; norm 4
    P = 184 + 80 + 4
    assert mem.Shape(4, 1, 2, 1, 2, 16, 10).params == P
    assert p.terms["parameters"] == p.terms["gradients"] == 4 * P
    assert p.terms["optimizer state"] == 8 * P + 4 * 10          # exp_avg, exp_avg_sq; 10 float32 step scalars
    # T = 8: X = 8*4*4 = 128, Q = 8*2*2*4 = 128, K = 8*1*2*4 = 64, M = 8*16*4 = 512, S = 4*8*2 = 64, N = 8*8 = 64
    assert p.per_layer == 4 * 128 + 2 * 128 + 3 * 64 + 64 + 2 * 512 + 2 * 64 == 2176
    assert mem.predict(**HAND, checkpoint_layers=True).per_layer == 128 + 128 + 64
    state = 4 * P + 4 * P + 8 * P + 40
    inputs = 16 * 8 + 8 * 8 + 4 * 8 * 2                          # ids, labels, positions, RoPE cos and sin
    # end of the forward: inputs + the layer + final (last output, final norm output, its statistics) + logits
    # and log-softmax 2 * T * V * 4
    assert p.phases["loss forward"] == state + inputs + 2176 + (2 * 128 + 64) + 2 * 8 * 10 * 4
    # the ring backward of the only layer, one rank: X, X, Q, K, 2K, Q, S, N still saved + logits held + dX + dout;
    # the float32 dq 4*T*H*D, the (k, v) message 2K, one float32 dK/dV block 8*T*Hk*D, Triton's delta 4*B*H*(T/2)
    saved = 2 * 128 + 128 + 3 * 64 + 128 + 64 + 64
    ring = 4 * 8 * 2 * 2 + 2 * 64 + 8 * 8 * 1 * 2 + 4 * 2 * 4
    assert p.phases["backward attention"] == state + inputs + saved + 8 * 10 * 4 + 128 + 128 + ring
    assert p.peak == max(p.phases.values()) == sum(p.terms.values())
    assert p.phase == max(p.phases, key=p.phases.get)


def test_fused_loss_terms_by_hand():
    p = mem.predict(**HAND, fused_loss=True, chunk_tokens=4, chunk_vocab=5)
    state = 16 * 268 + 40
    inputs, layer, final = 256, 2176, 320
    tile = 4 * 4 * 5                                             # float32 (chunk_tokens x chunk_vocab)
    assert p.phases["loss forward"] == state + inputs + layer + final + 4 * 8 + tile   # LSE rows, one tile
    # tokens 8 <= vocab 10, vocab chunks outside: float32 grad_rows 4*T*C, grad_weight V*C*4, its float32 chunk
    # (chunk_vocab x C), one tile
    assert p.phases["loss backward"] == state + inputs + layer + final + 4 * 8 + 4 * 8 * 4 + 10 * 4 * 4 \
        + 4 * 5 * 4 + tile
    # vocab 4 < tokens 8, token chunks outside: grad_rows X = 128, float32 grad_weight 4*V*C, a float32 grad_rows
    # chunk (chunk_tokens x C); the forward's LSE and tile are there in both
    q = mem.predict(**{**HAND, "vocab": 4}, fused_loss=True, chunk_tokens=4, chunk_vocab=5)
    assert q.phases["loss backward"] - q.phases["loss forward"] == 128 + 4 * 4 * 4 + 4 * 4 * 4


def test_sharding_divides_the_state():
    one, eight = mem.predict(**HAND), mem.predict(**HAND, shard=8)
    for term in ("parameters", "gradients"):
        assert eight.terms[term] == one.terms[term] // 8
    assert eight.phases["optimizer"] < one.phases["optimizer"]


def test_validation_within_10_percent():
    """3 small launch.train rows (plain, checkpointing, both; peaks in the ring backward, the loss backward and,
    with the fused loss's one tile, the ring backward again) measured in one 2-rank world: within 10%."""
    results = mem.validate(mem.validation_rows(quick=True), progress=False)
    assert [p.phase for _, _, p in results] == ["backward attention", "loss backward", "backward attention"]
    for row, measured, predicted in results:
        ratio = measured["peak"] / predicted.peak
        assert abs(ratio - 1) <= mem.TOLERANCE, (row, measured, predicted.phase, ratio)
        assert measured["state"] == sum(predicted.terms[k] for k in ("parameters", "gradients", "optimizer state"))
        for moment, value in measured["moments"].items():   # every moment of the step, not only the peak
            assert abs(value / predicted.phases[moment] - 1) <= mem.TOLERANCE, (row, moment)
    assert [m["at"] for _, m, _ in results] == ["RingAttnFuncBackward", "LogSoftmaxBackward0", "RingAttnFuncBackward"]


def test_projection_is_monotone():
    rows = mem.projection()
    table = {(r["model"], r["gpu"], r["sp"], r["feature"]): r["tokens"] for r in rows}
    assert table["Llama-3-8B-like", "80 GB", 8, "both"] > 0
    for (model, gpu, sp, feature), tokens in table.items():
        assert tokens % mem.TOKEN_STEP == 0
        if gpu == "80 GB":
            assert table[model, "141 GB", sp, feature] >= tokens          # more memory: never shorter
        for more in (s for s in mem.SP_SIZES if s > sp):
            assert table[model, gpu, more, feature] >= tokens             # more sp: never shorter
    for model, gpu, sp in {key[:3] for key in table}:
        t = {feature: table[model, gpu, sp, feature] for feature, _, _ in mem.FEATURES}
        assert t["checkpointing"] >= t["plain"] and t["both"] >= t["fused loss"] and t["both"] >= t["checkpointing"]
        # the fused loss's float32 accumulator is the smaller of (tokens x dim) and (vocab x dim), and it saves
        # 4 T V 2 bytes of logits and their gradients: never shorter
        assert t["fused loss"] >= t["plain"], (model, gpu, sp, t)
    # checkpointing x the fused loss: the longest of all (8B, 80 GB, sp 8: several times plain)
    assert table["Llama-3-8B-like", "80 GB", 8, "both"] > 4 * table["Llama-3-8B-like", "80 GB", 8, "plain"]


def test_max_tokens_is_the_largest_that_fits():
    shape, memory = mem.LLAMA_8B, 80 * mem.GB
    tokens = mem.max_tokens(shape, memory, 8, True, True)
    budget = (1 - mem.RESERVE) * memory
    assert mem.predict_gpu(shape, tokens, 8, True, True).peak <= budget
    assert mem.predict_gpu(shape, tokens + mem.TOKEN_STEP, 8, True, True).peak > budget
    assert mem.max_tokens(mem.LLAMA_70B, memory, 8, True, True) == 0      # the sharded state alone is too large


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mem.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "MEASURED" in out and "MODELLED" in out


def test_projection_only_writes_the_results(tmp_path):
    written = mem.main(["--projection-only", "--out", tmp_path])
    text = (tmp_path / "memory_projection.md").read_text()
    assert written == [tmp_path / "memory_projection.md"] and "MODELLED" in text and "| 64 |" in text
    assert not (tmp_path / "memory_cpu.md").exists()


@pytest.mark.parametrize("change,name", [(dict(tokens=0), "tokens"), (dict(tokens=7), "tokens"),
                                         (dict(batch=1.5), "batch"), (dict(backend="cuda"), "backend"),
                                         (dict(shard=0), "shard"), (dict(kv_heads=3), "kv_heads"),
                                         (dict(fused_loss=1), "fused_loss"), (dict(master_bytes=-1), "master_bytes"),
                                         (dict(vocab=0), "vocab")])
def test_predict_rejects(change, name):
    with pytest.raises(ValueError, match=name):
        mem.predict(**{**HAND, **change})


@pytest.mark.parametrize("argv,name", [(["--reserve", "1.5"], "--reserve"), (["--sp", "0"], "--sp"),
                                       (["--reserve", "-0.1"], "--reserve")])
def test_main_rejects(argv, name):
    with pytest.raises(ValueError, match=name):
        mem.main(["--projection-only", *argv])


def test_max_tokens_rejects():
    with pytest.raises(ValueError, match="memory_bytes"):
        mem.max_tokens(mem.LLAMA_8B, 0, 8, False, False)
    with pytest.raises(ValueError, match="reserve"):
        mem.max_tokens(mem.LLAMA_8B, 80 * mem.GB, 8, False, False, reserve=1.0)
