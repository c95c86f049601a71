"""tensor_statistics equals torch's per-tensor statistics, for a whole mixed batch at once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralgraph_quasi import collate, models, symmetry, to_graph
from neuralgraph_quasi.nn import NUM_STATS, QUANTILES, tensor_statistics


def _zoo() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)),
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, (3, 5)), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 3)),
        models.TransformerBlock(8, 2, 12),
        nn.Linear(1, 1),  # one-element tensors: variance 0, all quantiles equal
    ]


def _reference(model: nn.Module, graph) -> torch.Tensor:
    state = model.state_dict()
    rows = []
    for p in graph.params:
        v = state[p["name"]].reshape(-1).double()
        q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
        rows.append(torch.cat([v.mean()[None], v.var(unbiased=False)[None], q]))
    return torch.stack(rows)


def test_statistics_of_a_mixed_batch_equal_per_tensor_torch_statistics():
    nets = [m.double() for m in _zoo()]
    graphs = [to_graph(m) for m in nets]
    out = tensor_statistics(collate(graphs))
    assert out.stats.shape[1] == NUM_STATS
    for i, (model, graph) in enumerate(zip(nets, graphs, strict=True)):
        mine = out.stats[out.graph == i]
        assert out.param[out.graph == i].tolist() == list(range(len(graph.params)))
        assert torch.allclose(mine, _reference(model, graph), rtol=0, atol=1e-12)
        counts = [torch.Size(p["shape"]).numel() for p in graph.params]
        assert out.count[out.graph == i].tolist() == counts


def test_one_graph_and_padding_do_not_change_the_statistics():
    model = _zoo()[1].double()
    graph = to_graph(model)
    alone = tensor_statistics(graph).stats
    padded = tensor_statistics(graph.pad_kernels(25)).stats  # zero padding is not a value
    assert torch.equal(alone, padded)
    assert torch.allclose(alone, _reference(model, graph), atol=1e-12)


@pytest.mark.parametrize("kinds", [["permutation"], ["head_permutation"], ["sign"]])
def test_statistics_are_invariant_to_permutations_and_change_under_scaling(kinds):
    model = nn.Sequential(models.TransformerBlock(8, 2, 12), nn.Linear(8, 4), nn.Tanh(),
                          nn.Linear(4, 2)).double()
    graph = to_graph(model)
    base = tensor_statistics(graph).stats
    gen = torch.Generator().manual_seed(1)
    moved = tensor_statistics(symmetry.act(symmetry.sample(graph, gen, kinds), graph)).stats
    if kinds == ["sign"]:  # sign flips change the multiset of a tensor's values
        assert not torch.allclose(moved, base)
    else:
        assert torch.allclose(moved, base, atol=1e-12)
