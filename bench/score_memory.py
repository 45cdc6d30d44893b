"""Memory and time of the score and fine-tuning-loss programs: whole logits vs lm_head in chunks.

"whole" is what these programs computed before `logprobs.py`: the model's [B, T, V] logits, then the
log-softmax (`score.continuation_logprobs`, `train.step.masked_cross_entropy`). "chunked" is what they
compute now (`score._score_batch`, `train.step.loss_fn`). A one-layer tiny model with the released
vocabulary (131072), so the head dominates as it does at full size; temporaries come from XLA's
`memory_analysis()` of the compiled program (nothing is allocated), time from running the score program
(median of --repeat runs after a warm-up) at the first length. "trunk" is the model up to the final
hidden states alone (what either way costs before the head: at long T mostly attention).

    PYTHONPATH=. python bench/score_memory.py [--lengths 2048 4096 8192] [--batch 1] [--chunk 512]
"""

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mistral4_jax.config import ModelConfig
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.train.step import TrainConfig, loss_fn, masked_cross_entropy

score_mod = importlib.import_module("mistral4_jax.inference.score")  # the package exports the function `score`
MiB = 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    cfg = ModelConfig.tiny(vocab_size=args.vocab, num_hidden_layers=1, first_k_dense_replace=1,
                           max_position_embeddings=max(args.lengths)).replace(vision=None)
    model = Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tc = TrainConfig(steps=1, loss_chunk=args.chunk)
    tgd, params = nnx.split(model, nnx.Param)

    def whole_score(state, ids, mask, targets, weights):
        logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
        return score_mod.continuation_logprobs(logits, targets, weights)

    def whole_loss(p, batch):
        logits = nnx.merge(tgd, p)(batch["input_ids"], attention_mask=batch["attention_mask"])
        return masked_cross_entropy(logits, batch["input_ids"], batch["targets"])[0]

    def trunk_score(state, ids, mask, targets, weights):
        return nnx.merge(graphdef, state).final_hidden(ids, attention_mask=mask)

    def trunk_loss(p, batch):
        return nnx.merge(tgd, p).final_hidden(batch["input_ids"], attention_mask=batch["attention_mask"]).mean()

    chunked_score = jax.jit(lambda *a: score_mod._score_batch(graphdef, *a, chunk=args.chunk))
    progs = {"trunk": (jax.jit(trunk_score), jax.jit(jax.grad(trunk_loss))),
             "whole": (jax.jit(whole_score), jax.jit(jax.grad(whole_loss))),
             "chunked": (chunked_score, jax.jit(jax.grad(lambda p, b: loss_fn(p, None, b, tgd, tc)[0])))}
    print(f"{jax.devices()[0].platform}, batch {args.batch}, vocab {args.vocab}, chunk {args.chunk}, hidden "
          f"{cfg.text.hidden_size}, 1 layer; temporaries in MiB ([B, T, V] fp32 logits for comparison)")
    print(f"{'T':>6} {'logits':>7} | {'score: trunk':>12} {'whole':>6} {'chunked':>7} "
          f"| {'loss+grad: trunk':>16} {'whole':>6} {'chunked':>7}")
    timed = {}
    for i, t in enumerate(args.lengths):
        ids = jnp.asarray(jax.random.randint(jax.random.key(t), (args.batch, t), 0, args.vocab), jnp.int32)
        mask, w = jnp.ones_like(ids), jnp.ones((args.batch, t), jnp.float32)
        batch = {"input_ids": ids, "attention_mask": mask, "targets": mask.astype(bool)}
        row = [t, args.batch * t * args.vocab * 4 / MiB]
        for name, (score_fn, grad_fn) in progs.items():
            sc = score_fn.lower(state, ids, mask, ids, w).compile()
            gr = grad_fn.lower(params, batch).compile()
            row += [sc.memory_analysis().temp_size_in_bytes / MiB, gr.memory_analysis().temp_size_in_bytes / MiB]
            if i == 0 and name != "trunk":
                jax.block_until_ready(sc(state, ids, mask, ids, w))
                runs = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    jax.block_until_ready(sc(state, ids, mask, ids, w))
                    runs.append(time.perf_counter() - t0)
                timed[name] = statistics.median(runs)
            del sc, gr
        t_, full, st, lt, sw, lw, sc_, lc = row
        print(f"{t_:>6} {full:>7.0f} | {st:>12.0f} {sw:>6.0f} {sc_:>7.0f} | {lt:>16.0f} {lw:>6.0f} {lc:>7.0f}")
    print(f"score wall time at T={args.lengths[0]}: whole {timed['whole']:.3f} s, chunked {timed['chunked']:.3f} s "
          f"(chunked / whole = {timed['chunked'] / timed['whole']:.2f})")


if __name__ == "__main__":
    main()
