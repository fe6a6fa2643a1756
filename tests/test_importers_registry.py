"""The importer registry: every importer registers itself once, and every importer is covered by fixtures and a
parity test (a guard in the spirit of optimum's test_all_models_tested: a new importer fails here until it has both)."""

from __future__ import annotations

import ast

import pytest

from conftest import FIXTURES, ROOT
from porter.importers import _REGISTRY, get_importer, list_importers, register_importer

# importer -> (fixture folder, test file, the parity test in it, the tolerance that test asserts)
COVERAGE = {
    "keras": ("keras", "test_keras_convert.py", "test_fixture_parity_at_several_batch_sizes", "1e-4"),
    "torchhub": ("torchhub", "test_torchhub.py", "test_local_entry_parity_metadata_and_dynamic_batch", "1e-4"),
    "tfjs": ("tfjs", "test_tfjs_parity.py", "test_onnx_matches_tfjs_runtime", "<= TOLERANCE"),
}


def test_every_importer_registers_under_its_name():
    for name in list_importers():
        fn = get_importer(name)
        assert _REGISTRY[name] is fn and callable(fn)
    assert sorted(_REGISTRY) == list_importers()


def test_a_second_registration_raises():
    with pytest.raises(RuntimeError, match="registered twice"):
        register_importer("keras")(lambda ref, opts: None)
    assert _REGISTRY["keras"].__module__ == "porter.importers.keras"


@pytest.mark.parametrize("name", list_importers())
def test_every_importer_has_fixtures_and_a_parity_test(name):
    assert name in COVERAGE, f"importer {name!r} has no entry here: add its fixtures and parity test"
    folder, test_file, test_name, tolerance = COVERAGE[name]
    fixtures = [p for p in (FIXTURES / folder).rglob("*") if p.is_file() and p.suffix not in (".py", ".sh", ".js")]
    assert len(fixtures) >= 2, f"no model fixtures for importer {name!r} in fixtures/{folder}"
    source = (ROOT / "tests" / test_file).read_text()
    tree = ast.parse(source)
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == test_name), None)
    assert fn is not None, f"{test_file} has no {test_name}"
    assert tolerance in ast.get_source_segment(source, fn), f"{test_name} does not assert parity ({tolerance})"
