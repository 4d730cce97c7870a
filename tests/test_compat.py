"""tiedadam/_compat.py: every private torch API the package uses holds on this torch (its
self-test), and nothing else in tiedadam/ names one."""

from __future__ import annotations

import os
import re

import torch

from tiedadam import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_self_test_holds_on_this_torch():
    got = _compat.self_test()
    assert got == {k: True for k in got}, got
    assert set(got) == {"fast_guard", "fused_adamw", "set_grad_enabled",
                        "foreach_norm", "fsdp1_flattened"}


def test_fast_guard_self_test_fails_when_dict_versions_do_not_change(monkeypatch):
    monkeypatch.setattr(_compat, "dict_version", lambda d: 0)
    assert not _compat.fast_guard_works()


def test_accessors_on_plain_tensors():
    t = torch.randn(3)
    assert _compat.local_tensor(t) is t and not _compat.is_dtensor(t)
    assert _compat.shard_offset(t) == 0


def test_fresh_code_is_a_function_of_its_own():
    def f(x, y=2):
        return x * y
    g = _compat.fresh_code(f, "f_mode7")
    assert g(3) == 6 and g.__code__ is not f.__code__ and g.__code__.co_name == "f_mode7"


def test_no_private_torch_name_outside_compat():
    """The rule of _compat.py: no ``torch._...`` attribute or DTensor private field elsewhere in
    tiedadam/ (comments and docstrings may name them)."""
    pattern = re.compile(r"torch\._[A-Za-z]|_local_tensor|\._spec\b")
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "tiedadam")):
        for name in files:
            if not name.endswith(".py") or name == "_compat.py":
                continue
            path = os.path.join(dirpath, name)
            in_doc = False
            for n, line in enumerate(open(path), 1):
                code = line.split("#", 1)[0]
                if code.count('"""') % 2:
                    in_doc = not in_doc
                    continue
                if not in_doc and pattern.search(code) and "``" not in code:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
