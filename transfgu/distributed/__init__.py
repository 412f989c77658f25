"""The Ray executor: the only package of ``transfgu`` that imports Ray (docs/architecture.md).

Every stage is defined once in :mod:`transfgu.stages` (its per-item work, its checks, its outputs); this package
only decides where that work runs:

========================  ===================================================================================
stage                     Ray
========================  ===================================================================================
extract                   Ray Data over image records, an autoscaling actor pool (:mod:`.shards`)
concepts                  Lloyd iterations as Ray tasks over the feature shards (:mod:`.kmeans`)
label_bank                Ray Data actor pool (:mod:`.shards`)
train                     Ray Train ``TorchTrainer`` (V2), one fit per bootstrapping round (:mod:`.train`)
evaluate                  one Ray task, on a GPU when the cluster has one (:mod:`.pipeline`)
sweep                     Ray Tune over a driver function that launches the TorchTrainer (:mod:`.tune`)
========================  ===================================================================================

Outputs go to the run directory (:class:`transfgu.layout.RunLayout`), which every node must see at the same path
(one machine, NFS, or a bucket mounted on every node); Ray Train checkpoints go to ``ray.storage_path`` (a shared
path or ``s3://``).
"""

from transfgu.distributed.cluster import cluster_has_gpus, init_ray, task_resources

__all__ = ["cluster_has_gpus", "init_ray", "task_resources"]
