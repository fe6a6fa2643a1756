"""Several targets on one backbone: tables (CSV / JSON Lines, images or vectors), task inference, masked labels,
per-task heads, one ONNX with an output group per task, and what predict / inspect show."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
from PIL import Image

import porter
from porter.errors import DataError, UsageError
from porter.spec import ModelCard
from porter.transfer import finetune

from model_builders import build, run, save

pytestmark = pytest.mark.usefixtures("isolated_cache")

COLORS = {"red": (210, 50, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}


def image_table(root, n=90, blank_color_every=10, blank_area_every=7, fmt="csv"):
    """Images of a coloured square of side 2..7 on grey: targets color (3 classes) and area (side², a number)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        color, side = list(COLORS)[i % 3], int(rng.integers(2, 8))
        a = np.full((8, 8, 3), 230, np.uint8)
        a[:side, :side] = COLORS[color]
        Image.fromarray(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "color": "" if i % blank_color_every == 1 else color,
                     "area": "" if i % blank_area_every == 1 else side * side})
    if fmt == "jsonl":
        path = root / "t.jsonl"
        path.write_text("".join(json.dumps({k: (v if v != "" else None) for k, v in r.items()}) + "\n" for r in rows))
    else:
        path = root / "t.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "color", "area"])
            w.writeheader()
            w.writerows(rows)
    return path, rows


@pytest.fixture
def model(tmp_path):
    return save(build("gemm"), tmp_path / "m.onnx")


def test_image_table_gives_one_model_with_an_output_group_per_task(tmp_path, model):
    table, rows = image_table(tmp_path)
    out = tmp_path / "tasks.onnx"
    r = finetune(model, table, out, tasks=["color", "area:regression"], progress=False)
    m = onnx.load(out)
    assert [o.name for o in m.graph.output] == ["color/probabilities", "color/label", "area/value"]
    card = ModelCard.from_onnx(m)
    assert [t["name"] for t in card.tasks] == ["color", "area"] and card.labels is None
    assert card.tasks[0]["labels"] == ["blue", "green", "red"] and card.tasks[1]["type"] == "regression"
    tasks = {t["name"]: t for t in r.metrics["tasks"]}
    assert tasks["color"]["inferred"] and not tasks["area"]["inferred"]
    assert tasks["color"]["validation"]["accuracy"] >= 0.9
    assert tasks["area"]["validation"]["r2"] >= 0.9  # the area is what the pixels say
    # blanks mask a row out of that task only; the row with no label at all (row 71: i=70) is skipped and reported
    assert tasks["color"]["labelled"] == sum(1 for x in rows if x["color"] != "")
    assert tasks["area"]["labelled"] == sum(1 for x in rows if x["area"] != "")
    unlabelled = [f"row {i + 1}" for i, x in enumerate(rows) if x["color"] == "" and x["area"] == ""]
    assert r.metrics["data"]["unlabelled_rows"] == unlabelled and any("no label for any task" in n for n in r.notes)
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
    table, _ = image_table(tmp_path)
    both = finetune(model, table, tasks=["color", "area:regression"], progress=False)
    alone = finetune(model, table, tasks=["color"], progress=False)
    a, b = both.metrics["tasks"][0], alone.metrics["tasks"][0]
    assert a["validation"]["accuracy"] == b["validation"]["accuracy"] and a["chosen"] == b["chosen"]
    import torch

    assert all(torch.equal(p, q) for p, q in zip(both.head[0].state_dict().values(), alone.head[0].state_dict().values()))
    # the regression head is the ridge strength with the best validation R² of its curve
    reg = both.metrics["tasks"][1]
    assert reg["chosen"]["alpha"] in [c["alpha"] for c in reg["curve"]]
    assert reg["validation"]["r2"] == pytest.approx(max(c["val_r2"] for c in reg["curve"]), abs=1e-9)


def test_type_inference_and_jsonl(tmp_path, model):
    table, _ = image_table(tmp_path, fmt="jsonl")
    r = finetune(model, table, progress=False)  # every non-path column is a task, types inferred
    kinds = {t["name"]: t["type"] for t in r.metrics["tasks"]}
    assert kinds == {"color": "classification", "area": "classification"}  # 6 distinct integers: classes
    r = finetune(model, table, tasks=["area:regression"], progress=False)
    assert [t["type"] for t in r.metrics["tasks"]] == ["regression"]


def test_vector_table_with_two_targets(tmp_path):
    from model_builders import vector_model

    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 4)).astype(np.float32)
    kind = np.where(x[:, 0] + x[:, 1] > 0, "pos", "neg")
    level = 3 * x[:, 2] - x[:, 3] + 0.05 * rng.standard_normal(120)
    path = tmp_path / "v.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "d", "kind", "level"])
        for i in range(120):
            w.writerow([*x[i].tolist(), kind[i], "" if i % 9 == 0 else f"{level[i]:.5f}"])
    r = finetune(vector_model(), path, tasks=["kind", "level"], progress=False)
    t = {t["name"]: t for t in r.metrics["tasks"]}
    assert t["kind"]["type"] == "classification" and t["level"]["type"] == "regression"  # inferred: floats
    assert t["level"]["labelled"] == 120 - len(range(0, 120, 9))
    assert t["kind"]["validation"]["accuracy"] > 0.8 and t["level"]["validation"]["r2"] > 0.5


def test_bad_tables_are_one_line_errors(tmp_path, model):
    table, rows = image_table(tmp_path)
    with pytest.raises(DataError, match="has no column 'age'"):
        finetune(model, table, tasks=["age"], progress=False)
    with pytest.raises(UsageError, match="the type must be classification or regression"):
        finetune(model, table, tasks=["color:ordinal"], progress=False)
    text = table.read_text().replace("img/3.png,red,", "img/3.png,red,big", 1)
    (tmp_path / "text.csv").write_text(text)
    with pytest.raises(DataError, match=r"row 4, column 'area': 'big49' is not a number"):
        finetune(model, tmp_path / "text.csv", tasks=["area:regression"], progress=False)
    one = tmp_path / "one.csv"
    one.write_text("path,kind\n" + "".join(f"img/{i}.png,same\n" for i in range(10)))
    with pytest.raises(DataError, match="task 'kind' has 1 class"):
        finetune(model, one, progress=False)
    few = tmp_path / "few.csv"
    few.write_text("path,kind,size\n" + "".join(f"img/{i}.png,{'ab'[i % 2]},{'' if i > 1 else i}\n" for i in range(10)))
    with pytest.raises(DataError, match="task 'size' has 2 labelled rows"):
        finetune(model, few, tasks=["kind", "size:regression"], progress=False)
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
    assert [s["file"] for s in r.metrics["data"]["skipped"]] == [str(tmp_path / rows[5]["path"])]


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
    j = r.metrics["shared_trunk"]
    assert j["hidden"] == 16 and 1 <= j["best_epoch"] <= j["epochs_run"] <= 150
    # default weights: each task's loss normalized by its initial value
    assert j["weights"]["color"] == pytest.approx(1 / j["initial_losses"][0])
    assert j["weights"]["area"] == pytest.approx(1 / j["initial_losses"][1])
    m = onnx.load(out)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm" and n.output[0].startswith("porter/head/")]
    assert len(gemms) == 3  # the trunk once, then one layer per task
    assert r.metrics["tasks"][0]["validation"]["accuracy"] >= 0.8
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
    assert w.metrics["shared_trunk"]["weights"]["area"] == 0.0


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
