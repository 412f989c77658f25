"""Pseudo labels (stage 3): fast path vs the reference's K full backward passes vs one plain forward pass.

``transfgu.pseudo_labels.concept_maps`` (blocks 1..L-1 once without autograd, all K gradients from one batched
backward through the CLS path of the last block) against ``naive_concept_maps`` (the authors' definition: the
whole graph kept, one full backward through every block per concept), and against one ``backbone(x)`` forward,
the floor (with the gradient restricted to the last block's CLS path the stage costs about one forward). Targets
(issue 6): >= 40x faster than naive at K=27, >= 250x at K=171, <= 1.1x one forward at any K.

The naive cost is linear in K by construction (one setup forward, then K identical backward passes), so
``T_naive(K) = a + b K``. Two estimates are reported per K:

* direct: one call of the naive path for every K up to ``--naive-direct-max-k`` (above that, the line is
  extrapolated and the JSON marks the figure ``"measured": false``);
* line model: ``a`` and ``b`` from naive calls at two small K (``--fit-ks``) timed in the same interleaved
  rounds as the fast path and the forward, so every term saw the same load (``"measured": false`` as well,
  since the K-term is a model; the fit is checked against every directly timed K).

Timings interleave the compared paths round by round and report the minimum (and median) per path, which is
the figure least disturbed by other processes on a shared machine; a single direct naive call cannot be
interleaved and is the noisiest figure. The fast maps are checked against the naive maps wherever both were
computed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import backbone_flops, base_parser, comparison, finish, new_result, start, sync


def _interleaved(fns: dict[str, Any], device: torch.device, repeat: int) -> dict[str, dict[str, Any]]:
    """Time several callables round-robin (one warm-up call each); min/median/runs per name."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs[name].append(time.perf_counter() - t0)
    out = {}
    for name, r in runs.items():
        s = sorted(r)
        out[name] = {"min_s": s[0], "median_s": s[len(s) // 2], "runs_s": r}
    return out


def _time_once(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def speedup(name: str, baseline: str, candidate: str, value: float, target: float | None, **extra: object) -> dict:
    """One naive-vs-fast comparison in "x speedup", against ``target`` when the K has one."""
    return comparison(name, baseline, candidate, value, "x speedup", f">= {target:g}" if target else None,
                      (value >= target) if target else None, **extra)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu.models.backbone import build_backbone
    from transfgu.pseudo_labels import concept_maps, naive_concept_maps

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="backbone (default vit_small_patch8; quick: vit_test_tiny)")
    p.add_argument("--size", type=int, default=None, help="square input side (default 320; quick 64)")
    p.add_argument("--ks", default=None, help="comma-separated K values (default 27,171; quick 4,12)")
    p.add_argument("--batch", type=int, default=1, help="images per call for the naive comparison")
    p.add_argument("--fast-batches", default=None, help="extra batch sizes for fast vs forward (default 8)")
    p.add_argument(
        "--naive-direct-max-k",
        type=int,
        default=None,
        help="time the naive path directly up to this K, extrapolate above (default 27; quick: all)",
    )
    p.add_argument(
        "--fit-ks", default=None, help="two small K for the naive line fit a + b K (default 1,9; quick 1,2)"
    )
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast for blocks 1..L-1")
    args, device, t_start = start(p, argv)
    q = args.quick
    arch = args.arch
    size = args.size or (64 if q else 320)
    ks = [int(k) for k in (args.ks or ("4,12" if q else "27,171")).split(",")]
    fast_batches = [int(b) for b in (args.fast_batches or ("2" if q else "8")).split(",") if b]
    direct_max = args.naive_direct_max_k if args.naive_direct_max_k is not None else (max(ks) if q else 27)
    fit_ks = [int(k) for k in (args.fit_ks or ("1,2" if q else "1,9")).split(",")]
    repeat = args.repeat or (2 if q else 5)
    amp = torch.bfloat16 if args.amp == "bf16" else None

    torch.manual_seed(0)
    bb = build_backbone(arch, "none").to(device)
    dim = bb.embed_dim
    flops_fwd = backbone_flops(bb, size, size)
    config = {
        "arch": arch,
        "size": size,
        "ks": ks,
        "batch": args.batch,
        "fast_batches": fast_batches,
        "naive_direct_max_k": direct_max,
        "fit_ks": fit_ks,
        "repeat": repeat,
        "amp": args.amp,
        "grid": [size // bb.patch_size] * 2,
        "forward_flops_per_image": flops_fwd,
    }
    result = new_result("pseudo_labels", args, device, config)
    res = result["results"]

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    cents = {k: torch.randn(k, dim, generator=gen).to(device) for k in sorted(set(ks + fit_ks))}

    def forward(inp: torch.Tensor) -> Any:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            return bb(inp)

    # -- fast vs forward (interleaved), every K, at the comparison batch and the production batch sizes ----------
    per_batch: dict[str, Any] = {}
    for b in [args.batch] + [fb for fb in fast_batches if fb != args.batch]:
        xb = x if b == args.batch else torch.randn(b, 3, size, size, generator=gen).to(device)
        fns: dict[str, Any] = {"forward": lambda xb=xb: forward(xb)}
        for k in ks:
            fns[f"fast_K{k}"] = lambda xb=xb, k=k: concept_maps(bb, xb, cents[k], autocast_dtype=amp)
        if b == args.batch:
            # The naive path at two small K in the same rounds: its per-concept cost relative to the forward
            # and the fast path is then measured under the same load (see the module docstring).
            for k in fit_ks:
                fns[f"naive_K{k}"] = lambda xb=xb, k=k: naive_concept_maps(bb, xb, cents[k])
        t = _interleaved(fns, device, repeat)
        per_batch[str(b)] = t
        for k in ks:
            ratio = t[f"fast_K{k}"]["min_s"] / t["forward"]["min_s"]
            result["comparisons"].append(
                comparison(
                    f"fast / one forward, K={k}, B={b}",
                    f"backbone forward B={b}",
                    f"concept_maps K={k}",
                    ratio,
                    "x forward time (min of interleaved runs)",
                    "<= 1.1",
                    ratio <= 1.1,
                    fast_s_per_image=t[f"fast_K{k}"]["min_s"] / b,
                    forward_s_per_image=t["forward"]["min_s"] / b,
                )
            )
    res["fast_and_forward"] = per_batch
    fwd_s = per_batch[str(args.batch)]["forward"]["min_s"]
    res["forward_flops_per_s"] = flops_fwd * args.batch / fwd_s

    # -- naive: direct timings and the linear model --------------------------------------------------------------
    naive: dict[str, Any] = {"direct_s": {}, "max_abs_diff_vs_fast": {}, "agreement_vs_fast": {}}
    for k in sorted(set(fit_ks + [k for k in ks if k <= direct_max])):
        dt, maps = _time_once(lambda k=k: naive_concept_maps(bb, x, cents[k]), device)
        naive["direct_s"][str(k)] = dt
        fast_maps = concept_maps(bb, x, cents[k], autocast_dtype=None)
        diff = (maps - fast_maps).abs()
        naive["max_abs_diff_vs_fast"][str(k)] = float(diff.max())
        # A gradient within float rounding of 0 can flip the gate 1[g <= 0] (or the 80 %-mass cut) of one
        # pixel, which moves that entry by up to a_hat + bonus: count such entries, and the label agreement.
        naive["agreement_vs_fast"][str(k)] = {
            "entries": int(diff.numel()),
            "entries_differing_gt_1e-4": int((diff > 1e-4).sum()),
            "argmax_label_agreement": float((maps.argmax(1) == fast_maps.argmax(1)).float().mean()),
        }
        del maps
    k1, k2 = fit_ks
    rounds = per_batch[str(args.batch)]
    t1, t2 = rounds[f"naive_K{k1}"]["min_s"], rounds[f"naive_K{k2}"]["min_s"]
    slope = (t2 - t1) / (k2 - k1)
    icpt = t1 - slope * k1
    naive["fit"] = {
        "setup_s": icpt,
        "per_concept_backward_s": slope,
        "from_ks": [k1, k2],
        "source": "min of the interleaved rounds (same load as the fast path and the forward)",
        "per_concept_backward_over_forward": slope / fwd_s,
        # Each extra concept costs one more backward pass, so a non-positive slope only means that the two small-K
        # timings drowned in the machine's noise (a loaded 2-core VM): the line model is then not reported.
        "valid": slope > 0,
    }
    checks = {}
    for k in ks:
        if str(k) in naive["direct_s"] and k not in fit_ks:
            pred = icpt + slope * k
            checks[str(k)] = {
                "predicted_s": pred,
                "measured_s": naive["direct_s"][str(k)],
                "rel_error": pred / naive["direct_s"][str(k)] - 1.0,
            }
    naive["fit_check"] = checks
    res["naive"] = naive

    for k in ks:
        fast_s = per_batch[str(args.batch)][f"fast_K{k}"]["min_s"]
        if str(k) in naive["direct_s"]:
            naive_s, measured, how = naive["direct_s"][str(k)], True, "measured directly"
        else:
            naive_s, measured = icpt + slope * k, False
            how = (
                f"EXTRAPOLATED linearly: setup {icpt:.2f} s + {k} x {slope:.2f} s per-concept backward "
                f"(line through direct timings at K={k1} and K={k2})"
            )
        target = 40.0 if k <= 27 else 250.0 if k >= 171 else None
        speed = naive_s / fast_s
        result["comparisons"].append(speedup(
            f"naive / fast, K={k}, B={args.batch}", f"naive_concept_maps K={k}", f"concept_maps K={k}", speed, target,
            measured=measured, naive_s=naive_s, fast_s=fast_s, naive_how=how,
        ))
        if not measured:
            result["notes"].append(f"naive K={k}: {how}")
        if slope <= 0:
            continue
        # Load-robust estimate: every term from the same interleaved rounds.
        model = (icpt + slope * k) / fast_s
        result["comparisons"].append(speedup(
            f"naive / fast, K={k}, B={args.batch}, line model from interleaved rounds",
            f"naive_concept_maps K={k} = setup + K x per-concept backward (fit at K={k1},{k2})", f"concept_maps K={k}",
            model, target, measured=False, naive_model_s=icpt + slope * k, fast_s=fast_s,
        ))
    if slope <= 0:
        result["notes"].append(
            f"line model not reported: naive K={k2} ran no slower than K={k1} ({t2:.3f} s vs {t1:.3f} s), so the "
            "timings are noise at these K; re-run on a quieter machine or with a wider --fit-ks"
        )
    for k, c in checks.items():
        result["notes"].append(
            f"linear model check: predicted naive K={k} {c['predicted_s']:.2f} s, measured {c['measured_s']:.2f} s "
            f"({100 * c['rel_error']:+.1f}%)"
        )
    for k, agr in naive["agreement_vs_fast"].items():
        result["notes"].append(
            f"fast vs naive maps K={k}: max |diff| {naive['max_abs_diff_vs_fast'][k]:.2e}, "
            f"{agr['entries_differing_gt_1e-4']} of {agr['entries']} entries differ by > 1e-4, "
            f"argmax labels agree on {100 * agr['argmax_label_agreement']:.3f}% of pixels"
        )
    result["notes"].append("random-weight backbone (speed does not depend on the weights)")
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
