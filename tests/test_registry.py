"""The one Registry type behind formatters, rewards and model classes: its re-registration rule and errors."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from aa_lightning.registry import Registry, UnknownNameError


def first() -> str:
    return "first"


def second() -> str:
    return "second"


def test_register_get_names_contains_iter() -> None:
    registry: Registry = Registry("thing")
    assert registry.register("b", second) is second  # returns the value
    assert registry.register("a")(first) is first  # the decorator form returns it unchanged too
    assert registry.get("a") is first and registry["b"] is second
    assert registry.names() == ["a", "b"] and list(registry) == ["a", "b"] and len(registry) == 2
    assert "a" in registry and "c" not in registry and ["unhashable"] not in registry
    assert dict(registry) == {"a": first, "b": second}
    assert registry.get("c", None) is None  # an explicit default, never a silent None


def test_same_object_again_is_a_no_op() -> None:
    registry: Registry = Registry("thing")
    registry.register("a", first)
    registry.register("a", first)
    registry.register("a")(first)
    assert registry["a"] is first and len(registry) == 1


def test_different_object_needs_override() -> None:
    registry: Registry = Registry("thing")
    registry.register("a", first)
    with pytest.raises(
        ValueError, match="thing 'a' is already registered to .*first; pass override=True"
    ) as info:
        registry.register("a", second)
    assert "second" in str(info.value)  # names the newcomer too
    assert registry["a"] is first  # a refused registration changes nothing
    registry.register("a", second, override=True)
    assert registry["a"] is second


def test_a_reloaded_definition_is_the_same_definition(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module reload (or a re-run notebook cell) makes new objects for the same definitions: no error, and
    the newest definition is the one kept."""
    (tmp_path / "registry_reload_mod.py").write_text(
        textwrap.dedent(
            """
            from aa_lightning.registry import Registry

            REG = globals().get("REG") or Registry("plugin")  # survives the reload, like a package registry

            @REG.register("plugin")
            class Plugin:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("registry_reload_mod")
    try:
        old = module.Plugin
        module = importlib.reload(module)
        assert module.Plugin is not old and module.REG["plugin"] is module.Plugin
    finally:
        sys.modules.pop("registry_reload_mod", None)


def test_origin_compares_the_wrapped_object() -> None:
    class Wrapper:
        def __init__(self, fn: object) -> None:
            self.fn = fn

    registry: Registry = Registry("wrapped thing", origin=lambda w: w.fn)
    registry.register("a", Wrapper(first))
    registry.register("a", Wrapper(first))  # a new wrapper around the same function: fine, and kept
    with pytest.raises(ValueError, match="already registered to .*first; .* with .*second"):
        registry.register("a", Wrapper(second))


def test_names_must_be_non_empty_strings() -> None:
    registry: Registry = Registry("thing")
    for bad in ("", "  ", None, 3):
        with pytest.raises(ValueError, match="thing name must be a non-empty string"):
            registry.register(bad)  # type: ignore[arg-type]


def test_unknown_name_lists_known_names_and_suggests_close_ones() -> None:
    registry: Registry = Registry("colour", hint=" (or define your own)")
    for name in ("Crimson", "teal", "turquoise"):
        registry.register(name, name.upper())
    with pytest.raises(UnknownNameError) as info:
        registry.get("crimson")
    message = str(info.value)  # the message itself, not KeyError's repr of it
    assert message.startswith("unknown colour 'crimson'; did you mean 'Crimson'? (names are case-sensitive)")
    assert message.endswith("known colours: Crimson, teal, turquoise (or define your own)")
    assert isinstance(info.value, KeyError)

    with pytest.raises(KeyError, match="did you mean 'teal'"):
        registry["tael"]
    with pytest.raises(UnknownNameError, match=r"unknown colour \['x'\]; known colours"):
        registry.get(["x"])  # type: ignore[arg-type]  (an unhashable name from a config)
    assert "did you mean" not in str(registry.unknown("zzzz"))
    assert str(Registry("colour").unknown("x")) == "unknown colour 'x'; known colours: none"


def test_error_class_pop_and_copy() -> None:
    class UnknownColour(UnknownNameError):
        pass

    registry: Registry = Registry("colour", error=UnknownColour)
    registry.register("teal", 1)
    with pytest.raises(UnknownColour):
        registry.get("red")

    clone = registry.copy()
    clone.register("red", 2)
    assert "red" in clone and "red" not in registry  # registering into a copy leaves the original alone
    with pytest.raises(UnknownColour):
        clone.get("blue")

    assert clone.pop("red") == 2 and clone.pop("red", None) is None
    with pytest.raises(UnknownColour):
        clone.pop("red")


def test_importable_names_share_one_syntax_and_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``package.module:attr`` names (formatters, rewards, environments, tools, evaluation tasks) all go through
    ``import_path_module`` / ``path_attribute``: one syntax, the same errors in every table."""
    from aa_lightning.data.formatters.registry import UnknownTemplateError, get_formatter_class
    from aa_lightning.environments import build_environment
    from aa_lightning.environments.tools import get_tool
    from aa_lightning.evaluation.registry import resolve_task
    from aa_lightning.registry import import_path_module, path_attribute
    from aa_lightning.rewards import get_reward

    (tmp_path / "plugin_h7.py").write_text("class Outer:\n    class Inner:\n        pass\n")
    (tmp_path / "broken_h7.py").write_text("import not_installed_h7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, attr = import_path_module("plugin_h7:Outer.Inner", "thing")
    assert path_attribute(module, attr, "plugin_h7:Outer.Inner", "thing").__qualname__ == "Outer.Inner"
    with pytest.raises(UnknownNameError, match="write an imported thing as 'package.module:name'"):
        import_path_module("plugin_h7:", "thing")
    with pytest.raises(
        UnknownNameError, match="thing 'plugin_h7:Nope': module 'plugin_h7' has no attribute 'Nope'"
    ):
        path_attribute(module, "Nope", "plugin_h7:Nope", "thing")
    # a module that exists but fails on its own import keeps its own error (the user's bug, not a bad name)
    with pytest.raises(ModuleNotFoundError, match="not_installed_h7"):
        import_path_module("broken_h7:x", "thing")

    missing = "nowhere_h7.sub:thing"
    for lookup, error in (
        (get_formatter_class, UnknownTemplateError),
        (get_reward, UnknownNameError),
        (build_environment, UnknownNameError),
        (get_tool, UnknownNameError),
        (resolve_task, ValueError),
    ):
        with pytest.raises(error, match="no module named 'nowhere_h7'"):
            lookup(missing)
