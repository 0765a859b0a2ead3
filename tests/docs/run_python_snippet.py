"""Run a documentation snippet (a Python file) and compare the outputs it shows.

``python run_python_snippet.py SNIPPET.py``: executes the snippet as ``__main__``. An expression statement
followed by ``# -> <output>`` (at the end of its last line, or alone on the next line; several such lines
are one multi-line output) is checked: the ``repr`` of its value must equal ``<output>`` up to
whitespace (NumPy pads and wraps its reprs); for ``print(...)`` the printed text, up to runs of
whitespace. A ``# ->`` comment that follows no
expression statement is an error, so a shown output is never silently unchecked. Exits 1 on a mismatch.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


class Mismatch(AssertionError):
    pass


def _check(value: object, shown: str, line: int) -> object:
    got = repr(value)
    if re.sub(r"\s+", "", got) != re.sub(r"\s+", "", shown):  # NumPy pads and wraps its reprs
        raise Mismatch(f"line {line}: the document shows\n    {shown}\nbut the value is\n    {got}")
    return value


def _check_print(shown: str, line: int, *args: object, **kwargs: object) -> None:
    buf = io.StringIO()
    print(*args, **kwargs, file=buf)  # type: ignore[call-overload]
    got = buf.getvalue()
    sys.stdout.write(got)
    if _norm(got) != _norm(shown):
        raise Mismatch(f"line {line}: the document shows\n    {shown}\nbut it prints\n    {got.rstrip()}")


def shown_outputs(source: str) -> dict[int, str]:
    """{line of the code the output belongs to: shown output}."""
    shown: dict[int, str] = {}
    code_lines: set[int] = set()
    comments: list[tuple[int, str, bool]] = []  # line, text, alone on its line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.append((tok.start[0], tok.string, tok.line.strip() == tok.string.strip()))
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    previous_comment_target: tuple[int, int] | None = None  # (comment line, target line)
    for line, text, alone in comments:
        m = re.match(r"#\s*->\s?(.*)$", text)
        if not m:
            continue
        if not alone:
            target = line
        else:
            if previous_comment_target and previous_comment_target[0] == line - 1:
                target = previous_comment_target[1]  # continues the output shown on the line above
            else:
                target = max((n for n in code_lines if n < line), default=0)
        shown[target] = f"{shown[target]}\n{m[1]}" if target in shown else m[1]
        previous_comment_target = (line, target)
    return shown


class _Wrap(ast.NodeTransformer):
    def __init__(self, shown: dict[int, str]):
        self.shown = shown
        self.used: set[int] = set()

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        end = node.end_lineno or node.lineno
        if end not in self.shown:
            return node
        self.used.add(end)
        expected = ast.Constant(self.shown[end])
        line = ast.Constant(end)
        v = node.value
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "print":
            call = ast.Call(ast.Name("_check_print", ast.Load()), [expected, line, *v.args], v.keywords)
        else:
            call = ast.Call(ast.Name("_check", ast.Load()), [v, expected, line], [])
        return ast.copy_location(ast.Expr(call), node)


def compile_snippet(source: str, filename: str):
    shown = shown_outputs(source)
    tree = ast.parse(source, filename)
    wrap = _Wrap(shown)
    tree = ast.fix_missing_locations(wrap.visit(tree))
    stray = sorted(set(shown) - wrap.used)
    if stray:
        raise SyntaxError(f"{filename}: '# ->' output shown after no expression statement (line {stray[0]})")
    return compile(tree, filename, "exec")


def main(path: str) -> int:
    with open(path) as f:
        source = f.read()
    code = compile_snippet(source, path)
    namespace = {"__name__": "__main__", "__file__": path, "_check": _check, "_check_print": _check_print}
    try:
        exec(code, namespace)
    except Mismatch as e:
        print(f"MISMATCH {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
