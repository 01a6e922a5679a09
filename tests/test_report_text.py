"""The text report and the JSON on a BERT-style encoder (issue 14): short lines, grouped
non-candidates, readable module scopes, the before/after summary, fields that mean their names."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import encoder_model, matmul_model, op_counts, planted
from onnx_split import SplitConfig, split_model
from onnx_split.cli import main
from onnx_split.report import LINE_WIDTH
from onnx_split.sites import NAME_SCOPES, module_path

LAYERS = 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoder")
    src, out, report = folder / "bert.onnx", folder / "bert.split.onnx", folder / "bert.json"
    onnx.save_model(encoder_model(np.random.default_rng(0), layers=LAYERS, hidden=256), str(src))
    # one fixed layout: which sites split must not hang on how fast a shared machine ran the tuner
    # (--layout auto wrote the original there once, every site measured no faster)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(src), str(out), "--input-shape", "x:2,8,256", "--report", str(report),
                     "--layout", "parallel", "--bench-seconds", "0.1"])
    assert code == 0, stderr.getvalue()
    return src, out, report, stdout.getvalue()


def test_the_encoders_terminal_output_fits_a_screen(encoder_run):
    src, out, report, stdout = encoder_run
    lines = stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= LINE_WIDTH, max(lines, key=len)
    data = json.loads(report.read_text())
    sites = data["sites"]
    attention = [s for s in sites if not s["candidate"]]
    # the two MatMuls between activations of every layer: one short reason, counted on one line
    assert len(attention) == 2 * LAYERS and len({s["reason"] for s in attention}) == 1
    assert all(len(s["reason"]) < 100 and s["flops_before"] is None and s["flops_after"] is None for s in attention)
    grouped = [line for line in lines if attention[0]["reason"] in line]
    assert len(grouped) == 1 and grouped[0].strip().startswith(f"{2 * LAYERS} MatMul sites: kept:")
    # the node column shows the exporter's module path, not the opaque node name
    assert any(line.startswith("encoder.layer.0.attention.self.query ") for line in lines)
    assert not any(line.startswith("node_MatMul_") for line in lines)
    assert {s["module"] for s in sites if s["candidate"]} >= {f"encoder.layer.{i}.intermediate.dense" for i in range(LAYERS)}
    # the before/after summary and the stage times are printed and in the JSON
    assert any(line.startswith("model: parameters ") for line in lines)
    assert any(line.startswith("time: load ") for line in lines)
    assert set(data["stage_seconds"]) >= {"load", "analyse", "rewrite", "verify", "bench", "write"}
    assert "tune" not in data["stage_seconds"]  # one layout asked for: nothing was tuned
    assert lines[-1].startswith(f"wrote {out}: ") and "verified against the original" in lines[-1]


def test_the_auto_layout_times_its_tuning_whatever_it_chooses():
    model = encoder_model(np.random.default_rng(0), layers=1, hidden=256)
    report = split_model(model, SplitConfig(tune_seconds=0.2, bench=False, verify=False,
                                            input_shapes={"x": (2, 8, 256)})).report
    assert report.tuning and set(report.stage_seconds) >= {"analyse", "tune", "rewrite"}


def test_the_encoders_json_fields_mean_their_names(encoder_run):
    src, out, report, _ = encoder_run
    data = json.loads(report.read_text())
    for s in data["sites"]:
        if s["candidate"]:
            assert s["flops_before"] == 2 * s["shape"][0] * s["shape"][1]
        if s["decision"] == "kept":
            assert s["flops_after"] == s["flops_before"]  # a kept site still computes densely
        else:
            assert 0 < s["flops_after"] < s["flops_before"] and s["components"] == s["parts"]
    before, after = data["model"]["before"], data["model"]["after"]
    original, written = onnx.load(str(src)), onnx.load(str(out))
    assert before["ops"] == op_counts(original) and after["ops"] == op_counts(written)
    assert before["nodes"] == len(original.graph.node) and after["nodes"] == len(written.graph.node)
    params = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    assert before["parameters"] == params(original) and after["parameters"] == params(written)
    assert before["bytes"] == src.stat().st_size and after["bytes"] == out.stat().st_size  # the files' sizes
    assert before["flops_per_row"] == sum(s["flops_before"] for s in data["sites"] if s["candidate"])
    assert after["flops_per_row"] == sum(s["flops_after"] for s in data["sites"] if s["candidate"])
    assert after["flops_per_row"] < before["flops_per_row"]


def test_nodes_that_replace_a_node_keep_its_metadata(encoder_run):
    src, out, _, _ = encoder_run
    original = {n.name: n for n in onnx.load(str(src)).graph.node}
    replaced = 0
    for node in onnx.load(str(out)).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "onnx_split.site" not in meta:
            continue
        site = meta["onnx_split.site"]
        replaced += 1
        assert meta[NAME_SCOPES] == {p.key: p.value for p in original[site].metadata_props}[NAME_SCOPES]
        assert meta["onnx_split.layout"] and meta["onnx_split.version"]
    assert replaced > 0


@pytest.mark.parametrize("text,expected", [
    ("['', 'encoder', 'encoder.layer.0', 'encoder.layer.0.attention.self.query', 'linear_3']",
     "encoder.layer.0.attention.self.query"),
    ("['', 'network', 'network.0', 'linear']", "network.0"),
    ("['', 'fc1']", "fc1"),  # the last entry extends the path: a module
    ("('', 'a', 'a.b')", "a.b"),
    ("[, 'a', 'a.b', 'mm'", "a.b"),  # not Python: split on commas
    ("[]", None),
    ("42", None),
    ("", None),
])
def test_module_path_reads_the_exporters_name_scopes(text, expected):
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="node_MatMul_0")
    node.metadata_props.add(key=NAME_SCOPES, value=text)
    assert module_path(node) == expected


def test_a_lossy_split_reports_no_components_and_a_kept_site_its_dense_cost():
    rng = np.random.default_rng(4)
    w, _ = planted(rng, 64, 64, 4)
    w = w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)
    result = split_model(matmul_model(w, ["batch", 64]),
                         SplitConfig(parts=4, min_elements=0, layout="batched", bench=False))
    (site,) = result.report.sites
    assert site.decision == "split" and site.components is None and site.unused_inputs is None
    assert result.report.verified_against in ("the pruned original (dropped weights zeroed)",
                                              "the refitted original (dropped weights zeroed, kept blocks refitted)")


def _two_readers(w, second="MatMul"):
    from onnx import TensorProto, helper, numpy_helper
    f = TensorProto.FLOAT
    k, n = w.shape
    b = helper.make_node("MatMul", ["x", "W"], ["y2"], name="b") if second == "MatMul" else \
        helper.make_node("Gemm", ["x", "W"], ["y2"], name="b", transB=1)  # reads W transposed: another plan
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"), b]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [2, k])],
                              [helper.make_tensor_value_info(y, f, [2, n]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("layout", ["parallel", "batched", "function"])
def test_a_weight_read_by_two_sites_with_one_plan_stores_its_parts_once(layout):
    w, _ = planted(np.random.default_rng(9), 64, 64, 4)
    config = SplitConfig(layout=layout, min_elements=0, bench=False)
    two = split_model(_two_readers(w), config)
    one = split_model(matmul_model(w, [2, 64], name="a"), config)
    assert [s.decision for s in two.report.sites] == ["split", "split"] and two.report.verification_passed
    weights = lambda m: sorted(int(np.prod(t.dims)) for t in m.graph.initializer if np.prod(t.dims) > 1)
    assert weights(two.model) == weights(one.model)  # the second site reads the first one's parts
    (note,) = [n for n in two.report.notes if "weight 'W'" in n]
    assert "read by 2 split sites whose plans agree: their parts are stored once" in note


def test_a_weight_read_by_two_sites_with_different_plans_says_what_it_cost():
    w, _ = planted(np.random.default_rng(9), 64, 64, 4)
    w = np.ascontiguousarray(w[:, ::-1])  # W and W^T split into different blocks
    result = split_model(_two_readers(w, "Gemm"), SplitConfig(layout="parallel", min_elements=0, bench=False))
    assert [s.decision for s in result.report.sites] == ["split", "split"] and result.report.verification_passed
    (note,) = [n for n in result.report.notes if "weight 'W'" in n]
    assert "read by 2 split sites whose splits differ: each stores its own parts" in note and "B more" in note


def test_threads_take_a_list_tuned_and_timed_at_each_count_verified_at_the_first(tmp_path, capsys):
    assert SplitConfig().threads == 1 and SplitConfig(threads=1).thread_counts == (1,)
    config = SplitConfig(threads=[1, 2], min_elements=0, tune_seconds=0.5, bench_seconds=0.05)
    assert config.threads == (1, 2) and config.base_threads == 1
    w, _ = planted(np.random.default_rng(5), 128, 128, 8)
    result = split_model(matmul_model(w, [16, 128]), config)
    (tuned,) = result.report.tuning
    for times in tuned.times_ms.values():  # every candidate timed at both counts
        assert {key.rsplit(", ", 1)[-1] for key in times} == {"1 thread", "2 threads"}
    measured = [e for e in result.report.latency if e.status == "measured"]
    if result.report.n_split or result.report.reverted:
        assert sorted(e.threads for e in measured) == [1, 2]
    src = tmp_path / "m.onnx"
    onnx.save_model(matmul_model(w, [16, 128]), str(src))
    for bad, match in (("1,x", "--threads wants whole numbers"), ("0", "--threads must be >= 1")):
        code = main([str(src), str(tmp_path / "o.onnx"), "--threads", bad])
        err = capsys.readouterr().err
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_a_lossy_runs_lines_are_whole_and_its_last_line_says_against_what(tmp_path, capsys):
    """digits_mlp within --tolerance 0.05: no line cut short (the verification's inputs and the
    calibration data on lines of their own), and the last line names the reference, the held-out
    error and the tolerance within LINE_WIDTH."""
    models = REPO / "models"
    out, report = tmp_path / "d.onnx", tmp_path / "d.json"
    code = main([str(models / "digits_mlp.onnx"), str(out), "--tolerance", "0.05", "--calibration",
                 str(models / "digits_calibration.npz"), "--bench-seconds", "0.1", "--layout", "batched",
                 "--report", str(report)])  # one layout: what is split must not hang on a shared machine's timings
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = [line.replace(str(out), out.name) for line in stdout.splitlines()]  # not the temporary folder's name
    assert max(len(line) for line in lines) <= LINE_WIDTH and not any(line.endswith("...") for line in lines)
    data = json.loads(report.read_text())
    assert [line for line in lines if line.startswith("verification against ")] == [
        f"verification against {data['verified_against']}:"]
    for what in data["inputs"]:
        assert f"  inputs: {what}" in lines
    assert f"  data: {data['error']['data']}" in lines
    reference = data["verified_against"].split(" (")[0]
    assert reference in ("the pruned original", "the refitted original")
    last = lines[-1]
    assert last.startswith(f"wrote {out.name}: ") and f"verified against {reference};" in last
    error = data["error"]
    assert f"; held-out relative output error {error['held_out']:.4g} (--tolerance 0.05)" in last


def _site(name, decision="kept", reason="fully connected at --threshold 0.0", candidate=True, module=None):
    from onnx_split.report import SiteReport
    return SiteReport(node=name, op_type="MatMul", scope="main", shape=[64, 64], dtype="float32",
                      decision=decision, reason=reason, module=module, candidate=candidate,
                      parts=4 if decision == "split" else None, flops_before=8192,
                      flops_after=2048 if decision == "split" else 8192, layout="batched" if decision == "split" else None)


def test_a_long_table_groups_the_kept_sites_that_share_a_reason():
    from onnx_split.report import GROUP_ABOVE, SplitReport
    dense = [_site(f"encoder.layer.{i}.attention.self.query_{i}") for i in range(GROUP_ABOVE)]
    alone = _site("odd_one", reason="a reason of its own")
    split = [_site(f"ffn.{i}", decision="split", reason="4 parts") for i in range(2)]
    attention = [_site(f"encoder.layer.{i}.attention.self.scores_{i}", reason="MatMul between two activations",
                       candidate=False) for i in range(40)]
    text = SplitReport(version="0", config={}, sites=dense + [alone] + split + attention).to_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= LINE_WIDTH and not any(line.endswith("...") for line in lines)
    rows = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ") and line.split()[0] in
            {s.node for s in dense + [alone] + split}]
    assert rows == ["odd_one", "ffn.0", "ffn.1"]  # the table keeps what differs
    (group,) = [line for line in lines if "fully connected" in line]
    assert group.startswith(f"  {GROUP_ABOVE} MatMul sites: kept: fully connected at --threshold 0.0 (")
    assert group.endswith(" more)") and dense[0].node in group
    shown = group.count(".query_")
    assert f"... {GROUP_ABOVE - shown} more)" in group
    (grouped_attention,) = [line for line in lines if "between two activations" in line]
    assert grouped_attention.startswith("  40 MatMul sites: kept: MatMul between two activations (")
    # a short table keeps one row per site
    short = SplitReport(version="0", config={}, sites=dense[:3] + split).to_text().splitlines()
    assert sum(line.startswith("encoder.layer.") for line in short) == 3


def test_the_encoders_dry_run_names_modules_and_groups_non_candidates(encoder_run, capsys):
    src, *_ = encoder_run
    assert main([str(src), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= LINE_WIDTH
    table = lines[lines.index(next(line for line in lines if line.startswith("site "))) + 1:lines.index("not candidates:")]
    assert [line.split()[0] for line in table] == [
        f"encoder.layer.{i}.{m}" for i in range(LAYERS) for m in ("attention.self.query", "attention.self.key",
                                                                 "attention.self.value", "attention.output.dense",
                                                                 "intermediate.dense", "output.dense")]
    rest = lines[lines.index("not candidates:") + 1:]
    assert len(rest) == 1 and rest[0].startswith(f"  {2 * LAYERS} sites: kept: MatMul between two activations")
    assert "encoder.layer.0.attention.self" in rest[0]


def test_the_last_line_names_each_provider_once_for_its_points(capsys):
    from onnx_split.bench import LatencyEntry
    from onnx_split.cli import _summary
    from onnx_split.report import SplitReport

    entry = lambda provider, inputs, threads, speedup: LatencyEntry(
        provider=provider, inputs=inputs, threads=threads, status="measured", speedup=speedup)
    report = SplitReport(version="0", config={}, sites=[_site("a", decision="split")], verified_against="the original",
                         verification=[], written=True)
    report.latency = [entry("CPUExecutionProvider", "batch 1", 1, 1.5), entry("CPUExecutionProvider", "batch 32", 1, 2.0),
                      entry("CUDAExecutionProvider", "batch 1", 1, 3.0)]
    _summary(report, Path("m.onnx"), True, False)
    assert capsys.readouterr().out.strip().endswith(
        "; speedup CPU 1.50x (batch 1), 2.00x (batch 32), CUDA 3.00x (batch 1)")


def test_a_long_decision_goes_on_over_lines_under_its_column_not_cut():
    from onnx_split.report import SplitReport
    reason = "a reason " + " ".join(f"word{i}" for i in range(80)) + " the end"
    sites = [_site("/fc1/Gemm", reason=reason), _site("/fc2/Gemm", decision="split", reason="4 parts")]
    lines = SplitReport(version="0", config={}, sites=sites).to_text().splitlines()
    assert max(len(line) for line in lines) <= LINE_WIDTH and not any(line.endswith("...") for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("/fc1/Gemm"))
    column = lines[start].index("kept: ")
    more = []
    for line in lines[start + 1:]:
        if not line.startswith(" " * column):
            break
        more.append(line[column:])
    assert len(more) >= 1 and lines[start + 1 + len(more)].startswith("/fc2/Gemm")
    assert " ".join([lines[start][column:]] + more) == f"kept: {reason}"  # every word, in order
