"""Leopart's fully unsupervised segmentation: cluster-based foreground extraction (CBFE) and community detection (CD).

Ziegler & Asano, "Self-Supervised Learning of Object Parts for Semantic Segmentation" (CVPR 2022), appendix A.1;
the authors' script is described step by step in docs/leopart.md, "The method, step by step". The method is
post-hoc: it works on the dense patch tokens of any frozen ViT.

=========================  =====================================================================================
module                     step
=========================  =====================================================================================
:mod:`.dense`              patch tokens + last-block CLS attention (head mean) per image, one Parquet row each
:mod:`.pca`                standardisation + PCA from additive per-shard statistics (train; train + val: paper)
:mod:`.foreground`         noisy attention foreground mask (blur, top 65 % mass, small components removed)
:mod:`.shards`             dense files in memory, PCA-projected: the k-means shard set (:mod:`transfgu.kmeans`)
:mod:`.cbfe`               precision of every cluster against the attention mask, threshold, foreground clusters
:mod:`.communities`        co-occurrence network (vectorised), edge threshold, Infomap communities
:mod:`.model`              the fitted model (PCA, centroids, community map): segmentation, save/load, predict
:mod:`.pipeline`           the stages, ``run(ctx, ex)`` for either executor (the method: ``transfgu.methods.leopart``)
=========================  =====================================================================================

Nothing here imports Ray.
"""
