"""Leopart's dense fine-tuning of the backbone (method: leopart_finetune) with Ray Train (TorchTrainer, DDP).

    python ray_jobs/leopart_finetune.py --config conf/leopart_finetune.yaml data.root=/data/images ray.num_workers=4
    ray job submit --working-dir . -- python ray_jobs/leopart_finetune.py --config conf/leopart_finetune.yaml ...

A re-run with the same config resumes from the last epoch's state. The result, <run>/finetune/backbone.safetensors,
is a backbone.weights= file for any TransFGU or Leopart run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the transfgu next to this script (the uploaded working dir under `ray job submit`), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfgu.distributed.entry import main_stages  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main_stages(["finetune"], __doc__))
