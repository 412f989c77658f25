"""Ray glue: the only package of ``transfgu`` that imports Ray (DESIGN.md §2).

Every stage runs the same functions as the one-process pipeline (:mod:`transfgu.stages`, :mod:`transfgu.concepts`,
:func:`transfgu.pipeline.train_rounds`); this package only decides where they run:

========================  ===================================================================================
stage                     Ray
========================  ===================================================================================
extract                   Ray Data over image records, an autoscaling actor pool (:mod:`.extract`)
concepts                  Lloyd iterations as Ray tasks over the feature shards (:mod:`.kmeans`)
label_bank                Ray Data actor pool (:mod:`.label_bank`)
train                     Ray Train ``TorchTrainer`` (V2), one fit per bootstrapping round (:mod:`.train`)
evaluate                  one Ray task, on a GPU when the cluster has one (:mod:`.pipeline`)
sweep                     Ray Tune over a driver function that launches the TorchTrainer (:mod:`.tune`)
========================  ===================================================================================

Outputs go to the run directory of DESIGN.md §3, which every node must see at the same path (one machine, NFS,
or a bucket mounted on every node); Ray Train checkpoints go to ``ray.storage_path`` (a shared path or ``s3://``).
"""

from transfgu.distributed.cluster import cluster_has_gpus, init_ray, task_resources

__all__ = ["cluster_has_gpus", "init_ray", "task_resources"]
