"""Crash-safe checkpoints: a process SIGKILLed at random moments while it saves (model.save and
Trainer.save_checkpoint, alternately, as fast as it can) always leaves a loadable checkpoint holding either
the last completed save or the one in flight, and whatever it leaves behind never breaks the next save.
Loading damaged trainer checkpoints of the real model leaves trainer and model untouched, and a quick
mutation fuzz of the loader only ever raises ValueError.

(tests/test_checkpoint.py covers truncation / bit flips / versions for QAConvGS.load and the monkeypatched
write failures; tests/test_trainer.py covers the trainer with a fake model.)
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import sys
import time

import numpy as np
import pytest
import qaconv_gs as qg
from qaconv_gs.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

KILLS = int(os.environ.get("QG_CRASH_KILLS", "40"))
N, C, H, W = 40, 16, 6, 4  # ~60 KB of class embeddings: a save takes a few ms


def _model():
    return qg.QAConvGS(N, C, H, W, k_nearest=4, seed=0, n_threads=1)


def _stamp(model, v: int) -> None:
    """Make every saved array encode version v (in place, plain NumPy: no kernel call in the child)."""
    model.class_embed[...] = np.float32(v)
    model.head_state["fc.bias"][...] = np.float32(v)
    model.head_state["bn.running_mean"][...] = np.float32(v)


def _version(state: dict) -> int:
    """The one version a loaded state encodes; AssertionError if the arrays disagree (a torn save)."""
    vs = {float(np.unique(state["class_embed"])[0])} if np.unique(state["class_embed"]).size == 1 else None
    assert vs is not None, "class_embed mixes versions"
    v = vs.pop()
    assert float(np.asarray(state["fc.bias"]).reshape(-1)[0]) == v
    assert float(np.asarray(state["bn.running_mean"]).reshape(-1)[0]) == v
    return int(v)


def _saver(directory: str, start: int, fd: int) -> None:
    """Child process: save model and trainer checkpoints alternately forever, reporting each completed
    version on fd. Never returns."""
    try:
        model = _model()
        trainer = qg.Trainer(model, lr=0.01, seed=0)
        v = start
        while True:
            v += 1
            _stamp(model, v)
            trainer.global_step = v
            if v % 2:
                model.save(os.path.join(directory, "model.npz"), extra={"version": np.array(v)})
                os.write(fd, f"m{v}\n".encode())
            else:
                trainer.save_checkpoint(os.path.join(directory, "trainer.npz"))
                os.write(fd, f"t{v}\n".encode())
    except BaseException:
        os._exit(3)
    os._exit(4)


def _read_acks(fd: int) -> dict:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    last = {"m": 0, "t": 0}
    for line in data.decode().splitlines():
        last[line[0]] = max(last[line[0]], int(line[1:]))
    return last


def test_sigkill_during_saves_leaves_old_or_new_checkpoint(tmp_path):
    rnd = random.Random(1234)
    d = str(tmp_path)
    start = 0
    on_disk = {"m": 0, "t": 0}  # version of each file after the last check (0: no file yet)
    completed = {"m": 0, "t": 0}
    stats = {"kills": 0, "stray_tmp_max": 0}
    for _ in range(KILLS):
        r, w = os.pipe()
        os.set_blocking(r, False)
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            _saver(d, start, w)
        os.close(w)
        time.sleep(rnd.uniform(0.002, 0.06))  # kill at a random moment: mid-write, fsync, rename...
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status  # it was still saving
        stats["kills"] += 1
        acked = _read_acks(r)  # the last save of each kind this child completed (0: none)
        os.close(r)
        # Allowed on disk: the last completed save, or the next one of that kind (in flight when killed);
        # if this child completed none, the previous file or this child's first save of that kind.
        first = {
            "m": start + 1 if (start + 1) % 2 else start + 2,
            "t": start + 2 if (start + 1) % 2 else start + 1,
        }
        for kind, name in (("m", "model.npz"), ("t", "trainer.npz")):
            path = os.path.join(d, name)
            allowed = {acked[kind], acked[kind] + 2} if acked[kind] else {on_disk[kind], first[kind]}
            if not os.path.exists(path):
                assert 0 in allowed, (kind, allowed)
                continue
            if kind == "m":
                model, extra = qg.QAConvGS.load(path, return_extra=True)
                v = _version(model.state_dict())
                assert int(extra["version"]) == v
            else:
                trainer = qg.Trainer.from_checkpoint(path)  # model + optimizer state
                v = _version(trainer.model.state_dict())
                assert trainer.global_step == v
            assert v in allowed, (kind, v, allowed)
            on_disk[kind] = v
            completed[kind] = max(completed[kind], acked[kind])
        stray = glob.glob(os.path.join(d, ".*.tmp"))
        stats["stray_tmp_max"] = max(stats["stray_tmp_max"], len(stray))
        start = max(on_disk.values()) + 10  # the next child's versions are all new
    assert completed["m"] > 0 and completed["t"] > 0, "no save ever completed: the kill window is too short"

    # whatever the killed writers left behind (temporary files), the next saves and loads work
    model = _model()
    _stamp(model, 999_999)
    model.save(os.path.join(d, "model.npz"))
    assert _version(qg.QAConvGS.load(os.path.join(d, "model.npz")).state_dict()) == 999_999
    trainer = qg.Trainer(model, lr=0.01, seed=0)
    trainer.save_checkpoint(os.path.join(d, "trainer.npz"))
    assert _version(qg.Trainer.from_checkpoint(os.path.join(d, "trainer.npz")).model.state_dict()) == 999_999
    names = {os.path.basename(p) for p in glob.glob(os.path.join(d, "*"))}
    assert names == {"model.npz", "trainer.npz"}  # temporaries are hidden dot-files, never these names
    print(
        f"\n{stats['kills']} SIGKILLs, at most {stats['stray_tmp_max']} stray temporary file(s)",
        file=sys.stderr,
    )


def test_leftover_temporary_files_do_not_disturb_saving(tmp_path):
    """A temporary name that a killed writer left (even a torn, garbage one) is neither reused nor read."""
    p = tmp_path / "m.npz"
    for i in range(5):
        (tmp_path / f".m.npz.leftover{i}.tmp").write_bytes(b"PK\x03\x04 torn" * i)
    model = _model()
    _stamp(model, 7)
    model.save(p)
    assert _version(qg.QAConvGS.load(p).state_dict()) == 7
    assert len(list(tmp_path.glob(".m.npz.*.tmp"))) == 5  # others' temporaries are left alone


# ------------------------------------------------------------------- damaged trainer checkpoints (real model)


def _trained(tmp_path):
    rng = np.random.default_rng(0)
    model = qg.QAConvGS(N, C, H, W, k_nearest=4, seed=0, n_threads=1)
    trainer = qg.Trainer(model, lr=0.05, seed=0)
    for _ in range(2):
        trainer.step(rng.standard_normal((8, C, H, W)).astype(np.float32), rng.integers(0, N, 8))
    path = str(tmp_path / "good.npz")
    trainer.save_checkpoint(path)
    return path


def _rewrite_signed(src, dst, mutate):
    """Rewrite a checkpoint after `mutate(config, state, extra)`, with a correct checksum (so only the
    semantic checks can catch it)."""
    config, state, extra = load_checkpoint(src)
    mutate(config, state, extra)
    save_checkpoint(dst, config, state, extra)


def _bump_trainer_version(config, state, extra):
    meta = json.loads(extra["trainer/meta"].tobytes().decode())
    meta["version"] += 1
    extra["trainer/meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)


def _damage_cases():
    return {
        "truncated-10%": lambda raw, src, dst: open(dst, "wb").write(raw[: len(raw) // 10]),
        "truncated-99%": lambda raw, src, dst: open(dst, "wb").write(raw[: len(raw) * 99 // 100]),
        "flip-in-momentum-buffer": "flip:trainer/buffer/class_embed",
        "flip-in-trainer-meta": "flip:trainer/meta",
        "flip-in-row-counters": "flip:trainer/row_step",
        "trainer-version-bumped": lambda raw, src, dst: _rewrite_signed(src, dst, _bump_trainer_version),
        "trainer-meta-not-json": lambda raw, src, dst: _rewrite_signed(
            src, dst, lambda c, s, e: e.__setitem__("trainer/meta", np.frombuffer(b"{oops", np.uint8))
        ),
        "buffer-shape-mismatch": lambda raw, src, dst: _rewrite_signed(
            src, dst, lambda c, s, e: e.__setitem__("trainer/buffer/fc.weight", np.zeros((1, 3), np.float32))
        ),
        "architecture-mismatch": lambda raw, src, dst: _rewrite_signed(
            src,
            dst,
            lambda c, s, e: (
                c.update(channels=C + 1),
                s.__setitem__("class_embed", np.zeros((N, C + 1, H, W), np.float32)),
            ),
        ),
    }


@pytest.mark.parametrize("damage", list(_damage_cases()))
def test_damaged_trainer_checkpoint_leaves_trainer_and_model_untouched(tmp_path, damage):
    src = _trained(tmp_path)
    raw = open(src, "rb").read()
    dst = str(tmp_path / "bad.npz")
    how = _damage_cases()[damage]
    if isinstance(how, str):  # flip one byte inside the named array's data
        _, _, extra = load_checkpoint(src)
        key = how.split(":", 1)[1]
        payload = np.ascontiguousarray(extra[key]).tobytes()
        at = raw.find(payload[:64] if len(payload) >= 64 else payload)
        assert at > 0
        bad = bytearray(raw)
        bad[at + min(len(payload) - 1, 5)] ^= 0x10
        open(dst, "wb").write(bytes(bad))
    else:
        how(raw, src, dst)

    rng = np.random.default_rng(5)
    model = qg.QAConvGS(N, C, H, W, k_nearest=4, seed=3, n_threads=1)
    trainer = qg.Trainer(model, lr=0.05, seed=1)
    trainer.step(rng.standard_normal((8, C, H, W)).astype(np.float32), rng.integers(0, N, 8))
    model_before = model.state_dict()
    trainer_before = trainer.state_dict()
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.load_checkpoint(dst)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, model_before[k])
    after = trainer.state_dict()
    assert after["meta"] == trainer_before["meta"]
    assert sorted(after["arrays"]) == sorted(trainer_before["arrays"])
    for k, v in after["arrays"].items():
        np.testing.assert_array_equal(v, trainer_before["arrays"][k])
    if damage != "architecture-mismatch":
        with pytest.raises(ValueError):
            qg.Trainer.from_checkpoint(dst)


def test_loader_mutation_fuzz_only_raises_value_error(tmp_path):
    """300 random mutations (bit flips, truncations, copied blocks, insertions) of a trainer checkpoint:
    load_checkpoint returns the original content or raises ValueError -- never another exception, never a
    different content. (tests/fuzz_checkpoint.py runs the same property under atheris, for longer.)"""
    src = _trained(tmp_path)
    raw = open(src, "rb").read()
    ref = load_checkpoint(src)
    rnd = random.Random(99)
    p = tmp_path / "m.npz"
    outcomes = {"error": 0, "same": 0}
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(4)
            i = rnd.randrange(len(data))
            if op == 0:
                data[i] ^= 1 << rnd.randrange(8)
            elif op == 1:
                data = data[:i]
            elif op == 2:
                j = rnd.randrange(len(data))
                data[i : i + 16] = data[j : j + 16]
            else:
                data[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 32)))
            if not data:
                break
        p.write_bytes(bytes(data))
        try:
            got = load_checkpoint(p)
        except ValueError:
            outcomes["error"] += 1
            continue
        assert got[0] == ref[0]
        for a, b in ((got[1], ref[1]), (got[2], ref[2])):
            assert list(a) == list(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        outcomes["same"] += 1
    assert outcomes["error"] > 200, outcomes


def test_diverged_model_does_not_overwrite_a_good_checkpoint(tmp_path):
    """A step with an absurd learning rate overflows parameters to inf. load() refuses non-finite state, so
    saving it would replace the last good checkpoint with an unreadable one: save refuses instead."""
    p = str(tmp_path / "c.npz")
    model = _model()
    trainer = qg.Trainer(model, lr=3e38, seed=0, weight_decay=0.0)
    trainer.save_checkpoint(p)
    good = open(p, "rb").read()
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        trainer.step(rng.standard_normal((4, C, H, W)).astype(np.float32), np.arange(4))
    assert not all(np.isfinite(v).all() for v in model.parameters().values())
    model.class_embed[3] = np.inf  # (which entries overflow depends on the data; make class_embed one)
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        trainer.save_checkpoint(p)
    with pytest.raises(ValueError, match="class_embed"):
        model.save(p)
    assert open(p, "rb").read() == good
    assert [x.name for x in tmp_path.iterdir()] == ["c.npz"]
    qg.Trainer.from_checkpoint(p)  # still loads


def test_orphaned_temporaries_of_dead_savers_are_swept(tmp_path):
    """A save removes the temporary files that killed savers of the same target left behind, and only those:
    files of a live process, of another host or of another target stay."""
    import socket
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists (reaped)
    host = socket.gethostname()
    p = tmp_path / "m.npz"
    orphan = tmp_path / f".m.npz.{host}.{dead.pid}.abc123.tmp"
    live = tmp_path / f".m.npz.{host}.{os.getpid()}.def456.tmp"
    other_host = tmp_path / f".m.npz.elsewhere-{host}.{dead.pid}.ghi789.tmp"
    other_target = tmp_path / f".n.npz.{host}.{dead.pid}.jkl012.tmp"
    for f in (orphan, live, other_host, other_target):
        f.write_bytes(b"PK\x03\x04 torn")
    qg.QAConvGS(4, 2, 2, 2, k_nearest=1, seed=0).save(str(p))
    assert not orphan.exists()
    assert live.exists() and other_host.exists() and other_target.exists()
    assert qg.QAConvGS.load(str(p)).num_classes == 4
