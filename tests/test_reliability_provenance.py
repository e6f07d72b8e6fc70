"""Provenance and data-only loading.

* Every artifact records the fingerprint of the base model it was trained on; applying it to another base model
  (same architecture, other weights or another vocabulary) is an EditbenchError naming both fingerprints unless
  ``allow_fingerprint_mismatch=True``; for every registered method.
* No pickle anywhere in the package (AST scan); foreign ``.bin``/``.pt`` files are refused unless the caller opts in,
  and then read with ``torch.load(weights_only=True)`` (a malicious pickle still runs nothing).
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from _method_helpers import load, trained
from _reliability import FIGURES, module_figures, pipeline_state, report  # noqa: F401 (autouse fixture)

import editbench
from editbench import methods
from editbench.errors import ArtifactError, EditbenchError
from editbench.fingerprint import LENGTH, pipeline_fingerprint
from editbench.testing import tiny_pipeline

METHODS = methods.available()


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def other():
    """Same architecture and tokenizer as the base, other (random) weights."""
    return tiny_pipeline(seed=1)


@pytest.mark.parametrize("name", METHODS)
def test_artifact_records_its_base_fingerprint(name, base):
    art = load(name, trained(name))
    fp = methods.get(name)().fingerprint(base)
    assert art.base_fingerprint == fp and len(fp) == LENGTH and int(fp, 16) >= 0
    FIGURES.add("provenance", "methods_recording_fingerprint")


@pytest.mark.parametrize("name", METHODS)
def test_other_base_model_is_refused_naming_both_fingerprints(name, other):
    editor, path = methods.get(name)(), trained(name)
    art = load(name, path)
    theirs = editor.fingerprint(other)
    assert theirs != art.base_fingerprint
    before = pipeline_state(other)
    for given in (art, path):  # an Artifact or a path
        with pytest.raises(EditbenchError) as info:
            editor.apply(other, given)
        assert art.base_fingerprint in str(info.value) and theirs in str(info.value)
        assert "allow_fingerprint_mismatch" in str(info.value)
        assert pipeline_state(other) == before
    handle = editor.apply(other, art, allow_fingerprint_mismatch=True)  # explicit override: applies (shapes fit)
    assert pipeline_state(other) != before
    handle.undo()
    assert pipeline_state(other) == before
    FIGURES.add("provenance", "methods_refusing_other_base")


@pytest.mark.parametrize("name", METHODS)
def test_one_bit_in_an_affected_weight_or_a_new_vocabulary_word_changes_the_fingerprint(name, base):
    editor = methods.get(name)()
    art = load(name, trained(name))
    fp = editor.fingerprint(base)
    tensors = editor.affected_tensors(base)
    for key in (min(tensors), max(tensors)):
        flat = tensors[key].detach().view(-1)
        with torch.no_grad():
            flat.view(torch.int32)[0] ^= 1                     # one bit of the first element
            try:
                changed = editor.fingerprint(base)
                with pytest.raises(EditbenchError, match=changed):
                    editor.apply(base, art)
            finally:
                flat.view(torch.int32)[0] ^= 1
    assert editor.fingerprint(base) == fp
    tok = base.tokenizer
    base.tokenizer = __import__("copy").deepcopy(tok)
    try:
        base.tokenizer.add_tokens(["<someone-elses-word>"])    # a vocabulary editbench did not add
        assert editor.fingerprint(base) != fp
    finally:
        base.tokenizer = tok
    FIGURES.add("provenance", "methods_bit_sensitive")


def test_weights_a_method_does_not_read_are_not_fingerprinted(base):
    """The fingerprint covers the affected weights only: the VAE (read by no method) can change freely."""
    before = {n: methods.get(n)().fingerprint(base) for n in METHODS}
    w = base.vae.decoder.conv_out.weight
    with torch.no_grad():
        w.view(-1)[0] += 1
    try:
        assert {n: methods.get(n)().fingerprint(base) for n in METHODS} == before
    finally:
        with torch.no_grad():
            w.view(-1)[0] -= 1



def test_pipeline_fingerprint_is_the_weights_values_not_their_dtype():
    """pipeline_fingerprint (tuning studies): one value per base model whether loaded in float16 or float32 (the
    toy world's weights are float16 on disk); one ulp in the UNet, a text-encoder weight or a new word changes it;
    the VAE is not covered."""
    pipe = tiny_pipeline()
    with torch.no_grad():  # float16-representable weights, as in a float16 checkpoint
        for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:
            p.copy_(p.half().float())
    fp = pipeline_fingerprint(pipe, pipe.tokenizer)
    assert len(fp) == LENGTH
    half = copy.deepcopy(pipe)
    half.unet.half(), half.text_encoder.half()
    assert pipeline_fingerprint(half, half.tokenizer) == fp
    for w in (pipe.unet.conv_in.weight, list(pipe.text_encoder.parameters())[-1]):
        old = w.view(-1)[0].clone()
        with torch.no_grad():
            w.view(-1)[0] = torch.nextafter(old, old + 1)
        assert pipeline_fingerprint(pipe, pipe.tokenizer) != fp
        with torch.no_grad():
            w.view(-1)[0] = old
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.view(-1)[0] += 1
    assert pipeline_fingerprint(pipe, pipe.tokenizer) == fp
    tok = copy.deepcopy(pipe.tokenizer)
    tok.add_tokens(["<new-word>"])
    assert pipeline_fingerprint(pipe, tok) != fp


# ------------------------------------------------------------------------------------------------ no pickle
PACKAGE = Path(editbench.__file__).parent


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = (f.value.id if isinstance(f.value, ast.Name) else "<expr>") if isinstance(f, ast.Attribute) \
                else ""                                     # "": a plain name such as eval(...)
            yield node, owner, name


def test_no_pickle_anywhere_in_the_package():
    """AST scan of every module: no pickle-family import, no torch.save, torch.load only with weights_only=True,
    no np.load(allow_pickle=True), yaml only via safe_load, no eval/exec, no trust_remote_code=True."""
    problems, files, loads = [], 0, 0
    for path in sorted(PACKAGE.rglob("*.py")):
        files += 1
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and
                                                       node.module else [])
                for m in mods:
                    if m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib",
                                           "marshal", "shelve"):
                        problems.append(f"{rel}:{node.lineno} imports {m}")
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
            where = f"{rel}:{node.lineno}"
            if owner == "torch" and name == "save":
                problems.append(f"{where} torch.save")
            if owner == "torch" and name == "load":
                loads += 1
                if const.get("weights_only") is not True:
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and const.get("allow_pickle") is not False \
                    and "allow_pickle" in kw:
                problems.append(f"{where} np.load(allow_pickle=...)")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{where} yaml.{name}")
            if owner == "" and name in ("eval", "exec"):
                problems.append(f"{where} {name}()")
            if const.get("trust_remote_code") is True or const.get("use_safetensors") is False:
                problems.append(f"{where} {name}(trust_remote_code=True / use_safetensors=False)")
    FIGURES.put("no_pickle", "modules_scanned", files)
    FIGURES.put("no_pickle", "torch_load_calls_all_weights_only", loads)
    FIGURES.put("no_pickle", "problems", len(problems))
    assert not problems, problems


class _Evil:
    """Unpickling this would create a marker file: proof that a pickle ran code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _cd_folder(tmp: Path, base):
    from editbench.methods.custom_diffusion import export_diffusers

    art = load("custom_diffusion", trained("custom_diffusion"))
    export_diffusers(art, base, tmp)
    return art


def test_foreign_pickles_are_refused_unless_opted_in(tmp_path, base):
    from safetensors.torch import load_file

    from editbench.methods.custom_diffusion import load_diffusers
    from editbench.safety import load_weights

    _cd_folder(tmp_path, base)
    state = load_file(str(tmp_path / "pytorch_custom_diffusion_weights.safetensors"))
    torch.save(state, tmp_path / "pytorch_custom_diffusion_weights.bin")   # diffusers' old pickle format
    (tmp_path / "pytorch_custom_diffusion_weights.safetensors").unlink()
    before = pipeline_state(base)
    with pytest.raises(ArtifactError, match="allow_pickle"):
        load_diffusers(base, tmp_path, weight_name="pytorch_custom_diffusion_weights.bin")
    assert pipeline_state(base) == before
    handle = load_diffusers(base, tmp_path, weight_name="pytorch_custom_diffusion_weights.bin", allow_pickle=True)
    handle.undo()
    assert pipeline_state(base) == before
    # a pickle disguised with a .safetensors name is recognised by its bytes
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes((tmp_path / "pytorch_custom_diffusion_weights.bin").read_bytes())
    with pytest.raises(ArtifactError, match="pickle"):
        load_weights(disguised)
    FIGURES.add("pickle_guard", "refused_without_opt_in")


def test_malicious_pickle_runs_nothing_even_when_opted_in(tmp_path):
    from editbench.safety import load_weights

    marker = tmp_path / "pwned"
    evil = _Evil()
    _Evil.marker = str(marker)
    import pickle  # the test builds the hostile file; the package never imports pickle

    for i, payload in enumerate([pickle.dumps({"w": evil}), pickle.dumps(evil, protocol=2)]):
        path = tmp_path / f"evil{i}.bin"
        path.write_bytes(payload)
        with pytest.raises(ArtifactError, match="allow_pickle"):
            load_weights(path)
        with pytest.raises(ArtifactError, match="weights_only"):
            load_weights(path, allow_pickle=True)
    torch.save({"w": evil}, tmp_path / "evil.pt")  # zip format
    with pytest.raises(ArtifactError):
        load_weights(tmp_path / "evil.pt", allow_pickle=True)
    assert not marker.exists(), "a pickle payload ran"
    FIGURES.add("pickle_guard", "malicious_payloads_inert")


def test_artifact_metadata_is_validated_against_the_schema(tmp_path):
    """Direct checks of the schema on a real artifact (the fuzz tests sample the same space)."""
    from editbench import methods
    from editbench.safety import check_metadata, parse_metadata

    path = trained("textual_inversion")
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["editbench"])
    tensors = load("textual_inversion", path).tensors
    schema = methods.get("textual_inversion").metadata_schema  # the method's own entries ("tokens")
    check_metadata(meta, tensors, schema=schema)
    bad = {"shapes": {"embeddings": [1, 2**40]}, "dtypes": {"embeddings": "object"}, "seed": 2**70,
           "library_version": "1.0; rm -rf /", "base_fingerprint": "x" * 100, "checksum": "xyz",
           "tokens": ["../../x y"], "concept": {"placeholder": "", "superclass": "star"}, "method": "Not An Id!"}
    for key, value in bad.items():
        with pytest.raises(ArtifactError):
            check_metadata({**meta, key: value}, tensors, schema=schema)
    for text in ("[" * 10_000, '{"a": NaN}', '{"a": Infinity}', "x" * (17 * 2**20), "[1]"):
        with pytest.raises(ArtifactError):
            parse_metadata(text)
    FIGURES.add("schema", "direct_checks", len(bad) + 5)
