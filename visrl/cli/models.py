"""CLI commands: models. (Filled in by its area.)"""
