import importlib
import re
import sys
from pathlib import Path

import pytest

from clbench import ClbenchError
from clbench.cli import main
from clbench.plugins import available, create, find
from clbench.testing import smoke_test

STRATEGIES_PAGE = Path(__file__).resolve().parent.parent / "docs" / "strategies.md"


def readme_example() -> str:
    """The example plugin of the docs' strategies page."""
    text = STRATEGIES_PAGE.read_text()
    return re.search(r"<!-- example-plugin -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_docs_example_plugin_is_short_and_passes_the_smoke_test(tmp_path):
    source = readme_example()
    assert len(source.strip().splitlines()) < 40
    path = tmp_path / "my_l2.py"
    path.write_text(source)
    rows = smoke_test(f"{path}:L2Anchor", options={"l2_anchor.strength": "0.05"}, workdir=tmp_path)
    assert set(rows["strategy"]) == {"l2_anchor"}       # the registered name, never the path
    assert find(f"{path}:L2Anchor").origin == f"file {path}"


def test_package_module_reference(tmp_path, monkeypatch):
    (tmp_path / "someplugins").mkdir()
    (tmp_path / "someplugins" / "__init__.py").write_text("")
    (tmp_path / "someplugins" / "mine.py").write_text(
        "from clbench.strategy import Strategy\n\nclass Quiet(Strategy):\n    '''Does nothing, quietly.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find("someplugins.mine:Quiet")
    assert found.origin == "module someplugins.mine" and found.cls.name == "quiet"


def make_entry_point(tmp_path, monkeypatch, name, module_source, target="fakeplug:Thing"):
    (tmp_path / "fakeplug.py").write_text(module_source)
    dist = tmp_path / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[clbench.strategies]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fakeplug", raising=False)  # each test brings its own fakeplug
    importlib.invalidate_caches()


def test_entry_point_strategies_are_found_and_listed(tmp_path, monkeypatch, capsys):
    make_entry_point(tmp_path, monkeypatch, "thing", "from clbench.strategy import Strategy, register\n\n"
                     "@register('thing')\nclass Thing(Strategy):\n    '''A third-party strategy.'''\n\n"
                     "    def __init__(self, *, knob: int = 3) -> None:\n        self.knob = knob\n")
    assert available()["thing"].origin == "entry point fakeplug:Thing"
    strategy, resolved = create("thing", {"thing.knob": "5"})
    assert strategy.knob == 5 and resolved == {"thing.knob": 5}
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "thing  [entry point fakeplug:Thing]" in out and "--set thing.knob=3" in out
    assert "naive  [built-in]" in out and "--set ewc.lam=10.0" in out


def test_a_broken_entry_point_breaks_only_its_own_name(tmp_path, monkeypatch, capsys):
    make_entry_point(tmp_path, monkeypatch, "broken", "x = 1\nimport no_such_module_anywhere\n")
    assert create("naive", {})[0].name == "naive"                  # loaded lazily: naive never touches it
    with pytest.raises(ClbenchError, match=r"entry point 'broken' \(fakeplug:Thing\): import failed at "
                                           + re.escape(str(tmp_path / "fakeplug.py")) + r":2: ModuleNotFoundError"):
        create("broken", {})
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "broken  [entry point fakeplug:Thing]  BROKEN" in out and "naive  [built-in]" in out


def test_an_entry_point_cannot_take_a_builtin_name(tmp_path, monkeypatch, capsys):
    make_entry_point(tmp_path, monkeypatch, "naive", "from clbench.strategy import Strategy\n\n"
                     "class Thing(Strategy):\n    name = 'naive'\n")
    assert find("naive").origin == "built-in"
    assert main(["strategies"]) == 0
    assert "naive (entry point fakeplug:Thing)  [entry point fakeplug:Thing]  BROKEN\n    uses the name of the " \
           "built-in strategy" in capsys.readouterr().out


@pytest.mark.parametrize("source, ref, message", [
    ("x = 1\n", "Nope", "has no class 'Nope'"),
    ("x = 1\n", "x", "is not a subclass of clbench.strategy.Strategy"),
    ("x = 1\nraise RuntimeError('boom')\n", "X", "import failed at {path}:2: RuntimeError: boom"),
    ("def f(:\n", "X", "import failed at {path}:1: SyntaxError"),
    ("import json\n\njson.loads('{')\n", "X", "import failed at {path}:3: JSONDecodeError"),
    ("from clbench.strategy import Strategy, register\n\n@register('naive')\nclass X(Strategy):\n    pass\n", "X",
     "strategy name 'naive' registered twice"),
])
def test_broken_file_plugins_are_errors_naming_the_plugin(tmp_path, source, ref, message):
    path = tmp_path / f"plug_{abs(hash(source))}.py"
    path.write_text(source)
    with pytest.raises(ClbenchError, match=re.escape(f"strategy plugin '{path}:{ref}'") + ".*" +
                       re.escape(message.format(path=path))):
        find(f"{path}:{ref}")


def test_a_builtin_strategy_file_named_by_its_path_is_one_module():
    import clbench.strategies.ewc as builtin
    found = find(f"{builtin.__file__}:EWC")                       # no second module, no double registration
    assert found.cls is builtin.EWC


@pytest.mark.parametrize("spec, options, message", [
    ("lwf", {"lwf.lamb": "1"}, "'lwf' has no hyperparameter 'lamb'; did you mean 'lam'?"),
    ("lwf", {"ewc.lam": "1"}, "--set ewc.lam: strategy 'ewc' is not part of --strategy lwf"),
    ("lwf", {"lwf.lam": "abc"}, "--set lwf.lam: lam = 'abc': expected float"),
    ("lwf", {"lam": "1"}, "expected STRATEGY.PARAM=VALUE"),
    ("ewc", {"ewc.gamma": "2"}, "strategy 'ewc': need lam >= 0"),
    ("naive+lwf", {}, "'naive' cannot be combined: naive is plain fine-tuning"),
    ("lwf+lwf", {}, "'lwf' appears twice"),
    ("lwff", {}, "strategy 'lwff' not found; did you mean 'lwf'?"),
])
def test_bad_strategy_options_are_clear_errors(spec, options, message):
    with pytest.raises(ClbenchError, match=re.escape(message)):
        create(spec, options)


def test_composition_resolves_every_parts_options():
    strategy, resolved = create("bn_frozen+lwf", {"lwf.temperature": "3"})
    assert strategy.name == "bn_frozen+lwf"
    assert resolved == {"bn_frozen.freeze_affine": False, "bn_frozen.from_stage": 2, "lwf.lam": 1.0,
                        "lwf.temperature": 3.0}
