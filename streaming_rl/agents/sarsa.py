"""Stream SARSA(λ): δ = r + γ·q(s′, a′)·(1 − terminated) − q(s, a), with a′ drawn ε-greedily from
q(s′, ·) before the update and then taken; traces are cleared at episode end only (on-policy)."""

from __future__ import annotations

import torch

from streaming_rl.agents import register_agent
from streaming_rl.agents.q import EpsilonGreedyAgent
from streaming_rl.exploration import epsilon_greedy

NO_ACTION = -1


@register_agent("sarsa")
class StreamSARSA(EpsilonGreedyAgent):
    def __init__(self, spec):
        super().__init__(spec)
        self.next_action = NO_ACTION  # a′ chosen by the last update, taken at the next step

    def act(self, obs: torch.Tensor) -> int:
        self._forward(obs)
        if self.next_action == NO_ACTION:
            self.next_action, _ = epsilon_greedy(self._q_list, self.epsilon())
        return self.next_action

    def learn(self, obs, action, reward, next_obs, terminated, truncated) -> float:
        target, self.next_action = reward, NO_ACTION
        if not terminated:
            with torch.no_grad():
                q_next = self.networks["q"](next_obs).tolist()
            next_action, _ = epsilon_greedy(q_next, self.epsilon(self.steps + 1))
            target += self.cfg.gamma * q_next[next_action]
            if not truncated:  # a truncated episode bootstraps from a′ but starts afresh
                self.next_action = next_action
        return self._update(action, target, reset=terminated or truncated)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "next_action": self.next_action}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.next_action = int(state["next_action"])
