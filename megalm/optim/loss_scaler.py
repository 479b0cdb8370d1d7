"""Dynamic loss scaling for fp16: multiply the loss so small gradients survive fp16, skip a step whose gradients
overflowed and halve the scale, double it after ``window`` clean steps. Every rank sees the same global gradient
norm, so all ranks skip, back off and grow together."""
from __future__ import annotations


class LossScaler:
    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, window: int = 1000, min_scale: float = 1.0,
                 static: float = 0.0):
        self.enabled, self.window, self.min_scale, self.static = enabled, window, min_scale, static
        self.scale = (static or initial) if enabled else 1.0
        self.clean_steps = 0

    def update(self, overflowed: bool) -> None:
        if not self.enabled or self.static:
            return
        if overflowed:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.window == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        if state and "scale" in state:
            self.scale, self.clean_steps = float(state["scale"]), int(state.get("clean_steps", 0))
