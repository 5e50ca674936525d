"""Interruption and out-of-memory, in subprocesses: SIGINT during a long call raises KeyboardInterrupt within
~1-2 s and the process stays usable (it runs another call correctly and exits 0); a scratch allocation
that fails becomes MemoryError, not a crash.

tests/test_match.py and tests/test_neighbors.py already interrupt the kernels in-process; these cover the
model-level entry points (forward_backward, identify, match), the CLI, the process afterwards, and OOM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")
LATENCY_LIMIT = 2.0  # seconds from the signal to the KeyboardInterrupt being caught


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="2")


_PRELUDE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import qaconv_gs as qg

    def ready():
        print("READY", flush=True)
    """
)


def _interrupt(body: str, after: str, timeout: float = 90.0):
    """Run PRELUDE + body in a child; SIGINT it 0.3 s after it prints READY (just before its long call).
    The child must print "KI <seconds since READY>" when it catches KeyboardInterrupt, then run `after`.
    Returns (latency from the signal to "KI", the child's full stdout)."""
    script = _PRELUDE + textwrap.dedent(body) + "\n" + textwrap.dedent(after)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    lines = []
    try:
        deadline = time.monotonic() + timeout
        line = proc.stdout.readline()
        lines.append(line)
        assert line.strip() == "READY", (line, proc.stderr.read())
        time.sleep(0.3)
        assert proc.poll() is None, "the long call ended before the signal"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        got = time.monotonic()
        lines.append(line)
        assert line.startswith("KI"), (line, proc.stderr.read())
        # Read the rest through the same buffered stream: communicate() reads the raw pipe and would lose
        # what readline() already buffered (e.g. "USABLE" arriving in the same chunk as "KI").
        killer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
        killer.start()
        try:
            rest = proc.stdout.read()
            err = proc.stderr.read()
            proc.wait()
        finally:
            killer.cancel()
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out + err
    return got - sent, out


LONG_CALLS = {
    # model.forward_backward: B x (k+1) = 256 x 64 restricted pairs with S = 192, C = 128 (~5-10 s, 1 thread)
    "forward_backward": (
        """
        model = qg.QAConvGS(200, 128, 24, 8, k_nearest=63, seed=0, n_threads=1)
        rng = np.random.default_rng(0)
        X = rng.standard_normal((256, 128, 24, 8)).astype(np.float32)
        y = rng.integers(0, 200, 256)
        model.class_neighbors  # computed up front: the interrupt lands in the step's kernels
        before = model.state_dict()
        ready()
        t0 = time.monotonic()
        try:
            model.forward_backward(X, y)
            print("FINISHED", flush=True)
        except KeyboardInterrupt:
            print("KI", time.monotonic() - t0, flush=True)
        """,
        """
        after = model.state_dict()
        assert all(np.array_equal(after[k], before[k]) for k in before), "interrupted step changed the model"
        small = qg.QAConvGS(200, 128, 24, 8, k_nearest=63, seed=0, n_threads=1)
        a = model.forward_backward(X[:2], y[:2])
        b = small.forward_backward(X[:2], y[:2])
        assert np.array_equal(a.grad_features, b.grad_features) and a.loss == b.loss
        print("USABLE", flush=True)
        """,
    ),
    # model.identify: 64 features vs 1024 classes at S = 192, C = 64 (~40 s single-threaded)
    "identify": (
        """
        model = qg.QAConvGS(1024, 64, 24, 8, k_nearest=4, seed=0, n_threads=1)
        X = np.random.default_rng(1).standard_normal((64, 64, 24, 8)).astype(np.float32)
        ready()
        t0 = time.monotonic()
        try:
            model.identify(X, top=5)
            print("FINISHED", flush=True)
        except KeyboardInterrupt:
            print("KI", time.monotonic() - t0, flush=True)
        """,
        """
        ids, sc = model.identify(X[:2], top=5)
        want = model.match(X[:2], model.class_embed)
        assert np.array_equal(ids, np.argsort(-want, axis=1, kind="stable")[:, :5])
        print("USABLE", flush=True)
        """,
    ),
    # qaconv_gs.match with 2 threads: 256 x 256 maps at S = 192, C = 64 (~25 s on 2 threads)
    "match-2-threads": (
        """
        rng = np.random.default_rng(2)
        P = rng.standard_normal((256, 64, 24, 8)).astype(np.float32)
        head = qg.functional.init_head(192, rng=rng)
        ready()
        t0 = time.monotonic()
        try:
            qg.match(P, P, head, n_threads=2)
            print("FINISHED", flush=True)
        except KeyboardInterrupt:
            print("KI", time.monotonic() - t0, flush=True)
        """,
        """
        s = qg.match(P[:3], P[:4], head, n_threads=2)
        assert np.array_equal(s, qg.match(P[:3], P[:4], head, n_threads=1))
        print("USABLE", flush=True)
        """,
    ),
    # class_neighbors, then a second interrupt in the same process: the polling state is per call
    "class_neighbors-twice": (
        """
        E = np.random.default_rng(3).standard_normal((24000, 1024)).astype(np.float32)
        ready()
        t0 = time.monotonic()
        try:
            qg.class_neighbors(E, 8, n_threads=2)
            print("FINISHED", flush=True)
        except KeyboardInterrupt:
            print("KI", time.monotonic() - t0, flush=True)
        """,
        """
        idx = qg.class_neighbors(E[:50], 3, n_threads=2)
        assert np.array_equal(idx, qg.class_neighbors(E[:50], 3, n_threads=1))
        import signal, threading
        threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGINT)).start()
        try:
            qg.class_neighbors(E, 8, n_threads=1)
            print("FINISHED-2", flush=True)
        except KeyboardInterrupt:
            print("KI-2", flush=True)
        print("USABLE", flush=True)
        """,
    ),
}


@pytest.mark.parametrize("name", list(LONG_CALLS))
def test_sigint_interrupts_and_the_process_stays_usable(name):
    body, after = LONG_CALLS[name]
    latency, out = _interrupt(body, after)
    assert "FINISHED" not in out
    assert "USABLE" in out
    if name == "class_neighbors-twice":
        assert "KI-2" in out
    assert latency < LATENCY_LIMIT, f"KeyboardInterrupt came {latency:.2f} s after SIGINT"
    print(f"\n{name}: KeyboardInterrupt {latency * 1000:.0f} ms after SIGINT", file=sys.stderr)


def test_cli_exits_130_on_sigint(tmp_path):
    """`qaconv-gs neighbors` on a big input: Ctrl-C gives exit status 130, a one-line message, no traceback,
    and no output file."""
    import numpy as np

    src = tmp_path / "e.npy"
    np.save(src, np.random.default_rng(0).standard_normal((24000, 1024)).astype(np.float32))
    out = tmp_path / "o.npy"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qaconv_gs", "neighbors", str(src), str(out), "-k", "8", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        time.sleep(1.5)  # start-up + loading 98 MB; the kNN itself takes several seconds on one thread (AVX2)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        latency = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert latency < LATENCY_LIMIT + 1.0  # + interpreter shutdown


# ------------------------------------------------------------------------------------------ out of memory

_OOM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import qaconv_gs as qg
    from qaconv_gs import _native

    def vm_size():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    MB = 1 << 20
    HARD = resource.getrlimit(resource.RLIMIT_AS)[1]  # only the soft limit is lowered (and restored)
    # warm up: OpenMP thread pool and lazy allocations exist before the limit is set
    _native.loss_class(np.ones((4, 3), np.float32), 1.0, 0.5, True, 2)
    _native.match_backward_restricted(*[np.ones((2, 1, 1), np.float32)] * 2, np.zeros((2, 2), np.int64),
                                      np.ones((2, 2, 1), np.float32), np.ones((2, 2, 1), np.float32),
                                      np.zeros((2, 2, 1), np.uint16), np.zeros((2, 2, 1), np.uint16), 2)
    results = []

    # 1) loss_class: scores [B, 2] (80 MB), grad output 80 MB; the kernel's scratch: 4*B doubles (320 MB)
    B = 10_000_000
    s = np.zeros((B, 2), np.float32)
    limit = vm_size() + 80 * MB + 64 * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit, HARD))
    try:
        _native.loss_class(s, 1.0, 0.5, True, 1)
        results.append("loss_class: no error")
    except MemoryError as exc:
        results.append("loss_class: MemoryError: " + str(exc))
    resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))
    del s

    # 2) restricted backward: 10 M candidate pairs; the kernel's pair lists need 3 x 80 MB
    K = 10_000_000
    X = np.ones((1, 1, 1), np.float32)
    E = np.ones((2, 1, 1), np.float32)
    cand = np.zeros((1, K), np.int64)
    g = np.ones((1, K, 1), np.float32)
    a = np.zeros((1, K, 1), np.uint16)
    limit = vm_size() + 64 * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit, HARD))
    try:
        _native.match_backward_restricted(X, E, cand, g, g, a, a, 2)
        results.append("backward_restricted: no error")
    except MemoryError as exc:
        results.append("backward_restricted: MemoryError: " + str(exc))
    resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))
    del cand, g, a

    # 3) a NumPy-side allocation (the public API allocating its float32 copy) under the limit
    big = np.zeros(50_000_000, np.float64)  # 400 MB; as_float32 needs 200 MB more
    limit = vm_size() + 64 * MB
    resource.setrlimit(resource.RLIMIT_AS, (limit, HARD))
    try:
        qg.functional.normalize(big.reshape(1, 1, 1, -1))
        results.append("normalize: no error")
    except MemoryError as exc:
        results.append("normalize: MemoryError: " + str(exc))
    resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))
    del big

    # still usable
    out = _native.loss_class(np.array([[2.0, 1.0]], np.float32), 1.0, 0.5, True, 2)
    assert abs(out[0] - 0.3132616875182228 - 0.5 * 0.0) < 1e-6, out
    print("\\n".join(results))
    print("USABLE")
    """
)


@pytest.mark.skipif(SANITIZED, reason="RLIMIT_AS cannot be combined with AddressSanitizer's shadow memory")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status")
def test_failed_scratch_allocation_is_a_memory_error():
    res = subprocess.run(
        [sys.executable, "-c", _OOM_SCRIPT], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "USABLE"
    assert "loss_class: MemoryError: loss_class: could not allocate scratch memory" in lines
    assert (
        "backward_restricted: MemoryError: pair_maxima_restricted_backward: could not allocate scratch memory"
        in lines
    )
    assert any(line.startswith("normalize: MemoryError") for line in lines), lines
