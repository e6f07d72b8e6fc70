"""Shared pieces of the reliability tests: a bitwise pipeline state, the figure recorder, the example budgets, and
the hypothesis settings and strategies the fuzz tests share (hostile values, damaged file bytes).

Figures (cases tried, outcomes, exception types, kills and resumes) are collected per test in :data:`FIGURES`
and written, merged with earlier runs of other test files, to ``$EDITBENCH_RELIABILITY_FIGURES`` (a JSON file)
when that variable is set; they are also printed in the pytest summary of each reliability test module.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from editbench.fingerprint import update_with_tensor

FUZZ_EXAMPLES = int(os.environ.get("EDITBENCH_FUZZ_EXAMPLES", "75"))
"""Hypothesis examples per fuzz test in the default run."""
FUZZ_SLOW_EXAMPLES = int(os.environ.get("EDITBENCH_FUZZ_SLOW_EXAMPLES", "1500"))
"""Hypothesis examples per fuzz test in the ``slow`` variants."""
KILLS_SLOW = int(os.environ.get("EDITBENCH_KILLS", "10"))
"""kill -9 count per method in the slow crash tests (at least 10)."""


class Figures:
    """Counters per test: ``FIGURES.add("fuzz_artifact[lora]", "refused:ArtifactError")``."""

    def __init__(self) -> None:
        self.data: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def add(self, test: str, key: str, n: int = 1) -> None:
        self.data[test][key] += n

    def put(self, test: str, key: str, value) -> None:
        self.data[test][key] = value

    def lines(self, skip=()) -> list[str]:
        return [f"{test}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
                for test, c in sorted(self.data.items()) if test not in skip]

    def dump(self) -> None:
        """Merge into ``$EDITBENCH_RELIABILITY_FIGURES`` (counts of the same key are replaced, not added)."""
        target = os.environ.get("EDITBENCH_RELIABILITY_FIGURES")
        if not target or not self.data:
            return
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(path.read_text()) if path.is_file() else {}
            for test, c in self.data.items():
                old[test] = dict(c)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(old, indent=1, sort_keys=True))
            os.replace(tmp, path)


FIGURES = Figures()


def report(request, before=()) -> None:
    """Print the figures of this module at its end (call from a module-scoped fixture's teardown; ``before``: the
    tests that already had figures when the module started)."""
    FIGURES.dump()
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        tr.write_line("")
        for line in FIGURES.lines(skip=set(before)):
            tr.write_line(f"[reliability] {line}")


def pipeline_state(pipe) -> str:
    """SHA-256 of everything an edit could change: every tensor of every model component (bitwise), which objects
    the pipeline holds, every module's class, attention processors, hooks, peft adapters, the tokenizer."""
    h = hashlib.sha256()
    for name in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        comp = getattr(pipe, name, None)
        h.update(f"{name}:{id(comp)}|".encode())
        if isinstance(comp, torch.nn.Module):
            for key, t in sorted(comp.state_dict(keep_vars=True).items()):
                update_with_tensor(h, f"{name}.{key}", t)
            for key, m in comp.named_modules():
                hooks = len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                h.update(f"{key}:{type(m).__qualname__}:{id(m)}:{hooks}:{m.training}|".encode())
            for key, p in comp.named_parameters():
                h.update(f"{key}:{p.requires_grad}|".encode())
    unet = pipe.unet
    with contextlib.suppress(Exception):
        h.update(repr(sorted((k, type(v).__qualname__) for k, v in unet.attn_processors.items())).encode())
    h.update(repr(sorted(getattr(unet, "peft_config", None) or {})).encode())
    h.update(repr(getattr(unet, "_hf_peft_config_loaded", None)).encode())
    tok = pipe.tokenizer
    h.update(f"tok:{len(tok)}:{id(getattr(tok, '_tokenizer', None))}".encode())
    h.update(f"emb:{id(pipe.text_encoder.get_input_embeddings())}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def module_figures(request):
    """Autouse in every module that imports it: prints the figures that module's tests recorded."""
    before = set(FIGURES.data)
    yield
    report(request, before)


# ------------------------------------------------------------------------------------------------ fuzzing
_HC = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
       HealthCheck.filter_too_much]
FAST = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=_HC)
SLOW = settings(max_examples=FUZZ_SLOW_EXAMPLES, deadline=None, database=None, suppress_health_check=_HC)
"""Hypothesis settings of the fuzz tests: the default run (:data:`FUZZ_EXAMPLES`, fixed seed) and the slow one."""

PATHLIKE = ["../../x", "/etc/passwd", "..", ".", "a/b", "..\\..\\x", "C:\\x", "x\x00y", "~/x", "/", "//x"]
WORDS = PATHLIKE + ["", " ", "a b", "\n", "sks", "<toy-star>", "dog", "star", "\u202e\u0000", "x" * 300]


def deep(depth: int):
    """``depth`` nested one-item lists."""
    x = 0
    for _ in range(depth):
        x = [x]
    return x


HOSTILE = st.one_of(
    st.integers(min_value=-2**80, max_value=2**80),
    st.sampled_from([10**30, -(10**30), -1, 0, 1, 2**31, 2**63, 2**64, -(2**63), 10**6, 10**9]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, -0.0]),
    st.sampled_from(WORDS),
    st.text(max_size=12),
    st.just("A" * 5000),
    st.none(), st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=2**40), max_size=5),
    st.lists(st.sampled_from(WORDS), max_size=4),
    st.dictionaries(st.sampled_from(["r", "placeholder", "superclass", "x", "lora_alpha"]),
                    st.one_of(st.integers(-3, 10**12), st.sampled_from(WORDS), st.none()), max_size=3),
    st.integers(min_value=1, max_value=60).map(deep),
)
"""Values a hostile header entry may hold: extreme numbers, path-like, empty and long strings, deep nesting."""
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@st.composite
def byte_case(draw, raw: bytes):
    """A damaged copy of the file bytes ``raw``: truncated, bits flipped, bytes inserted or zeroed, a wrong
    header length, or garbage."""
    op = draw(st.sampled_from(["truncate", "flip", "flip_header", "insert", "zero_run", "length", "garbage"]))
    data = bytearray(raw)
    hlen = 8 + int.from_bytes(raw[:8], "little")
    if op == "truncate":
        data = data[: draw(st.integers(0, len(raw) - 1))]
    elif op in ("flip", "flip_header"):
        hi = hlen - 1 if op == "flip_header" else len(raw) - 1
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, hi))
            data[i] ^= draw(st.integers(1, 255))
    elif op == "insert":
        i = draw(st.integers(0, len(raw)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif op == "zero_run":
        i = draw(st.integers(0, len(raw) - 1))
        n = draw(st.integers(1, 256))
        data[i:i + n] = bytes(len(data[i:i + n]))
    elif op == "length":
        data[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 7, hlen, hlen + 1, 2**40, 2**64 - 1,
                                                             len(raw), len(raw) + 100])))
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    return f"bytes:{op}", bytes(data), None


class Case(tuple):
    """(description, file bytes or None, (tensors, header text) or None) with a short repr for hypothesis."""

    def __repr__(self) -> str:
        what, data, structured = self
        if structured is not None:
            return f"Case({what}, tensors={ {k: (tuple(v.shape), str(v.dtype)) for k, v in structured[0].items()} }, " \
                   f"header={structured[1][:2000]!r})"
        return f"Case({what}, {len(data)} bytes)"
