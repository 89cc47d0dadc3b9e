"""Flower ClientApp: runs at a hospital (a SuperNode) and calls dpsynth. Owns the site's accountant and policy."""
