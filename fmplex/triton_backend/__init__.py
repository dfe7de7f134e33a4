"""Triton-side components of fmplex (backend, extensions, scheduler)."""
