"""What a comparison returns: frozen results, no database access."""
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelComparison:
    label: str
    table: str
    left_rows: int
    right_rows: int
    compared: int          # keys examined, of both sides, each once
    identical: int
    missing_keys: tuple    # on the left, not on the right
    extra_keys: tuple      # on the right, not on the left
    changed: tuple         # ((pk, (field names...)), ...)
    complete: bool
    seconds: float
    sampled: int = 0
    sample_differences: int = 0
    rechecked: int = 0     # rows re-read exactly (checksum mode)

    @property
    def differences(self) -> int:
        return (len(self.missing_keys) + len(self.extra_keys)
                + len(self.changed))

    @property
    def integrity(self) -> float:
        """identical / max(rows) in percent (100 for two empty tables)."""
        rows = max(self.left_rows, self.right_rows)
        return 100.0 if rows == 0 else 100.0 * self.identical / rows

    @property
    def ok(self) -> bool:
        return self.complete and self.differences == 0 \
            and self.left_rows == self.right_rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['changed'] = [{'pk': pk, 'fields': list(names)}
                           for pk, names in self.changed]
        data['missing_keys'] = list(self.missing_keys)
        data['extra_keys'] = list(self.extra_keys)
        data.update(integrity=round(self.integrity, 4), ok=self.ok,
                    differences=self.differences)
        return data


@dataclass(frozen=True)
class AtRiskReport:
    """What a rollback to the left side (the reference, e.g. a backup)
    would lose or bring back, per model label.

    keys         right-side (live) keys missing on the left or differing
                 from it: extra keys first, then changed ones
    resurrected  how many left-side keys the right side lacks (rows
                 deleted on the live side that the rollback restores)
    """
    keys: dict[str, list]
    resurrected: dict[str, int]


@dataclass(frozen=True)
class CompareReport:
    left_alias: str
    right_alias: str
    left_description: str
    right_description: str
    deep: bool
    sample_size: int
    models: tuple[ModelComparison, ...]
    not_compared: tuple[str, ...]
    complete: bool
    stopped_reason: str
    notes: tuple[str, ...]
    seconds: float

    @property
    def left_rows(self) -> int:
        return sum(m.left_rows for m in self.models)

    @property
    def right_rows(self) -> int:
        return sum(m.right_rows for m in self.models)

    @property
    def identical(self) -> int:
        return sum(m.identical for m in self.models)

    @property
    def differences(self) -> int:
        return sum(m.differences for m in self.models)

    @property
    def integrity(self) -> float:
        rows = sum(max(m.left_rows, m.right_rows) for m in self.models)
        return 100.0 if rows == 0 else 100.0 * self.identical / rows

    @property
    def min_model_integrity(self) -> float:
        return min((m.integrity for m in self.models), default=100.0)

    @property
    def ok(self) -> bool:
        return self.complete and all(m.ok for m in self.models)

    def at_risk_keys(self) -> AtRiskReport:
        """Right-side keys missing on the left or differing from it, and
        counts of left-side keys missing on the right (models without
        any are left out of each)."""
        keys = {m.label: list(m.extra_keys) + [pk for pk, _ in m.changed]
                for m in self.models if m.extra_keys or m.changed}
        resurrected = {m.label: len(m.missing_keys)
                       for m in self.models if m.missing_keys}
        return AtRiskReport(keys, resurrected)

    def to_dict(self) -> dict[str, Any]:
        return {
            'left': self.left_description,
            'right': self.right_description,
            'mode': 'deep' if self.deep else 'checksum',
            'sample_size': self.sample_size,
            'complete': self.complete,
            'stopped_reason': self.stopped_reason,
            'ok': self.ok,
            'integrity': round(self.integrity, 4),
            'left_rows': self.left_rows,
            'right_rows': self.right_rows,
            'identical': self.identical,
            'differences': self.differences,
            'seconds': round(self.seconds, 3),
            'notes': list(self.notes),
            'not_compared': list(self.not_compared),
            'models': [m.to_dict() for m in self.models],
        }
