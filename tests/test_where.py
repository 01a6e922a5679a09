"""--include / --exclude: which sites a run may split, by node name (glob or re:), module scope or
subgraph path; applied before planning, so lossless, lossy and --dry-run runs alike honour them."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from builders import chain_model, chained_blocks, feature_wise, if_model, ort_run, planted
from onnx_split import InputError, SplitConfig, split_model, survey_model
from onnx_split.cli import main
from onnx_split.where import left_out, module_scopes

X_SHAPE = (4, 64)
PARTS = 4


def _mlp() -> onnx.ModelProto:
    """fc0 -Relu- fc1 -Relu- fc2, every layer 4 blocks lined up with the next: one chain of three."""
    rng = np.random.default_rng(3)
    weights = chained_blocks(rng, [64, 64, 64, 64], PARTS)
    return chain_model(weights, [[feature_wise("Relu", rng)], [feature_wise("Relu", rng)]], X_SHAPE)


def _config(**kw) -> SplitConfig:
    kw.setdefault("layout", "parallel")
    return SplitConfig(min_elements=0, bench=False, providers=("cpu",), input_shapes={"x": X_SHAPE}, **kw)


def _decisions(report) -> dict[str, tuple[str, str]]:
    return {s.node: (s.decision, s.reason) for s in report.sites}


def _assert_same_outputs(original, rewritten):
    feeds = {"x": np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)}
    for level in ("disabled", "enabled"):
        for a, b in zip(ort_run(original, feeds, level), ort_run(rewritten, feeds, level)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_without_patterns_the_three_layers_are_one_chain():
    """The control of the tests below."""
    result = split_model(_mlp(), _config())
    assert [c.sites for c in result.report.chains] == [["fc0", "fc1", "fc2"]]


def test_an_excluded_middle_layer_is_kept_and_joins_no_chain():
    model = _mlp()
    result = split_model(model, _config(exclude=("fc1",)))
    report = result.report
    assert _decisions(report)["fc1"] == ("kept", "excluded by --exclude 'fc1'")
    assert [c.sites for c in report.chains] == [["fc0"], ["fc2"]]  # no chain through the kept layer
    assert [s.chain for s in report.sites] == [None, None, None]
    assert report.verification_passed is True
    assert [n.name for n in result.model.graph.node if n.op_type == "MatMul" and n.name == "fc1"] == ["fc1"]
    _assert_same_outputs(model, result.model)


def test_include_keeps_the_rest_and_the_chain_covers_only_the_included_layers():
    model = _mlp()
    result = split_model(model, _config(include=("fc0", "fc1")))
    report = result.report
    assert _decisions(report)["fc2"] == ("kept", "not matched by --include 'fc0' or 'fc1'")
    assert [c.sites for c in report.chains] == [["fc0", "fc1"]]
    assert report.verification_passed is True
    _assert_same_outputs(model, result.model)


def test_regex_patterns_search_and_exclude_wins_over_include():
    sites_of = lambda **kw: {s.node: s.decision for s in split_model(_mlp(), _config(**kw)).report.sites}
    assert sites_of(include=("re:[02]$",)) == {"fc0": "split", "fc1": "kept", "fc2": "split"}
    assert sites_of(include=("fc*",), exclude=("re:2",)) == {"fc0": "split", "fc1": "split", "fc2": "kept"}
    # a glob matches the whole name, a regular expression anywhere in it
    assert sites_of(include=("c1",)) == {"fc0": "kept", "fc1": "kept", "fc2": "kept"}
    assert sites_of(include=("re:c1",)) == {"fc0": "kept", "fc1": "split", "fc2": "kept"}


def test_lossy_runs_honour_the_patterns():
    model = _mlp()
    result = split_model(model, _config(parts=2, exclude=("fc0", "fc2"), layout="batched"))
    decisions = _decisions(result.report)
    assert decisions["fc0"] == ("kept", "excluded by --exclude 'fc0'")
    assert decisions["fc2"] == ("kept", "excluded by --exclude 'fc2'")
    assert decisions["fc1"][0] == "split"
    assert result.report.verification_passed is True


def test_dry_run_honours_the_patterns(tmp_path, capsys):
    rows = survey_model(_mlp(), SplitConfig(min_elements=0, include=("fc1",)))
    assert {r.node: r.reason for r in rows} == {"fc0": "not matched by --include 'fc1'", "fc1": None,
                                                 "fc2": "not matched by --include 'fc1'"}
    assert [r.node for r in rows if r.levels] == ["fc1"]
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(path))
    assert main([str(path), "--dry-run", "--min-elements", "0", "--exclude", "fc2"]) == 0
    out = capsys.readouterr().out
    assert "fc2  64x64  kept: excluded by --exclude 'fc2'" in out


def test_report_shows_the_patterns_and_says_when_one_matches_nothing(tmp_path, capsys):
    path, out, rep = tmp_path / "mlp.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_mlp(), str(path))
    assert main([str(path), str(out), "--min-elements", "0", "--layout", "parallel", "--no-bench",
                 "--exclude", "fc1", "--exclude", "lm_head", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "sites chosen by --exclude 'fc1' --exclude 'lm_head': 1 site left out" in text
    assert "note: --exclude 'lm_head' matches no MatMul/Gemm node" in text
    data = json.loads(rep.read_text())
    assert data["config"]["exclude"] == ["fc1", "lm_head"] and data["config"]["include"] == []
    assert [s["reason"] for s in data["sites"] if s["node"] == "fc1"] == ["excluded by --exclude 'fc1'"]


def test_no_line_without_patterns():
    assert "sites chosen by" not in split_model(_mlp(), _config()).report.to_text()


@pytest.mark.parametrize("args, message", [
    (["--include", "re:(fc"], "--include 're:(fc' is not a valid regular expression"),
    (["--exclude", "re:"], "--exclude 're:': the regular expression after 're:' is empty"),
    (["--include", ""], "--include '': an empty pattern matches no node name"),
])
def test_bad_patterns_are_bad_input(tmp_path, capsys, args, message):
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), str(path))
    assert main([str(path), str(tmp_path / "out.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"onnx_split: error: {message}") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(InputError, match="--include|--exclude"):
        SplitConfig(**{args[0][2:]: (args[1],)})


def test_a_single_string_is_one_pattern():
    assert SplitConfig(include="fc*").include == ("fc*",)


def test_module_scopes_of_a_pytorch_export_are_matched():
    w, _ = planted(np.random.default_rng(0), 64, 64, PARTS)
    model = chain_model([w], [], X_SHAPE, biases=False)
    node = model.graph.node[0]
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                            value="['', 'h.0', 'h.0.mlp', 'h.0.mlp.c_fc', 'linear']")
    assert module_scopes(node) == ["h.0", "h.0.mlp", "h.0.mlp.c_fc", "linear"]
    sites = [type("S", (), {"name": node.name, "scope": "main", "node": node})()]
    assert left_out(sites, ("h.0.mlp*",), ()) == {}
    assert left_out(sites, (), ("h.0",)) == {0: "excluded by --exclude 'h.0'"}
    assert left_out(sites, ("h.1.*",), ()) == {0: "not matched by --include 'h.1.*'"}
    node.metadata_props[0].value = "not a list ["  # unreadable metadata: only the node name counts
    assert module_scopes(node) == [] and left_out(sites, (), ("h.0",)) == {}


def test_sites_in_subgraphs_match_by_their_shown_path():
    w, _ = planted(np.random.default_rng(2), 64, 64, PARTS)
    model = if_model(w, 4, 2.0)
    config = SplitConfig(min_elements=0, bench=False, providers=("cpu",), layout="parallel",
                         exclude=("main/branch/else_branch/*",))
    report = split_model(model, config).report
    assert {s.node: s.decision for s in report.sites} == {"then_fc": "split", "else_fc": "kept"}
