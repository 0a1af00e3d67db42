"""Attribution against naive references written here: patching loops, per-receiver gradients
through separate leaves, interpolation through ``inputs_embeds``, first-order agreement."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst.causal import CausalGraph, PromptPairs, attribute, node_outputs
from lightning_llm_inst.models import tiny_model

ANS = [10, 11, 12, 13, 14]
WRONG = [20, 21, 22, 23, 24]


def make_pairs(seq: int = 7, n: int = 5, seed: int = 1, positions: tuple[int, ...] = (2, 5)) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 250, (n, seq), generator=g)
    corrupt = clean.clone()
    for p in positions:
        corrupt[:, p] = torch.randint(3, 250, (n,), generator=g)
    return PromptPairs.from_ids(clean.tolist(), corrupt.tolist(), ANS[:n], WRONG[:n])


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Logit difference at the last position, mean over the 5 pairs (naive)."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0])
    return (last[rows, torch.tensor(ANS[:len(rows)])] - last[rows, torch.tensor(WRONG[:len(rows)])]).mean()


def ids(pairs: PromptPairs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(pairs.clean_ids), torch.tensor(pairs.corrupt_ids)


def blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def o_proj(model, layer):
    b = blocks(model)[layer]
    return b.self_attn.o_proj if hasattr(b, "self_attn") else b.attn.c_proj


def head_dim(model):
    c = model.config
    return c.hidden_size // c.num_attention_heads


def naive_run(model, input_ids, patch=None, inputs_embeds=None):
    """Logits, with ``patch = (kind, layer, index, value)`` replacing one node's output:
    ('head', L, H, z) sets head H's slice of o_proj's input; ('mlp', L, None, out); ('input', ...)."""
    hooks = []
    if patch is not None:
        kind, layer, index, value = patch
        if kind == "head":
            hd = head_dim(model)

            def pre(mod, args):
                z = args[0].clone()
                z[..., index * hd:(index + 1) * hd] = value[..., index * hd:(index + 1) * hd]
                return (z,)
            hooks.append(o_proj(model, layer).register_forward_pre_hook(pre))
        elif kind == "mlp":
            hooks.append(blocks(model)[layer].mlp.register_forward_hook(lambda m, a, o: value))
        elif kind == "input":
            hooks.append(blocks(model)[0].register_forward_pre_hook(
                lambda m, a, k: ((value,) + a[1:], k) if a else (a, {**k, "hidden_states": value}), with_kwargs=True))
    try:
        with torch.no_grad():
            if inputs_embeds is not None:
                return model(inputs_embeds=inputs_embeds).logits
            return model(input_ids=input_ids).logits
    finally:
        for h in hooks:
            h.remove()


def naive_recordings(model, input_ids):
    """o_proj inputs, MLP outputs and block-0 input of one run."""
    z, m, x0 = {}, {}, {}
    hooks = []
    for layer in range(len(blocks(model))):
        hooks.append(o_proj(model, layer).register_forward_pre_hook(lambda mod, a, layer=layer: z.__setitem__(layer, a[0])))
        hooks.append(blocks(model)[layer].mlp.register_forward_hook(lambda mod, a, o, layer=layer: m.__setitem__(layer, o)))
    hooks.append(blocks(model)[0].register_forward_pre_hook(
        lambda mod, a, k: x0.__setitem__(0, a[0] if a else k["hidden_states"]), with_kwargs=True))
    try:
        naive_run(model, input_ids)
    finally:
        for h in hooks:
            h.remove()
    return z, m, x0[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_equals_naive_patching_loop(arch):
    model = tiny_model(arch)
    pairs = make_pairs()
    clean, corrupt = ids(pairs)
    graph = attribute(model, pairs, method="exact", batch_size=2, progress=False)
    z_c, m_c, x_c = naive_recordings(model, corrupt)
    base = metric(naive_run(model, clean))
    nh = model.config.num_attention_heads
    for layer in range(2):
        for h in range(nh):
            want = metric(naive_run(model, clean, ("head", layer, h, z_c[layer]))) - base
            assert graph.score(f"a{layer}.h{h}") == pytest.approx(float(want), abs=1e-5)
        want = metric(naive_run(model, clean, ("mlp", layer, None, m_c[layer]))) - base
        assert graph.score(f"m{layer}") == pytest.approx(float(want), abs=1e-5)
    want = metric(naive_run(model, clean, ("input", 0, None, x_c))) - base
    assert graph.score("input") == pytest.approx(float(want), abs=1e-5)
    assert graph.score("logits") == pytest.approx(float(metric(naive_run(model, corrupt)) - base), abs=1e-5)
    assert graph.metadata["clean_metric"] == pytest.approx(float(base), abs=1e-5)


def naive_atp(model, pairs, inputs_embeds_list=None):
    """AtP (or, with a list of interpolated input embeddings, EAP-IG) over heads and MLPs with
    gradients taken through ``inputs_embeds`` and tensor hooks (no library code)."""
    clean, corrupt = ids(pairs)
    z_c, m_c, x_c = naive_recordings(model, corrupt)
    z_k, m_k, x_k = naive_recordings(model, clean)
    embeds = inputs_embeds_list or [model.get_input_embeddings()(clean).detach()]
    grads: dict = {}
    for emb in embeds:
        emb = emb.clone().requires_grad_(True)
        live = {}
        hooks = []
        for layer in range(len(blocks(model))):
            def pre(mod, a, layer=layer):
                t = a[0].view_as(a[0])
                live[("z", layer)] = t
                return (t,)
            hooks.append(o_proj(model, layer).register_forward_pre_hook(pre))

            def post(mod, a, o, layer=layer):
                t = o.view_as(o)
                live[("m", layer)] = t
                return t
            hooks.append(blocks(model)[layer].mlp.register_forward_hook(post))
        try:
            value = metric(model(inputs_embeds=emb).logits)
        finally:
            for h in hooks:
                h.remove()
        keys = list(live)
        gs = torch.autograd.grad(value, [live[k] for k in keys] + [emb])
        for k, g in zip(keys + ["input"], gs):
            grads[k] = grads.get(k, 0) + g / len(embeds)
    hd = head_dim(model)
    # the metric is a mean over pairs, so its gradients already carry the 1 / pairs
    out = {"input": float(((x_c - x_k) * grads["input"]).sum())}
    for layer in range(len(blocks(model))):
        prod = ((z_c[layer] - z_k[layer]) * grads[("z", layer)]).view(*clean.shape, -1, hd).sum(-1)
        for h in range(prod.shape[-1]):
            out[f"a{layer}.h{h}"] = float(prod[..., h].sum())
        out[f"m{layer}"] = float(((m_c[layer] - m_k[layer]) * grads[("m", layer)]).sum())
    return out


def test_atp_and_eap_ig_equal_naive_gradients():
    model = tiny_model("llama")  # GQA: 4 query heads, 2 key/value heads
    pairs = make_pairs()
    clean, corrupt = ids(pairs)
    atp = attribute(model, pairs, method="atp", batch_size=3, progress=False)
    for name, want in naive_atp(model, pairs).items():
        assert atp.score(name) == pytest.approx(want, abs=1e-6), name
    emb = model.get_input_embeddings()
    e_clean, e_corr = emb(clean).detach(), emb(corrupt).detach()
    steps = 4
    points = [e_corr + (k / steps) * (e_clean - e_corr) for k in range(1, steps + 1)]
    ig = attribute(model, pairs, method="eap-ig", ig_steps=steps, batch_size=2, progress=False)
    for name, want in naive_atp(model, pairs, points).items():
        assert ig.score(name) == pytest.approx(want, abs=1e-6), name
    one = attribute(model, pairs, method="eap-ig", ig_steps=1, progress=False)
    assert torch.allclose(one.scores, atp.scores, atol=1e-6)


def naive_receiver_grads(model, clean):
    """dM/dx_v for every receiver by a separate leaf per receiver: the receiver alone reads a
    copy of the residual that requires grad (a model without key/value grouping)."""
    c = model.config
    nh, hd = c.num_attention_heads, head_dim(model)
    assert c.num_key_value_heads == nh
    out = {}
    for layer, blk in enumerate(blocks(model)):
        for h in range(nh):
            for kind in "qkv":
                leaf = {}

                def grab(mod, a, k):
                    x = a[0] if a else k["hidden_states"]
                    leaf["x"] = x.detach().clone().requires_grad_(True)

                def proj_hook(mod, a, o, h=h):
                    new = blk.input_layernorm.forward(leaf["x"]) @ mod.weight.view(nh, hd, -1)[h].T
                    o = o.clone()
                    o[..., h * hd:(h + 1) * hd] = new
                    return o
                proj = getattr(blk.self_attn, f"{kind}_proj")
                h1 = blk.input_layernorm.register_forward_pre_hook(grab, with_kwargs=True)
                h2 = proj.register_forward_hook(proj_hook)
                try:
                    value = metric(model(input_ids=clean).logits)
                finally:
                    h1.remove(), h2.remove()
                out[f"a{layer}.h{h}<{kind}>"] = torch.autograd.grad(value, leaf["x"])[0]
        leaf = {}

        def grab_mid(mod, a, k):
            x = a[0] if a else k["hidden_states"]
            leaf["x"] = x.detach().clone().requires_grad_(True)
            return ((leaf["x"],) + a[1:], k) if a else (a, {**k, "hidden_states": leaf["x"]})
        hh = blk.post_attention_layernorm.register_forward_pre_hook(grab_mid, with_kwargs=True)
        try:
            value = metric(model(input_ids=clean).logits)
        finally:
            hh.remove()
        out[f"m{layer}"] = torch.autograd.grad(value, leaf["x"])[0]
    return out


def test_edges_equal_naive_receiver_gradients_and_sum_to_nodes():
    model = tiny_model("llama", num_key_value_heads=4)  # no grouping: every read is its own head's
    pairs = make_pairs()
    clean, corrupt = ids(pairs)
    graph = attribute(model, pairs, method="atp", edges=True, batch_size=2, progress=False)
    # out-edges of each node sum to its score (receivers partition every read of the residual)
    sums = torch.zeros(len(graph.nodes), dtype=torch.float64).index_add_(
        0, graph.edges.edge_index[0], graph.edges.scores.double())
    for i, name in enumerate(graph.nodes[:-1]):
        assert sums[i] == pytest.approx(graph.scores[i].item(), rel=1e-4, abs=1e-7), name
    # edge scores equal (a_corrupt,u - a_clean,u) . dM/dx_v with naive receiver gradients
    out_c = node_outputs(model, corrupt)
    out_k = node_outputs(model, clean)
    recv = naive_receiver_grads(model, clean)
    checked = 0
    for v, g in recv.items():
        for u in ("input", "a0.h1", "m0", "a0.h3"):
            name = f"{u}->{v}"
            if name not in graph.edges.names:
                continue
            want = float(((out_c[u] - out_k[u]) * g).sum())  # g: gradient of the mean over pairs
            assert graph.edge_score(name) == pytest.approx(want, abs=1e-6), name
            checked += 1
    assert checked > 20


def test_gqa_edges_sum_and_node_outputs_add_up():
    model = tiny_model("llama")  # 4 query heads share 2 key/value heads
    pairs = make_pairs()
    graph = attribute(model, pairs, method="eap-ig", ig_steps=3, edges=True, progress=False)
    assert {"a1.h3<k>", "a1.h2<v>"} <= set(graph.receivers)
    sums = torch.zeros(len(graph.nodes), dtype=torch.float64).index_add_(
        0, graph.edges.edge_index[0], graph.edges.scores.double())
    assert torch.allclose(sums[:-1].float(), graph.scores[:-1], rtol=1e-4, atol=1e-7)
    # the head outputs of a layer plus the projection bias sum to the attention block's output
    clean, _ = ids(pairs)
    attn = {}
    hook = blocks(model)[1].self_attn.register_forward_hook(lambda m, a, o: attn.__setitem__(1, o[0]))
    try:
        naive_run(model, clean)
    finally:
        hook.remove()
    outs = node_outputs(model, clean)
    total = sum(outs[f"a1.h{h}"] for h in range(4))
    torch.testing.assert_close(total, attn[1], atol=1e-5, rtol=1e-5)


def test_gpt2_head_outputs_plus_bias_equal_attention_output():
    model = tiny_model("gpt2")
    clean, _ = ids(make_pairs())
    attn = {}
    hook = model.transformer.h[0].attn.register_forward_hook(lambda m, a, o: attn.__setitem__(0, o[0]))
    try:
        naive_run(model, clean)
    finally:
        hook.remove()
    outs = node_outputs(model, clean)
    total = sum(outs[f"a0.h{h}"] for h in range(4)) + model.transformer.h[0].attn.c_proj.bias
    torch.testing.assert_close(total, attn[0], atol=1e-5, rtol=1e-5)


def test_atp_agrees_with_exact_to_first_order():
    """Corrupt tokens whose embeddings differ from the clean ones by eps * v: exact - AtP is
    O(eps^2) while the scores are O(eps)."""
    model = tiny_model("llama", dtype=torch.float64)
    pairs = make_pairs(positions=(3,))
    clean, corrupt = ids(pairs)
    emb = model.get_input_embeddings().weight
    original = emb.detach().clone()
    errors = []
    try:
        for eps in (1e-2, 1e-3, 1e-4):
            with torch.no_grad():
                emb.copy_(original)
                g = torch.Generator().manual_seed(0)
                for c_tok, k_tok in zip(clean[:, 3].tolist(), corrupt[:, 3].tolist()):
                    emb[k_tok] = emb[c_tok] + eps * torch.randn(emb.shape[1], generator=g, dtype=emb.dtype)
            atp = attribute(model, pairs, method="atp", progress=False).scores[:-1].double()
            exact = attribute(model, pairs, method="exact", progress=False).scores[:-1].double()
            errors.append(((atp - exact).abs().max() / exact.abs().max()).item())
    finally:
        with torch.no_grad():
            emb.copy_(original)
    assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1]  # shrinks with eps: first order
    assert errors[2] < 1e-2


def test_per_position_sums_to_totals_and_exact_position_patch():
    model = tiny_model("llama")
    pairs = make_pairs()
    tot = attribute(model, pairs, method="atp", edges=True, progress=False)
    pp = attribute(model, pairs, method="atp", edges=True, per_position=True, progress=False)
    assert pp.scores.shape == (len(tot.nodes), 7)
    torch.testing.assert_close(pp.scores.sum(-1), tot.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pp.edges.scores.sum(-1), tot.edges.scores, atol=1e-6, rtol=1e-5)
    ex = attribute(model, pairs, method="exact", per_position=True, progress=False)
    clean, corrupt = ids(pairs)
    z_c, _, _ = naive_recordings(model, corrupt)
    z_k, _, _ = naive_recordings(model, clean)
    mixed = z_k[1].clone()
    mixed[:, 5] = z_c[1][:, 5]  # head 2 of layer 1 corrupt at position 5 only
    want = metric(naive_run(model, clean, ("head", 1, 2, mixed))) - metric(naive_run(model, clean))
    assert ex.scores[ex.nodes.index("a1.h2"), 5].item() == pytest.approx(float(want), abs=1e-5)
    assert ex.scores[:, :2].abs().max() < 1e-6  # positions before the first corrupt token change nothing


def test_callable_metric_and_mixed_lengths():
    model = tiny_model("gpt2")
    a, b = make_pairs(seq=6, n=3, seed=2), make_pairs(seq=9, n=2, seed=3)
    pairs = PromptPairs.from_ids(a.clean_ids + b.clean_ids, a.corrupt_ids + b.corrupt_ids,
                                 a.answer_ids + b.answer_ids, a.wrong_ids + b.wrong_ids)

    def prob_diff(logits, p):
        probs = logits[:, -1].softmax(-1)
        rows = torch.arange(len(p))
        return (probs[rows, list(p.answer_ids)] - probs[rows, list(p.wrong_ids)]).mean()

    g = attribute(model, pairs, method="exact", metric=prob_diff, batch_size=2, progress=False)
    # naive: mean over pairs of the per-pair patched metric
    total = 0.0
    for i in range(len(pairs)):
        one = pairs[i]
        c, k = torch.tensor(one.clean_ids), torch.tensor(one.corrupt_ids)
        _, m_c, _ = naive_recordings(model, k)
        total += float(prob_diff(naive_run(model, c, ("mlp", 1, None, m_c[1])), one)
                       - prob_diff(naive_run(model, c), one))
    assert g.score("m1") == pytest.approx(total / len(pairs), abs=1e-6)
    assert g.metadata["metric"] == "prob_diff"
    with pytest.raises(ValueError, match="per_position: needs pairs of one token length"):
        attribute(model, pairs, per_position=True)


def test_bad_arguments_are_one_line_errors():
    model = tiny_model("llama")
    pairs = make_pairs()
    for kwargs, match in [({"method": "ig"}, "method: got 'ig'"), ({"ig_steps": 0}, "ig_steps: got 0"),
                          ({"nodes": ("heads", "attn")}, "nodes: got"), ({"batch_size": 0}, "batch_size: got 0"),
                          ({"method": "exact", "edges": True}, "edges: exact edge scores"),
                          ({"metric": "kl"}, "metric: got 'kl'")]:
        with pytest.raises(ValueError, match=match) as info:
            attribute(model, pairs, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="pairs: expected a PromptPairs"):
        attribute(model, [("a", "b")])
    with pytest.raises(ValueError, match="causal attribution supports"):
        attribute(tiny_model("gpt_neox"), pairs)


def test_graph_from_attribution_round_trips(tmp_path):
    model = tiny_model("llama")
    graph = attribute(model, make_pairs(), method="eap-ig", edges=True, progress=False)
    path = graph.to_json(tmp_path / "g.json")
    back = CausalGraph.from_json(path)
    assert back.nodes == graph.nodes and torch.equal(back.scores, graph.scores)
    assert torch.equal(back.edges.scores, graph.edges.scores) and back.edges.names == graph.edges.names
    assert back.metadata["method"] == "eap-ig" and back.metadata["ig_steps"] == 5
