"""The `mistral4-jax` command line. Each subcommand is an `add_<name>` / `run_<name>` pair in `COMMANDS`.

Errors print one line, `mistral4-jax COMMAND: error: ...`: exit 2 when the arguments or input files are
wrong (argparse's own errors, `UsageError`, every `Mistral4Error`), 1 when a run fails otherwise.
SIGINT ends any phase with one line and exit 130, SIGTERM with 143 (see `_Signals`, `_preimport`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .memory import set_cli_allocator

DTYPES = ("bfloat16", "float32", "float16")
# checkpoints.convert.DTYPES, written out here so that building the parser imports no jax (a test keeps them equal)
CONVERT_DTYPES = ("bfloat16", "float32", "float8")
# from_pretrained(weights=...)'s presets (`checkpoints/scheme.PRESETS`; not imported here: it imports jax)
WEIGHTS = ("fp8", "nvfp4", "hybrid", "dense")


class UsageError(Exception):
    """A bad command-line argument: printed as argparse prints its own errors, exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (convert's partial directory, the
    trainer's last checkpoint) runs for it too."""


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


def _add_mesh_arg(p) -> None:
    p.add_argument("--mesh", nargs="?", const="all", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="shard over a device mesh of this shape, e.g. 1,8,1; --mesh alone: every visible device "
                        "on the expert axis (default: one device)")


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF, Mistral-native or converted Orbax)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="parameter dtype (default bfloat16)")
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="fp8: keep attention projections, MLPs and experts as E4M3 with float32 scales (about "
                        "half the memory of bfloat16: the released model fits one H200); nvfp4: routed and shared "
                        "experts as NVFP4; hybrid: routed experts NVFP4, the rest FP8 (fits an 80 GB card); "
                        "dense: everything in --dtype. Default: as stored, FP8 dequantised, NVFP4 kept packed")
    p.add_argument("--experts-from", metavar="DIR", default=None,
                   help="take the routed experts from this safetensors checkpoint of the same model (e.g. the NVFP4 "
                        "release beside the FP8 one)")
    _add_mesh_arg(p)


def _mesh(spec: str | None):
    """The mesh `--mesh` names (None: one device); says so when it leaves visible devices unused."""
    if spec is None:
        return None
    import jax

    from .sharding import make_mesh

    n = len(jax.devices())
    if spec == "all":
        return make_mesh()
    try:
        data, expert, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--mesh must be DATA,EXPERT,TENSOR positive integers (e.g. 1,{n},1), got {spec!r}") from None
    if min(data, expert, tensor) < 1 or data * expert * tensor > n:
        raise UsageError(f"--mesh {spec}: {data}x{expert}x{tensor} = {data * expert * tensor} devices, but {n} "
                         "are visible")
    if data * expert * tensor < n:
        print(f"note: --mesh {spec} uses {data * expert * tensor} of the {n} visible devices", file=sys.stderr)
    return make_mesh(expert, data=data, tensor=tensor)


def _load(args):
    from .checkpoints.load import from_pretrained

    return from_pretrained(args.model, dtype=args.dtype, mesh=_mesh(args.mesh), weights=args.weights,
                           experts_from=args.experts_from)


def _text(value: str, flag: str) -> str:
    if not value.strip():
        raise UsageError(f"{flag} is empty: give the text to start from")
    return value


def _compiling_note() -> None:
    """One line on a terminal: the first token waits for XLA to compile the model."""
    if sys.stderr.isatty():
        print("compiling... (the first token waits for XLA; later calls reuse the programs)", file=sys.stderr,
              flush=True)


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated token ids, got {text!r}") from None


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
        raise UsageError("give at least one --prompt TEXT or --ids ID,ID,...")
    texts = [_text(x, "--prompt") for x in args.prompt]
    ids = [_parse_ids(x, "--ids") for x in args.ids]
    if any(not x for x in ids):
        raise UsageError("--ids is empty: give at least one token id")
    tok = _tokenizer_for(args.model) if texts else None
    prompts = [tok.encode(x, add_bos=True) for x in texts] + ids
    stop = None if args.stop is None else _parse_ids(args.stop, "--stop")
    model = _load(args)

    def print_step(step, tokens):
        print(json.dumps({"step": step, "tokens": tokens}), file=sys.stderr, flush=True)

    _compiling_note()
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

    if not args.image:
        _text(args.prompt, "--prompt")
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

    _compiling_note()
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
                       description="Each line of --data is {\"context\": ..., \"continuation\": ...} (scored: "
                                   "summed log-probability and whether it is the greedy continuation) or "
                                   "{\"text\": ...} (sliding-window perplexity). Values are token-id lists, or "
                                   "strings encoded with the tokenizer beside the model (a text gets <s> in "
                                   "front; a continuation is the tokens that context + continuation adds to the "
                                   "context, as evaluation harnesses do).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=None,
                   help="perplexity window in tokens (default: 2048, or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: window / 2)")
    p.add_argument("--expert-stats", default=None, metavar="OUT.json",
                   help="also count which experts every token of the data is routed to (per MoE layer; "
                        "context + continuation or text, in --window pieces) and write counts, fractions and "
                        "entropies to OUT.json and a layer x expert heatmap to OUT.png")
    p.set_defaults(func=run_eval)


EVAL_LINES = '{"context", "continuation"} or {"text"}, as token-id lists or strings'


def read_eval_data(path, tokenizer=None, vocab_size: int | None = None,
                   max_len: int | None = None) -> tuple[list, list]:
    """(requests [(line number, context ids, continuation ids)], texts [(line number, ids)]) of a JSONL file.

    Strings go through `tokenizer` (an error naming the line when there is none); every error names
    path:line. With `vocab_size` / `max_len` (the model's), ids and lengths are checked here too.
    """
    from .errors import InputError
    from .inputs import validate_ids
    from .jsonl import read_jsonl

    def ids_of(n, key, val, context=None):
        if isinstance(val, str):
            if tokenizer is None:
                raise InputError(f"{path}:{n}: {key!r} is text, but there is no tokenizer beside the model "
                                 "(expected tekken.json or tokenizer.json): give token-id lists")
            if key == "continuation":  # what the continuation adds to the context's tokens
                return tokenizer.encode(context + val)[len(tokenizer.encode(context)):]
            return tokenizer.encode(val, add_bos=True)
        if not isinstance(val, list):
            raise InputError(f"{path}:{n}: {key!r} must be a token-id list or a string, got {type(val).__name__}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in val):
            raise InputError(f"{path}:{n}: {key!r} must hold integer token ids")
        if vocab_size is not None:
            try:
                validate_ids(val, vocab_size, key)
            except InputError as e:
                raise InputError(f"{path}:{n}: {e}") from None
        return val

    requests, texts = [], []
    for n, rec in read_jsonl(path, EVAL_LINES):
        if "context" in rec and "continuation" in rec:
            ctx, cont = rec["context"], rec["continuation"]
            if isinstance(ctx, str) != isinstance(cont, str):
                raise InputError(f"{path}:{n}: context and continuation must both be text or both token ids")
            c, x = ids_of(n, "context", ctx), ids_of(n, "continuation", cont, context=ctx)
            for key, v in (("context", c), ("continuation", x)):
                if not v:
                    raise InputError(f"{path}:{n}: {key!r} is empty (it needs at least one token)")
            if max_len is not None and len(c) + len(x) - 1 > max_len:
                raise InputError(f"{path}:{n}: context + continuation = {len(c) + len(x)} tokens; the model's "
                                 f"context holds {max_len} + 1 (the last token is only predicted)")
            requests.append((n, c, x))
        elif "text" in rec:
            ids = ids_of(n, "text", rec["text"])
            if len(ids) < 2:
                raise InputError(f"{path}:{n}: 'text' has {len(ids)} token(s); perplexity needs at least 2")
            texts.append((n, ids))
        else:
            raise InputError(f"{path}:{n}: expected {EVAL_LINES}, got the keys {sorted(rec)}")
    return requests, texts


def _has_text(path) -> bool:
    from .jsonl import read_jsonl

    return any(isinstance(v, str) for _, rec in read_jsonl(path, EVAL_LINES) for v in rec.values())


def run_eval(args) -> int:
    import json
    import math

    from .checkpoints.load import load_config
    from .inference.score import perplexity, score

    t = load_config(args.model).text
    window = min(2048, t.max_position_embeddings) if args.window is None else args.window
    tok = _tokenizer_for(args.model) if _has_text(args.data) else None
    requests, texts = read_eval_data(args.data, tok, t.vocab_size, t.max_position_embeddings)
    model = _load(args)
    out: dict = {}
    if requests:
        res = score(model, [(c, x) for _, c, x in requests], batch_size=args.batch_size)
        out["loglikelihood"] = [{"line": n, "logprob": lp, "greedy": gr} for (n, _, _), (lp, gr) in zip(requests, res)]
        out["accuracy_greedy"] = sum(gr for _, gr in res) / len(res)
    if texts:
        per = [dict(line=n, **perplexity(model, ids, window=window, stride=args.stride,
                                         batch_size=args.batch_size)) for n, ids in texts]
        total_nll, total_tok = sum(p["nll"] for p in per), sum(p["tokens"] for p in per)
        out["perplexity"] = {"texts": per, "ppl": math.exp(total_nll / total_tok), "tokens": total_tok}
    if args.expert_stats:
        from .research.expert_stats import expert_load

        load = expert_load(model, [c + x for _, c, x in requests] + [ids for _, ids in texts],
                           batch_size=args.batch_size, max_len=min(window, t.max_position_embeddings))
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

    from .harness import Mistral4LM  # first: without the eval extra, its ImportError says what to install
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    lm = Mistral4LM(pretrained=_load(args), tokenizer=_tokenizer_for(args.model), batch_size=args.batch_size,
                    reasoning_effort=args.reasoning_effort, seed=args.seed)
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


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions) over one engine",
                       description="Loads the model once and serves the OpenAI API: POST /v1/chat/completions "
                                   "(messages with text and data: URL images, reasoning_effort none/high with the "
                                   "reasoning in reasoning_content, tools and tool_calls, logprobs, stream), POST "
                                   "/v1/completions (text or token-id prompts, echo + logprobs as lm-eval's "
                                   "local-completions sends them), GET /v1/models, GET /health. Concurrent requests "
                                   "share the running batch (continuous batching); a client that disconnects "
                                   "cancels its request. SIGINT / SIGTERM stop accepting, let running requests "
                                   "finish for --drain-seconds, cancel the rest and exit (130 / 143). With several "
                                   "processes (--coordinator), process 0 serves and the others follow it. Needs "
                                   "pip install -e \".[serve]\".",
                       epilog="example: mistral4-jax serve --model /data/m4-fp8 --weights fp8 --port 8000; then "
                              "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port (printed at start)")
    p.add_argument("--api-key", default=os.environ.get("MISTRAL4_JAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MISTRAL4_JAX_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: --model as given)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="sequences decoded at once (default: sized for 32 requests and the device's memory)")
    p.add_argument("--cache-tokens", type=int, default=None, metavar="N",
                   help="the paged cache's capacity in tokens, shared by the running requests (default: batch size "
                        "x context, or what the device's free memory holds)")
    p.add_argument("--max-len", type=int, default=None, metavar="N",
                   help="the longest prompt + max_tokens of one request (default: the model's context, at most 32768)")
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="largest request body (default 32)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="most images in one request (default 8)")
    p.add_argument("--drain-seconds", type=float, default=5.0, metavar="S",
                   help="on SIGINT / SIGTERM, how long running requests may still run (default 5)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes: jax.distributed's coordinator (process 0's address); 'auto' lets JAX "
                        "find it (Slurm, Open MPI, TPU). Process 0 serves HTTP, the others follow it")
    p.add_argument("--num-processes", type=int, default=None, metavar="N", help="with --coordinator HOST:PORT")
    p.add_argument("--process-id", type=int, default=None, metavar="I", help="with --coordinator HOST:PORT")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import jax

    from .serve.api import Limits
    from .serve.server import run_follower, run_leader, Server

    if args.port < 0 or args.port > 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for flag, v in (("--batch-size", args.batch_size), ("--cache-tokens", args.cache_tokens),
                    ("--max-len", args.max_len), ("--max-images", args.max_images)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.max_body_mb <= 0 or args.drain_seconds < 0:
        raise UsageError("--max-body-mb must be > 0 and --drain-seconds >= 0")
    channel = None
    if args.coordinator:
        # JAX's preemption service would take SIGTERM from our handler (it only logs it): the drain is ours
        jax.config.update("jax_enable_preemption_service", False)
        if args.coordinator == "auto":
            jax.distributed.initialize()
        else:
            if args.num_processes is None or args.process_id is None:
                raise UsageError("--coordinator HOST:PORT needs --num-processes and --process-id")
            jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
        if jax.process_count() > 1:
            from .serve.multihost import Channel

            channel = Channel()
    tok = _tokenizer_for(args.model)
    model = _load(args)
    engine = {"batch_size": args.batch_size, "cache_tokens": args.cache_tokens, "max_len": args.max_len}
    if channel is not None and not channel.leader:
        run_follower(model, tok, engine, channel, args.drain_seconds)
        return 0
    name = args.served_model_name or args.model
    aliases = () if args.served_model_name else (os.path.abspath(args.model), Path(args.model).name)
    server = Server(model, tok, served_name=name, host=args.host, port=args.port, api_key=args.api_key,
                    limits=Limits(int(args.max_body_mb * (1 << 20)), args.max_images), engine=engine, channel=channel,
                    root=os.path.abspath(args.model), aliases=aliases,
                    drain_seconds=args.drain_seconds)
    try:
        run_leader(server, name)
    except OSError as e:
        if server.thread is None:  # the port: a usage error
            raise UsageError(str(e)) from None
        raise
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (full or LoRA) on a JSONL dataset",
                       description="Trains with AdamW (warmup + cosine schedule, global-norm clipping) on "
                                   "JSONL lines {\"messages\": [...]} (assistant turns trained), {\"text\": ...} or "
                                   "{\"ids\": [...]}; writes Orbax checkpoints, a loss log and the fine-tuned model "
                                   "(LoRA merged) to --out, which loads with from_pretrained; LoRA runs also write "
                                   "--out/adapter, a PEFT LoRA adapter (from_pretrained(MODEL, adapter=OUT/adapter), "
                                   "transformers + peft). Rerunning with the same --out resumes from the latest "
                                   "checkpoint.")
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
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype (default: bfloat16 for checkpoints stored in 16-bit or FP8, float32 for "
                        "float32 ones; the optimizer state is float32 either way)")
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="how the base is held, as for chat: fp8, nvfp4 and hybrid keep it quantised and frozen and "
                        "train LoRA over it (needs --lora-rank); fp8 keeps the attention projections, MLPs and "
                        "experts as E4M3 with float32 scales, so LoRA on the released model fits one H200; dense: "
                        "everything in --dtype. Default: as stored, FP8 dequantised, NVFP4 kept packed")
    p.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA: also write the whole model with the adapters merged to --out (default: yes, except "
                        "over a quantised base, where --out/adapter with from_pretrained(MODEL, weights=..., "
                        "adapter=...) gives the same model without a dequantised copy)")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in the backward pass")
    p.add_argument("--router-aux-weight", type=float, default=0.0, help="load-balancing loss weight (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps")
    _add_mesh_arg(p)
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from .train import LoRAConfig, TrainConfig, finetune

    lora = None
    if args.lora_rank:
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                      clip_norm=args.clip_norm, batch_size=args.batch_size, max_len=args.max_len, remat=args.remat,
                      param_dtype=args.dtype, weights=args.weights, router_aux_weight=args.router_aux_weight, lora=lora,
                      seed=args.seed)
    finetune(args.model, args.data, args.out, cfg, mesh=_mesh(args.mesh), save_every=args.save_every,
             merged=args.merged)
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF or Mistral-native safetensors checkpoint to sharded Orbax",
                       description="Streams the source one layer at a time (bounded memory), writes Orbax "
                                   "checkpoints plus config.json and the tokenizer files into a temporary sibling "
                                   "of DST, verifies every array, then renames it to DST.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory: HF layout (config.json + *.safetensors) or "
                                              "Mistral-native (params.json + consolidated*.safetensors)")
    p.add_argument("dst", metavar="DST", help="output directory (Orbax checkpoint + config.json + tokenizer files)")
    p.add_argument("--dtype", choices=CONVERT_DTYPES, default="bfloat16",
                   help="bfloat16 / float32: dequantise FP8 weights; float8: keep E4M3 weights and their scales "
                        "(default: bfloat16)")
    p.add_argument("--experts", choices=["nvfp4"], default=None,
                   help="write the routed experts as NVFP4 (quantised when the source holds them in another format; "
                        "with --dtype float8 the one-80-GB-card hybrid). NVFP4 weights are always written packed")
    p.add_argument("--experts-from", metavar="DIR", default=None,
                   help="take the routed experts from this safetensors checkpoint of the same model, as stored "
                        "(e.g. the NVFP4 release beside the FP8 one)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (errors still go to stderr)")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from .checkpoints.convert import convert  # JAX_PLATFORMS=cpu was set before jax was imported (_preimport)

    convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, quiet=args.quiet, experts=args.experts,
            experts_from=args.experts_from)
    return 0


COMMANDS = [add_demo, add_chat, add_generate, add_eval, add_lm_eval, add_serve, add_finetune, add_convert]

# What an interrupted command leaves behind (the default: nothing to say).
INTERRUPTED = {
    "finetune": "the train state of the last finished step is saved in {out}/checkpoints; rerun the same command "
                "to resume",
    "convert": "nothing was written to {dst}",
}


# The modules each command imports, loaded first (jax alone takes seconds) with SIGINT / SIGTERM held
# (`_preimport`). Building the parser imports none of them.
IMPORTS = {
    "demo": ("mistral4_jax.demo.tiny", "mistral4_jax.train", "mistral4_jax.checkpoints.convert",
             "mistral4_jax.inference.generate", "mistral4_jax.inference.score"),
    "chat": ("mistral4_jax.checkpoints.load", "mistral4_jax.inference.generate", "mistral4_jax.text.streaming"),
    "generate": ("mistral4_jax.checkpoints.load", "mistral4_jax.inference.generate", "mistral4_jax.text.tokenizer"),
    "eval": ("mistral4_jax.checkpoints.load", "mistral4_jax.inference.score", "mistral4_jax.text.tokenizer"),
    "lm-eval": ("mistral4_jax.checkpoints.load", "mistral4_jax.inference.score", "mistral4_jax.inference.generate",
                "mistral4_jax.text.tokenizer"),
    "serve": ("mistral4_jax.checkpoints.load", "mistral4_jax.inference.engine", "mistral4_jax.inference.score",
              "mistral4_jax.text.tokenizer", "mistral4_jax.serve.api", "mistral4_jax.serve.server", "uvicorn"),
    "finetune": ("mistral4_jax.checkpoints.load", "mistral4_jax.train", "mistral4_jax.text.tokenizer"),
    "convert": ("mistral4_jax.checkpoints.convert", "mistral4_jax.checkpoints.orbax"),
}
HELD = (signal.SIGINT, signal.SIGTERM)


def _preimport(command: str, signals: _Signals | None = None) -> None:
    """Load the command's modules with SIGINT / SIGTERM blocked, and a signal that arrives anyway only
    recorded. A handler that raises inside an extension module's initialisation aborts the process (jaxlib's
    MLIR), or turns into an ImportError or a swallowed exception; a signal that interrupts a system call there
    crashed jaxlib (SIGSEGV). The threads those modules start inherit the mask, so later signals reach only
    the main thread. Blocking is not enough alone: a thread started before (a caller's, a BLAS pool) may take
    the signal, and Python then runs the handler in the main thread wherever it is. A recorded signal raises
    once the imports are over."""
    import importlib

    if command == "convert":  # conversion is host work; jax reads JAX_PLATFORMS when it is imported
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # the pool the released model needs on one H200; JAX reads it when its backend starts
        set_cli_allocator()
    masks = hasattr(signal, "pthread_sigmask")  # not on Windows
    with signals.deferred() if signals is not None else contextlib.nullcontext():
        before = signal.pthread_sigmask(signal.SIG_BLOCK, HELD) if masks else None
        try:
            for name in IMPORTS.get(command, ()):
                importlib.import_module(name)
        finally:
            if masks:  # a signal pending meanwhile is delivered here, and recorded
                signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Signals:
    """SIGINT / SIGTERM while one `main` call runs its command (`start`): raised in the main thread as
    KeyboardInterrupt / `Terminated`, so that every cleanup path runs. Used on the main thread only (where
    handlers can be set); `restore` gives the caller back its handlers, unraisable hook and logging switch."""

    def __init__(self):
        import logging

        self.received: list[int] = []  # the last one names the exit status
        self.resending: list = []  # helper threads, joined by `restore`
        self.running = True  # False once the command is over: a signal then changes nothing
        self.deferring = False  # inside `deferred()`: a signal is only recorded
        self.handlers = {s: signal.getsignal(s) for s in HELD}
        self.hook, self.logging_off = sys.unraisablehook, logging.root.manager.disable

    def start(self) -> None:
        for s, h in self.handlers.items():
            if h is not signal.SIG_IGN:  # a signal ignored by whoever started us (nohup, `cmd &` in a script) stays so
                signal.signal(s, self.on_signal)
        sys.unraisablehook = self.on_unraisable

    def on_signal(self, signum, frame):
        """Silences the loggers first: Orbax reports the interrupt from its threads through absl, with a
        traceback."""
        import logging

        if self.running:
            logging.disable(logging.CRITICAL)
            self.received.append(signum)
            if not self.deferring:
                self.interrupt(signum)

    @staticmethod
    def interrupt(signum):
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    @contextlib.contextmanager
    def deferred(self):
        """A signal while the block runs is only recorded, and raises once the block is over."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.received:
            self.interrupt(self.received[-1])

    def on_unraisable(self, unraisable) -> None:
        """Python swallows an exception raised inside a gc or weakref callback ("Exception ignored in ...";
        jax registers a gc callback). An interrupt lost so is sent again from a helper thread a moment later,
        once this hook and the collection have returned: sent from here, its handler would run inside this
        hook and be lost too. (If it lands in a callback again, this repeats.)"""
        import threading

        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received:
            again = threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, self.received[-1]))
            self.resending.append(again)
            again.start()
        else:
            self.hook(unraisable)

    def restore(self, program: bool) -> None:
        """The caller's state back (`running` is already False), no helper left to send a signal after this
        returns. A program ignores both signals from here on instead: Python restores the default handlers in
        its teardown, where a signal would kill the process without a word; a late one leaves the status."""
        import logging

        for again in self.resending:  # one that fires meanwhile finds `running` False
            again.cancel()
            again.join()
        for s, h in self.handlers.items():
            signal.signal(s, signal.SIG_IGN if program else h)
        sys.unraisablehook = self.hook
        logging.disable(self.logging_off)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mistral4-jax", description="Mistral Small 4 in JAX / Flax NNX.")
    parser.add_argument("--version", action="version", version=f"mistral4-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _run(argv, signals: _Signals | None) -> int:
    """The command's exit status: the one place that decides it (argparse's own exits aside)."""
    received = signals.received if signals is not None else []
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        _preimport(args.command, signals)
        rc = args.func(args)
        sys.stdout.flush()  # a reader that left before the last bytes is a closed pipe too
        return rc
    except SystemExit:
        raise
    except BaseException as e:
        from .errors import Mistral4Error

        command = getattr(args, "command", None)
        # After a signal, whatever comes out is the interrupt, however a library re-raised it (Orbax turns
        # one during a save into its own error).
        if received or isinstance(e, KeyboardInterrupt):
            term = received[-1:] == [signal.SIGTERM]
            note = INTERRUPTED.get(command, "").format(**vars(args)) if command else ""
            print(f"mistral4-jax{' ' + command if command else ''}: {'terminated' if term else 'interrupted'}"
                  + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
            return 143 if term else 130
        if not isinstance(e, Exception) or os.environ.get("MISTRAL4_JAX_TRACEBACK"):
            raise
        if isinstance(e, BrokenPipeError):  # whoever read our output stopped (`| head`): leave quietly, as
            return 141                      # Unix tools do (128 + SIGPIPE; Python ignores the signal itself)
        if isinstance(e, (UsageError, Mistral4Error)):
            print(f"mistral4-jax {command}: error: {e}", file=sys.stderr)
            return 2
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"mistral4-jax {command}: error: {type(e).__name__}: {first} "
              "(MISTRAL4_JAX_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


def main(argv=None, *, program: bool | None = None) -> int:
    """Run one command and return its exit status. `argv=None` reads sys.argv and is a program run
    (`program` defaults to that). Called from Python, it leaves the caller's signal handlers, signal mask,
    unraisable hook and logging switch as they were, however the command ends."""
    import threading

    program = argv is None if program is None else program
    if threading.current_thread() is not threading.main_thread():  # no handlers can be set here
        return _run(argv, None)
    signals = _Signals()
    rc = None
    try:
        signals.start()
        rc = _run(argv, signals)
    except SystemExit as e:  # argparse: --help / --version (0), a usage error (2)
        if not program:
            raise
        rc = 0 if e.code is None else e.code
    finally:
        signals.running = False  # first, before any call: a signal from here on changes nothing
        signals.restore(program)
    if program and rc in (130, 141, 143):
        # Nothing more runs: after an interrupt, library threads (Orbax's writers, XLA) may still be at work,
        # and teardown beside them can crash or write after the cleanup; after a closed pipe, the
        # interpreter's last flush would fail again, with a message.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing to say there
                stream.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
