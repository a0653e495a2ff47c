"""What the refinement of an automatic plan did (:func:`quept.api.plan` with ``refine``), round
by round, as the plan records it: the rounds asked, the moves each round predicted to help,
how many plans it measured and how many moves it kept, so that a refinement that changed
nothing says so instead of leaving no trace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quept.checks import ConfigError


@dataclass(frozen=True)
class RefineRound:
    """One round of local search around the plan kept so far.

    round: its number, from 1.
    moves: blocks the exact choice moves, each move predicted to lower the cost (0: none was,
        and nothing was measured).
    tries: plans measured (the whole choice, then choices of fewer moves).
    kept_moves: blocks moved by the plan the round kept, its measured cost being lower; None
        when no try lowered it (the round ends the refinement).
    """

    round: int
    moves: int
    tries: int
    kept_moves: int | None = None

    def __post_init__(self) -> None:
        least = {"round": (self.round, 1), "moves": (self.moves, 0), "tries": (self.tries, 0)}
        bad = {k: n for k, (n, lo) in least.items()
               if isinstance(n, bool) or not isinstance(n, int) or n < lo}
        if bad:
            raise ConfigError(f"a refinement round needs an integer round >= 1 and counts of "
                              f"moves and tries >= 0, got {bad}")
        if bool(self.moves) != bool(self.tries):
            raise ConfigError(f"round {self.round} of refinement records {self.moves} predicted "
                              f"moves and {self.tries} tries: a round measures plans exactly "
                              "when it predicts moves")
        kept = self.kept_moves
        if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int)
                                 or not 1 <= kept <= self.moves):
            raise ConfigError(f"round {self.round} of refinement kept {kept!r} moves; it can "
                              f"keep 1 to its {self.moves} predicted moves, or none (null)")

    def words(self) -> str:
        """The round in words: "round 1 kept 2 of 7 moves (3 tries)", "round 2: 4 tries of
        up to 7 moves, none helped", "round 1: no move predicted to help, nothing measured"."""
        if not self.moves:
            return f"round {self.round}: no move predicted to help, nothing measured"
        tries = f"{self.tries} tr{'y' if self.tries == 1 else 'ies'}"
        if self.kept_moves is None:
            return (f"round {self.round}: {tries} of up to {self.moves} "
                    f"move{'' if self.moves == 1 else 's'}, none helped")
        return f"round {self.round} kept {self.kept_moves} of {self.moves} moves ({tries})"


@dataclass(frozen=True)
class Refinement:
    """The refinement of one plan: ``rounds`` asked (``refine``), and the rounds ``tried`` in
    order; a round that keeps nothing is the last."""

    rounds: int
    tried: tuple[RefineRound, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"refinement rounds must be an integer >= 1, got {self.rounds!r}")
        if len(self.tried) > self.rounds:
            raise ConfigError(f"a refinement of {self.rounds} round(s) records "
                              f"{len(self.tried)}")

    @property
    def kept_moves(self) -> int:
        """Block moves kept over all rounds (0: the plan is the one refinement started from)."""
        return sum(r.kept_moves or 0 for r in self.tried)

    def words(self) -> str:
        """The refinement in one line, as `quept plan` and `quept info` print it."""
        asked = f"refinement (up to {self.rounds} round{'' if self.rounds == 1 else 's'}): "
        verdict = (f"{self.kept_moves} block move(s) kept in all" if self.kept_moves
                   else "the plan is unchanged")
        return asked + "; ".join([*(r.words() for r in self.tried), verdict])

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds,
                "tried": [{"round": r.round, "moves": r.moves, "tries": r.tries,
                           "kept_moves": r.kept_moves} for r in self.tried]}

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Refinement:
        """A refinement as :meth:`to_dict` writes it; ConfigError naming ``where`` otherwise."""
        if not isinstance(d, Mapping) or not isinstance(d.get("tried"), list) or not all(
                isinstance(r, Mapping) for r in d["tried"]):
            raise ConfigError(f"{where}: 'refinement' must be an object with 'rounds' and a "
                              f"list 'tried' of rounds, got {d!r}")
        try:
            return cls(d.get("rounds"), tuple(
                RefineRound(r.get("round"), r.get("moves"), r.get("tries"), r.get("kept_moves"))
                for r in d["tried"]))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
