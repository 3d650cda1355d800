"""`trap2 trace` and `trace_release` on folders: what they read (adapters of several kinds, full fine-tunes, mergekit
outputs, PEFT combinations), what they write, and the errors for suspects that are not models of the base.

The updates here are random LoRA factors and random full-weight steps, not trainings: these tests are about reading
folders; tests/test_trace.py measures the statistics on trained updates.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from trap2_hf.trace import trace_release
from trap2_hf.trace.cli import main

ROOT = Path(__file__).resolve().parents[1]


def random_lora(seed: int, **kwargs):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **kwargs), seed


def save_adapter(folder: Path, config_and_seed, base=None) -> str:
    from peft import get_peft_model

    config, seed = config_and_seed
    base = base or tiny_llama()
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    return str(folder)


def folded(base_dir: str, adapters: list[str], out: Path) -> str:
    """The base with each adapter folded in by merge_and_unload, one after the other, saved as a full model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    base_dir = str(root / "base")
    tiny_llama().save_pretrained(base_dir)
    release = save_adapter(root / "release", random_lora(1))
    other = save_adapter(root / "other", random_lora(2))
    return {"root": root, "base": base_dir, "release": release, "other": other}


def test_command_traces_a_mergekit_output_and_a_peft_combination_and_writes_json(folders, tmp_path, capsys):
    pytest.importorskip("mergekit")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from trap2_hf.audit.mergekit import mergekit_merge

    merged = str(tmp_path / "ties")
    mergekit_merge(folders["base"], [folders["release"], folders["other"]], "ties", weights=[0.5, 0.5], out_dir=merged)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folders["base"]), folders["release"], "release")
    model.load_adapter(folders["other"], "other")
    model.add_weighted_adapter(["release", "other"], [0.3, 0.7], "combined", combination_type="cat")
    model.save_pretrained(tmp_path / "combination", selected_adapters=["combined"])
    combination = str(tmp_path / "combination" / "combined")
    unrelated = folded(folders["base"], [folders["other"]], tmp_path / "unrelated")
    out = tmp_path / "trace.json"

    code = main([merged, combination, unrelated, "--base_model", folders["base"], "--release", folders["release"],
                 "--output_json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["suspect"] for r in records] == [merged, combination, unrelated]
    assert [r["contains"] for r in records] == [True, True, False]
    assert records[0]["p_value"] < 1e-6 and records[1]["p_value"] < 1e-6 and records[2]["p_value"] > 1e-3
    assert abs(records[1]["weight"] - 0.3) < 0.05  # PEFT's cat is exactly sum_i w_i dW_i
    assert set(records[0]["layers"]) == {"model.layers.0", "model.layers.1"}
    assert all(r["null"] == "decoys" and r["release"] == folders["release"] and r["blocks"] == 14 for r in records)
    assert all(r["reference_folders"] == [] and r["references"] == 0 for r in records)
    assert f"{merged}: contains the release (weight ~" in printed
    assert f"{unrelated}: no evidence of the release" in printed


@pytest.mark.parametrize(
    "kind", [{"use_dora": True}, {"use_rslora": True}, "loha"], ids=["dora", "rslora", "loha"]
)
def test_adapter_kinds_are_read_as_their_weight_space_delta(folders, tmp_path, kind):
    if kind == "loha":
        from peft import LoHaConfig

        config = (LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False), 3)
    else:
        config = random_lora(3, **kind)
    release = save_adapter(tmp_path / "release", config)
    suspect = folded(folders["base"], [release], tmp_path / "merged")
    unrelated = folded(folders["base"], [folders["other"]], tmp_path / "unrelated")
    traced, clean = trace_release(folders["base"], release, [suspect, unrelated])
    assert traced.contains and traced.p_value < 1e-6 and abs(traced.weight - 1.0) < 0.05
    assert not clean.contains and clean.p_value > 1e-3


def test_a_full_fine_tune_is_traced_in_a_task_arithmetic_merge(folders, tmp_path):
    from transformers import LlamaForCausalLM

    def stepped(seed: int, out: Path) -> str:
        model = LlamaForCausalLM.from_pretrained(folders["base"])
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(out)
        return str(out)

    release, other = stepped(1, tmp_path / "release"), stepped(2, tmp_path / "other")
    base = LlamaForCausalLM.from_pretrained(folders["base"])
    theta0 = dict(base.named_parameters())
    thetas = [dict(LlamaForCausalLM.from_pretrained(f).named_parameters()) for f in (release, other)]
    with torch.no_grad():
        for name, param in base.named_parameters():
            param.copy_(theta0[name] + 0.4 * (thetas[0][name] - theta0[name]) + 0.6 * (thetas[1][name] - theta0[name]))
    base.save_pretrained(tmp_path / "merged")
    (result,) = trace_release(folders["base"], release, [str(tmp_path / "merged")])
    assert result.contains and abs(result.weight - 0.4) < 0.05
    assert result.blocks == 2 * 7 + 2  # the layers' matrices, the embeddings and the LM head


def test_references_are_read_and_change_the_null(folders, tmp_path):
    references = [save_adapter(tmp_path / f"ref{i}", random_lora(10 + i)) for i in range(2)]
    suspect = folded(folders["base"], [folders["release"]], tmp_path / "copy")
    (result,) = trace_release(folders["base"], folders["release"], [suspect], references)
    assert result.null == "references" and result.references == 2 and result.contains
    assert result.p_value == pytest.approx(3.0**-14) and result.wins == 14


def test_an_adapter_trained_without_a_module_the_base_has_is_read_on_the_modules_it_trained(tmp_path):
    """The demo's case: MiniLM's checkpoint has a pooler, the adapters were trained without it, and "dense" matches
    the pooler's layer too. The pooler's untrained LoRA is left out, not called a mismatch."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "base")
    trained_on = BertModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "dense"], init_lora_weights=False)
    get_peft_model(trained_on, lora).save_pretrained(tmp_path / "release")
    suspect = BertModel.from_pretrained(tmp_path / "base")
    merged = get_peft_model(suspect, lora)
    merged.load_adapter(str(tmp_path / "release"), "default")
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    (result,) = trace_release(str(tmp_path / "base"), str(tmp_path / "release"), [str(tmp_path / "merged")])
    assert result.contains and abs(result.weight - 1.0) < 0.01
    assert result.blocks == 2 * 4 and "pooler" not in result.layers  # query + 3 dense per layer


def test_suspects_that_are_not_models_of_the_base_are_refused_by_name(folders, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = tiny_llama().config.to_dict() | {"hidden_size": 64, "intermediate_size": 128}
    LlamaForCausalLM(LlamaConfig(**wider)).save_pretrained(tmp_path / "wider")
    shallower = tiny_llama().config.to_dict() | {"num_hidden_layers": 1}
    LlamaForCausalLM(LlamaConfig(**shallower)).save_pretrained(tmp_path / "shallower")
    foreign = save_adapter(tmp_path / "foreign", random_lora(4), base=LlamaForCausalLM(LlamaConfig(**wider)))
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "wider"): "hidden_size: base 32, suspect 64",
        str(tmp_path / "shallower"): "num_hidden_layers: base 2, suspect 1",
        foreign: "does not fit the base model",
        str(tmp_path / "empty"): "holds neither adapter_config.json",
        str(tmp_path / "missing" / "model"): "is neither a local folder nor a valid Hub repo id",
    }
    for suspect, message in cases.items():
        code = main([suspect, "--base_model", folders["base"], "--release", folders["release"]])
        error = capsys.readouterr().err
        assert code == 2 and message in error and repr(suspect) in error, error
    code = main([folders["other"], "--base_model", folders["release"], "--release", folders["release"]])
    assert code == 2 and "is a PEFT adapter; pass the model it was trained on" in capsys.readouterr().err


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom trap2_hf.cli import main\n"
        "try:\n    main(['trace', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "print('loaded:', sorted(m for m in ('torch', 'peft', 'trap2_hf.trace.stats') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--reference" in out and "--shared_directions" in out
    assert out.strip().endswith("loaded: []"), out


def test_the_model_card_gives_a_trace_command_that_parses():
    import re

    from trap2_hf.release.card import protection_section
    from trap2_hf.trace.cli import make_parser

    settings = {"trap_scale_min": 0.05, "trap_scale_max": 2.0, "trap_margin": 0.05, "update": "lora"}
    text = protection_section(settings, base_model="org/base", repo_id="me/adapter")
    (command,) = re.findall(r"`(trap2 trace [^`]+)`", text)
    assert command == "trap2 trace MERGED_MODEL --base_model org/base --release me/adapter"
    arguments, _, rest = make_parser().parse_args_into_dataclasses(args=command.split()[2:])
    assert (arguments.base_model, arguments.release, rest.suspect) == ("org/base", "me/adapter", ["MERGED_MODEL"])
