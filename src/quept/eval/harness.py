"""Zero-shot task accuracy through lm-evaluation-harness (the ``lmeval`` extra).

:class:`TaskRunner` wraps a causal LM already in memory (an elastic model at any width or
plan, a packed export, a float model) in lm-evaluation-harness's ``HFLM`` and runs tasks on it
as it stands, so one runner serves every width of an elastic model. Tasks are the built-in
ones of :mod:`quept.data.tasks` (made from the evaluation text; no downloads) or any task name
lm-evaluation-harness knows, whose data must then be reachable (its Hugging Face dataset
cached, or a task YAML of your own over local files in ``include_path``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from quept.config import ConfigError
from quept.data.fetch import atomic_write_text, resolve_cache_dir
from quept.data.tasks import BUILDER_VERSION, BUILTIN_TASKS, LAST_WORD, task_documents

log = logging.getLogger(__name__)

TASKS_DIRNAME = "tasks"
_INSTALL = 'pip install torch==2.13.0 -e ".[lmeval]"'


class MissingDependencyError(RuntimeError):
    """An optional package needed for this feature is not installed."""


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except ImportError as exc:
        raise MissingDependencyError(
            f"task accuracy runs through lm-evaluation-harness, which is not installed "
            f"({exc}); install the extra: {_INSTALL}") from exc
    return lm_eval


def lm_task_name(name: str) -> str:
    """lm-evaluation-harness's name of built-in task ``name`` ("last-word" -> quept_last_word)."""
    return "quept_" + name.replace("-", "_")


def builtin_task_config(name: str, docs: Sequence[dict[str, Any]],
                        cache_dir: Path | None = None) -> dict[str, Any]:
    """lm-evaluation-harness config of built-in task ``name`` over its items ``docs``
    (:func:`quept.data.tasks.task_documents`), written once as JSON lines into the cache (the
    file name carries the items' hash)."""
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    path = resolve_cache_dir(cache_dir) / TASKS_DIRNAME / f"{name}-v{BUILDER_VERSION}-{digest}.jsonl"
    if not path.is_file():
        atomic_write_text(path, payload)
    config: dict[str, Any] = {
        "task": lm_task_name(name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "metadata": {"version": BUILDER_VERSION},
    }
    if name == LAST_WORD:
        config |= {
            "output_type": "loglikelihood",
            "doc_to_target": "{{' ' + target}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        }
    return config


@contextlib.contextmanager
def _quiet(logger_name: str = "lm_eval") -> Iterator[None]:
    """lm-evaluation-harness's INFO and WARNING lines off (it warns that a model object was
    passed, which is what we mean)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TaskRunner:
    """Runs ``tasks`` on ``model`` each time it is called, at the model's current widths.

    ``tasks``: built-in names (:data:`quept.data.tasks.BUILTIN_TASKS`, made from ``text``)
    and lm-evaluation-harness task names. ``limit``: at most this many items per task (the
    first ones; None = all). Scores are {task: {metric: value}}; every accuracy also gets its
    binomial standard error as ``<metric>_stderr``, and ``items`` the number scored. With
    ``per_item``, each task's scores also hold ``per_item``: {metric: [0/1 per item, in item
    order]} for every accuracy, for paired comparisons (:func:`paired_difference`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, tasks: Sequence[str], *,
                 text: str | None = None, limit: int | None = None, batch_size: int = 16,
                 include_path: str | Path | None = None, cache_dir: Path | None = None,
                 seed: int = 0, per_item: bool = False) -> None:
        from transformers import PreTrainedModel

        lm_eval = _lm_eval()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if not tasks:
            raise ConfigError("no tasks given; built-in tasks: " + ", ".join(BUILTIN_TASKS))
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"a task is named twice: {', '.join(tasks)}")
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be >= 1 items per task (or None for all), got {limit}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not isinstance(model, PreTrainedModel):
            raise ConfigError(f"task accuracy needs a transformers causal LM in memory; got "
                              f"{type(model).__name__} (ONNX exports: evaluate the elastic or "
                              "packed folder they came from)")
        if tokenizer is None:
            raise ConfigError("task accuracy needs the model's tokenizer; the folder has none")
        if include_path is not None and not Path(include_path).is_dir():
            raise FileNotFoundError(f"task folder {include_path} does not exist or is not a "
                                    "folder (it should hold lm-evaluation-harness task YAMLs)")
        builtin = [t for t in tasks if t in BUILTIN_TASKS]
        if builtin and text is None:
            raise ConfigError(f"built-in tasks {', '.join(builtin)} need an evaluation text")
        self.names = {(lm_task_name(t) if t in BUILTIN_TASKS else t): t for t in tasks}
        docs = {t: task_documents(t, text, seed) for t in builtin}
        specs = [builtin_task_config(t, docs[t], cache_dir) if t in BUILTIN_TASKS else t
                 for t in tasks]
        self.limit, self.per_item, self._evaluate = limit, per_item, lm_eval.evaluate
        with _quiet():
            # lm-evaluation-harness's own tasks take seconds to index: only when asked for
            path = None if include_path is None else str(include_path)
            manager = TaskManager(include_path=path, include_defaults=False)
            others = [t for t in tasks if t not in BUILTIN_TASKS and t not in manager.all_tasks]
            if others:
                manager = TaskManager(include_path=path)
            unknown = [t for t in others if t not in manager.all_tasks]
            if unknown:
                raise ConfigError(
                    f"unknown task {', '.join(unknown)}: built-in tasks are "
                    f"{', '.join(BUILTIN_TASKS)}; other names must be lm-evaluation-harness "
                    "tasks (`lm-eval ls tasks`) or YAMLs in the task folder (--task-path)")
            try:
                self.task_dict = manager.load(specs)
            except Exception as exc:  # datasets raises many kinds when a hub dataset is missing
                raise ConfigError(
                    f"could not load the data of task(s) {', '.join(tasks)}: {exc}. This machine "
                    "may have no route to the Hugging Face hub: put the dataset into the "
                    "datasets cache (HF_DATASETS_OFFLINE=1), or write a task YAML over local "
                    "files and pass its folder (--task-path)") from exc
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                           device=str(model.device))
        for t in builtin:
            check_item_lengths(t, docs[t][:limit], tokenizer, self.lm.max_length)

    def __call__(self) -> dict[str, dict[str, Any]]:
        with _quiet():
            try:
                out = self._evaluate(self.lm, self.task_dict, limit=self.limit,
                                     bootstrap_iters=0, log_samples=self.per_item,
                                     verbosity="ERROR")
            except AssertionError as e:  # lm-evaluation-harness checks its inputs by assert
                where = traceback.extract_tb(e.__traceback__)[-1]
                raise RuntimeError(
                    f"lm-evaluation-harness stopped on a failed check while scoring "
                    f"{', '.join(self.names.values())}: `{where.line}` "
                    f"({Path(where.filename).name}, line {where.lineno}); the model's "
                    f"context is {self.lm.max_length} tokens") from None
        scores = {}
        for lm_name, name in self.names.items():
            raw = out["results"][lm_name]
            count = out.get("n-samples", {}).get(lm_name)  # groups have none of their own
            n = None if count is None else int(count["effective"])
            row: dict[str, Any] = {} if n is None else {"items": n}
            for key, value in raw.items():
                metric, _, filt = key.partition(",")
                if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                row[metric] = float(value)
                if metric.startswith("acc") and n:
                    row[f"{metric}_stderr"] = math.sqrt(max(value * (1 - value), 0.0) / n)
            if self.per_item and lm_name in out.get("samples", {}):
                samples = sorted(out["samples"][lm_name], key=lambda s: s["doc_id"])
                row["per_item"] = {m: [float(s[m]) for s in samples]
                                   for m in row if m.startswith("acc") and "_stderr" not in m}
            scores[name] = row
        return scores


def check_item_lengths(name: str, docs: Sequence[dict[str, Any]], tokenizer: Any,
                       max_length: int) -> None:
    """Refuse built-in task ``name`` when one of its items' continuations (the word to predict,
    or a choice of sentence) is longer than the model's context of ``max_length`` tokens:
    lm-evaluation-harness cannot score such an item (it stops on an assert)."""
    for i, doc in enumerate(docs):
        for cont in [doc["target"]] if name == LAST_WORD else doc["choices"]:
            n = len(tokenizer(" " + cont, add_special_tokens=False).input_ids)
            if n > max_length:
                raise ConfigError(
                    f"task {name}, item {i}: a continuation of {n} tokens does not fit the "
                    f"model's context of {max_length} tokens, so it cannot be scored; "
                    "evaluate a model with a longer context, or a text of shorter sentences")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over the same items, and its standard error (the sample standard
    deviation of the differences over sqrt(n)). Two models scored on the same items mostly agree,
    so this error is far below that of two separate accuracies."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same items, non-empty: got {len(a)} and "
                         f"{len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
