"""Privacy audits and the release gate: attacks, policy, verdict, compliance report.

Imports dpsynth (schema, encodings) but never flwr; dpsynth imports audits only in its release path.
"""
