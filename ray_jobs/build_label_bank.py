"""Stage 3: the pseudo-label bank with a Ray Data actor pool (writes <run>/label_bank/*.parquet).

    python ray_jobs/build_label_bank.py --config conf/demo_camvid.yaml key=value ...

Earlier stages must be done (run ray_jobs/full_pipeline.py, or the jobs in order); a finished stage is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the transfgu next to this script (the uploaded working dir under `ray job submit`), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfgu.distributed.entry import main_stages  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main_stages(["label_bank"], __doc__))
