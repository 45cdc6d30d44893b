"""A fine-tuning run: model + data + TrainConfig -> checkpoints, a loss log and an exported model.

Output directory layout:

    OUT/config.json, OUT/model*.safetensors   the fine-tuned model (LoRA merged), for `from_pretrained`; by
                                              default not for LoRA over a quantised base (`finetune(merged=)`)
    OUT/adapter/                              LoRA runs: the adapters as a PEFT LoRA adapter
                                              (adapter_config.json + adapter_model.safetensors), for
                                              `from_pretrained(BASE, adapter=OUT/adapter)`, transformers + peft, vLLM
    OUT/checkpoints/<step>/                   Orbax train state (trainable tree, optimizer state, step,
                                              RNG key) and JSON metadata (data position, seed, config)
    OUT/train_log.jsonl                       one line per step: step, loss, ce, aux, grad_norm, lr, tokens

A run whose OUT already holds checkpoints resumes from the latest one: the data position, optimizer
state and parameters come back exactly, so the next losses are those of an uninterrupted run. The
hyperparameters must be the same (checked). Ctrl-C saves a checkpoint before exiting.

LoRA trains over a base of any weight kind: `TrainConfig.weights="fp8"` loads the frozen base as FP8, "nvfp4" /
"hybrid" with NVFP4 experts (`from_pretrained(weights=...)`, `checkpoints/scheme.py`); its kernels are
dequantised where they are read, one layer (one routed expert) at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ..errors import InputError
from ..checkpoints.adapter import save_adapter
from ..checkpoints.load import from_pretrained, load_config, stored_float_dtype
from ..checkpoints.save import save_pretrained
from ..model import weights
from ..sharding import as_auto_mesh, mesh_context
from ..text.tokenizer import ASSET_FILES, Tokenizer
from . import data as data_lib
from .lora import apply_adapters, init_adapters
from .step import TrainConfig, batch_sharding, compile_step, init_state, make_optimizer, state_shardings


# Settings that change memory use, not results: a run may resume with other values of these.
_MEMORY_ONLY = ("loss_chunk",)


def _run_config(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpointed one."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _MEMORY_ONLY}
    d["lora"] = None if cfg.lora is None else {**dataclasses.asdict(cfg.lora), "targets": list(cfg.lora.targets)}
    return d


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's settings with those it predates (a field added since, e.g. `weights`) at their defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in _MEMORY_ONLY}
    return {**{k: v for k, v in fields.items() if k not in saved}, **saved}


def _step_of(line: str | bytes) -> int | None:
    """The step of a train_log.jsonl line; None for a partial line (a process killed while writing it)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Trainer:
    """Holds the model split into graph / frozen / train state, the compiled step and the checkpointer."""

    def __init__(self, model: nnx.Module, examples: list[data_lib.Example], cfg: TrainConfig,
                 out: str | os.PathLike, mesh=None, save_every: int = 100):
        mesh = as_auto_mesh(mesh)
        self.cfg, self.examples, self.mesh, self.out = cfg, examples, mesh, Path(out)
        self.model_config = model.config
        self.seq_len = min(cfg.max_len, max(len(e.ids) for e in examples))
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.tx = make_optimizer(cfg)
        self.key = jax.random.key(cfg.seed)
        packed = [("/".join(map(str, p)), type(v.get_value()).__name__) for p, v in nnx.to_flat_state(params)
                  if weights.is_kind(v.get_value())]
        if cfg.lora is None and packed:
            raise InputError(f"full fine-tuning updates every parameter, but {packed[0][0]} (and {len(packed) - 1} "
                             f"more) is a quantised {packed[0][1]}: train LoRA adapters over it (TrainConfig.lora, "
                             "--lora-rank R) or load the model with weights=\"dense\"")
        self.quantised = bool(packed)  # the base holds weight kinds (FP8, NVFP4)
        if cfg.lora is None:
            self.frozen, trainable = None, params
        else:
            self.frozen = params
            trainable = init_adapters(params, cfg.lora, jax.random.fold_in(self.key, 1))
        state = init_state(trainable, self.tx)
        self.step_fn = compile_step(self.graphdef, cfg, self.tx, mesh, state, self.frozen)
        # Committed to where the step leaves it (one device: the default one), so that the second step does
        # not compile the program again for arguments placed differently from the first's.
        state = jax.device_put(state, jax.devices()[0] if mesh is None else
                               state_shardings(state, self.tx, mesh, self.frozen))
        self.state = state
        self.position = 0  # global index of the next example (epochs follow each other)
        self._unlogged = None  # the metrics of a finished step whose log line is not written yet
        self.out.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            (self.out / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=max(save_every, 1)))
        self.log_path = self.out / "train_log.jsonl"

    # ------------------------------------------------------------------ state <-> checkpoint
    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _tree(self):
        return {"state": self.state, "rng": jax.random.key_data(self.key)}

    def save(self, force: bool = False) -> None:
        self._log_step()  # the log has every step a saved state includes, written before that state
        if self.step in self.manager.all_steps():  # interrupted again before the next step finished
            return
        leaves = jax.tree.leaves(self._tree())
        meta = {"position": self.position, "seed": self.cfg.seed, "config": _run_config(self.cfg)}
        self.manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({f"l{i:05d}": x for i, x in enumerate(leaves)}),
            meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()

    def restore(self) -> bool:
        """Continue from the latest checkpoint in OUT/checkpoints, if any. Returns whether it did."""
        step = self.manager.latest_step()
        if step is None:
            self._truncate_log(0)  # lines of a run stopped before its first checkpoint
            return False
        tree = self._tree()
        leaves, treedef = jax.tree.flatten(tree)
        target = {f"l{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for i, x in enumerate(leaves)}
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if _with_defaults(meta["config"]) != _run_config(self.cfg):
            raise InputError(f"{self.out / 'checkpoints'}: holds a run with other settings ({meta['config']}); "
                             "use another --out directory or the same settings")
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        tree = jax.tree.unflatten(treedef, [got[k] for k in sorted(got)])
        self.state, self.key = tree["state"], jax.random.wrap_key_data(tree["rng"])
        self.position = int(meta["position"])
        self._truncate_log(step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the restored step (written by the interrupted run after its last save) and a
        partial last line (a process killed while writing it); rewritten through a temporary file."""
        if self.log_path.exists():
            lines = self.log_path.read_text().splitlines()
            kept = [ln for ln in lines if (n := _step_of(ln)) is not None and n <= step]
            tmp = self.log_path.with_name(f".{self.log_path.name}.partial-{os.getpid()}")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.log_path)

    # ------------------------------------------------------------------ running
    def next_batch(self) -> dict:
        b = data_lib.make_batch(self.examples, self.position, self.cfg.batch_size, self.seq_len, self.cfg.seed)
        images = {k: b.pop(k) for k in ("pixel_values", "image_sizes") if k in b}  # not split over the batch
        if self.mesh is not None:
            b = jax.device_put(b, batch_sharding(self.mesh, self.cfg.batch_size))
        return {**b, **images}

    def train_step(self) -> dict:
        batch = self.next_batch()
        pixels, sizes = batch.pop("pixel_values", None), batch.pop("image_sizes", None)
        with mesh_context(self.mesh):  # the expert dispatch splits the experts over the mesh's `expert` axis
            state, metrics = self.step_fn(self.state, self.frozen, batch, pixels,
                                          None if sizes is None else tuple(map(tuple, sizes.tolist())))
        # The old state was donated to the step, so the new one is kept at once; its log line is still
        # owed (`_log_step`), and `save` writes it first if an interrupt came before it.
        self.state, self.position, self._unlogged = state, self.position + self.cfg.batch_size, metrics
        return self._log_step()

    def _log_step(self) -> dict | None:
        """Append the line of the step `self.state` holds, if it is owed, and flush it to disk. Reading its
        values waits for the step to finish: a signal usually lands there, and `save` then calls this again."""
        if self._unlogged is None:
            return None
        m = {k: float(v) for k, v in self._unlogged.items()} | {"step": self.step}
        with open(self.log_path, "a+b", buffering=0) as f:  # unbuffered: one write, the line whole or absent
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            last = f.read().splitlines()[-1:]
            if not last or _step_of(last[0]) != self.step:  # else written just before an interrupt
                f.write((json.dumps(m) + "\n").encode())
            os.fsync(f.fileno())
        self._unlogged = None
        return m

    def run(self, until: int | None = None, progress: bool = True) -> list[dict]:
        """Train to step `until` (default: cfg.steps), saving every `save_every` steps and at the end."""
        from tqdm import tqdm

        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        history = []
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, unit="step", file=sys.stderr,
                   dynamic_ncols=True)
        try:
            while self.step < until:
                m = self.train_step()
                history.append(m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", gnorm=f"{m['grad_norm']:.3f}")
                self.save(force=self.step == until)
        except KeyboardInterrupt:
            self.save(force=True)
            raise
        finally:
            bar.close()
        return history

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Write the current model (adapters merged into the base) to `path` (default OUT), in the parameters'
        dtype; a quantised base is written dequantised. Each adapted matrix is merged as it is written
        (`save.hf_tensors`), so the export needs no second copy of the model on the devices."""
        params = self.state["trainable"]
        if self.cfg.lora is not None:
            params = apply_adapters(self.frozen, params, self.cfg.lora.scale)
        return save_pretrained(params, self.model_config, path or self.out)

    def export_adapter(self, path: str | os.PathLike | None = None, base_model: str | None = None) -> Path:
        """Write the LoRA adapters as a PEFT LoRA adapter directory to `path` (default OUT/adapter);
        base_model: its `base_model_name_or_path`."""
        if self.cfg.lora is None:
            raise InputError("export_adapter: this run trains the whole model, not LoRA adapters; use export()")
        lora = self.cfg.lora
        return save_adapter(self.state["trainable"], lora.rank, lora.alpha, self.model_config,
                            path or self.out / "adapter", base_model=base_model)


def copy_tokenizer(model_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Copy the tokenizer files of `model_dir` into `out`, each through a temporary name (never half-written)."""
    for name in ASSET_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            tmp = Path(out) / f".{name}.partial-{os.getpid()}"
            shutil.copy2(src, tmp)
            os.replace(tmp, Path(out) / name)


def load_tokenizer(model_dir: str | os.PathLike):
    """The model directory's tokenizer, or None (token-id data only) when it has no tokenizer files."""
    return Tokenizer.find(model_dir, required=False)


def finetune(model_dir: str | os.PathLike, data_path: str | os.PathLike, out: str | os.PathLike,
             cfg: TrainConfig, mesh=None, save_every: int = 100, until: int | None = None,
             progress: bool = True, log=print, merged: bool | None = None) -> list[dict]:
    """Load `model_dir` (its base as `cfg.weights` says), train on `data_path` per `cfg`, checkpoint into `out`,
    export to `out`.

    Resumes from `out/checkpoints` when present. `until` stops early (after saving) at that step.
    The export: LoRA runs write the PEFT adapter `out/adapter`; merged: also write the whole model with the
    adapters merged to `out` (full fine-tuning always does). None: merged unless the base is quantised, where it
    would be a dequantised copy of the model (bf16: twice the FP8 base) that `from_pretrained(model_dir,
    weights=..., adapter=out/adapter)` makes unnecessary. Returns the metrics of the steps run now.
    """
    cfg_model = load_config(model_dir)
    examples = data_lib.load_examples(data_path, load_tokenizer(model_dir), cfg.max_len, cfg_model.text.vocab_size)
    model = from_pretrained(model_dir, dtype=cfg.param_dtype or stored_float_dtype(model_dir), mesh=mesh,
                            weights=cfg.weights)
    trainer = Trainer(model, examples, cfg, out, mesh=mesh, save_every=save_every)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state["trainable"]))
    log(f"{len(examples)} examples, sequence length {trainer.seq_len}, batch {cfg.batch_size}; "
        f"{n_train:,} trainable parameters" + (f" (LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"
                                                + (f" over the {cfg.weights} base)" if cfg.weights else ")")
                                                if cfg.lora else ""))
    if trainer.restore():
        log(f"resumed from {out}/checkpoints at step {trainer.step}")
    history = trainer.run(until=until, progress=progress)
    if trainer.step >= cfg.steps:
        if cfg.lora is not None:
            where = trainer.export_adapter(base_model=str(model_dir))
            weights_arg = f", weights={cfg.weights!r}" if cfg.weights else ""
            log(f"wrote the LoRA adapter to {where} (PEFT format; loads with from_pretrained({str(model_dir)!r}"
                f"{weights_arg}, adapter={str(where)!r}) and with peft on the transformers model)")
        if cfg.lora is None or (not trainer.quantised if merged is None else merged):
            trainer.export()
            copy_tokenizer(model_dir, out)
            log(f"wrote the fine-tuned model to {out} (loads with from_pretrained)")
    return history


__all__ = ["Trainer", "finetune", "load_tokenizer"]
