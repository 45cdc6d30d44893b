"""Ctrl-C (SIGINT) and SIGTERM at several moments of real `mistral4-jax` processes: one line on stderr,
exit 130 / 143, no traceback, nothing half-written, and an interrupted `finetune` resumes. A SIGINT
ignored by whoever started the process stays ignored; in-process calls leave the caller's signal state."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST_COMPILE
from mistral4_jax.config import ModelConfig
from mistral4_jax.demo import synthetic
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.text.images import ImageConfig

ROOT = Path(__file__).resolve().parent.parent
CACHE = os.environ.get("MISTRAL4_TEST_CACHE", "")  # as tests/conftest.py
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}  # one device
# JAX writes a persistent-cache entry in place (no temporary file and rename), so a process killed while it
# writes one leaves a truncated entry that aborts the next process reading it: only runs that are not
# interrupted use the shared cache.
ENV_CACHED = {**ENV, **({"JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
                        if CACHE else {})}
STEPS = 4
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig") / "hf"
    cfg = ModelConfig.tiny()
    synthetic.write_checkpoint(d, cfg, fp8=True)
    write_tekken(d, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
    data = d.parent / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("The capital of France is Paris.",
                                                                      "Beautiful is better than ugly.")))
    return d


def _python(*args: str, sigint: str = "SIG_DFL") -> list[str]:
    """The argv of a child `python ARGS` that starts with SIGTERM at its default, SIGINT at `sigint`, both
    unblocked, whatever this process inherited: every child these tests start goes through it. A shell
    without job control starts `cmd &` with SIGINT ignored, every child inherits that, and the CLI rightly
    keeps a signal its starter ignored (nohup): started so, the signal tests would test nothing. A launcher
    sets them and execs the child (same process): Popen's restore_signals leaves SIGINT as it is, and a
    preexec_fn would fork this multithreaded (JAX) process."""
    launcher = ("import os, signal, sys\n"
                f"signal.signal(signal.SIGINT, signal.{sigint})\n"
                "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))\n"
                "os.execv(sys.executable, sys.argv[1:])")
    return [sys.executable, "-c", launcher, sys.executable, *args]


class Run:
    """A `python -m mistral4_jax ARGS` process whose stdout / stderr go to files (read while it runs)."""

    def __init__(self, tmp: Path, *args: str, interrupted: bool = True, sigint: str = "SIG_DFL"):
        self.out, self.err = tmp / f"out-{time.monotonic_ns()}", tmp / f"err-{time.monotonic_ns()}"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen(_python("-m", "mistral4_jax", *args, sigint=sigint), cwd=ROOT,
                                      env=ENV if interrupted else ENV_CACHED, stdout=o, stderr=e)

    def wait_for(self, ready, timeout=600.0):
        t0 = time.monotonic()
        while not ready():
            assert self.p.poll() is None, f"exited {self.p.returncode} early:\n{self.err.read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, "timed out waiting"
            time.sleep(0.05)

    def imports_began(self) -> bool:
        """jaxlib's library is mapped once the command's imports began (building the parser imports no
        jax); the rest of them (flax, orbax, the package) take a second or more."""
        maps = Path(f"/proc/{self.p.pid}/maps")
        if not maps.exists():  # no /proc: half a second is inside the imports
            time.sleep(0.5)
            return True
        return "jaxlib" in maps.read_text()

    def stop(self, sig) -> tuple[int, str]:
        self.p.send_signal(sig)
        return self.finish()

    def finish(self) -> tuple[int, str]:
        self.p.wait(timeout=600)
        return self.p.returncode, self.err.read_text()


def _one_clean_line(err: str, rc: int, want_rc: int, text: str):
    assert rc == want_rc, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith(text), err[-3000:]


def _finetune(hf, out):
    return ["finetune", "--model", str(hf), "--data", str(hf.parent / "train.jsonl"), "--steps", str(STEPS),
            "--save-every", "2", "--batch-size", "2", "--max-len", "32", "--out", str(out)]


@pytest.mark.parametrize("after", [0.0, 0.3, 0.8])
def test_interrupt_during_imports_is_one_line(hf, tmp_path, after):
    """The signal lands while jaxlib's native module initialises (after=0) and in the imports after it."""
    run = Run(tmp_path, "generate", "--model", str(hf), "--prompt", "hi")
    run.wait_for(run.imports_began)
    time.sleep(after)
    _one_clean_line(*reversed(run.stop(signal.SIGINT)), 130, "mistral4-jax generate: interrupted")


def test_interrupt_during_convert_leaves_nothing(hf, tmp_path):
    dst = tmp_path / "converted"
    run = Run(tmp_path, "convert", str(hf), str(dst))
    run.wait_for(lambda: "convert: " in run.err.read_text())  # the source is open, the writes begin
    rc, err = run.stop(signal.SIGINT)
    _one_clean_line(err, rc, 130, f"mistral4-jax convert: interrupted; nothing was written to {dst}")
    assert sorted(p.name for p in tmp_path.iterdir() if "converted" in p.name) == []  # no DST, no partial


def test_finetune_interrupted_at_any_point_resumes(hf, tmp_path):
    out = tmp_path / "ft"
    # 1. while the model loads and the step compiles: nothing saved yet
    run = Run(tmp_path, *_finetune(hf, out))
    run.wait_for(lambda: "examples, sequence length" in run.out.read_text())
    rc, err = run.stop(signal.SIGINT)
    _one_clean_line(err, rc, 130, "mistral4-jax finetune: interrupted; the train state")
    # 2. SIGTERM right after the step-2 checkpoint, before step 3 is done (no second save of step 2)
    run = Run(tmp_path, *_finetune(hf, out))
    run.wait_for(lambda: (out / "checkpoints" / "2").is_dir())
    rc, err = run.stop(signal.SIGTERM)
    _one_clean_line(err, rc, 143, "mistral4-jax finetune: terminated; the train state")
    assert not (out / "config.json").exists()  # no model exported from an unfinished run
    # 3. the same command resumes and finishes: the model directory is complete
    run = Run(tmp_path, *_finetune(hf, out), interrupted=False)
    rc, err = run.finish()
    assert rc == 0, err[-3000:]
    assert "resumed from" in run.out.read_text()
    steps = [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert {"config.json", "model.safetensors", "tekken.json"} <= {p.name for p in out.iterdir()}
    from mistral4_jax import cli

    assert cli.main(["chat", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "float32"]) == 0


def test_sigint_ignored_by_the_starter_stays_ignored(hf, tmp_path):
    """Started with SIGINT ignored (nohup, a background job of a script), the command keeps ignoring it,
    during its imports and after them, and finishes with its whole output."""
    run = Run(tmp_path, "generate", "--model", str(hf), "--ids", "1,2", "--max-new-tokens", "2",
              interrupted=False, sigint="SIG_IGN")  # as nohup, or `cmd &` in a script, starts it
    run.wait_for(run.imports_began)
    run.p.send_signal(signal.SIGINT)
    time.sleep(1.0)
    if run.p.poll() is None:
        run.p.send_signal(signal.SIGINT)
    rc, err = run.finish()
    assert rc == 0 and "interrupted" not in err, err[-3000:]
    assert len(json.loads(run.out.read_text())["outputs"]) == 1


def test_interrupt_swallowed_by_a_gc_callback_is_delivered_again():
    """Python swallows an exception raised inside a gc callback (jax registers one); the CLI's hook must
    deliver the interrupt again so that it lands in ordinary code, not inside the hook itself."""
    script = """if True:
        import gc, signal, sys, time
        from mistral4_jax import cli

        def callback(phase, info, sent=[]):
            if phase == "start" and not sent:
                sent.append(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # the handler raises here, inside the collection

        def command(args):  # the command: a collection, then ordinary code for two seconds
            gc.callbacks.append(callback)
            gc.collect()
            for _ in range(200):
                time.sleep(0.01)
            print("lost")
            return 0

        cli.run_convert, cli.IMPORTS = command, {}
        print(cli.main(["convert", "src", "dst"]))
    """
    r = subprocess.run(_python("-c", script), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert (r.stdout.split(), r.stderr) == (["130"], "mistral4-jax convert: interrupted; nothing was written to dst\n")


def test_interrupt_taken_by_another_thread_during_the_imports_waits_for_them(tmp_path):
    """The imports block SIGINT in the main thread, but a thread started before them (numpy's BLAS pool, a
    caller's) does not: the signal lands there and Python runs the handler in the main thread wherever it
    is, here inside a module being imported (inside jaxlib's native initialisation it aborted the process).
    The interrupt must wait until the imports are over. The module imported stands in for jaxlib: it
    raises the signal from a thread that exists before the imports and runs Python code after it."""
    (tmp_path / "probe.py").write_text("""if True:
        import sys, time
        main = sys.modules["__main__"]
        try:
            main.go.set()
            assert main.sent.wait(60)
            for _ in range(20):
                time.sleep(0.01)  # the main thread runs a pending handler between these
        except KeyboardInterrupt:
            print("raised inside the import", file=sys.stderr, flush=True)
            raise
        print("imported", file=sys.stderr, flush=True)
    """)
    script = f"""if True:
        import signal, sys, threading
        sys.path.insert(0, {str(tmp_path)!r})
        from mistral4_jax import cli

        go, sent = threading.Event(), threading.Event()

        def send():  # a thread that does not block SIGINT, as BLAS pools and callers' threads
            go.wait()
            signal.raise_signal(signal.SIGINT)  # delivered to this thread
            sent.set()

        threading.Thread(target=send, daemon=True).start()
        cli.IMPORTS = {{"generate": ("probe",)}}
        print(cli.main(["generate", "--model", "unused", "--prompt", "hi"]))
    """
    r = subprocess.run(_python("-c", script), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert (r.stdout.split(), r.stderr) == (["130"], "imported\nmistral4-jax generate: interrupted\n")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_command_starts_no_thread_before_its_imports():
    """Threads started before the imports do not block the signals (see above); numpy's BLAS starts some
    when it is imported, so the command imports it only under the mask."""
    script = "import os, mistral4_jax.cli; print(len(os.listdir('/proc/self/task')))"
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1"], r.stderr


def test_in_process_calls_leave_the_callers_signal_state(hf, monkeypatch, capsys):
    """`cli.main([...])` from Python sets its handlers for the call only: after a success, an error, an
    argparse exit, an interrupt, a termination and an interrupt lost in a gc callback, the caller's SIGINT /
    SIGTERM handlers, signal mask, unraisable hook and logging switch are as they were, and no signal
    reaches the caller afterwards."""
    import gc
    import logging

    from mistral4_jax import cli

    def callers(signum, frame):
        raise AssertionError(f"signal {signum} reached the caller")

    def state():
        return ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
                signal.pthread_sigmask(signal.SIG_BLOCK, []), sys.unraisablehook, logging.root.manager.disable)

    saved = state()
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, callers)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        before = state()
        gen = ["generate", "--model", str(hf), "--ids", "1,2", "--max-new-tokens", "1", "--dtype", "float32"]
        assert cli.main(gen) == 0 and state() == before
        assert cli.main(gen[:3] + ["--ids", "1,x"]) == 2 and state() == before
        with pytest.raises(SystemExit):
            cli.main(gen[:3] + ["--dtype", "bf16"])
        assert state() == before
        for sig, rc, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
            monkeypatch.setattr(cli, "_load", lambda args, sig=sig: signal.raise_signal(sig))
            capsys.readouterr()
            assert cli.main(gen) == rc and state() == before
            assert capsys.readouterr().err == f"mistral4-jax generate: {word}\n"
        # an interrupt swallowed by a gc callback as the command ends: sent again while the call runs, or never
        def swallowed(args, sent=[]):
            def callback(phase, info):
                if phase == "start" and not sent:
                    sent.append(signal.SIGINT)
                    signal.raise_signal(signal.SIGINT)

            gc.callbacks.append(callback)
            try:
                gc.collect()
            finally:
                gc.callbacks.remove(callback)
            return 0

        monkeypatch.setattr(cli, "run_convert", swallowed)
        monkeypatch.setattr(cli, "IMPORTS", {})
        assert cli.main(["convert", "src", "dst"]) in (0, 130) and state() == before
        time.sleep(0.2)  # a signal sent on by a helper thread would have reached `callers` by now
    finally:
        handlers, mask = saved[:2]
        for s, h in handlers.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_closed_output_pipe_is_quiet(hf, tmp_path):
    """`mistral4-jax generate ... | head -c 1`: the reader left; the command stops with 141 and says nothing."""
    p = subprocess.Popen(_python("-m", "mistral4_jax", "generate", "--model", str(hf), "--prompt", "hi",
                                 "--max-new-tokens", "2"), cwd=ROOT, env=ENV_CACHED, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first byte
    err = p.stderr.read().decode()
    assert (p.wait(timeout=600), err) == (141, "")
