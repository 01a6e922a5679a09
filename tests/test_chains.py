"""Chains: split layers joined only by feature-wise ops become independent sub-networks.

Covers the links (which regions join two layers), the joint partition, the three layouts a chain is
written in (parallel, batched, function), and the autotuner's choice (with fake timers: nothing here
measures real time).
"""
from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_split.tune as tune
from builders import chain_model, chained_blocks, feature_wise, ort_run, planted
from onnx_split import SplitConfig, split_model
from onnx_split.chains import FEATURE_WISE, find_links
from onnx_split.partition import ChainPlan, exact_components, joint_components
from onnx_split.planning import exact_units, plan_exact
from onnx_split.sites import find_sites
from onnx_split.tune import choose, tune_chains

LAYOUTS = ["parallel", "batched", "function"]
FEATURE_WISE_OPS = ["Relu", "LeakyRelu", "Sigmoid", "Tanh", "GeluErf", "Gelu", "Add", "Sub", "Mul", "Div", "Cast",
                    "Identity", "Dropout"]
CPU = "CPUExecutionProvider"
X_SHAPE = (4, 64)
PARTS = 4


# -- helpers -------------------------------------------------------------------------------------------


def _config(layout="parallel", **kw) -> SplitConfig:
    kw.setdefault("min_elements", 0)
    kw.setdefault("input_shapes", {"x": X_SHAPE})
    return SplitConfig(layout=layout, bench=False, providers=("cpu",), **kw)


def _x(seed: int = 0, shape=X_SHAPE) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds, rtol=1e-4, atol=1e-4):
    """Our own check, independent of the library's verification: ORT with optimizations off and on."""
    for optimization in ("disabled", "enabled"):
        ref = ort_run(original, feeds, optimization)
        got = ort_run(rewritten, feeds, optimization)
        assert len(ref) == len(got)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"optimization {optimization}")


def _assert_verified(result) -> None:
    report = result.report
    assert report.checker == {"passed": True, "error": None}
    assert [(v.optimization, v.status) for v in report.verification] == [("disabled", "passed"), ("enabled", "passed")]
    assert report.verification_passed is True


def _chain_sites(report) -> list[list[str]]:
    return [c.sites for c in report.chains]


def _split_body(result) -> list[onnx.NodeProto]:
    """The nodes that compute the (single) chain: the graph, or the function body in the function layout."""
    if result.model.functions:
        (func,) = result.model.functions
        return list(func.node)
    return list(result.model.graph.node)


def _matmul_origins(nodes: list[onnx.NodeProto]) -> dict[str, set[str]]:
    """For every MatMul: where its activation comes from, looking back through feature-wise nodes only.
    An origin is the name of an earlier MatMul, or ``"<op_type>"`` of the first other node (the chain's
    entry: a Gather, Slice, Reshape ...). Constants and graph/function inputs are not origins."""
    producer = {out: n for n in nodes for out in n.output}

    def origins(tensor: str) -> set[str]:
        node = producer.get(tensor)
        if node is None or node.op_type == "Constant":
            return set()
        if node.op_type == "MatMul":
            return {node.name}
        if node.op_type in FEATURE_WISE:
            return set().union(*(origins(i) for i in node.input if i))
        return {f"<{node.op_type}>"}

    return {n.name: set().union(*(origins(i) for i in n.input)) for n in nodes if n.op_type == "MatMul"}


def _assert_independent_sub_networks(nodes: list[onnx.NodeProto], layers: int, lanes: int) -> None:
    """``lanes`` lines of ``layers`` MatMuls each: every MatMul after the first layer reads exactly one
    MatMul of the layer before through feature-wise nodes only, no two read the same one, and the
    lanes meet (one Concat, parallel forms only) only after the last layer."""
    found = _matmul_origins(nodes)
    assert len(found) == lanes * layers
    inner = {name: o for name, o in found.items() if not any(x.startswith("<") for x in o)}
    entry = {name: o for name, o in found.items() if name not in inner}
    assert len(entry) == lanes, entry  # the first layer, fed from the chain's input
    assert all(len(o) == 1 for o in inner.values()), inner
    fed = [next(iter(o)) for o in inner.values()]
    assert len(set(fed)) == len(fed) == lanes * (layers - 1)  # each MatMul feeds exactly one next MatMul
    concats = [n for n in nodes if n.op_type == "Concat"]
    if lanes > 1:
        (concat,) = concats
        last_layer = set(found) - set(fed)
        assert {n.name for n in nodes if n.output[0] in set(concat.input)} == last_layer
    else:
        assert not concats


@functools.cache
def _gelu_unsupported() -> str | None:
    """Why the installed ORT cannot run the Gelu op (opset 20), or None."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    try:
        ort_run(model, {"x": np.zeros(2, np.float32)})
    except Exception as exc:  # ORT raises its own types
        return str(exc).splitlines()[0]
    return None


def _one_node(op: str, **attrs):
    """A builder (as tests/builders.feature_wise) of one node ``op`` with no constant operand."""
    def build(h, n, tag):
        return [helper.make_node(op, [h], [f"{tag}_{op}"], name=f"{tag}_{op}", **attrs)], [], f"{tag}_{op}"
    return build


def _layer_norm(h, n, tag):
    inits = [numpy_helper.from_array(np.ones(n, np.float32), f"{tag}_gamma"),
             numpy_helper.from_array(np.zeros(n, np.float32), f"{tag}_beta")]
    node = helper.make_node("LayerNormalization", [h, f"{tag}_gamma", f"{tag}_beta"], [f"{tag}_ln"], name=f"{tag}_ln")
    return [node], inits, f"{tag}_ln"


def _reshape(h, n, tag):
    """[M, n] -> [M, 2, n/2] -> [M, n]: numerically a no-op, but the first Reshape changes the last
    axis, so it is not feature-wise to the pass (tests/test_reshape_chains.py has those that are)."""
    inits = [numpy_helper.from_array(np.array([-1, 2, n // 2], np.int64), f"{tag}_halves"),
             numpy_helper.from_array(np.array([-1, n], np.int64), f"{tag}_shape")]
    nodes = [helper.make_node("Reshape", [h, f"{tag}_halves"], [f"{tag}_h"], name=f"{tag}_reshape_halves"),
             helper.make_node("Reshape", [f"{tag}_h", f"{tag}_shape"], [f"{tag}_r"], name=f"{tag}_reshape")]
    return nodes, inits, f"{tag}_r"


def _divide_by_own_sigmoid(h, n, tag):
    """x / sigmoid(x): the divisor comes from the region itself."""
    nodes = [helper.make_node("Sigmoid", [h], [f"{tag}_s"], name=f"{tag}_sigmoid"),
             helper.make_node("Div", [h, f"{tag}_s"], [f"{tag}_q"], name=f"{tag}_div")]
    return nodes, [], f"{tag}_q"


def _set_output_shapes(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    """Give shapeless graph outputs a shape (chain_model(output_between=...) writes none, which the
    onnx checker rejects in the original already)."""
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type, list(shape)))
    return model


def _add_layer(model: onnx.ModelProto, reads: str, name: str, seed: int = 5) -> onnx.ModelProto:
    """Another split-able MatMul ``name`` reading ``reads``, its result a new graph output."""
    w, _ = planted(np.random.default_rng(seed), 64, 64, PARTS)
    model.graph.initializer.append(numpy_helper.from_array(w, f"{name}_W"))
    model.graph.node.append(helper.make_node("MatMul", [reads, f"{name}_W"], [f"{name}_out"], name=name))
    model.graph.output.append(helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, list(X_SHAPE)))
    return model


def _links(model: onnx.ModelProto) -> list[tuple[str, str]]:
    sites = find_sites(model, min_elements=0)
    eligible = [i for i, s in enumerate(sites) if s.reason is None]
    return [(sites[link.a].name, sites[link.b].name) for link in find_links(sites, eligible)]


def _two_chain_model(opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    """fc0 -Relu- fc1 -LayerNorm- fc2: a chain of two layers, then a layer on its own."""
    rng = np.random.default_rng(40)
    weights = chained_blocks(rng, [64, 64, 64, 64], PARTS)
    return chain_model(weights, [[feature_wise("Relu", rng)], [_layer_norm]], X_SHAPE, opset=opset,
                       ir_version=ir_version)


def _shuffled_blocks(rng, k: int, h: int, n: int, parts: int):
    """Two layers of ``parts`` sub-networks (inputs -> hidden -> outputs, random index sets) whose
    blocks are listed in *different* orders: sub-network i uses A's column block i but B's row block
    sigma(i) (B's blocks are ordered by their output sets, which are shuffled). Returns (A, B, groups)."""
    inputs = np.array_split(rng.permutation(k), parts)
    hidden = np.array_split(rng.permutation(h), parts)
    outputs = np.array_split(rng.permutation(n), parts)
    a, b = np.zeros((k, h), np.float32), np.zeros((h, n), np.float32)
    sigma = np.roll(np.arange(parts), 1)
    groups = []
    for i in range(parts):
        o = outputs[sigma[i]]
        a[np.ix_(inputs[i], hidden[i])] = rng.standard_normal((inputs[i].size, hidden[i].size))
        b[np.ix_(hidden[i], o)] = rng.standard_normal((hidden[i].size, o.size))
        groups.append((tuple(np.sort(inputs[i])), tuple(np.sort(hidden[i])), tuple(np.sort(o))))
    return a, b, groups


def _tuning_inputs(model: onnx.ModelProto, config: SplitConfig):
    """The (chain, plan) list and the points split_model would hand the tuner, built the same way."""
    sites = find_sites(model, min_elements=config.min_elements)
    units = exact_units(sites, plan_exact(sites, config), config)
    return [(unit.chain, unit.plan) for unit in units], [("batch 4", _x(3))]


def _fake_timer(ms: dict[str, float], calls: list | None = None):
    """A timer that measures nothing: every candidate takes ``ms[name]`` (default 1.0)."""
    def timer(models, feeds, provider, seconds, threads):
        if calls is not None:
            calls.append((sorted(models), sorted(feeds), provider))
        return {name: ms.get(name, 1.0) for name in models}
    return timer


# -- 1. a chain through each feature-wise op, in each layout ----------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", FEATURE_WISE_OPS)
def test_chain_through_feature_wise_op(op, layout):
    opset, ir_version = (20, 10) if op == "Gelu" else (17, 8)
    if op == "Gelu" and _gelu_unsupported():
        pytest.skip(f"onnxruntime cannot run Gelu (opset 20): {_gelu_unsupported()}")
    rng = np.random.default_rng(FEATURE_WISE_OPS.index(op))
    weights = chained_blocks(rng, [64, 64, 64, 64], PARTS)
    model = chain_model(weights, [[feature_wise(op, rng)], [feature_wise(op, rng)]], X_SHAPE, opset=opset,
                        ir_version=ir_version)
    result = split_model(model, _config(layout))
    report = result.report

    (chain,) = report.chains
    assert chain.sites == ["fc0", "fc1", "fc2"] and chain.parts == PARTS
    assert chain.layout.startswith("parallel") if layout == "parallel" else chain.layout == layout
    assert [(s.decision, s.chain, s.parts) for s in report.sites] == [("split", "fc0 -> fc1 -> fc2", PARTS)] * 3
    assert chain.flops_after == chain.flops_before // PARTS  # equal blocks: no padding, a quarter of the work

    body = _split_body(result)
    graph_ops = Counter(n.op_type for n in result.model.graph.node)
    if layout == "function":
        assert [n.op_type for n in result.model.graph.node if n.domain == "onnx_split"] == [
            result.model.functions[0].name]
        assert "MatMul" not in graph_ops
    _assert_independent_sub_networks(body, layers=3, lanes=1 if layout == "batched" else PARTS)
    if layout == "parallel":
        assert graph_ops["Concat"] == 1 and graph_ops["MatMul"] == PARTS * 3
    if layout == "batched":
        assert "Concat" not in graph_ops and graph_ops["MatMul"] == 3

    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(1))


# -- 2. what ends a chain -------------------------------------------------------------------------


BREAKERS = {
    "LayerNormalization": dict(between=[[_layer_norm]]),
    "Softmax": dict(between=[[_one_node("Softmax", axis=-1)]]),
    "graph output": dict(between=[[_one_node("Relu")]], output_between=0),
}


@pytest.mark.parametrize("layout", ["parallel", "batched"])
@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_chain_is_broken_and_each_layer_split_alone(breaker, layout):
    weights = chained_blocks(np.random.default_rng(20), [64, 64, 64], PARTS)
    kw = BREAKERS[breaker]
    model = chain_model(weights, kw["between"], X_SHAPE, output_between=kw.get("output_between"))
    model = _set_output_shapes(model, X_SHAPE)
    assert _links(model) == []
    result = split_model(model, _config(layout))
    assert _chain_sites(result.report) == [["fc0"], ["fc1"]]
    assert [c.parts for c in result.report.chains] == [PARTS, PARTS]
    assert [(s.decision, s.chain) for s in result.report.sites] == [("split", None), ("split", None)]
    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(2))


def test_a_break_only_cuts_the_chain_where_it_is():
    rng = np.random.default_rng(21)
    weights = chained_blocks(rng, [64, 64, 64, 64], PARTS)
    model = chain_model(weights, [[_layer_norm], [feature_wise("Relu", rng)]], X_SHAPE)
    result = split_model(model, _config())
    assert _chain_sites(result.report) == [["fc0"], ["fc1", "fc2"]]
    assert [s.chain for s in result.report.sites] == [None, "fc1 -> fc2", "fc1 -> fc2"]
    _assert_verified(result)


# -- 3. the joint partition lines the layers up, or cuts the chain ------------------------------------


@pytest.mark.parametrize("layout", ["parallel", "batched"])
def test_joint_plan_lines_up_differently_permuted_blocks(layout):
    rng = np.random.default_rng(30)
    a, b, groups = _shuffled_blocks(rng, 64, 64, 64, PARTS)
    # The premise: one layer alone sees the same hidden blocks, but lists them in another order.
    alone_a, alone_b = exact_components(a), exact_components(b)
    cols_a = [tuple(p.cols) for p in alone_a.parts]
    rows_b = [tuple(p.rows) for p in alone_b.parts]
    assert sorted(cols_a) == sorted(rows_b) and cols_a != rows_b

    joint = joint_components([a, b])
    assert sorted(tuple(tuple(level) for level in p.levels) for p in joint.parts) == sorted(groups)

    model = chain_model([a, b], [[feature_wise("Relu", rng)]], X_SHAPE)
    result = split_model(model, _config(layout))
    (chain,) = result.report.chains
    assert chain.sites == ["fc0", "fc1"] and chain.parts == PARTS
    gathers = Counter(n.op_type for n in result.model.graph.node)["Gather"]
    # Only the chain's ends gather: each part's inputs (parallel) or all inputs at once (batched), and
    # the output order. Between the layers the permutations are folded into the weights.
    assert chain.boundary_gathers == gathers == (PARTS + 1 if layout == "parallel" else 2)
    unchained = split_model(model, _config(layout, chains=False))
    assert Counter(n.op_type for n in unchained.model.graph.node)["Gather"] == 2 * gathers
    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(3))


def test_layers_whose_blocks_do_not_line_up_are_cut():
    """A has 2 blocks; B has 8 whose rows take half their units from each of A's blocks: jointly
    everything is one component, far costlier than splitting each layer, so the chain is cut."""
    rng = np.random.default_rng(31)
    a, b = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32)
    a[:32, :32] = rng.standard_normal((32, 32))
    a[32:, 32:] = rng.standard_normal((32, 32))
    for j in range(8):
        rows = np.r_[4 * j:4 * j + 4, 32 + 4 * j:32 + 4 * j + 4]
        b[np.ix_(rows, np.arange(8 * j, 8 * j + 8))] = rng.standard_normal((8, 8))
    assert exact_components(a).n_components == 2 and exact_components(b).n_components == 8
    assert len(joint_components([a, b]).parts) == 1

    model = chain_model([a, b], [[feature_wise("Tanh", rng)]], X_SHAPE)
    result = split_model(model, _config())
    assert _chain_sites(result.report) == [["fc0"], ["fc1"]]
    assert [c.parts for c in result.report.chains] == [2, 8]
    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(4))


@pytest.mark.parametrize("layout", ["parallel", "batched"])
def test_units_without_inputs_keep_their_bias(layout):
    """A hidden unit no input feeds (its value is f(bias)) that alone feeds one output: the joint
    plan gives that sub-network to a complete part, and its bias still reaches the output."""
    rng = np.random.default_rng(32)
    a, b = chained_blocks(rng, [64, 64, 64], PARTS)
    j = int(np.flatnonzero(b[0])[0])
    a[:, 0] = 0.0  # hidden unit 0: no input
    b[0, :] = 0.0
    b[:, j] = 0.0
    b[0, j] = 2.0  # output j: fed by hidden unit 0 only
    plan = joint_components([a, b])
    assert len(plan.parts) == PARTS
    assert sum(0 in p.levels[1] and j in p.levels[2] for p in plan.parts) == 1
    model = chain_model([a, b], [[feature_wise("Sigmoid", rng)]], X_SHAPE)
    result = split_model(model, _config(layout))
    assert _chain_sites(result.report) == [["fc0", "fc1"]]
    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(5))


# -- 4. joint_components and ChainPlan ----------------------------------------------------------------


def test_joint_components_recovers_planted_sub_networks():
    sizes, parts = [40, 48, 56, 32], 4
    weights = chained_blocks(np.random.default_rng(40), sizes, parts)
    plan = joint_components(weights)
    assert plan.sizes == tuple(sizes) and plan.n_layers == 3
    assert len(plan.parts) == plan.n_components == parts
    block = [[s.size for s in np.array_split(np.arange(size), parts)] for size in sizes]
    assert plan.macs_split == sum(block[l][i] * block[l + 1][i] for l in range(3) for i in range(parts))
    for level, size in enumerate(sizes):  # every unit in exactly one part
        assert sorted(np.concatenate([p.levels[level] for p in plan.parts]).tolist()) == list(range(size))
    for layer, w in enumerate(weights):  # no weight between different parts
        for i, p in enumerate(plan.parts):
            for q_index, q in enumerate(plan.parts):
                cross = w[np.ix_(p.levels[layer], q.levels[layer + 1])]
                assert (np.count_nonzero(cross) > 0) == (i == q_index)
    assert sorted(plan.output_order().tolist()) == list(range(sizes[-1]))


def test_joint_components_drops_dead_hidden_units():
    """Hidden unit 32 (fed by input 32 alone) reaches no output: neither is in any part."""
    a, b = chained_blocks(np.random.default_rng(41), [32, 32, 32], PARTS)
    a = np.pad(a, ((0, 1), (0, 1)))
    a[32, 32] = 1.0
    b = np.pad(b, ((0, 1), (0, 0)))
    plan = joint_components([a, b])
    assert plan.sizes == (33, 33, 32) and len(plan.parts) == PARTS
    assert not any(32 in p.levels[0] or 32 in p.levels[1] for p in plan.parts)
    assert plan.macs_split == 2 * PARTS * (32 // PARTS) ** 2  # the planted blocks only


def test_joint_components_drops_dead_hidden_units_inside_a_live_block():
    a, b = chained_blocks(np.random.default_rng(42), [32, 32, 32], PARTS)
    b[0, :] = 0.0  # hidden unit 0 is fed like its block-mates, but feeds nothing
    plan = joint_components([a, b])
    assert not any(0 in p.levels[1] for p in plan.parts)


def test_output_with_no_input_is_a_zero_column_of_one_part():
    a, b = chained_blocks(np.random.default_rng(43), [32, 32, 32], PARTS)
    b[:, 5] = 0.0
    plan = joint_components([a, b])
    owners = [i for i, p in enumerate(plan.parts) if 5 in p.levels[-1]]
    assert len(owners) == 1
    assert plan.parts[owners[0]].levels[1].size == min(p.levels[1].size for p in plan.parts)
    assert sorted(plan.output_order().tolist()) == list(range(32))


def test_chain_plan_from_a_single_layer_plan():
    w, _ = planted(np.random.default_rng(44), 24, 20, 3)
    w[7, :] = 0.0  # an unused input
    w[:, 11] = 0.0  # an output no input feeds
    plan = exact_components(w)
    chain_plan = ChainPlan.from_plan(plan)
    assert chain_plan.sizes == (24, 20) and chain_plan.n_layers == 1
    assert chain_plan.n_components == plan.n_components == 3 and chain_plan.threshold == plan.threshold
    assert [(p.levels[0].tolist(), p.levels[1].tolist()) for p in chain_plan.parts] == [
        (p.rows.tolist(), p.cols.tolist()) for p in plan.with_dead_columns()]
    assert not any(7 in p.levels[0] for p in chain_plan.parts)
    assert sorted(chain_plan.output_order().tolist()) == list(range(20))
    assert chain_plan.macs_dense == 24 * 20 and chain_plan.layer_macs(0) == chain_plan.macs_split


# -- 5. the function layout --------------------------------------------------------------------------


@pytest.mark.parametrize("ir_version", [8, 10])
def test_function_layout_writes_one_node_per_chain(ir_version):
    model = _two_chain_model(ir_version=ir_version)
    result = split_model(model, _config("function"))
    out = result.model
    assert _chain_sites(result.report) == [["fc0", "fc1"], ["fc2"]]
    assert [c.layout for c in result.report.chains] == ["function", "function"]
    calls = [n for n in out.graph.node if n.domain == "onnx_split"]
    assert len(calls) == len(out.functions) == 2
    assert {f.domain for f in out.functions} == {"onnx_split"}
    assert ("onnx_split", 1) in [(o.domain, o.version) for o in out.opset_import]
    assert "MatMul" not in {n.op_type for n in out.graph.node}
    by_id = {(f.name, f.overload): f for f in out.functions}
    assert all((n.op_type, n.overload) in by_id for n in calls)
    assert [sum(n.op_type == "MatMul" for n in by_id[(c.op_type, c.overload)].node) for c in calls] == [
        2 * PARTS, PARTS]
    if ir_version >= 10:
        assert [(n.op_type, n.overload) for n in calls] == [("BlockNetwork", "fc0"), ("BlockMatMul", "fc2")]
    else:
        assert [n.overload for n in calls] == ["", ""]
        assert [n.op_type for n in calls] == ["BlockNetwork_0", "BlockMatMul_1"]
    onnx.checker.check_model(out, full_check=True)
    _assert_verified(result)
    _assert_same_outputs(model, out, _x(6))


def test_function_layout_needs_ir_version_8():
    rng = np.random.default_rng(50)
    weights = chained_blocks(rng, [64, 64, 64], PARTS)
    model = chain_model(weights, [[feature_wise("Relu", rng)]], X_SHAPE, opset=13, ir_version=7)
    result = split_model(model, _config("function"))
    assert result.report.chains == [] and not result.model.functions
    for site in result.report.sites:
        assert site.decision == "kept" and "IR version >= 8" in site.reason, site.reason
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    _assert_verified(result)


def test_function_layout_with_same_named_nodes_in_two_branches():
    f = TensorProto.FLOAT

    def branch(name: str, weight: np.ndarray, out: str) -> onnx.GraphProto:
        node = helper.make_node("MatMul", ["x", f"{name}_W"], [out], name="fc")
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(out, f, [3, 16])],
                                 [numpy_helper.from_array(weight, f"{name}_W")])

    rng = np.random.default_rng(51)
    node = helper.make_node("If", ["cond"], ["y"], name="branch",
                            then_branch=branch("then", planted(rng, 16, 16, 2)[0], "t"),
                            else_branch=branch("else", planted(rng, 16, 16, 4)[0], "e"))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                        helper.make_tensor_value_info("x", f, [3, 16])],
                          [helper.make_tensor_value_info("y", f, [3, 16])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    result = split_model(model, _config("function", input_shapes={}))
    assert [s.decision for s in result.report.sites] == ["split", "split"]
    _assert_verified(result)


# -- 6. autotuning, with fake timers -------------------------------------------------------------------


def test_choose_never_picks_a_candidate_slower_than_dense_somewhere():
    times = {"dense": {"b1": 1.0, "b64": 1.0},
             "parallel": {"b1": 0.2, "b64": 1.05},  # by far the best mean, but slower at b64
             "batched": {"b1": 0.8, "b64": 0.9}}
    choice, reason = choose(times, margin=1.02)
    assert choice == "batched", reason
    assert "batched" in reason and "faster than dense" in reason


def test_choose_keeps_dense_when_nothing_beats_the_margin():
    times = {"dense": {"b1": 1.0, "b64": 1.0},
             "parallel": {"b1": 0.99, "b64": 0.98},
             "batched": {"b1": 0.5, "b64": 1.5}}
    choice, reason = choose(times, margin=1.05)
    assert choice == "dense"
    assert reason.startswith("kept dense") and "1.05x margin" in reason and "batched" in reason


def test_choose_picks_the_fastest_eligible_candidate():
    times = {"dense": {"b1": 2.0, "b64": 4.0},
             "parallel": {"b1": 1.0, "b64": 3.0},
             "parallel-rows": {"b1": 1.5, "b64": 1.0},  # the best geometric mean
             "batched": {"b1": 1.9, "b64": 2.0}}
    choice, _ = choose(times, margin=1.02)
    assert choice == "parallel-rows"


def test_tune_chains_keeps_dense_when_dense_is_fastest():
    model = _two_chain_model()
    config = _config("auto")
    chains, points = _tuning_inputs(model, config)
    assert [[s.name for s in chain.sites] for chain, _ in chains] == [["fc0", "fc1"], ["fc2"]]
    calls = []
    slow = _fake_timer({"dense": 1.0, "parallel": 2.0, "parallel-rows": 2.0, "batched": 2.0}, calls)
    results = tune_chains(model, chains, points, providers=[CPU], seconds=1.0, threads=1, margin=1.02, timer=slow)
    assert [r.chain for r in results] == [["fc0", "fc1"], ["fc2"]]
    assert [r.choice for r in results] == ["dense", "dense"]
    assert all(r.reason.startswith("kept dense") for r in results)
    # every layout was a candidate, timed on the chain's real input (x) at every point
    assert calls == [(["batched", "dense", "parallel", "parallel-rows"], ["x"], CPU),
                     (["batched", "dense", "parallel", "parallel-rows"], ["l1s0_ln"], CPU)]
    assert results[0].times_ms["batched"] == {"CPU, batch 4": 2.0}


def test_tune_chains_picks_batched_when_it_is_fastest():
    model = _two_chain_model()
    chains, points = _tuning_inputs(model, _config("auto"))
    results = tune_chains(model, chains, points, providers=[CPU], seconds=1.0, threads=1, margin=1.02,
                          timer=_fake_timer({"dense": 1.0, "parallel": 0.8, "parallel-rows": 0.7, "batched": 0.4}))
    assert [r.choice for r in results] == ["batched", "batched"]
    assert all("2.50x faster than dense" in r.reason for r in results)


def test_tune_chains_falls_back_to_the_static_rule_when_timing_fails():
    def failing_timer(models, feeds, provider, seconds, threads):
        raise RuntimeError("candidate failed to run")

    model = _two_chain_model()
    chains, points = _tuning_inputs(model, _config("auto"))
    results = tune_chains(model, chains, points, providers=[CPU], seconds=1.0, threads=1, margin=1.02,
                          timer=failing_timer)
    assert all(r.reason.startswith("not measured") and r.choice != "dense" for r in results)


def _auto_with_dense_fastest(monkeypatch):
    monkeypatch.setattr(tune, "measure", _fake_timer({"dense": 1.0, "parallel": 3.0, "parallel-rows": 3.0,
                                                      "batched": 3.0}))
    model = _two_chain_model()
    return model, split_model(model, _config("auto", tune_seconds=0.5))


def test_auto_layout_keeps_everything_dense_when_dense_is_fastest(monkeypatch):
    model, result = _auto_with_dense_fastest(monkeypatch)
    report = result.report
    assert report.n_split == 0 and report.chains == [] and not report.reverted
    assert [(t.chain, t.choice) for t in report.tuning] == [(["fc0", "fc1"], "dense"), (["fc2"], "dense")]
    assert all(t.reason.startswith("kept dense") for t in report.tuning)
    assert [s.decision for s in report.sites] == ["kept"] * 3
    assert [(n.op_type, list(n.input)) for n in result.model.graph.node] == [
        (n.op_type, list(n.input)) for n in model.graph.node]
    _assert_verified(result)


def test_auto_layout_says_why_each_site_was_kept(monkeypatch):
    _, result = _auto_with_dense_fastest(monkeypatch)
    assert all("kept dense" in s.reason for s in result.report.sites)


# -- 7. what a link refuses -------------------------------------------------------------------------------


def test_feature_wise_region_links_the_layers():
    """The control for the refusals below: the same model with Relu and a bias links."""
    rng = np.random.default_rng(60)
    model = chain_model(chained_blocks(rng, [64, 64, 64], PARTS), [[feature_wise("Relu", rng)]], X_SHAPE)
    sites = find_sites(model, min_elements=0)
    (link,) = find_links(sites, [0, 1])
    assert (link.a, link.b, link.start, link.end) == (0, 1, "mm0", "l0s0_Relu")
    assert [model.graph.node[i].op_type for i in link.nodes] == ["Add", "Relu"]
    assert {name: v.shape for name, v in link.constants.items()} == {"b0": (64,)}


REFUSED = {
    "A's output also feeds another layer": dict(between=[_one_node("Tanh")], reader="mm0"),
    "B's activation also feeds another layer": dict(between=[_one_node("Relu")], reader="l0s0_Relu"),
    "Reshape of the last axis in the region": dict(between=[_reshape]),
    "x / f(x)": dict(between=[_divide_by_own_sigmoid]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_link_is_refused(case):
    rng = np.random.default_rng(61)
    spec = REFUSED[case]
    model = chain_model(chained_blocks(rng, [64, 64, 64], PARTS), [spec["between"]], X_SHAPE)
    if "reader" in spec:
        model = _add_layer(model, spec["reader"], "other")
    assert _links(model) == []
    result = split_model(model, _config())
    assert all(len(sites) == 1 for sites in _chain_sites(result.report))
    assert result.report.n_split == len(result.report.sites)
    _assert_verified(result)
    _assert_same_outputs(model, result.model, _x(7))


def test_a_long_chain_is_cut_into_bounded_chains_and_its_lines_stay_short(monkeypatch, capsys, tmp_path):
    """Tuning times each chain as one model, and ORT's session building grows faster than the graph:
    chains are cut every planning.MAX_CHAIN layers; the text names long chains by their ends."""
    import onnx_split.planning as planning
    from onnx_split.cli import main

    monkeypatch.setattr(planning, "MAX_CHAIN", 4)
    rng = np.random.default_rng(12)
    layers = 10
    weights = chained_blocks(rng, [16] * (layers + 1), 2)
    model = chain_model(weights, [[feature_wise("Relu", rng)] for _ in range(layers - 1)], ["N", 16])
    result = split_model(model, SplitConfig(layout="parallel", min_elements=0, bench=False))
    assert [len(c.sites) for c in result.report.chains] == [4, 4, 2]
    assert result.report.verification_passed
    monkeypatch.setattr(planning, "MAX_CHAIN", 64)
    layers = 80
    weights = chained_blocks(rng, [8] * (layers + 1), 2)
    model = chain_model(weights, [[feature_wise("Relu", rng)] for _ in range(layers - 1)], ["N", 8])
    path = tmp_path / "long.onnx"
    onnx.save(model, str(path))
    assert main([str(path), str(tmp_path / "out.onnx"), "--layout", "parallel", "--min-elements", "0",
                 "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "fc0 -> fc1 -> ... -> fc63 (64 layers)" in out
    assert max(len(line) for line in out.splitlines()) < 220
