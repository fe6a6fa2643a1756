"""Several targets on one backbone: tables (CSV / JSON Lines, images or vectors), task inference, masked labels,
per-task heads, one ONNX with an output group per task, and what predict / inspect show."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import porter
from porter.errors import DataError, UsageError
from porter.spec import ModelCard
from porter.transfer import finetune

from model_builders import build, run, save

pytestmark = pytest.mark.usefixtures("isolated_cache")

TABLES = Path(__file__).resolve().parent.parent / "fixtures" / "tables"
sys.path.insert(0, str(TABLES))
from make_tables import COLORS, files as table_files, square_rows  # noqa: E402


def image_table(root, fmt="csv"):
    """The committed fixture table (fixtures/tables: images of a coloured square of side 2..7 on grey; targets
    color, 3 classes, and area = side², some cells blank) copied under ``root``: (table path, its rows)."""
    shutil.copytree(TABLES / "squares", root / "squares", dirs_exist_ok=True)
    path = root / f"squares.{fmt}"
    shutil.copy(TABLES / path.name, path)
    return path, [row for row, _ in square_rows()]


def test_the_committed_tables_are_what_their_script_writes():
    import io

    from PIL import Image

    written = table_files()
    committed = {p.relative_to(TABLES).as_posix(): p.read_bytes() for p in TABLES.rglob("*")
                 if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts}
    assert committed.keys() == written.keys()
    for name, data in written.items():
        if name.endswith(".png"):  # the pixels: PNG bytes depend on the zlib build Pillow carries
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(committed[name]))),
                                  np.asarray(Image.open(io.BytesIO(data)))), name
        else:
            assert committed[name] == data, name


@pytest.fixture
def model(tmp_path):
    return save(build("gemm", seed=0), tmp_path / "m.onnx")  # the same backbone whatever ran before


def test_image_table_gives_one_model_with_an_output_group_per_task(tmp_path, model):
    table, rows = image_table(tmp_path)
    out = tmp_path / "tasks.onnx"
    r = finetune(model, table, out, tasks=["color", "area:regression"], progress=False)
    m = onnx.load(out)
    assert [o.name for o in m.graph.output] == ["color/probabilities", "color/label", "area/value"]
    card = ModelCard.from_onnx(m)
    assert [t["name"] for t in card.tasks] == ["color", "area"] and card.labels is None
    assert card.tasks[0]["labels"] == ["blue", "green", "red"] and card.tasks[1]["type"] == "regression"
    tasks = {t.name: t for t in r.metrics.tasks}
    assert tasks["color"].inferred and not tasks["area"].inferred
    assert tasks["color"].validation["accuracy"] >= 0.9
    assert tasks["area"].validation["r2"] >= 0.9  # the area is what the pixels say
    # blanks mask a row out of that task only; the row with no label at all (row 71: i=70) is skipped and reported
    assert tasks["color"].labelled == sum(1 for x in rows if x["color"] != "")
    assert tasks["area"].labelled == sum(1 for x in rows if x["area"] != "")
    unlabelled = [f"row {i + 1}" for i, x in enumerate(rows) if x["color"] == "" and x["area"] == ""]
    assert r.metrics.data.unlabelled_rows == unlabelled and any("no label for any task" in n for n in r.notes)
    assert set(r.report.values()) == {out.with_name(f"tasks.{n}") for n in (
        "metrics.json", "color.confusion.png", "color.training.png", "area.training.png")}
    assert all(p.stat().st_size > 0 for p in r.report.values())
    assert "task area (regression, given)" in r.summary() and "task color (classification, inferred)" in r.summary()

    # the outputs equal the heads computed by hand on the backbone's features, on every image
    from porter.graph.cuts import choose_cut
    from porter.graph.surgery import extract_backbone
    from porter.imaging import preprocess
    from porter.transfer.heads import predict_proba

    files = [tmp_path / x["path"] for x in rows]
    x = preprocess(files, card.preprocess, channels=3)
    (feats,) = run(extract_backbone(onnx.load(model), choose_cut(onnx.load(model))), x)
    prob, label, value = run(m, x)
    color_head, area_head = r.head
    np.testing.assert_allclose(prob, predict_proba(color_head, feats), atol=1e-5)
    assert (label == prob.argmax(1)).all()
    np.testing.assert_allclose(value, area_head.predict(feats), rtol=1e-4, atol=1e-3)
    areas = np.array([float(x["area"]) if x["area"] != "" else np.nan for x in rows])
    ok = np.isfinite(areas)
    assert np.corrcoef(value[ok], areas[ok])[0, 1] > 0.95  # in the column's units, not standardized
    assert abs(value[ok].mean() - areas[ok].mean()) < 2.0


def test_each_task_equals_the_same_task_trained_alone(tmp_path, model):
    table, rows = image_table(tmp_path)
    both = finetune(model, table, tasks=["color", "area:regression"], progress=False)
    alone = finetune(model, table, tasks=["color"], progress=False)
    a, b = both.metrics.tasks[0], alone.metrics.tasks[0]
    assert a.validation["accuracy"] == b.validation["accuracy"] and a.chosen == b.chosen
    from porter.transfer.heads import head_layers

    (m1, s1, [(w1, b1)]), (m2, s2, [(w2, b2)]) = head_layers(both.head[0]), head_layers(alone.head[0])
    assert all(np.array_equal(p, q) for p, q in ((m1, m2), (s1, s2), (w1, w2), (b1, b2)))
    # the regression head is the ridge strength with the best validation R² of its curve
    reg = both.metrics.tasks[1]
    assert reg.chosen.alpha in [c["alpha"] for c in reg.curve]
    assert reg.validation["r2"] == pytest.approx(max(c["val_r2"] for c in reg.curve), abs=1e-9)
    # the regression task alone: its split is a seeded shuffle (nothing to stratify on), so its 16-row validation
    # figure differs by chance; on every labelled image both models' R² agree within a point
    area_alone = finetune(model, table, tasks=["area:regression"], progress=False)
    labelled = [x for x in rows if x["area"] != ""]
    truth = np.array([float(x["area"]) for x in labelled])

    def r2(result) -> float:
        preds = porter.load(result.model).predict([tmp_path / x["path"] for x in labelled])
        value = np.array([p.tasks["area"]["value"] for p in preds])
        return 1 - ((value - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()

    assert r2(both) >= 0.9 and abs(r2(area_alone) - r2(both)) <= 0.01


def test_type_inference_and_jsonl(tmp_path, model):
    table, _ = image_table(tmp_path, fmt="jsonl")
    r = finetune(model, table, progress=False)  # every non-path column is a task, types inferred
    kinds = {t.name: t.type for t in r.metrics.tasks}
    assert kinds == {"color": "classification", "area": "classification"}  # 6 distinct integers: classes
    r = finetune(model, table, tasks=["area:regression"], progress=False)
    assert [t.type for t in r.metrics.tasks] == ["regression"]


def test_vector_table_with_two_targets(tmp_path):
    from model_builders import vector_model

    path = TABLES / "vectors.csv"
    r = finetune(vector_model(), path, tasks=["kind", "level"], progress=False)
    t = {t.name: t for t in r.metrics.tasks}
    assert t["kind"].type == "classification" and t["level"].type == "regression"  # inferred: floats
    assert t["level"].labelled == 120 - len(range(0, 120, 9))  # every 9th level blank
    assert t["kind"].validation["accuracy"] > 0.8 and t["level"].validation["r2"] > 0.5


def test_bad_tables_are_one_line_errors(tmp_path, model):
    table, rows = image_table(tmp_path)
    with pytest.raises(DataError, match="has no column 'age'"):
        finetune(model, table, tasks=["age"], progress=False)
    with pytest.raises(UsageError, match="the type must be classification or regression"):
        finetune(model, table, tasks=["color:ordinal"], progress=False)
    text = table.read_text().replace("squares/3.png,red,", "squares/3.png,red,big", 1)
    (tmp_path / "text.csv").write_text(text)
    with pytest.raises(DataError, match=r"row 4, column 'area': 'big49' is not a number"):
        finetune(model, tmp_path / "text.csv", tasks=["area:regression"], progress=False)
    one = tmp_path / "one.csv"
    one.write_text("path,kind\n" + "".join(f"squares/{i}.png,same\n" for i in range(10)))
    with pytest.raises(DataError, match="task 'kind' has 1 class"):
        finetune(model, one, progress=False)
    few = tmp_path / "few.csv"
    few.write_text("path,kind,size\n" + "".join(f"squares/{i}.png,{'ab'[i % 2]},{'' if i > 1 else i}\n" for i in range(10)))
    with pytest.raises(DataError, match="task 'size' has 2 labelled rows"):
        finetune(model, few, tasks=["kind", "size:regression"], progress=False)
    with pytest.raises(DataError, match=r"has no column 'file' \(--path-column; columns: path, color, area\)"):
        finetune(model, table, tasks=["color"], path_column="file", progress=False)
    with pytest.raises(DataError, match=r"has no column 'file' \(--path-column"):
        finetune(model, table, path_column="file", progress=False)  # no --task: still the table it names
    vectors = tmp_path / "nopath.csv"
    vectors.write_text("a,b,kind\n1,2,x\n3,4,y\n")
    with pytest.raises(DataError, match="no column 'label'"):
        finetune(model, vectors, progress=False)  # without --task it is the single-label CSV of old
    from model_builders import make_folder

    with pytest.raises(UsageError, match="--task needs a table"):
        finetune(model, make_folder(tmp_path / "folder"), tasks=["color"], progress=False)
    out = tmp_path / "never.onnx"
    with pytest.raises(UsageError, match="train one task"):
        finetune(model, table, out, tasks=["color"], unfreeze=1, progress=False)
    assert not out.exists()


def test_missing_image_files_are_skipped_and_named(tmp_path, model):
    table, rows = image_table(tmp_path)
    (tmp_path / rows[5]["path"]).unlink()
    r = finetune(model, table, tasks=["color"], progress=False)
    assert [s.file for s in r.metrics.data.skipped] == [str(tmp_path / rows[5]["path"])]


def test_predict_shows_every_task(tmp_path, model, porter_cli):
    table, rows = image_table(tmp_path)
    out = tmp_path / "tasks.onnx"
    finetune(model, table, out, tasks=["color", "area:regression"], progress=False)
    p = porter.load(out)
    assert not p.is_classifier and [t["name"] for t in p.tasks] == ["color", "area"]
    (pred,) = p.predict([tmp_path / rows[0]["path"]], top_k=2)
    assert pred.tasks["color"]["label"] == rows[0]["color"] and len(pred.tasks["color"]["top_k"]) == 2
    assert isinstance(pred.tasks["area"]["value"], float)
    assert pred.to_dict()["tasks"]["area"]["value"] == pred.tasks["area"]["value"]
    files = [str(tmp_path / x["path"]) for x in rows[:3]]
    r = porter_cli("predict", str(out), *files, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [set(d["tasks"]) for d in doc] == [{"color", "area"}] * 3
    assert [d["tasks"]["color"]["label"] for d in doc] == [list(COLORS)[i % 3] for i in range(3)]  # row 1's is blank
    r = porter_cli("predict", str(out), *files, "--format", "csv")
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "path,color_label,color_score,area_value,error" and len(lines) == 4
    r = porter_cli("predict", str(out), *files, "--top-k", "1")
    assert "color: red" in r.stdout and "area: " in r.stdout
    r = porter_cli("inspect", str(out))
    assert "task color (classification): 3 classes: blue, green, red" in r.stdout
    assert "task area (regression): a value" in r.stdout


def test_malformed_task_metadata_falls_back_to_raw_outputs(tmp_path, model):
    table, rows = image_table(tmp_path)
    out = tmp_path / "tasks.onnx"
    finetune(model, table, out, tasks=["color", "area:regression"], progress=False)
    m = onnx.load(out)
    for p in m.metadata_props:
        if p.key == "porter.tasks":
            p.value = json.dumps([{"name": "color", "type": "classification", "labels": ["a", "b", "c"]},
                                  {"name": "ghost", "type": "regression"}])
    pred = porter.load(m)
    assert pred.tasks is None and any("ghost" in n for n in pred.notes)
    for p in m.metadata_props:
        if p.key == "porter.tasks":
            p.value = "{not json"
    assert ModelCard.from_onnx(m).tasks is None


def test_shared_trunk_trains_jointly_and_exports_one_trunk(tmp_path, model):
    table, rows = image_table(tmp_path)
    out = tmp_path / "trunk.onnx"
    r = finetune(model, table, out, tasks=["color", "area:regression"], shared_hidden=16, epochs=150, lr=1e-2,
                 progress=False)
    assert set(r.report.values()) == {out.with_name(f"trunk.{n}") for n in (
        "metrics.json", "color.confusion.png", "shared.training.png")}
    assert all(p.is_file() for p in r.report.values())
    j = r.metrics.shared_trunk
    assert j.hidden == 16 and 1 <= j.best_epoch <= j.epochs_run <= 150
    # default weights: each task's loss normalized by its initial value
    assert j.weights["color"] == pytest.approx(1 / j.initial_losses[0])
    assert j.weights["area"] == pytest.approx(1 / j.initial_losses[1])
    # each task's own best epoch is reported beside the joint one, read off its own validation curve
    for name, key in (("color", "val_accuracy"), ("area", "val_r2")):
        h, own = j.history["tasks"][name], j.task_best[name]
        assert len(h["val_loss"]) == len(h[key]) == j.epochs_run
        assert own["epoch"] == 1 + int(np.argmin(h["val_loss"])) and own["val_loss"] == min(h["val_loss"])
        assert own["at_kept_epoch"]["val_loss"] >= own["val_loss"]
    # the kept epoch's figures are the shipped model's: its R² on validation equals the report's
    assert j.task_best["area"]["at_kept_epoch"]["val_r2"] == pytest.approx(
        r.metrics.tasks[1].validation["r2"], abs=1e-4)
    assert r.metrics.tasks[0].validation["accuracy"] == pytest.approx(
        j.task_best["color"]["at_kept_epoch"]["val_accuracy"])
    m = onnx.load(out)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm" and n.output[0].startswith("porter/head/")]
    assert len(gemms) == 3  # the trunk once, then one layer per task
    assert r.metrics.tasks[0].validation["accuracy"] >= 0.8
    # the ONNX equals the trunk + task layers computed by hand
    from porter.graph.cuts import choose_cut
    from porter.graph.surgery import extract_backbone
    from porter.imaging import preprocess

    x = preprocess([tmp_path / x["path"] for x in rows], ModelCard.from_onnx(m).preprocess, channels=3)
    (feats,) = run(extract_backbone(onnx.load(model), choose_cut(onnx.load(model))), x)
    prob, label, value = run(m, x)
    trunk_w = {t.name: t for t in m.graph.initializer}
    from onnx import numpy_helper

    arr = lambda n: numpy_helper.to_array(trunk_w[n]).astype(np.float64)  # noqa: E731
    h = np.maximum(((feats - arr("porter/head/trunk/mean")) / arr("porter/head/trunk/std")) @ arr("porter/head/trunk/W").T
                   + arr("porter/head/trunk/b"), 0)
    y = h @ arr("porter/head/1_area/W0").T + arr("porter/head/1_area/b0")
    np.testing.assert_allclose(value, y[:, 0], rtol=1e-4, atol=1e-3)
    again = finetune(model, table, tasks=["color", "area:regression"], shared_hidden=16, epochs=150, lr=1e-2,
                     progress=False)
    assert again.model.SerializeToString() == r.model.SerializeToString()  # seeded
    w = finetune(model, table, tasks=["color", "area:regression"], shared_hidden=16, epochs=5,
                 task_weights=["area=0"], progress=False)
    assert w.metrics.shared_trunk.weights["area"] == 0.0


def test_task_weights_are_checked(tmp_path, model):
    table, _ = image_table(tmp_path)
    with pytest.raises(UsageError, match="no task 'age'"):
        finetune(model, table, tasks=["color"], shared_hidden=8, task_weights=["age=2"], progress=False)
    with pytest.raises(UsageError, match="must be a number"):
        finetune(model, table, tasks=["color"], shared_hidden=8, task_weights=["color=lots"], progress=False)
    with pytest.raises(UsageError, match="weights the joint loss of --shared-hidden"):
        finetune(model, table, tasks=["color"], task_weights=["color=2"], progress=False)
    with pytest.raises(UsageError, match="--shared-hidden must be a positive"):
        finetune(model, table, tasks=["color"], shared_hidden=0, progress=False)


def test_ridge_follows_the_optimum_below_its_grid():
    from porter.transfer.multitask import RIDGE_FLOOR, RIDGE_GRID, fit_ridge

    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 6))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.5]) + 7.0  # noiseless: the weakest penalty fits best
    head, val = fit_ridge(x[:60], y[:60], x[60:], y[60:])
    alphas = [c["alpha"] for c in head.curve]
    assert head.alpha < min(RIDGE_GRID) and head.alpha >= RIDGE_FLOOR and alphas == sorted(alphas)
    assert val["r2"] > 0.9999 and np.allclose(head.predict(x[60:]), y[60:], atol=1e-2)


def test_task_names_that_sanitize_alike_get_their_own_report_files(tmp_path):
    from porter.transfer.multitask_run import report_paths
    from porter.transfer.tables import Task

    tasks = [Task("a b", "classification", False, ("x", "y")), Task("a_b", "classification", False, ("x", "y")),
             Task("shared", "regression", False)]
    paths = report_paths(tmp_path / "m.onnx", tasks, shared=True)
    assert len(set(paths.values())) == len(paths)  # nothing written over another
    assert paths["confusion/a b"].name == "m.a_b.confusion.png" and paths["confusion/a_b"].name == "m.a_b-2.confusion.png"
    assert paths["training/shared"].name == "m.shared.training.png"
