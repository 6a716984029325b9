#!/usr/bin/env python
"""Evaluate trained meta-optimisers against GD and GD with hand-designed teleport (docs/meta_learning.md, section 6).

    python eval_meta.py --ckpt checkpoints/lstm_update_tele.pt --ckpt checkpoints/lstm_update.pt \\
                        --ckpt checkpoints/lstm_lr_tele.pt [--seeds 20] [--steps N] [--out results/]
    python eval_meta.py --ckpt checkpoints/any_size/lstm_update_tele.pt --dims 20,40,40,20

``--dims`` evaluates on another problem (any widths, any number of hidden layers) when every meta-optimiser
is size-agnostic (coordinatewise update, neuronwise teleport); a fixed-size one (the paper's) is a one-line
error.

Every method runs on the same unseen initialisations (odd seeds) under torch.no_grad. Writes
``<out>/results.json`` (strict JSON: non-finite numbers are written as ``null``) and ``<out>/meta.png`` /
``meta.pdf`` and prints a summary table. A missing, corrupt, hand-edited, non-finite or mismatched
checkpoint, or an ``--out`` that is not a writable folder, gives a one-line error and exit code 2 before
any evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", default=[], required=True,
                    help="checkpoint (repeatable; several of one method, e.g. from several meta-training seeds, "
                         "are labelled method@<folder>)")
    ap.add_argument("--seeds", type=int, default=None, help="evaluation initialisations (default 20)")
    ap.add_argument("--steps", type=int, default=None, help="horizon (default: the training horizon)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-plots", action="store_true", help="skip the figures")
    ap.add_argument("--dims", default=None,
                    help="evaluate on another problem, e.g. 20,40,40,20 ([batch, d_in, hidden..., d_out]); "
                         "needs size-agnostic meta-optimisers (lstm.update_arch = coordinatewise, "
                         "lstm.tele_arch = neuronwise)")
    ap.add_argument("--device", default="auto",
                    help="auto (a GPU when there is one, the default), cpu, cuda or cuda:N")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from metatele.checkpoint import CheckpointError, check_output_dir
    from metatele.meta.evaluate import evaluate, finite_or_none, load_method, summary_table

    if args.threads < 0:
        print(f"eval_meta.py: error: --threads {args.threads} must be >= 0 (0: torch's default)", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        out = check_output_dir(args.out)
    except ValueError as e:
        print(f"eval_meta.py: error: {e}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"eval_meta.py: error: --seeds {args.seeds} must be >= 1", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"eval_meta.py: error: --steps {args.steps} must be >= 1", file=sys.stderr)
        return 2
    dims = None
    if args.dims is not None:
        try:
            dims = [int(d) for d in args.dims.split(",")]
        except ValueError:
            print(f"eval_meta.py: error: --dims {args.dims!r} must be comma-separated integers, e.g. 20,40,40,20",
                  file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        first_cfg = load_method(args.ckpt[0])[1]
        res = evaluate(args.ckpt, seeds=args.seeds, steps=args.steps, device=args.device, dims=dims,
                       progress=lambda n: print(f"evaluated {n}", file=sys.stderr))
    except CheckpointError as e:
        print(f"eval_meta.py: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"eval_meta.py: error: {e}", file=sys.stderr)
        return 2
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    (out / "results.json").write_text(json.dumps(finite_or_none(res), allow_nan=False))
    table = summary_table(res, first_cfg.eval.report_steps, first_cfg.eval.thresholds)
    (out / "summary.txt").write_text(table + "\n")
    if not args.no_plots:
        from metatele.meta.figures import plot_results

        plot_results(res, out)
    print(f"{len(res['eval_seeds'])} unseen seeds, {res['steps']} steps, dims {res['dims']}")
    print(table)
    print(f"wrote {out / 'results.json'}{'' if args.no_plots else ', meta.png, meta.pdf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
