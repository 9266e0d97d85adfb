"""Thin Dagster definitions over templar_lib; `python -m templar_pipelines` / `-m templar_pipelines` loads `defs`."""

from templar_pipelines.definitions import defs

__all__ = ["defs"]
