"""What the operator lets a spec make a worker do: which plug-in modules it may import and which
CSV files it may read.

A `write` token must not be able to run code or read files the operator did not allow, so a
spec is checked where it enters (`studies.lifecycle.submit_study`, used by the API, the CLI and
the scheduler; schedules when they are saved) and again by the worker before it imports or
opens anything (`studies.plugin_check.check_before_running`), since a spec can reach the
database by other routes. The API side never imports the user's code: it checks the module path
only. The worker also checks that the factory is defined in an allowed module, so a name an
allowed package merely re-exports (`os.system` under `mypkg`) is refused. trainers/data.py
checks a CSV path again on the real path, just before it opens the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from converge.core.settings import Settings
from converge.studies.spec import SpecError, StudySpec

# Never importable as a plug-in, whatever CONVERGE_PLUGIN_MODULES lists: Converge's own import root.
# (A user's own `service` or `trainers` package is theirs: Converge installs nothing under those names.)
CONVERGE_PACKAGES = frozenset({"converge"})


class PolicyError(SpecError):
    """The spec asks for something the operator's settings do not allow; `problems` lists each
    (a SpecError: a 422 from the API, exit 2 from the CLI)."""


def module_allowed(module: str, prefixes: list[str]) -> bool:
    """`module` lies under one of `prefixes` (whole dotted parts: `mypkg` allows `mypkg.models`, not
    `mypkg2`) and is neither the standard library nor Converge's own."""
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names or top in CONVERGE_PACKAGES:
        return False
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _plugin_problems(spec: StudySpec, settings: Settings) -> list[str]:
    if not spec.task.is_plugin:
        return []
    prefixes = settings.split(settings.plugin_modules)
    problems = []
    for role in ("model", "data"):
        path: str = getattr(spec.task, role)
        module = path.partition(":")[0]
        if module_allowed(module, prefixes):
            continue
        if module.partition(".")[0] in sys.stdlib_module_names | CONVERGE_PACKAGES:
            why = "the standard library and Converge's own packages are never allowed"
        else:
            listed = ", ".join(prefixes) if prefixes else "nothing: plug-ins are off"
            why = f"the operator allows plug-ins only from the modules in CONVERGE_PLUGIN_MODULES (now {listed})"
        problems.append(f"task.{role}: module {module!r} of {path!r} is not allowed: {why}")
    return problems


def data_root(settings: Settings) -> Path:
    """The folder `csv:` paths resolve in (CONVERGE_DATA_DIR, relative to the working directory)."""
    return Path(settings.data_dir).resolve()


def csv_path(dataset: str) -> str | None:
    """The file part of a `csv:PATH?target=...` dataset, None for any other dataset."""
    return dataset[len("csv:"):].partition("?")[0] if dataset.startswith("csv:") else None


def _data_problems(spec: StudySpec, settings: Settings) -> list[str]:
    path_text = csv_path(spec.task.dataset)
    if path_text is None or spec.task.is_plugin:
        return []
    root = data_root(settings)
    try:  # an absolute path replaces the root in the join; `resolve` follows `..` and symlinks that exist here
        inside = (root / path_text).resolve().is_relative_to(root)
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        inside = False
    if not inside:
        return [f"task.dataset: CSV path {path_text!r} is outside the data folder {root} (CONVERGE_DATA_DIR); "
                "give a path inside it"]
    return []


def policy_problems(spec: StudySpec, settings: Settings) -> list[str]:
    """Every way the spec goes beyond what the operator allows (empty: it may run)."""
    return _plugin_problems(spec, settings) + _data_problems(spec, settings)


def check_spec(spec: StudySpec, settings: Settings) -> None:
    """PolicyError when the spec goes beyond what the operator allows."""
    problems = policy_problems(spec, settings)
    if problems:
        raise PolicyError(problems)
