"""Leopart's dense self-supervised fine-tuning of a ViT: the method pieces (the Leopart paper's appendix A.1).

A student ViT and a teacher (an exponential moving average of the student) see several crops of one image: a few
*global* crops (224 px) and more *local* crops (96 px), each pair intersecting by at least 1 % of the image. Every
patch token goes through a projection head (three linear layers, hidden 2048, GELU, output 256), an L2 bottleneck
and a prototype matrix ``C`` (``K`` unit rows), giving cluster scores ``z . c_k``. The teacher's scores of the
global crops, together with a queue of recent teacher embeddings, are turned into balanced soft assignments ``Q``
by Sinkhorn-Knopp (the equipartition of SwAV); the student predicts them with ``softmax(z . c / tau)``, ``tau =
0.1``. Because the crops cover different parts of the image, the two maps are first *aligned*: the intersection
box of the predicting crop and the target crop is cut out of both maps with RoIAlign to a fixed 7 x 7 grid, so
that cell ``(u, v)`` of both aligned maps looks at the same point of the image. The loss is the cross-entropy
``-sum_k Q_k log p_k`` averaged over cells, pairs and images.

Optimisation: Adam, head lr 1e-4, backbone lr 1e-5, both on a cosine schedule to 0; a cosine weight-decay
schedule; the teacher's EMA momentum follows a cosine from 0.9995 to 1 (a hard copy at the end).

The authors' code adds what the appendix does not say (and the defaults follow it, docs/leopart.md): the loss is
masked to the foreground (the teacher's CLS attention, top 60 % of its mass, RoI-aligned with the targets), only
foreground embeddings enter the queues (one queue per global crop, scored with the student's prototypes; Sinkhorn-
Knopp runs per global crop), AdamW with weight decay 0.04 -> 0.5 on every non-bias, non-norm parameter, drop-path
0.1 in the student, global crops overlapping by more than 2 %, colour jitter (0.8, 0.8, 0.8, 0.2).

This module holds the pieces only (tested one by one in ``tests/stages/test_leopart_finetune.py``); the loop is in
:mod:`transfgu.leopart.finetune_stage`, the Ray Train executor in :mod:`transfgu.distributed.finetune_stage`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.ddp import all_reduce_max, all_reduce_sum


# -- Sinkhorn-Knopp -------------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor, eps: float = 0.05, n_iters: int = 3, shared: Tensor | None = None, distributed: bool = False,
) -> Tensor:
    """Balanced soft assignments of ``N`` samples to ``K`` prototypes (SwAV's equipartition, Leopart eq. 3).

    ``Q = exp(scores / eps)`` transposed to ``(K, N)`` is scaled to total mass 1, then alternately its rows are
    scaled to ``1/K`` (each prototype gets an equal share of the batch) and its columns to ``1/N`` (each sample is a
    distribution), ``n_iters`` times. The result is returned as ``(N, K)`` with rows summing to 1 (``N * Q^T``).

    ``shared`` rows (the queue) join the batch but get no assignment back. With ``distributed=True`` the batch is
    the union of every rank's ``scores`` (SwAV's distributed Sinkhorn): the shift, the total mass, ``N`` and the
    row (prototype) sums are all-reduced over the ranks (:mod:`transfgu.ddp`; the identity without a process
    group), while ``shared`` -- the same on every rank -- is counted once. Column scalings are per sample and need
    no communication. W ranks then give, up to float summation order, the assignments one process computes on the
    concatenated batch.

    Args:
        scores: ``(N, K)`` similarities of this rank's samples to prototypes (may be empty on a rank).
        eps: entropic regularisation (smaller = harder assignments).
        n_iters: number of (row, column) scaling rounds.
        shared: ``(M, K)`` similarities of extra samples identical on every rank (counted once).
        distributed: reduce over the default process group.
    Returns:
        ``(N, K)`` assignments of ``scores``' samples.
    """
    def red_sum(t: Tensor) -> Tensor:
        return all_reduce_sum(t) if distributed else t

    k = scores.shape[1]
    parts = [scores.float() / eps]
    if shared is not None and shared.shape[0] > 0:
        parts.append(shared.float() / eps)
    own = [parts[0]]  # summed over ranks
    once = parts[1:]  # identical everywhere: counted once
    # one shift for the whole (global) batch: a per-rank shift would scale the ranks' masses differently
    m = torch.stack([p.max() if p.numel() else p.new_tensor(float("-inf")) for p in parts]).max().reshape(1)
    if distributed:
        m = all_reduce_max(m)
    own = [torch.exp(p - m).t() for p in own]  # (K, n)
    once = [torch.exp(p - m).t() for p in once]

    def total(fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> Tensor:
        """``fn`` summed over this rank's parts, all-reduced, plus the shared parts' once."""
        acc = parts[0].new_zeros(shape)
        for q in own:
            acc = acc + fn(q)
        acc = red_sum(acc)
        for q in once:
            acc = acc + fn(q)
        return acc

    n = total(lambda q: q.new_tensor([float(q.shape[1])]), (1,))
    mass = total(lambda q: q.sum().reshape(1), (1,))
    own = [q / mass for q in own]
    once = [q / mass for q in once]
    for _ in range(n_iters):
        rows = total(lambda q: q.sum(dim=1, keepdim=True), (k, 1))
        own = [q / rows / k for q in own]
        once = [q / rows / k for q in once]
        own = [q / q.sum(dim=0, keepdim=True) / n for q in own]
        once = [q / q.sum(dim=0, keepdim=True) / n for q in once]
    return (own[0] * n).t()


# -- schedules ------------------------------------------------------------------------------------------------------
def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """``end + (start - end) * (1 + cos(pi * step / total)) / 2``: ``start`` at step 0, ``end`` at ``total``."""
    if total <= 0:
        return float(end)
    t = min(max(step, 0), total) / total
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def ema_momentum(step: int, total: int, base: float = 0.9995) -> float:
    """The teacher's EMA momentum at ``step`` of ``total``: a cosine from ``base`` up to 1 (a hard copy)."""
    return cosine_schedule(base, 1.0, step, total)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter (buffers are copied)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


# -- the head -------------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """Three linear layers with GELU (``dim -> hidden -> hidden -> out``), the L2 bottleneck and the prototypes.

    ``forward`` gives the unit embeddings ``z`` ``(..., out)`` and the prototype scores ``z . c_k`` ``(..., K)``;
    the prototypes are kept unit-norm by :meth:`normalize_prototypes` (called before every step).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, n_prototypes: int = 300) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.embed(x)
        return z, self.prototypes(z)


class EmbeddingQueue:
    """A FIFO of the teacher's most recent unit embeddings (``length x dim``), added to the Sinkhorn batch so that
    the equipartition is taken over more patches than one step has (appendix A.1: 8,192; Table 4)."""

    def __init__(self, length: int, dim: int) -> None:
        if length < 0:
            raise ValueError(f"queue length must be >= 0, got {length}")
        self.length = length
        self.data = torch.zeros(length, dim)
        self.filled = 0  # rows that hold real embeddings (the queue is used only once it is full)
        self.ptr = 0

    @property
    def full(self) -> bool:
        return self.length > 0 and self.filled >= self.length

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        """Append rows of ``z`` (the newest ``length`` of them when there are more), overwriting the oldest."""
        if self.length == 0:
            return
        z = z.detach().to(self.data.device, self.data.dtype)[-self.length :]
        n = z.shape[0]
        end = self.ptr + n
        if end <= self.length:
            self.data[self.ptr : end] = z
        else:
            first = self.length - self.ptr
            self.data[self.ptr :] = z[:first]
            self.data[: n - first] = z[first:]
        self.ptr = end % self.length
        self.filled = min(self.length, self.filled + n)

    def state(self) -> dict[str, Tensor]:
        return {"queue": self.data.clone(), "queue_meta": torch.tensor([self.filled, self.ptr], dtype=torch.int64)}

    def load(self, state: dict[str, Tensor]) -> None:
        self.data = state["queue"].clone()
        self.filled, self.ptr = (int(v) for v in state["queue_meta"].tolist())


class CropQueues:
    """One :class:`EmbeddingQueue` per global crop (the authors' code): queue ``j`` holds foreground embeddings of
    global crop ``j`` and joins only crop ``j``'s Sinkhorn-Knopp batch."""

    def __init__(self, n: int, length: int, dim: int) -> None:
        self.queues = [EmbeddingQueue(length, dim) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.queues)

    def __getitem__(self, j: int) -> EmbeddingQueue:
        return self.queues[j]

    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for j, q in enumerate(self.queues):
            out.update({f"{k}_{j}": v for k, v in q.state().items()})
        return out

    def load(self, state: dict[str, Tensor]) -> None:
        for j, q in enumerate(self.queues):
            q.load({k: state[f"{k}_{j}"] for k in ("queue", "queue_meta")})


# -- multi-crop -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropSpec:
    """Multi-crop settings: sizes of the resized crops, area fractions of the image, counts, min intersection."""

    n_global: int = 2
    n_local: int = 4
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_intersection: float = 0.01  # of the image area, between every local crop and every global crop (>=)
    global_overlap: float = 0.0  # of the image area, between two global crops (strictly more; authors: 2 %)
    max_tries: int = 50


def _one_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator) -> Tensor:
    """A RandomResizedCrop box ``(x0, y0, x1, y1)`` in pixels (torchvision's sampling rule, with ``g``)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        a = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand((), generator=g).item())
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
            x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
            return torch.tensor([x0, y0, x0 + cw, y0 + ch], dtype=torch.float32)
    side = min(h, w)  # fallback: the central square
    return torch.tensor([(w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side],
                        dtype=torch.float32)


def box_intersection(a: Tensor, b: Tensor) -> Tensor:
    """Intersection box of ``(x0, y0, x1, y1)`` boxes (empty when ``x1 <= x0`` or ``y1 <= y0``)."""
    return torch.stack([torch.maximum(a[..., 0], b[..., 0]), torch.maximum(a[..., 1], b[..., 1]),
                        torch.minimum(a[..., 2], b[..., 2]), torch.minimum(a[..., 3], b[..., 3])], dim=-1)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def sample_multicrop_boxes(h: int, w: int, spec: CropSpec, g: torch.Generator) -> Tensor:
    """Boxes of ``n_global`` then ``n_local`` crops of an ``h x w`` image, ``(n, 4)`` in pixels.

    Every local crop intersects every global crop by at least ``min_intersection * h * w`` pixels (appendix A.1),
    and two global crops intersect by at least that and by *more than* ``global_overlap * h * w`` (the authors'
    code: > 2 %): the global crops are drawn first (all together, redrawn until they pairwise intersect), then each
    local crop is redrawn until it meets every global crop. After ``max_tries`` failures the offending crop becomes
    a copy of the first global crop's box (always valid), so a step never fails on an odd image.
    """
    need = spec.min_intersection * h * w

    need_global = spec.global_overlap * h * w

    def meets(box: Tensor, others: Sequence[Tensor]) -> bool:
        return all(float(box_area(box_intersection(box, o))) >= need for o in others)

    def overlaps(box: Tensor, others: Sequence[Tensor]) -> bool:
        return all(float(box_area(box_intersection(box, o))) > need_global for o in others)

    globals_: list[Tensor] = []
    for _ in range(spec.max_tries):
        globals_ = [_one_box(h, w, spec.global_scale, spec.ratio, g) for _ in range(spec.n_global)]
        if all(meets(b, globals_[:i]) and overlaps(b, globals_[:i]) for i, b in enumerate(globals_)):
            break
    else:
        globals_ = [globals_[0].clone() for _ in range(spec.n_global)]
    locals_: list[Tensor] = []
    for _ in range(spec.n_local):
        for _ in range(spec.max_tries):
            b = _one_box(h, w, spec.local_scale, spec.ratio, g)
            if meets(b, globals_):
                break
        else:
            b = globals_[0].clone()
        locals_.append(b)
    return torch.stack(globals_ + locals_)


def crop_pairs(n_global: int, n_crops: int) -> list[tuple[int, int]]:
    """``(predicting crop, target global crop)`` pairs: every crop predicts every *other* global crop (Fig. 1)."""
    return [(i, j) for j in range(n_global) for i in range(n_crops) if i != j]


def boxes_in_crop(inter: Tensor, crop: Tensor, grid: tuple[int, int]) -> Tensor:
    """Image-pixel boxes ``(..., 4)`` in the feature-map coordinates of ``crop`` (``grid = (h, w)`` cells).

    A crop of ``cw x ch`` pixels resized to the ViT input has a ``h x w`` patch grid; pixel ``x`` of the image
    lies at ``(x - x0) / cw * w`` cells of that grid (cell ``i`` spans ``[i, i+1)``; RoIAlign with
    ``aligned=True`` uses exactly this continuous convention).
    """
    gh, gw = grid
    sx = gw / (crop[..., 2] - crop[..., 0])
    sy = gh / (crop[..., 3] - crop[..., 1])
    return torch.stack([(inter[..., 0] - crop[..., 0]) * sx, (inter[..., 1] - crop[..., 1]) * sy,
                        (inter[..., 2] - crop[..., 0]) * sx, (inter[..., 3] - crop[..., 1]) * sy], dim=-1)


def align_maps(maps: Tensor, boxes: Tensor, out: int = 7) -> Tensor:
    """Cut ``boxes`` (``(B, 4)``, feature-cell units, one per map) out of ``maps`` ``(B, C, h, w)`` to ``out x out``.

    RoIAlign (``aligned=True``, 2 x 2 samples per bin, averaged): the value of bin ``(u, v)`` is the map's bilinear
    interpolation averaged over the bin, so two crops' maps aligned on the same image box sample the same image
    points. Used for both the student's predictions and the teacher's Sinkhorn targets.
    """
    from torchvision.ops import roi_align

    idx = torch.arange(maps.shape[0], device=maps.device, dtype=maps.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(maps.device, maps.dtype)], dim=1)
    return roi_align(maps, rois, output_size=(out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)


# -- the loss -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_foreground(attn: Tensor, mass: float = 0.6) -> Tensor:
    """Foreground patches ``(B, n)`` bool of the last block's CLS attention ``(B, heads, n)``.

    The attention is averaged over heads and the patches holding the top ``mass`` of it are kept (DINO's rule:
    sorted ascending and normalised, the entries whose cumulative sum exceeds ``1 - mass``); the most attended
    patch always qualifies, so every crop has at least one foreground patch.
    """
    a = attn.float().mean(dim=1) if attn.dim() == 3 else attn.float()
    a = a / a.sum(dim=1, keepdim=True).clamp(min=1e-12)
    srt, order = torch.sort(a, dim=1, stable=True)
    keep_sorted = torch.cumsum(srt, dim=1) > (1.0 - mass)
    keep_sorted[:, -1] = True  # the largest value: the cumulative sum reaches 1 there (float rounding aside)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


@torch.no_grad()
def aligned_foreground(aligned: Tensor) -> Tensor:
    """Foreground cells ``(B, out*out)`` bool of a RoI-aligned 0/1 mask ``(B, 1, out, out)``: the cells whose
    aligned value is at least 0.5 (the majority of their samples fall on foreground patches); an image with no
    such cell keeps its highest cell (first in row-major order on ties), so the masked mean is always defined."""
    v = aligned.flatten(1)
    cells = v >= 0.5
    none = ~cells.any(dim=1)
    if bool(none.any()):
        top = v.argmax(dim=1)
        cells[none, top[none]] = True
    return cells


def cluster_loss(
    student_scores: Sequence[Tensor],
    teacher_targets: Sequence[Tensor],
    boxes: Tensor,
    n_global: int,
    temperature: float = 0.1,
    out: int = 7,
    per_image: bool = False,
    foreground: Sequence[Tensor] | None = None,
) -> Tensor:
    """Leopart's aligned swapped-prediction loss of one batch.

    Args:
        student_scores: per crop ``c``, the student's prototype scores ``(B, K, h_c, w_c)``.
        teacher_targets: per global crop ``j``, the teacher's Sinkhorn assignments ``(B, K, h_j, w_j)``.
        boxes: ``(B, n_crops, 4)`` crop boxes in image pixels.
        n_global: number of global crops (the first ``n_global`` of ``student_scores``).
        temperature: softmax temperature of the student's predictions.
        per_image: return each image's loss ``(B,)`` (its mean over pairs and cells) instead of their mean; the
            data-parallel loop weights them by the global batch size.
        foreground: per global crop ``j``, its 0/1 foreground patches ``(B, 1, h_j, w_j)`` (the authors'
            ``loss_mask: fg``): the mask is RoI-aligned with the target on the same box
            (:func:`aligned_foreground`) and each pair's loss is the mean over its foreground cells only.
            ``None``: every cell counts.
    Returns:
        the mean over pairs, images and the (foreground) ``out x out`` cells of ``-sum_k Q_k log softmax(s/tau)_k``.
    """
    n_crops = len(student_scores)
    losses = []
    for i, j in crop_pairs(n_global, n_crops):
        inter = box_intersection(boxes[:, i], boxes[:, j])
        s = student_scores[i]
        t = teacher_targets[j]
        s_al = align_maps(s / temperature, boxes_in_crop(inter, boxes[:, i], tuple(s.shape[-2:])), out)
        t_box = boxes_in_crop(inter, boxes[:, j], tuple(t.shape[-2:]))
        t_al = align_maps(t, t_box, out)
        cell = -(t_al * F.log_softmax(s_al, dim=1)).sum(dim=1).flatten(1)  # (B, out*out)
        if foreground is None:
            losses.append(cell.mean(dim=1))  # (B,)
        else:
            m = aligned_foreground(align_maps(foreground[j].to(t.dtype), t_box, out)).to(cell.dtype)
            losses.append((cell * m).sum(dim=1) / m.sum(dim=1))
    # every pair has the same images: the mean over images of per-image means is the overall mean
    each = torch.stack(losses).mean(dim=0)
    return each if per_image else each.mean()


def usage_counts(assign: Tensor) -> Tensor:
    """Hard-cluster usage ``(K,)`` (float) of ``(N, K)`` assignments (summed over ranks by the loop)."""
    return torch.bincount(assign.argmax(dim=1), minlength=assign.shape[1]).float()


def entropy_of_counts(counts: Tensor) -> float:
    """Entropy (nats) of the distribution ``counts / counts.sum()`` (0 for no counts)."""
    p = counts / counts.sum().clamp(min=1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def usage_entropy(assign: Tensor) -> float:
    """Entropy (nats) of the mean hard-cluster usage of ``(N, K)`` assignments; ``log K`` when perfectly even."""
    return entropy_of_counts(usage_counts(assign))


# -- augmentations --------------------------------------------------------------------------------------------------
class RandomSigmaBlur(nn.Module):
    """Gaussian blur with ``sigma`` drawn uniformly in ``sigma`` and a kernel that grows with it (``2 ceil(3 sigma)
    + 1`` taps, PIL's ``GaussianBlur(radius=sigma)`` up to its box approximation), applied with probability ``p``;
    ``kernel`` fixes the kernel size instead (torchvision's usual ``GaussianBlur(kernel, sigma)``)."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0), kernel: int | None = None) -> None:
        super().__init__()
        self.p, self.sigma, self.kernel = p, sigma, kernel

    def forward(self, img: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        if torch.rand(()).item() >= self.p:
            return img
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        k = self.kernel if self.kernel is not None else 2 * math.ceil(3 * s) + 1
        k = min(k, 2 * ((min(img.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs the crop wider than it
        return TF.gaussian_blur(img, [k, k], [s, s]) if k > 1 else img


def photometric(
    jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.2), jitter_p: float = 0.8, grayscale_p: float = 0.2,
    blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel: int | None = None,
) -> nn.Module:
    """Colour jitter (brightness, contrast, saturation, hue; applied with ``jitter_p``), grayscale and Gaussian blur
    (:class:`RandomSigmaBlur`) on uint8 crops (torchvision.transforms.v2). The authors' code: jitter (0.8, 0.8, 0.8,
    0.2) with p 0.8 and PIL's blur with sigma in 0.1-2."""
    from torchvision.transforms import v2

    b, c, s, h = jitter
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=jitter_p),
        v2.RandomGrayscale(p=grayscale_p),
        RandomSigmaBlur(blur_p, blur_sigma, blur_kernel),
    ])


# -- stochastic depth -----------------------------------------------------------------------------------------------
class SeededDropPath(nn.Module):
    """Stochastic depth (drop a residual branch per sample, scale the kept ones by ``1 / (1 - rate)``) whose keep
    decisions are set from outside (:func:`set_drop_path_draws`) before a forward pass: the data-parallel loop
    draws them for the whole global batch from the step's seed, so W ranks drop what one process drops. Without
    draws (``keep is None``) it draws from torch's generator, as timm's ``DropPath``."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)
        self.keep: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate <= 0:
            return x
        keep = self.keep
        if keep is None or keep.shape[0] != x.shape[0]:
            keep = torch.rand(x.shape[0], device=x.device) >= self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * keep.to(x.device, x.dtype).view(shape) / (1.0 - self.rate)


def install_drop_path(vit: nn.Module, rate: float) -> list[SeededDropPath]:
    """Give every block of a timm ViT two :class:`SeededDropPath` (attention and MLP branch) with DINO's
    stochastic-depth rule: rates linear in depth from 0 to ``rate``. Returns them block-major."""
    blocks = list(vit.blocks)
    rates = torch.linspace(0, rate, len(blocks)).tolist() if len(blocks) > 1 else [rate]
    mods = []
    for blk, r in zip(blocks, rates):
        blk.drop_path1 = SeededDropPath(r)
        blk.drop_path2 = SeededDropPath(r)
        mods += [blk.drop_path1, blk.drop_path2]
    return mods


def drop_path_modules(model: nn.Module) -> list[SeededDropPath]:
    return [m for m in model.modules() if isinstance(m, SeededDropPath)]


def set_drop_path_draws(mods: Sequence[SeededDropPath], u: Tensor | None) -> None:
    """Set each module's keep decisions from uniforms ``u`` ``(rows, len(mods))`` (keep where ``u >= rate``);
    ``None`` clears them."""
    for i, m in enumerate(mods):
        m.keep = None if u is None else (u[:, i] >= m.rate)


# -- optimiser ------------------------------------------------------------------------------------------------------
def decayed(name: str, p: Tensor, decay_tokens: bool = True) -> bool:
    """Whether parameter ``name`` gets weight decay: DINO's rule (the authors' code), every parameter but biases
    and 1-D ones (norms), so the CLS token and the position embedding *are* decayed; ``decay_tokens=False`` also
    exempts those (``*token*``, ``pos_embed``)."""
    if p.ndim <= 1 or name.endswith(".bias"):
        return False
    return decay_tokens or not ("token" in name or "pos_embed" in name)


def param_groups(backbone: nn.Module, head: nn.Module, lr_backbone: float, lr_head: float,
                 decay_tokens: bool = True) -> list[dict]:
    """Optimiser groups: backbone / head, each split into decayed and undecayed parameters (:func:`decayed`).
    ``base_lr`` and ``decay`` tell the schedule what to set."""
    groups = []
    for name, mod, lr in (("backbone", backbone, lr_backbone), ("head", head, lr_head)):
        decay, no_decay = [], []
        for n, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            (decay if decayed(n, p, decay_tokens) else no_decay).append(p)
        groups.append({"params": decay, "lr": lr, "base_lr": lr, "decay": True, "name": f"{name}"})
        groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "decay": False, "weight_decay": 0.0,
                       "name": f"{name}_no_decay"})
    return [g for g in groups if g["params"]]


def set_schedules(opt: torch.optim.Optimizer, step: int, total: int, wd_start: float, wd_end: float) -> None:
    """Cosine learning rate (each group's ``base_lr`` down to 0) and cosine weight decay (``wd_start -> wd_end``)."""
    wd = cosine_schedule(wd_start, wd_end, step, total)
    for g in opt.param_groups:
        g["lr"] = cosine_schedule(g["base_lr"], 0.0, step, total)
        if g.get("decay", False):
            g["weight_decay"] = wd


def frozen_first_blocks(backbone: nn.Module, n_trainable: int | None) -> Iterable[nn.Parameter]:
    """Parameters of a timm ViT to freeze so that only its last ``n_trainable`` blocks (and final norm) learn;
    ``None`` freezes nothing. Used to keep CPU runs small."""
    if n_trainable is None:
        return []
    vit = backbone.vit if hasattr(backbone, "vit") else backbone
    blocks = list(vit.blocks)
    keep = set(blocks[len(blocks) - n_trainable :]) if n_trainable > 0 else set()
    out = [p for n, p in vit.named_parameters() if not n.startswith(("blocks.", "norm."))]
    for b in blocks:
        if b not in keep:
            out.extend(b.parameters())
    return out
