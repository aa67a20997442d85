"""CLI commands: evaluate. (Filled in by its area.)"""
