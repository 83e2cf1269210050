"""The dry run of a user's own model and data: one function for `converge study create --check`
and for a worker before a study's first trial.

It imports both factories, builds the module and its data with one point of the search space,
and runs one training and one validation batch on the CPU (`trainers.plugins.dry_run`);
it fails, naming the cause and the import path, when any step does or when the module logs
no objective metric. torch is imported here only when the check runs.
"""

from __future__ import annotations

import math
from typing import Any

from converge.core.settings import Settings
from converge.studies import policy
from converge.studies.spec import PARAM_NAMES, FloatRange, IntChoices, IntRange, StudySpec

CHECKED_ATTR = "converge_plugin_checked"  # study user attribute: a worker's dry run passed (its seconds)


class PluginCheckError(RuntimeError):
    """The user's model or data failed the dry run; the message names the cause and the path."""


def dry_run_params(spec: StudySpec) -> dict[str, Any]:
    """One point of the search space for the dry run: the middle of each range (geometric on a
    log scale), the smallest batch size, one epoch."""
    params: dict[str, Any] = {}
    for name in PARAM_NAMES:
        p = getattr(spec.search_space, name)
        if isinstance(p, FloatRange):
            params[name] = math.sqrt(p.low * p.high) if p.log else (p.low + p.high) / 2
        elif isinstance(p, IntRange):
            params[name] = p.low
        elif isinstance(p, IntChoices):
            params[name] = min(p.choices)
        else:
            params[name] = p.values()[0]
    params["epochs"] = 1
    return params


def check_before_running(spec: StudySpec, settings: Settings) -> None:
    """The worker's check before anything of a study runs (and `study create --check`'s): the operator's
    policy (`studies.policy.check_spec`), then, for the user's own factories, that each is defined in an
    allowed module. Only allowed modules are imported (`trainers.plugins.load_factory`), so a name an
    allowed module merely re-exports (`os.system`) is refused unrun. PolicyError if not allowed."""
    policy.check_spec(spec, settings)
    if not spec.task.is_plugin:
        return
    from converge.trainers.plugins import PluginError, load_factory

    prefixes = settings.split(settings.plugin_modules)
    problems = []
    for role in ("model", "data"):
        path: str = getattr(spec.task, role)
        try:
            factory = load_factory(path, role)
        except PluginError as exc:
            problems.append(str(exc))
            continue
        defined_in = getattr(factory, "__module__", None)
        if not (isinstance(defined_in, str) and policy.module_allowed(defined_in, prefixes)):
            problems.append(f"task.{role} {path!r} is defined in {defined_in!r}, not in an allowed module "
                            "(CONVERGE_PLUGIN_MODULES): a name an allowed module merely imports from elsewhere "
                            "is refused")
    if problems:
        raise policy.PolicyError(problems)


def check_task(spec: StudySpec, settings: Settings | None = None) -> dict[str, Any]:
    """Dry-run the spec's own model and data; return what it logged (name: value) and its seconds.

    PluginCheckError when the model or data does not import, build or run a batch, or when it
    logs no objective metric. A built-in task needs no check (returns an empty dict).
    """
    if not spec.task.is_plugin:
        return {}
    from converge.studies.objective import train_config
    from converge.trainers.plugins import PluginError, dry_run

    try:
        config = train_config(spec, dry_run_params(spec), device="cpu", settings=settings)
        result = dry_run(config, spec.objective.metric)
    except (PluginError, ValueError) as exc:
        raise PluginCheckError(str(exc)) from None
    except Exception as exc:  # anything else the user's code raised while being built
        raise PluginCheckError(f"task.model {spec.task.model!r} with task.data {spec.task.data!r}: "
                               f"{type(exc).__name__}: {exc}") from None
    return {"metrics": {k: result.metrics.get(k) for k in result.logged}, "seconds": result.seconds}
