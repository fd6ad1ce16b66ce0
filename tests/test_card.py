"""Model cards and recipes: written into every folder output, deterministic, and replayable
by ``adapt merge --recipe`` (and by the card's command line) to byte-identical weights."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from conftest import snapshot
from huggingface_hub import ModelCard
from lora_helpers import ATTN, make_adapter, save_llama
from safetensors import safe_open

import merge
from merge import card
from merge.provenance import version
from merge.sources import CONTENT_KEY

CARD_FILES = {"README.md", "adapt-recipe.json"}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata())


def weights(folder: Path) -> dict[str, bytes]:
    """Every file of an output folder except the card (which names nothing else)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in CARD_FILES}


def test_card_of_a_local_merge(demo_models, tmp_path, run_cli):
    base, (ft1, ft2) = demo_models
    out = tmp_path / "ties"
    args = ["merge", "--base", base, ft1, ft2, "--method", "ties", "--lines-beta", "0.5"]
    assert run_cli(*args, "-o", out, "-q").code == 0
    text = (out / "README.md").read_text()
    model_card = ModelCard(text)
    assert model_card.data.to_dict() == {
        "library_name": "transformers",
        "tags": ["adapt", "merge", "ties", "lines"],
    }  # local inputs: no Hub ids for base_model
    assert model_card.text.startswith("\n# ties model\n")
    assert f"made with adapt {version()} by **ties** from 2 input(s)" in text
    assert "[arXiv:2306.01708](https://arxiv.org/abs/2306.01708)" in text  # TIES
    assert "[arXiv:2410.17146](https://arxiv.org/abs/2410.17146)" in text  # LiNeS
    for entry in json.loads(metadata_of(out / "model.safetensors")["adapt_inputs"]):
        digest = entry["sha256"]["model.safetensors"]
        assert f"`{entry['path']}` | `model.safetensors` sha256 `{digest}`" in text
    recipe = (out / "adapt-recipe.json").read_text()
    assert f"```json\n{recipe}```" in text
    command = card.Recipe.load(out / "adapt-recipe.json").command("OUT")
    assert f"```sh\n{command}\n```" in text
    assert 'AutoModelForCausalLM.from_pretrained("PATH")' in text

    # deterministic and independent of where it was written: same merge, same card
    again = tmp_path / "elsewhere" / "again"
    again.parent.mkdir()
    assert run_cli(*args, "-o", again, "-q").code == 0
    for name in CARD_FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize(
    "options",
    [
        ["--weights", "0.7,0.3"],
        ["--base", "{base}", "--method", "ties", "--lines-beta", "0.5", "--scope", "tensor"],
        ["--base", "{base}", "--method", "dare-ties", "--weights", "2,1", "--seed", "7"],
        ["--base", "{base}", "--lambda", "0.5", "--dtype", "float32", "--shard-size", "200KB"],
    ],
)
def test_recipe_and_command_line_replay_to_identical_bytes(demo_models, tmp_path, run_cli, options):
    base, (ft1, ft2) = demo_models
    options = [str(base) if o == "{base}" else o for o in options]
    out = tmp_path / "first"
    assert run_cli("merge", ft1, ft2, *options, "-o", out, "-q").code == 0

    replayed = tmp_path / "replayed"
    res = run_cli("merge", "--recipe", out / "adapt-recipe.json", "-o", replayed, "-q")
    assert res.code == 0, res.err
    assert weights(replayed) == weights(out)

    command = card.Recipe.load(out / "adapt-recipe.json").command(str(tmp_path / "by-command"))
    argv = shlex.split(command)
    assert argv[:2] == ["adapt", "merge"]
    assert run_cli(*argv[1:], "-q").code == 0
    assert weights(tmp_path / "by-command") == weights(out)


def test_recipe_replay_refuses_other_options_and_bad_files(demo_models, tmp_path, run_cli):
    _, (ft1, ft2) = demo_models
    out = tmp_path / "soup"
    assert run_cli("merge", ft1, ft2, "-o", out, "-q").code == 0
    recipe = out / "adapt-recipe.json"
    res = run_cli("merge", "--recipe", recipe, ft1, "--method", "ties", "--seed", "3", "-o", "x")
    assert res.code == 2
    assert res.err.strip().endswith("drop INPUTS, --method, --seed (or edit the recipe)")
    res = run_cli("merge", "--recipe", recipe, "--dry-run")
    assert res.code == 0 and "method: soup" in res.out

    bad = tmp_path / "bad.json"
    for text, words in [
        ("{", "not an adapt recipe"),
        ('{"adapt_recipe": 2, "method": "soup"}', "adapt_recipe is 2"),
        ('{"adapt_recipe": 1, "method": "soup", "parameters": {}, "inputs": []}', "no inputs"),
    ]:
        bad.write_text(text)
        res = run_cli("merge", "--recipe", bad, "-o", tmp_path / "y")
        assert res.code == 3 and words in res.err and res.err.count("\n") == 1
    res = run_cli("merge", "--recipe", tmp_path / "missing.json", "-o", tmp_path / "y")
    assert res.code == 3 and "cannot read recipe" in res.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_adapter_card_and_to_lora_replay(tmp_path, run_cli):
    base = save_llama(tmp_path / "base")
    a1 = make_adapter(base, tmp_path / "a1", 1, r=4, lora_alpha=8, target_modules=ATTN)
    a2 = make_adapter(base, tmp_path / "a2", 2, r=2, lora_alpha=4, target_modules=ATTN)
    out = tmp_path / "merged-lora"
    args = ["merge", "--base", base, a1, a2, "--method", "ties", "--to-lora", "--rank", "3"]
    assert run_cli(*args, "-o", out, "-q").code == 0
    text = (out / "README.md").read_text()
    data = ModelCard(text).data.to_dict()
    assert data == {"library_name": "peft", "tags": ["adapt", "merge", "ties", "lora"]}
    assert 'PeftModel.from_pretrained(base, "PATH")' in text
    recipe = card.Recipe.load(out / "adapt-recipe.json")
    assert recipe.options == {"to_lora": True, "rank": 3}
    assert recipe.command("OUT").endswith("--to-lora --rank 3 -o OUT")

    replayed = tmp_path / "replayed"
    res = run_cli("merge", "--recipe", out / "adapt-recipe.json", "-o", replayed, "-q")
    assert res.code == 0, res.err
    assert weights(replayed) == weights(out)


def hub_metadata(method: str = "ties", content: str | None = None) -> dict[str, str]:
    inputs = [
        {"role": "base", "path": "hf://org/base", "repo": "org/base", "revision": "a" * 40},
        {"role": "input", "path": "hf://org/ft@dev", "repo": "org/ft", "revision": "b" * 40},
        {"role": "input", "path": "local", "sha256": {"model.safetensors": "c" * 64}},
    ]
    meta = {
        "adapt_version": "9.9",
        "adapt_method": method,
        "adapt_parameters": json.dumps({"weights": None, "lambda": 1.0}),
        "adapt_inputs": json.dumps(inputs),
    }
    return meta | ({CONTENT_KEY: content} if content else {})


def test_card_metadata_for_hub_inputs_merges_and_adapters():
    meta = hub_metadata()
    recipe = card.Recipe.from_metadata(meta, {"dtype": "bf16", "deltas": False})
    assert recipe.base == "hf://org/base" and recipe.inputs == ("hf://org/ft@dev", "local")
    assert recipe.options == {"dtype": "bf16"}

    model = ModelCard(card.card_text(meta, recipe, "model", repo_id="org/merged"))
    assert model.data.base_model == ["org/base", "org/ft"]
    assert model.data.base_model_relation == "merge"
    assert model.text.startswith("\n# merged\n")
    assert 'from_pretrained("org/merged")' in model.text
    assert f"`org/ft` at commit `{'b' * 40}`" in model.text
    assert f"`model.safetensors` sha256 `{'c' * 64}`" in model.text

    adapter = ModelCard(card.card_text(meta, recipe, "adapter"))
    assert adapter.data.base_model == "org/base"
    assert adapter.data.base_model_relation == "adapter"
    assert adapter.data.library_name == "peft"
    assert 'AutoModelForCausalLM.from_pretrained("org/base")' in adapter.text

    tau = ModelCard(
        card.card_text(hub_metadata("task-vector", "task_vector"), recipe, "task vector")
    )
    assert tau.data.library_name is None and tau.data.base_model is None
    assert "adapt merge --base org/base PATH -o OUT" in tau.text


def test_task_vector_folder_gets_a_card(demo_models, tmp_path, run_cli):
    base, (ft1, _) = demo_models
    out = tmp_path / "tau"
    assert run_cli("diff", ft1, "--base", base, "-o", out, "-q").code == 0
    text = (out / "README.md").read_text()
    assert "# task-vector task vector" in text and "library_name" not in text
    assert "Ilharco et al." in text and "--recipe" not in text  # diff is not a merge
    assert json.loads((out / "adapt-recipe.json").read_text())["options"] == {"dtype": "float32"}
    res = run_cli("merge", "--recipe", out / "adapt-recipe.json", "-o", tmp_path / "x")
    assert res.code == 2 and "'task-vector' is not a merge method" in res.err


def test_single_file_output_has_no_card(demo_models, tmp_path):
    _, fts = demo_models
    merge.soup(fts, out=tmp_path / "soup.safetensors")
    assert os.listdir(tmp_path) == ["soup.safetensors"]


def test_a_failing_card_leaves_no_output(demo_models, tmp_path, monkeypatch):
    _, fts = demo_models
    before = snapshot(fts)

    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("card failed")

    monkeypatch.setattr(card, "card_text", broken)
    with pytest.raises(RuntimeError, match="card failed"):
        merge.soup(fts, out=tmp_path / "soup")
    assert os.listdir(tmp_path) == []
    assert snapshot(fts) == before


def test_push_card_refresh_needs_adapt_provenance(tmp_path, make_file):
    from conftest import random_state

    folder = tmp_path / "plain"
    make_file("plain/model.safetensors", random_state(0))
    with pytest.raises(merge.InputError, match="not written by adapt"):
        card.refresh(folder, "org/x")
    with pytest.raises(merge.InputError, match=r"no model\.safetensors"):
        card.refresh(tmp_path, "org/x")
