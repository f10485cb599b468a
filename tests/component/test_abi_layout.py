"""The ctypes ABI against C: our header compiled (host and aarch64 under qemu) and the reference layout.

The ctypes side is computed by CPython from the field list and the LP64 sizes of the C scalar
types, so the same numbers hold on x86_64 and aarch64; the aarch64 test compares them with a
static aarch64 program built from our header and run under qemu-aarch64-static.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import functools
import re
import subprocess
from enum import IntEnum
from pathlib import Path

import pytest

from rkllm_runtime import abi

Layout = dict[str, tuple[int, int, dict[str, tuple[int, int]]]]

STRUCT_LINE = re.compile(r"^sizeof\((\w+)\) = (\d+), alignof = (\d+)$")
FIELD_LINE = re.compile(r"^\s+(\w+)\s+off\s+(\d+)\s+size\s+(\d+)$")


def parse_layout(text: str) -> Layout:
    """Parse the reference format: 'sizeof(T) = N, alignof = A' then '  field off O size S' lines."""
    layout: Layout = {}
    current: dict[str, tuple[int, int]] | None = None
    for line in text.splitlines():
        if match := STRUCT_LINE.match(line):
            current = {}
            layout[match[1]] = (int(match[2]), int(match[3]), current)
        elif (match := FIELD_LINE.match(line)) and current is not None:
            current[match[1]] = (int(match[2]), int(match[3]))
    return layout


def ctypes_layout() -> Layout:
    return {
        struct.__name__: (ctypes.sizeof(struct), ctypes.alignment(struct), abi.field_layout(struct))
        for struct in abi.STRUCTS
    }


def probe_source() -> str:
    """A C program printing, from our header, the layout of every struct and field ctypes knows."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "rkllm.h"', "int main(void) {"]
    for struct in abi.STRUCTS:
        name = struct.__name__
        lines.append(
            f'  printf("sizeof({name}) = %zu, alignof = %zu\\n", sizeof({name}), _Alignof({name}));'
        )
        for field in abi.field_layout(struct):
            lines.append(
                f'  printf("  {field} off %zu size %zu\\n", offsetof({name}, {field}), '
                f"sizeof((({name} *)0)->{field}));"
            )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


C_SCALARS = {
    ctypes.c_int: "int",
    ctypes.c_int32: "int32_t",
    ctypes.c_void_p: "void *",
    ctypes.c_char_p: "const char *",
}


def c_type(ctype: object) -> str:
    if ctype is abi.LLMResultCallback:
        return "LLMResultCallback"
    if ctype in C_SCALARS:
        return C_SCALARS[ctype]
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        return ctype.__name__
    pointee = getattr(ctype, "_type_", None)
    if pointee is abi.LLMHandle:
        return "LLMHandle *"
    if pointee is not None:
        return f"{c_type(pointee)} *"
    raise AssertionError(f"no C spelling for {ctype!r}")


def prototype_source() -> str:
    """Compile-time checks: each ctypes prototype and enum value must agree with the header."""
    lines = ['#include "rkllm.h"']
    for name, (restype, argtypes) in abi.FUNCTIONS.items():
        arguments = ", ".join(c_type(arg) for arg in argtypes) or "void"
        lines.append(f"{c_type(restype)} (*check_{name})({arguments}) = {name};")
    enums: list[type[IntEnum]] = [abi.LLMCallState, abi.RKLLMInputType, abi.RKLLMInferMode]
    for enum in enums:
        lines.append(f"_Static_assert(sizeof({enum.__name__}) == 4, \"{enum.__name__} size\");")
        lines += [f'_Static_assert({member.name} == {member.value}, "{member.name}");' for member in enum]
    for bit in range(8):
        lines.append(f'_Static_assert(CPU{bit} == {getattr(abi, f"CPU{bit}")}, "CPU{bit}");')
    return "\n".join(lines) + "\n"


def compile_probe(compiler: str, header_dir: Path, tmp_path: Path, extra: list[str]) -> Path:
    source = tmp_path / "ctypes_probe.c"
    source.write_text(probe_source())
    binary = tmp_path / f"ctypes_probe_{compiler}"
    flags = ["-std=c11", "-Wall", "-Werror", f"-I{header_dir}"]
    subprocess.run([compiler, *flags, str(source), "-o", str(binary), *extra], check=True)
    return binary


def assert_same_layout(c_side: Layout, ctypes_side: Layout) -> None:
    assert set(c_side) >= set(ctypes_side), f"C side lacks {set(ctypes_side) - set(c_side)}"
    for name, (size, align, fields) in ctypes_side.items():
        c_size, c_align, c_fields = c_side[name]
        assert (size, align) == (c_size, c_align), name
        assert fields == c_fields, name


def test_sizes_named_by_the_abi_facts() -> None:
    expected = {"RKLLMParam": 208, "RKLLMExtendParam": 120, "RKLLMInput": 64, "RKLLMInferParam": 32}
    expected |= {"RKLLMResult": 72, "RKLLMMultiModalInput": 48, "RKLLMPerfStat": 20}
    assert {name: ctypes.sizeof(getattr(abi, name)) for name in expected} == expected


def test_ctypes_matches_header_compiled_on_host(fakelib_dir: Path, tmp_path: Path) -> None:
    binary = compile_probe("gcc", fakelib_dir, tmp_path, [])
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    assert_same_layout(parse_layout(output), ctypes_layout())


def test_ctypes_matches_header_compiled_for_aarch64_under_qemu(fakelib_dir: Path, tmp_path: Path) -> None:
    binary = compile_probe("aarch64-linux-gnu-gcc", fakelib_dir, tmp_path, ["-static"])
    output = subprocess.run(
        ["qemu-aarch64-static", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    assert_same_layout(parse_layout(output), ctypes_layout())


def test_prototypes_and_constants_match_header(fakelib_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "prototypes.c"
    source.write_text(prototype_source())
    result = subprocess.run(
        ["gcc", "-std=c11", "-Werror", "-Wincompatible-pointer-types", f"-I{fakelib_dir}",
         "-fsyntax-only", str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_function_table_covers_the_15_exports_and_int_callback() -> None:
    assert len(abi.FUNCTIONS) == 15
    assert abi.LLMResultCallback._restype_ is ctypes.c_int
    expected_arguments = (ctypes.POINTER(abi.RKLLMResult), ctypes.c_void_p, ctypes.c_int)
    assert abi.LLMResultCallback._argtypes_ == expected_arguments


def test_ctypes_matches_reference_layout(fakelib_dir: Path) -> None:
    # The measured x86_64/aarch64 layout of the vendor header, committed next to our header.
    reference = parse_layout((fakelib_dir / "reference-layout-1.2.3.txt").read_text())
    ours = ctypes_layout()
    assert set(reference) == set(ours)
    assert_same_layout(reference, ours)


@pytest.mark.parametrize("arch", ["host", "aarch64"])
def test_double_layout_probe_agrees_with_ctypes(double_build: Path, arch: str) -> None:
    probe = double_build / arch / "layout_probe"
    command = [str(probe)] if arch == "host" else ["qemu-aarch64-static", str(probe)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert_same_layout(parse_layout(output), ctypes_layout())


def python_type_of(ctype: type) -> object:
    """What ctypes hands back when a field of this C type is read (the type checker's view)."""
    if issubclass(ctype, (ctypes._Pointer, ctypes.Array)):
        return (ctypes._Pointer if issubclass(ctype, ctypes._Pointer) else ctypes.Array, ctype._type_)
    if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
        return ctype
    if ctype is ctypes.c_char_p:
        return frozenset({bytes, None})
    if ctype is ctypes.c_bool:
        return bool
    if ctype in (ctypes.c_float, ctypes.c_double):
        return float
    assert isinstance(ctype(0).value, int), ctype
    return int


def resolve_annotation(node: ast.expr) -> object:
    """The same shape as python_type_of, from an annotation written in abi.py."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = resolve_annotation(node.left), resolve_annotation(node.right)
        return frozenset({left, right})
    if isinstance(node, ast.Subscript):
        return (resolve_annotation(node.value), resolve_annotation(node.slice))
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    head, *attributes = ast.unparse(node).split(".")  # a name or dotted name, as abi.py sees it
    return functools.reduce(getattr, attributes, {**vars(builtins), **vars(abi)}[head])


def declared_field_types(class_name: str) -> dict[str, object]:
    tree = ast.parse(Path(abi.__file__).read_text())
    [class_node] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    [block] = [n for n in class_node.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return {
        n.target.id: resolve_annotation(n.annotation)
        for n in block.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


@pytest.mark.parametrize("struct", [*abi.STRUCTS, abi.RKLLMInputUnion], ids=lambda struct: struct.__name__)
def test_type_checking_annotations_match_the_field_list(struct: type[ctypes.Structure]) -> None:
    expected: dict[str, object] = {}
    anonymous = set(getattr(struct, "_anonymous_", ()))
    for name, ctype in struct._fields_:
        expected[name] = python_type_of(ctype)
        if name in anonymous:
            expected.update({member: python_type_of(member_type) for member, member_type in ctype._fields_})
    assert declared_field_types(struct.__name__) == expected
