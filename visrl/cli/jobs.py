"""CLI commands: jobs. (Filled in by its area.)"""
