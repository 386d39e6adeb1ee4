"""Declaring the parameter table (parameters.py) on an rclpy node, with one-line errors, and
reading the values back (settings.py makes the node's settings of them)."""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException, ParameterException
from rclpy.node import Node

from .parameters import PARAMETERS, ParamSpec, StartupError

__all__ = ["StartupError", "declare_parameters", "descriptor", "parameter_values"]

# Parameters rclpy declares itself, and prefixes it owns; not "unknown" in a params file.
_BUILTIN_PARAMETERS = ("use_sim_time", "start_type_description_service")
_BUILTIN_PREFIXES = ("qos_overrides.",)


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    out = ParameterDescriptor(name=spec.name, description=spec.description,
                              additional_constraints=spec.constraints, read_only=spec.read_only)
    if spec.range is not None:
        low, high = spec.range
        if isinstance(spec.default, float):
            out.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
        else:
            out.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
    return out


def _overrides(node: Node) -> dict[str, Any]:
    # rclpy keeps the --params-file / -p values here; there is no public getter.
    return dict(getattr(node, "_parameter_overrides", {}) or {})


def _given(node: Node, name: str) -> Any:
    given = _overrides(node).get(name)
    return given.value if given is not None else "?"


def declare_parameters(node: Node) -> dict[str, Any]:
    """Declare every parameter of the table; their values. ``StartupError`` for a value of
    the wrong type or out of range, and for a parameter the table does not know."""
    known = {spec.name for spec in PARAMETERS} | set(_BUILTIN_PARAMETERS)
    unknown = sorted(n for n in _overrides(node) if n not in known and not n.startswith(_BUILTIN_PREFIXES))
    values: dict[str, Any] = {}
    for spec in PARAMETERS:
        try:
            values[spec.name] = node.declare_parameter(spec.name, spec.default, descriptor(spec)).value
        except InvalidParameterTypeException:
            value = _given(node, spec.name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            hint = f" (write {float(value)!r})" if isinstance(spec.default, float) and is_int else ""
            raise StartupError(f"invalid parameter {spec.name}: expected {spec.type_name}, got "
                               f"{type(value).__name__} {value!r}{hint}") from None
        except InvalidParameterValueException:
            raise StartupError(f"invalid parameter {spec.name}: {_given(node, spec.name)!r} is outside "
                               f"{spec.constraints}") from None
        except ParameterException as err:
            raise StartupError(f"invalid parameter {spec.name}: {err}") from None
    if unknown:
        raise StartupError(f"unknown parameter(s) {', '.join(unknown)}; known: "
                           f"{', '.join(s.name for s in PARAMETERS)}")
    return {k: _plain(v) for k, v in values.items()}


def parameter_values(node: Node) -> dict[str, Any]:
    """``{name: value}`` of every parameter of the table as the node holds it now (after
    any run-time change it accepted)."""
    return {spec.name: _plain(node.get_parameter(spec.name).value) for spec in PARAMETERS}


def _plain(value: Any) -> Any:
    return list(value) if not isinstance(value, (bool, int, float, str)) else value
