"""Flower ServerApp: schema agreement, FedAvg of the DP-WGAN, consortium budget ledger, federated audit, release."""
