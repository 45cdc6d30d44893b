"""The `mistral4-jax` command line. Each subcommand lives in `add_<name>` / `run_<name>` here."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a tiny model (no download), convert it, chat with it and score with it",
                       description="Runs the whole path on a model small enough for any machine: writes a tiny "
                                   "random-weight checkpoint in the released HF layout (FP8 with scales) and a small "
                                   "Tekken v15 tokenizer, converts it to Orbax, loads it across the local devices, "
                                   "runs a batched chat (reasoning none and high, one message with an image) and a "
                                   "batch of scoring requests. The weights start random: the model knows only the "
                                   "few sentences --train-steps teaches it.")
    p.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--train-steps", type=int, default=40,
                   help="first fine-tune the random model this many steps on four short chats (a capital, the Zen "
                        "of Python, from the standard library) so its answers are less meaningless (default 40; "
                        "0: keep the random weights)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo.tiny import run_demo as demo

    with tempfile.TemporaryDirectory() as tmp:
        demo(Path(args.dir or tmp), train_steps=args.train_steps, color=sys.stdout.isatty())
    return 0


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="HF-format checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    p.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="shard over a device mesh of this shape, e.g. 1,8,1 (default: one device)")


def _load(args):
    from .checkpoints.load import from_pretrained
    from .sharding import make_mesh

    mesh = None
    if args.mesh:
        try:
            data, expert, tensor = (int(x) for x in args.mesh.split(","))
        except ValueError:
            raise SystemExit(f"--mesh must be DATA,EXPERT,TENSOR integers, got {args.mesh!r}") from None
        mesh = make_mesh(expert, data=data, tensor=tensor)
    return from_pretrained(args.model, dtype=args.dtype, mesh=mesh)


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated token ids, got {text!r}") from None


def _tokenizer_for(model_dir: str):
    """The tokenizer beside the model (tekken.json or tokenizer.json), or a clear exit."""
    from .text.tokenizer import Tokenizer

    return Tokenizer.find(model_dir)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from raw text or token-id prompts (no chat template); prints JSON",
                       description="Greedy or sampled generation (all prompts run as one batch). --prompt TEXT is "
                                   "encoded as plain text with <s> in front, with the tokenizer beside the model; "
                                   "--ids gives token ids. Prints {\"outputs\": [[new ids], ...], ...} as JSON, plus "
                                   "\"texts\" (decoded) when a tokenizer was used. For chat, use `mistral4-jax chat`.")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (encoded with the model directory's tokenizer); repeat for a batch")
    p.add_argument("--ids", action="append", default=[], metavar="ID,ID,...",
                   help="a prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", default=None, metavar="ID,ID,...", help="stop token ids (default: the config's eos)")
    p.add_argument("--stream", action="store_true", help="print each step's tokens to stderr as they come")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import json

    from .inference.generate import generate

    if not args.prompt and not args.ids:
        raise SystemExit("mistral4-jax generate: give at least one --prompt TEXT or --ids ID,ID,...")
    tok = _tokenizer_for(args.model) if args.prompt else None
    prompts = [tok.encode(x, add_bos=True) for x in args.prompt] + [_parse_ids(x, "--ids") for x in args.ids]
    stop = None if args.stop is None else _parse_ids(args.stop, "--stop")
    model = _load(args)

    def print_step(step, tokens):
        print(json.dumps({"step": step, "tokens": tokens}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop,
                   callback=print_step if args.stream else None)
    res = {"outputs": out, "seconds": round(time.perf_counter() - t0, 3)}
    if tok is not None:
        res["texts"] = [tok.decode(o, skip_special_tokens=True) for o in out]
    print(json.dumps(res))
    return 0


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="one chat turn (text, images, reasoning effort), streamed as it is generated",
                       description="Builds a v15 chat prompt (optional system prompt, the user's text and images, "
                                   "the reasoning effort), generates a reply and streams it to stdout token by "
                                   "token. With --reasoning-effort high the model first thinks inside "
                                   "[THINK]...[/THINK]: that reasoning is printed dimmed (on a terminal) after a "
                                   "'reasoning:' label, the answer after 'answer:'. The tokenizer (tekken.json or "
                                   "tokenizer.json) is read from the model directory.",
                       epilog="example: mistral4-jax chat --model /data/m4-orbax --image cat.png "
                              "--prompt 'What is in this picture?' --reasoning-effort high")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file attached to the user message (before the text); repeatable")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    p.add_argument("--reasoning-effort", default="none", choices=["none", "high"],
                   help="none: answer at once (default); high: reason step by step first")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="default 512")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-color", action="store_true", help="never dim the reasoning (default: dim on a terminal)")
    p.set_defaults(func=run_chat)


def run_chat(args) -> int:
    from .inference.generate import generate
    from .text.streaming import ChatStream

    tok = _tokenizer_for(args.model)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": args.prompt}]
    messages.append({"role": "user", "content": content if args.image else args.prompt})
    prompt = tok.apply_chat_template(messages, reasoning_effort=args.reasoning_effort)
    model = _load(args)
    color = sys.stdout.isatty() and not args.no_color
    stream = ChatStream(tok)
    shown = {"kind": None}

    def write(deltas):
        for kind, text in deltas:
            if kind != shown["kind"]:
                sys.stdout.write(("\n" if shown["kind"] else "") + f"{kind}: ")
                shown["kind"] = kind
            sys.stdout.write(f"\033[2m{text}\033[0m" if color and kind == "reasoning" else text)
        sys.stdout.flush()

    t0 = time.perf_counter()
    out = generate(model, [prompt.input_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, pixel_values=prompt.pixel_values,
                   image_sizes=prompt.image_sizes, callback=lambda step, tokens: write(stream.push(tokens[0])))
    write(stream.close())
    print(flush=True)
    dt = time.perf_counter() - t0
    ending = "" if stream.finished else f", stopped at --max-new-tokens {args.max_new_tokens}"
    print(f"[{len(out[0])} tokens in {dt:.1f}s{ending}]", file=sys.stderr)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a JSONL file (log-likelihoods, perplexity); prints JSON",
                       description="Each line of --data is {\"context\": [ids], \"continuation\": [ids]} "
                                   "(scored: summed log-probability and whether it is the greedy "
                                   "continuation) or {\"text\": [ids]} (sliding-window perplexity).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: window / 2)")
    p.add_argument("--expert-stats", default=None, metavar="OUT.json",
                   help="also count which experts every token of the data is routed to (per MoE layer; "
                        "context + continuation or text, in --window pieces) and write counts, fractions and "
                        "entropies to OUT.json and a layer x expert heatmap to OUT.png")
    p.set_defaults(func=run_eval)


def read_eval_data(path) -> tuple[list, list]:
    """(requests [(line number, context, continuation)], texts [(line number, ids)]) of a JSONL file."""
    from .errors import InputError
    from .jsonl import read_jsonl

    requests, texts = [], []
    for n, rec in read_jsonl(path, '{"context", "continuation"} or {"text"} with token-id lists'):
        if "context" in rec and "continuation" in rec:
            requests.append((n, rec["context"], rec["continuation"]))
        elif "text" in rec:
            texts.append((n, rec["text"]))
        else:
            raise InputError(f"{path}:{n}: expected {{\"context\", \"continuation\"}} or {{\"text\"}} "
                             "with token-id lists")
    return requests, texts


def run_eval(args) -> int:
    import json
    import math

    from .errors import InputError
    from .inference.score import perplexity, score

    requests, texts = read_eval_data(args.data)
    model = _load(args)
    out: dict = {}
    if requests:
        try:
            res = score(model, [(c, x) for _, c, x in requests], batch_size=args.batch_size)
        except InputError as e:  # name the line, not the list index
            raise InputError(f"{args.data}: {e} (requests are the context/continuation lines in order: "
                             f"{[n for n, _, _ in requests][:20]})") from None
        out["loglikelihood"] = [{"line": n, "logprob": lp, "greedy": gr} for (n, _, _), (lp, gr) in zip(requests, res)]
        out["accuracy_greedy"] = sum(gr for _, gr in res) / len(res)
    if texts:
        per = [dict(line=n, **perplexity(model, ids, window=args.window, stride=args.stride,
                                         batch_size=args.batch_size)) for n, ids in texts]
        total_nll, total_tok = sum(p["nll"] for p in per), sum(p["tokens"] for p in per)
        out["perplexity"] = {"texts": per, "ppl": math.exp(total_nll / total_tok), "tokens": total_tok}
    if args.expert_stats:
        from .research.expert_stats import expert_load

        load = expert_load(model, [c + x for _, c, x in requests] + [ids for _, ids in texts],
                           batch_size=args.batch_size,
                           max_len=min(args.window, model.config.text.max_position_embeddings))
        path = Path(args.expert_stats)
        load.save_json(path)
        load.save_png(path.with_suffix(".png"))
        out["expert_stats"] = {"json": str(path), "png": str(path.with_suffix(".png")), "tokens": load.tokens,
                               "entropy_normalized": load.to_json()["entropy_normalized"]}
    print(json.dumps(out))
    return 0


def add_lm_eval(sub) -> None:
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on the model; writes lm-eval's results JSON",
                       description="Evaluates the model on EleutherAI lm-evaluation-harness tasks (pip install -e "
                                   "\".[eval]\"): loglikelihood, loglikelihood_rolling and generate_until requests "
                                   "with the semantics of lm-eval's HuggingFace backend (mistral4_jax.harness). "
                                   "Prints the results table; --output-path writes the results as JSON.",
                       epilog="example: mistral4-jax lm-eval --model /data/m4-orbax --tasks hellaswag,wikitext "
                              "--limit 100 --output-path results.json")
    _add_model_args(p)
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", default=None, metavar="TASKDIR", help="a folder of extra task YAML files")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (a fraction if below 1)")
    p.add_argument("--batch-size", default="8", metavar="B", help="requests per compiled call, or auto (default 8)")
    p.add_argument("--weights", default=None, choices=["fp8"], help="keep the large projections in FP8")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K")
    p.add_argument("--output-path", default=None, metavar="OUT.json", help="write lm-eval's results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the results")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the v15 chat template")
    p.add_argument("--reasoning-effort", default="none", choices=["none", "high"],
                   help="the chat template's reasoning effort (with --apply-chat-template; default none)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of requests with do_sample")
    p.set_defaults(func=run_lm_eval)


def run_lm_eval(args) -> int:
    import json

    try:
        from .harness import Mistral4LM
    except ImportError as e:  # lm-eval is an optional extra
        raise SystemExit(f"mistral4-jax lm-eval: {e}") from None
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    lm = Mistral4LM(pretrained=args.model, dtype=args.dtype, batch_size=args.batch_size, mesh=args.mesh,
                    weights=args.weights, reasoning_effort=args.reasoning_effort, seed=args.seed)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                      log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
                                      task_manager=TaskManager(include_path=args.include_path))
    print(make_table(results))
    if args.output_path:
        path = Path(args.output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        print(f"results written to {path}", file=sys.stderr)
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (full or LoRA) on a JSONL dataset",
                       description="Trains with AdamW (warmup + cosine schedule, global-norm clipping) on "
                                   "JSONL lines {\"messages\": [...]} (assistant turns trained), {\"text\": ...} or "
                                   "{\"ids\": [...]}; writes Orbax checkpoints, a loss log and the fine-tuned model "
                                   "(LoRA merged) to --out, which loads with from_pretrained. Rerunning with the same "
                                   "--out resumes from the latest checkpoint.")
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory")
    p.add_argument("--data", required=True, help="JSONL training data")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, train_log.jsonl, the model)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated: attention, shared_experts, experts, dense_mlp (default attention)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512, help="longer sequences are truncated, with a warning")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps, at most 100")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype (the optimizer state is float32 either way)")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in the backward pass")
    p.add_argument("--router-aux-weight", type=float, default=0.0, help="load-balancing loss weight (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps")
    p.add_argument("--mesh", action="store_true", help="shard over all devices (experts split, batch split)")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from .train import LoRAConfig, TrainConfig, finetune

    lora = None
    if args.lora_rank:
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                      clip_norm=args.clip_norm, batch_size=args.batch_size, max_len=args.max_len, remat=args.remat,
                      param_dtype=args.dtype, router_aux_weight=args.router_aux_weight, lora=lora, seed=args.seed)
    mesh = None
    if args.mesh:
        from .sharding import make_mesh
        mesh = make_mesh()
    try:
        finetune(args.model, args.data, args.out, cfg, mesh=mesh, save_every=args.save_every)
    except KeyboardInterrupt:
        print(f"interrupted: the train state is saved in {args.out}/checkpoints; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def add_convert(sub) -> None:
    from .checkpoints.convert import add_arguments

    p = sub.add_parser("convert", help="convert an HF or Mistral-native safetensors checkpoint to sharded Orbax",
                       description="Streams the source one layer at a time (bounded memory), writes Orbax "
                                   "checkpoints plus config.json and the tokenizer files into a temporary sibling "
                                   "of DST, verifies every array, then renames it to DST.")
    add_arguments(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; do not claim an accelerator
    from mistral4_jax.checkpoints.convert import run

    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mistral4-jax", description="Mistral Small 4 in JAX / Flax NNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(sub)
    add_chat(sub)
    add_generate(sub)
    add_eval(sub)
    add_lm_eval(sub)
    add_finetune(sub)
    add_convert(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import Mistral4Error

    try:
        return args.func(args)
    except Mistral4Error as e:
        print(f"mistral4-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
