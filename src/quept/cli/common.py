"""What the commands share: option parsers, texts, tables, and checks against a folder."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quept import api
from quept.api import KIND_NAMES
from quept.api.folders import QUEPT_FILES
from quept.checks import ConfigError, check_bits, counted
from quept.config import MAX_SEED, ElasticSpec, QuEPTConfig
from quept.data.text import SAMPLE_EVERY, shared_fraction
from quept.eval import Sentences
from quept.export.compact import read_compact_meta
from quept.export.load import check_model_config, read_packed_meta

log = logging.getLogger("quept")
DEFAULT_OUT = "quept-elastic"


def _numbers(text: str, kind: type, what: str) -> list:
    """Comma-separated numbers; an empty text is an empty list (``--fixed-clip-bits ''``)."""
    try:
        return [kind(x) for x in text.split(",")] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _int_list(text: str) -> list[int]:
    return _numbers(text, int, "integers")


def _width_list(text: str) -> list[int]:
    """Widths to evaluate: at least one, each once."""
    widths = _int_list(text)
    if not widths:
        raise argparse.ArgumentTypeError(f"expected one or more widths, e.g. 2,3,4, got {text!r}")
    twice = repeated(widths)
    if twice:
        raise argparse.ArgumentTypeError(f"width {twice[0]} is named twice in {text!r}")
    return widths


def repeated(values: list[int]) -> list[int]:
    """The values given more than once, in order."""
    return sorted({v for v in values if values.count(v) > 1})


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(_numbers(text, float, "numbers"))


def _windows(text: str) -> int | str:
    """'all' (every full window; :func:`perplexity_windows` reads it) or a positive count."""
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of windows or 'all', "
                                         f"got {text!r}")
    return int(text)


def at_least(low: int, expected: str, zero_skips: bool = False) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low`` (or 0 where ``zero_skips``);
    ``expected`` words the error."""
    def parse(text: str) -> int:
        if not text.removeprefix("-").isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: expected "
                                             f"{expected}")
        if int(text) < low and not (zero_skips and int(text) == 0):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return int(text)
    return parse


_window_len = at_least(2, "at least 2 tokens per window")  # all but the first are predicted


_sample_len = at_least(2, "at least 2 tokens per sample (a decoder predicts each token from "
                       "those before it: one token alone has no next token to predict)")


positive = at_least(1, "a positive count")


_count = at_least(0, "0 (skip) or a positive count")  # of windows or images


_FIDELITY = ("at least 2 sentences (embedding fidelity compares each paragraph's nearest other "
             "paragraph under the quantized and the float encoder)")
_sentences = at_least(2, _FIDELITY)
_sentences_or_skip = at_least(2, f"0 (skip) or {_FIDELITY}", zero_skips=True)


def seed_value(text: str) -> int:
    """An argparse type: a seed, a whole number from 0 to :data:`MAX_SEED`."""
    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**63 - 1 (torch's "
                                         f"generators take 63 bits), got {text!r}")
    return int(text)


def _groups(text: str) -> tuple[tuple[int, ...], ...]:
    """'7,8/5,6/3,4/2' -> ((7, 8), (5, 6), (3, 4), (2,))."""
    return tuple(tuple(_int_list(g)) for g in text.split("/"))


@functools.lru_cache(maxsize=4)
def _read_texts(paths: tuple[str, ...], role: str) -> str:
    from quept.data import load_texts

    return load_texts(list(paths), role=role)


def _text(paths: list[str] | None, default: str) -> str:
    if paths:
        return _read_texts(tuple(paths), default)
    from quept import data

    return data.calibration_text() if default == "calib" else data.evaluation_text()


def check_texts(a: argparse.Namespace, **roles: str) -> None:
    """Read the texts the command line names (``attribute=role``, e.g. ``calib_text="calib"``)
    before any model loads, so that a missing or malformed file fails in a second rather than
    after a model load or a calibration; the texts are kept for the later ``_text`` calls of
    this command. The built-in texts are left to those calls."""
    for attr, role in roles.items():
        paths = getattr(a, attr, None)
        if paths:
            _text(paths, role)


def _text_name(paths: list[str] | None, role: str = "eval") -> str:
    """What ``_text(paths, role)`` read, for a record: a file by its name, a hub text or a
    pipe (``/dev/fd/63``, whose name alone says nothing) as given."""
    if not paths:
        return "Pride and Prejudice" if role == "eval" else "Jane Austen's other novels"
    return ", ".join(Path(p).name if Path(p).is_file() else p for p in paths)


OVERLAP_WARNING = 0.01
"""The share of an evaluation text's paragraphs found in the calibration text that is warned
of (a few paragraphs, such as a licence, can recur in unrelated texts)."""


def recorded_overlap(model: torch.nn.Module, eval_text: Callable[[], str]) -> float | None:
    """:func:`calibration_overlap` of ``eval_text()`` with the calibration text whose sample
    the model's folder keeps (``model.quept_calibration_text``: an elastic folder, or a
    packed folder or compact checkpoint exported from one); None where none is kept (a folder
    written before samples were kept, a plain model) or the record is damaged."""
    record = getattr(model, "quept_calibration_text", None)
    sample = record.get("paragraph_sample") if isinstance(record, dict) else None
    if not isinstance(sample, list) or not all(isinstance(h, str) for h in sample):
        return None
    return calibration_overlap(eval_text(), sample, str(record.get("name", "?")), SAMPLE_EVERY)


def calibration_overlap(eval_text: str, calib_hashes: Iterable[str], calib_name: str,
                        every: int = 1) -> float | None:
    """The share of ``eval_text``'s paragraphs that are in the calibration text
    (:func:`quept.data.text.shared_fraction`), with a warning from 1%: a perplexity measured
    on text the model was calibrated on is flattering."""
    share = shared_fraction(eval_text, calib_hashes, every)
    if share is not None and share >= OVERLAP_WARNING:
        log.warning("%.0f%% of the evaluation text's paragraphs are also in the calibration "
                    "text (%s): so what follows is measured, in part or whole, on text the model "
                    "was calibrated on; evaluate on held-out text", 100 * share, calib_name)
    return share


def _peak_rss_gib() -> float | None:
    """Peak resident memory of this process so far, GiB (ru_maxrss: KiB on Linux, bytes on
    macOS); None where the platform has no ``resource`` module."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _table(rows: list[list[str]], header: list[str], left: int = 0) -> str:
    """Columns right-aligned, the first ``left`` of them (names, paths) left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _eval_rows(rows: list[api.EvalRow]) -> list[dict[str, Any]]:
    return [r.__dict__ for r in rows]


def _print_widths(rows: list, cells: Callable[[Any], list[str]], header: list[str],
                  title: str, activations: bool = False) -> None:
    """One table row per width (float, W4 or W4A4, stored bits per weight, then ``cells(row)``)
    under ``header``'s column names; a column no row has a value in (RTN, where it was not
    measured) is left out."""
    out = [[width_label(r.bits, activations), f"{r.bits_per_weight:.3f}", *cells(r)]
           for r in rows]
    header = ["width", "bits/weight stored", *header]
    kept = [i for i in range(len(header)) if any(row[i] != "" for row in out)]
    print(title)
    print(_table([[row[i] for i in kept] for row in out], [header[i] for i in kept]))


def _value(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _print_eval(rows: list[api.EvalRow], n_windows: int, seq_len: int, title: str,
                activations: bool = False) -> None:
    _print_widths(rows, lambda r: [_value(r.ppl, ".2f"), _value(r.ppl_rtn, ".2f")],
                  ["perplexity", "RTN perplexity"],
                  f"\n{title} ({counted(n_windows, 'window')} x {seq_len} tokens)",
                  activations)


def _task(model: torch.nn.Module) -> str:
    """The model family's task: "causal-lm", "encoder" or "image-classification"."""
    from quept.models import family_for

    return family_for(model).task


IMAGE_SAMPLES, IMAGE_BATCH = 512, 32  # image calibration defaults (the text presets count tokens)


EVAL_SENTENCES, EVAL_IMAGES = 256, 10000  # encoders' and image classifiers' evaluation sizes


EVAL_WINDOWS, EVAL_SEQ_LEN = 8, 512  # decoders' evaluation windows after `quept quantize`


PPL_WINDOWS, PPL_SEQ_LEN = 32, 512  # decoders' perplexity windows in `quept eval`


def perplexity_windows(a: argparse.Namespace) -> tuple[int | None, int]:
    """`quept eval`'s perplexity windows: their count (None for ``--windows all``: every
    full window) and tokens per window, :data:`PPL_WINDOWS` and :data:`PPL_SEQ_LEN` where
    not given."""
    n = PPL_WINDOWS if a.windows is None else None if a.windows == "all" else a.windows
    return n, PPL_SEQ_LEN if a.seq_len is None else a.seq_len


_OWN_TASK = {"eval_sentences": "encoder", "sentences": "encoder",
             "eval_images": "image-classification", "images": "image-classification",
             "eval_windows": "causal-lm", "eval_seq_len": "causal-lm"}


EVAL_OWN_TASK = {**_OWN_TASK, "windows": "causal-lm", "seq_len": "causal-lm"}
"""`quept eval`'s options of one task: its --seq-len is of perplexity windows (`quept
quantize`'s and `quept plan`'s, of calibration samples, apply to every text model)."""


_TASK_WORDS = {"encoder": "an encoder", "image-classification": "an image classifier",
               "causal-lm": "a causal LM"}


def _refuse_other_tasks_options(a: argparse.Namespace, task: str,
                                own_task: dict[str, str] = _OWN_TASK) -> None:
    """An option given for another task than the model's is refused, not ignored
    (``own_task``: option name -> the task it applies to)."""
    for name, own in own_task.items():
        if own != task and getattr(a, name, None) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} applies to {_TASK_WORDS[own]}; the "
                              f"model is {_TASK_WORDS[task]}")


def folder_task(folder: Path, kind: str) -> tuple[str, str] | None:
    """The model type and task ("causal-lm", "encoder", "image-classification") of the model
    an elastic, compact or packed folder holds, read from its JSON (checked against the
    folder's other files: :func:`folder_meta`) so that options can be checked before the model
    loads; None for other kinds or an unsupported model type."""
    from quept.models.families import UnsupportedModelError, family_for_type

    if kind not in QUEPT_FILES:
        return None
    model_type = folder_meta(folder, kind)["model_type"]
    try:
        return model_type, family_for_type(model_type).task
    except UnsupportedModelError:  # refused by name when the model loads
        return None


def folder_meta(folder: Path, kind: str) -> dict[str, Any]:
    """The JSON of an elastic, compact or packed folder, checked against the folder's other
    files, so that a damaged or mixed-up folder (one model's JSON beside another's weights) is
    named as such before options are checked against the model its JSON records: the weights
    file holds a tensor of every layer the JSON lists (its header alone is read), and a packed
    folder's or compact checkpoint's config.json is there and of the JSON's model type; else an
    :class:`~quept.api.ArtifactError`."""
    listed_in, weights, part, made_by = QUEPT_FILES[kind]
    read = {"elastic": api.read_meta, "compact": read_compact_meta, "packed": read_packed_meta}
    meta = read[kind](folder)
    if kind != "elastic":
        check_model_config(folder, KIND_NAMES[kind], made_by, listed_in, meta["model_type"])
    path = folder / weights
    if not path.is_file():
        raise api.ArtifactError(f"{path} is missing: the folder is damaged; write it again "
                                f"with `{made_by}`")
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
    except Exception as e:  # safetensors raises several types for a damaged header
        raise api.ArtifactError(f"{path} cannot be read: {e}") from None
    names.update(meta.get("aliases", {}))  # tied tensors, stored once under another name
    for layer in meta["layers"]:
        if f"{layer}.{part}" not in names:
            raise api.ArtifactError(
                f"{path} has no {part} tensor of layer {layer}, which {listed_in} lists: the "
                f"folder is damaged or mixed up; write it again with `{made_by}`")
    return meta


def check_context(model: torch.nn.Module, seq_len: int, option: str, whose: str = "",
                  when: str = "") -> None:
    """Windows of ``seq_len`` tokens fit the model's context (its config's
    ``max_position_embeddings``), or a ConfigError names ``option`` (``whose`` value it is
    where not given, e.g. " (the default)"; ``when`` it is checked) and says how long they may
    be. Checked before any text is cut, so that a long ``--seq-len`` on a short text is named
    by the limit that binds."""
    from quept.calib.capture import context_length

    context = context_length(model)
    if context is not None and seq_len > context:
        raise ConfigError(f"{option} {seq_len}{whose} is past the model's context of {context} "
                          f"tokens: give {context} or less{when}")


def calibration_refusal(e: ValueError, n: int, seq_len: int, name: str) -> ConfigError:
    """``e``, a calibration text's refusal of ``n`` samples of ``seq_len`` tokens, with the
    options that set them and the text's ``name``."""
    return ConfigError(f"{n} samples x {seq_len} tokens (--samples, --seq-len) on {name}: {e}")


def _images(model: torch.nn.Module, split: str, n: int, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST images of ``split`` (all of it, in order, when n covers it; else a
    seeded draw) as the model's pixel values, with their labels. The command line's built-in
    images fit 28 x 28 grey, 10-class classifiers (the built-in ViT); others use the API."""
    from quept.data import load_fashion_mnist, pixel_values

    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
    if size not in (28, (28, 28)) or cfg.num_channels != 1 or cfg.num_labels != 10:
        raise ConfigError(
            f"the command line's images are Fashion-MNIST (28 x 28, 1 channel, 10 classes); this "
            f"{cfg.model_type} classifier takes {size} x {cfg.num_channels}-channel images into "
            f"{cfg.num_labels} classes: calibrate it through the Python API (quept.calibrate on "
            "your pixel values, quept.evaluate_accuracy)")
    if n < 1:
        raise ConfigError(f"the number of images must be >= 1, got {n}")
    images, labels = load_fashion_mnist(split)
    if n > len(images):
        raise ConfigError(f"the Fashion-MNIST {split} split has {len(images)} images; asked "
                          f"for {n}")
    if n < len(images):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, labels = images[idx], labels[idx]
    return pixel_values(images), labels


def _rotatable(model: torch.nn.Module) -> bool:
    from quept.models import family_for

    return family_for(model).final_norm is not None


def _refuse_text_options(a: argparse.Namespace, *names: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(a, n, None)]
    if given:
        raise ConfigError(f"{', '.join(given)}: text options, but the model is an image "
                          "classifier (it calibrates and evaluates on Fashion-MNIST images)")


def _print_accuracy(rows: list[api.AccuracyRow], n: int, title: str,
                    activations: bool = False) -> None:
    _print_widths(rows, lambda r: [_value(r.accuracy, ".2%"), _value(r.accuracy_rtn, ".2%")],
                  ["top-1", "RTN top-1"], f"\n{title} ({counted(n, 'image')})", activations)


def _sentence_len(model: torch.nn.Module) -> int:
    """Tokens per paragraph for embedding fidelity: 128, or fewer if the model has fewer
    positions."""
    return min(128, getattr(model.config, "max_position_embeddings", 128))


def _eval_sentences(model: torch.nn.Module, tok: Any, text: str, n: int) -> Sentences:
    """The first ``n`` paragraphs of ``text`` an encoder's embedding fidelity is measured on."""
    from quept.eval import sentences_from_text

    return sentences_from_text(tok, text, n, max_len=_sentence_len(model))


def _print_embedding(rows: list[api.EmbeddingRow], n: int, title: str) -> None:
    def cells(r: api.EmbeddingRow) -> list[str]:
        rtn = r.rtn or {}
        return [f"{r.cosine_mean:.4f}", f"{r.neighbour_agreement:.1%}",
                _value(rtn.get("cosine_mean"), ".4f"), _value(rtn.get("neighbour_agreement"), ".1%")]

    _print_widths(rows, cells, ["cosine", "same neighbour", "RTN cosine", "RTN same neighbour"],
                  f"\n{title} ({n} paragraphs; cosine of each sentence embedding with the float "
                  "encoder's, and how often its nearest other paragraph is the float encoder's)")


def folder_config(folder: Path, kind: str) -> QuEPTConfig:
    """The configuration an elastic or compact folder records, read from its JSON (checked
    against the folder's other files: :func:`folder_meta`; no weights are read), so options can
    be checked against its widths before a model loads."""
    if kind in ("elastic", "compact"):
        return QuEPTConfig.from_dict(folder_meta(folder, kind)["config"])
    raise ConfigError(f"{folder} holds {KIND_NAMES[kind]}; this needs an elastic folder (from "
                      "`quept quantize`) or a compact checkpoint (from `quept compact`)")


def check_widths(widths: int | dict[str, int], spec: ElasticSpec, what: str) -> None:
    """Every width of ``widths`` (one, or a plan's) is one of ``spec``'s, or a ConfigError
    naming ``what`` asked for it."""
    for b in sorted({widths} if isinstance(widths, int) else set(widths.values())):
        try:
            check_bits(b, spec.bits)
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None


def check_out(out: str | Path, what: str, *, source: Path | None = None,
              writes: str | None = None) -> Path:
    """``--out`` checked before any work: ``what`` "file" must not name a folder, "folder"
    must not name a file; an empty ``--out`` (which would write into the current folder) is
    refused. ``--out`` must not be, nor lie inside, the ``source`` folder being read, and a
    folder that holds a model of another kind than the one a command ``writes`` (a
    :func:`folder_kind` name) is refused, as writing there would spoil it; the same kind is
    replaced."""
    if not str(out).strip():
        example = "model.gguf" if what == "file" else DEFAULT_OUT
        raise ConfigError(f"--out is empty; give the {what} to write, e.g. {example} (an empty "
                          "--out would write into the current folder)")
    out = Path(out)
    if what == "file" and out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the file to write "
                          f"there, e.g. {out / 'model.gguf'}")
    if what == "folder" and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write into")
    if writes is not None:  # never the source folder, nor inside it
        api.check_out_folder(out, writes, "--out ", source=source)
    return out


def _load_elastic(folder: Path, kind: str, base: str | None) -> tuple[Any, Any, QuEPTConfig]:
    cfg = folder_config(folder, kind)
    if kind == "compact" and base is not None:
        raise ConfigError(f"--model names the base model of an elastic folder; {folder} is a "
                          "compact checkpoint, which holds its own weights and needs none")
    model, tok = api.load_compact(folder) if kind == "compact" else api.load(folder, model=base)
    return model, tok, cfg


def width_label(bits: int | str | None, activations: bool = False) -> str:
    """"float", "W4", "W4A4" in weight+activation mode, or "mixed" (a plan's packed folder)."""
    if bits is None or bits == "mixed":
        return bits or "float"
    return f"W{bits}A{bits}" if activations else f"W{bits}"


def _packed_label(meta: dict[str, Any]) -> str:
    return width_label(meta["bits"], any(i.get("act_bits") for i in meta["layers"].values()))


def plan_paths(values: list[str]) -> list[Path]:
    """The plan files ``--plan`` values name (:func:`quept.search.plan_files.plan_files`); a
    folder holding a model is refused by what it holds, not read for plans."""
    from quept.api.folders import HELD_NAMES, holds_model
    from quept.search.plan_files import plan_files

    for value in values:
        held = holds_model(Path(value))
        if held is not None:
            raise ConfigError(f"--plan {value} holds {HELD_NAMES[held]}, not plans: give a plan "
                              "file, or the folder `quept plan --out DIR` wrote several into")
    return plan_files(values)
