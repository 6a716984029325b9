"""One rank of the data-parallel tests (tests/test_distributed.py), started like torchrun starts a worker:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment.

    python tests/_dist_worker.py JOB.json

JOB.json: ``{"scenarios": [{"config": {...}, "method": ..., "out": path, "resume": path | null,
"trajectories": int | null, "poison": {...}}], "device": "cpu", "backend": "auto"}``. Every scenario
trains to the end of its schedule, checks after each meta-batch that all ranks hold bit-identical
meta-parameters, and rank 0 writes the checkpoint to ``out`` (other ranks' ``save`` must return None).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def apply_poison(trainer, poison: dict | None, setattr_):
    """Make the process that holds the meta-batch's *last* trajectory misbehave, identically in a
    one-process reference and in a distributed run (where only the last rank holds it).

    nan_loss_window: the meta-loss of this window index (counted over the run) becomes NaN;
    diverge_t: the last trajectory's weights become NaN at inner step t (inside a window: its loss is
    non-finite at the next step, where the window must stop on every rank, then the meta-batch is abandoned);
    inf_loss_t: the last trajectory's loss L(w_t) reads inf at inner step t with finite weights (every rank
    must stop the window there, rewind to that step's state and go on from it in the next window).
    ``setattr_(module, name, value)`` patches a module attribute (pytest's monkeypatch.setattr).
    """
    if not poison or trainer.rank != trainer.world_size - 1:
        return
    import metatele.meta.unroll as um

    w_nan = poison.get("nan_loss_window")
    if w_nan is not None:
        orig = trainer._meta_update
        count = {"n": 0}

        def _meta_update(meta_loss):
            if count["n"] == w_nan:
                meta_loss = meta_loss * float("nan")
            count["n"] += 1
            return orig(meta_loss)

        trainer._meta_update = _meta_update
    t_div, t_inf = poison.get("diverge_t"), poison.get("inf_loss_t")
    if t_div is not None or t_inf is not None:
        orig_step = um.inner_step

        def inner_step(method, s_in, stepper, **kw):
            s, loss, gn = orig_step(method, s_in, stepper, **kw)
            if s.t == t_div:
                nan = float("nan")
                s.weights = tuple(torch.cat([w[:-1], torch.full_like(w[-1:], nan)]) for w in s.weights)
            if s_in.t == t_inf:
                loss = torch.cat([loss[:-1], torch.full_like(loss[-1:], float("inf"))])
            return s, loss, gn

        setattr_(um, "inner_step", inner_step)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from metatele.config import config_from_dict
    from metatele.meta.distributed import distributed, make_trainer, resume_trainer

    with distributed(spec.get("device", "cpu"), spec.get("backend", "auto"), timeout_s=120) as ctx:
        assert ctx.world_size == int(spec["world_size"]), (ctx.world_size, spec["world_size"])
        for sc in spec["scenarios"]:
            if sc.get("resume"):
                tr = resume_trainer(sc["resume"], ctx, trajectories=sc.get("trajectories"))
            else:
                tr = make_trainer(sc["method"], config_from_dict(sc["config"]), ctx)
            saved = []

            def patch(mod, name, fn):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, fn)

            apply_poison(tr, sc.get("poison"), patch)
            if not ctx.in_sync(tr.method):
                raise SystemExit(f"rank {ctx.rank}: meta-parameters differ across ranks at the start")
            while tr.progress.meta_batch < tr.n_meta_batches:
                tr.run_meta_batch()
                if not ctx.in_sync(tr.method):
                    raise SystemExit(f"rank {ctx.rank}: meta-parameters differ across ranks after "
                                     f"meta-batch {tr.progress.meta_batch}")
            for mod, name, orig in saved:
                setattr(mod, name, orig)
            r = tr.save(sc["out"])
            if (r is None) == ctx.is_main:
                raise SystemExit(f"rank {ctx.rank}: save returned {r!r}")
            m = tr.progress.history[-1] if tr.progress.history else float("nan")
            print(f"rank {ctx.rank} {sc.get('method') or 'resume'}: {tr.progress.meta_batch} meta-batches, "
                  f"seeds {tr.seeds_for(0)}, last meta-loss {m if math.isfinite(m) else 'nan'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
