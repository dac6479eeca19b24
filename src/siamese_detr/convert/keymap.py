"""Pure state-dict key maps with a report of what was mapped, dropped and left over.

A :class:`KeyMap` is an ordered list of rules. Each rule either renames a key prefix
(``("backbone.body.", "backbone.0.body.")``), drops keys under a prefix, or expands one tensor
into several target keys (per-layer replication whose count is read from the stored config).
Keys that no rule matches are *unmapped*; callers exit non-zero on them unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

Transform = Callable[[str, Tensor], list[tuple[str, Tensor]]]


@dataclass(frozen=True)
class Rule:
    """One rule: keys starting with ``prefix`` are dropped (``drop``), expanded by ``transform``,
    or renamed to ``target + rest``."""

    prefix: str
    target: str = ""
    drop: bool = False
    transform: Transform | None = None
    why: str = ""


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    unmapped: list[str] = field(default_factory=list)
    # why upstream cannot use the file (only with own_code_only; see convert.compat)
    blockers: list[str] = field(default_factory=list)
    upstream_args: str = ""  # upstream main.py model arguments that rebuild this model

    @property
    def ok(self) -> bool:
        return not self.unmapped

    def summary(self) -> str:
        lines = [
            f"mapped: {len(self.mapped)} tensors",
            f"dropped: {len(self.dropped)} tensors",
            f"unmapped: {len(self.unmapped)} tensors",
        ]
        if self.blockers:
            lines.append("FOR SIAMESE-DETR'S OWN CODE ONLY, upstream cannot use it: "
                         + "; ".join(self.blockers))
        reasons: dict[str, int] = {}
        for _, why in self.dropped:
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  dropped ({n}): {why}" for why, n in sorted(reasons.items())]
        lines += [f"  UNMAPPED: {k}" for k in self.unmapped[:50]]
        if len(self.unmapped) > 50:
            lines.append(f"  ... and {len(self.unmapped) - 50} more")
        return "\n".join(lines)


def apply_keymap(
    state_dict: dict[str, Tensor], rules: list[Rule]
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Apply ``rules`` (first match wins) to every key of ``state_dict``."""
    out: dict[str, Tensor] = {}
    report = ConversionReport()
    for key, value in state_dict.items():
        rule = next((r for r in rules if key.startswith(r.prefix)), None)
        if rule is None:
            report.unmapped.append(key)
            continue
        if rule.drop:
            report.dropped.append((key, rule.why or f"prefix {rule.prefix!r} is dropped"))
            continue
        if rule.transform is not None:
            produced = rule.transform(key, value)
        else:
            produced = [(rule.target + key[len(rule.prefix) :], value)]
        for new_key, new_value in produced:
            if new_key in out:
                raise ValueError(f"key map produces {new_key!r} twice (from {key!r})")
            out[new_key] = new_value
            report.mapped.append((key, new_key))
    return out, report
