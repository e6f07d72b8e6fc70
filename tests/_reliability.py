"""Shared pieces of the reliability tests: a bitwise pipeline state, the figure recorder, the example budgets.

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
from pathlib import Path

import pytest
import torch

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
