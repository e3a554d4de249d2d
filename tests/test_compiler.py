"""Function source to callable: names, errors with file/line/column, tracebacks with source."""

from __future__ import annotations

import linecache
import pickle
import traceback

import cloudpickle
import pytest

from clustorage.compiler import (
    check_function_name,
    compile_function,
    filename,
    register_source,
    restore_filename,
)
from clustorage.errors import ClustorageError, CompileError


def test_def_source_compiles() -> None:
    """A 'def NAME' block compiles to a callable named NAME."""
    add = compile_function("add", "def add(a, b):\n    return a + b\n")
    assert add(2, 3) == 5
    assert add.__name__ == "add"
    assert add.__code__.co_filename == "<cluster:add>"


def test_indented_def_source_compiles() -> None:
    """Source pasted with a common indent and blank edges still compiles."""
    source = "\n\n    def mul(a, b):\n        return a * b\n\n"
    assert compile_function("mul", source)(4, 5) == 20


def test_def_with_helpers_and_imports() -> None:
    """The source may import and define helpers before NAME."""
    source = (
        "import math\n\n"
        "def _half(x):\n    return x / 2\n\n"
        "def area(r):\n    return _half(math.tau) * r * r\n"
    )
    area = compile_function("area", source)
    assert area(1) == pytest.approx(3.14159, rel=1e-4)


def test_lambda_source_compiles_and_is_renamed() -> None:
    """An expression 'lambda ...' compiles to a callable whose name is NAME."""
    add = compile_function("add", "lambda a, b: a + b")
    assert add(2, 3) == 5
    assert add.__name__ == "add"
    assert add.__qualname__ == "add"


def test_compiled_function_pickles_with_cloudpickle() -> None:
    """A compiled function survives cloudpickle (it travels to every node)."""
    fn = compile_function("twice", "def twice(x):\n    return 2 * x\n")
    assert cloudpickle.loads(cloudpickle.dumps(fn))(21) == 42


@pytest.mark.parametrize("source", ["def f(:\n    pass\n", "lambda: (", "def f():\nreturn 1\n"])
def test_bad_syntax_is_a_compile_error(source: str) -> None:
    """Source that does not parse raises CompileError with <cluster:NAME>, line and column."""
    with pytest.raises(CompileError) as info:
        compile_function("f", source)
    error = info.value
    assert error.filename == "<cluster:f>"
    assert error.name == "f"
    assert isinstance(error.lineno, int) and error.lineno >= 1
    assert isinstance(error.offset, int) and error.offset >= 1
    assert "<cluster:f>" in str(error)
    assert f"line {error.lineno}" in str(error)


def test_syntax_error_points_at_the_right_line() -> None:
    """A syntax error on line 3 is reported on line 3 with that line's text."""
    source = "def f(x):\n    y = x\n    return y +\n"
    with pytest.raises(CompileError) as info:
        compile_function("f", source)
    assert info.value.lineno == 3
    assert info.value.text is not None
    assert "return y +" in info.value.text


def test_compile_error_is_a_syntax_error_and_ours() -> None:
    """CompileError is both a SyntaxError and a ClustorageError."""
    with pytest.raises(CompileError) as info:
        compile_function("f", "def f(:")
    assert isinstance(info.value, SyntaxError)
    assert isinstance(info.value, ClustorageError)


def test_runtime_error_at_definition_time() -> None:
    """An exception while running the definition is a CompileError naming the line."""
    source = "import math\nLIMIT = 1 / 0\n\ndef f(x):\n    return x\n"
    with pytest.raises(CompileError) as info:
        compile_function("f", source)
    error = info.value
    assert "ZeroDivisionError" in error.msg
    assert error.filename == "<cluster:f>"
    assert error.lineno == 2
    assert error.text == "LIMIT = 1 / 0"


def test_runtime_error_in_expression() -> None:
    """An expression that fails when evaluated is a CompileError on its line."""
    with pytest.raises(CompileError) as info:
        compile_function("f", "undefined_name")
    assert "NameError" in info.value.msg
    assert info.value.lineno == 1


def test_source_without_name_is_a_compile_error() -> None:
    """Source that defines something else says NAME is not defined."""
    with pytest.raises(CompileError, match="does not define a function 'f'") as info:
        compile_function("f", "def g():\n    return 1\n")
    assert info.value.filename == "<cluster:f>"


@pytest.mark.parametrize("source", ["42", "'text'", "f = 3\n", "x = 1\n"])
def test_non_callable_is_a_compile_error(source: str) -> None:
    """An expression or NAME that is not callable says the function is not defined."""
    with pytest.raises(CompileError, match="does not define a function"):
        compile_function("f", source)


@pytest.mark.parametrize("name", ["", "1x", "a-b", "a b", "a.b"])
def test_invalid_function_name(name: str) -> None:
    """A name that is not a Python identifier raises ValueError before compiling."""
    with pytest.raises(ValueError, match="identifier"):
        check_function_name(name)
    with pytest.raises(ValueError):
        compile_function(name, "lambda: 1")


@pytest.mark.parametrize("name", ["def", "None", "True", "lambda", "import"])
def test_keyword_function_name(name: str) -> None:
    """A Python keyword cannot name a function: refused by the check and by the compiler."""
    with pytest.raises(ValueError, match="keyword"):
        check_function_name(name)
    with pytest.raises(ValueError, match="keyword"):
        compile_function(name, "lambda: 1")


def test_traceback_shows_the_source_line() -> None:
    """A traceback through a compiled function shows <cluster:NAME> and its source text."""
    fn = compile_function("ratio", "def ratio(a, b):\n    scaled = a * 10\n    return scaled / b\n")
    try:
        fn(1, 0)
    except ZeroDivisionError:
        text = traceback.format_exc()
    else:
        pytest.fail("no ZeroDivisionError")
    assert 'File "<cluster:ratio>", line 3, in ratio' in text
    assert "return scaled / b" in text


def test_source_survives_linecache_checkcache() -> None:
    """linecache.checkcache() (run by traceback printing) does not drop the source."""
    compile_function("keep", "def keep():\n    return 1\n")
    linecache.checkcache()
    assert linecache.getline("<cluster:keep>", 2).strip() == "return 1"


def test_register_source_and_restore_filename() -> None:
    """A function received by value gets its <cluster:NAME> file name (and source) back."""
    fn = compile_function("moved", "def moved(x):\n    return 1 / x\n")
    received = cloudpickle.loads(cloudpickle.dumps(fn))
    received.__code__ = received.__code__.replace(co_filename="elsewhere.py")
    restored = restore_filename("moved", received)
    register_source("moved", "def moved(x):\n    return 1 / x\n")
    assert restored.__code__.co_filename == filename("moved")
    with pytest.raises(ZeroDivisionError) as info:
        restored(0)
    assert "return 1 / x" in "".join(traceback.format_exception(info.value))


def test_compile_error_pickles_with_its_fields() -> None:
    """A CompileError survives pickle with message, name, file, line, column, text and cell."""
    error = CompileError("invalid syntax", name="f", lineno=3, offset=7, text="return y +")
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(error))
        assert type(back) is CompileError
        assert (back.msg, back.name, back.filename) == ("invalid syntax", "f", "<cluster:f>")
        assert (back.lineno, back.offset, back.text) == (3, 7, "return y +")
        assert str(back) == str(error) == "invalid syntax (<cluster:f>, line 3, column 7)"
    in_cell = CompileError("invalid syntax", name="f", lineno=4, cell="Cell In[7]")
    back = pickle.loads(pickle.dumps(in_cell))
    assert back.cell == "Cell In[7]" and back.filename == "<cluster:f>"
    assert str(back) == str(in_cell) == "invalid syntax (<cluster:f> in Cell In[7], line 4)"


def test_compile_error_from_compiler_pickles() -> None:
    """A CompileError raised by compile_function round-trips through pickle."""
    with pytest.raises(CompileError) as info:
        compile_function("f", "def f(:\n")
    back = pickle.loads(pickle.dumps(info.value))
    assert (back.filename, back.lineno, back.offset) == (
        info.value.filename,
        info.value.lineno,
        info.value.offset,
    )


def test_system_exit_at_definition_time_is_a_compile_error() -> None:
    """Source that exits while being defined is a CompileError: it must not stop the loader."""
    with pytest.raises(CompileError, match="SystemExit") as info:
        compile_function("f", "import sys\nsys.exit(3)\n\ndef f():\n    return 1\n")
    assert info.value.lineno == 2
