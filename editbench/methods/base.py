"""The interface every personalization method implements: :class:`Editor`, :class:`Artifact`, :class:`EditHandle`.

An ``Editor`` trains a concept into an ``Artifact`` (``fit``), edits a pipeline with one or more artifacts
(``apply``, returning an ``EditHandle`` whose ``undo`` restores the pipeline bitwise) and, where the method has
one, merges artifacts (``compose``) and writes them in diffusers' format (``export``). See
``editbench/methods/INTERFACE.md`` for how to add a method.

Artifact on-disk layout: ONE safetensors file (suggested suffix ``.safetensors``). Tensors are stored under the
method's own documented keys; the safetensors header metadata holds a single entry ``"editbench"`` whose value
is a JSON object with at least::

    format            "editbench-artifact/1"
    method            registry name, e.g. "perfusion"
    library_version   editbench.__version__ that wrote it
    base_fingerprint  fingerprint of the base-model weights the method depends on (editbench.fingerprint)
    config            the method's Config as a dict
    shapes, dtypes    {tensor name: list of ints / dtype name}
    checksum          SHA-256 (16 hex) over every tensor's name, dtype, shape and bytes
    phrase            what a user types in a prompt for the concept (a list, one per concept, if several)
    ... method-specific entries (concept words, training summary, ...)

Files are written atomically (temporary file, fsync, ``os.replace``) and never pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import Self

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError, EditbenchError
from editbench.fingerprint import fingerprint, module_tensors
from editbench.methods.tokens import rare_word
from editbench.safety import check_artifact_for, check_metadata, parse_metadata
from editbench.storage import dtype_name, read_safetensors, tensor_checksum, write_safetensors
from editbench.training import TrainConfig, TrainingSession, check_training, train

__all__ = ["ARTIFACT_FORMAT", "Artifact", "EditHandle", "Editor", "NoSettings"]

ARTIFACT_FORMAT = "editbench-artifact/1"
_HEADER_KEY = "editbench"
_RESERVED = ("format", "method", "library_version", "shapes", "dtypes", "checksum")


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, b"editbench-artifact-checksum|")


class Artifact:
    """What training produced: a method name, named tensors and JSON metadata.

    ``nbytes`` is the size on disk (of the file it was loaded from or last saved to; otherwise of the bytes
    ``save`` would write). ``metadata`` entries ``format``, ``method``, ``library_version``, ``shapes``,
    ``dtypes`` and ``checksum`` are (re)computed on save.
    """

    def __init__(self, method: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None):
        if not isinstance(method, str) or not method:
            raise EditbenchError("an artifact needs a method name")
        bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise EditbenchError(f"artifact tensors must be {{str: torch.Tensor}}; bad entries {bad}")
        self.method = method
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.path: Path | None = None

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Artifact(method={self.method!r}, tensors={len(self.tensors)}, nbytes={self.nbytes}{where})"

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint")

    def _header(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        from editbench import __version__

        meta = {k: v for k, v in self.metadata.items() if k not in _RESERVED}
        meta.update(format=ARTIFACT_FORMAT, method=self.method, library_version=__version__,
                    shapes={k: list(v.shape) for k, v in sorted(tensors.items())},
                    dtypes={k: dtype_name(v.dtype) for k, v in sorted(tensors.items())},
                    checksum=_checksum(tensors))
        try:
            text = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise EditbenchError(f"artifact metadata must be JSON-serialisable: {err}") from None
        self.metadata = json.loads(text)
        return {_HEADER_KEY: text}

    def _stored(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        if dtype is not None and not dtype.is_floating_point:
            raise EditbenchError(f"dtype must be a floating-point dtype, got {dtype}")
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().to("cpu")
                for k, v in self.tensors.items()}

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write the artifact to ``path`` atomically; ``dtype`` (e.g. ``torch.float16``) casts float tensors."""
        tensors = self._stored(dtype)
        path = write_safetensors(path, tensors, self._header(tensors))
        self.tensors, self.path = tensors, Path(path)
        return self.path

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        if self.path is not None and self.path.is_file():
            return self.path.stat().st_size
        from safetensors.torch import save

        tensors = self._stored(None)
        return len(save({k: v.contiguous() for k, v in tensors.items()}, metadata=self._header(tensors)))

    @classmethod
    def load(cls, path: str | os.PathLike, *, method: str | None = None) -> Artifact:
        """Read an artifact; ArtifactError if missing, truncated, corrupt, foreign or of another ``method``."""
        tensors, header = read_safetensors(path, "artifact")
        if _HEADER_KEY not in header:
            raise ArtifactError(f"{path} is a safetensors file but not an editbench artifact (no '{_HEADER_KEY}' "
                                "header entry)")
        meta = parse_metadata(header[_HEADER_KEY], path)  # bounded, finite JSON object (editbench.safety)
        try:
            fmt, name, checksum = meta["format"], meta["method"], meta["checksum"]
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{path} has a damaged editbench header ({err!r}); re-create the artifact") from None
        if fmt != ARTIFACT_FORMAT:
            raise ArtifactError(f"{path} has format {fmt!r}; this editbench reads {ARTIFACT_FORMAT!r}")
        if _checksum(tensors) != checksum:
            raise ArtifactError(f"{path} is corrupt: its tensors do not match the stored checksum; re-create it")
        if method is not None and name != method:
            raise ArtifactError(f"{path} is a {name!r} artifact, not a {method!r} one; load it with "
                                f"editbench.methods.get({name!r})")
        check_metadata(meta, tensors, path)  # schema: types, ranges, shapes/dtypes vs the tensors
        art = cls(name, tensors, meta)
        art.path = Path(path)
        return art


class EditHandle:
    """Reversible edits to a pipeline. ``undo()`` (or leaving a ``with`` block) restores every recorded change.

    Methods record each change as they make it (``set_attr``, ``swap_module``, ``add_hook``, ``on_undo``);
    undo replays the records in reverse order and checks that nothing edited later still sits on top
    (undo stacked edits last-in, first-out). ``info`` holds method objects worth inspecting (e.g. layers).
    """

    def __init__(self, pipeline: Any, label: str):
        self.pipeline, self.label = pipeline, label
        self.info: dict[str, Any] = {}
        self._records: list[tuple[str, Callable[[], None], Callable[[], str | None] | None]] = []

    @property
    def active(self) -> bool:
        """True while there is something to undo."""
        return bool(self._records)

    def __repr__(self) -> str:
        return f"EditHandle({self.label!r}, edits={len(self._records)})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def on_undo(self, what: str, restore: Callable[[], None],
                check: Callable[[], str | None] | None = None) -> None:
        """Record a change: ``restore`` undoes it; ``check`` returns a problem message if it cannot be undone now."""
        self._records.append((what, restore, check))

    def set_attr(self, obj: Any, name: str, value: Any) -> Any:
        """``setattr(obj, name, value)``, recorded; returns the old value."""
        old = getattr(obj, name)
        setattr(obj, name, value)
        self.on_undo(f"{type(obj).__name__}.{name}", lambda: setattr(obj, name, old),
                     lambda: None if getattr(obj, name) is value else "replaced by a later edit")
        return old

    def swap_module(self, root: torch.nn.Module, path: str, new: torch.nn.Module) -> torch.nn.Module:
        """Replace the submodule at dotted ``path`` of ``root`` by ``new``, recorded; returns the old module."""
        parent, _, attr = path.rpartition(".")
        return self.set_attr(root.get_submodule(parent) if parent else root, attr, new)

    def add_hook(self, hook: Any, what: str = "hook") -> None:
        """Record a torch ``RemovableHandle`` (from ``register_forward_hook`` & co.)."""
        self.on_undo(what, hook.remove)

    def undo(self) -> None:
        """Restore the pipeline; a no-op once done. EditbenchError if a later edit sits on top of this one."""
        while self._records:
            what, restore, check = self._records[-1]
            problem = check() if check else None
            if problem:
                raise EditbenchError(f"cannot undo {self.label}: {what} was {problem}; undo the later edit first "
                                     "(edits are undone last-in, first-out)")
            restore()
            self._records.pop()


@dataclasses.dataclass
class NoSettings:
    """Inference settings of a method that has none."""


def artifact_phrases(artifact: Artifact) -> list[str]:
    """The artifact's ``metadata["phrase"]`` as a list (one phrase per concept); ArtifactError if it has none."""
    p = artifact.metadata.get("phrase")
    phrases = [p] if isinstance(p, str) else p
    if not isinstance(phrases, list) or not phrases or not all(isinstance(x, str) and x.split() for x in phrases):
        raise ArtifactError(f"artifact {artifact.path or ''} records no 'phrase' (the words to type in a prompt); "
                            "re-create it with this editbench")
    return phrases


def _finish(artifact: Artifact, concepts: Sequence[ConceptData], phrases: list[str], base_fp: str, cfg: dict,
            seed: int, result: Any) -> Artifact:
    """``artifact`` with the metadata every trained artifact carries (see :meth:`Editor.fit`)."""
    info = [{"placeholder": c.placeholder, "superclass": c.superclass, "images": len(c)} for c in concepts]
    artifact.metadata.update(base_fingerprint=base_fp, config=cfg, seed=seed, training=result.summary(),
                             concept=info[0] if len(info) == 1 else info,
                             phrase=phrases[0] if len(phrases) == 1 else phrases)
    return artifact


def _as_list(x: Any) -> list:
    if isinstance(x, (Artifact, str, os.PathLike)):
        return [x]
    return list(x)


class Editor:
    """Base class of a personalization method. Subclass, set ``name``/``Config``/``Settings``, decorate with
    :func:`editbench.methods.register`, and implement the five hooks marked "method hook" below.

    Public API: ``Editor(config=None, **overrides)``, :meth:`fit`, :meth:`apply`, :meth:`compose`, :meth:`export`,
    :meth:`load`, :meth:`fingerprint`, :meth:`phrase`, :meth:`placeholder`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    Settings: ClassVar[type] = NoSettings
    new_token: ClassVar[bool] = True          # the placeholder becomes a new token (False: reuse a rare word)
    max_artifacts: ClassVar[int | None] = 1   # how many artifacts one apply() takes (None: any number)
    max_concepts: ClassVar[int | None] = 1    # how many concepts one fit() trains jointly (None: any number)
    metadata_schema: ClassVar[Mapping[str, tuple[Callable[[Any], bool], str]]] = {}
    """The method's own metadata entries: ``{key: (check, what it must be)}``, read by the safety checks."""
    transform_settings: ClassVar[tuple[str, ...]] = ()
    """Suite settings that :meth:`transform` the artifact before ``apply`` (e.g. Custom Diffusion's ``rank``)."""
    export_needs_pipeline: ClassVar[bool] = False
    """Whether :meth:`export` needs the base pipeline (a format storing full weights, e.g. Custom Diffusion's)."""

    def __init__(self, config: TrainConfig | None = None, **overrides: Any):
        if config is not None and not isinstance(config, self.Config):
            raise EditbenchError(f"config must be a {self.Config.__name__}, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise EditbenchError(f"unknown {self.name} option(s) {unknown}; valid: {sorted(names)}")
        self.config = dataclasses.replace(config or self.Config(), **overrides)
        self.config.validate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ---- public API ---------------------------------------------------------------------------------------

    def fingerprint(self, pipeline: Any) -> str:
        """Fingerprint of the base weights this method depends on (and of the base tokenizer's vocabulary)."""
        from editbench.methods.tokens import base_tokenizer

        return fingerprint(self.affected_tensors(pipeline), base_tokenizer(pipeline.tokenizer))

    def fit(self, pipeline: Any, concept: ConceptData | Sequence[ConceptData], *, steps: int | None = None,
            seed: int = 0, progress: bool = True, checkpoint_dir: str | os.PathLike | None = None) -> Artifact:
        """Train ``concept`` into an artifact; the pipeline is left exactly as it was.

        Methods with ``max_concepts != 1`` also take a list of concepts, trained jointly into one artifact
        (``prepare_training`` and the loop then receive the list; a single concept is passed as itself).

        ``steps`` overrides ``config.steps``. With ``checkpoint_dir``, checkpoints are written every
        ``config.checkpoint_every`` steps and an interrupted run resumes from there (bitwise identical on CPU).
        """
        many = isinstance(concept, Sequence) and not isinstance(concept, str)
        concepts = list(concept) if many else [concept]
        if not concepts or not all(isinstance(c, ConceptData) for c in concepts):
            raise EditbenchError(f"concept must be a ConceptData (or a list of them), got {type(concept).__name__}")
        if len(concepts) > 1 and self.max_concepts is not None and len(concepts) > self.max_concepts:
            raise EditbenchError(f"{self.name} trains at most {self.max_concepts} concept(s) at once, got "
                                 f"{len(concepts)}")
        if len({c.placeholder for c in concepts}) != len(concepts):
            raise EditbenchError("jointly trained concepts need distinct placeholders")
        config = self.config if steps is None else dataclasses.replace(self.config, steps=steps)
        config.validate()
        self.check_pipeline(pipeline)
        check_training(pipeline, config, checkpoint_dir)  # device, packages, sizes: before class images are made
        for c in concepts:
            c.check_tokens(pipeline.tokenizer, new_placeholder=self.new_token)
        base_fp = self.fingerprint(pipeline)
        cfg = json.loads(json.dumps(dataclasses.asdict(config)))  # JSON types (tuples -> lists), as after load
        signature = {"method": self.name, "base": base_fp, "config": config.run_signature()}
        # methods may draw from torch's global RNG while setting up (peft's LoRA init): seed it from ``seed`` so
        # that a fit (and a resumed fit) is reproducible, and leave the caller's global RNG state as it was
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), EditHandle(pipeline, f"{self.name} training") as handle:
            torch.manual_seed(seed)
            subject = concepts[0] if len(concepts) == 1 else concepts
            session = self.prepare_training(pipeline, subject, handle, config)
            result = train(pipeline, subject, session, config, seed=seed, progress=progress,
                           checkpoint_dir=checkpoint_dir, signature=signature, desc=f"{self.name} training")
            artifact = session.artifact(result)
            for key, value in session.artifact_metadata().items():
                artifact.metadata.setdefault(key, value)
            phrases = [session.phrase_for(c) for c in concepts]
        return _finish(artifact, concepts, phrases, base_fp, cfg, seed, result)

    def shaped_artifact(self, pipeline: Any, concept: ConceptData, *, base_fingerprint: str | None = None
                        ) -> Artifact:
        """An artifact with the tensor shapes and metadata entries of a trained one, built by the method's own
        session (:meth:`shaped_session`) without any optimizer step (storage benchmarks: sizes do not depend on
        values). ``base_fingerprint``: :meth:`fingerprint` of ``pipeline`` if already known."""
        from editbench.training import TrainResult

        self.check_pipeline(pipeline)
        concept.check_tokens(pipeline.tokenizer, new_placeholder=self.new_token)
        result = TrainResult(steps=0, losses=[], wall_time_s=0.0, wall_time_total_s=0.0, peak_memory_bytes=0,
                             memory_kind="none", device="cpu")
        with EditHandle(pipeline, f"{self.name} shaped artifact") as handle, torch.no_grad():
            session = self.shaped_session(pipeline, concept, handle)
            phrase = session.phrase_for(concept)
            with torch.enable_grad():  # sessions that track encodings (Perfusion's i*) see one prompt
                session.encode([concept.templates[0].format(phrase)])
            artifact = session.artifact(result)
        cfg = json.loads(json.dumps(dataclasses.asdict(self.config)))
        return _finish(artifact, [concept], [phrase], base_fingerprint or self.fingerprint(pipeline), cfg, 0, result)

    def shaped_session(self, pipeline: Any, concept: ConceptData, handle: EditHandle) -> TrainingSession:
        """Method hook: the session :meth:`shaped_artifact` reads. Default: :meth:`prepare_training`; override
        where that cannot run on a large model (DreamBooth's float32 UNet copy)."""
        return self.prepare_training(pipeline, concept, handle, self.config)

    def placeholder(self, tokenizer: Any, wanted: str, index: int = 0) -> str:
        """The placeholder this method trains for a concept that asks for ``wanted``: ``wanted`` itself for a
        method that adds a new token; else the ``index``-th (cyclically) of the :data:`~editbench.methods.tokens.
        RARE_WORDS` that are one token for ``tokenizer``."""
        if self.new_token:
            return wanted
        return rare_word(tokenizer, index)

    def phrase(self, artifact: Artifact, placeholder: str | None = None) -> str:
        """What a user types in a prompt for the artifact's concept (its ``metadata["phrase"]``, e.g.
        ``"<zebra> heart"``, ``"sks heart"``); for an artifact of several concepts, the one of ``placeholder``."""
        phrases = artifact_phrases(artifact)
        if len(phrases) == 1:
            return phrases[0]
        if placeholder is None:
            raise EditbenchError(f"the artifact holds {len(phrases)} concepts ({phrases}); name the placeholder "
                                 "whose phrase you want")
        for p in phrases:
            if p.split()[0] == placeholder:
                return p
        raise ArtifactError(f"the artifact has no concept with placeholder {placeholder!r}; its phrases: {phrases}")

    def apply(self, pipeline: Any, artifacts: Artifact | str | os.PathLike | Iterable, *,
              allow_fingerprint_mismatch: bool = False, **inference_settings: Any) -> EditHandle:
        """Edit ``pipeline`` with ``artifacts`` (artifacts or paths); returns the handle that undoes it.

        ``inference_settings`` are the method's ``Settings`` fields. An artifact trained on another base model
        raises EditbenchError naming both fingerprints unless ``allow_fingerprint_mismatch=True``.
        """
        arts = [a if isinstance(a, Artifact) else self.load(a) for a in _as_list(artifacts)]
        if not arts:
            raise EditbenchError("apply needs at least one artifact")
        if self.max_artifacts is not None and len(arts) > self.max_artifacts:
            raise EditbenchError(f"{self.name} applies at most {self.max_artifacts} artifact(s) at once, got "
                                 f"{len(arts)}; compose() them first if the method has a merge")
        for a in arts:
            if a.method != self.name:
                raise ArtifactError(f"a {a.method!r} artifact cannot be applied by {self.name!r}")
            check_artifact_for(self, a)  # metadata schema, before anything is modified
        settings = self.settings(len(arts), **inference_settings)
        self.check_pipeline(pipeline)
        base_fp = self.fingerprint(pipeline)
        for a in arts:
            if a.base_fingerprint != base_fp and not allow_fingerprint_mismatch:
                raise EditbenchError(f"artifact {a.path or ''} was trained on base model {a.base_fingerprint} but "
                                     f"this pipeline is {base_fp}; use the matching base model or pass "
                                     "allow_fingerprint_mismatch=True")
            self.check_artifact(a, pipeline)
        handle = EditHandle(pipeline, f"{self.name} edit")
        try:
            self.install(pipeline, arts, handle, settings)
        except BaseException:
            handle.undo()
            raise
        return handle

    def compose(self, artifacts: Iterable[Artifact], pipeline: Any = None) -> Artifact:
        """Merge several artifacts into one (method hook, only for methods with a merge); ``pipeline`` is the
        base model the artifacts were trained on. The base class has no merge and raises EditbenchError."""
        raise EditbenchError(f"{self.name} has no merge of separately trained artifacts"
                             + ("; apply them together instead: apply(pipeline, [a, b])"
                                if self.max_artifacts != 1 else ""))

    @classmethod
    def can_compose(cls) -> bool:
        """Whether the method has a merge (overrides :meth:`compose`)."""
        return cls.compose is not Editor.compose

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """Write ``artifact`` in diffusers' format into ``folder`` (method hook, only for methods with such a
        format); returns the file or folder written. ``pipeline`` is the base model the artifact was trained on,
        for a format that needs its weights (:attr:`export_needs_pipeline`). The base class raises EditbenchError."""
        raise EditbenchError(f"{self.name} has no diffusers export format")

    @classmethod
    def can_export(cls) -> bool:
        """Whether the method has a diffusers export (overrides :meth:`export`)."""
        return cls.export is not Editor.export

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        """Method hook, with :meth:`export`: the diffusers code that loads what ``export`` wrote into ``folder``
        (``pipe`` is the base pipeline), printed by ``editbench export``."""
        return ""

    def transform(self, artifact: Artifact, **settings: Any) -> Artifact:
        """Method hook: a transformed copy of ``artifact`` for the :attr:`transform_settings` (e.g. compression).
        The base class has none and raises EditbenchError."""
        raise EditbenchError(f"{self.name} has no artifact transform (settings {sorted(settings)})")

    def load(self, path: str | os.PathLike) -> Artifact:
        """Read and check an artifact of this method (ArtifactError on any problem)."""
        art = Artifact.load(path, method=self.name)
        check_artifact_for(self, art)
        self.check_artifact(art)
        return art

    def settings(self, n_artifacts: int = 1, **inference_settings: Any) -> Any:
        """Validated ``Settings`` instance; unknown names raise EditbenchError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(inference_settings) - names)
        if unknown:
            raise EditbenchError(f"unknown {self.name} inference setting(s) {unknown}; valid: {sorted(names)}")
        s = self.Settings(**inference_settings)
        if hasattr(s, "validate"):
            s.validate(n_artifacts)
        return s

    # ---- method hooks --------------------------------------------------------------------------------------

    def affected_tensors(self, pipeline: Any) -> dict[str, torch.Tensor]:
        """Method hook: the base weights the method reads or edits (fingerprinted). Default: the text encoder(s)
        (SDXL: ``text_encoder`` and ``text_encoder_2``) + UNet; EditbenchError naming the pipeline class if it has
        neither."""
        for part in ("text_encoder", "unet"):
            if not isinstance(getattr(pipeline, part, None), torch.nn.Module):
                raise EditbenchError(f"{self.name} does not support {type(pipeline).__name__}: it has no {part}")
        second = getattr(pipeline, "text_encoder_2", None)
        return {**module_tensors(pipeline.text_encoder, "text_encoder."),
                **({} if second is None else module_tensors(second, "text_encoder_2.")),
                **module_tensors(pipeline.unet, "unet.")}

    def check_pipeline(self, pipeline: Any) -> None:
        """Method hook: raise EditbenchError if the method cannot work with this pipeline. Default: accept.
        (``editbench.pipelines.text_stack(pipeline, self.name)`` refuses, by class name, what is not a Stable
        Diffusion 1.x / 2.x or SDXL pipeline: the built-in methods call it.)"""

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: TrainConfig) -> TrainingSession:
        """Method hook: set the pipeline up for training (record every change on ``handle``; it is undone after
        training) and return the session the shared loop runs."""
        raise NotImplementedError

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        """Method hook: ArtifactError for unknown/missing keys or, with ``pipeline``, shapes that do not fit it."""
        raise NotImplementedError

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: Any) -> None:
        """Method hook: edit the pipeline with the (checked) artifacts, recording every change on ``handle``."""
        raise NotImplementedError
