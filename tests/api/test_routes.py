"""Information-flow routes (lens_alti.routes): a hand-wired model with a known route, agreement with
the per-head contributions of `attribute(heads=True)` (themselves checked against the float64
reference in test_decoder.py), logit weighting against ALTI-Logit, and errors."""

from __future__ import annotations

import pytest
import torch
import transformers

import lens_alti
from lens_alti.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    OutOfRangeError,
    UnsupportedModelError,
)
from lens_alti.results import Node
from tests.support.errors import raises_exactly
from tests.support.models import boot, build_seq2seq
from tests.support.tokenizer import VOCAB

D, HEADS, N_POS = 16, 4, 6


def _mid(nodes):
    """Which nodes of an edges column are mid nodes (a boolean Series)."""
    return nodes.map(lambda n: n.mid).astype(bool)


def _copy_model(j: int, head: int) -> transformers.GPT2LMHeadModel:
    """Two-layer GPT-2 wired so that head `head` of layer 1 copies position `j` to every later position.

    Token embeddings are 0 and position p embeds as the one-hot e_p, so LN(x_p) = (16·e_p − 1)/√15.
    Layer 0 and both MLPs write nothing (zero output weights and biases). In layer 1, `head` has a
    constant query (bias C) and a key reading LN(x)[j], so it attends (almost) only to j; its value
    10·LN(x)[j] is written by W_O (×10) to the unused dimension 10. The other heads have zero values.
    """
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    dh = D // HEADS
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1.0)
        model.transformer.wpe.weight[:, :] = 0
        model.transformer.wpe.weight[torch.arange(8), torch.arange(8)] = 1.0
        attn = model.transformer.h[1].attn
        w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D [in, out]: columns q | k | v
        bias[head * dh] = 1000.0  # query of `head`, dimension 0
        w[j, D + head * dh] = 1.0  # key of `head`, dimension 0 = LN(x)[j]
        w[j, 2 * D + head * dh] = 10.0  # value of `head`, dimension 0 = 10·LN(x)[j]
        attn.c_proj.weight[head * dh, 10] = 10.0  # W_O: head's value dim 0 -> residual dim 10
    return model


@pytest.mark.parametrize(("j", "head"), [(2, 1), (0, 3), (4, 0)])
def test_hand_wired_route_is_found_exactly(j, head):
    bridge = boot(_copy_model(j, head))
    tokens = torch.randint(4, VOCAB, (1, N_POS), generator=torch.Generator().manual_seed(0))
    _, cache = bridge.run_with_cache(tokens)
    graph = lens_alti.routes(cache, threshold=0.04)
    last = N_POS - 1
    got = {(r.layer, r.kind, r.head, r.source, r.receiver) for r in graph.edges.itertuples()}
    assert got == {
        (1, "residual", "residual", last, last),  # (2, N) <- (2, N, mid): the MLP wrote nothing
        (1, "head", head, j, last),  # (2, N, mid) <- (1, j) through the wired head
        (0, "residual", "residual", j, j),  # (1, j) <- (1, j, mid)
        (0, "residual", "residual", j, j),  # (1, j, mid) <- (0, j): layer 0 wrote nothing
    }
    assert len(graph.edges) == 4
    nodes = set(graph.node_importance)
    assert nodes == {Node(2, last), Node(2, last, mid=True), Node(1, j), Node(1, j, mid=True), Node(0, j)}
    imp = graph.head_importance
    assert float(imp[1, head]) > 0.95 and float(imp.sum() - imp[1, head]) == 0
    assert graph.top_heads(1)[0][:2] == (1, head)
    nx_graph = graph.to_networkx()
    assert nx_graph.number_of_edges() == 4 and nx_graph.has_edge(Node(1, j), Node(2, last, mid=True))
    assert nx_graph.nodes[Node(2, last, mid=True)] == {
        "importance": graph.node_importance[Node(2, last, mid=True)], "layer": 2, "position": last, "mid": True,
        "token": str(last),
    }
    # only the reached receivers were computed: one in each layer
    assert graph.computed_receivers == [1, 1]


@pytest.fixture(scope="module")
def gpt2_run():
    from tests.support.models import build_bridge

    _, bridge = build_bridge("gpt2", n_layers=3, seed=3)
    tokens = torch.randint(4, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    _, cache = bridge.run_with_cache(tokens)
    return bridge, tokens, cache


def test_proximity_weights_are_per_head_contributions(gpt2_run):
    _, tokens, cache = gpt2_run
    res = lens_alti.attribute(cache, heads=True)
    for batch in (0, 1):
        graph = lens_alti.routes(cache, position=7, threshold=0.003, batch=batch)
        heads = graph.edges[graph.edges.kind == "head"]
        assert len(heads) > 3
        for r in heads.itertuples():
            want = float(res.heads[batch, r.layer, r.head, r.receiver, r.source])
            assert r.weight == pytest.approx(want, abs=1e-5)
        attn_res = graph.edges[(graph.edges.kind == "residual") & _mid(graph.edges.receiver_node)]
        for r in attn_res.itertuples():
            assert r.weight == pytest.approx(float(res.heads_residual[batch, r.layer, r.receiver]), abs=1e-5)
        # pruning: every part ≥ threshold of every computed receiver is an edge
        for layer in range(3):
            receivers = {r.receiver for r in graph.edges.itertuples() if r.layer == layer and r.receiver_node.mid}
            for i in receivers:
                n_big = int((res.heads[batch, layer, :, i] >= 0.003).sum())
                n_kept = int(((heads.layer == layer) & (heads.receiver == i)).sum())
                assert n_big == n_kept
        # node importance is the rollout restricted to the graph: edges into a node sum to its importance
        for node, imp in graph.node_importance.items():
            into = graph.edges[graph.edges.source_node.map(lambda n, node=node: n == node)]
            if len(into):
                pairs = zip(into.receiver_node, into.weight, strict=True)
                total = sum(graph.node_importance[rn] * w for rn, w in pairs)
                assert imp == pytest.approx(total, rel=1e-9)
        assert sum(graph.computed_receivers) < 3 * 10


def test_logit_weighting_matches_alti_logit(gpt2_run):
    _, _, cache = gpt2_run
    logits = cache["unembed.hook_out"][1, 8]
    t, c = int(logits.argmax()), int(logits.argmin())  # a clearly positive logit difference
    la = lens_alti.logit_attribution(cache, t, c, position=8)
    graph = lens_alti.routes(cache, position=8, threshold=0.001, target=t, contrast=c, batch=1, logit_mode="column")
    assert graph.weighting == "logit (column)"
    b, n, top = 1, 8, 2
    readout_bias = float(la.bias[b] - la.attn_bias[b].sum())
    mid = float(la.logit[b] - la.mlp[b, top]) - readout_bias  # x^mid_N · w
    mlp = float(la.mlp[b, top])
    pos = torch.tensor([mid, mlp]).clamp(min=0)
    assert mid > 0, "the explained row must carry a positive logit to follow"
    want = pos / pos.sum()
    e = graph.edges
    top_mlp = e[(e.layer == top) & ~_mid(e.receiver_node)]
    for r in top_mlp.itertuples():
        assert r.weighting == "logit"
        assert r.weight == pytest.approx(float(want[0] if r.kind == "residual" else want[1]), abs=1e-5)
    resid = mid - float(la.head_totals[b, top].sum() + la.attn_bias[b, top])  # x^(L-1)_N · w
    parts = torch.cat([la.heads[b, top].flatten(), torch.tensor([resid])]).double().clamp(min=0)
    shares = parts / parts.sum()
    attn = e[(e.layer == top) & (e.receiver == n) & _mid(e.receiver_node)]
    assert len(attn) > 0
    for r in attn.itertuples():
        k = -1 if r.kind == "residual" else r.head * la.heads.shape[-1] + r.source
        assert r.weight == pytest.approx(float(shares[k]), abs=1e-5)
    # other receivers keep proximity weighting
    assert set(e[e.receiver != n].weighting) <= {"proximity"}


def test_parallel_and_post_attention_norm_models_run():
    from tests.support.models import build_bridge

    for arch in ("neox", "gemma2", "llama"):
        _, bridge = build_bridge(arch)
        tokens = torch.randint(4, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
        _, cache = bridge.run_with_cache(tokens)
        target = int(cache["unembed.hook_out"][0, -1].argmax())
        graph = lens_alti.routes(cache, threshold=0.02, target=target, tokens=tokens)
        assert len(graph.edges) > 0 and graph.head_importance.shape == (2, 4)
        assert (graph.edges.weight >= 0.02).all() and (graph.edges.weight <= 1 + 1e-6).all()
        assert graph.to_networkx().number_of_nodes() == len(graph.node_importance)
        if arch == "neox":  # parallel blocks: no mid nodes
            assert not any(n.mid for n in graph.node_importance)


def test_routes_errors(gpt2_run):
    bridge, tokens, cache = gpt2_run
    raises_exactly(InvalidArgumentError, "threshold=0", lens_alti.routes, cache, threshold=0)
    raises_exactly(InvalidArgumentError, "threshold=2.0", lens_alti.routes, cache, threshold=2.0)
    raises_exactly(ArgumentTypeError, "threshold='high'", lens_alti.routes, cache, threshold="high")
    raises_exactly(InvalidArgumentError, "contrast=3", lens_alti.routes, cache, contrast=3)
    raises_exactly(OutOfRangeError, "batch=5", lens_alti.routes, cache, batch=5)
    raises_exactly(OutOfRangeError, "position=99", lens_alti.routes, cache, position=99)
    raises_exactly(OutOfRangeError, f"target={10**6}", lens_alti.routes, cache, target=10**6)
    raises_exactly(ArgumentTypeError, "tokens=None", lens_alti.routes, bridge)
    _, s2s = build_seq2seq("marian")
    _, c2 = s2s.run_with_cache(tokens[:, :4], decoder_input=tokens[:, :3])
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        lens_alti.routes(c2)


def test_padded_item_equals_running_alone():
    from tests.support.models import build_bridge

    _, bridge = build_bridge("llama", n_layers=2, seed=1)
    ids = torch.full((2, 9), 3)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, n in enumerate([9, 6]):  # left padding
        ids[b, 9 - n :] = torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(30 + b))
        mask[b, 9 - n :] = 1
    _, cache = bridge.run_with_cache(ids, attention_mask=mask)
    padded = lens_alti.routes(cache, threshold=0.01, batch=1, attention_mask=mask, target=11)
    _, alone_cache = bridge.run_with_cache(ids[1:, 3:])
    alone = lens_alti.routes(alone_cache, threshold=0.01, target=11)
    assert padded.position == 8 and alone.position == 5
    shift = lambda e: {(r.layer, r.kind, str(r.head), r.source - 3, r.receiver - 3) for r in e.itertuples()}  # noqa: E731
    same = {(r.layer, r.kind, str(r.head), r.source, r.receiver) for r in alone.edges.itertuples()}
    assert shift(padded.edges) == same
    torch.testing.assert_close(padded.head_importance, alone.head_importance, atol=1e-5, rtol=1e-4)


def test_logit_layers_limits_logit_weighting(gpt2_run):
    _, _, cache = gpt2_run
    target = int(cache["unembed.hook_out"][0, -1].argmax())
    graph = lens_alti.routes(cache, threshold=0.01, target=target, logit_mode="column", logit_layers=1)
    e = graph.edges
    assert set(e[e.weighting == "logit"].layer) == {2}
    assert set(e[e.layer < 2].weighting) <= {"proximity"}


def test_direct_logit_weighting_is_alti_logit_shares(gpt2_run):
    _, _, cache = gpt2_run
    logits = cache["unembed.hook_out"][0, 9]
    t, c = int(logits.argmax()), int(logits.argmin())
    la = lens_alti.logit_attribution(cache, t, c)
    graph = lens_alti.routes(cache, threshold=0.005, target=t, contrast=c)
    assert graph.weighting == "logit (direct)"
    per_item = lens_alti.routes(cache, threshold=0.005, target=[t, 1], contrast=[c, 2])  # one per batch item
    assert per_item.edges.equals(graph.edges)
    parts = torch.cat([la.heads[0].flatten(), la.mlp[0], la.embedding[:1]]).double().clamp(min=0)
    shares = parts / parts.sum()
    e = graph.edges
    into_top = e[e.receiver_node.map(lambda n: n == Node(3, 9))]
    assert len(into_top) == int((shares >= 0.005).sum()) and set(into_top.weighting) == {"logit"}
    n_h, k = la.heads.shape[2], la.heads.shape[3]
    for r in into_top.itertuples():
        if r.kind == "head":
            idx = (r.layer * n_h + r.head) * k + r.source
            assert r.source_node == Node(r.layer, r.source)
        elif r.kind == "mlp":
            idx = 3 * n_h * k + r.layer
            assert r.source_node == Node(r.layer + 1, 9, mid=True)
        else:
            idx = -1
            assert r.source_node == Node(0, 9)
        assert r.weight == pytest.approx(float(shares[idx]), abs=1e-5)
    # head importance of the direct edges is their share; below, proximity routes add credit
    direct = into_top[into_top.kind == "head"].groupby(["layer", "head"]).weight.sum()
    for (layer, head), value in direct.items():
        assert float(graph.head_importance[layer, head]) >= value - 1e-9
    assert set(e[~e.receiver_node.map(lambda n: n == Node(3, 9))].weighting) <= {"proximity"}
    mode = "logit_mode='sideways'"
    raises_exactly(InvalidArgumentError, mode, lens_alti.routes, cache, target=t, logit_mode="sideways")


def test_nodes_are_named_hashable_and_ordered():
    top, mid, below = Node(2, 5), Node(2, 5, mid=True), Node(1, 3)
    assert (top.layer, top.position, top.mid) == (2, 5, False) and mid.mid
    assert str(top) == "(2, 5)" and str(mid) == "(2, 5, mid)"
    assert repr(mid) == "Node(layer=2, position=5, mid=True)"
    assert len({top, mid, below, Node(2, 5)}) == 3 and top != mid and top != (2, 5)
    assert sorted([mid, top, below]) == [below, top, mid]
    with pytest.raises(AttributeError):
        top.layer = 3
