"""Fuzz harness for the checkpoint loader (not collected by pytest).

Property: for any byte string, ``load_checkpoint`` either returns exactly the content of a checkpoint
that was really saved or raises ``ValueError``; ``QAConvGS.load`` / ``Trainer.from_checkpoint`` likewise
raise only ``ValueError`` (plus MemoryError for a header that claims an absurd array size). Never another
exception type, never a crash, never unpickling.

With atheris (``pip install atheris``), coverage-guided, seeded with real model and trainer checkpoints:
    PYTHONPATH=python python tests/fuzz_checkpoint.py -atheris_runs=200000 [corpus_dir]
Without atheris, a mutation loop over the same seeds (random bit flips, truncations, block copies,
insertions, and header-field edits), e.g. for a quick local run:
    PYTHONPATH=python python tests/fuzz_checkpoint.py --runs 20000 --seed 1
Both write a failing input to ./fuzz-crash-<n>.npz before re-raising.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import numpy as np
import qaconv_gs as qg
from qaconv_gs.checkpoint import load_checkpoint

ALLOWED = (ValueError, MemoryError)


def _seeds() -> list[bytes]:
    """Real checkpoints: a model, a trainer after two steps, a tiny one with extra arrays of odd dtypes."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        model = qg.QAConvGS(12, 4, 3, 2, k_nearest=3, seed=0, n_threads=1)
        p = os.path.join(d, "m.npz")
        model.save(p, extra={"epoch": np.array(3), "names": np.array(["a", "bc"]), "flag": np.array([True])})
        out.append(open(p, "rb").read())
        trainer = qg.Trainer(model, lr=0.05, seed=0)
        for _ in range(2):
            trainer.step(rng.standard_normal((4, 4, 3, 2)).astype(np.float32), rng.integers(0, 12, 4))
        trainer.save_checkpoint(p)
        out.append(open(p, "rb").read())
    return out


SEEDS = None
REFERENCE = {}


def _setup():
    global SEEDS
    SEEDS = _seeds()
    with tempfile.TemporaryDirectory() as d:
        for s in SEEDS:
            p = os.path.join(d, "s.npz")
            open(p, "wb").write(s)
            REFERENCE[s] = load_checkpoint(p)


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        if list(x) != list(y):
            return False
        for k in x:
            if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not np.array_equal(x[k], y[k]):
                return False
    return True


def check_one(data: bytes, workdir: str) -> None:
    """The property for one input (raises AssertionError or an unexpected exception on a bug)."""
    p = os.path.join(workdir, "f.npz")
    with open(p, "wb") as f:
        f.write(data)
    try:
        got = load_checkpoint(p)
    except ALLOWED:
        got = None
    if got is not None:
        assert any(_same(got, ref) for ref in REFERENCE.values()), "loaded content that was never saved"
    for load in (qg.QAConvGS.load, qg.Trainer.from_checkpoint):
        try:
            load(p)
        except ALLOWED:
            pass


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        if not buf:
            break
        i = rnd.randrange(len(buf))
        op = rnd.randrange(6)
        if op == 0:
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            del buf[i:]
        elif op == 2:
            j = rnd.randrange(len(buf))
            n = rnd.randint(1, 64)
            buf[i : i + n] = buf[j : j + n]
        elif op == 3:
            buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        elif op == 4:  # edit a number inside an .npy header ('shape': (N, ...)) or the JSON metadata
            k = buf.find(b"shape", i) if rnd.random() < 0.5 else buf.find(b'"', i)
            if k >= 0:
                buf[k + 8 : k + 9] = str(rnd.choice([0, 9, 99999999999])).encode()
        else:
            buf[i] = rnd.choice([0x00, 0xFF, ord("{"), ord("0")])
    return bytes(buf)


def run_random(runs: int, seed: int) -> int:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        for n in range(runs):
            data = mutate(rnd.choice(SEEDS), rnd)
            try:
                check_one(data, d)
            except BaseException:
                with open(f"fuzz-crash-{n}.npz", "wb") as f:
                    f.write(data)
                raise
    print(f"{runs} mutated checkpoints: only ValueError / MemoryError or the saved content")
    return 0


def main(argv: list[str]) -> int:
    _setup()
    try:
        import atheris  # noqa: F401
    except ImportError:
        atheris = None
    if atheris is None or "--runs" in argv:
        ap = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        ap.add_argument("--runs", type=int, default=20000)
        ap.add_argument("--seed", type=int, default=0)
        args = ap.parse_args(argv)
        return run_random(args.runs, args.seed)

    workdir = tempfile.mkdtemp(prefix="qg_fuzz_")
    counter = [0]

    def test_one_input(data: bytes) -> None:
        counter[0] += 1
        try:
            check_one(data, workdir)
        except BaseException:
            with open(f"fuzz-crash-{counter[0]}.npz", "wb") as f:
                f.write(data)
            raise

    corpus = [a for a in argv if not a.startswith("-")]
    for i, s in enumerate(SEEDS):  # seed the corpus with the real checkpoints
        if corpus:
            with open(os.path.join(corpus[0], f"seed{i}.npz"), "wb") as f:
                f.write(s)
    if hasattr(atheris, "instrument_all"):
        atheris.instrument_all()  # coverage of numpy's npy / zipfile readers and our loader
    atheris.Setup([sys.argv[0], *argv], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
