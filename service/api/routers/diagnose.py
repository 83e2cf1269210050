"""`/v1/diagnose`: diagnose a training history sent in the request, stored nowhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends
from pydantic import SkipValidation

from converge.service import views
from converge.service.api.deps import error_responses, require_scope
from converge.service.schemas import HISTORY_EXAMPLES, DiagnosisOut, HistoryIn
from converge.studies.diagnosis import MAX_EPOCHS

router = APIRouter(prefix="/v1", tags=["diagnosis"])

# The model documents the body; validation is the diagnosis library's (`parse_history`), so that
# the API accepts exactly what the library does and reports its problems in its words.
HistoryBody = Annotated[SkipValidation[HistoryIn], Body(description="a training history",
                                                        openapi_examples=HISTORY_EXAMPLES)]


@router.post("/diagnose", response_model=DiagnosisOut, dependencies=[Depends(require_scope("read"))],
             responses=error_responses("read", body=True,
                                       invalid="the body is not JSON or not a valid history (epochs missing, out of "
                                               f"order or repeated, no train_loss, more than {MAX_EPOCHS} epochs, "
                                               "wrong types); `problems` lists every problem"))
def diagnose_history(history: HistoryBody) -> DiagnosisOut:
    """Diagnose a training history: why it did or did not converge, and what to change.

    The body is a history in the diagnosis contract's format (the body of
    `GET /v1/studies/{name}/trials/{number}/metrics?layout=history` is one). Only `epoch` and `train_loss` are
    required per epoch; a row may also carry the objective under its own name when it is none of the standard
    metrics (a plug-in's `val_mae`), read against `peers`; NaN and infinities may be the strings "NaN",
    "Infinity", "-Infinity" or bare NaN/Infinity tokens. At most 10,000 epochs. Nothing is stored.

    An optional `context` (every key optional, unknown keys ignored) tells what the curve cannot:
    `task`, `n_classes` (the chance level and an untrained network's loss, ln k), the trial's
    `params`, the search space's `bounds` (remedies stay inside them) and `peers`, the study's ended
    trials (`ended`, `best` and `top` with `value` and `params`: a level far behind the best is not
    converged, lr moves go toward the good trials'). A malformed context, or one that contradicts the
    history (`n_classes: 1`), is a 422 listing each problem.
    """
    return views.diagnose_history(history)
