"""Run Infomap on a JSON network from stdin and print the partition as JSON (used by
:func:`transfgu.leopart.communities.detect_communities`).

A separate process because the ``infomap`` wheel bundles its own OpenMP runtime (``infomap.libs/libgomp-*``):
loaded into a process that already runs faiss's and torch's OpenMP runtimes, it crashed the process (segmentation
fault in a worker thread, seen in this project's tests). This script imports nothing but ``infomap`` and ``json``.

stdin: ``{"edges": [[i, j, w], ...], "seed": int >= 1, "trials": int, "markov_time": float,
"n_modules": int | null}``; stdout: ``{"modules": {node: module}, "codelength": float, "num_modules": int}``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    import infomap

    req = json.load(sys.stdin)
    net = infomap.Network()
    for i, j, w in req["edges"]:
        net.add_link(int(i), int(j), float(w))
    kw = {"preferred_number_of_modules": int(req["n_modules"])} if req.get("n_modules") else {}
    res = infomap.run(net, seed=int(req["seed"]), num_trials=int(req["trials"]), two_level=True, directed=False,
                      markov_time=float(req["markov_time"]), **kw)
    out = {"modules": {str(k): int(v) for k, v in res.modules().items()}, "codelength": float(res.codelength),
           "num_modules": int(res.num_top_modules)}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
