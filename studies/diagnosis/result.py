"""The diagnosis output, in the contract's vocabulary: verdict, findings, remedies, summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HEALTHY_VERDICTS = ("converged", "still_improving")
UNHEALTHY_VERDICTS = ("diverged", "exploding_gradients", "vanishing_gradients", "oscillating",
                      "slow_convergence", "overfitting", "underfitting")
VERDICTS = HEALTHY_VERDICTS + UNHEALTHY_VERDICTS
REMEDY_PARAMS = ("lr", "batch_size", "epochs", "weight_decay", "dropout", "gradient_clip", "model")
REMEDY_ACTIONS = ("increase", "decrease", "set", "enable")


@dataclass(frozen=True)
class Finding:
    """One observation behind the verdict, with its numbers."""

    kind: str
    epoch: int | None
    evidence: str


@dataclass(frozen=True)
class Remedy:
    """A change to one hyperparameter: multiply by `factor`, set to `value`, or enable."""

    param: str
    action: str
    reason: str
    factor: float | None = None
    value: float | int | str | None = None

    def __post_init__(self) -> None:
        if self.param not in REMEDY_PARAMS:
            raise ValueError(f"unknown remedy param {self.param!r}")
        if self.action not in REMEDY_ACTIONS:
            raise ValueError(f"unknown remedy action {self.action!r}")

    def label(self) -> str:
        """Short form for tables and logs: "lr × 0.1", "epochs = 18", "gradient_clip on"."""
        if self.factor is not None:
            return f"{self.param} × {self.factor:g}"
        if self.value is not None:
            return f"{self.param} = {self.value}"
        return f"{self.param} {'on' if self.action == 'enable' else self.action}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"param": self.param, "action": self.action}
        if self.factor is not None:
            out["factor"] = self.factor
        if self.value is not None:
            out["value"] = self.value
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Diagnosis:
    verdict: str
    onset_epoch: int | None
    confidence: float
    findings: list[Finding] = field(default_factory=list)
    remedies: list[Remedy] = field(default_factory=list)
    summary: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}")

    @property
    def healthy(self) -> bool:
        return self.verdict in HEALTHY_VERDICTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "healthy": self.healthy,
            "onset_epoch": self.onset_epoch,
            "confidence": round(float(self.confidence), 3),
            "findings": [asdict(f) for f in self.findings],
            "remedies": [r.to_dict() for r in self.remedies],
            "summary": self.summary,
        }
