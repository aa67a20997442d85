"""CLI commands: generate. (Filled in by its area.)"""
