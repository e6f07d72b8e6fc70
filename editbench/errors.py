"""Errors editbench raises on bad input.

Every error a user can cause (bad shapes, unreadable images, artifacts for another base model, ...) is an
:class:`EditbenchError` whose message names the problem and how to fix it. It subclasses ``ValueError`` so that
callers that already catch ``ValueError`` keep working.
"""


class EditbenchError(ValueError):
    """Base class of every error editbench raises on bad input."""


class ArtifactError(EditbenchError):
    """A saved artifact is missing, truncated, corrupt, or does not fit the model it is applied to."""


class ConceptDataError(EditbenchError):
    """A concept's images, masks, placeholder or superclass word cannot be used."""


class TrainingError(EditbenchError):
    """Training cannot go on (non-finite loss, incompatible checkpoint, ...)."""


class ClassDataError(ConceptDataError):
    """A folder of class (regularization) images for prior preservation cannot be used: captions and images that
    do not pair up, a listed image that is missing, an unreadable image, no images at all."""
