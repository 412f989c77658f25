"""The whole method on Ray: extract -> concepts -> label bank -> train -> evaluate -> report, with skip-if-done.

    python ray_jobs/full_pipeline.py --config conf/demo_camvid.yaml key=value ...          # starts or joins a local Ray
    ray job submit --working-dir . -- python ray_jobs/full_pipeline.py --config conf/demo_camvid.yaml

A re-run with the same config resumes at the first unfinished stage. At the end it prints where the metrics, the
report (<run>/report/index.html) and the MLflow store are.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the transfgu next to this script (the uploaded working dir under `ray job submit`), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfgu.distributed.entry import main_stages  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main_stages(None, __doc__))
