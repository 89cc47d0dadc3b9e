"""Deployment of a dpsynth consortium: certificates, node keys, SuperLink / SuperNode processes, demo."""
