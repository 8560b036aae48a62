"""SlotConfig: the settings of a slot machine network, validated once, in the spirit of torchao's
quantisation configs. Layers, :func:`seedslot.slotify_` and :func:`seedslot.models.build` take one
(or the same settings as keywords)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .candidates import SHARING
from .selection import SELECTION
from .storages import SCORES, ScoreStorage, storage_for
from .validate import check_choice, check_int

__all__ = ["SlotConfig", "UNSET"]


class _Unset:
    """The default of a slot keyword (``k``, ``seed``, ...) of the layers, ``slotify_`` and
    ``build``: "not given", told apart from a value equal to SlotConfig's default."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<SlotConfig's default>"


UNSET = _Unset()


@dataclass(frozen=True)
class SlotConfig:
    """How slot layers choose their weights.

    ``k`` candidates per connection; ``sharing`` "none" (each connection its own), "layer" or
    "global" (one set of K per layer / per model); ``selection`` "greedy" or "sample" (training
    forwards draw from softmax(scores)); ``scores`` the storage of seeded layers, "int8", "fp32" or
    "implicit" (see :mod:`seedslot.storages`; the dense reference always keeps fp32 scores);
    ``score_lambda`` scales the initial scores U(0, lambda*sigma), None for the paper's value (0.1
    for linear, 1 for conv layers); ``seed`` the seed of a layer (or of a model, from which
    ``slotify_`` derives each layer's); ``incremental`` (implicit scores only) re-selects only the
    connections whose greedy selection can have changed since the last one: the same selections,
    faster, for 13 more bytes per connection (see
    :class:`~seedslot.storages.IncrementalImplicitScores`)."""

    k: int = 8
    sharing: str = "none"
    selection: str = "greedy"
    scores: str = "int8"
    score_lambda: float | None = None
    seed: int = 0
    incremental: bool = False

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_int("seed", self.seed)
        check_choice("sharing", self.sharing, SHARING)
        check_choice("selection", self.selection, SELECTION)
        check_choice("scores", self.scores, SCORES)
        if not isinstance(self.incremental, bool):
            raise ValueError(f"incremental must be a bool; got {self.incremental!r}")
        storage_for(self.scores, self.incremental)  # incremental needs implicit scores
        lam = self.score_lambda
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                                or not (math.isfinite(lam) and lam > 0)):
            raise ValueError(f"score_lambda must be a finite float > 0 or None; got {lam!r}")

    def to_dict(self) -> dict:
        """The settings as a dict of JSON values (what ``build_args`` and files keep)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, settings) -> "SlotConfig":
        """The config ``settings`` (a :meth:`to_dict`) describe, validated; ValueError naming an
        unknown field or a bad value. Missing fields take their defaults."""
        if not isinstance(settings, dict):
            raise ValueError(f"slot settings must be a dict; got {type(settings).__name__}")
        unknown = sorted(map(str, set(settings) - set(cls.__dataclass_fields__)))
        if unknown:
            raise ValueError(f"unknown slot setting {unknown[0]!r:.80}; accepted: {', '.join(cls.__dataclass_fields__)}")
        return cls(**settings)

    @property
    def storage(self) -> ScoreStorage:
        """The score storage ``scores`` names."""
        return storage_for(self.scores, self.incremental)

    def replace(self, **changes) -> "SlotConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, config: "SlotConfig | None", where: str, **keywords) -> "SlotConfig":
        """``config``, or a SlotConfig of the keyword settings given (not :data:`UNSET`); ValueError
        if both come (``where`` names the caller in the message), even a keyword equal to its default."""
        given = {key: v for key, v in keywords.items() if v is not UNSET}
        if config is None:
            return cls(**given)
        if not isinstance(config, SlotConfig):
            raise ValueError(f"config must be a SlotConfig; got {type(config).__name__}")
        if given:
            raise ValueError(f"{where} takes the slot settings as config or as keywords, not both; got config "
                             f"and {', '.join(sorted(given))}")
        return config
