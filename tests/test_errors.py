"""The exception tree in connector/errors.py's docstring is the real one, complete."""

from __future__ import annotations

import inspect
import re

from connector import errors


def test_the_docstring_tree_lists_every_error_under_its_real_parent():
    drawn: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) of the open branches
    for line in errors.__doc__.splitlines():
        match = re.match(r"^[\s│├└─]*([A-Z]\w+)(\s|$)", line)
        if not match or not (match.group(1) == "ConnectorError" or "──" in line):
            continue
        name, column = match.group(1), match.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        drawn[name] = stack[-1][1] if stack else ""
        stack.append((column, name))
    real = {name: "" if cls is errors.ConnectorError else cls.__mro__[1].__name__
            for name, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.ConnectorError)}
    assert drawn == real
