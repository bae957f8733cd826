"""Joint-space clustering of the teacher's patch tokens into objects (CrIBo, ICLR 2024, Sec. 3.2).

The patch tokens of the two global views of one image are pooled (``T = 2N`` tokens, view 1 first) and
partitioned into ``K`` clusters by a few rounds of: cost = -cosine(token, centroid) + alpha * spatial distance of
the token to the cluster (in original-image pixels); Sinkhorn-Knopp optimal transport; hard assignment; marginal
and centroid update. Each cluster gives one *object* per view: the mean of its tokens in that view. Objects
empty in either view are discarded.

Axis letters used in shapes and einsum strings:

* ``B`` images in the batch, ``V = 2`` views, ``N`` patches per view, ``T = 2N`` tokens of both views
  (view 1 then view 2), ``U`` a second token axis (same size as ``T``), ``K`` clusters, ``D`` feature dim,
  ``n`` valid objects of the whole batch.

Every function is a pure tensor function (no state, no I/O). The memory of one call is O(B*T^2 + B*T*D): the
spatial term is a scatter-min over the cluster index of each token, never a ``(B, T, T, K)`` tensor.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CLUSTERING",
    "ClusteringResult",
    "ClusteringSettings",
    "cluster_marginals",
    "clustering_cost",
    "draw_seeds",
    "hard_assignment",
    "joint_space_clustering",
    "nearest_member_distance",
    "normalize_per_view",
    "pairwise_distances",
    "pool_objects",
    "select_valid",
    "sinkhorn_knopp",
    "spatial_cost",
    "update_centroids",
    "valid_objects",
]

CostNormalization = Literal["image", "batch"]
COST_NORMALIZATIONS: tuple[str, ...] = ("image", "batch")

# Value written into the transport plan where Sinkhorn produced NaN (authors' clustering code, `sinkhorn`).
SINKHORN_NAN_FILL = 1e-8
# Stand-in for the zero entries of `dist * A` before the min over members (authors' clustering code): it caps
# the nearest-member distance, so it is also the largest value `nearest_member_distance` returns.
ZERO_DISTANCE_FILL = 1e5
# Added to the hard cluster counts before they become the next column marginal (authors' `update_c`).
MARGINAL_COUNT_OFFSET = 0.01
NUM_VIEWS = 2  # two global views per image (paper Sec. 3.1)


@dataclass(frozen=True)
class ClusteringSettings:
    """The knobs of :func:`joint_space_clustering`; the defaults are the authors' (``main_cribo.py``).

    Attributes:
        sinkhorn_lambda: Sinkhorn sharpness (20 in CrIBo).
        sinkhorn_iterations: Sinkhorn rescaling rounds (5 in CrIBo).
        num_rounds: clustering rounds (authors' ``n_iter``, 5).
        update_marginals: update the cluster marginal from the counts (authors' ``update_c``, True).
        cost_normalization: "image" (paper, default) or "batch" (authors) min-max scaling of the cost.
    """

    sinkhorn_lambda: float = 20.0
    sinkhorn_iterations: int = 5
    num_rounds: int = 5
    update_marginals: bool = True
    cost_normalization: CostNormalization = "image"


DEFAULT_CLUSTERING = ClusteringSettings()


@dataclass
class ClusteringResult:
    """Output of :func:`joint_space_clustering`.

    Attributes:
        assignment: (B, T, K) hard assignment; each (view, cluster) column is divided by its number of tokens in
            that view, so a non-empty column sums to one over the view's N tokens and an empty one is all zero.
        cluster_of_token: (B, T) int64, the cluster of each token.
        cost: (B,) transport cost of the last Sinkhorn call.
    """

    assignment: Tensor
    cluster_of_token: Tensor
    cost: Tensor


def sinkhorn_knopp(
    cost: Tensor,
    row_marginal: Tensor,
    col_marginal: Tensor,
    sharpness: float = 20.0,
    num_iterations: int = 5,
) -> tuple[Tensor, Tensor]:
    """Entropic optimal transport by Sinkhorn-Knopp in the plain (not log) domain, as the authors run it.

    ``P = exp(-sharpness * cost)`` divided by its per-image total; then ``num_iterations`` times the rows are
    rescaled to ``row_marginal`` and then the columns to ``col_marginal``. NaN entries (whole rows underflowing
    to zero at large ``sharpness``, which spreads through the column sums) become ``1e-8``; with the default
    sharpness 20 and costs in [0, 1] nothing underflows.

    Args:
        cost: (B, T, K) cost matrix, normally in [0, 1].
        row_marginal: (B, T, 1) token marginal (``1/T`` in CrIBo).
        col_marginal: (B, 1, K) cluster marginal.
        sharpness: entropic sharpness lambda (20 in CrIBo).
        num_iterations: number of row/column rescaling rounds (5 in CrIBo; 0 allowed).

    Returns:
        plan: (B, T, K) transport plan.
        transport_cost: (B,) ``sum_{t,k} plan * cost``.
    """
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    plan = torch.exp(-sharpness * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    for _ in range(num_iterations):
        plan = plan * (row_marginal / plan.sum(dim=2, keepdim=True))
        plan = plan * (col_marginal / plan.sum(dim=1, keepdim=True))
    plan = torch.nan_to_num(plan, nan=SINKHORN_NAN_FILL)
    return plan, (plan * cost).sum(dim=(1, 2))


def pairwise_distances(positions: Tensor) -> Tensor:
    """Euclidean distances between all token positions of each image, with an exact-zero diagonal.

    Computed as ``sqrt((x_t - x_u)^2 + (y_t - y_u)^2)`` (bit-identical to ``sqrt(((p_t - p_u)**2).sum(-1))``),
    not with ``torch.cdist``, whose matrix-product path leaves non-zero diagonals that change the zero rules of
    :func:`nearest_member_distance`. Peak memory: three (B, T, T) tensors.

    Args:
        positions: (B, T, 2) positions (x, y) in original-image pixels.

    Returns:
        (B, T, T) distances; ``out[b, t, t] == 0`` exactly.
    """
    if positions.ndim != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (B, T, 2), got {tuple(positions.shape)}")
    x, y = positions.unbind(dim=-1)
    distances = (x.unsqueeze(2) - x.unsqueeze(1)).square_()
    distances += (y.unsqueeze(2) - y.unsqueeze(1)).square_()
    return distances.sqrt_()


def _masked_distances(distances: Tensor) -> Tensor:
    """(B, T, U) distances with every exact zero replaced by +inf (zeros never count as a nearest member)."""
    return distances.masked_fill(distances == 0, math.inf)


def nearest_member_distance(distances: Tensor, cluster_of_token: Tensor, num_clusters: int) -> Tensor:
    """Distance from each token to the nearest member of each cluster at a non-zero distance (authors' rules).

    For token t and cluster j, the authors look at ``dist[t, u] * A[u, j]`` over all u. If any value is non-zero,
    the zeros (non-members, and members at distance 0 such as t itself) are replaced by 1e5 before the min; if
    all are zero (j empty, t its only member, or all members exactly on t) the result is 0. This computes the
    same numbers with a scatter-min over the cluster index of u, in O(B*T^2) memory and without the K axis.

    Args:
        distances: (B, T, U) pairwise distances (:func:`pairwise_distances`).
        cluster_of_token: (B, U) int64 cluster of each token in ``[0, K)``, or -1 for a token in no cluster
            (the initial state, where only the K seed tokens are members).
        num_clusters: K.

    Returns:
        (B, T, K) nearest non-zero member distance, capped at 1e5; 0 where the cluster has no such member.
    """
    return _nearest_nonzero_member(_masked_distances(distances), cluster_of_token, num_clusters)


def _nearest_nonzero_member(masked: Tensor, cluster_of_token: Tensor, num_clusters: int) -> Tensor:
    """:func:`nearest_member_distance` from (B, T, U) distances whose zeros are already +inf."""
    batch, num_tokens, num_others = masked.shape
    # Tokens in no cluster go to an extra bin K that is dropped afterwards.
    bins = torch.where(cluster_of_token < 0, num_clusters, cluster_of_token)
    index = bins.unsqueeze(1).expand(batch, num_tokens, num_others)
    nearest = masked.new_full((batch, num_tokens, num_clusters + 1), math.inf)
    nearest.scatter_reduce_(2, index, masked, reduce="amin", include_self=True)
    nearest = nearest[..., :num_clusters]
    return torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest.clamp(max=ZERO_DISTANCE_FILL))


def spatial_cost(distances: Tensor, cluster_of_token: Tensor, num_clusters: int) -> Tensor:
    """Spatial term of the clustering cost: nearest-member distances, zeros filled, scaled to [0, 1] per image.

    The zeros of :func:`nearest_member_distance` are replaced by the image's mean over (T, K) *with those zeros
    included* (at the first round a seed's distance to its own cluster becomes that mean); then everything is
    divided by the image's maximum. An image whose distances are all zero (all positions identical) gives 0.

    Args:
        distances: (B, T, T) pairwise distances (:func:`pairwise_distances`).
        cluster_of_token: (B, T) int64 cluster of each token, -1 for a token in no cluster.
        num_clusters: K.

    Returns:
        (B, T, K) spatial cost in [0, 1].
    """
    return _fill_and_scale(nearest_member_distance(distances, cluster_of_token, num_clusters))


def _fill_and_scale(nearest: Tensor) -> Tensor:
    """(B, T, K) nearest-member distances -> spatial cost: zeros to the per-image mean, then / per-image max."""
    mean = nearest.mean(dim=(1, 2), keepdim=True)
    nearest = torch.where(nearest == 0, mean, nearest)
    largest = nearest.amax(dim=(1, 2), keepdim=True)
    return nearest / torch.where(largest > 0, largest, torch.ones_like(largest))


def clustering_cost(
    tokens: Tensor,
    centroids: Tensor,
    spatial: Tensor,
    pos_alpha: float,
    normalization: CostNormalization = "image",
) -> Tensor:
    """Joint semantic + spatial cost ``M = -<token, centroid> + pos_alpha * spatial``, min-max scaled to [0, 1].

    Args:
        tokens: (B, T, D) L2-normalised tokens.
        centroids: (B, K, D) L2-normalised centroids (zero rows for empty clusters).
        spatial: (B, T, K) spatial term (:func:`spatial_cost`).
        pos_alpha: weight alpha of the spatial term.
        normalization: "image" scales each image by its own min and max (paper); "batch" uses the min and max of
            the whole batch tensor, which couples the images of a batch (authors). A constant cost becomes 0.

    Returns:
        (B, T, K) cost in [0, 1].
    """
    if normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {normalization!r}")
    similarity = torch.bmm(tokens, centroids.transpose(1, 2))
    cost = -similarity + pos_alpha * spatial
    if normalization == "image":
        low = cost.amin(dim=(1, 2), keepdim=True)
        high = cost.amax(dim=(1, 2), keepdim=True)
    else:
        low, high = cost.min(), cost.max()
    span = high - low
    return (cost - low) / torch.where(span > 0, span, torch.ones_like(span))


def hard_assignment(plan: Tensor) -> Tensor:
    """Cluster of each token: the column of its row maximum (the first one on an exact tie).

    Args:
        plan: (B, T, K) transport plan.

    Returns:
        (B, T) int64 cluster indices.
    """
    return plan.argmax(dim=-1)


def cluster_marginals(cluster_of_token: Tensor, num_clusters: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Next column marginal: hard counts + 0.01, normalised per image (an empty cluster keeps a tiny mass).

    Args:
        cluster_of_token: (B, T) int64 cluster indices in ``[0, K)``.
        num_clusters: K.
        dtype: floating dtype of the result.

    Returns:
        (B, 1, K) marginal summing to one per image.
    """
    counts = F.one_hot(cluster_of_token, num_clusters).to(dtype).sum(dim=1, keepdim=True)
    counts = counts + MARGINAL_COUNT_OFFSET
    return counts / counts.sum(dim=-1, keepdim=True)


def update_centroids(tokens: Tensor, cluster_of_token: Tensor, num_clusters: int) -> Tensor:
    """Centroids as the L2-normalised sum of their member tokens (an empty cluster gives a zero vector).

    Args:
        tokens: (B, T, D) L2-normalised tokens.
        cluster_of_token: (B, T) int64 cluster indices in ``[0, K)``.
        num_clusters: K.

    Returns:
        (B, K, D) centroids.
    """
    one_hot = F.one_hot(cluster_of_token, num_clusters).to(tokens.dtype)
    return F.normalize(torch.bmm(one_hot.transpose(1, 2), tokens), dim=-1)


def normalize_per_view(cluster_of_token: Tensor, num_clusters: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot assignment whose columns are divided by their count in each view (empty columns stay 0).

    Args:
        cluster_of_token: (B, T) int64 cluster indices in ``[0, K)``, T = 2N (view 1 then view 2).
        num_clusters: K.
        dtype: floating dtype of the result.

    Returns:
        (B, T, K) assignment; each non-empty (view, cluster) column sums to one over that view's tokens.
    """
    batch, num_tokens = cluster_of_token.shape
    one_hot = F.one_hot(cluster_of_token, num_clusters).to(dtype)
    per_view = one_hot.view(batch, NUM_VIEWS, num_tokens // NUM_VIEWS, num_clusters)
    counts = per_view.sum(dim=2, keepdim=True)
    return (per_view / counts.clamp(min=1)).view(batch, num_tokens, num_clusters)


def draw_seeds(
    batch_size: int,
    num_tokens: int,
    num_clusters: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """K distinct seed tokens per image, uniformly without replacement (the authors' multinomial draw).

    With a generator seeded like the authors' global one (``torch.manual_seed(s)`` before their call), this
    draws the very same indices on CPU.

    Args:
        batch_size: B.
        num_tokens: T.
        num_clusters: K (at most T).
        generator: random generator (the global one when None); must live on ``device``.
        device: device of the result.

    Returns:
        (B, K) int64 token indices, distinct within each row.
    """
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(f"num_clusters must be in [1, {num_tokens}] (the token count T), got {num_clusters}")
    weights = torch.ones(batch_size, num_tokens, device=device)
    return torch.multinomial(weights, num_clusters, replacement=False, generator=generator)


def _check_inputs(tokens: Tensor, positions: Tensor, num_clusters: int, cost_normalization: str) -> None:
    """Raise ValueError on shapes, cluster counts or options that :func:`joint_space_clustering` cannot take."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, T, D), got {tuple(tokens.shape)}")
    batch, num_tokens, _ = tokens.shape
    if positions.shape != (batch, num_tokens, 2):
        raise ValueError(f"positions must have shape {(batch, num_tokens, 2)}, got {tuple(positions.shape)}")
    if num_tokens % NUM_VIEWS != 0:
        raise ValueError(f"tokens must hold T = 2N tokens (view 1 then view 2); got an odd T = {num_tokens}")
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(
            f"num_clusters must be in [1, T] with T = {num_tokens} tokens (both views), got {num_clusters}"
        )
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")


def _initial_members(init_index: Tensor, batch: int, num_tokens: int, num_clusters: int) -> Tensor:
    """(B, T) int64 start state from (B, K) seed indices: seed j of each image is in cluster j, others in none."""
    if init_index.shape != (batch, num_clusters) or init_index.dtype != torch.int64:
        raise ValueError(
            f"init_index must be an int64 tensor of shape {(batch, num_clusters)}, "
            f"got {init_index.dtype} {tuple(init_index.shape)}"
        )
    if bool(((init_index < 0) | (init_index >= num_tokens)).any()):
        raise ValueError(f"init_index values must be token indices in [0, {num_tokens})")
    ordered = init_index.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("init_index must hold num_clusters distinct token indices per image")
    members = init_index.new_full((batch, num_tokens), -1)
    clusters = torch.arange(num_clusters, device=init_index.device).expand(batch, num_clusters)
    return members.scatter_(1, init_index, clusters)


def joint_space_clustering(
    tokens: Tensor,
    positions: Tensor,
    num_clusters: int,
    pos_alpha: float,
    settings: ClusteringSettings = DEFAULT_CLUSTERING,
    *,
    init_index: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ClusteringResult:
    """Cluster the tokens of both views of each image jointly in feature and image space (paper Sec. 3.2).

    Starting from K seed tokens per image (each cluster = its seed), each of ``num_rounds`` rounds builds the
    cost :func:`clustering_cost` from the previous assignment (:func:`spatial_cost`), runs
    :func:`sinkhorn_knopp` with token marginal ``1/T`` and the current cluster marginal (``1/K`` at first),
    takes the hard assignment, updates the marginal (counts + 0.01, normalised) and the centroids. The
    rounds, Sinkhorn parameters and cost scaling come from ``settings`` (:class:`ClusteringSettings`).

    Edge cases:

    * ``num_clusters`` greater than the token count T raises ValueError (the authors crash); K == T works.
    * All-identical tokens and/or positions: a constant term is scaled to 0 instead of 0/0, so there is no NaN;
      identical plan rows give every token the same cluster (ties go to the lowest cluster index).
    * A cluster present in one view only is kept here (its other-view column is all zero) and dropped by
      :func:`valid_objects`.
    * A batch of one image works (the authors' ``squeeze`` crashes).
    * float16/bfloat16 inputs are computed and returned in float32 (float64 stays float64), with autocast
      switched off inside.
    * Exact ties in a plan row, which the authors' ``P == rowmax`` would turn into several ones, go to the
      first cluster.

    Args:
        tokens: (B, T, D) tokens, T = 2N (view 1 then view 2); L2-normalised inside.
        positions: (B, T, 2) patch-centre positions (x, y) in original-image pixels.
        num_clusters: K, at most T.
        pos_alpha: weight alpha of the spatial term.
        settings: rounds, Sinkhorn parameters and cost scaling.
        init_index: (B, K) int64 distinct seed-token indices per image; drawn with ``generator`` when None.
        generator: random generator for the seeds (the global one when None); the seeds are drawn on its
            device and moved to the tokens' device.

    Returns:
        :class:`ClusteringResult` with the per-view normalised assignment, the cluster of each token and the
        last Sinkhorn cost.
    """
    _check_inputs(tokens, positions, num_clusters, settings.cost_normalization)
    if settings.num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {settings.num_rounds}")
    batch, num_tokens, _ = tokens.shape
    if init_index is None:
        # Seeds are drawn where the generator lives, so a CPU generator gives the same seeds on any device.
        where = generator.device if generator is not None else tokens.device
        init_index = draw_seeds(batch, num_tokens, num_clusters, generator=generator, device=where)
    init_index = init_index.to(tokens.device)
    with _full_precision(tokens.device):
        features, masked, members, centroids = _initial_state(tokens, positions, init_index)
        row_marginal = features.new_ones(batch, num_tokens, 1) / num_tokens
        col_marginal = features.new_ones(batch, 1, num_clusters) / num_clusters
        for _ in range(settings.num_rounds):
            spatial = _fill_and_scale(_nearest_nonzero_member(masked, members, num_clusters))
            cost = clustering_cost(features, centroids, spatial, pos_alpha, settings.cost_normalization)
            plan, transport_cost = sinkhorn_knopp(
                cost, row_marginal, col_marginal, settings.sinkhorn_lambda, settings.sinkhorn_iterations
            )
            members = hard_assignment(plan)
            if settings.update_marginals:
                col_marginal = cluster_marginals(members, num_clusters, features.dtype)
            centroids = update_centroids(features, members, num_clusters)
        assignment = normalize_per_view(members, num_clusters, features.dtype)
    return ClusteringResult(assignment=assignment, cluster_of_token=members, cost=transport_cost)


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Switch autocast off on ``device`` (where it exists) so the clustering runs in the inputs' float dtype."""
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available is None or is_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _initial_state(tokens: Tensor, positions: Tensor, init_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised float features (B, T, D), masked distances (B, T, T), start members (B, T), seeds (B, K, D).

    Half-precision inputs are upcast to float32. Distances do not change between rounds: they are computed once
    and their zeros set to +inf in place, which saves a (B, T, T) copy per round.
    """
    batch, num_tokens, dim = tokens.shape
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    members = _initial_members(init_index, batch, num_tokens, init_index.shape[1])
    features = F.normalize(tokens.to(dtype), dim=-1)
    centroids = torch.gather(features, 1, init_index.unsqueeze(-1).expand(-1, -1, dim))
    masked = pairwise_distances(positions.to(dtype))
    masked.masked_fill_(masked == 0, math.inf)
    return features, masked, members, centroids


def pool_objects(tokens: Tensor, assignment: Tensor) -> Tensor:
    """Per-view object representations: the assignment-weighted sums (means, for a per-view normalised one).

    Args:
        tokens: (B, T, D) tokens, T = 2N (view 1 then view 2); e.g. the teacher's un-normalised last tokens,
            or the student's tokens with the teacher's assignment.
        assignment: (B, T, K) per-view normalised assignment (:attr:`ClusteringResult.assignment`).

    Returns:
        (B, V=2, K, D) objects; an object empty in a view is a zero vector there.
    """
    if tokens.ndim != 3 or assignment.ndim != 3 or tokens.shape[:2] != assignment.shape[:2]:
        raise ValueError(
            f"tokens (B, T, D) and assignment (B, T, K) must share B and T, got {tuple(tokens.shape)} "
            f"and {tuple(assignment.shape)}"
        )
    batch, num_tokens, dim = tokens.shape
    if num_tokens % NUM_VIEWS != 0:
        raise ValueError(f"tokens must hold T = 2N tokens (view 1 then view 2); got an odd T = {num_tokens}")
    per_view_tokens = tokens.reshape(batch, NUM_VIEWS, num_tokens // NUM_VIEWS, dim)
    per_view_assignment = assignment.reshape(batch, NUM_VIEWS, num_tokens // NUM_VIEWS, assignment.shape[-1])
    dtype = torch.promote_types(tokens.dtype, assignment.dtype)
    return torch.matmul(per_view_assignment.transpose(-1, -2).to(dtype), per_view_tokens.to(dtype))


def valid_objects(assignment: Tensor) -> Tensor:
    """Clusters that have at least one token in both views.

    Args:
        assignment: (B, T, K) assignment, T = 2N (view 1 then view 2).

    Returns:
        (B, K) bool mask.
    """
    batch, num_tokens, num_clusters = assignment.shape
    if num_tokens % NUM_VIEWS != 0:
        raise ValueError(f"assignment must hold T = 2N tokens (view 1 then view 2); got an odd T = {num_tokens}")
    per_view = assignment.reshape(batch, NUM_VIEWS, num_tokens // NUM_VIEWS, num_clusters)
    return (per_view != 0).any(dim=2).all(dim=1)


def select_valid(objects: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the valid objects, image-major then cluster order.

    Args:
        objects: (B, V=2, K, D) per-view objects (:func:`pool_objects`).
        valid: (B, K) bool mask (:func:`valid_objects`).

    Returns:
        selected: (n, V=2, D) objects; ``selected[:, v]`` is view v, rows aligned across views.
        objects_per_image: (B,) int64 number of valid objects of each image (sums to n).
    """
    if objects.ndim != 4 or valid.shape != (objects.shape[0], objects.shape[2]) or valid.dtype != torch.bool:
        raise ValueError(
            f"objects must be (B, V, K, D) and valid a bool (B, K) mask, got {tuple(objects.shape)} "
            f"and {valid.dtype} {tuple(valid.shape)}"
        )
    return objects.transpose(1, 2)[valid], valid.sum(dim=1, dtype=torch.int64)
