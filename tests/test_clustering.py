"""Tests of cribo.clustering: parity with the authors' fixtures, invariants and edge cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import load_fixture
from cribo.clustering import (
    ClusteringResult,
    ClusteringSettings,
    cluster_marginals,
    clustering_cost,
    draw_seeds,
    hard_assignment,
    joint_space_clustering,
    nearest_member_distance,
    normalize_per_view,
    pairwise_distances,
    pool_objects,
    select_valid,
    sinkhorn_knopp,
    spatial_cost,
    update_centroids,
    valid_objects,
)

ATOL = 1e-5
RTOL = 1e-5


def assert_close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------------
# Helpers: the README's dense formula (the authors' (B, T, U, K) computation) and fixture layouts.
# ----------------------------------------------------------------------------------------------------------------


def members_to_one_hot(members: Tensor, num_clusters: int) -> Tensor:
    """(B, U) cluster indices with -1 for "no cluster" -> (B, U, K) 0/1 previous assignment A."""
    bins = torch.where(members < 0, num_clusters, members)
    return F.one_hot(bins, num_clusters + 1)[..., :num_clusters].float()


def dense_nearest_member(distances: Tensor, previous: Tensor) -> Tensor:
    """README rule, literally: min over u of dist[t, u] * A[u, j], zeros -> 1e5 if any non-zero, else 0."""
    values = distances.unsqueeze(-1) * previous.unsqueeze(1)  # (B, T, U, K)
    any_nonzero = (values != 0).any(dim=2)
    filled = torch.where(values == 0, torch.full_like(values, 1e5), values).amin(dim=2)
    return torch.where(any_nonzero, filled, torch.zeros_like(filled))


def dense_spatial_cost(nearest: Tensor) -> Tensor:
    """README: zeros -> per-image mean (zeros included), then divide by the per-image maximum."""
    mean = nearest.mean(dim=(1, 2), keepdim=True)
    nearest = torch.where(nearest == 0, mean, nearest)
    return nearest / nearest.amax(dim=(1, 2), keepdim=True)


def seed_members(init_index: Tensor, num_tokens: int) -> Tensor:
    """(B, K) seed indices -> (B, T) start state: seed j in cluster j, every other token in no cluster (-1)."""
    members = torch.full((init_index.shape[0], num_tokens), -1, dtype=torch.int64)
    clusters = torch.arange(init_index.shape[1]).expand_as(init_index)
    return members.scatter(1, init_index, clusters)


def joint_layout(per_view_rows: Tensor, batch: int) -> Tensor:
    """(2b, 1+N, d) rows (view 1 of all images, then view 2) -> (b, 2N, d) [view-1 patches; view-2 patches]."""
    patches = per_view_rows[:, 1:]
    return patches.unflatten(0, (2, batch)).transpose(0, 1).flatten(1, 2)


def joint_positions(positions: Tensor) -> Tensor:
    """(2, b, 2, N) per-view positions -> (b, 2N, 2)."""
    return positions.permute(1, 0, 3, 2).flatten(1, 2)


def random_inputs(
    batch: int, num_tokens: int, dim: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, num_tokens, dim, generator=generator)
    positions = torch.rand(batch, num_tokens, 2, generator=generator) * 300.0
    return tokens.to(dtype), positions


@pytest.fixture(scope="module")
def sinkhorn_cases(reference: Path) -> list[dict[str, Any]]:
    return load_fixture(reference, "sinkhorn.pt")["cases"]


@pytest.fixture(scope="module")
def assignment_cases(reference: Path) -> list[dict[str, Any]]:
    return load_fixture(reference, "assignments.pt")["cases"]


@pytest.fixture(scope="module")
def centroid_cases(reference: Path) -> list[dict[str, Any]]:
    return load_fixture(reference, "teacher_centroids.pt")["cases"]


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------------------


def test_sinkhorn_matches_reference(sinkhorn_cases: list[dict[str, Any]]) -> None:
    assert sinkhorn_cases
    for case in sinkhorn_cases:
        plan, cost = sinkhorn_knopp(case["M"], case["r"], case["c"], case["lambda_"], case["iterations"])
        assert_close(plan, case["P"])
        assert_close(cost, case["cost"])
        assert bool((plan == 1e-8).any()) == case["any_nan_replaced"]
        assert not torch.isnan(plan).any()


def test_sinkhorn_marginals() -> None:
    generator = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 40, 6, generator=generator)
    rows = torch.full((3, 40, 1), 1 / 40)
    cols = torch.rand(3, 1, 6, generator=generator) + 0.1
    cols = cols / cols.sum(-1, keepdim=True)
    plan, transport = sinkhorn_knopp(cost, rows, cols, 20.0, 50)
    assert_close(plan.sum(1, keepdim=True), cols)
    torch.testing.assert_close(plan.sum(2, keepdim=True), rows, atol=1e-4, rtol=1e-3)
    assert_close(transport, (plan * cost).sum((1, 2)))
    with pytest.raises(ValueError, match="num_iterations"):
        sinkhorn_knopp(cost, rows, cols, 20.0, -1)


# ----------------------------------------------------------------------------------------------------------------
# Distances and the spatial term
# ----------------------------------------------------------------------------------------------------------------


def test_pairwise_distances_exact(assignment_cases: list[dict[str, Any]]) -> None:
    for case in assignment_cases:
        positions = case["positions"]
        distances = pairwise_distances(positions)
        expected = ((positions.unsqueeze(2) - positions.unsqueeze(1)) ** 2).sum(-1).sqrt()
        assert torch.equal(distances, expected)
        assert torch.equal(torch.diagonal(distances, dim1=1, dim2=2), torch.zeros(positions.shape[:2]))
        assert torch.equal(distances, distances.transpose(1, 2))
    with pytest.raises(ValueError, match="positions"):
        pairwise_distances(torch.zeros(2, 5, 3))


def test_nearest_member_distance_equals_dense_formula(assignment_cases: list[dict[str, Any]]) -> None:
    """The scatter-min equals the authors' (B, T, U, K) formula bit for bit, at every round of every case."""
    for case in assignment_cases:
        distances = pairwise_distances(case["positions"])
        num_tokens, num_clusters = case["tokens"].shape[1], case["k"]
        states = [seed_members(case["index"].argmax(-1), num_tokens)]
        states += [hard_assignment(plan) for plan in case["iter_P"]]
        for members in states:
            previous = members_to_one_hot(members, num_clusters)
            dense = dense_nearest_member(distances, previous)
            assert torch.equal(nearest_member_distance(distances, members, num_clusters), dense)
            assert torch.equal(spatial_cost(distances, members, num_clusters), dense_spatial_cost(dense))


def test_nearest_member_distance_zero_rules() -> None:
    """Members at distance zero (duplicated positions) and clusters with no other member follow the README."""
    generator = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 4, (2, 30, 2), generator=generator).float()  # many exact duplicates
    distances = pairwise_distances(positions)
    for num_clusters in (1, 3, 7):
        members = torch.randint(-1, num_clusters, (2, 30), generator=generator)
        expected = dense_nearest_member(distances, members_to_one_hot(members, num_clusters))
        assert torch.equal(nearest_member_distance(distances, members, num_clusters), expected)
    # Hand example: tokens 0 and 1 share a position; cluster 0 = {0, 1}, cluster 1 = {2}, cluster 2 empty.
    positions = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]])
    nearest = nearest_member_distance(pairwise_distances(positions), torch.tensor([[0, 0, 1]]), 3)
    assert torch.equal(nearest, torch.tensor([[[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]]))


def test_spatial_cost_identical_positions_is_zero() -> None:
    distances = pairwise_distances(torch.ones(2, 8, 2))
    cost = spatial_cost(distances, torch.arange(8).remainder(3).expand(2, 8), 3)
    assert torch.equal(cost, torch.zeros(2, 8, 3))


# ----------------------------------------------------------------------------------------------------------------
# Parity with compute_assignments (assignments.pt), round by round and end to end
# ----------------------------------------------------------------------------------------------------------------


def test_first_round_cost_matches_reference(assignment_cases: list[dict[str, Any]]) -> None:
    for case in assignment_cases:
        features = F.normalize(case["tokens"], dim=-1)
        seeds = case["index"].argmax(-1)
        centroids = torch.gather(features, 1, seeds.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        spatial = spatial_cost(pairwise_distances(case["positions"]), seeds_to_members(case), case["k"])
        cost = clustering_cost(features, centroids, spatial, case["pos_alpha"], "batch")
        assert_close(cost, case["iter_M"][0])
        assert_close(case["iter_c"][0], torch.full_like(case["iter_c"][0], 1 / case["k"]))


def seeds_to_members(case: dict[str, Any]) -> Tensor:
    return seed_members(case["index"].argmax(-1), case["tokens"].shape[1])


def test_every_round_matches_reference(assignment_cases: list[dict[str, Any]]) -> None:
    """Replay each round from the previous round's plan: cost M, marginal c, plan P and cost."""
    for case in assignment_cases:
        features = F.normalize(case["tokens"], dim=-1)
        distances = pairwise_distances(case["positions"])
        batch, num_tokens, _ = features.shape
        num_clusters = case["k"]
        rows = torch.ones(batch, num_tokens, 1) / num_tokens
        for round_index in range(case["n_iter"]):
            cost_matrix = case["iter_M"][round_index]
            plan, cost = sinkhorn_knopp(
                cost_matrix, rows, case["iter_c"][round_index], case["sinkhorn_lambda"], case["sinkhorn_iterations"]
            )
            assert_close(plan, case["iter_P"][round_index])
            assert_close(cost, case["iter_cost"][round_index])
            if round_index == 0:
                continue
            previous = hard_assignment(case["iter_P"][round_index - 1])
            assert_close(cluster_marginals(previous, num_clusters), case["iter_c"][round_index])
            centroids = update_centroids(features, previous, num_clusters)
            spatial = spatial_cost(distances, previous, num_clusters)
            assert_close(clustering_cost(features, centroids, spatial, case["pos_alpha"], "batch"), cost_matrix)


def test_joint_space_clustering_matches_reference(assignment_cases: list[dict[str, Any]]) -> None:
    for case in assignment_cases:
        result = joint_space_clustering(
            case["tokens"],
            case["positions"],
            case["k"],
            case["pos_alpha"],
            ClusteringSettings(
                sinkhorn_lambda=case["sinkhorn_lambda"],
                sinkhorn_iterations=case["sinkhorn_iterations"],
                num_rounds=case["n_iter"],
                update_marginals=case["update_c"],
                cost_normalization="batch",
            ),
            init_index=case["index"].argmax(-1),
        )
        assert isinstance(result, ClusteringResult)
        assert torch.equal(result.cluster_of_token, case["cluster_of_token"])
        assert_close(result.assignment, case["assignment"])
        assert_close(result.cost, case["cost"])


def test_draw_seeds_replays_authors_draw(
    assignment_cases: list[dict[str, Any]], centroid_cases: list[dict[str, Any]]
) -> None:
    """A generator seeded like the authors' global RNG draws the fixtures' seed tokens."""
    for case in assignment_cases + centroid_cases:
        index = case["index"] if "index" in case else case["init_index"]
        batch, num_clusters, num_tokens = index.shape
        generator = torch.Generator().manual_seed(case["torch_seed_before_call"])
        seeds = draw_seeds(batch, num_tokens, num_clusters, generator=generator)
        assert torch.equal(seeds, index.argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# Parity with compute_teacher_centroids (teacher_centroids.pt)
# ----------------------------------------------------------------------------------------------------------------


def test_teacher_centroids_match_reference(centroid_cases: list[dict[str, Any]]) -> None:
    for case in centroid_cases:
        batch = case["positions"].shape[1]
        num_clusters = case["n_tokens"]
        tokens = joint_layout(case["tokens"], batch)
        positions = joint_positions(case["positions"])
        result = joint_space_clustering(
            tokens,
            positions,
            num_clusters,
            case["pos_alpha_used"],
            ClusteringSettings(
                sinkhorn_lambda=case["sinkhorn_lambda"],
                sinkhorn_iterations=case["sinkhorn_iterations"],
                num_rounds=case["n_iter"],
                update_marginals=case["update_c"],
                cost_normalization="batch",
            ),
            init_index=case["init_index"].argmax(-1),
        )
        assert_close(result.assignment, case["raw_assignment"])
        assert_close(result.cost, case["raw_cost"])
        num_patches = tokens.shape[1] // 2
        per_view = result.assignment.view(batch, 2, num_patches, num_clusters).transpose(0, 1).unsqueeze(2)
        assert_close(per_view, case["assignments"])

        valid = valid_objects(result.assignment)
        assert torch.equal(valid.flatten(), case["valid_centroids"])
        objects = pool_objects(joint_layout(case["last_tokens"], batch), result.assignment)
        selected, objects_per_image = select_valid(objects, valid)
        assert_close(selected[:, 0], case["centroids_v1"])
        assert_close(selected[:, 1], case["centroids_v2"])
        assert torch.equal(objects_per_image, case["centroids_per_view"])
        assert objects_per_image.float().mean().item() == pytest.approx(case["region_count"])


def test_teacher_centroids_first_round_cost(centroid_cases: list[dict[str, Any]]) -> None:
    for case in centroid_cases:
        batch = case["positions"].shape[1]
        features = F.normalize(joint_layout(case["tokens"], batch), dim=-1)
        seeds = case["init_index"].argmax(-1)
        centroids = torch.gather(features, 1, seeds.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        members = seed_members(seeds, features.shape[1])
        spatial = spatial_cost(pairwise_distances(joint_positions(case["positions"])), members, case["n_tokens"])
        cost = clustering_cost(features, centroids, spatial, case["pos_alpha_used"], "batch")
        assert_close(cost, case["iter_M"][0])


# ----------------------------------------------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["image", "batch"])
def test_assignment_columns_and_valid_objects(normalization: Literal["image", "batch"]) -> None:
    tokens, positions = random_inputs(4, 64, 12, seed=2)
    result = joint_space_clustering(
        tokens,
        positions,
        10,
        1.0,
        ClusteringSettings(cost_normalization=normalization),
        generator=torch.Generator().manual_seed(3),
    )
    batch, num_tokens, num_clusters = result.assignment.shape
    assert result.assignment.dtype == torch.float32 and result.cluster_of_token.dtype == torch.int64
    assert result.cost.shape == (batch,)
    per_view = result.assignment.view(batch, 2, num_tokens // 2, num_clusters)
    members = F.one_hot(result.cluster_of_token, num_clusters).view(batch, 2, num_tokens // 2, num_clusters)
    non_empty = members.sum(2) > 0  # (B, V, K)
    sums = per_view.sum(2)
    assert_close(sums[non_empty], torch.ones(int(non_empty.sum())))
    assert torch.equal(sums[~non_empty], torch.zeros(int((~non_empty).sum())))
    assert torch.equal((per_view > 0), members.bool())
    valid = valid_objects(result.assignment)
    assert torch.equal(valid, non_empty.all(1))
    objects = pool_objects(tokens, result.assignment)
    selected, objects_per_image = select_valid(objects, valid)
    assert selected.shape == (int(valid.sum()), 2, tokens.shape[-1])
    assert torch.equal(objects_per_image, valid.sum(1))
    # Image-major then cluster order, and each object is the per-view mean of its tokens.
    rows = [(b, k) for b in range(batch) for k in range(num_clusters) if valid[b, k]]
    for row, (b, k) in enumerate(rows):
        for view in range(2):
            view_tokens = tokens[b].view(2, -1, tokens.shape[-1])[view]
            view_members = members[b, view, :, k].bool()
            assert_close(selected[row, view], view_tokens[view_members].mean(0))


def test_object_in_one_view_is_dropped() -> None:
    """A cluster with tokens in view 1 only is not a valid object; its pooled view-2 vector is zero."""
    cluster_of_token = torch.tensor([[0, 1, 2, 2, 0, 1, 1, 0]])  # N = 4; cluster 2 only in view 1
    assignment = normalize_per_view(cluster_of_token, 4)
    valid = valid_objects(assignment)
    assert torch.equal(valid, torch.tensor([[True, True, False, False]]))
    tokens = torch.arange(8 * 3, dtype=torch.float32).view(1, 8, 3)
    objects = pool_objects(tokens, assignment)
    assert torch.equal(objects[0, 1, 2], torch.zeros(3))
    assert_close(objects[0, 0, 2], tokens[0, 2:4].mean(0))
    selected, objects_per_image = select_valid(objects, valid)
    assert selected.shape == (2, 2, 3)
    assert torch.equal(objects_per_image, torch.tensor([2]))
    assert_close(selected[1, 1], tokens[0, 5:7].mean(0))


def test_image_normalization_is_per_image_and_batch_is_not() -> None:
    tokens, positions = random_inputs(3, 48, 8, seed=4)
    positions[1] *= 5.0  # different images, different cost ranges
    tokens[2] *= 3.0
    seeds = draw_seeds(3, 48, 6, generator=torch.Generator().manual_seed(5))
    together = joint_space_clustering(tokens, positions, 6, 1.0, init_index=seeds)
    for image in range(3):
        alone = joint_space_clustering(
            tokens[image : image + 1], positions[image : image + 1], 6, 1.0, init_index=seeds[image : image + 1]
        )
        assert torch.equal(alone.cluster_of_token[0], together.cluster_of_token[image])
        assert_close(alone.assignment[0], together.assignment[image])
        assert_close(alone.cost[0], together.cost[image])
    # "batch" min-max couples the images: the first-round cost of one image depends on the others.
    features = F.normalize(tokens, dim=-1)
    centroids = torch.gather(features, 1, seeds.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    spatial = spatial_cost(pairwise_distances(positions), seed_members(seeds, 48), 6)
    batch_cost = clustering_cost(features, centroids, spatial, 1.0, "batch")
    image_cost = clustering_cost(features, centroids, spatial, 1.0, "image")
    single_cost = [
        clustering_cost(features[i : i + 1], centroids[i : i + 1], spatial[i : i + 1], 1.0, "batch") for i in range(3)
    ]
    assert any(not torch.allclose(single_cost[i][0], batch_cost[i]) for i in range(3))
    for image in range(3):
        assert torch.equal(single_cost[image][0], image_cost[image])
        assert image_cost[image].min() == 0 and image_cost[image].max() == 1


def test_draw_seeds_distinct_and_reproducible() -> None:
    for num_tokens, num_clusters in ((10, 10), (50, 7), (392, 32)):
        seeds = draw_seeds(5, num_tokens, num_clusters, generator=torch.Generator().manual_seed(6))
        assert seeds.shape == (5, num_clusters) and seeds.dtype == torch.int64
        assert all(len(set(row.tolist())) == num_clusters for row in seeds)
        assert bool(((seeds >= 0) & (seeds < num_tokens)).all())
        again = draw_seeds(5, num_tokens, num_clusters, generator=torch.Generator().manual_seed(6))
        assert torch.equal(seeds, again)
    tokens, positions = random_inputs(2, 20, 4, seed=7)
    first = joint_space_clustering(tokens, positions, 5, 1.0, generator=torch.Generator().manual_seed(8))
    second = joint_space_clustering(tokens, positions, 5, 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.cluster_of_token, second.cluster_of_token)


def test_update_marginals_flag() -> None:
    tokens, positions = random_inputs(2, 30, 6, seed=9)
    seeds = draw_seeds(2, 30, 4, generator=torch.Generator().manual_seed(10))
    result = joint_space_clustering(
        tokens, positions, 4, 0.5, ClusteringSettings(update_marginals=False, num_rounds=1), init_index=seeds
    )
    features = F.normalize(tokens, dim=-1)
    centroids = torch.gather(features, 1, seeds.unsqueeze(-1).expand(-1, -1, 6))
    spatial = spatial_cost(pairwise_distances(positions), seed_members(seeds, 30), 4)
    cost = clustering_cost(features, centroids, spatial, 0.5, "image")
    plan, transport = sinkhorn_knopp(cost, torch.full((2, 30, 1), 1 / 30), torch.full((2, 1, 4), 0.25))
    assert torch.equal(result.cluster_of_token, hard_assignment(plan))
    assert_close(result.cost, transport)


# ----------------------------------------------------------------------------------------------------------------
# Edge cases and validation
# ----------------------------------------------------------------------------------------------------------------


def test_more_clusters_than_tokens_raises() -> None:
    tokens, positions = random_inputs(2, 8, 4, seed=11)
    with pytest.raises(ValueError, match=r"num_clusters.*T = 8"):
        joint_space_clustering(tokens, positions, 9, 1.0)
    with pytest.raises(ValueError, match="num_clusters"):
        draw_seeds(2, 8, 9)
    result = joint_space_clustering(tokens, positions, 8, 1.0)  # K == T works
    assert result.assignment.shape == (2, 8, 8)


def test_identical_tokens_and_positions_give_one_cluster() -> None:
    tokens = torch.ones(2, 16, 5)
    positions = torch.full((2, 16, 2), 7.0)
    for pos_alpha in (0.0, 1.0):
        result = joint_space_clustering(tokens, positions, 4, pos_alpha, generator=torch.Generator().manual_seed(12))
        assert torch.isfinite(result.assignment).all() and torch.isfinite(result.cost).all()
        # All rows of the plan are equal, so every token lands in the same (first) cluster.
        assert torch.equal(result.cluster_of_token, torch.zeros(2, 16, dtype=torch.int64))
        assert torch.equal(valid_objects(result.assignment).sum(1), torch.ones(2, dtype=torch.int64))


def test_identical_tokens_random_positions_no_nan() -> None:
    _, positions = random_inputs(3, 24, 5, seed=13)
    tokens = torch.ones(3, 24, 5)
    result = joint_space_clustering(tokens, positions, 6, 1.0, ClusteringSettings(cost_normalization="batch"))
    assert torch.isfinite(result.assignment).all() and torch.isfinite(result.cost).all()


def test_batch_of_one() -> None:
    tokens, positions = random_inputs(1, 36, 8, seed=14)
    for normalization in ("image", "batch"):
        result = joint_space_clustering(tokens, positions, 5, 1.0, ClusteringSettings(cost_normalization=normalization))
        assert result.assignment.shape == (1, 36, 5) and result.cluster_of_token.shape == (1, 36)
        selected, objects_per_image = select_valid(
            pool_objects(tokens, result.assignment), valid_objects(result.assignment)
        )
        assert selected.shape[0] == int(objects_per_image.sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype: torch.dtype) -> None:
    tokens, positions = random_inputs(2, 40, 8, seed=15, dtype=dtype)
    seeds = draw_seeds(2, 40, 5, generator=torch.Generator().manual_seed(16))
    low = joint_space_clustering(tokens, positions.to(dtype), 5, 1.0, init_index=seeds)
    full = joint_space_clustering(tokens.float(), positions.to(dtype).float(), 5, 1.0, init_index=seeds)
    assert low.assignment.dtype == torch.float32 and low.cost.dtype == torch.float32
    assert torch.equal(low.cluster_of_token, full.cluster_of_token)
    assert torch.equal(low.assignment, full.assignment)
    assert torch.equal(low.cost, full.cost)


def test_autocast_is_switched_off_inside() -> None:
    tokens, positions = random_inputs(2, 40, 8, seed=18)
    seeds = draw_seeds(2, 40, 5, generator=torch.Generator().manual_seed(19))
    expected = joint_space_clustering(tokens, positions, 5, 1.0, init_index=seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = joint_space_clustering(tokens, positions, 5, 1.0, init_index=seeds)
    assert result.assignment.dtype == torch.float32
    assert torch.equal(result.cluster_of_token, expected.cluster_of_token)
    assert torch.equal(result.cost, expected.cost)


def test_invalid_arguments_raise() -> None:
    tokens, positions = random_inputs(2, 10, 4, seed=17)
    unknown: Any = "pixel"
    with pytest.raises(ValueError, match="cost_normalization"):
        joint_space_clustering(tokens, positions, 3, 1.0, ClusteringSettings(cost_normalization=unknown))
    with pytest.raises(ValueError, match="odd T"):
        joint_space_clustering(tokens[:, :9], positions[:, :9], 3, 1.0)
    with pytest.raises(ValueError, match="positions"):
        joint_space_clustering(tokens, positions[:, :8], 3, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        joint_space_clustering(tokens[0], positions, 3, 1.0)
    with pytest.raises(ValueError, match="num_rounds"):
        joint_space_clustering(tokens, positions, 3, 1.0, ClusteringSettings(num_rounds=0))
    with pytest.raises(ValueError, match="distinct"):
        joint_space_clustering(tokens, positions, 3, 1.0, init_index=torch.tensor([[0, 1, 1], [2, 3, 4]]))
    with pytest.raises(ValueError, match="init_index"):
        joint_space_clustering(tokens, positions, 3, 1.0, init_index=torch.tensor([[0, 1, 10], [2, 3, 4]]))
    with pytest.raises(ValueError, match="init_index"):
        joint_space_clustering(tokens, positions, 3, 1.0, init_index=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="cost_normalization"):
        clustering_cost(tokens, tokens[:, :3], torch.zeros(2, 10, 3), 1.0, unknown)
    with pytest.raises(ValueError, match="valid"):
        select_valid(torch.zeros(2, 2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="share B and T"):
        pool_objects(tokens, torch.zeros(2, 8, 3))
