"""Streaming deep RL: the stream-x learners (stream TD(λ), Q(λ), SARSA(λ), AC(λ) with ObGD) of
Elsayed, Vasan & Mahmood (2024), run by `plait task=stream_*` (streaming_rl.run.run)."""
