"""EleutherAI's lm-evaluation-harness on this model: `Mistral4LM`, registered as "mistral4-jax".

Importing this module registers the model with lm-eval, so tasks run by name:

    import lm_eval, mistral4_jax.harness
    lm_eval.simple_evaluate(model="mistral4-jax", model_args="pretrained=DIR,dtype=float32", tasks=[...])

or from the shell with `mistral4-jax lm-eval`. The three request types follow lm-eval's HuggingFace
backend (`lm_eval/models/huggingface.py`) rule for rule, so both give the same numbers on the same
checkpoint: text is encoded with `<s>` in front (where the HF tokenizer beside the model puts it)
unless it already starts with it, and control-token strings inside it (a chat-templated prompt) are
control tokens, as an HF tokenizer reads them; the context/continuation split, the trailing-whitespace
move and the empty-context rule are lm-eval's own (`TemplateLM`); log-likelihood inputs keep their last
max_length + 1 tokens; rolling log-likelihoods use lm-eval's disjoint windows of max_length tokens;
generation keeps the last max_length - max_gen_toks context tokens, stops at the eos token, decodes
without special tokens and cuts at the first `until` string. Log-likelihoods are batched through
`score`, generations through `generate` (one call per set of generation kwargs, whose requests end
early at their `until` strings when that cannot change the text).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # the optional extra is missing
    raise ImportError(f"mistral4_jax.harness needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})") from None
import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from .checkpoints.load import from_pretrained
from .errors import InputError
from .inference.generate import generate
from .inference.score import score
from .sharding import make_mesh
from .text.tokenizer import Tokenizer

REASONING_EFFORTS = ("none", "high")
# What lm-eval's HF backend gives a request that sets no generation length.
DEFAULT_MAX_GEN_TOKS = 256
# The batch size "auto" means when max_batch_size is not given.
DEFAULT_AUTO_BATCH = 64
# HF `generate` defaults for the sampling settings a request with do_sample=True leaves out.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")
# Log-likelihood requests per `score` call: the progress bar moves between calls.
SCORE_CALL_BATCHES = 16


def parse_mesh(mesh):
    """None, a `jax.sharding.Mesh`, or DATA,EXPERT,TENSOR as a string ("1,8,1" or "1x8x1") or a tuple."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    parts = mesh.replace("x", ",").split(",") if isinstance(mesh, str) else list(mesh)
    try:
        data, expert, tensor = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(f"Mistral4LM: mesh must be DATA,EXPERT,TENSOR integers (e.g. '1,8,1' or '1x8x1'), "
                         f"got {mesh!r}") from None
    return make_mesh(expert, data=data, tensor=tensor)


def parse_device(device):
    """The JAX device of "cpu", "cuda", "gpu" or "tpu" (optionally ":N"); None for the default one."""
    if device is None:
        return None
    name, _, index = str(device).partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    try:
        devices = jax.devices(platform)
        return devices[int(index or 0)]
    except (RuntimeError, ValueError, IndexError):
        raise InputError(f"Mistral4LM: device {device!r} is not available (JAX sees "
                         f"{[str(d) for d in jax.devices()]})") from None


def parse_batch_size(batch_size, max_batch_size) -> int:
    """An int >= 1; "auto" (or lm-eval's "auto:N") is max_batch_size, default DEFAULT_AUTO_BATCH."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_AUTO_BATCH)
    try:
        b = int(batch_size)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise InputError(f"Mistral4LM: batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    return b


def truncate_request(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The request the model reads: the last max_length + 1 tokens of context + continuation (the last
    token is only predicted), the continuation whole, as the HF backend cuts it."""
    if len(continuation) > max_length:
        raise InputError(f"Mistral4LM: a continuation of {len(continuation)} tokens exceeds max_length = "
                         f"{max_length}")
    full = (context + continuation)[-(max_length + 1):]
    return full[:len(full) - len(continuation)], continuation


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of a document: (context, continuation) pairs that score
    every token once, the first one after `prefix_token`."""
    return [lm_utils.make_disjoint_window(w) for w in
            lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=prefix_token,
                                               max_seq_len=max_length, context_len=1)]


def bos_by_default(tok) -> bool:
    """Whether request text gets `<s>` first when nothing says otherwise, as the HF backend decides
    it: by the post-processor of the HF `tokenizer.json` (the tokenizer's own file or the one beside
    it); with only a `tekken.json`, yes (the released prompts start with `<s>`)."""
    import tokenizers

    source = Path(tok.source)
    hf_file = source if source.name == "tokenizer.json" else source.parent / "tokenizer.json"
    if tok.source == "<memory>" or not hf_file.is_file():
        return True
    ids = tokenizers.Tokenizer.from_file(str(hf_file)).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos


def sampling_args(kwargs: dict) -> dict:
    """generate()'s temperature / top_k / top_p of normalized lm-eval generation kwargs (greedy
    unless do_sample; sampling defaults are HF's)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise InputError(f"Mistral4LM.generate_until: unsupported generation kwargs {unknown} "
                         f"(supported: until, max_gen_toks, {', '.join(SAMPLING_KEYS)})")
    if not kwargs.get("do_sample"):
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    got = {k: kwargs.get(k, v) for k, v in HF_SAMPLING_DEFAULTS.items()}
    return {"temperature": float(got["temperature"]), "top_k": int(got["top_k"]), "top_p": float(got["top_p"])}


def _early_stop_safe(text: str, until: list[str]) -> bool:
    """Whether `text`, the decoded ids of a request the engine ended on a stop string, is cut by
    `until` (lm-eval's cut: for each string in order, keep what comes before its first occurrence)
    exactly as the text of the request run to its full length would be.

    The full text starts with `text` (the same tokens, decoded alike), unless `text` ends in an
    incomplete UTF-8 character. Let s be the first string of `until` that `text` holds: the cut
    at s lies inside `text`, and every later cut is then the same. A string before s that `text`
    does not hold can still occur in the full text: past its end it cuts nothing of `text`, but one
    that starts inside `text` (a proper prefix of it ends `text`) would cut before s. Then (or with
    no string held) the answer is no, and the request is generated in full."""
    if text.endswith("\ufffd"):
        return False
    for s in (u for u in until if u):
        if s in text:
            return True
        if any(text.endswith(s[:k]) for k in range(1, len(s))):
            return False
    return False


@register_model("mistral4-jax")
class Mistral4LM(TemplateLM):
    """An lm-eval `LM` over a `mistral4_jax` model.

    pretrained: a checkpoint directory (HF, Mistral-native or converted Orbax; see `from_pretrained`)
      or an already loaded model (then `tokenizer` is needed). tokenizer: a directory / file, or a
      `Tokenizer` (default: the one beside the checkpoint). dtype: parameter dtype. batch_size:
      requests per compiled call (an int, or "auto" = max_batch_size, default 64). max_length: the
      longest sequence a request may use (default and at most the model's max_position_embeddings).
      mesh: a `Mesh` or DATA,EXPERT,TENSOR ("1,8,1" / "1x8x1"); device: "cpu", "cuda[:N]", "tpu[:N]"
      for a single device. add_bos_token: put `<s>` before encoded text (default: as the HF
      tokenizer beside the model does; see `bos_by_default`). reasoning_effort: "none" or "high" for
      `apply_chat_template`; with "high", generations are cut after the last `[/THINK]` before stop
      strings apply. max_gen_toks: the generation
      length of requests that set none. seed: the sampling seed of requests with do_sample.
      from_pretrained_switches: `weights="fp8"` and the text config switches of `from_pretrained`.
    """

    def __init__(self, pretrained, dtype: str = "bfloat16", batch_size: int | str = 8, max_length: int | None = None,
                 mesh=None, device: str | None = None, max_batch_size: int | None = None, tokenizer=None,
                 add_bos_token: bool | None = None, reasoning_effort: str = "none",
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, **from_pretrained_switches: Any):
        super().__init__()
        if reasoning_effort not in REASONING_EFFORTS:
            raise InputError(f"Mistral4LM: reasoning_effort must be one of {REASONING_EFFORTS}, "
                             f"got {reasoning_effort!r}")
        self._device = parse_device(device)
        self.batch_size_per_call = parse_batch_size(batch_size, max_batch_size)
        if isinstance(pretrained, (str, os.PathLike)):
            with jax.default_device(self._device):
                self.model = from_pretrained(pretrained, dtype=dtype, mesh=parse_mesh(mesh),
                                             **from_pretrained_switches)
            tokenizer = pretrained if tokenizer is None else tokenizer
            self.pretrained = str(pretrained)
        else:
            if tokenizer is None:
                raise InputError("Mistral4LM: a loaded model needs tokenizer= (a directory or a Tokenizer)")
            self.model, self.pretrained = pretrained, "<model>"
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_pretrained(Path(tokenizer))
        # Request text is read as an HF tokenizer reads it: "[INST]" in a chat-templated prompt is the
        # control token. A copy of the backend, so the shared Tokenizer keeps its text-is-text rule.
        self._text_backend = type(self.tokenizer.backend).from_str(self.tokenizer.backend.to_str())
        self._text_backend.encode_special_tokens = False
        limit = self.model.config.text.max_position_embeddings
        self._max_length = limit if max_length is None else int(max_length)
        if not 1 <= self._max_length <= limit:
            raise InputError(f"Mistral4LM: max_length must be in [1, max_position_embeddings = {limit}], "
                             f"got {max_length!r}")
        self.add_bos_token = bos_by_default(self.tokenizer) if add_bos_token is None else bool(add_bos_token)
        self.reasoning_effort = reasoning_effort
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.source.replace("/", "__")

    def get_model_info(self) -> dict:
        """What the results' config records about the model."""
        params = jax.tree.leaves(nnx.state(self.model, nnx.Param))
        return {"model_num_parameters": int(sum(p.size for p in params)), "model_dtype": str(self.model.dtype),
                "pretrained": self.pretrained}

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What the results record as the chat template: this port's v15 renderer and its effort."""
        return f"mistral4_jax v15 (reasoning_effort={self.reasoning_effort})" if chat_template else None

    # ------------------------------------------------------------------ text
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Ids of `string`, with `<s>` first unless the string already starts with it (HF backend rule;
        decided per string, where the HF backend's generate_until decides it for a batch by its first)."""
        bos = self.tokenizer.bos
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token and not string.startswith(self.tokenizer.id_to_token(bos))
        ids = [bos] * add_special_tokens + self._text_backend.encode(string, add_special_tokens=False).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The v15 prompt of `chat_history` (with this model's reasoning effort) as text; a final
        assistant turn is continued when add_generation_prompt is False, as the HF backend does."""
        prompt = self.tokenizer.apply_chat_template(chat_history, reasoning_effort=self.reasoning_effort,
                                                    add_generation_prompt=add_generation_prompt,
                                                    continue_final_message=not add_generation_prompt)
        return self.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(log p(continuation | context), is_greedy)] of ((strings) | None, context_ids, continuation_ids)."""
        pairs = [truncate_request(list(ctx), list(cont), self.max_length) for _, ctx, cont in requests]
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))  # longest first, as HF
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        step = self.batch_size * SCORE_CALL_BATCHES
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Running loglikelihood requests") as bar, \
                jax.default_device(self._device):
            for s in range(0, len(order), step):
                idx = order[s:s + step]
                for i, res in zip(idx, score(self.model, [pairs[i] for i in idx], batch_size=self.batch_size)):
                    results[i] = res
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
                bar.update(len(idx))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole document, over lm-eval's disjoint max_length windows."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            ws = rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length)
            windows += [(None, ctx, cont) for ctx, cont in ws]
            owner += [r] * len(ws)
        totals = [0.0] * len(requests)
        if windows:
            for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
                totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's generation, cut at its first `until` string (eos included, as lm-eval adds it).

        The requests of one set of generation kwargs are one `generate` call: batch_size slots, each
        refilled as its request ends. Without reasoning, a request also ends once its text holds an
        `until` string (see `_early_stop_safe` for why that leaves the returned text unchanged)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests") as bar:
            for idx in groups.values():
                kwargs = dict(normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen_toks = kwargs.pop("max_gen_toks")
                if max_gen_toks >= self.max_length:
                    raise InputError(f"Mistral4LM.generate_until: max_gen_toks = {max_gen_toks} leaves no room for "
                                     f"a context within max_length = {self.max_length}")
                sampling = sampling_args(kwargs)
                encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                           for i in idx}
                idx = sorted(idx, key=lambda i: -len(encoded[i]))  # similar lengths fill the slots together
                prompts = [encoded[i] for i in idx]
                # Stop strings go to the engine only without reasoning: with "high", `until` applies to the
                # text after the last [/THINK], and a stop string inside the thinking part must not end
                # the request. The engine decodes with this tokenizer's decode(ids,
                # skip_special_tokens=True), which is `tok_decode`, the decode of the final text.
                stop_strings = [s for s in until if s] if self.reasoning_effort == "none" else []
                gens = self._generate(prompts, max_gen_toks, sampling, stop_strings)
                # A request the engine ended on a stop string whose text could still change its cut
                # (see `_early_stop_safe`) is generated again in full, at the same position in the
                # call, so it draws the same tokens.
                redo = {j for j, ids in enumerate(gens) if stop_strings and not self._ended_by_model(ids, max_gen_toks)
                        and not _early_stop_safe(self.tok_decode(ids), until)}
                if redo:  # the others get one token: only their position in the call matters
                    full = self._generate(prompts, [max_gen_toks if j in redo else 1 for j in range(len(prompts))],
                                          sampling, [])
                    for j in redo:
                        gens[j] = full[j]
                for i, ids in zip(idx, gens):
                    out[i] = self._generation_text(ids, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(idx))
        return out

    def _ended_by_model(self, ids: list[int], max_gen_toks: int) -> bool:
        """Whether generated ids ended at the length limit or a stop token (not a stop string)."""
        return len(ids) >= max_gen_toks or (bool(ids) and ids[-1] in self.model.config.text.eos_token_id)

    def _generate(self, prompts: list[list[int]], max_new_tokens, sampling: dict,
                  stop_strings: list[str]) -> list[list[int]]:
        """generate() over `batch_size` slots, each refilled as its request ends."""
        with jax.default_device(self._device):
            gens = generate(self.model, prompts, max_new_tokens=max_new_tokens, seed=self.seed,
                            batch_size=self.batch_size, stop_strings=stop_strings or None,
                            tokenizer=self.tokenizer if stop_strings else None, **sampling)
        return gens

    def _generation_text(self, ids: list[int], until: list[str]) -> str:
        """The text lm-eval keeps of generated ids: after the last `[/THINK]` when reasoning, without
        special tokens, up to the first stop string."""
        thinking = self.reasoning_effort != "none"
        if thinking and self.tokenizer.think_end in ids:
            ids = ids[len(ids) - ids[::-1].index(self.tokenizer.think_end):]
        text = self.tok_decode(ids)
        return postprocess_generated_text(text.lstrip() if thinking else text, stop=until, think_end_token=None)
