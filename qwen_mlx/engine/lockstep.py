"""Keeping the ranks of a parallel model in step: rank 0 decides, every rank does the same.

Each rank of a sharded model (`parallel`) runs the same worker loop over its part of the model, and every forward
pass needs all of them, in the same order, with the same shapes. Their loops stay identical if every input that
comes from outside is rank 0's: requests (HTTP, the UI, the terminal), cancellations, and anything a clock or the
machine decides. So rank 0 shares each turn of its loop as one `Plan` before any rank acts on it, and the loop
itself depends on nothing else (no timings: `Decoder(timed=False)`; explicit seeds; one memory budget).

Plans travel as JSON over `mx.distributed.all_sum` (rank 0 contributes the bytes, the others zeros): MLX's own
transport, nothing unpickled. A rank that is gone shows up as a failed collective (`LostPeer`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlx.core as mx
import numpy as np

from qwen_mlx.engine.request import GenerationRequest, SpeculationSettings
from qwen_mlx.engine.speculative import DraftModel
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.generation_config import SamplingParams

HEARTBEAT_S = 1.0  # an idle rank 0 shares an empty plan this often, so a lost rank is noticed within it


class LostPeer(QwenMLXError):
    """Another rank of the group stopped (it failed, exited or lost its link)."""


@dataclass
class Start:
    """A request to start decoding, under `uid` on every rank."""

    uid: int
    session: str | None
    request: dict[str, Any]


@dataclass
class Plan:
    """One turn of rank 0's worker loop, for every rank to act on in this order."""

    settings: dict[str, Any] | None = None  # the first plan: what every rank's loop must agree on
    forget: list[str] = field(default_factory=list)  # sessions whose cached turn is dropped
    cancel: list[int] = field(default_factory=list)  # running uids that end with "cancelled"
    start: list[Start] = field(default_factory=list)
    exit: bool = False  # rank 0 is done: the others return

    @property
    def empty(self) -> bool:
        return not (self.settings or self.forget or self.cancel or self.start or self.exit)


class Lockstep:
    """Shares rank 0's plans with the ranks of `group`."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.leads = group.rank() == 0

    def share(self, plan: Plan | None) -> Plan:
        """Rank 0's `plan` on every rank (the others pass None). An empty plan costs one tiny collective."""
        data = b"" if plan is None or plan.empty else json.dumps(asdict(plan)).encode()
        size = self._sum(np.array([len(data)], np.int64))[0]
        if size == 0:
            return Plan()
        received = self._sum(np.frombuffer(data, np.uint8) if self.leads else np.zeros(int(size), np.uint8))
        message = json.loads(received.tobytes())
        message["start"] = [Start(**s) for s in message["start"]]
        return Plan(**message)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        if not self.leads:
            values = np.zeros_like(values)
        try:
            total = mx.distributed.all_sum(mx.array(values), group=self.group)
            mx.eval(total)
        except RuntimeError as e:
            raise LostPeer(f"another process of the group stopped ({e})") from None
        return np.array(total)


def encode_request(request: GenerationRequest) -> dict[str, Any]:
    """A request as JSON, with a seed (one rank 0 draws when it has none: every rank must sample alike)."""
    seed = request.seed if request.seed is not None else random.getrandbits(63)
    data = asdict(replace(request, seed=seed, speculation=None))
    if request.speculation is not None:
        data["speculation"] = {**asdict(replace(request.speculation, draft=None)),
                               "draft": request.speculation.draft is not None}
    return data


def decode_request(data: dict[str, Any], draft: DraftModel | None) -> GenerationRequest:
    """`encode_request`'s request again, on another rank; a draft model is that rank's own copy of it."""
    fields = dict(data, sampling=SamplingParams(**data["sampling"]), cache=CacheSettings(**data["cache"]),
                  stop=tuple(data["stop"]))
    speculation = data.get("speculation")
    if speculation is not None:
        prediction = speculation["prediction"]
        fields["speculation"] = SpeculationSettings(
            **dict(speculation, draft=draft if speculation["draft"] else None,
                   prediction=tuple(prediction) if prediction is not None else None))
    return GenerationRequest(**fields)
