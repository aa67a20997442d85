"""CLI commands: train. (Filled in by its area.)"""
