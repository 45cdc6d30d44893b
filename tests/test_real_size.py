"""`bench/real_size.py` at 2 layers of the real width (hidden 4096, 128 experts, vocabulary 131072): the FP8
batch-1 decode step reads what the model must read (non-expert weights once, 4 experts per layer) and no more
than 1.3x of it, and XLA:CPU leaves no f16/f8 copy of an expert stack in it. Nothing model-sized is allocated."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import real_size  # noqa: E402


def test_fp8_decode_reads_only_the_routed_experts():
    rows = real_size.main(["--layers", "2", "--mesh", "1", "--weights", "fp8", "--programs", "decode B=1"])
    (row,) = rows
    assert row.params > 8  # the real width: 2 layers of 128 experts hold ~7.5 GiB of E4M3 bits
    assert 0.99 < row.reads / row.must < 1.3, (row.reads, row.must)
    assert "f16/f8" not in row.note
    # reading every expert of both layers would be 7.5 GB more: the check tells the two apart
    assert row.reads < row.must + 0.5


def test_nvfp4_and_hybrid_decode_read_only_the_routed_experts():
    rows = real_size.main(["--layers", "2", "--mesh", "1", "--weights", "nvfp4", "hybrid", "--programs", "decode B=1"])
    nv, hy = rows
    for row in rows:
        assert 0.99 < row.reads / row.must < 1.3, (row.weights, row.reads, row.must)
        assert "f16/f8" not in row.note
    assert hy.params < nv.params  # FP8 attention and shared expert instead of bf16 / NVFP4 plus bf16 attention


def test_hybrid_parameters_fit_an_80gb_card():
    """The released shapes (36 layers) as abstract arrays, nothing compiled: the routed experts by the NVFP4
    release's own byte count (14,155,776 B per expert, docs/model.md 2.6) plus our per-column global scales."""
    import jax.numpy as jnp

    from mistral4_jax.config import ModelConfig

    cfg = ModelConfig.mistral_small_4()
    _, state = real_size.abstract(cfg, jnp.bfloat16, "hybrid", None)
    flat = {"/".join(map(str, p)): v.get_value() for p, v in real_size.nnx.to_flat_state(state)}
    routed = sum(real_size.per_device(v) for p, v in flat.items() if "/mlp/experts/" in p)
    assert routed == 36 * 128 * (14_155_776 + 4 * (2 * 2048 + 4096))
    total = real_size.per_device(state)
    assert total < real_size.CARD80_POOL - 5 * 2**30  # room for a cache and the temporaries
    _, fp8_state = real_size.abstract(cfg, jnp.bfloat16, "fp8", None)
    assert real_size.per_device(fp8_state) > real_size.CARD80_POOL  # what the hybrid is for


def test_fp8_lora_step_compiles_at_the_real_width_with_the_base_packed():
    """One layer at the real width, 512 tokens, float32 (one compile): the LoRA step over the FP8 base (the
    frozen projections and experts as uint8 bits, never widened to f16/f8 stacks) with float32 adapters and
    AdamW moments: the state is 3 x 4 bytes per adapter parameter, (in + out) x r per adapted matrix."""
    import jax.numpy as jnp
    from mistral4_jax.config import ModelConfig

    cfg = ModelConfig.mistral_small_4().replace_text(num_hidden_layers=1)
    compiled, _, ctx = real_size.train_program(cfg, "fp8", None, dtype=jnp.float32, length=512)
    t, r = cfg.text, 16
    attention = [(t.hidden_size, t.q_lora_rank), (t.q_lora_rank, t.num_attention_heads * t.qk_head_dim),
                 (t.hidden_size, t.kv_lora_rank + t.qk_rope_head_dim),
                 (t.kv_lora_rank, t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim)),
                 (t.num_attention_heads * t.v_head_dim, t.hidden_size)]
    experts = [(t.hidden_size, 2 * t.moe_intermediate_size), (t.moe_intermediate_size, t.hidden_size)]
    n = sum((i + o) * r for i, o in attention) + t.n_routed_experts * sum((i + o) * r for i, o in experts)
    # + three int32 counters: the step's, Adam's and the learning-rate schedule's
    assert real_size.per_device(ctx["cache"]) == 3 * 4 * n + 3 * 4
    packed = [x for x in ctx["params"]["language_model"]["layers"]["mlp"]["experts"]["gate_up_proj"].get_value()
              .__dict__.values() if hasattr(x, "dtype")]
    assert [str(x.dtype) for x in packed] == ["uint8", "float32"]
    assert real_size.cpu_artefacts(compiled, cfg) == 0
