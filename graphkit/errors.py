"""Errors that the CLI turns into one clear line and exit status 2 (no traceback)."""
from __future__ import annotations


class GraphkitError(Exception):
    """A user-facing error: the message names the file or node and what to do."""

    exit_code = 2


class PassNotApplicable(GraphkitError):
    """A pass found nothing to do on a valid graph; the pipeline reports it and moves on."""


class PreconditionError(GraphkitError):
    """A pass refuses a graph it must not run on (e.g. fp16 on a graph already in fp16)."""


class PostconditionError(GraphkitError):
    """A pass produced a graph that breaks its own guarantee: a bug, reported loudly."""
