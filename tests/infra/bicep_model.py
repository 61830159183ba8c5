"""A small, read-only model of infra/*.bicep built on pycep-parser.

pycep parses one file at a time and leaves every reference unresolved: an identifier and a string
literal both come back as a Python `str`, `'${x}'` interpolations stay text, and `a.b.c` becomes a
nested `property_accessor` tree. This module adds just enough evaluation to let the tests ask
questions across files: a module's parameters are bound to the (resolved) arguments main.bicep
passes, parameters fall back to their defaults, variables are substituted, property accessors are
rendered as dotted text (`storage.outputs.name`). Anything else (function calls, conditionals) is
returned as pycep's tree, untouched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pycep import BicepParser

# INFRA_DIR lets a mutation check point the tests at a modified copy.
INFRA = Path(os.environ.get("INFRA_DIR") or Path(__file__).resolve().parents[2] / "infra").resolve()

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_file(path: Path) -> dict[str, Any]:
    """Parsed tree of one file (cached: pycep's parser is slow and the trees are only read)."""
    return _parse_text(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _parse_text(text: str) -> dict[str, Any]:
    return BicepParser().parse(text=text)


def dotted(expr: Any) -> str | None:
    """`a.b.c` as text if `expr` is a property-accessor chain of identifiers, else None."""
    if isinstance(expr, str):
        return expr
    if isinstance(expr, dict) and "operator" in expr:
        op = expr["operator"]
        if op.get("type") == "property_accessor":
            left = dotted(op["operands"]["operand_1"])
            right = dotted(op["operands"]["operand_2"])
            if left is not None and right is not None:
                return f"{left}.{right}"
    return None


def unwrap(resource: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(config, condition) of a resource or module; condition is None when unconditional."""
    config = resource["config"]
    if "condition" in config and "config" in config:
        return config["config"], config["condition"]
    return config, None


@dataclass
class BicepFile:
    """One parsed file plus the argument values its caller binds to its parameters."""

    path: Path
    tree: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> dict[str, Any]:
        return self.tree.get("parameters", {})

    @property
    def variables(self) -> dict[str, Any]:
        return self.tree.get("variables", {})

    @property
    def resources(self) -> dict[str, Any]:
        return self.tree.get("resources", {})

    @property
    def modules(self) -> dict[str, Any]:
        return self.tree.get("modules", {})

    @property
    def outputs(self) -> dict[str, Any]:
        return self.tree.get("outputs", {})

    def resources_of_type(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.resources.items() if v["type"].lower() == rtype.lower()}

    def decorator(self, param: str, kind: str) -> Any:
        for d in self.parameters[param].get("decorators", []):
            if d.get("type") == kind:
                return d.get("argument")
        return None

    def resolve(self, expr: Any, _depth: int = 0) -> Any:
        """Evaluate what can be evaluated statically (see module docstring)."""
        if _depth > 50:
            raise RecursionError(f"reference cycle while resolving {expr!r} in {self.path.name}")
        if isinstance(expr, str):
            if _IDENTIFIER.match(expr):
                if expr in self.args:
                    return self.args[expr]
                if expr in self.parameters:
                    if "default" in self.parameters[expr]:
                        return self.resolve(self.parameters[expr]["default"], _depth + 1)
                    return expr
                if expr in self.variables:
                    return self.resolve(self.variables[expr]["value"], _depth + 1)
                return expr

            def substitute(m: re.Match[str]) -> str:
                value = self.resolve(m.group(1).strip(), _depth + 1)
                if isinstance(value, bool):
                    return str(value).lower()
                if isinstance(value, (str, int)):
                    return str(value)
                return m.group(0)

            return _INTERPOLATION.sub(substitute, expr)
        if isinstance(expr, list):
            return [self.resolve(e, _depth + 1) for e in expr]
        if isinstance(expr, dict):
            text = dotted(expr)
            if text is not None:
                return text
            if "operator" in expr or "function" in expr:
                return expr
            return {k: self.resolve(v, _depth + 1) for k, v in expr.items()}
        return expr


@dataclass
class Deployment:
    """main.bicep and each module it calls, with the module parameters bound."""

    main: BicepFile
    modules: dict[str, BicepFile]  # module symbolic name in main.bicep -> bound module file

    @classmethod
    def load(cls, infra: Path = INFRA) -> "Deployment":
        main = BicepFile(infra / "main.bicep", parse_file(infra / "main.bicep"))
        modules = {}
        for symbol, module in main.modules.items():
            config, _ = unwrap(module)
            path = (infra / module["detail"]["path"]).resolve()
            args = {k: main.resolve(v) for k, v in config.get("params", {}).items()}
            modules[symbol] = BicepFile(path, parse_file(path), args)
        return cls(main, modules)

    def module_for(self, filename: str) -> tuple[str, BicepFile]:
        matches = [(s, m) for s, m in self.modules.items() if m.path.name == filename]
        assert len(matches) == 1, f"expected main.bicep to call {filename} exactly once, got {len(matches)}"
        return matches[0]

    def all_files(self) -> list[BicepFile]:
        return [self.main, *self.modules.values()]

    def output_source(self, reference: str) -> tuple[BicepFile, str]:
        """For `mod.outputs.x` in main.bicep: the module file and the resolved output expression."""
        parts = reference.split(".")
        assert len(parts) == 3 and parts[1] == "outputs", f"not a module output reference: {reference}"
        module = self.modules[parts[0]]
        return module, module.resolve(module.outputs[parts[2]]["value"])

    def resource_behind(self, reference: str) -> tuple[BicepFile, str, dict[str, Any]]:
        """For `mod.outputs.x` whose value is `res.y...`: (module file, resource symbol, resource)."""
        module, value = self.output_source(reference)
        assert isinstance(value, str), f"{reference} is not a plain reference: {value!r}"
        symbol = value.split(".")[0]
        assert symbol in module.resources, f"{reference} -> {value}: no resource {symbol} in {module.path.name}"
        return module, symbol, module.resources[symbol]


def strip_comments(text: str) -> str:
    """Bicep source without // and /* */ comments (string literals kept intact)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == "'":
                in_string = False
            i += 1
        elif c == "'":
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)
