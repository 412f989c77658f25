"""Keeping the accelerator busy: compiled forward, pinned async copies, prefetch and background writes.

None of this changes what a stage computes; it changes *when* the host does its part
(``tests/stages/test_throughput.py`` checks the overlap on CPU with a fixed-latency stand-in for the model).

==================  ============================================================================================
module              what
==================  ============================================================================================
:mod:`.tensors`     pinned non-blocking copies (:func:`~.tensors.to_device`), batch preparation in the prefetch
                    thread (:func:`~.tensors.prepare_images`)
:mod:`.compile`     ``torch.compile`` with an eager fallback (:func:`~.compile.compile_forward`,
                    :func:`~.compile.compile_function`)
:mod:`.prefetch`    :class:`~.prefetch.Prefetcher`, :class:`~.prefetch.PrefetchLoader`,
                    :class:`~.prefetch.BackgroundWriter`, :func:`~.prefetch.overlapped`
:mod:`.syncs`       host-device synchronisation counters
==================  ============================================================================================

Nothing here knows about Ray; the Ray stage actors run the same stage code (``context.run_backbone``,
``ShardedStage.load``/``compute``) with two calls per actor in place of the prefetch and writer threads. Import from
the submodules.
"""
