"""Batch prediction on Ray Data over a folder, a glob, a list file or an s3:// prefix (resumable, exactly once).

    python ray_jobs/predict.py runs/demo_camvid ../shared/data/camvid/images/test --out runs/demo_camvid/pred_ray
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/predict.py \
        /mnt/efs/runs/demo_camvid s3://bucket/images/ --out /mnt/efs/pred

The same as `transfgu predict --ray ...`; options: `python ray_jobs/predict.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the transfgu next to this script (the uploaded working dir under `ray job submit`), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfgu.distributed.predict import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
