"""The public surface is what `pipeq.__all__` lists, and every error is in it."""

from __future__ import annotations

import types

import pipeq
import pipeq.errors


def test_all_lists_exactly_the_public_names_of_the_package() -> None:
    public = {
        name
        for name, value in vars(pipeq).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(pipeq.__all__) == public


def test_every_error_class_is_exported_and_derives_from_pipeq_error() -> None:
    errors = {
        name
        for name, value in vars(pipeq.errors).items()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == "pipeq.errors"
    }
    assert errors <= set(pipeq.__all__)
    assert all(issubclass(getattr(pipeq, name), pipeq.PipeqError) for name in errors)
