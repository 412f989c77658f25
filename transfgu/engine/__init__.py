"""Training and evaluation of the TransFGU decoder (as the authors' code; docs/fidelity.md), one module per seam.

=================  ==========================================================================================
module             what
=================  ==========================================================================================
:mod:`.augment`    colour augmentation, per-sample random crop at half resolution, RoI-Align of the
                   pseudo labels with the same boxes, horizontal flip (host draws, device application)
:mod:`.targets`    crop-wise min-max normalisation, background channel (eq. 8), teacher mix (eq. 12),
                   hard labels and class-axis-permuted negatives
:mod:`.step`       optimiser, teacher, reboot (eq. 10-12), dropout draws, the step's losses (eq. 16),
                   the compiled step kernels
:mod:`.loop`       the epoch loop (the reference step rule) and the whole-split evaluation
=================  ==========================================================================================

Everything takes explicit arguments; randomness comes from an explicit ``torch.Generator`` (CPU), in training one
per step seeded from ``(seed, epoch, step)`` (:mod:`transfgu.ddp`). Import from the submodules.
"""
