"""The Ray Serve application: ``serve run transfgu.serve:app model=<run dir | runs:/<id>/model | models:/<name>/<v>>``.

``app`` is an application builder (Serve passes the ``key=value`` arguments of ``serve run`` as a dict); the
deployments live in :mod:`transfgu.distributed.serve` with the rest of the Ray glue. Other arguments:
``device``, ``max_batch_size``, ``batch_wait_timeout_s``, ``min_replicas``, ``max_replicas``,
``target_ongoing_requests``, ``model_cpus``, ``api_cpus``, ``api_replicas``, ``max_body_mb``, ``max_pixels``,
``tracking_uri``, ``work_pixels``, ``max_inflight_pixels``, ``max_ongoing_requests``, ``api_max_ongoing_requests``,
``host`` (the address of the Ray it starts, 127.0.0.1), ``ray_address`` (join a cluster instead).
"""

from __future__ import annotations

from transfgu.distributed.serve import build_app as app

__all__ = ["app"]
