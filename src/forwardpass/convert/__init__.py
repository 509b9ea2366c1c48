"""Importers that turn models from other frameworks into repository folders."""
