"""Federated LoRA fine-tuning across heterogeneous clients (FedPipe, Fang et al. 2024) on Flower:
`task=federated` (docs/federated.md)."""
