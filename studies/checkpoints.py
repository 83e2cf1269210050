"""Trained checkpoints kept as Optuna artifacts: the best trial's (or the top k), nothing else.

A trial saves its checkpoint to a temporary file when its study keeps any
(`StudySpec.kept_checkpoints`). Just before it completes, it uploads it as an Optuna artifact
(`upload_artifact`: a trial system attribute `artifacts:<id>` plus the file in the artifact
store) when its value would be among the kept ones, and records the id in its
`converge_checkpoint` user attribute; otherwise the file is dropped. After the trial has
completed, `retain` removes the artifact files of every finished trial no longer among the
`k` best completed ones. Optuna cannot delete a finished trial's attribute, so a removed
checkpoint's metadata stays; listings show only artifacts whose file the store still holds.

Imports no torch: the API lists and serves artifacts through this module.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select
from sqlalchemy.orm import Session

from converge.core.db import repo
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.optuna_tables import (
    optuna_studies,
    optuna_trial_system_attributes,
    optuna_trial_user_attributes,
    optuna_trials,
)
from converge.core.errors import NotFound
from converge.core.settings import Settings
from converge.studies.spec import StudySpec
from converge.studies.storage import storage_for

log = logging.getLogger("converge.checkpoints")

ARTIFACTS_ATTR_PREFIX = "artifacts:"  # optuna.artifacts._upload.ARTIFACTS_ATTR_PREFIX
CHECKPOINT_ATTR = "converge_checkpoint"  # trial user attribute: the artifact id of its checkpoint
ARTIFACT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"  # Optuna's uuid4 ids
_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)
_STREAM_CHUNK = 1 << 20


def artifact_dir(settings: Settings) -> Path:
    """`CONVERGE_ARTIFACT_DIR`, else `artifacts/` next to a SQLite database file, else `./artifacts`."""
    if settings.artifact_dir:
        return Path(settings.artifact_dir)
    url = settings.database_url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        database = url.removeprefix("sqlite:///").split("?", 1)[0]
        if database:
            return Path(database).parent / "artifacts"
    return Path("artifacts")


def artifact_store(settings: Settings) -> Any:
    """The configured Optuna artifact store: S3-compatible when `CONVERGE_ARTIFACT_S3_BUCKET` is set
    (boto3 imported only then), else the filesystem under `artifact_dir`."""
    if settings.artifact_s3_bucket:
        return _s3_store(settings.artifact_s3_bucket, settings.artifact_s3_endpoint_url or None)
    directory = artifact_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(directory)


@functools.lru_cache(maxsize=4)
def _s3_store(bucket: str, endpoint_url: str | None) -> Any:
    """One store (and boto3 client, which is thread-safe) per bucket and endpoint in a process:
    a client costs tens of milliseconds to build, and a slot asks for the store every trial."""
    import boto3  # only where an S3 store is configured
    from optuna.artifacts import Boto3ArtifactStore

    return Boto3ArtifactStore(bucket, client=boto3.client("s3", endpoint_url=endpoint_url))


def is_artifact_id(text: str) -> bool:
    return bool(_ARTIFACT_ID.match(text))


# ---------------------------------------------------------------- writing (a trial's process)


def _ranked(trials: list[FrozenTrial], direction: str) -> list[FrozenTrial]:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    return sorted(complete, key=lambda t: t.value, reverse=direction == "maximize")  # type: ignore[arg-type, return-value]


def is_candidate(study: optuna.Study, value: float, direction: str, k: int) -> bool:
    """Whether `value` would be among the `k` best of the study's completed trials (as last read)."""
    if k <= 0 or not math.isfinite(value):
        return False
    ranked = _ranked(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), direction)
    if len(ranked) < k:
        return True
    kth = ranked[k - 1].value
    assert kth is not None
    return value > kth if direction == "maximize" else value < kth


def upload_checkpoint(trial: optuna.Trial, store: Any, path: Path) -> str:
    """Store `path` as the trial's checkpoint artifact; its id goes into the trial's `converge_checkpoint`."""
    artifact_id = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                                                   mimetype="application/octet-stream")
    trial.set_user_attr(CHECKPOINT_ATTR, artifact_id)
    return artifact_id


def retain(storage: optuna.storages.BaseStorage, store: Any, study_name: str, direction: str, k: int) -> list[str]:
    """Remove the checkpoint files of finished trials outside the `k` best completed ones; return the removed ids.

    Running trials are left alone: their own `retain`, after they complete, decides. The
    trial finishing last reads every other, so the kept set is right once the study ends.
    """
    trials = storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False)
    kept = {t.number for t in _ranked(trials, direction)[:k]}
    removed = []
    for t in trials:
        artifact_id = t.user_attrs.get(CHECKPOINT_ATTR)
        if not artifact_id or t.number in kept or not t.state.is_finished():
            continue
        try:
            store.remove(artifact_id)
        except ArtifactNotFound:
            continue
        except Exception:  # a store that fails to delete costs disk space, never the trial
            log.exception("could not remove checkpoint %s of trial %d", artifact_id, t.number)
            continue
        removed.append(artifact_id)
        log.info("study %s: removed the checkpoint of trial %d (not among the %d best)", study_name, t.number, k)
    return removed


# ---------------------------------------------------------------- reading (the API, the CLI)


@dataclass
class ArtifactMeta:
    artifact_id: str
    filename: str
    mimetype: str
    encoding: str | None
    trial_number: int
    checkpoint: bool  # the trial's kept checkpoint (`converge_checkpoint`), not an artifact of the user's


def exists(store: Any, artifact_id: str) -> bool:
    try:
        store.open_reader(artifact_id).close()
    except ArtifactNotFound:
        return False
    return True


def trial_artifacts(storage: optuna.storages.BaseStorage, store: Any, study_name: str,
                    number: int) -> list[ArtifactMeta]:
    """The artifacts of one trial whose file the store holds. KeyError: no such study or trial."""
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    checkpoint = storage.get_trial_user_attrs(trial_id).get(CHECKPOINT_ATTR)
    found = []
    for key, value in storage.get_trial_system_attrs(trial_id).items():
        if not key.startswith(ARTIFACTS_ATTR_PREFIX):
            continue
        meta = json.loads(value) if isinstance(value, str) else value
        if exists(store, meta["artifact_id"]):
            found.append(ArtifactMeta(meta["artifact_id"], meta["filename"], meta["mimetype"], meta.get("encoding"),
                                      number, meta["artifact_id"] == checkpoint))
    return sorted(found, key=lambda a: a.filename)


def find_artifact(session: Session, study_name: str, artifact_id: str) -> ArtifactMeta | None:
    """One artifact of a study's trials by id (one indexed query), or None; the id's form is checked first."""
    if not is_artifact_id(artifact_id):
        return None
    row = session.execute(
        select(optuna_trial_system_attributes.c.value_json, optuna_trials.c.number, optuna_trials.c.trial_id)
        .join(optuna_trials, optuna_trials.c.trial_id == optuna_trial_system_attributes.c.trial_id)
        .join(optuna_studies, optuna_studies.c.study_id == optuna_trials.c.study_id)
        .where(optuna_studies.c.study_name == study_name,
               optuna_trial_system_attributes.c.key == ARTIFACTS_ATTR_PREFIX + artifact_id)
    ).first()
    if row is None:
        return None
    meta = json.loads(json.loads(row.value_json))  # Optuna stores the JSON text as a JSON string
    checkpoint = session.execute(
        select(optuna_trial_user_attributes.c.value_json)
        .where(optuna_trial_user_attributes.c.trial_id == row.trial_id,
               optuna_trial_user_attributes.c.key == CHECKPOINT_ATTR)
    ).scalar()
    return ArtifactMeta(meta["artifact_id"], meta["filename"], meta["mimetype"], meta.get("encoding"), row.number,
                        checkpoint is not None and json.loads(checkpoint) == artifact_id)


def open_artifact(store: Any, artifact_id: str) -> Iterator[bytes] | None:
    """The artifact's bytes in chunks, or None when the store no longer holds it."""
    if not is_artifact_id(artifact_id):  # never a path outside the store
        return None
    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        return None

    def chunks() -> Iterator[bytes]:
        with reader:
            while chunk := reader.read(_STREAM_CHUNK):
                yield chunk

    return chunks()


def best_checkpoint(storage: optuna.storages.BaseStorage, store: Any,
                    study_name: str) -> tuple[FrozenTrial, str | None]:
    """The study's best trial and the id of its checkpoint artifact (None: it has none the store holds).
    KeyError: no such study; ValueError: no completed trial yet."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    best = study.best_trial
    artifact_id = best.user_attrs.get(CHECKPOINT_ATTR)
    if artifact_id and exists(store, artifact_id):
        return best, artifact_id
    return best, None


@dataclass(frozen=True)
class ExportedBest:
    """What `export_best` wrote: the best trial's checkpoint and its hyperparameters.yaml."""

    trial: int
    value: float
    metric: str
    checkpoint: Path
    hyperparameters: Path


def export_best(settings: Settings, name: str, out_dir: Path) -> ExportedBest:
    """Write the best trial's kept checkpoint (under the name it was uploaded with) and a
    hyperparameters.yaml (the study, trial number and value, the objective, the five
    hyperparameters, the task and seed) into `out_dir`; the spec is read from Converge's table.

    NotFound when the study does not exist, has no completed trial, or its best trial has no
    checkpoint kept (a built-in model's study keeps none unless its spec asks).
    """
    with session_scope(get_engine(settings.database_url)) as session:
        spec = StudySpec.model_validate(repo.get_study(session, name).spec)  # NotFound: no such study
    store = artifact_store(settings)
    storage = storage_for(settings)
    try:
        best, artifact_id = best_checkpoint(storage, store, name)
    except KeyError:
        raise NotFound(f"no study named {name!r}") from None
    except ValueError:
        raise NotFound(f"study {name!r} has no completed trial yet") from None
    if artifact_id is None:
        raise NotFound(f"the best trial ({best.number}) of {name!r} has no checkpoint kept; a spec keeps "
                       "them with checkpoints: {keep: best}")
    meta = next(m for m in trial_artifacts(storage, store, name, best.number) if m.artifact_id == artifact_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(meta.filename).name
    with target.open("wb") as f:
        for chunk in open_artifact(store, artifact_id) or ():
            f.write(chunk)
    document = {"study": name, "trial": best.number, "value": best.value,
                "objective": spec.objective.model_dump(), "hyperparameters": dict(best.params),
                "task": {k: v for k, v in spec.task.model_dump().items() if v is not None},
                "seed": spec.training_seed(), "checkpoint": target.name}
    hyperparameters = out_dir / "hyperparameters.yaml"
    hyperparameters.write_text(yaml.safe_dump(document, sort_keys=False))
    assert best.value is not None
    return ExportedBest(best.number, best.value, spec.objective.metric, target, hyperparameters)
