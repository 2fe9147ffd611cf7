"""Switchyard's built-in backends: one package per backend, one module per op inside it."""
