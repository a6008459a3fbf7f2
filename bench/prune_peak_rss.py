"""Phase times and process peak RSS of one `fast_prune` on SmolLM2 (a memory regression check).

    OMP_NUM_THREADS=1 python bench/prune_peak_rss.py --metric gradmap --compensation projection

Loads the model, draws C4 calibration, prunes once and prints the PruneResult timings and
ru_maxrss (the peak of the whole process, model load included). To compare two versions of
gradmap, run it with PYTHONPATH pointing at each checkout. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--metric", default=None, help="default: the default pipeline's")
    p.add_argument("--compensation", default=None, help="comma list; default: the default pipeline's")
    p.add_argument("--schedule", default=None)
    p.add_argument("--n-prune", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default: fast_prune's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import gradmap
    from gradmap import fast_prune, load_model
    from gradmap.core.calibration import calibration_data

    # breakdown: the process peak after each phase (ru_maxrss never decreases, so each figure
    # is the peak up to that point; the phase that raised it is the one that owns the peak)
    peaks = {"import": _peak_gib()}
    model, tok = load_model(args.model)
    peaks["load"] = _peak_gib()
    calib = calibration_data(tok, "c4", args.n_calib, args.seq_len, 0)
    peaks["calibration data"] = _peak_gib()
    res = fast_prune(model, calib, args.n_prune, metric=args.metric, batch_size=args.batch_size,
                     schedule=args.schedule, progress=False,
                     compensation=None if args.compensation is None else args.compensation.split(","))
    peaks["prune"] = _peak_gib()
    print(json.dumps({"gradmap": gradmap.__file__, "removed": res.removed_layers, "metric": res.metric,
                      "compensation": res.compensation, "schedule": res.schedule,
                      "batch_size": res.options["batch_size"], "calib": list(calib.shape),
                      "timings": {k: round(v, 1) for k, v in res.timings.items()},
                      "peak_rss_gib_after": peaks, "peak_rss_gib": peaks["prune"]}))


def _peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)  # Linux: KiB


if __name__ == "__main__":
    main()
