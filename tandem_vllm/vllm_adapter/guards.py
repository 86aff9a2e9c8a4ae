"""Per-request speculation guards: stop drafting where it no longer pays.

* ``max_context``: no drafts for a request once its context (prompt + output tokens) reaches N --
  drafting cost grows with context while acceptance usually does not.
* ``min_acceptance`` over the last ``window`` draft tokens: a request whose drafts the target keeps
  rejecting (text the drafter cannot predict) stops drafting for ``backoff`` steps, then tries again
  with a fresh window.

Server defaults come from ``$TANDEM_VLLM_GUARDS`` (JSON, set by the Serve app from its config, or by
``bench engine``) in the process that runs the scheduler; a request overrides them with
``SamplingParams.extra_args`` (OpenAI: ``vllm_xargs``) ``speculate_max_context``,
``speculate_min_acceptance``, ``speculate_window``, ``speculate_backoff`` (0 / 0.0 turns one off).
The scheduler applies them (``patch_scheduler.py``, patch ``guards``); nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from tandem_vllm.errors import TandemError

ENV: Final = "TANDEM_VLLM_GUARDS"
PREFIX: Final = "speculate_"


@dataclass(frozen=True)
class Guards:
    max_context: int = 0  # 0: off
    min_acceptance: float = 0.0  # 0: off
    window: int = 32  # draft tokens
    backoff: int = 16  # steps without drafts when the acceptance guard fires (the firing step included)

    def __post_init__(self) -> None:
        if self.max_context < 0 or not 0.0 <= self.min_acceptance <= 1.0 or self.window < 1 or self.backoff < 0:
            raise TandemError(f"speculation guards {asdict(self)}: max_context >= 0, 0 <= min_acceptance <= 1, "
                              "window >= 1 and backoff >= 0")

    @property
    def active(self) -> bool:
        return bool(self.max_context or self.min_acceptance)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    def with_values(self, data: dict[str, Any]) -> Guards:
        """A copy with ``data``'s fields, each converted to the field's type (JSON and vllm_xargs give
        ints for floats and strings for numbers)."""
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in data.items()})

    @classmethod
    def parse(cls, data: dict[str, Any], where: str) -> Guards:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise TandemError(f"{where}: unknown guard {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        try:
            return cls().with_values(data)
        except (TypeError, ValueError) as e:
            raise TandemError(f"{where}: {e}") from None


def server_defaults(value: str | None = None) -> Guards:
    value = os.environ.get(ENV, "") if value is None else value
    if not value.strip():
        return Guards()
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise TandemError(f"{ENV} is not JSON ({e}): {value!r}") from None
    if not isinstance(data, dict):
        raise TandemError(f"{ENV} must be a JSON object, e.g. {{\"max_context\": 2048}}; got {value!r}")
    return Guards.parse(data, ENV)


def for_request(defaults: Guards, extra_args: dict[str, Any] | None) -> Guards:
    """The defaults with a request's ``speculate_*`` overrides; a bad override is ignored (the request
    keeps the defaults) because a scheduler cannot refuse a request -- the API layers check them."""
    mine = {k.removeprefix(PREFIX): v for k, v in (extra_args or {}).items()
            if k.startswith(PREFIX) and k.removeprefix(PREFIX) in Guards.__dataclass_fields__}
    if not mine:
        return defaults
    try:
        return defaults.with_values(mine)
    except (TypeError, ValueError, TandemError):
        return defaults


@dataclass
class GuardState:
    """One request's guards, its recent drafts (drafted, accepted) and the steps left in its back-off."""

    guards: Guards
    recent: deque[tuple[int, int]] = field(default_factory=deque)
    paused: int = 0
    fired: int = 0  # how often the acceptance guard fired (for tests and logs)

    def observe(self, drafted: int, accepted: int) -> None:
        if not self.guards.min_acceptance:
            return
        self.recent.append((drafted, accepted))
        while sum(d for d, _ in self.recent) - self.recent[0][0] >= self.guards.window:  # keep >= window tokens
            self.recent.popleft()

    def blocks_next_step(self, num_tokens: int) -> bool:
        """Whether the next step surely verifies no drafts for this request (no state change)."""
        guards = self.guards
        return guards.active and (bool(guards.max_context and num_tokens >= guards.max_context) or self.paused > 0)

    def allows_drafts(self, num_tokens: int) -> bool:
        """Whether this request may verify drafts in the step being scheduled."""
        guards = self.guards
        if guards.max_context and num_tokens >= guards.max_context:
            return False
        if not guards.min_acceptance:
            return True
        if self.paused:
            self.paused -= 1
            return False
        drafted = sum(d for d, _ in self.recent)
        if drafted >= guards.window and sum(a for _, a in self.recent) / drafted < guards.min_acceptance:
            self.recent.clear()
            self.paused, self.fired = max(guards.backoff - 1, 0), self.fired + 1
            return False
        return True
