"""TransFGU: top-down fine-grained unsupervised semantic segmentation (ECCV 2022), rebuilt as a library.

See docs/architecture.md for how the package is laid out.
"""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# faiss logs every instruction-set library it tries at INFO when it is first imported (a dozen lines per process,
# Ray workers included); that happens before any logging set-up of ours can run, so it is quieted here.
if _os.environ.get("TRANSFGU_VERBOSE", "").lower() not in ("1", "true", "yes"):
    _logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
