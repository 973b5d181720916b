"""The library implements the transforms itself: nothing under src/ may use
PyTorch's own transforms or autograd entry points (tests use them as
independent references)."""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

BANNED_MODULES = ("torch.func", "torch._functorch", "functorch", "torch.autograd.forward_ad", "torch.autograd.functional")
BANNED_ATTRIBUTES = (
    "torch.func",
    "torch._functorch",
    "torch.vmap",
    "torch.autograd.grad",
    "torch.autograd.forward_ad",
    "torch.autograd.functional",
)


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _violations(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(BANNED_MODULES):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names]
            if module.startswith(BANNED_MODULES) or any(n.startswith(BANNED_ATTRIBUTES) for n in names):
                found.append((node.lineno, f"from {module} import ..."))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and any(dotted == b or dotted.startswith(b + ".") for b in BANNED_ATTRIBUTES):
                found.append((node.lineno, dotted))
            if node.attr == "backward" and isinstance(getattr(node, "ctx", None), ast.Load):
                # One exemption: ``user_function.backward``, the backward
                # staticmethod of a user's torch.autograd.Function, which
                # torchxform runs as that Function's VJP (as torch.func does).
                if not (isinstance(node.value, ast.Name) and node.value.id == "user_function"):
                    found.append((node.lineno, ".backward"))
    return found


def test_src_does_not_use_torch_transforms_or_autograd():
    files = sorted(SRC.rglob("*.py"))
    assert files, "no source files found"
    problems = [f"{p.relative_to(SRC)}:{line}: {what}" for p in files for line, what in _violations(p)]
    assert not problems, "src/ must implement the transforms itself:\n" + "\n".join(problems)


def test_checker_catches_each_banned_use(tmp_path):
    samples = {
        "import torch.func": "import torch.func",
        "from torch.func import vmap": "from torch.func import ...",
        "from torch import vmap": "from torch import ...",
        "torch.vmap(f)": "torch.vmap",
        "torch.autograd.grad(y, x)": "torch.autograd.grad",
        "y.backward()": ".backward",
        "import torch.autograd.forward_ad as fwAD": "import torch.autograd.forward_ad",
        "torch.autograd.functional.jacobian(f, x)": "torch.autograd.functional",
        "from torch._functorch import apis": "from torch._functorch import ...",
    }
    for code, expected in samples.items():
        path = tmp_path / "sample.py"
        path.write_text(code + "\n")
        found = [what for _, what in _violations(path)]
        assert any(expected in w or w in expected for w in found), (code, found)
    clean = tmp_path / "clean.py"
    clean.write_text('"""Mentions torch.func in prose only."""\nimport torch\nx = torch.autograd.graph\n'
                     "grads = user_function.backward(ctx, g)  # a user's Function's own backward\n")
    assert _violations(clean) == []
