"""Trial artifacts (kept checkpoints): list a trial's, download one by id.

The files live in Optuna's artifact store (`studies.checkpoints.artifact_store`: a directory,
or an S3-compatible bucket); their metadata in Optuna's trial system attributes. An id is an
Optuna artifact id (a UUID): anything else is refused before the store is touched, so a
path never leaves the store.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from converge.service.api.deps import SessionDep, SessionRoute, SettingsDep, StorageDep, error_responses, require_scope
from converge.service.api.routers.studies import BAD_NAME, BAD_PATH, StudyName, TrialNumber
from converge.studies import checkpoints

router = APIRouter(prefix="/v1/studies", tags=["artifacts"], route_class=SessionRoute)

READ = [Depends(require_scope("read"))]
ARTIFACT_EXAMPLE = {"artifact_id": "0b0e7cbb-5b0c-4d4e-9a43-0f1f5bb0c8a1", "filename": "blobs-trial-3.ckpt",
                    "mimetype": "application/octet-stream", "encoding": None, "trial_number": 3, "checkpoint": True}

ArtifactId = Annotated[str, Path(pattern=checkpoints.ARTIFACT_ID_PATTERN,
                                 description="an artifact's id, as its trial's artifact list gives it (a UUID)",
                                 openapi_examples={"an artifact": {"value": ARTIFACT_EXAMPLE["artifact_id"]}})]


class ArtifactOut(BaseModel):
    """A file kept for a trial in the artifact store."""

    model_config = ConfigDict(json_schema_extra={"examples": [ARTIFACT_EXAMPLE]})

    artifact_id: str = Field(description="the id to download it by: GET /v1/studies/{name}/artifacts/{artifact_id}")
    filename: str
    mimetype: str
    encoding: str | None
    trial_number: int
    checkpoint: bool = Field(description="the trial's kept checkpoint (Lightning's format), rather than an artifact "
                                         "the user's code uploaded")


@router.get("/{name}/trials/{number}/artifacts", response_model=list[ArtifactOut], dependencies=READ,
            responses={**error_responses("read", {404: "no such study or trial"}, invalid=BAD_PATH),
                       200: {"content": {"application/json": {"example": [ARTIFACT_EXAMPLE]}}}})
def list_trial_artifacts(name: StudyName, number: TrialNumber, settings: SettingsDep,
                         storage: StorageDep) -> list[ArtifactOut]:
    """The trial's artifacts that the store still holds: its checkpoint when the study keeps it
    (spec `checkpoints`: the best trial's by default for a model of your own, the `top_k` best with
    `keep: top_k`); empty for pruned, failed and no-longer-kept trials."""
    store = checkpoints.artifact_store(settings)
    try:
        found = checkpoints.trial_artifacts(storage, store, name, number)
    except KeyError:
        raise HTTPException(404, f"no trial {number} in study {name!r}") from None
    return [ArtifactOut(**vars(a)) for a in found]


@router.get("/{name}/artifacts/{artifact_id}", response_model=ArtifactOut, dependencies=READ,
            responses={**error_responses("read", {404: "no such study, or no artifact of that id in it (or its file "
                                                       "was removed: the trial is no longer among the kept ones)"},
                                         invalid=f"{BAD_NAME}, or the id is not an artifact id (a UUID)"),
                       200: {"description": "the file, as an attachment named as uploaded; its metadata instead "
                                            "with `Accept: application/json` (and not application/octet-stream)",
                             "content": {"application/octet-stream": {
                                 "schema": {"type": "string", "format": "binary"},
                                 "example": "(the checkpoint's bytes: a torch.save() archive in Lightning's format)"},
                                 "application/json": {"example": ARTIFACT_EXAMPLE}}}})
def download_artifact(name: StudyName, artifact_id: ArtifactId, settings: SettingsDep, session: SessionDep,
                      accept: Annotated[str | None, Header(include_in_schema=False)] = None) -> Any:
    """Download one artifact of the study's trials (e.g. the best trial's checkpoint), streamed; with
    `Accept: application/json`, its metadata instead (as in the trial's artifact list)."""
    meta = checkpoints.find_artifact(session, name, artifact_id)
    store = checkpoints.artifact_store(settings)
    if meta is not None and accept and "application/json" in accept and "application/octet-stream" not in accept:
        if checkpoints.exists(store, artifact_id):
            return ArtifactOut(**vars(meta))
        meta = None
    chunks = checkpoints.open_artifact(store, artifact_id) if meta else None
    if meta is None or chunks is None:
        raise HTTPException(404, f"no artifact {artifact_id} in study {name!r}")
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in meta.filename) or "artifact"
    headers = {"Content-Disposition": f'attachment; filename="{safe_name}"'}
    if meta.encoding:
        headers["Content-Encoding"] = meta.encoding
    return StreamingResponse(chunks, media_type=meta.mimetype, headers=headers)
