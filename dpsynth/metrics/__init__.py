"""Utility metrics and the utility report."""
