"""Model cards and recipes for every model or adapter folder adapt writes.

``README.md`` carries the Hub's YAML metadata (base_model, base_model_relation, library_name,
tags) and says what made the folder: the method with its paper, every input with its Hub
revision or sha256, the recipe and the command line, the adapt version, how to load the
result. ``adapt-recipe.json`` beside it is the machine-readable recipe that
``adapt merge --recipe`` replays. Both are made from the provenance in the output's
``__metadata__`` and hold nothing time-dependent, so identical runs give identical files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ParameterError
from .safetensors_file import SafetensorsFile
from .sources import INDEX_NAME, SINGLE_NAME

CARD_NAME = "README.md"
RECIPE_NAME = "adapt-recipe.json"
RECIPE_FORMAT = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINES_CITATION = (
    "Wang et al., LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model "
    "Merging, ICLR 2025, arXiv:2410.17146"
)

# ``adapt merge`` keyword -> flag, in the order the command line is written
FLAGS = {
    "base": "--base",
    "method": "--method",
    "weights": "--weights",
    "lam": "--lambda",
    "density": "--density",
    "scope": "--scope",
    "sign": "--sign",
    "seed": "--seed",
    "lines_beta": "--lines-beta",
    "lines_alpha": "--lines-alpha",
    "layer_pattern": "--layer-pattern",
    "deltas": "--deltas",
    "dtype": "--dtype",
    "shard_size": "--shard-size",
    "allow_nonfinite": "--allow-nonfinite",
    "to_lora": "--to-lora",
    "rank": "--rank",
}
OPTIONS = ("deltas", "dtype", "shard_size", "allow_nonfinite", "to_lora", "rank")


@dataclass(frozen=True)
class Recipe:
    """What made an output: method, parameters, inputs and base as given, merge options."""

    method: str
    parameters: dict[str, Any]
    inputs: tuple[str, ...]
    base: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # only the options that were set

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, str], options: Mapping[str, Any] | None = None
    ) -> Recipe:
        """The recipe of an output from its provenance ``__metadata__`` and merge options."""
        entries = json.loads(metadata["adapt_inputs"])
        opts = dict(options or {})
        if "adapt_lora" in metadata:
            opts |= {"to_lora": True, "rank": json.loads(metadata["adapt_lora"]).get("rank")}
        return cls(
            method=metadata["adapt_method"],
            parameters=json.loads(metadata["adapt_parameters"]),
            inputs=tuple(e["path"] for e in entries if e["role"] != "base"),
            base=next((e["path"] for e in entries if e["role"] == "base"), None),
            options={k: opts[k] for k in OPTIONS if opts.get(k) not in (None, False)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Read an ``adapt-recipe.json``.

        Raises:
            InputError: the file cannot be read or is not a recipe adapt can replay.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("adapt_recipe") != RECIPE_FORMAT:
                raise ValueError(f"adapt_recipe is {data.get('adapt_recipe')!r}, not 1")
            recipe = cls(
                method=str(data["method"]),
                parameters=dict(data["parameters"]),
                inputs=tuple(str(x) for x in data["inputs"]),
                base=None if data.get("base") is None else str(data["base"]),
                options={k: v for k, v in dict(data.get("options") or {}).items() if k in OPTIONS},
            )
        except OSError as e:
            raise InputError(f"{path}: cannot read recipe: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: not an adapt recipe ({e})") from None
        if not recipe.inputs:
            raise InputError(f"{path}: not an adapt recipe (no inputs)")
        return recipe

    def to_json(self) -> str:
        """The ``adapt-recipe.json`` text (sorted keys, one trailing newline)."""
        data = {
            "adapt_recipe": RECIPE_FORMAT,
            "method": self.method,
            "parameters": self.parameters,
            "base": self.base,
            "inputs": list(self.inputs),
            "options": self.options,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @property
    def replayable(self) -> bool:
        """Made by a merge method, so ``adapt merge --recipe`` replays it."""
        from .methods import METHODS

        return self.method in METHODS

    def merge_options(self) -> dict[str, Any]:
        """Keyword arguments of ``adapt merge`` (``cli.merge_command.merge``) replaying this.

        Raises:
            ParameterError: not made by a merge method.
        """
        if not self.replayable:
            raise ParameterError(
                f"the recipe's method {self.method!r} is not a merge method: only merges replay"
            )
        p = self.parameters
        kw: dict[str, Any] = {"inputs": list(self.inputs), "base": self.base, "method": self.method}
        if p.get("weights") is not None:
            kw["weights"] = ",".join(repr(float(w)) for w in p["weights"])
        if p.get("lambda") is not None:
            kw["lam"] = p["lambda"]
        if lines := p.get("lines"):
            kw |= {
                "lines_beta": lines["beta"],
                "lines_alpha": lines.get("alpha"),
                "layer_pattern": lines.get("layer_pattern"),
            }
        kw |= {k: p[k] for k in ("density", "scope", "sign", "seed") if k in p}
        return kw | self.options

    def command(self, out: str) -> str:
        """The ``adapt merge`` command line that writes this recipe's output to ``out``."""
        kw = self.merge_options()
        args = ["adapt", "merge", *kw["inputs"]]
        for key, flag in FLAGS.items():
            value = kw.get(key)
            if value is True:
                args.append(flag)
            elif value is not None and value is not False:
                args += [flag, str(value)]
        return shlex.join([*args, "-o", out])


def _citation(method: str) -> str:
    """The citation of the method class named ``method`` (merges, diff, ComPEFT...)."""
    from .methods import Method

    classes: list[type] = [Method]
    while classes:
        cls = classes.pop()
        if vars(cls).get("name") == method:
            return _linked(cls.citation)  # type: ignore[attr-defined]
        classes += cls.__subclasses__()
    return "(no citation recorded)"


def _linked(citation: str) -> str:
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", citation)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _version_of(entry: Mapping[str, Any]) -> str:
    if entry.get("repo"):
        return f"`{entry['repo']}` at commit `{entry['revision']}`"
    hashes = entry.get("sha256") or {}
    return "<br>".join(f"`{name}` sha256 `{h}`" for name, h in hashes.items()) or "in memory"


def _usage(kind: str, location: str, base: str | None) -> str:
    if kind == "adapter":
        return (
            "```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or 'BASE')})\n"
            f"model = PeftModel.from_pretrained(base, {json.dumps(location)})\n```"
        )
    if kind == "task vector":
        cmd = shlex.join(["adapt", "merge", "--base", base or "BASE", location, "-o", "OUT"])
        return (
            f"A task vector (theta - theta_0): add it to its base with adapt.\n\n```sh\n{cmd}\n```"
        )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(location)})\n```"
    )


def card_text(
    metadata: Mapping[str, str], recipe: Recipe, kind: str, repo_id: str | None = None
) -> str:
    """README.md of an output folder.

    The text depends only on what made the output, not on where it was written: the same
    merge gives the same card. ``repo_id`` (``adapt push --card``) names the Hub repository in
    the title and the loading snippet; without it they say ``PATH``.

    Args:
        metadata: the output's provenance ``__metadata__``.
        recipe: its recipe.
        kind: ``"model"``, ``"adapter"`` (PEFT LoRA) or ``"task vector"``.
        repo_id: the Hub repository the folder is pushed to.
    """
    from huggingface_hub import ModelCard, ModelCardData

    entries = json.loads(metadata["adapt_inputs"])
    base_entry = next((e for e in entries if e["role"] == "base"), None)
    repos = list(dict.fromkeys(e["repo"] for e in entries if e.get("repo")))
    tags = ["adapt", "merge", recipe.method] if recipe.replayable else ["adapt", recipe.method]
    if kind == "adapter":
        tags.append("lora")
    if recipe.parameters.get("lines"):
        tags.append("lines")
    data = ModelCardData(
        library_name={"adapter": "peft", "model": "transformers"}.get(kind),
        tags=tags,
    )
    if kind == "adapter" and base_entry and base_entry.get("repo"):
        data.base_model = base_entry["repo"]
        data.base_model_relation = "adapter"
    elif kind == "model" and repos and recipe.replayable:
        data.base_model = repos
        data.base_model_relation = "merge"
    elif kind == "model" and base_entry and base_entry.get("repo"):
        data.base_model = base_entry["repo"]

    what = {"model": "model", "adapter": "LoRA adapter", "task vector": "task vector"}[kind]
    title = repo_id.rpartition("/")[2] if repo_id else f"{recipe.method} {what}"
    location = repo_id or "PATH"
    where = "" if repo_id else "\n\n`PATH` is this folder, or the Hub repository it is pushed to."
    over = f" over the base `{_cell(recipe.base)}`" if recipe.base else ""
    lines = ""
    if recipe.parameters.get("lines"):
        lines = f"\n\nWith LiNeS layer scaling: {_linked(LINES_CITATION)}."
    params = "\n".join(
        f"| {k} | `{_cell(json.dumps(v))}` |" for k, v in sorted(recipe.parameters.items())
    )
    rows = "\n".join(f"| {e['role']} | `{_cell(e['path'])}` | {_version_of(e)} |" for e in entries)
    base_location = (base_entry.get("repo") or base_entry["path"]) if base_entry else None
    replay = f"`{RECIPE_NAME}` beside this card is the recipe."
    command = ""
    if recipe.replayable:
        replay += (
            f" `adapt merge --recipe {RECIPE_NAME} -o OUT` replays it (inputs as given: paths "
            "and `hf://` references)."
        )
        command = f"\nThe same as a command line:\n\n```sh\n{recipe.command('OUT')}\n```\n"
    body = f"""# {title}

A {what} made with adapt {metadata.get("adapt_version", "")} by **{recipe.method}** from \
{len(recipe.inputs)} input(s){over}.

## Method

**{recipe.method}**: {_citation(recipe.method)}.{lines}

| parameter | value |
|---|---|
{params}

## Inputs

| role | input | revision or sha256 |
|---|---|---|
{rows}

## Recipe

{replay}

```json
{recipe.to_json().rstrip()}
```
{command}
## Usage

{_usage(kind, location, base_location)}{where}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _kind(folder: Path, metadata: Mapping[str, str]) -> str:
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    return "task vector" if metadata.get("adapt_content") == "task_vector" else "model"


def write(folder: Path, metadata: Mapping[str, str], options: Mapping[str, Any] | None) -> None:
    """Write ``README.md`` and ``adapt-recipe.json`` into an output folder (while it is still
    the temporary folder); nothing for outputs without adapt provenance."""
    if "adapt_method" not in metadata or "adapt_inputs" not in metadata:
        return
    recipe = Recipe.from_metadata(metadata, options)
    (folder / RECIPE_NAME).write_text(recipe.to_json(), encoding="utf-8")
    text = card_text(metadata, recipe, _kind(folder, metadata))
    (folder / CARD_NAME).write_text(text, encoding="utf-8")


def folder_metadata(folder: Path) -> dict[str, str]:
    """The ``__metadata__`` of a model or adapter folder's (first) weights file."""
    for name in (SINGLE_NAME, ADAPTER_WEIGHTS):
        if (folder / name).is_file():
            return dict(SafetensorsFile(folder / name).metadata)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            first = min(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: bad index file ({e})") from None
        return dict(SafetensorsFile(folder / first).metadata)
    raise InputError(f"{folder}: no {SINGLE_NAME}, {INDEX_NAME} or {ADAPTER_WEIGHTS}")


def refresh(folder: Path, repo_id: str) -> None:
    """Rewrite ``folder/README.md`` for ``repo_id`` (the name and loading snippet), from the
    folder's provenance and recipe options; replaced atomically.

    Raises:
        InputError: the folder was not written by adapt.
    """
    metadata = folder_metadata(folder)
    if "adapt_method" not in metadata or "adapt_inputs" not in metadata:
        raise InputError(f"{folder}: not written by adapt (no provenance metadata): no card")
    recipe_path = folder / RECIPE_NAME
    options = Recipe.load(recipe_path).options if recipe_path.is_file() else None
    text = card_text(
        metadata, Recipe.from_metadata(metadata, options), _kind(folder, metadata), repo_id
    )
    tmp = folder / f".{CARD_NAME}.adapt-tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / CARD_NAME)
