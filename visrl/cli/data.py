"""CLI commands: data. (Filled in by its area.)"""
