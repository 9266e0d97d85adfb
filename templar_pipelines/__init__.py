"""Thin Dagster definitions over templar_lib (the pipeline issue builds them); `templar` CLI lives in cli.py."""
