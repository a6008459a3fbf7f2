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
    p.add_argument("--metric", default="gradmap")
    p.add_argument("--compensation", default="projection")
    p.add_argument("--n-prune", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import gradmap
    from gradmap import fast_prune, load_model
    from gradmap.core.calibration import calibration_data

    model, tok = load_model(args.model)
    calib = calibration_data(tok, "c4", args.n_calib, args.seq_len, 0)
    res = fast_prune(model, calib, args.n_prune, metric=args.metric,
                     compensation=args.compensation.split(","))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(json.dumps({"gradmap": gradmap.__file__, "removed": res.removed_layers,
                      "timings": {k: round(v, 1) for k, v in res.timings.items()},
                      "peak_rss_gib": round(peak_gib, 2)}))


if __name__ == "__main__":
    main()
