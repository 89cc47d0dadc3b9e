"""Generators: plain nn.Modules plus their DP training steps."""
